"""Batched Kaldi-compatible filterbank features and length / mask utilities.

``kaldi_fbank`` computes ``torchaudio.compliance.kaldi.fbank`` for a whole batch ``(B, T)`` at once on
the input's device: frames are strided views of the batch; DC removal and pre-emphasis round exactly as
torchaudio's, and the FFT is the one ``torch.fft.rfft`` uses. On CPU with float32 input, compiled kernels
(``lobes/csrc/fbank.c``, built on first use by :mod:`lobes._native`) do the work on
``torch.get_num_threads()`` threads; without them, a pure-torch path goes through cache-sized blocks and
reads the squared real and imaginary parts in place, band by band over the few FFT bins each band of
triangular filters covers. The mel matrix and window are cached per (options, device, dtype). Rows may have
their own lengths;
frames past a row's end are reported by :func:`num_frames` and filled with ``padding_value``, and every
frame inside a row equals the frame torchaudio computes for that row alone (Kaldi frames only look at
their own samples).

Length conventions used across ``lobes``:

* relative lengths (SpeechBrain's ``wav_lens``) are floats in ``(0, 1]``, a fraction of the padded length;
* absolute lengths are integer counts (samples or frames);
* a *mask* is ``True`` where a position is valid; a *padding mask* is ``True`` where it is padding.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import Tensor

from lobes import _native

__all__ = [
    "KALDI_WINDOW_TYPES",
    "kaldi_fbank",
    "lengths_to_mask",
    "lengths_to_padding_mask",
    "num_frames",
    "relative_to_absolute",
    "to_sample_lengths",
]

KALDI_WINDOW_TYPES = ("hamming", "hanning", "povey", "rectangular", "blackman")

# numeric_limits<float>::epsilon(), the floor Kaldi (and torchaudio) put under the mel energies
_EPSILON = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------------
# length / mask utilities
# --------------------------------------------------------------------------------------------------
def relative_to_absolute(wav_lens: Tensor, max_len: int) -> Tensor:
    """Convert relative lengths in ``(0, 1]`` to integer lengths (rounded, like SpeechBrain).

    Arguments
    ---------
    wav_lens : torch.Tensor
        Relative lengths, shape ``(B,)``, floating point, each in ``(0, 1]``.
    max_len : int
        The padded length the fractions refer to.

    Returns
    -------
    torch.Tensor
        ``(B,)`` int64 lengths in ``[0, max_len]``.

    Example
    -------
    >>> relative_to_absolute(torch.tensor([1.0, 0.5, 0.25]), 16000)
    tensor([16000,  8000,  4000])
    """
    if not torch.is_tensor(wav_lens) or not wav_lens.is_floating_point():
        raise TypeError("relative lengths must be a floating-point tensor of shape (B,) with values in (0, 1]")
    return torch.round(wav_lens.double() * max_len).long().clamp_(0, max_len)


def to_sample_lengths(lengths: Tensor | None, batch: int, max_len: int, device=None) -> Tensor:
    """Normalise a lengths argument to integer sample counts.

    A floating-point tensor is read as relative lengths in ``(0, 1]``; an integer tensor as absolute
    counts in ``[0, max_len]``; ``None`` means every row is ``max_len`` long.

    Arguments
    ---------
    lengths : torch.Tensor or None
        ``(B,)`` relative (float) or absolute (integer) lengths.
    batch : int
        Expected batch size ``B``.
    max_len : int
        Padded length ``T``.
    device : torch.device, optional
        Device of the result (default: that of ``lengths``, or CPU).

    Returns
    -------
    torch.Tensor
        ``(B,)`` int64 lengths.

    Example
    -------
    >>> to_sample_lengths(torch.tensor([1.0, 0.5]), 2, 800)
    tensor([800, 400])
    >>> to_sample_lengths(torch.tensor([800, 123]), 2, 800)
    tensor([800, 123])
    """
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.long, device=device)
    if not torch.is_tensor(lengths):
        raise TypeError(f"lengths must be a tensor of shape ({batch},), got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must have shape ({batch},) (one per row), got {tuple(lengths.shape)}")
    if lengths.is_floating_point():
        if not torch.isfinite(lengths).all() or (lengths <= 0).any() or (lengths > 1.0 + 1e-6).any():
            raise ValueError(
                "relative lengths must lie in (0, 1] (a fraction of the padded length), got "
                f"{lengths.tolist()}; pass an integer tensor for lengths in samples"
            )
        out = relative_to_absolute(lengths, max_len)
    elif lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths must be float (relative) or integer (absolute), got {lengths.dtype}")
    else:
        if (lengths < 0).any() or (lengths > max_len).any():
            raise ValueError(f"absolute lengths must lie in [0, {max_len}], got {lengths.tolist()}")
        out = lengths.long()
    return out if device is None else out.to(device)


def num_frames(num_samples: Tensor | int, window_size: int = 400, window_shift: int = 160) -> Tensor | int:
    """Number of Kaldi frames (``snip_edges=True``) in ``num_samples`` samples.

    Arguments
    ---------
    num_samples : torch.Tensor or int
        Sample counts (any shape) or one count.
    window_size : int
        Frame length in samples (400 = 25 ms at 16 kHz).
    window_shift : int
        Frame shift in samples (160 = 10 ms at 16 kHz).

    Returns
    -------
    torch.Tensor or int
        Frame counts, ``0`` where fewer than ``window_size`` samples.

    Example
    -------
    >>> num_frames(torch.tensor([0, 399, 400, 16000]))
    tensor([ 0,  0,  1, 98])
    """
    if torch.is_tensor(num_samples):
        n = num_samples.long()
        return torch.where(n >= window_size, 1 + torch.div(n - window_size, window_shift, rounding_mode="floor"), 0)
    return 0 if num_samples < window_size else 1 + (num_samples - window_size) // window_shift


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Boolean mask ``(B, max_len)``, ``True`` at valid positions.

    Arguments
    ---------
    lengths : torch.Tensor
        ``(B,)`` lengths, integer or float (rounded to the nearest integer).
    max_len : int, optional
        Width of the mask (default: ``lengths.max()``).

    Returns
    -------
    torch.Tensor
        ``(B, max_len)`` bool.

    Example
    -------
    >>> lengths_to_mask(torch.tensor([3, 1]), 4)
    tensor([[ True,  True,  True, False],
            [ True, False, False, False]])
    """
    if lengths.dim() != 1:
        raise ValueError(f"expected lengths of shape (B,), got {tuple(lengths.shape)}")
    if lengths.is_floating_point():  # absolute lengths derived from relative ones carry rounding error
        lengths = lengths.round().long()
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def lengths_to_padding_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Boolean padding mask ``(B, max_len)``, ``True`` at padded positions (the complement of
    :func:`lengths_to_mask`).

    Arguments
    ---------
    lengths : torch.Tensor
        ``(B,)`` lengths, integer or float (rounded to the nearest integer).
    max_len : int, optional
        Width of the mask (default: ``lengths.max()``).

    Returns
    -------
    torch.Tensor
        ``(B, max_len)`` bool.

    Example
    -------
    >>> lengths_to_padding_mask(torch.tensor([3, 1]), 4).shape
    torch.Size([2, 4])
    """
    return ~lengths_to_mask(lengths, max_len)


# --------------------------------------------------------------------------------------------------
# fbank internals
# --------------------------------------------------------------------------------------------------
def _mel(freq):
    return 1127.0 * torch.log(1.0 + freq / 700.0)


@lru_cache(maxsize=32)
def _mel_matrix_cpu(num_bins: int, padded: int, sample_frequency: float, low_freq: float,
                    high_freq: float) -> Tensor:
    """Triangular mel filters ``(padded // 2 + 1, num_bins)`` as Kaldi builds them (last FFT bin unused)."""
    nyquist = 0.5 * sample_frequency
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(
            f"expected 0 <= low_freq < high_freq <= Nyquist ({nyquist} Hz), got low_freq={low_freq}, "
            f"high_freq={high_freq}"
        )
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta  # (num_bins, 1)
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel((sample_frequency / padded) * torch.arange(padded // 2)).unsqueeze(0)  # (1, padded/2)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (num_bins, padded/2)
    banks = torch.nn.functional.pad(banks, (0, 1))  # Nyquist bin gets no weight
    return banks.t().contiguous()  # (padded/2 + 1, num_bins)


def _window_cpu(window_type: str, size: int, blackman_coeff: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Window built directly in the compute ``dtype``, as torchaudio builds it (a float64 window rounded
    to float32 differs from it by up to 2e-7)."""
    if window_type == "hanning":
        return torch.hann_window(size, periodic=False, dtype=dtype)
    if window_type == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, dtype=dtype)
    if window_type == "povey":
        return torch.hann_window(size, periodic=False, dtype=dtype).pow(0.85)
    if window_type == "rectangular":
        return torch.ones(size, dtype=dtype)
    if window_type == "blackman":
        a = 2 * math.pi / (size - 1)
        n = torch.arange(size, dtype=dtype)
        return blackman_coeff - 0.5 * torch.cos(a * n) + (0.5 - blackman_coeff) * torch.cos(2 * a * n)
    raise ValueError(f"unknown window_type {window_type!r}; expected one of {KALDI_WINDOW_TYPES}")


_DEVICE_CACHE: dict = {}
_FBANK_BLOCK_FRAMES = 2048  # frames (all rows together) per block of the CPU fbank
_NATIVE_BLOCK_FRAMES = 512  # per block of the native path without MKL: buffers stay in one core's L2 cache
_NATIVE_FFT_BATCH = 64  # frames per FFT call of the fused native path
_NATIVE_MIN_FRAMES_PER_THREAD = 512  # smaller inputs are not worth handing to other threads


def _cached(kind: str, key: tuple, device: torch.device, dtype: torch.dtype, build) -> Tensor:
    full = (kind, key, str(device), dtype)
    hit = _DEVICE_CACHE.get(full)
    if hit is None:
        if len(_DEVICE_CACHE) > 64:
            _DEVICE_CACHE.clear()
        hit = build().to(device=device, dtype=dtype)
        _DEVICE_CACHE[full] = hit
    return hit


def _write_frames(frames: Tensor, out: Tensor, scratch: Tensor, remove_dc_offset: bool, preemph: float) -> None:
    """Write DC-free, pre-emphasised (unwindowed) ``frames`` (B, n, window) into ``out`` of the same shape.

    The operations and their rounding are torchaudio's ``kaldi.fbank``: the mean over the window is removed
    first, then ``y[n] = z[n] - c * z[n-1]`` with ``z[-1] := z[0]`` (Kaldi's replicate padding). Float32
    rounding then follows the reference's: with loud input (BEATs feeds ``wav * 2**15``) the pre-emphasis
    high-pass leaves the lowest mel bins small next to the rounding of the raw frame, and another, equally
    valid order of operations moves their log energies by up to ~2e-3. ``addcmul`` computes
    ``z[n] + (-c * z[n-1]) * 1``, which rounds exactly like ``z[n] - c * z[n-1]`` in one pass (``sub`` with
    ``alpha`` fuses into a multiply-add and rounds differently). ``scratch`` holds the DC-free frames.
    """
    if remove_dc_offset:
        frames = torch.sub(frames, frames.mean(dim=-1, keepdim=True), out=scratch)
    if preemph == 0.0:
        out.copy_(frames)
        return
    one = frames.new_ones(())
    torch.addcmul(frames[..., 1:], frames[..., :-1], one, value=-preemph, out=out[..., 1:])
    torch.addcmul(frames[..., :1], frames[..., :1], one, value=-preemph, out=out[..., :1])


@lru_cache(maxsize=32)
def _mel_bands_cpu(mel_key: tuple, dtype: torch.dtype = torch.float32, bins_per_band: int = 16) -> tuple:
    """The mel matrix cut into bands of ``bins_per_band`` consecutive filters, for a product with the
    interleaved squares ``[re_0², im_0², re_1², im_1², ...]`` of the spectrum: each band is
    ``(lo, hi, weights (hi - lo, bins))`` over the interleaved positions its filters cover, every FFT-bin
    weight repeated for the real and the imaginary square.

    Kaldi's triangular filters are narrow (128 filters over 256 FFT bins have ~500 non-zero weights out
    of 32,768), so products restricted to each band's range do a fraction of the dense product's work.
    """
    num_bins, padded = mel_key[0], mel_key[1]
    mel = _mel_matrix_cpu(*mel_key)[: padded // 2]
    bands = []
    for b0 in range(0, num_bins, bins_per_band):
        weights = mel[:, b0: b0 + bins_per_band]
        rows = weights.ne(0).any(dim=1).nonzero().flatten()
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if rows.numel() else (0, 1)
        bands.append((2 * lo, 2 * hi, weights[lo:hi].repeat_interleave(2, dim=0).to(dtype).contiguous()))
    return tuple(bands)


def _check_waveforms(waveforms: Tensor) -> None:
    if not torch.is_tensor(waveforms):
        raise TypeError(f"waveforms must be a tensor of shape (B, T), got {type(waveforms).__name__}")
    if not waveforms.is_floating_point():
        raise TypeError(
            f"waveforms must be floating point (B, T), got {waveforms.dtype}; convert integer PCM first, "
            "e.g. wav.float() / 32768"
        )
    if waveforms.dim() != 2:
        raise ValueError(
            f"waveforms must have shape (B, T) (one mono signal per row), got {tuple(waveforms.shape)}; "
            "mix or select channels first"
        )


def _fbank_buffers(frames: Tensor, step: int, padded: int) -> tuple[Tensor, Tensor]:
    B, _, window_size = frames.shape
    buf = frames.new_zeros((B, step, padded))  # FFT zero padding: the tail is never written
    scratch = frames.new_empty((B, step, window_size))
    return buf, scratch


def _block_spectrum(frames, buf, scratch, m0, m1, window, remove_dc_offset, preemph) -> Tensor:
    """rfft (B, n, padded/2 + 1) of the windowed, pre-processed frames ``m0:m1``."""
    n, window_size = m1 - m0, frames.shape[-1]
    block_frames = buf[:, :n, :window_size]
    _write_frames(frames[:, m0:m1], block_frames, scratch[:, :n], remove_dc_offset, preemph)
    block_frames.mul_(window)
    return torch.fft.rfft(buf[:, :n])  # a fresh result: rfft(out=...) costs an extra copy on CPU


def _fbank_blocks_dense(frames, feats, window, mel, padded, remove_dc_offset, preemph, use_power, use_log,
                        step) -> None:
    """``feats`` (B, M, bins) from ``frames`` (B, M, window): one dense mel product per block of frames."""
    buf, scratch = _fbank_buffers(frames, step, padded)
    M = frames.shape[1]
    for m0 in range(0, M, step):
        m1 = min(M, m0 + step)
        spec = _block_spectrum(frames, buf, scratch, m0, m1, window, remove_dc_offset, preemph)
        re, im = torch.view_as_real(spec[..., : padded // 2]).unbind(-1)  # each (B, n, padded/2)
        power = torch.mul(re, re).addcmul_(im, im)  # |X|^2
        if not use_power:
            power.sqrt_()
        block = torch.matmul(power, mel)  # (B, n, bins)
        if use_log:
            block.clamp_min_(_EPSILON).log_()
        feats[:, m0:m1] = block


def _fbank_blocks_banded(frames, feats, window, bands, padded, remove_dc_offset, preemph, use_log, step) -> None:
    """``feats`` from ``frames`` in blocks of ``step`` frames (all rows at once) whose buffers are allocated
    once and stay in cache (whole-batch intermediates would be (B, M, padded) tensors of tens of MB each).

    ``|X|^2`` is never formed: the real and imaginary parts are squared in place and the mel product reads
    them interleaved, with each filter weight repeated for both (``bands`` from :func:`_mel_bands_cpu`,
    interleaved), band by band over each band's own FFT-bin range.
    """
    B, M, _ = frames.shape
    buf, scratch = _fbank_buffers(frames, step, padded)
    width = bands[0][2].shape[1]
    out = frames.new_empty((len(bands), B * step, width))  # band-major mel energies of one block
    for m0 in range(0, M, step):
        m1 = min(M, m0 + step)
        n = m1 - m0
        spec = _block_spectrum(frames, buf, scratch, m0, m1, window, remove_dc_offset, preemph)
        squares = torch.view_as_real(spec).square_().view(B * n, -1)  # (B * n, 2 * (padded/2 + 1)): re², im²
        for i, (lo, hi, weights) in enumerate(bands):
            torch.matmul(squares[:, lo:hi], weights, out=out[i, : B * n, : weights.shape[1]])
        block = out[:, : B * n]
        if use_log:
            block.clamp_min_(_EPSILON).log_()
        target = feats[:, m0:m1]  # (B, n, bins) <- (bands, B * n, width)
        if len(bands) * width == target.shape[-1]:
            target.unflatten(-1, (len(bands), width)).copy_(block.view(len(bands), B, n, width).permute(1, 2, 0, 3))
        else:
            for i, (_, _, weights) in enumerate(bands):
                w = weights.shape[1]
                target[..., i * width: i * width + w].copy_(block[i, :, :w].view(B, n, w))


@lru_cache(maxsize=32)
def _mel_sparse_cpu(mel_key: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The mel matrix as one run of FFT bins per filter, for the native kernel: ``(lo, len, off, weights)``
    with filter ``j`` covering bins ``lo[j] : lo[j] + len[j]`` with weights ``weights[off[j]:][:len[j]]``
    (float32, rounded from the same float64 matrix as the torch path's)."""
    padded = mel_key[1]
    mel = _mel_matrix_cpu(*mel_key)[: padded // 2]
    lo, length, off, weights, total = [], [], [], [], 0
    for j in range(mel.shape[1]):
        rows = mel[:, j].ne(0).nonzero().flatten()
        a, b = (int(rows.min()), int(rows.max()) + 1) if rows.numel() else (0, 0)  # low filters can be empty
        lo.append(a)
        length.append(b - a)
        off.append(total)
        weights.append(mel[a:b, j])
        total += b - a
    as_int = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return as_int(lo), as_int(length), as_int(off), torch.cat(weights).to(torch.float32).contiguous()


_POOL_LOCK = threading.Lock()
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _single_threaded() -> None:
    """Make torch single-threaded in this (new) thread for good. A thread's first parallel op reads the
    process-wide thread count once and sets its own from it; the fill below is that first op, run while the
    count is 1, so the calling thread putting its own count back later does not reach this thread."""
    torch.set_num_threads(1)
    torch.empty(1 << 17).fill_(0.0)
    torch.set_num_threads(1)


def _fbank_pool(workers: int) -> ThreadPoolExecutor:
    """Threads for the native fbank, each running torch with one intra-op thread (two threads that each
    start OpenMP teams of the default size oversubscribe the cores and slow the whole process down).

    ``torch.set_num_threads`` in a new thread also resets process-wide defaults, so the calling thread's
    setting is put back once every worker has started. A pool created before a ``fork`` is not reused.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
            if _POOL is not None and _POOL[0] == os.getpid():
                _POOL[2].shutdown(wait=False)
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="lobes-fbank", initializer=_single_threaded)
            started = threading.Barrier(workers)
            list(pool.map(lambda _: started.wait(timeout=60), range(workers)))  # start them all now
            torch.set_num_threads(threads)
            _POOL = (os.getpid(), workers, pool)
        return _POOL[2]


def _fbank_native(lib, src: Tensor, row_stride: int, frame_stride: int, frames: Tensor, feats: Tensor,
                  window: Tensor, mel_key: tuple, padded: int, remove_dc_offset: bool, preemph: float,
                  use_power: bool, use_log: bool) -> None:
    """``feats`` (B, M, bins) with the compiled kernels (``lobes/csrc/fbank.c``).

    The (rows, frames) grid is cut into one part per thread (``torch.get_num_threads()``; by rows when there
    are enough, else by time), so that each thread reads and writes its own memory. In each part, the frames'
    means come from torch's ``mean`` (the reduction, hence the rounding, torchaudio uses), then:

    * fused path (torch built with MKL, and MKL's FFT called directly gives ``torch.fft.rfft``'s results bit
      for bit, checked once per FFT length): one kernel call runs the frames through pre-processing, FFT and
      mel filters ``_NATIVE_FFT_BATCH`` frames at a time, in buffers that stay in the core's cache;
    * otherwise, blocks of about ``_NATIVE_BLOCK_FRAMES`` frames: one kernel writes the DC-free,
      pre-emphasised, windowed frames with torchaudio's rounding, ``torch.fft.rfft`` transforms them, a
      second kernel applies the mel filters.

    Both write the (floored, logged) mel energies straight into ``feats``.
    """
    B, M, window_size = frames.shape
    lo, length, off, weights = _mel_sparse_cpu(mel_key)
    nbins, nfilt = padded // 2, feats.shape[-1]
    itemsize = src.element_size()
    filters = (lo.data_ptr(), length.data_ptr(), off.data_ptr(), weights.data_ptr(), 0 if use_power else 1,
               1 if use_log else 0)

    def part_means(b0: int, b1: int, f0: int, f1: int) -> Tensor | None:
        return frames[b0:b1, f0:f1].mean(dim=-1) if remove_dc_offset else None  # (rows, f1 - f0), contiguous

    def run_fused(b0: int, b1: int, f0: int, f1: int) -> None:
        work = src.new_empty((int(lib.lobes_fbank_part_workspace(padded, nfilt, _NATIVE_FFT_BATCH)),))
        means = part_means(b0, b1, f0, f1)
        status = lib.lobes_fbank_part(
            src.data_ptr() + (b0 * row_stride + f0 * frame_stride) * itemsize, row_stride, frame_stride, b1 - b0,
            f1 - f0, window_size, None if means is None else means.data_ptr(), preemph, window.data_ptr(), padded,
            nfilt, *filters, feats.data_ptr() + (b0 * M + f0) * nfilt * itemsize, M * nfilt, nfilt,
            _NATIVE_FFT_BATCH, work.data_ptr())
        if status != 0:
            raise RuntimeError(f"kaldi_fbank: MKL's FFT failed (DFTI status {status})")

    def run_blocks(b0: int, b1: int, f0: int, f1: int) -> None:
        rows_in_part = b1 - b0
        step = max(1, min(f1 - f0, _NATIVE_BLOCK_FRAMES // rows_in_part))
        buf = src.new_zeros((rows_in_part * step, padded))  # FFT zero padding: the tail is never written
        work = src.new_empty((int(lib.lobes_fbank_mel_workspace(nbins, nfilt)),))
        means = part_means(b0, b1, f0, f1)
        base = src.data_ptr() + b0 * row_stride * itemsize
        out = feats.data_ptr() + b0 * M * nfilt * itemsize
        for m0 in range(f0, f1, step):
            n = min(f1, m0 + step) - m0
            rows = rows_in_part * n
            lib.lobes_fbank_frames(base + m0 * frame_stride * itemsize, row_stride, frame_stride, n, 0, rows,
                                   window_size, None if means is None else means.data_ptr() + (m0 - f0) * itemsize,
                                   f1 - f0, preemph, window.data_ptr(), buf.data_ptr(), padded)
            spec = torch.fft.rfft(buf[:rows])  # (rows, padded/2 + 1) complex64, contiguous
            lib.lobes_fbank_mel(spec.data_ptr(), 2 * spec.shape[-1], nbins, nfilt, *filters,
                                out + m0 * nfilt * itemsize, M * nfilt, nfilt, n, 0, rows, work.data_ptr())

    run = run_fused if _native.fft_matches_torch(lib, padded) else run_blocks
    workers = min(torch.get_num_threads(), max(1, B * M // _NATIVE_MIN_FRAMES_PER_THREAD))
    if workers <= 1:
        run(0, B, 0, M)
        return
    if B >= workers:
        cuts = [B * k // workers for k in range(workers + 1)]
        parts = [(cuts[k], cuts[k + 1], 0, M) for k in range(workers)]
    else:
        workers = min(workers, M)
        cuts = [M * k // workers for k in range(workers + 1)]
        parts = [(0, B, cuts[k], cuts[k + 1]) for k in range(workers)]
    pool = _fbank_pool(workers)
    for future in [pool.submit(run, *part) for part in parts]:
        future.result()


# --------------------------------------------------------------------------------------------------
# public fbank
# --------------------------------------------------------------------------------------------------
def kaldi_fbank(
    waveforms: Tensor,
    lengths: Tensor | None = None,
    *,
    num_mel_bins: int = 23,
    sample_frequency: float = 16000.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    window_type: str = "povey",
    blackman_coeff: float = 0.42,
    preemphasis_coefficient: float = 0.97,
    remove_dc_offset: bool = True,
    dither: float = 0.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_log_fbank: bool = True,
    use_power: bool = True,
    round_to_power_of_two: bool = True,
    subtract_mean: bool = False,
    snip_edges: bool = True,
    use_energy: bool = False,
    vtln_warp: float = 1.0,
    padding_value: float = 0.0,
) -> Tensor:
    """Kaldi log-mel filterbank of a batch, equal per row to ``torchaudio.compliance.kaldi.fbank``.

    All rows are processed together on the waveforms' device (no loop over rows; on CPU the frames go
    through in cache-sized blocks of time, all rows at once). Each frame sees torchaudio's operations in
    torchaudio's order, so float32 results agree with it to rounding (~1e-6). Defaults are torchaudio's;
    BEATs uses ``num_mel_bins=128`` with the other defaults on ``wav * 2**15``.
    Half-precision input is computed in float32 (the result is float32); float64 stays float64.
    Autocast is disabled inside, so reduced-precision regions do not lower the fbank's precision.

    Arguments
    ---------
    waveforms : torch.Tensor
        ``(B, T)`` floating-point mono signals.
    lengths : torch.Tensor, optional
        ``(B,)`` valid lengths: float = relative in ``(0, 1]``, integer = samples. Frames that do not
        fit inside a row's length are set to ``padding_value``; ``num_frames(lengths_in_samples)`` gives
        the per-row frame count.
    num_mel_bins, sample_frequency, frame_length, frame_shift, window_type, blackman_coeff, \
preemphasis_coefficient, remove_dc_offset, dither, low_freq, high_freq, use_log_fbank, use_power, \
round_to_power_of_two, subtract_mean : see ``torchaudio.compliance.kaldi.fbank``
        ``subtract_mean`` subtracts each row's mean over its valid frames.
    snip_edges, use_energy, vtln_warp
        Only ``snip_edges=True``, ``use_energy=False`` and ``vtln_warp=1.0`` are supported; other values
        raise ``ValueError``.
    padding_value : float
        Value written to frames past a row's length.

    Returns
    -------
    torch.Tensor
        ``(B, frames, num_mel_bins)`` with ``frames = num_frames(T, window, shift)`` (0 when ``T`` is
        shorter than one window).

    Example
    -------
    >>> wav = torch.randn(3, 16000)
    >>> feats = kaldi_fbank(wav * 2**15, num_mel_bins=128)
    >>> feats.shape
    torch.Size([3, 98, 128])
    """
    _check_waveforms(waveforms)
    if waveforms.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "kaldi_fbank is not differentiable: pass waveforms that do not require grad (wav.detach()), "
            "or call it under torch.no_grad()"
        )
    if not snip_edges:
        raise ValueError("kaldi_fbank supports snip_edges=True only (frames that fit entirely in the signal)")
    if use_energy:
        raise ValueError("kaldi_fbank does not support use_energy=True (no energy column); use torchaudio's fbank")
    if vtln_warp != 1.0:
        raise ValueError(f"kaldi_fbank supports vtln_warp=1.0 only, got {vtln_warp}")
    if window_type not in KALDI_WINDOW_TYPES:
        raise ValueError(f"unknown window_type {window_type!r}; expected one of {KALDI_WINDOW_TYPES}")
    if num_mel_bins <= 3:
        raise ValueError(f"num_mel_bins must be > 3, got {num_mel_bins}")
    if not 0.0 <= preemphasis_coefficient <= 1.0:
        raise ValueError(f"preemphasis_coefficient must lie in [0, 1], got {preemphasis_coefficient}")
    if sample_frequency <= 0:
        raise ValueError(f"sample_frequency must be > 0, got {sample_frequency}")
    window_shift = int(sample_frequency * frame_shift * 0.001)
    window_size = int(sample_frequency * frame_length * 0.001)
    if window_size < 2 or window_shift < 1:
        raise ValueError(
            f"frame_length / frame_shift give {window_size} / {window_shift} samples; expected >= 2 / >= 1"
        )
    padded = 1 << (window_size - 1).bit_length() if round_to_power_of_two else window_size
    if padded % 2:
        raise ValueError(
            f"the padded window ({padded} samples) must be even: use round_to_power_of_two or another frame_length"
        )

    B, T = waveforms.shape
    device = waveforms.device
    dtype = torch.float64 if waveforms.dtype == torch.float64 else torch.float32
    sample_lens = to_sample_lengths(lengths, B, T, device=device) if lengths is not None else None
    M = num_frames(T, window_size, window_shift)
    if M == 0:
        return waveforms.new_zeros((B, 0, num_mel_bins), dtype=dtype)

    with torch.autocast(device.type, enabled=False):
        x = waveforms.to(dtype).contiguous()
        window = _cached("window", (window_type, window_size, blackman_coeff), device, dtype,
                         lambda: _window_cpu(window_type, window_size, blackman_coeff, dtype))
        frames = x.unfold(1, window_size, window_shift)  # (B, M, window) strided view, no copy
        if dither != 0.0:  # Gaussian noise added to each frame's samples, as Kaldi does (materialises the frames)
            frames = frames + torch.randn_like(frames) * dither
        mel_key = (num_mel_bins, padded, float(sample_frequency), float(low_freq), float(high_freq))
        feats = x.new_empty((B, M, num_mel_bins))
        step = M if device.type != "cpu" else max(1, min(M, _FBANK_BLOCK_FRAMES // B))
        lib = _native.fbank_library() if device.type == "cpu" and dtype == torch.float32 else None
        if lib is not None:
            src = frames.contiguous() if dither != 0.0 else x  # dithered frames: materialised (B, M, window)
            row_stride, frame_stride = (M * window_size, window_size) if dither != 0.0 else (T, window_shift)
            _fbank_native(lib, src, row_stride, frame_stride, frames, feats, window, mel_key, padded,
                          remove_dc_offset, preemphasis_coefficient, use_power, use_log_fbank)
        elif device.type == "cpu" and use_power:
            _fbank_blocks_banded(frames, feats, window, _mel_bands_cpu(mel_key, dtype), padded, remove_dc_offset,
                                 preemphasis_coefficient, use_log_fbank, step)
        else:  # magnitudes (sqrt(re² + im²) must be formed first), or another device: one dense mel product
            # the Nyquist bin carries no mel weight and is skipped
            mel = _cached("mel", mel_key, device, dtype, lambda: _mel_matrix_cpu(*mel_key)[: padded // 2])
            _fbank_blocks_dense(frames, feats, window, mel, padded, remove_dc_offset, preemphasis_coefficient,
                                use_power, use_log_fbank, step)
        if sample_lens is not None:
            valid = lengths_to_mask(num_frames(sample_lens, window_size, window_shift), M)  # (B, M)
            if subtract_mean:
                count = valid.sum(1, keepdim=True).clamp_min(1).unsqueeze(-1)  # (B, 1, 1)
                mean = (feats * valid.unsqueeze(-1)).sum(1, keepdim=True) / count
                feats = feats - mean
            feats = feats.masked_fill(~valid.unsqueeze(-1), padding_value)
        elif subtract_mean:
            feats = feats - feats.mean(dim=1, keepdim=True)
    return feats
