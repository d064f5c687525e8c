"""BEATs acoustic tokenizer: audio patches -> discrete ids (arXiv 2212.09058; Microsoft's ``beats/Tokenizers.py``).

The tokenizer is the BEATs encoder (the same patch embedding and Transformer backbone as
:class:`lobes.beats.BEATs`, without the classification head) followed by ``quantize_layer`` (Linear,
Tanh, Linear to ``quant_dim``) and a :class:`lobes.beats.quantizer.NormEMAVectorQuantizer` with
``quant_n`` unit codes: a patch's id is the code of highest cosine similarity to its projected feature.
Pre-training uses the ids of masked patches as classification targets.

Microsoft's tokenizer checkpoints (e.g. ``Tokenizer_iter3_plus_AS2M.pt``) are ``{"cfg": TokenizersConfig
fields, "model": state dict}`` with the keys of ``BEATs`` (``patch_embedding.*``, ``layer_norm.*``,
``post_extract_proj.*`` when ``embed_dim != encoder_embed_dim``, ``encoder.*`` with ``weight_g`` /
``weight_v`` weight-norm names), plus ``quantize_layer.{0,2}.{weight,bias}`` and ``quantize.cluster_size``,
``quantize.embedding.{weight,cluster_size,embed_avg,initted}``. They load key by key with every shape
checked, and :meth:`BEATsTokenizer.save_checkpoint` writes the same layout.

Ids are exact under padding: the encoder gives a clip padded inside a batch the same valid-token features
as alone (see :mod:`lobes.beats.model`), and quantization is per token; padded tokens get
:data:`PAD_TOKEN_ID`, torch's default ``ignore_index``, so ``F.cross_entropy(logits, ids)`` skips them.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lobes.beats.checkpoint import BEATsCheckpointError, check_config_against_weights, load_checkpoint
from lobes.beats.config import BEATsConfig
from lobes.beats.model import FBANK_MEAN, FBANK_STD, BEATs, _check_input
from lobes.beats.pooling import NUM_MEL_BINS, token_padding_mask
from lobes.beats.quantizer import NormEMAVectorQuantizer
from lobes.checkpoints import state_dict_mismatches
from lobes.features import kaldi_fbank
from lobes.io import atomic_save

__all__ = [
    "PAD_TOKEN_ID",
    "RANDOM_PROJECTION",
    "BEATsTokenizer",
    "RandomProjectionTokenizer",
    "TokenizerOutput",
    "Tokens",
    "TokenizersConfig",
    "load_tokenizer",
    "normalised_fbank",
]

logger = logging.getLogger(__name__)

PAD_TOKEN_ID = -100
"""Id given to padded tokens (torch's default ``ignore_index`` of ``cross_entropy``)."""

_BEATS_ONLY_FIELDS = ("layer_wise_gradient_decay_ratio", "finetuned_model", "predictor_dropout", "predictor_class")


class TokenizersConfig(BEATsConfig):
    """Tokenizer hyper-parameters with the field names of Microsoft's ``TokenizersConfig``.

    The fields are BEATs' encoder fields (see :class:`lobes.beats.BEATsConfig`; no classification head or
    layer-wise gradient decay) plus ``quant_n`` (codes, 1024) and ``quant_dim`` (code size, 256).
    ``input_patch_size`` defaults to 16 (Microsoft's class has -1, i.e. "must be given"; released
    tokenizers use 16). :meth:`released` gives the released encoder architecture.

    Example
    -------
    >>> cfg = TokenizersConfig.released(encoder_layers=2, quant_n=64)
    >>> cfg.quant_n, cfg.quant_dim, cfg.deep_norm, "predictor_class" in cfg.to_dict()
    (64, 256, True, False)
    """

    _DEFAULTS: dict[str, Any] = {
        **{k: v for k, v in BEATsConfig._DEFAULTS.items() if k not in _BEATS_ONLY_FIELDS},
        "quant_n": 1024,
        "quant_dim": 256,
    }

    def encoder_config(self) -> BEATsConfig:
        """The :class:`BEATsConfig` of the encoder part (no classification head)."""
        fields = {k: v for k, v in self.to_dict().items() if k in BEATsConfig.fields()}
        return BEATsConfig(fields, finetuned_model=False)


class Tokens(NamedTuple):
    """Token ids of a batch and which of them are padding."""

    ids: Tensor
    """``(B, T)`` int64 code ids, :data:`PAD_TOKEN_ID` at padded tokens."""
    padding_mask: Tensor
    """``(B, T)`` bool, ``True`` at padded tokens (as :func:`lobes.beats.token_padding_mask`)."""

    @property
    def mask(self) -> Tensor:
        """``(B, T)`` bool, ``True`` at valid tokens."""
        return ~self.padding_mask


class TokenizerOutput(NamedTuple):
    """What :meth:`BEATsTokenizer.forward` returns (for training the tokenizer)."""

    ids: Tensor
    """``(B, T)`` int64, :data:`PAD_TOKEN_ID` at padded tokens."""
    padding_mask: Tensor
    """``(B, T)`` bool, ``True`` at padded tokens."""
    quantized: Tensor
    """``(B, T, quant_dim)`` unit codes with the straight-through gradient."""
    loss: Tensor
    """Scalar commitment loss over valid tokens."""


def _check_quantizer_fields(
    config: TokenizersConfig, state_dict: Mapping[str, Tensor], given: set[str], source: str
) -> None:
    """Refuse ``quant_n`` / ``quant_dim`` values that the codebook or projection shapes contradict."""
    implied: dict[str, tuple[int, str]] = {}
    key = "quantize.embedding.weight"
    if torch.is_tensor(w := state_dict.get(key)) and w.dim() == 2:  # (quant_n, quant_dim)
        implied["quant_n"], implied["quant_dim"] = (int(w.shape[0]), key), (int(w.shape[1]), key)
    key = "quantize_layer.2.weight"
    if "quant_dim" not in implied and torch.is_tensor(w := state_dict.get(key)) and w.dim() == 2:  # (quant_dim, C)
        implied["quant_dim"] = (int(w.shape[0]), key)
    problems = []
    for field, (value, key) in implied.items():
        have = getattr(config, field)
        if have == value:
            continue
        if field in given:
            problems.append(f"cfg {field}={have!r} but the weights ({key}) imply {field}={value!r}")
        else:
            problems.append(
                f"cfg has no {field!r}, so {have!r} was assumed, but the weights ({key}) imply {value!r}; add "
                f"{field!r}: {value!r} to the checkpoint's cfg or pass cfg={{{field!r}: {value!r}}} when loading"
            )
    if problems:
        raise BEATsCheckpointError(f"{source}: " + "; ".join(problems))


class BEATsTokenizer(BEATs):
    """BEATs acoustic tokenizer: the BEATs encoder, ``quantize_layer`` and a normalised EMA quantizer.

    Arguments
    ---------
    ckp_path : str or path-like, optional
        Microsoft-format tokenizer checkpoint (``{"cfg", "model"}``, e.g. ``Tokenizer_iter3_plus_AS2M.pt``).
    freeze : bool
        If True (inference, e.g. making pre-training targets): eval mode always, no gradients in
        ``forward``. False to train the tokenizer.
    cfg : TokenizersConfig or dict, optional
        Without ``ckp_path``: the architecture of a new tokenizer (default ``TokenizersConfig()``). With it:
        overrides on top of the checkpoint's cfg (e.g. dropouts).
    beta, decay, kmeans_init, dead_code_threshold
        Quantizer training settings (see :class:`lobes.beats.quantizer.NormEMAVectorQuantizer`; the
        reference uses 1.0, 0.99, True, 0). They are not part of the checkpoint's cfg.

    Example
    -------
    >>> cfg = TokenizersConfig.released(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
    ...                                 encoder_attention_heads=4, embed_dim=32, conv_pos=16, conv_pos_groups=4,
    ...                                 quant_n=32, quant_dim=16)
    >>> tokenizer = BEATsTokenizer(cfg=cfg, kmeans_init=False)  # random unit codes
    >>> ids, padding_mask = tokenizer.tokenize(torch.randn(2, 16000), torch.tensor([1.0, 0.6]))
    >>> ids.shape, ids.dtype, int(padding_mask.sum()), int((ids == PAD_TOKEN_ID).sum())
    (torch.Size([2, 48]), torch.int64, 24, 24)
    """

    def __init__(
        self,
        ckp_path: str | os.PathLike | None = None,
        freeze: bool = True,
        cfg: TokenizersConfig | dict | None = None,
        *,
        beta: float = 1.0,
        decay: float = 0.99,
        kmeans_init: bool = True,
        dead_code_threshold: float = 0.0,
    ) -> None:
        ckpt = load_checkpoint(ckp_path) if ckp_path is not None else None
        config = TokenizersConfig(ckpt["cfg"]) if ckpt is not None else TokenizersConfig()
        if cfg is not None:
            config.update(cfg)
        if ckpt is not None:
            source = str(ckp_path)
            overrides = cfg.to_dict() if isinstance(cfg, BEATsConfig) else (cfg or {})
            given = set(ckpt["cfg"]) | set(overrides)
            check_config_against_weights(config, ckpt["model"], given, source)
            _check_quantizer_fields(config, ckpt["model"], given, source)
        super().__init__(ckp_path=None, freeze=freeze, output_all_hiddens=False, cfg=config.encoder_config())
        self.cfg = config
        d = config.encoder_embed_dim
        self.quantize_layer = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, config.quant_dim))
        self.quantize = NormEMAVectorQuantizer(
            config.quant_n,
            config.quant_dim,
            beta=beta,
            decay=decay,
            kmeans_init=kmeans_init,
            dead_code_threshold=dead_code_threshold,
        )
        if ckpt is not None:
            self.load_tokenizer_state_dict(ckpt["model"], source=str(ckp_path))
        self.train(not freeze)

    # ---------------------------------------------------------------- checkpoints
    def load_tokenizer_state_dict(self, state_dict: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Load a Microsoft-layout tokenizer state dict, every key and shape checked.

        Raises
        ------
        BEATsCheckpointError
            Missing or unexpected keys, or shape mismatches, each named (with ``source``).
        """
        own = self.state_dict()
        problems = state_dict_mismatches(own, state_dict)
        missing = [k for k in own if k not in state_dict]
        if missing and all(k.startswith(("quantize.", "quantize_layer.")) for k in missing):
            problems.append("no quantizer: is this a BEATs model checkpoint rather than a tokenizer?")
        if problems:
            raise BEATsCheckpointError(f"{source}: does not match the BEATs tokenizer cfg: " + " | ".join(problems))
        self.load_state_dict(dict(state_dict), strict=True)
        if not self.quantize.initialised:
            logger.warning(
                "%s: the tokenizer's codebook is marked uninitialised (quantize.embedding.initted = 0); "
                "tokenize() will refuse it until a training pass seeds it",
                source,
            )

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write ``{"cfg": TokenizersConfig fields, "model": state dict}`` (Microsoft's layout) atomically.

        The file loads with :class:`BEATsTokenizer` and Microsoft's ``Tokenizers``.
        """
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return atomic_save({"cfg": copy.deepcopy(self.cfg.to_dict()), "model": state}, path)

    # ---------------------------------------------------------------- forward pass
    def _quantizer_input(
        self, wav: Tensor, wav_lens: Tensor | None, fbank_mean: float, fbank_std: float
    ) -> tuple[Tensor, Tensor]:
        """``(B, N)`` audio -> projected features ``(B, T, quant_dim)`` and token padding mask ``(B, T)``."""
        if torch.is_tensor(wav) and wav.dim() == 1:
            wav = wav.unsqueeze(0)
        (feats,) = self.extract_features(wav, wav_lens, fbank_mean, fbank_std)  # checks the input; (B, T, C)
        padding_mask = token_padding_mask(wav, wav_lens, self.cfg.input_patch_size)  # (B, T)
        return self.quantize_layer(feats), padding_mask

    def forward_fbank(self, fbank: Tensor, padding_mask: Tensor) -> TokenizerOutput:
        """:meth:`forward` from a normalised filterbank (shared with a model being pre-trained).

        Arguments
        ---------
        fbank : torch.Tensor
            ``(B, frames, 128)`` normalised filterbank (:meth:`lobes.beats.BEATs.preprocess`).
        padding_mask : torch.Tensor
            ``(B, T)`` token padding mask (``True`` = padded), :func:`lobes.beats.token_padding_mask`.

        Returns
        -------
        TokenizerOutput
            As :meth:`forward`.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            key_padding = padding_mask if bool(padding_mask.any()) else None
            (feats,) = self.encode_fbank(fbank, padding_mask, key_padding)  # (B, T, C)
            out = self.quantize(self.quantize_layer(feats), padding_mask)
        return TokenizerOutput(out.ids.masked_fill(padding_mask, PAD_TOKEN_ID), padding_mask, out.quantized, out.loss)

    def tokenize_fbank(self, fbank: Tensor, padding_mask: Tensor) -> Tensor:
        """Token ids ``(B, T)`` of a normalised filterbank ``(B, frames, 128)``; no gradients or codebook updates.

        :data:`PAD_TOKEN_ID` where ``padding_mask`` ``(B, T)`` is ``True``.
        """
        self.quantize.require_codebook()
        with torch.no_grad():
            key_padding = padding_mask if bool(padding_mask.any()) else None
            (feats,) = self.encode_fbank(fbank, padding_mask, key_padding)  # (B, T, C)
            ids = self.quantize.nearest(self.quantize_layer(feats))  # (B, T)
        return ids.masked_fill(padding_mask, PAD_TOKEN_ID)

    def forward(
        self, wav: Tensor, wav_lens: Tensor | None = None, fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD
    ) -> TokenizerOutput:
        """Tokenize a batch; in training mode also seed / update the codebook (from valid tokens only).

        Arguments
        ---------
        wav : torch.Tensor
            ``(B, N)`` float audio in [-1, 1] at 16 kHz, ``N >= 2800``.
        wav_lens : torch.Tensor, optional
            ``(B,)`` relative lengths in ``(0, 1]``; ``None`` = all rows full length.
        fbank_mean, fbank_std : float
            Filterbank normalisation (BEATs' fixed statistics).

        Returns
        -------
        TokenizerOutput
            ``ids`` ``(B, T)``, ``padding_mask`` ``(B, T)``, ``quantized`` ``(B, T, quant_dim)``, ``loss``.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            z, padding_mask = self._quantizer_input(wav, wav_lens, fbank_mean, fbank_std)
            out = self.quantize(z, padding_mask)
        return TokenizerOutput(out.ids.masked_fill(padding_mask, PAD_TOKEN_ID), padding_mask, out.quantized, out.loss)

    def tokenize(
        self, wav: Tensor, wav_lens: Tensor | None = None, fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD
    ) -> Tokens:
        """Token ids of a batch, without gradients or codebook updates.

        The encoder runs in the module's current mode (a frozen tokenizer is always in eval mode, so ids
        are deterministic); under ``torch.autocast`` it runs in reduced precision, the code lookup always
        in float32.

        Arguments
        ---------
        wav : torch.Tensor
            ``(B, N)`` float audio in [-1, 1] at 16 kHz, ``N >= 2800`` (a 1-D signal is a batch of one).
        wav_lens : torch.Tensor, optional
            ``(B,)`` relative lengths in ``(0, 1]``; ``None`` = all rows full length.
        fbank_mean, fbank_std : float
            Filterbank normalisation (BEATs' fixed statistics).

        Returns
        -------
        Tokens
            ``ids`` ``(B, T)`` int64 in ``[0, quant_n)``, :data:`PAD_TOKEN_ID` at padded tokens, and
            ``padding_mask`` ``(B, T)`` bool (``True`` = padded); ``T = 8 * time patches``, time-major.
        """
        self.quantize.require_codebook()  # before the encoder's work
        with torch.no_grad():
            z, padding_mask = self._quantizer_input(wav, wav_lens, fbank_mean, fbank_std)
            ids = self.quantize.nearest(z)  # (B, T)
        return Tokens(ids.masked_fill(padding_mask, PAD_TOKEN_ID), padding_mask)


RANDOM_PROJECTION = "random_projection"
"""``cfg["tokenizer"]`` of a :class:`RandomProjectionTokenizer` checkpoint."""


class RandomProjectionTokenizer(nn.Module):
    """The frozen random-projection tokenizer of BEATs' first iteration (arXiv 2212.09058, section 3.1).

    Each 16x16 patch of the normalised filterbank (flattened, ``p * p`` values, the same patches and token
    order as :meth:`lobes.beats.BEATs.embed_patches`) is projected by a random matrix ``W`` and takes the id
    of the random unit code of highest cosine similarity: ``argmin_i ||l2(v_i) - l2(W x)||``. Neither ``W``
    nor the codes are ever trained; both follow from ``seed``.

    Checkpoints are ``{"cfg": {"tokenizer": "random_projection", "input_patch_size", "quant_n",
    "quant_dim", "seed"}, "model": {"projection", "codebook"}}`` (:meth:`save_checkpoint`,
    :func:`load_tokenizer`).

    Arguments
    ---------
    quant_n : int
        Number of codes.
    quant_dim : int
        Size of the projected vectors and codes.
    input_patch_size : int
        Patch size in frames and mel bins (16 in BEATs).
    seed : int
        Seed of the projection and the codebook.

    Example
    -------
    >>> rp = RandomProjectionTokenizer(quant_n=64, quant_dim=16)
    >>> ids, padding_mask = rp.tokenize(torch.randn(2, 16000), torch.tensor([1.0, 0.6]))
    >>> ids.shape, int(padding_mask.sum()), bool((ids[0] >= 0).all())
    (torch.Size([2, 48]), 24, True)
    """

    def __init__(self, quant_n: int = 1024, quant_dim: int = 16, input_patch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        if quant_n < 1 or quant_dim < 1:
            raise ValueError(f"quant_n and quant_dim must be >= 1, got {quant_n} and {quant_dim}")
        if input_patch_size < 1 or NUM_MEL_BINS % input_patch_size:
            raise ValueError(f"input_patch_size must divide {NUM_MEL_BINS}, got {input_patch_size}")
        self.cfg = {
            "tokenizer": RANDOM_PROJECTION,
            "input_patch_size": int(input_patch_size),
            "quant_n": int(quant_n),
            "quant_dim": int(quant_dim),
            "seed": int(seed),
        }
        g = torch.Generator().manual_seed(int(seed))
        patch = input_patch_size * input_patch_size
        # Xavier-normal projection and unit codes, as the paper initialises them
        self.register_buffer(
            "projection", torch.randn(patch, quant_dim, generator=g) * (2.0 / (patch + quant_dim)) ** 0.5
        )
        self.register_buffer("codebook", F.normalize(torch.randn(quant_n, quant_dim, generator=g), dim=-1))

    @property
    def quant_n(self) -> int:
        """Number of codes."""
        return self.cfg["quant_n"]

    def patches(self, fbank: Tensor) -> Tensor:
        """``(B, frames, 128)`` -> flattened patches ``(B, T, p * p)``, time-major (``T = t * 8 + f``)."""
        p = self.cfg["input_patch_size"]
        B, n_frames, n_bins = fbank.shape
        t, f = n_frames // p, n_bins // p
        x = fbank[:, : t * p].float().reshape(B, t, p, f, p)  # (B, t, p_time, f, p_freq)
        return x.permute(0, 1, 3, 2, 4).reshape(B, t * f, p * p)  # (B, T, p*p)

    def tokenize_fbank(self, fbank: Tensor, padding_mask: Tensor) -> Tensor:
        """Token ids ``(B, T)`` of a normalised filterbank; :data:`PAD_TOKEN_ID` where ``padding_mask`` is True."""
        with torch.no_grad(), torch.autocast(fbank.device.type, enabled=False):
            z = F.normalize(self.patches(fbank) @ self.projection, dim=-1)  # (B, T, quant_dim)
            ids = (z @ self.codebook.T).argmax(dim=-1)  # (B, T) max cosine = nearest unit code
        return ids.masked_fill(padding_mask, PAD_TOKEN_ID)

    def tokenize(
        self, wav: Tensor, wav_lens: Tensor | None = None, fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD
    ) -> Tokens:
        """Token ids of a batch, as :meth:`BEATsTokenizer.tokenize` (same input checks, same padding rule)."""
        wav, wav_lens = _check_input(wav, wav_lens, self.cfg["input_patch_size"])
        padding_mask = token_padding_mask(wav, wav_lens, self.cfg["input_patch_size"])  # (B, T)
        return Tokens(self.tokenize_fbank(normalised_fbank(wav, fbank_mean, fbank_std), padding_mask), padding_mask)

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write ``{"cfg", "model"}`` atomically; :func:`load_tokenizer` reads it back."""
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return atomic_save({"cfg": dict(self.cfg), "model": state}, path)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "RandomProjectionTokenizer":
        """Load a file written by :meth:`save_checkpoint` (every key and shape checked)."""
        ckpt = load_checkpoint(path)
        cfg = dict(ckpt["cfg"])
        if cfg.pop("tokenizer", None) != RANDOM_PROJECTION:
            raise BEATsCheckpointError(
                f"{path}: not a random-projection tokenizer (cfg tokenizer != {RANDOM_PROJECTION!r})"
            )
        try:
            tokenizer = cls(**cfg)
        except TypeError as exc:
            raise BEATsCheckpointError(f"{path}: bad random-projection tokenizer cfg {cfg}: {exc}") from None
        problems = state_dict_mismatches(tokenizer.state_dict(), ckpt["model"])
        if problems:
            raise BEATsCheckpointError(f"{path}: does not match its cfg: " + " | ".join(problems))
        tokenizer.load_state_dict(ckpt["model"], strict=True)
        return tokenizer


def normalised_fbank(wav: Tensor, fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD) -> Tensor:
    """BEATs' input features: the normalised 128-bin Kaldi fbank of ``wav * 2**15``, ``(B, N)`` -> ``(B, frames, 128)``.

    The same computation as :meth:`lobes.beats.BEATs.preprocess`, for modules without a BEATs encoder.
    """
    fbank = kaldi_fbank(
        wav.float() * 2**15, num_mel_bins=NUM_MEL_BINS, sample_frequency=16000.0, frame_length=25.0, frame_shift=10.0
    )
    return (fbank - fbank_mean) / (2 * fbank_std)


def load_tokenizer(
    path: str | os.PathLike, device: torch.device | str | None = None
) -> BEATsTokenizer | RandomProjectionTokenizer:
    """Load a frozen tokenizer checkpoint of either kind: Microsoft's layout (:class:`BEATsTokenizer`) or a
    :class:`RandomProjectionTokenizer` (``cfg["tokenizer"] == "random_projection"``).

    Example
    -------
    >>> import tempfile, os
    >>> path = RandomProjectionTokenizer(quant_n=8).save_checkpoint(os.path.join(tempfile.mkdtemp(), "rp.pt"))
    >>> type(load_tokenizer(path)).__name__
    'RandomProjectionTokenizer'
    """
    ckpt = load_checkpoint(path)
    if isinstance(ckpt.get("cfg"), Mapping) and ckpt["cfg"].get("tokenizer") == RANDOM_PROJECTION:
        tokenizer = RandomProjectionTokenizer.from_checkpoint(path)
    else:
        tokenizer = BEATsTokenizer(ckp_path=path, freeze=True)
    tokenizer.eval()
    return tokenizer.to(device) if device is not None else tokenizer
