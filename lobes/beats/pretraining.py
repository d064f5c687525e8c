"""BEATs pre-training (arXiv 2212.09058, sections 2-3): masked acoustic-token prediction and tokenizer distillation.

One iteration of BEATs alternates two trainings:

- **Masked token prediction** (:class:`MaskedTokenPretraining`): a frozen tokenizer gives every patch an id;
  75 % of each clip's valid patches are masked at random (:func:`random_token_mask`); only the unmasked
  patches go through the encoder's Transformer layers (:func:`encode_visible`, with their true positions in
  the positional convolution and the relative position bias); a light :class:`LabelPredictor` (Transformer
  layers over the encoded patches and a learned mask embedding at the masked positions) predicts the ids of
  the masked patches, trained with cross-entropy on the masked positions only. The first iteration uses
  the frozen :class:`lobes.beats.RandomProjectionTokenizer`.
- **Tokenizer distillation** (:class:`TokenizerDistillation`): a new :class:`lobes.beats.BEATsTokenizer`
  (encoder, ``quantize_layer``, normalised EMA codebook with k-means seeding and dead-code restarts) is
  trained so that a small :class:`FeatureEstimator` can rebuild the pre-trained model's last-layer features
  (the teacher) from the quantized vectors: ``1 - cos(estimate, teacher)`` on every valid patch plus the
  quantizer's commitment loss. The next iteration pre-trains a model on the new tokenizer's ids.

Both are ``nn.Module`` s with ``forward(wav, wav_lens) -> PretrainingStep`` and ``export(path)``, which writes
the Microsoft-format checkpoint (model: :meth:`lobes.beats.BEATs.save_checkpoint`, tokenizer:
:meth:`lobes.beats.BEATsTokenizer.save_checkpoint`), so a recipe assembles either from its YAML.
:class:`CodeUsage` counts how often each code is a target (perplexity, share of codes used).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lobes.beats.config import BEATsConfig
from lobes.beats.model import BEATs, _check_input, _Encoder, _GradScale
from lobes.beats.pooling import token_padding_mask
from lobes.beats.tokenizer import PAD_TOKEN_ID, BEATsTokenizer, TokenizersConfig

__all__ = [
    "CodeUsage",
    "FeatureEstimator",
    "LabelPredictor",
    "MaskedTokenPretraining",
    "PretrainingStep",
    "TokenizerDistillation",
    "encode_visible",
    "num_codes",
    "random_token_mask",
    "relative_position_buckets",
    "tokenizer_config",
    "visible_index",
]


class PretrainingStep(NamedTuple):
    """What a pre-training module returns for one batch."""

    loss: Tensor
    """Scalar training loss."""
    score: Tensor
    """Scalar quality figure: accuracy of the predicted ids on masked patches, or the mean cosine similarity
    of the estimated and teacher features."""
    ids: Tensor
    """``(N,)`` the code ids this batch used (targets, or the new tokenizer's ids), for :class:`CodeUsage`."""


# --------------------------------------------------------------------------------------------------
# masking and the encoder on unmasked patches
# --------------------------------------------------------------------------------------------------
def random_token_mask(padding_mask: Tensor, ratio: float = 0.75, generator: torch.Generator | None = None) -> Tensor:
    """Mask ``round(ratio * n)`` of each row's ``n`` valid tokens, chosen uniformly at random.

    At least one valid token stays unmasked and, when a row has two or more, at least one is masked.

    Arguments
    ---------
    padding_mask : torch.Tensor
        ``(B, T)`` bool, ``True`` at padded tokens (never masked).
    ratio : float
        Share of valid tokens to mask, in ``[0, 1]`` (BEATs: 0.75).
    generator : torch.Generator, optional
        Random source (on ``padding_mask``'s device).

    Returns
    -------
    torch.Tensor
        ``(B, T)`` bool, ``True`` at masked tokens.

    Example
    -------
    >>> pad = torch.tensor([[False] * 8, [False] * 4 + [True] * 4])
    >>> random_token_mask(pad, 0.75).sum(1)
    tensor([6, 3])
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    valid = (~padding_mask).sum(1)  # (B,)
    n_mask = torch.round(valid.double() * ratio).long()
    n_mask = torch.minimum(n_mask, (valid - 1).clamp_min(0))
    n_mask = torch.where(valid >= 2, n_mask.clamp_min(1), n_mask) if ratio > 0 else n_mask
    scores = torch.rand(padding_mask.shape, generator=generator, device=padding_mask.device)  # (B, T)
    scores = scores.masked_fill(padding_mask, 2.0)  # padded tokens rank last
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each token's score in its row
    return ranks < n_mask[:, None]


def visible_index(masked: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the visible (valid, unmasked) tokens of each row, in time order, left-aligned.

    Arguments
    ---------
    masked, padding_mask : torch.Tensor
        ``(B, T)`` bool.

    Returns
    -------
    index : torch.Tensor
        ``(B, K)`` int64 token positions, ``K`` the largest visible count of a row.
    index_padding : torch.Tensor
        ``(B, K)`` bool, ``True`` at slots beyond a row's visible count (their index is meaningless).

    Example
    -------
    >>> visible_index(torch.tensor([[True, False, True, False]]), torch.tensor([[False, False, False, True]]))
    (tensor([[1]]), tensor([[False]]))
    """
    visible = ~(masked | padding_mask)  # (B, T)
    T = visible.shape[1]
    order = torch.arange(T, device=visible.device)
    key = torch.where(visible, order, order + T)  # visible first, each group in time order
    counts = visible.sum(1)  # (B,)
    K = max(int(counts.max()), 1)
    index = key.argsort(dim=1)[:, :K]  # (B, K)
    return index, torch.arange(K, device=visible.device)[None, :] >= counts[:, None]


def relative_position_buckets(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """BEATs' bucket of each ``key - query`` distance (T5-style, bidirectional), for any distances.

    The same rule (and float32 operation order) as the encoder's table for consecutive positions, so an
    encoder pass on a subset of tokens sees the biases of their true distances.

    Example
    -------
    >>> relative_position_buckets(torch.tensor([-1, 0, 1, 100]), 320, 800).tolist()
    [1, 0, 161, 247]
    """
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    large = (
        exact
        + (torch.log(distance.clamp_min(1).float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    )
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(distance < exact, distance, large)


def _position_bias(encoder: _Encoder, index: Tensor) -> Tensor | None:
    """Relative-position bias ``(B, H, K, K)`` of the tokens at positions ``index`` ``(B, K)``."""
    if not encoder.relative:
        return None
    relative = index[:, None, :] - index[:, :, None]  # (B, K, K) key - query
    buckets = relative_position_buckets(relative, encoder.num_buckets, encoder.max_distance)
    table = encoder.layers[0].self_attn.relative_attention_bias.weight  # (num_buckets, H)
    return table[buckets].permute(0, 3, 1, 2)  # (B, H, K, K)


def _embed(model: BEATs, fbank: Tensor) -> Tensor:
    """Patch embeddings entering the encoder, ``(B, frames, 128)`` -> ``(B, T, C)`` (as ``encode_fbank``)."""
    x = model.layer_norm(model.embed_patches(fbank))  # (B, T, E)
    if model.post_extract_proj is not None:
        x = model.post_extract_proj(x)  # (B, T, C)
    return model.dropout_input(x)


def encode_visible(model: BEATs, fbank: Tensor, padding_mask: Tensor, masked: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model``'s encoder on the visible patches only (MAE-style), with their true positions.

    Masked and padded patches are zeroed before the positional convolution (so nothing of them reaches the
    visible ones), the visible tokens are gathered, and the Transformer layers run on them alone with the
    relative position bias of their true distances. With nothing masked this is exactly the model's forward
    pass.

    Arguments
    ---------
    model : lobes.beats.BEATs
        The encoder being pre-trained.
    fbank : torch.Tensor
        ``(B, frames, 128)`` normalised filterbank.
    padding_mask, masked : torch.Tensor
        ``(B, T)`` bool token masks.

    Returns
    -------
    features : torch.Tensor
        ``(B, K, C)`` last-layer features of the visible tokens.
    index, index_padding : torch.Tensor
        ``(B, K)`` their positions and the slot padding (:func:`visible_index`).

    Example
    -------
    >>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
    ...                            encoder_attention_heads=4, embed_dim=16, conv_pos=8, conv_pos_groups=2)
    >>> model = BEATs(cfg=cfg).eval()
    >>> fbank = model.preprocess(torch.randn(2, 16000))
    >>> pad = torch.zeros(2, 48, dtype=torch.bool)
    >>> feats, index, _ = encode_visible(model, fbank, pad, random_token_mask(pad, 0.75))
    >>> feats.shape
    torch.Size([2, 12, 32])
    """
    encoder = model.encoder
    x = _embed(model, fbank)  # (B, T, C)
    B, T, C = x.shape
    index, index_padding = visible_index(masked, padding_mask)  # (B, K)
    x = x.masked_fill((masked | padding_mask).unsqueeze(-1), 0.0)
    x = x + encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
    x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, C))  # (B, K, C)
    if not encoder.pre_norm:
        x = encoder.layer_norm(x)
    x = F.dropout(x, encoder.dropout, encoder.training)
    key_mask = torch.zeros(index_padding.shape, dtype=torch.float32, device=x.device)
    key_mask = key_mask.masked_fill(index_padding, float("-inf"))[:, None, None, :]  # (B, 1, 1, K)
    pos_bias = _position_bias(encoder, index)  # (B, H, K, K)
    for layer in encoder.layers:
        if encoder.grad_decay != 1.0:
            x = _GradScale.apply(x, encoder.grad_decay)
        if not (encoder.training and encoder.layerdrop > 0 and torch.rand(()) < encoder.layerdrop):
            x = layer(x, pos_bias, key_mask)
    if encoder.pre_norm:
        x = encoder.layer_norm(x)
    return x, index, index_padding


# --------------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------------
def _small_encoder(
    embed_dim: int, layers: int, heads: int, ffn_dim: int, conv_pos: int, conv_pos_groups: int
) -> _Encoder:
    """A BEATs-style Transformer stack (positional convolution, gated relative bias, deep-norm post-LN)."""
    cfg = BEATsConfig.released(
        encoder_layers=layers,
        encoder_embed_dim=embed_dim,
        encoder_ffn_embed_dim=ffn_dim,
        encoder_attention_heads=heads,
        embed_dim=embed_dim,
        conv_pos=conv_pos,
        conv_pos_groups=conv_pos_groups,
        num_buckets=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return _Encoder(cfg)


class LabelPredictor(nn.Module):
    """The light label predictor: encoded visible patches + a mask embedding at masked positions ->
    Transformer layers -> logits over the tokenizer's codes.

    Arguments
    ---------
    embed_dim : int
        Width of the encoder's features (``encoder_embed_dim``).
    num_codes : int
        Codes of the tokenizer (``quant_n``).
    layers, heads, ffn_dim : int
        Size of the Transformer stack.
    conv_pos, conv_pos_groups : int
        Its positional convolution (kernel over tokens, groups).

    Example
    -------
    >>> predictor = LabelPredictor(32, num_codes=50, layers=1, heads=4, ffn_dim=64, conv_pos=8, conv_pos_groups=2)
    >>> pad = torch.zeros(2, 48, dtype=torch.bool)
    >>> masked = random_token_mask(pad)
    >>> index, index_padding = visible_index(masked, pad)
    >>> predictor(torch.randn(2, index.shape[1], 32), index, index_padding, masked, pad).shape  # (masked, codes)
    torch.Size([72, 50])
    """

    def __init__(
        self,
        embed_dim: int,
        num_codes: int,
        layers: int = 2,
        heads: int = 4,
        ffn_dim: int | None = None,
        conv_pos: int = 32,
        conv_pos_groups: int = 8,
    ) -> None:
        super().__init__()
        self.num_codes = int(num_codes)
        self.mask_embedding = nn.Parameter(torch.empty(embed_dim).normal_(0.0, 0.02))
        self.encoder = _small_encoder(embed_dim, layers, heads, ffn_dim or 2 * embed_dim, conv_pos, conv_pos_groups)
        self.head = nn.Linear(embed_dim, num_codes)

    def forward(
        self, visible: Tensor, index: Tensor, index_padding: Tensor, masked: Tensor, padding_mask: Tensor
    ) -> Tensor:
        """Logits ``(N_masked, num_codes)`` of the masked valid tokens, in row-major order of ``masked & ~pad``.

        ``visible`` ``(B, K, C)`` at positions ``index`` ``(B, K)`` (slots with ``index_padding`` ignored);
        ``masked`` and ``padding_mask`` ``(B, T)``.
        """
        B, T = masked.shape
        C = visible.shape[-1]
        x = self.mask_embedding.to(visible.dtype).expand(B, T + 1, C).clone()  # (B, T + 1, C); T = a spare slot
        target = index.masked_fill(index_padding, T).unsqueeze(-1).expand(-1, -1, C)  # padded slots -> spare
        x = x.scatter(1, target, visible)[:, :T]  # (B, T, C)
        x, _ = self.encoder(x, padding_mask if bool(padding_mask.any()) else None)
        return self.head(x[masked & ~padding_mask])  # (N, num_codes)


class FeatureEstimator(nn.Module):
    """The distillation estimator: quantized vectors ``(B, T, quant_dim)`` -> teacher features ``(B, T, D)``.

    A linear map into ``embed_dim``, a small BEATs-style Transformer stack, a linear map to ``teacher_dim``.

    Example
    -------
    >>> est = FeatureEstimator(16, 32, embed_dim=32, layers=1, heads=4, conv_pos=8, conv_pos_groups=2)
    >>> est(torch.randn(2, 48, 16), torch.zeros(2, 48, dtype=torch.bool)).shape
    torch.Size([2, 48, 32])
    """

    def __init__(
        self,
        quant_dim: int,
        teacher_dim: int,
        embed_dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        ffn_dim: int | None = None,
        conv_pos: int = 32,
        conv_pos_groups: int = 8,
    ) -> None:
        super().__init__()
        self.teacher_dim = int(teacher_dim)
        self.inp = nn.Linear(quant_dim, embed_dim)
        self.encoder = _small_encoder(embed_dim, layers, heads, ffn_dim or 2 * embed_dim, conv_pos, conv_pos_groups)
        self.out = nn.Linear(embed_dim, teacher_dim)

    def forward(self, quantized: Tensor, padding_mask: Tensor) -> Tensor:
        """``(B, T, quant_dim)``, ``(B, T)`` -> ``(B, T, teacher_dim)``."""
        x, _ = self.encoder(self.inp(quantized), padding_mask if bool(padding_mask.any()) else None)
        return self.out(x)


def tokenizer_config(encoder: Mapping | BEATsConfig, quant_n: int = 1024, quant_dim: int = 256) -> TokenizersConfig:
    """A tokenizer's cfg: the encoder fields of a BEATs cfg (its head and fine-tuning fields dropped) + codebook size.

    Example
    -------
    >>> cfg = tokenizer_config(BEATsConfig.released(encoder_layers=2), quant_n=64, quant_dim=8)
    >>> cfg.encoder_layers, cfg.quant_n, "finetuned_model" in cfg.to_dict()
    (2, 64, False)
    """
    fields = encoder.to_dict() if isinstance(encoder, BEATsConfig) else dict(encoder)
    kept = {k: v for k, v in fields.items() if k in TokenizersConfig.fields()}
    return TokenizersConfig(kept, quant_n=int(quant_n), quant_dim=int(quant_dim))


def num_codes(tokenizer: nn.Module) -> int:
    """Number of codes of a tokenizer (:class:`lobes.beats.BEATsTokenizer` or the random-projection one)."""
    cfg = tokenizer.cfg
    return int(cfg["quant_n"] if isinstance(cfg, Mapping) and not isinstance(cfg, BEATsConfig) else cfg.quant_n)


# --------------------------------------------------------------------------------------------------
# the two trainings
# --------------------------------------------------------------------------------------------------
def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class MaskedTokenPretraining(nn.Module):
    """BEATs' masked acoustic-token prediction: one training step per call.

    Arguments
    ---------
    model : lobes.beats.BEATs
        The encoder to pre-train (``freeze=False``, no fine-tuned head).
    tokenizer : nn.Module
        A frozen tokenizer with ``tokenize_fbank(fbank, padding_mask)`` and ``quant_n``
        (:class:`lobes.beats.RandomProjectionTokenizer` or :class:`lobes.beats.BEATsTokenizer`).
    predictor : LabelPredictor
        The label predictor; its ``num_codes`` must equal the tokenizer's codes.
    mask_ratio : float
        Share of each clip's valid patches to mask (0.75 in BEATs).

    Example
    -------
    >>> from lobes.beats import RandomProjectionTokenizer
    >>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
    ...                            encoder_attention_heads=4, embed_dim=16, conv_pos=8, conv_pos_groups=2)
    >>> task = MaskedTokenPretraining(BEATs(cfg=cfg, freeze=False), RandomProjectionTokenizer(quant_n=50),
    ...                               LabelPredictor(32, 50, layers=1, conv_pos=8, conv_pos_groups=2))
    >>> step = task(torch.randn(2, 16000), torch.tensor([1.0, 0.5]))
    >>> step.loss.shape, step.ids.shape  # 36 + 18 masked patches
    (torch.Size([]), torch.Size([54]))
    """

    def __init__(self, model: BEATs, tokenizer: nn.Module, predictor: LabelPredictor, mask_ratio: float = 0.75) -> None:
        super().__init__()
        if model.predictor is not None:
            raise ValueError("pre-train a BEATs model without a fine-tuned head (cfg finetuned_model: False)")
        codes = num_codes(tokenizer)
        if predictor.num_codes != codes:
            raise ValueError(
                f"the label predictor has {predictor.num_codes} outputs but the tokenizer has {codes} codes; "
                f"set the predictor's num_codes (quant_n) to {codes}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.model, self.predictor, self.mask_ratio = model, predictor, float(mask_ratio)
        self.tokenizer = _frozen(tokenizer)
        self.num_codes = codes

    def train(self, mode: bool = True) -> "MaskedTokenPretraining":
        super().train(mode)
        self.tokenizer.eval()
        return self

    def forward(self, wav: Tensor, wav_lens: Tensor | None = None) -> PretrainingStep:
        """Loss on one batch ``(B, N)`` of 16 kHz audio with relative lengths ``(B,)``."""
        wav, wav_lens = _check_input(wav, wav_lens, self.model.cfg.input_patch_size)
        pad = token_padding_mask(wav, wav_lens, self.model.cfg.input_patch_size)  # (B, T)
        with torch.autocast(wav.device.type, enabled=False):
            fbank = self.model.preprocess(wav.float())  # (B, frames, 128) float32
        targets = self.tokenizer.tokenize_fbank(fbank, pad)  # (B, T), PAD at padding
        masked = random_token_mask(pad, self.mask_ratio)  # (B, T)
        visible, index, index_padding = encode_visible(self.model, fbank, pad, masked)
        logits = self.predictor(visible, index, index_padding, masked, pad)  # (N, codes)
        ids = targets[masked & ~pad]  # (N,)
        loss = F.cross_entropy(logits.float(), ids)
        accuracy = (logits.detach().argmax(-1) == ids).float().mean()
        return PretrainingStep(loss, accuracy, ids)

    def export(self, path: str | os.PathLike) -> Path:
        """Write the pre-trained encoder as a Microsoft-format BEATs checkpoint."""
        return self.model.save_checkpoint(path)


class TokenizerDistillation(nn.Module):
    """Train a BEATs tokenizer by distilling a pre-trained model's last-layer features through the quantizer.

    Arguments
    ---------
    tokenizer : lobes.beats.BEATsTokenizer
        The tokenizer to train (``freeze=False``; k-means seeding, EMA codebook, dead-code restarts are its
        quantizer's settings).
    teacher : lobes.beats.BEATs
        The pre-trained model of the previous iteration (frozen here).
    estimator : FeatureEstimator
        Rebuilds the teacher's features from the quantized vectors; its ``teacher_dim`` must match.
    commitment_weight : float
        Weight of the quantizer's commitment loss.

    Example
    -------
    >>> from lobes.beats import TokenizersConfig
    >>> small = dict(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
    ...              embed_dim=16, conv_pos=8, conv_pos_groups=2)
    >>> task = TokenizerDistillation(
    ...     BEATsTokenizer(cfg=TokenizersConfig.released(**small, quant_n=8, quant_dim=8), freeze=False),
    ...     BEATs(cfg=BEATsConfig.released(**small)),
    ...     FeatureEstimator(8, 32, embed_dim=32, layers=1, conv_pos=8, conv_pos_groups=2))
    >>> step = task(torch.randn(2, 16000))
    >>> bool(0 <= step.loss < 3), step.ids.shape
    (True, torch.Size([96]))
    """

    def __init__(
        self, tokenizer: BEATsTokenizer, teacher: BEATs, estimator: FeatureEstimator, commitment_weight: float = 1.0
    ) -> None:
        super().__init__()
        if tokenizer.freeze:
            raise ValueError("the tokenizer to train must be built with freeze=False")
        if estimator.teacher_dim != teacher.cfg.encoder_embed_dim:
            raise ValueError(
                f"the estimator outputs {estimator.teacher_dim} features but the teacher's encoder_embed_dim is "
                f"{teacher.cfg.encoder_embed_dim}; set the estimator's teacher_dim to it"
            )
        if teacher.cfg.input_patch_size != tokenizer.cfg.input_patch_size:
            raise ValueError("teacher and tokenizer must use the same input_patch_size")
        self.tokenizer, self.estimator = tokenizer, estimator
        self.teacher = _frozen(teacher)
        self.commitment_weight = float(commitment_weight)

    def train(self, mode: bool = True) -> "TokenizerDistillation":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, wav: Tensor, wav_lens: Tensor | None = None) -> PretrainingStep:
        """Loss on one batch ``(B, N)`` of 16 kHz audio; in training mode the codebook is updated too."""
        wav, wav_lens = _check_input(wav, wav_lens, self.tokenizer.cfg.input_patch_size)
        pad = token_padding_mask(wav, wav_lens, self.tokenizer.cfg.input_patch_size)  # (B, T)
        with torch.autocast(wav.device.type, enabled=False):
            fbank = self.tokenizer.preprocess(wav.float())  # (B, frames, 128) float32
        with torch.no_grad():
            target = self.teacher.encode_fbank(fbank, pad, pad if bool(pad.any()) else None)[0]  # (B, T, D)
        out = self.tokenizer.forward_fbank(fbank, pad)
        estimate = self.estimator(out.quantized, pad)  # (B, T, D)
        valid = ~pad
        cos = F.cosine_similarity(estimate.float(), target.float(), dim=-1)[valid]  # (N,)
        loss = (1.0 - cos).mean() + self.commitment_weight * out.loss
        return PretrainingStep(loss, cos.detach().mean(), out.ids[valid])

    def export(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as a Microsoft-format tokenizer checkpoint."""
        return self.tokenizer.save_checkpoint(path)


class CodeUsage:
    """Counts of code ids: perplexity and share of codes used.

    Example
    -------
    >>> usage = CodeUsage(4)
    >>> usage.update(torch.tensor([0, 1, 1, PAD_TOKEN_ID]))
    >>> {k: round(v, 3) for k, v in usage.summary().items()}
    {'perplexity': 1.89, 'used_share': 0.5, 'count': 3.0}
    """

    def __init__(self, num_codes: int) -> None:
        self.counts = torch.zeros(num_codes, dtype=torch.float64)

    def update(self, ids: Tensor) -> None:
        """Add ``ids`` (any shape; :data:`lobes.beats.PAD_TOKEN_ID` skipped)."""
        ids = ids.detach().reshape(-1).cpu()
        ids = ids[ids != PAD_TOKEN_ID]
        self.counts += torch.bincount(ids, minlength=self.counts.numel()).double()

    def summary(self) -> dict[str, float]:
        """``perplexity`` (exp of the entropy of the id distribution), ``used_share`` (codes seen at least
        once / all codes) and ``count`` (ids counted)."""
        total = float(self.counts.sum())
        p = self.counts[self.counts > 0] / max(total, 1.0)
        return {
            "perplexity": float(torch.exp(-(p * p.log()).sum())) if total else 0.0,
            "used_share": float((self.counts > 0).double().mean()),
            "count": total,
        }
