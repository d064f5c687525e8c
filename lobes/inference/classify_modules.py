"""What an audio-classification pretrained folder's ``hyperparams.yaml`` builds.

BEATs computes its own filterbank from the 16 kHz waveform, so ``compute_features`` and ``mean_var_norm``
are :class:`Passthrough`; ``embedding_model`` is :class:`BEATsEmbedding` (BEATs, then pooling over the tokens
that the true length of each clip covers: a clip gives the same result alone or padded inside a batch),
``classifier`` a :class:`ClassifierHead` and ``label_encoder`` :class:`ClassLabels`. Their load hooks are
strict and name the file on any mismatch. Folders name these classes ``lobes.inference.classify.X``:
:mod:`lobes.inference.classify` exports them. The examples of :class:`BEATsEmbedding` and
:class:`ClassifierHead` chain: waveforms ``(B, N)`` -> embeddings ``(B, 1, C)`` -> log-probabilities
``(B, 1, classes)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch.nn.functional as F
from speechbrain.dataio.encoder import CategoricalEncoder
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_transfer, register_checkpoint_hooks
from torch import Tensor, nn

from lobes.beats import BEATs, token_padding_mask
from lobes.inference.pretrained import PretrainedError, load_state_strict

__all__ = ["KIND", "BEATsEmbedding", "ClassLabels", "ClassifierHead", "Passthrough"]

KIND = "classification"
"""``kind`` of the folders (``package.json``)."""


class Passthrough(nn.Module):
    """Returns its first argument: ``compute_features`` and ``mean_var_norm`` of a model that reads waveforms.

    Example
    -------
    >>> import torch
    >>> Passthrough()(torch.zeros(2, 16000), torch.ones(2)).shape
    torch.Size([2, 16000])
    """

    def forward(self, x: Tensor, *_: Any) -> Tensor:
        """``x`` unchanged."""
        return x


@register_checkpoint_hooks
class BEATsEmbedding(nn.Module):
    """BEATs encoder, optional layer mix and pooling over the valid tokens: waveforms -> one vector per clip.

    Arguments
    ---------
    encoder : lobes.beats.BEATs
        The encoder (its ``output_all_hiddens`` decides whether ``layer_mix`` is needed).
    pooling : nn.Module or callable
        ``pooling(features (B, T, C), padding_mask (B, T)) -> (B, C)``, e.g. ``AttentivePooling`` or
        ``masked_mean``.
    layer_mix : nn.Module, optional
        ``(L + 1, B, T, C) -> (B, T, C)`` (``WeightedLayerSum``), for an encoder returning every layer.

    Example
    -------
    >>> import torch
    >>> from lobes.beats import BEATsConfig, masked_mean
    >>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
    ...                            embed_dim=32, encoder_attention_heads=4, conv_pos=16, conv_pos_groups=2)
    >>> emb = BEATsEmbedding(BEATs(cfg=cfg), masked_mean)
    >>> emb(torch.randn(2, 16000), torch.tensor([1.0, 0.5])).shape
    torch.Size([2, 1, 32])
    """

    def __init__(
        self,
        encoder: BEATs,
        pooling: nn.Module | Callable[[Tensor, Tensor], Tensor],
        layer_mix: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if encoder.output_all_hiddens and layer_mix is None:
            raise ValueError(
                "the encoder returns every layer (output_all_hiddens=True): give a layer_mix "
                "module such as lobes.beats.WeightedLayerSum"
            )
        self.encoder, self.pooling, self.layer_mix = encoder, pooling, layer_mix

    def forward(self, wavs: Tensor, wav_lens: Tensor | None = None) -> Tensor:
        """``wavs`` (B, N) 16 kHz, ``wav_lens`` (B,) relative lengths -> embeddings (B, 1, C)."""
        feats = self.encoder(wavs, wav_lens)[0]  # (B, T, C) or (L + 1, B, T, C)
        if feats.dim() == 4:
            feats = self.layer_mix(feats)  # (B, T, C)
        padding = token_padding_mask(wavs, wav_lens, self.encoder.cfg.input_patch_size)  # (B, T), True = pad
        return self.pooling(feats, padding).unsqueeze(1)  # (B, 1, C)

    @mark_as_transfer
    @mark_as_loader
    def load_checked(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """speechbrain's load hook: strict, with an error naming the file on any mismatch."""
        load_state_strict(self, path, "embedding_model")


@register_checkpoint_hooks
class ClassifierHead(nn.Module):
    """Linear layer returning log-probabilities: log-softmax over classes, or log-sigmoid per label.

    Arguments
    ---------
    input_size : int
        Embedding size ``C``.
    n_classes : int
        Number of classes.
    multi_label : bool
        True for independent labels (AudioSet tags: sigmoid), False for one class per clip (softmax).
    bias : bool
        Whether the linear layer has a bias.

    Example
    -------
    >>> import torch
    >>> head = ClassifierHead(32, 5)
    >>> log_probs = head(torch.randn(2, 1, 32))
    >>> log_probs.shape, torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 1))
    (torch.Size([2, 1, 5]), True)
    """

    def __init__(self, input_size: int, n_classes: int, multi_label: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, n_classes, bias=bias)
        self.multi_label = bool(multi_label)

    @property
    def n_classes(self) -> int:
        """Number of outputs."""
        return self.linear.out_features

    def forward(self, emb: Tensor) -> Tensor:
        """``(..., C)`` embeddings -> ``(..., n_classes)`` float32 log-probabilities."""
        logits = self.linear(emb).float()
        return F.logsigmoid(logits) if self.multi_label else F.log_softmax(logits, dim=-1)

    @mark_as_transfer
    @mark_as_loader
    def load_checked(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """speechbrain's load hook: strict, with an error naming the file on any mismatch."""
        load_state_strict(self, path, "classifier")


@register_checkpoint_hooks
class ClassLabels(CategoricalEncoder):
    """speechbrain's ``CategoricalEncoder`` whose loading fails loudly: missing file or wrong class count.

    Arguments
    ---------
    n_classes : int, optional
        Number of labels the file must hold (the classifier's outputs).

    Example
    -------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "labels.ckpt")
    >>> enc = ClassLabels(); enc.update_from_iterable(["dog", "cat"]); enc.save(path)
    >>> ClassLabels(n_classes=3).load_checked(path)
    Traceback (most recent call last):
    ...
    lobes.inference.pretrained.PretrainedError: ...labels.ckpt holds 2 labels, but the classifier has 3 outputs
    """

    def __init__(self, n_classes: int | None = None) -> None:
        super().__init__()
        self.n_classes = n_classes
        if n_classes is not None:
            self.expect_len(n_classes)

    @mark_as_transfer
    @mark_as_loader
    def load_checked(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """Read the label file; raise if it is missing, unreadable or of the wrong size."""
        path = Path(path)
        if not path.is_file():
            raise PretrainedError(f"{path}: missing label file (speechbrain CategoricalEncoder format)")
        try:
            self.load(path)
        except Exception as exc:
            raise PretrainedError(
                f"{path}: not a CategoricalEncoder label file ({type(exc).__name__}: {exc})"
            ) from None
        if self.n_classes is not None and len(self) != self.n_classes:
            raise PretrainedError(f"{path} holds {len(self)} labels, but the classifier has {self.n_classes} outputs")
