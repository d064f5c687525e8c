"""Batched Kaldi-compatible filterbank features.

``kaldi_fbank`` computes ``torchaudio.compliance.kaldi.fbank`` for a whole batch ``(B, T)`` at once on
the input's device, in plain torch operations: frames are strided views of the batch; DC removal and
pre-emphasis round exactly as torchaudio's, and the FFT is ``torch.fft.rfft``. On CPU the frames go through
cache-sized blocks of time (all rows at once), and the mel product reads the squared real and imaginary
parts in place, band by band over the few FFT bins each band of triangular filters covers. The mel matrix
and window are cached per (options, device, dtype). Rows may have their own lengths; frames past a row's
end are reported by :func:`lobes.masks.num_frames` and filled with ``padding_value``, and every frame inside
a row equals the frame torchaudio computes for that row alone (Kaldi frames only look at their own
samples). Lengths follow the conventions of :mod:`lobes.masks`.

:class:`DFTKaldiFbank` computes the same features with operations every graph exporter and runtime knows
(frames gathered by index, the real DFT as one matrix product, no preallocated buffers, no shape-dependent
blocking): it is what an ONNX graph of a model with the fbank inside holds.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from lobes.masks import lengths_to_mask, num_frames, to_sample_lengths

__all__ = [
    "KALDI_WINDOW_TYPES",
    "DFTKaldiFbank",
    "kaldi_fbank",
]

KALDI_WINDOW_TYPES = ("hamming", "hanning", "povey", "rectangular", "blackman")

# numeric_limits<float>::epsilon(), the floor Kaldi (and torchaudio) put under the mel energies
_EPSILON = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------------
# fbank internals
# --------------------------------------------------------------------------------------------------
def _mel(freq):
    return 1127.0 * torch.log(1.0 + freq / 700.0)


@lru_cache(maxsize=32)
def _mel_matrix_cpu(num_bins: int, padded: int, sample_frequency: float, low_freq: float, high_freq: float) -> Tensor:
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
        weights = mel[:, b0 : b0 + bins_per_band]
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


def _fbank_blocks_dense(
    frames, feats, window, mel, padded, remove_dc_offset, preemph, use_power, use_log, step
) -> None:
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
                target[..., i * width : i * width + w].copy_(block[i, :, :w].view(B, n, w))


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
        window = _cached(
            "window",
            (window_type, window_size, blackman_coeff),
            device,
            dtype,
            lambda: _window_cpu(window_type, window_size, blackman_coeff, dtype),
        )
        frames = x.unfold(1, window_size, window_shift)  # (B, M, window) strided view, no copy
        if dither != 0.0:  # Gaussian noise added to each frame's samples, as Kaldi does (materialises the frames)
            frames = frames + torch.randn_like(frames) * dither
        mel_key = (num_mel_bins, padded, float(sample_frequency), float(low_freq), float(high_freq))
        feats = x.new_empty((B, M, num_mel_bins))
        step = M if device.type != "cpu" else max(1, min(M, _FBANK_BLOCK_FRAMES // B))
        if device.type == "cpu" and use_power:
            _fbank_blocks_banded(
                frames,
                feats,
                window,
                _mel_bands_cpu(mel_key, dtype),
                padded,
                remove_dc_offset,
                preemphasis_coefficient,
                use_log_fbank,
                step,
            )
        else:  # magnitudes (sqrt(re² + im²) must be formed first), or another device: one dense mel product
            # the Nyquist bin carries no mel weight and is skipped
            mel = _cached("mel", mel_key, device, dtype, lambda: _mel_matrix_cpu(*mel_key)[: padded // 2])
            _fbank_blocks_dense(
                frames,
                feats,
                window,
                mel,
                padded,
                remove_dc_offset,
                preemphasis_coefficient,
                use_power,
                use_log_fbank,
                step,
            )
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


# --------------------------------------------------------------------------------------------------
# exportable fbank
# --------------------------------------------------------------------------------------------------
class DFTKaldiFbank(torch.nn.Module):
    """:func:`kaldi_fbank` in graph-exportable form: ``(B, T)`` -> ``(B, frames, num_mel_bins)``.

    Frames are gathered with an index table (no strided view), the spectrum is a real DFT written as one
    matrix product with a ``(window, 2 * padded / 2)`` cosine / sine table (the zero padding of the FFT adds
    nothing to it; the Nyquist bin, which carries no mel weight, is left out), and every shape follows the
    input, so an exported graph keeps dynamic batch and time axes. The DFT runs in ``dft_dtype`` (float64
    by default): its result is then exact to float32 rounding, and the difference to :func:`kaldi_fbank`
    is the rounding of the float32 FFT there (at most a few 1e-4 in the log energy of the lowest bins of
    loud pre-emphasised frames, where the FFT's error is large next to the bin's energy).

    Only the options BEATs and Kaldi recipes use are taken (``snip_edges=True``, no dither, no energy,
    power spectrum); every frame is computed, including those past a row's length (mask them downstream).

    Arguments
    ---------
    num_mel_bins, sample_frequency, frame_length, frame_shift, window_type, blackman_coeff, \
preemphasis_coefficient, remove_dc_offset, low_freq, high_freq, use_log_fbank, round_to_power_of_two
        As in :func:`kaldi_fbank`.
    dft_dtype : torch.dtype
        Precision of the DFT product (``torch.float64`` or ``torch.float32``).

    Example
    -------
    >>> wav = torch.randn(2, 16000) * 2**15 * 0.1
    >>> fbank = DFTKaldiFbank(num_mel_bins=128)
    >>> feats = fbank(wav)
    >>> feats.shape, bool((feats - kaldi_fbank(wav, num_mel_bins=128)).abs().max() < 1e-2)
    (torch.Size([2, 98, 128]), True)
    """

    def __init__(
        self,
        num_mel_bins: int = 23,
        sample_frequency: float = 16000.0,
        frame_length: float = 25.0,
        frame_shift: float = 10.0,
        window_type: str = "povey",
        blackman_coeff: float = 0.42,
        preemphasis_coefficient: float = 0.97,
        remove_dc_offset: bool = True,
        low_freq: float = 20.0,
        high_freq: float = 0.0,
        use_log_fbank: bool = True,
        round_to_power_of_two: bool = True,
        dft_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if window_type not in KALDI_WINDOW_TYPES:
            raise ValueError(f"unknown window_type {window_type!r}; expected one of {KALDI_WINDOW_TYPES}")
        if dft_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dft_dtype must be torch.float32 or torch.float64, got {dft_dtype}")
        self.window_shift = int(sample_frequency * frame_shift * 0.001)
        self.window_size = int(sample_frequency * frame_length * 0.001)
        if self.window_size < 2 or self.window_shift < 1:
            raise ValueError(
                f"frame_length / frame_shift give {self.window_size} / {self.window_shift} samples; "
                "expected >= 2 / >= 1"
            )
        padded = 1 << (self.window_size - 1).bit_length() if round_to_power_of_two else self.window_size
        if padded % 2:
            raise ValueError(f"the padded window ({padded} samples) must be even")
        self.preemph, self.remove_dc_offset, self.use_log = preemphasis_coefficient, remove_dc_offset, use_log_fbank
        self.dft_dtype = dft_dtype
        bins = padded // 2
        n = torch.arange(self.window_size, dtype=torch.float64).unsqueeze(1)  # (W, 1)
        k = torch.arange(bins, dtype=torch.float64).unsqueeze(0)  # (1, bins)
        angle = (2 * math.pi / padded) * torch.remainder(n * k, padded)  # reduced first: exact angles
        dft = torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1)  # (W, 2 * bins): real | imaginary
        self.register_buffer("window", _window_cpu(window_type, self.window_size, blackman_coeff, torch.float32))
        self.register_buffer("dft", dft.to(dft_dtype))
        mel_key = (num_mel_bins, padded, float(sample_frequency), float(low_freq), float(high_freq))
        self.register_buffer("mel", _mel_matrix_cpu(*mel_key)[:bins].float().contiguous())  # (bins, num_mel_bins)

    def forward(self, waveforms: Tensor) -> Tensor:
        """``(B, T)`` float32 -> ``(B, frames, num_mel_bins)`` float32 (``frames`` as :func:`kaldi_fbank`)."""
        x = waveforms.float()
        count = (x.shape[1] - self.window_size) // self.window_shift + 1  # shape arithmetic: stays symbolic
        starts = torch.arange(count, device=x.device).unsqueeze(1) * self.window_shift  # (M, 1)
        index = starts + torch.arange(self.window_size, device=x.device)  # (M, W)
        frames = x[:, index]  # (B, M, W)
        if self.remove_dc_offset:
            frames = frames - frames.mean(dim=-1, keepdim=True)
        if self.preemph != 0.0:
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # z[-1] := z[0], as Kaldi
            frames = frames - self.preemph * previous
        frames = frames * self.window
        spec = torch.matmul(frames.to(self.dft_dtype), self.dft)  # (B, M, 2 * bins)
        re, im = spec.chunk(2, dim=-1)
        power = (re * re + im * im).float()  # (B, M, bins)
        feats = torch.matmul(power, self.mel)  # (B, M, num_mel_bins)
        if self.use_log:
            feats = feats.clamp_min(_EPSILON).log()
        return feats
