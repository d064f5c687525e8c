"""Normalised EMA vector quantizer of the BEATs acoustic tokenizer (arXiv 2212.09058, section 2.2).

Inputs and codes live on the unit sphere: an input is l2-normalised and takes the id of its nearest code,
which for unit codes is the code of highest cosine similarity. The codebook is not learned by gradient
descent: in training mode each batch moves every used code toward the normalised mean of the inputs it
won, ``code <- normalise(decay * code + (1 - decay) * normalise(mean))``, and the first training batch
seeds the codebook by spherical k-means. The commitment loss ``beta * ||sg(code) - z||^2`` and a
straight-through output carry the gradient to the encoder.

State-dict keys follow Microsoft's ``NormEMAVectorQuantizer`` (``beats/quantizer.py``), so its tokenizer
checkpoints load: ``embedding.weight`` (codes, ``(n_embed, dim)``), ``embedding.cluster_size`` (k-means
cluster sizes at seeding), ``embedding.embed_avg`` (kept for the format, unused by the normalised update, as
in the reference), ``embedding.initted`` (``(1,)`` float, 1 once seeded) and ``cluster_size`` (running code
usage). Differences from the reference: padded positions can be excluded from seeding, updates and loss;
usage statistics are updated in training mode only (the reference also updates them in eval mode); seeding
uses k-means++ rather than a uniform draw, so well-separated clusters are all found; optional dead-code
replacement.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NormEMAVectorQuantizer", "QuantizerOutput", "cosine_kmeans"]

logger = logging.getLogger(__name__)


class QuantizerOutput(NamedTuple):
    """What :class:`NormEMAVectorQuantizer` returns."""

    quantized: Tensor
    """``(..., dim)`` the chosen (unit) codes, with the straight-through gradient of the normalised input."""
    loss: Tensor
    """Scalar commitment loss ``beta * mean ||sg(code) - normalise(z)||^2`` over valid positions."""
    ids: Tensor
    """``(...)`` int64 code ids."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _sum_over_processes(x: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(x)
    return x


def _kmeans_pp_seeds(samples: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Greedy k-means++ seeding for unit vectors: ``(N, D)`` -> ``(k, D)`` picked rows (``N > k``).

    Each new seed is the best (lowest total distance) of ``2 + ln k`` candidates drawn with probability
    proportional to the distance to the nearest seed, as scikit-learn does; the distance ``1 - cos`` is half
    the squared Euclidean distance of unit vectors.
    """
    n, device = samples.shape[0], samples.device
    trials = 2 + int(math.log(k))
    seeds = torch.empty(k, dtype=torch.long, device=device)
    seeds[0] = torch.randint(n, (1,), generator=generator, device=device)
    nearest = (1.0 - samples @ samples[seeds[0]]).clamp_min_(0.0)  # (N,) distance to the nearest seed
    for i in range(1, k):
        total = nearest.sum()
        if total > 0:
            cand = torch.multinomial(nearest / total, trials, replacement=True, generator=generator)  # (L,)
        else:  # every sample sits on a seed already (duplicates in the data)
            cand = torch.randint(n, (trials,), generator=generator, device=device)
        cand_dist = torch.minimum(nearest, (1.0 - samples[cand] @ samples.T).clamp_min_(0.0))  # (L, N)
        best = cand_dist.sum(1).argmin()
        seeds[i], nearest = cand[best], cand_dist[best]
    return samples[seeds]


def _cluster_sums(samples: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Member counts ``(K,)`` and member sums ``(K, D)`` (float32) of ``(N, D)`` samples with ids ``(N,)``."""
    # a one-hot product rather than index_add_: deterministic on GPU (no atomics)
    onehot = F.one_hot(ids, k).to(samples.dtype)  # (N, K)
    return onehot.sum(0), onehot.T @ samples


def cosine_kmeans(
    samples: Tensor, num_clusters: int, num_iters: int = 10, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Spherical k-means: unit-length means that maximise the cosine similarity to their members.

    Seeds by greedy k-means++ (distance ``1 - cos``), then ``num_iters`` rounds of assigning each sample to the
    mean of highest cosine similarity and replacing every non-empty cluster's mean by its normalised member
    mean (an empty cluster keeps its mean). With fewer samples than clusters, the means are the samples
    drawn with repetition (a warning says so).

    Arguments
    ---------
    samples : torch.Tensor
        ``(N, D)`` vectors (normalised here; computed in float32).
    num_clusters : int
        Number of means ``K``.
    num_iters : int
        Assignment / update rounds after seeding.
    generator : torch.Generator, optional
        Random source of the seeding (on the samples' device).

    Returns
    -------
    means : torch.Tensor
        ``(K, D)`` float32 unit vectors.
    counts : torch.Tensor
        ``(K,)`` int64 cluster sizes under the returned means.

    Example
    -------
    >>> centres = torch.eye(4)
    >>> samples = (centres.repeat(25, 1) + 0.05 * torch.randn(100, 4))
    >>> means, counts = cosine_kmeans(samples, 4, generator=torch.Generator().manual_seed(0))
    >>> sorted(means.argmax(1).tolist()), counts.tolist()
    ([0, 1, 2, 3], [25, 25, 25, 25])
    """
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"k-means needs samples of shape (N, D) with N >= 1, got {tuple(samples.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    samples = F.normalize(samples.detach().float(), dim=-1)
    n = samples.shape[0]
    if n <= num_clusters:
        if n < num_clusters:
            logger.warning(
                "k-means initialisation from %d vectors for %d codes: codes repeat samples; initialise from a "
                "larger batch for a better codebook",
                n,
                num_clusters,
            )
        order = torch.randperm(n, generator=generator, device=samples.device)
        extra = torch.randint(n, (num_clusters - n,), generator=generator, device=samples.device)
        means = samples[torch.cat([order, extra])]
    else:
        means = _kmeans_pp_seeds(samples, num_clusters, generator)
    for _ in range(num_iters):
        counts, sums = _cluster_sums(samples, (samples @ means.T).argmax(dim=-1), num_clusters)
        means = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), means)
    counts = torch.bincount((samples @ means.T).argmax(dim=-1), minlength=num_clusters)
    return means, counts


class _Codebook(nn.Module):
    """The codes and their bookkeeping, under Microsoft's ``EmbeddingEMA`` key names."""

    def __init__(self, num_tokens: int, dim: int, initialised: bool) -> None:
        super().__init__()
        weight = F.normalize(torch.randn(num_tokens, dim), dim=-1) if initialised else torch.zeros(num_tokens, dim)
        self.register_buffer("weight", weight)  # (K, D) unit codes once initialised
        self.register_buffer("cluster_size", torch.zeros(num_tokens))  # k-means cluster sizes
        self.register_buffer("embed_avg", weight.clone())  # format only
        self.register_buffer("initted", torch.tensor([float(initialised)]))  # (1,) float, as the reference


class NormEMAVectorQuantizer(nn.Module):
    """Cosine nearest-code quantizer with a unit-norm codebook updated by exponential moving averages.

    Arguments
    ---------
    n_embed : int
        Number of codes ``K`` (Microsoft's ``quant_n``).
    embedding_dim : int
        Code size ``D`` (``quant_dim``).
    beta : float
        Weight of the commitment loss.
    decay : float
        EMA decay of the code updates and of the usage statistics.
    kmeans_init : bool
        Seed the codebook by spherical k-means on the first training batch; otherwise start from random
        unit codes.
    kmeans_iters : int
        k-means rounds of the seeding.
    dead_code_threshold : float
        If > 0, after each update the codes whose running usage (``cluster_size``, an EMA of per-batch
        counts) is below this are replaced by random inputs of the batch. 0 turns it off (the reference).

    Example
    -------
    >>> vq = NormEMAVectorQuantizer(n_embed=16, embedding_dim=8)
    >>> z = torch.randn(2, 50, 8)
    >>> out = vq.train()(z)  # the first training batch seeds the codebook, then updates it
    >>> out.quantized.shape, out.ids.shape, out.ids.dtype
    (torch.Size([2, 50, 8]), torch.Size([2, 50]), torch.int64)
    >>> torch.equal(vq.eval().nearest(z), vq(z).ids)
    True
    """

    def __init__(
        self,
        n_embed: int = 1024,
        embedding_dim: int = 256,
        beta: float = 1.0,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if n_embed < 1 or embedding_dim < 1:
            raise ValueError(f"n_embed and embedding_dim must be >= 1, got {n_embed} and {embedding_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_tokens, self.codebook_dim = n_embed, embedding_dim
        self.beta, self.decay = beta, decay
        self.kmeans_iters, self.dead_code_threshold = kmeans_iters, dead_code_threshold
        self.update_codebook = True
        """Set False to keep the codebook fixed in training mode (the reference's ``embedding.update``)."""
        self.embedding = _Codebook(n_embed, embedding_dim, initialised=not kmeans_init)
        self.register_buffer("cluster_size", torch.zeros(n_embed))  # running code usage (EMA of counts)

    @property
    def codebook(self) -> Tensor:
        """The codes, ``(K, D)``."""
        return self.embedding.weight

    @property
    def initialised(self) -> bool:
        """Whether the codebook holds codes (seeded, random-initialised or loaded)."""
        return bool(self.embedding.initted.item())

    def extra_repr(self) -> str:
        return f"n_embed={self.num_tokens}, embedding_dim={self.codebook_dim}, beta={self.beta}, decay={self.decay}"

    # ------------------------------------------------------------------------------------ lookup
    def _nearest_normalised(self, flat: Tensor) -> Tensor:
        """``(N, D)`` unit float32 inputs -> ``(N,)`` ids of the nearest code."""
        codes = self.embedding.weight.float()  # (K, D)
        # argmax of z.e - |e|^2 / 2 = argmin |z - e|^2 (the reference's distance); for unit codes = max cosine
        scores = torch.addmm((codes * codes).sum(-1).mul(-0.5), flat, codes.T)  # (N, K)
        return scores.argmax(dim=-1)

    def require_codebook(self) -> None:
        """Raise ``RuntimeError`` unless the codebook is initialised (cheap; call before long work)."""
        if not self.initialised:
            raise RuntimeError(
                "the quantizer's codebook is not initialised (embedding.initted = 0): load a trained tokenizer "
                "checkpoint, or run a training-mode forward pass, whose first batch seeds it by k-means"
            )

    def nearest(self, z: Tensor) -> Tensor:
        """Ids of the codes of highest cosine similarity to ``z`` (no state changes).

        Arguments
        ---------
        z : torch.Tensor
            ``(..., D)`` vectors (any scale; normalised here).

        Returns
        -------
        torch.Tensor
            ``(...)`` int64 ids.
        """
        self._check_dim(z)
        self.require_codebook()
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            flat = F.normalize(z.reshape(-1, self.codebook_dim).float(), dim=-1)
            return self._nearest_normalised(flat).view(z.shape[:-1])

    def _check_dim(self, z: Tensor) -> None:
        if z.dim() < 1 or z.shape[-1] != self.codebook_dim:
            raise ValueError(f"quantizer input must have shape (..., {self.codebook_dim}), got {tuple(z.shape)}")

    # ------------------------------------------------------------------------------------ training
    @torch.no_grad()
    def init_codebook(self, samples: Tensor, generator: torch.Generator | None = None) -> None:
        """Seed the codebook by spherical k-means on ``samples`` ``(N, D)`` and mark it initialised.

        ``embedding.cluster_size`` and the running usage ``cluster_size`` start at the cluster sizes. In a
        distributed run every process seeds from its own samples and process 0's codebook is broadcast.
        """
        means, counts = cosine_kmeans(
            samples.reshape(-1, self.codebook_dim), self.num_tokens, self.kmeans_iters, generator
        )
        self.embedding.weight.copy_(means)
        self.embedding.cluster_size.copy_(counts)
        self.cluster_size.copy_(counts)
        self.embedding.initted.fill_(1.0)
        self._broadcast_codebook()
        logger.info(
            "k-means initialised a %d x %d codebook from %d vectors (%d codes empty)",
            self.num_tokens,
            self.codebook_dim,
            samples.reshape(-1, self.codebook_dim).shape[0],
            int((counts == 0).sum()),
        )

    def _broadcast_codebook(self) -> None:
        if _distributed():
            for buf in (self.embedding.weight, self.embedding.cluster_size, self.cluster_size):
                dist.broadcast(buf, src=0)

    @torch.no_grad()
    def ema_update(self, samples: Tensor, ids: Tensor) -> None:
        """Move each used code toward the normalised mean of its samples by ``1 - decay``; count usage.

        Arguments
        ---------
        samples : torch.Tensor
            ``(N, D)`` unit float32 inputs (valid positions only).
        ids : torch.Tensor
            ``(N,)`` their nearest codes.
        """
        counts, sums = _cluster_sums(samples.float(), ids, self.num_tokens)  # (K,), (K, D)
        counts, sums = _sum_over_processes(counts), _sum_over_processes(sums)
        self.cluster_size.mul_(self.decay).add_(counts.to(self.cluster_size.dtype), alpha=1.0 - self.decay)
        codes = self.embedding.weight.float()
        target = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), codes)  # unused codes stay
        self.embedding.weight.copy_(F.normalize(codes.mul(self.decay).add_(target, alpha=1.0 - self.decay), dim=-1))
        if self.dead_code_threshold > 0 and samples.shape[0] > 0:
            self._replace_dead_codes(samples)

    def _replace_dead_codes(self, samples: Tensor) -> None:
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return
        pick = torch.randint(samples.shape[0], (dead.numel(),), device=samples.device)
        self.embedding.weight[dead] = samples[pick].to(self.embedding.weight.dtype)
        self.cluster_size[dead] = self.dead_code_threshold  # replaced again if unused next time
        self._broadcast_codebook()
        logger.debug("replaced %d dead codes", dead.numel())

    def forward(self, z: Tensor, padding_mask: Tensor | None = None) -> QuantizerOutput:
        """Quantize ``z``; in training mode also seed (first batch) and update the codebook.

        Arguments
        ---------
        z : torch.Tensor
            ``(..., D)`` vectors (e.g. ``(B, T, D)``), any scale.
        padding_mask : torch.Tensor, optional
            ``(...)`` bool, ``True`` at positions to leave out of seeding, updates and loss (their ids are
            still computed).

        Returns
        -------
        QuantizerOutput
            ``quantized`` ``(..., D)`` in ``z``'s dtype, ``loss`` scalar, ``ids`` ``(...)`` int64. The ids and
            the loss use the codebook as it was before this call's update.
        """
        self._check_dim(z)
        if padding_mask is not None and padding_mask.shape != z.shape[:-1]:
            raise ValueError(f"padding_mask must have shape {tuple(z.shape[:-1])}, got {tuple(padding_mask.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            flat = F.normalize(z.reshape(-1, self.codebook_dim).float(), dim=-1)  # (N, D)
            valid = None if padding_mask is None else ~padding_mask.reshape(-1)  # (N,)
            learn = self.training and self.update_codebook
            if self.training and not self.initialised:
                self.init_codebook(flat.detach() if valid is None else flat.detach()[valid])
            self.require_codebook()
            ids = self._nearest_normalised(flat.detach())  # (N,)
            codes = self.embedding.weight.float()[ids]  # (N, D), before this call's update
            err = (codes - flat).pow(2).mean(-1)  # (N,)
            if valid is None:
                loss = self.beta * err.mean()
            else:
                loss = self.beta * (err * valid).sum() / valid.sum().clamp_min(1)
            if learn:
                kept = flat.detach() if valid is None else flat.detach()[valid]
                self.ema_update(kept, ids if valid is None else ids[valid])
            quantized = flat + (codes - flat).detach()  # straight-through
        return QuantizerOutput(quantized.view(z.shape).to(z.dtype), loss, ids.view(z.shape[:-1]))
