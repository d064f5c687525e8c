"""Chunked (streaming) context for encoders: chunk configurations, chunk attention masks, dynamic chunk sampling.

A chunked encoder cuts its input into chunks of ``chunk_size`` frames; a frame sees every frame of its own
chunk and of earlier chunks (at most ``left_context_chunks`` of them when that is set), never a later chunk.
Such an encoder can run on a live stream, one chunk at a time, and give the same frames as over the whole
utterance (:mod:`lobes.streaming`).

Dynamic chunk training (Zhang et al. 2021, arXiv 2012.05481; speechbrain's streaming Conformer) trains one
model for several latencies: every training batch draws a chunk size (and possibly a limited left context),
and some batches keep the full context. :class:`DynamicChunkSampler` draws these configurations.

Example
-------
>>> chunk_attention_mask(5, ChunkConfig(2)).int()
tensor([[0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 0, 1],
        [0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0]], dtype=torch.int32)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = ["ChunkConfig", "DynamicChunkSampler", "chunk_attention_mask", "ms_to_frames"]


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """How a chunked encoder sees its input.

    Attributes
    ----------
    chunk_size : int
        Encoder frames per chunk (>= 1).
    left_context_chunks : int or None
        Earlier chunks a frame may see (None: all of them). Only attention mixers can limit their left
        context; a HyperMixing running sum always covers the whole past.

    Example
    -------
    >>> ChunkConfig(8, 4).left_context_frames
    32
    """

    chunk_size: int
    left_context_chunks: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"ChunkConfig: chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        left = self.left_context_chunks
        if left is not None and (isinstance(left, bool) or not isinstance(left, int) or left < 0):
            raise ValueError(f"ChunkConfig: left_context_chunks must be None or an integer >= 0, got {left!r}")

    @property
    def left_context_frames(self) -> Optional[int]:
        """Frames of left context (``chunk_size * left_context_chunks``), None when unlimited."""
        return None if self.left_context_chunks is None else self.chunk_size * self.left_context_chunks


def ms_to_frames(chunk_ms: float, frame_ms: float = 40.0) -> int:
    """Encoder frames in ``chunk_ms`` milliseconds of audio (``frame_ms`` per frame; a whole number of frames).

    Example
    -------
    >>> ms_to_frames(320), ms_to_frames(160)
    (8, 4)
    >>> ms_to_frames(100)
    Traceback (most recent call last):
    ...
    ValueError: chunk of 100 ms is not a whole number of 40 ms encoder frames
    """
    frames = chunk_ms / frame_ms
    if frames < 1 or abs(frames - round(frames)) > 1e-6:
        raise ValueError(f"chunk of {chunk_ms:g} ms is not a whole number of {frame_ms:g} ms encoder frames")
    return int(round(frames))


def chunk_attention_mask(length: int, config: ChunkConfig, device: Optional[torch.device] = None) -> torch.Tensor:
    """(length, length) bool mask, True where query frame ``t`` may NOT see key frame ``s`` under ``config``.

    Arguments
    ---------
    length : int
        Frames T.
    config : ChunkConfig
        Chunk size and left context.
    device : torch.device, optional
        Where to build it.

    Returns
    -------
    torch.Tensor
        (T, T) bool, the ``attn_mask`` convention of :class:`lobes.mixers.TokenMixer`.
    """
    chunk = torch.arange(length, device=device) // config.chunk_size  # (T,) chunk index of each frame
    blocked = chunk.unsqueeze(0) > chunk.unsqueeze(1)  # key in a later chunk
    if config.left_context_chunks is not None:
        blocked |= chunk.unsqueeze(0) < chunk.unsqueeze(1) - config.left_context_chunks
    return blocked


@dataclasses.dataclass
class DynamicChunkSampler:
    """Draws a :class:`ChunkConfig` per training batch (or None: full context) for dynamic chunk training.

    With probability ``chunked_prob`` a batch is chunked, its chunk size uniform in
    ``[chunk_size_min, chunk_size_max]`` frames; a chunked batch has, with probability
    ``limited_left_context_prob``, a left context uniform in ``[left_context_chunks_min,
    left_context_chunks_max]`` chunks, else an unlimited one. Validation uses ``valid_config`` (None: full
    context). The draws use torch's global generator, so a seeded run draws the same sequence.

    Arguments
    ---------
    chunked_prob : float
        Share of chunked training batches.
    chunk_size_min, chunk_size_max : int
        Range of chunk sizes, in encoder frames.
    limited_left_context_prob : float
        Share of chunked batches with a limited left context (attention encoders only; 0 for HyperMixing).
    left_context_chunks_min, left_context_chunks_max : int
        Range of left contexts, in chunks.
    valid_config : ChunkConfig, optional
        Configuration of the validation passes.

    Example
    -------
    >>> _ = torch.manual_seed(0)
    >>> sampler = DynamicChunkSampler(chunked_prob=1.0, chunk_size_min=4, chunk_size_max=4)
    >>> sampler()
    ChunkConfig(chunk_size=4, left_context_chunks=None)
    """

    chunked_prob: float = 0.6
    chunk_size_min: int = 4
    chunk_size_max: int = 16
    limited_left_context_prob: float = 0.0
    left_context_chunks_min: int = 2
    left_context_chunks_max: int = 16
    valid_config: Optional[ChunkConfig] = None

    def __post_init__(self) -> None:
        for name in ("chunked_prob", "limited_left_context_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DynamicChunkSampler: {name} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.chunk_size_min <= self.chunk_size_max:
            raise ValueError(
                f"DynamicChunkSampler: need 1 <= chunk_size_min <= chunk_size_max, got "
                f"{self.chunk_size_min} and {self.chunk_size_max}"
            )
        if not 0 <= self.left_context_chunks_min <= self.left_context_chunks_max:
            raise ValueError(
                f"DynamicChunkSampler: need 0 <= left_context_chunks_min <= left_context_chunks_max, got "
                f"{self.left_context_chunks_min} and {self.left_context_chunks_max}"
            )

    def __call__(self) -> Optional[ChunkConfig]:
        """One training batch's configuration (None: full context)."""
        if torch.rand(()).item() >= self.chunked_prob:
            return None
        size = int(torch.randint(self.chunk_size_min, self.chunk_size_max + 1, ()).item())
        left = None
        if torch.rand(()).item() < self.limited_left_context_prob:
            left = int(torch.randint(self.left_context_chunks_min, self.left_context_chunks_max + 1, ()).item())
        return ChunkConfig(size, left)
