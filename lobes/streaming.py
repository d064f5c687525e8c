"""Streaming speech recognition: audio in pieces -> encoder frames and CTC greedy partial hypotheses per chunk.

A streaming model is an :class:`lobes.asr.ASRModel` whose every stage sees only the past (plus a fixed,
small look-ahead) once its encoder runs in chunked mode (:mod:`lobes.chunking`):

* fbank without the per-utterance dB clipping (``fbank_top_db: null``): each 25 ms frame depends on its own
  samples, so frame ``i`` is ready once sample ``160 i + 200`` has arrived;
* a frame-wise feature normalisation with statistics of its own (:class:`GlobalNormalization`) instead of
  the per-utterance mean and variance;
* the convolutional front-end, whose kernel-3 / stride-2 blocks keep their last input frame between pieces
  (and wait for one frame of look-ahead each);
* a Conformer encoder in chunked mode: chunk-causal HyperMixing carries its running sums, attention its
  left-context frames, the depthwise convolutions their last inputs: ``kernel_size - 1`` of them for a causal
  convolution, ``(kernel_size - 1) / 2`` for a chunk convolution (``causal="chunk"``, centred but seeing
  nothing past the end of its chunk) (:meth:`lobes.conformer.ConformerEncoder.forward_chunk`).

:class:`StreamingASR` strings these together. Everything it returns equals the full forward of the whole
utterance with the same chunk configuration (``model.encode(..., chunk=...)``), to float rounding; the
memory it holds does not grow with the length of the stream for a HyperMixing encoder.

Example
-------
>>> from functools import partial
>>> from lobes.asr import ASRModel
>>> from lobes.conformer import ConformerEncoder
>>> from lobes.hypermixing import ChunkCausalHyperMixing
>>> enc = ConformerEncoder(1, 16, 32, partial(ChunkCausalHyperMixing, 16, 32, chunk_size=None), 3, causal=True)
>>> model = ASRModel(enc, vocab_size=5, d_model=16, frontend_channels=(4, 4), fbank_top_db=None,
...                  feature_norm=GlobalNormalization(80)).eval()
>>> stream = model.stream(chunk=4)
>>> steps = [stream.accept(piece) for piece in torch.rand(1, 16000).split(2560, dim=1)]
>>> last = stream.finish()
>>> [s.frames.shape[1] for s in steps], last.frames.shape[1], stream.frames_done
([0, 4, 4, 4, 4, 4, 4], 2, 26)
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lobes.chunking import ChunkConfig
from lobes.masks import lengths_to_mask

__all__ = ["GlobalNormalization", "StreamingASR", "StreamStep", "stream_audio", "check_streamable"]


# --------------------------------------------------------------------------------------------------
# Frame-wise feature normalisation
# --------------------------------------------------------------------------------------------------
class GlobalNormalization(nn.Module):
    """Feature normalisation with one mean and variance for every utterance, estimated while training.

    During the first ``update_steps`` training calls the statistics accumulate over the valid frames of every
    batch (exact running mean and variance of everything seen, as speechbrain's ``InputNormalization`` with
    ``norm_type="global"``); afterwards, and in evaluation, they are fixed. Every frame is normalised on its
    own, so the result does not depend on the rest of the utterance (what streaming needs). The statistics
    are buffers: they travel with the state dict.

    Arguments
    ---------
    n_mels : int
        Feature size F.
    update_steps : int, optional
        Training calls that update the statistics (None: all of them).
    eps : float
        Variance floor.
    floor_db : float, optional
        Fbank values (dB) below this are raised to it first: an absolute floor for digital silence, which the
        streaming fbank does not clip at the utterance's maximum minus 80 dB.
    subtract_frame_mean : bool
        Subtract from every frame its own mean over the mel bins before the global statistics: a gain of the
        recording is a constant in dB over the bins, so the result does not depend on the recording level
        (what per-utterance normalisation gave), still frame by frame. Measured on the streaming recipe (train
        loss after 400 steps, running mean, 3-epoch schedule): 111 with global statistics alone, 107 with this
        and ``floor_db=-70``, 103 with per-utterance statistics (not streamable).

    Example
    -------
    >>> norm = GlobalNormalization(3)
    >>> _ = norm.train()(torch.tensor([[[1.0, 2, 3], [3, 2, 1], [9, 9, 9]]]), torch.tensor([2]))
    >>> norm.mean.tolist(), norm.var.tolist()
    ([2.0, 2.0, 2.0], [1.0, 0.0, 1.0])
    >>> feats, lens = norm.eval()(torch.tensor([[[3.0, 2, 1], [5, 5, 5]]]), torch.tensor([1]))
    >>> feats.round(decimals=3).tolist()
    [[[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]]
    """

    def __init__(
        self,
        n_mels: int,
        update_steps: Optional[int] = 2000,
        eps: float = 1e-5,
        floor_db: Optional[float] = None,
        subtract_frame_mean: bool = False,
    ):
        super().__init__()
        self.n_mels = n_mels
        self.update_steps = update_steps
        self.eps = eps
        self.floor_db = floor_db
        self.subtract_frame_mean = bool(subtract_frame_mean)
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("var", torch.ones(n_mels))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))  # frames summarised
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training calls that updated

    @torch.no_grad()
    def _update(self, feats: torch.Tensor, keep: torch.Tensor) -> None:
        n = keep.sum().double()
        if n == 0:
            return
        frames = feats.double()[keep]  # (N, F)
        mean, var = frames.mean(0), frames.var(0, unbiased=False)
        total = self.count + n
        delta = mean - self.mean.double()
        # Chan et al.: combine the running and the batch statistics exactly
        m2 = self.var.double() * self.count + var * n + delta.square() * self.count * n / total
        if self.count == 0:
            m2 = var * n
        self.mean.copy_(self.mean.double() + delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) features and (B,) valid frames -> normalised features (padded frames zero) and the frames."""
        if feats.dim() != 3 or feats.size(-1) != self.n_mels:
            raise ValueError(f"GlobalNormalization: expected (B, T, {self.n_mels}) features, got {tuple(feats.shape)}")
        lengths = lengths.clamp(max=feats.size(1))
        keep = lengths_to_mask(lengths, feats.size(1))  # (B, T) bool
        if self.floor_db is not None:
            feats = feats.clamp(min=self.floor_db)
        if self.subtract_frame_mean:
            feats = feats - feats.mean(-1, keepdim=True)  # (B, T, F): the recording's gain cancels
        if self.training and (self.update_steps is None or int(self.steps) < self.update_steps):
            self._update(feats, keep)
            self.steps += 1
        out = (feats - self.mean) / torch.sqrt(self.var + self.eps)
        return out * keep.unsqueeze(-1).to(out.dtype), lengths

    def extra_repr(self) -> str:
        return (
            f"{self.n_mels}, update_steps={self.update_steps}, floor_db={self.floor_db}, "
            f"subtract_frame_mean={self.subtract_frame_mean}"
        )


# --------------------------------------------------------------------------------------------------
# Streaming pieces of the model
# --------------------------------------------------------------------------------------------------
def check_streamable(model: nn.Module) -> None:
    """Raise a ``ValueError`` naming what keeps ``model`` (an :class:`lobes.asr.ASRModel`) from streaming."""
    problems = []
    if getattr(model, "fbank_top_db", 80.0) is not None:
        problems.append(
            "its fbank clips at the utterance's maximum minus top_db, which needs the whole utterance "
            "(build it with fbank_top_db=None)"
        )
    if getattr(model, "feature_norm", None) is None:
        problems.append(
            "it normalises features with per-utterance statistics (give it feature_norm, e.g. "
            "lobes.streaming.GlobalNormalization)"
        )
    if not hasattr(model.encoder, "forward_chunk"):
        problems.append(f"its encoder ({type(model.encoder).__name__}) has no forward_chunk (use ConformerEncoder)")
    else:
        layers = getattr(model.encoder, "layers", [])
        if not all(getattr(getattr(la, "convolution_module", None), "causal", True) for la in layers):
            problems.append(
                'its encoder\'s convolutions see past the chunk (build it with causal="chunk" or causal=True)'
            )
    if problems:
        raise ValueError("this model cannot stream: " + "; ".join(problems))


class _FbankStream:
    """fbank frames of a stream as soon as their 25 ms window has arrived; equal to the whole utterance's."""

    def __init__(self, model: nn.Module, batch: int, device: torch.device):
        fbank = model.compute_fbank
        self.stft = copy.copy(fbank.compute_STFT)  # shares the window; frames start where the buffer starts
        self.stft.center = False
        self.filterbank = fbank.compute_fbanks
        self.n_fft, self.hop = self.stft.n_fft, self.stft.hop_length
        self.buffer = torch.zeros(batch, self.n_fft // 2, device=device)  # the left zero padding of center=True
        self.samples = 0  # samples received
        self.frames = 0  # frames returned

    def _frames(self, count: int) -> torch.Tensor:
        if count <= 0:
            return self.buffer.new_zeros(self.buffer.size(0), 0, self.filterbank.n_mels)
        from speechbrain.processing.features import spectral_magnitude

        span = (count - 1) * self.hop + self.n_fft
        with torch.autocast(self.buffer.device.type, enabled=False):
            feats = self.filterbank(spectral_magnitude(self.stft(self.buffer[:, :span])))  # (B, count, F)
        self.buffer = self.buffer[:, count * self.hop :]
        self.frames += count
        return feats

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """(B, S) new samples -> (B, n, n_mels) new fbank frames."""
        self.buffer = torch.cat([self.buffer, samples.float()], dim=1)
        self.samples += samples.size(1)
        ready = (self.buffer.size(1) - self.n_fft) // self.hop + 1 if self.buffer.size(1) >= self.n_fft else 0
        return self._frames(ready)

    def finish(self) -> torch.Tensor:
        """The remaining frames (the right zero padding of center=True): ``samples // hop + 1`` in all."""
        self.buffer = F.pad(self.buffer, (0, self.n_fft // 2 + self.n_fft))
        return self._frames(self.samples // self.hop + 1 - self.frames)


class _ConvBlockStream:
    """One strided block of :class:`lobes.asr.ConvFrontEnd` over a stream, keeping its left input context."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, activation: nn.Module, dropout: nn.Module):
        self.conv, self.norm, self.activation, self.dropout = conv, norm, activation, dropout
        self.reach = conv.kernel_size[0] // 2  # input frames on each side of an output frame's centre
        self.stride = conv.stride[0]
        self.pending: Optional[torch.Tensor] = None  # (B, C, frames, F) inputs from index `start`
        self.start = -self.reach
        self.inputs = 0  # input frames received
        self.outputs = 0  # output frames returned

    def accept(self, x: torch.Tensor, final: bool = False) -> torch.Tensor:
        """(B, C, n, F) new input frames -> (B, C', m, F') new output frames (all remaining ones if ``final``)."""
        if self.pending is None:  # the left zero padding of the convolution
            self.pending = x.new_zeros(x.size(0), x.size(1), self.reach, x.size(3))
        self.pending = torch.cat([self.pending, x], dim=2)
        self.inputs += x.size(2)
        if final:
            total = (self.inputs - 1) // self.stride + 1 if self.inputs else 0
            self.pending = F.pad(self.pending, (0, 0, 0, self.reach))  # the right zero padding
        else:  # output v needs inputs up to stride * v + reach
            total = max(0, (self.inputs - 1 - self.reach) // self.stride + 1)
        count = total - self.outputs
        first = self.stride * self.outputs - self.reach - self.start  # index in pending of the first input
        if count <= 0:
            return x.new_zeros(x.size(0), self.conv.out_channels, 0, self._out_freq(x.size(3)))
        span = self.pending[:, :, first : first + self.stride * (count - 1) + 2 * self.reach + 1]
        y = F.conv2d(span, self.conv.weight, self.conv.bias, stride=self.conv.stride, padding=(0, self.conv.padding[1]))
        y = self.dropout(self.activation(self.norm(y.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)  # (B, C', m, F')
        self.outputs += count
        keep_from = self.stride * self.outputs - self.reach  # first input the next output needs
        self.pending = self.pending[:, :, keep_from - self.start :]
        self.start = keep_from
        return y

    def _out_freq(self, freq: int) -> int:
        k, s, p = self.conv.kernel_size[1], self.conv.stride[1], self.conv.padding[1]
        return (freq + 2 * p - k) // s + 1


@dataclasses.dataclass
class StreamStep:
    """What one piece of audio gave.

    Attributes
    ----------
    frames : torch.Tensor
        (B, n, D) encoder frames completed by this piece (whole chunks; the rest at the end of the stream).
    log_probs : torch.Tensor
        (B, n, V) their CTC log-probabilities.
    tokens : list[list[int]]
        Every stream's greedy CTC tokens so far (repeats merged, blanks removed).
    text : list[str] or None
        The tokens as text, when the stream has a tokenizer.
    final : bool
        The last step of the stream.
    """

    frames: torch.Tensor
    log_probs: torch.Tensor
    tokens: list
    text: Optional[list]
    final: bool = False


class StreamingASR:
    """Recognise live audio with a streaming :class:`lobes.asr.ASRModel` (see the module docstring).

    Feed pieces of any length with :meth:`accept`; every chunk of ``chunk_size`` encoder frames (40 ms each)
    is encoded as soon as its audio (plus the front-end's look-ahead of 680 samples) has arrived, and its
    CTC greedy tokens are appended to the partial hypothesis. :meth:`finish` ends the stream. ``B`` streams
    of equal length run together as a batch.

    Arguments
    ---------
    model : ASRModel
        A streaming model (:func:`check_streamable`), in evaluation mode.
    chunk : ChunkConfig or int
        Chunk configuration (or chunk size in encoder frames).
    tokenizer : object, optional
        A SentencePiece processor (``decode_ids``) or speechbrain tokenizer (``.sp``) for the partial text.
    blank_index : int
        CTC blank.
    batch : int
        Number of streams.
    """

    def __init__(
        self,
        model: nn.Module,
        chunk: Union[ChunkConfig, int],
        tokenizer: Any = None,
        blank_index: int = 0,
        batch: int = 1,
    ):
        check_streamable(model)
        self.model = model
        self.chunk = ChunkConfig(chunk) if isinstance(chunk, int) else chunk
        self.tokenizer = getattr(tokenizer, "sp", tokenizer)
        self.blank_index = blank_index
        self.batch = batch
        device = next(model.parameters()).device
        self.device = device
        self._fbank = _FbankStream(model, batch, device)
        fe = model.frontend
        self._blocks = [_ConvBlockStream(c, n, fe.activation, fe.dropout) for c, n in zip(fe.convs, fe.norms)]
        self._pending = torch.zeros(batch, 0, model.ctc_lin.in_features, device=device)  # encoder inputs
        self._state = None
        self.frames_done = 0  # encoder frames returned
        self._inputs = 0  # encoder input frames made
        self._tokens: list[list[int]] = [[] for _ in range(batch)]
        self._last = [blank_index] * batch  # last best-path token of each stream (merges repeats across chunks)
        self.finished = False

    # ---------------------------------------------------------------------------------------------- steps
    def _encoder_inputs(self, feats: torch.Tensor, final: bool) -> torch.Tensor:
        """(B, n, n_mels) new fbank frames -> (B, m, D) new encoder inputs (front-end, projection, positions)."""
        model = self.model
        lengths = torch.full((feats.size(0),), feats.size(1), device=feats.device)
        x, _ = model.normalise(feats, lengths)
        x = x.unsqueeze(1)  # (B, 1, n, F)
        for block in self._blocks:
            x = block.accept(x, final)
        x = x.permute(0, 2, 3, 1)  # (B, m, F', C)
        x = model.proj(x.reshape(x.size(0), x.size(1), x.size(2) * x.size(3)))  # (B, m, D)
        if model.pos_encoding is not None:
            x = x + model.pos_encoding.rows(self._inputs, x)
        self._inputs += x.size(1)
        return x

    def _encode(self, final: bool) -> StreamStep:
        C = self.chunk.chunk_size
        ready = self._pending.size(1) if final else (self._pending.size(1) // C) * C
        enc = self._pending[:, :0]
        if ready:
            enc, self._state = self.model.encoder.forward_chunk(self._pending[:, :ready], self._state, self.chunk)
            self._pending = self._pending[:, ready:]
        log_probs = self.model.ctc_log_probs(enc)  # (B, n, V)
        for b, path in enumerate(log_probs.argmax(-1).tolist()):
            for token in path:
                if token != self.blank_index and token != self._last[b]:
                    self._tokens[b].append(token)
                self._last[b] = token
        self.frames_done += enc.size(1)
        text = None
        if self.tokenizer is not None:
            text = [self.tokenizer.decode_ids(t) if t else "" for t in self._tokens]
        return StreamStep(enc, log_probs, [list(t) for t in self._tokens], text, final)

    def accept(self, samples: torch.Tensor) -> StreamStep:
        """Feed the next samples: (S,) for one stream or (B, S); returns the chunks they completed."""
        if self.finished:
            raise RuntimeError("StreamingASR.accept: the stream is finished; start a new StreamingASR")
        samples = torch.as_tensor(samples)
        if samples.dim() == 1:
            samples = samples.unsqueeze(0)
        if samples.dim() != 2 or samples.size(0) != self.batch:
            raise ValueError(f"expected samples of shape ({self.batch}, S) or (S,), got {tuple(samples.shape)}")
        with torch.inference_mode():
            feats = self._fbank.accept(samples.to(self.device))
            self._pending = torch.cat([self._pending, self._encoder_inputs(feats, final=False)], dim=1)
            return self._encode(final=False)

    def finish(self) -> StreamStep:
        """End the stream: encode what remains (the last, possibly partial, chunk)."""
        if self.finished:
            raise RuntimeError("StreamingASR.finish: the stream is already finished")
        self.finished = True
        with torch.inference_mode():
            feats = self._fbank.finish()
            self._pending = torch.cat([self._pending, self._encoder_inputs(feats, final=True)], dim=1)
            return self._encode(final=True)


def stream_audio(
    model: nn.Module,
    pieces: Iterable[torch.Tensor],
    chunk: Union[ChunkConfig, int],
    tokenizer: Any = None,
    blank_index: int = 0,
) -> Iterator[StreamStep]:
    """Yield a :class:`StreamStep` for every piece of ``pieces`` (1-D sample tensors of one stream), then the
    final step.

    Example
    -------
    >>> from functools import partial
    >>> from lobes.asr import ASRModel
    >>> from lobes.conformer import ConformerEncoder
    >>> from lobes.hypermixing import ChunkCausalHyperMixing
    >>> enc = ConformerEncoder(1, 16, 32, partial(ChunkCausalHyperMixing, 16, 32, chunk_size=None), 3, causal=True)
    >>> model = ASRModel(enc, 5, 16, frontend_channels=(4, 4), fbank_top_db=None, feature_norm=GlobalNormalization(80))
    >>> steps = list(stream_audio(model.eval(), torch.rand(8000).split(1600), chunk=2))
    >>> len(steps), steps[-1].final, sum(s.frames.shape[1] for s in steps)
    (6, True, 13)
    """
    streamer = StreamingASR(model, chunk, tokenizer=tokenizer, blank_index=blank_index)
    for piece in pieces:
        yield streamer.accept(piece)
    yield streamer.finish()
