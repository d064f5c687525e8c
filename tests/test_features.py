"""Batched Kaldi fbank against torchaudio's per-utterance ``kaldi.fbank``, and the length / mask utilities."""

import pytest
import torch
import torchaudio.compliance.kaldi as ta_kaldi

from lobes.features import kaldi_fbank
from lobes.masks import (
    lengths_to_mask,
    lengths_to_padding_mask,
    num_frames,
    relative_to_absolute,
    to_sample_lengths,
)

BEATS_OPTS = dict(num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)
TOL = 1e-3  # abs, on log-mel energies


def _audio(batch, samples, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    tone = torch.sin(2 * torch.pi * 440 * t) * 0.3
    return (torch.randn(batch, samples, generator=g) * 0.05 + tone) * 2**15


def _reference(wav, **opts):
    return torch.stack([ta_kaldi.fbank(w.unsqueeze(0), **opts) for w in wav])


def test_beats_options_match_torchaudio():
    wav = _audio(3, 24000)
    ours = kaldi_fbank(wav, **BEATS_OPTS)
    ref = _reference(wav, **BEATS_OPTS)
    assert ours.shape == ref.shape == (3, 148, 128)
    assert (ours - ref).abs().max() < TOL


def test_float32_rounding_is_no_worse_than_torchaudio():
    # White noise at speech level: a mel bin holding ~1e-7 of its frame's energy (the lowest bins, one FFT
    # bin near DC attenuated by pre-emphasis, or a chance spectral null) has its log moved by ~1e-3 by
    # float32 round-off, in torchaudio too. Against torchaudio's float64 result ours must be as close as
    # torchaudio's float32 result is.
    g = torch.Generator().manual_seed(7)
    wav = 0.1 * torch.randn(2, 48000, generator=g) * 2**15
    ours = kaldi_fbank(wav, **BEATS_OPTS)
    ref32 = _reference(wav, **BEATS_OPTS)
    ref64 = _reference(wav.double(), **BEATS_OPTS).float()
    assert (ours - ref64).abs().max() <= (ref32 - ref64).abs().max() + 1e-4
    # the frames go through the reference's operations in its order (window built in float32 as torchaudio
    # builds it), so even these ill-conditioned bins agree with torchaudio's float32 result
    assert (ours - ref32).abs().max() < 1e-4


def test_dither_only_adds_small_noise():
    wav = _audio(2, 8000, seed=6)
    quiet = kaldi_fbank(wav, **BEATS_OPTS)
    torch.manual_seed(0)
    dithered = kaldi_fbank(wav, dither=1.0, **BEATS_OPTS)
    assert dithered.shape == quiet.shape
    assert not torch.equal(dithered, quiet)
    assert (dithered[..., 8:] - quiet[..., 8:]).abs().max() < 0.05  # unit dither vs signal at ~1e3 amplitude


@pytest.mark.parametrize(
    "opts",
    [
        dict(num_mel_bins=40, window_type="hamming", frame_length=20, frame_shift=12),
        dict(num_mel_bins=23, window_type="hanning"),
        dict(num_mel_bins=64, window_type="blackman", preemphasis_coefficient=0.0, remove_dc_offset=False),
        dict(num_mel_bins=80, window_type="rectangular", use_power=False, subtract_mean=True),
        dict(num_mel_bins=80, sample_frequency=8000, low_freq=50, high_freq=-200, round_to_power_of_two=False),
        dict(num_mel_bins=30, low_freq=100, high_freq=7000, frame_length=32, frame_shift=16),
    ],
)
def test_other_options_match_torchaudio(opts):
    wav = _audio(2, 12000, seed=1)
    ours = kaldi_fbank(wav, **opts)
    ref = _reference(wav, **opts)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < TOL


def test_linear_fbank_relative_error():
    wav = _audio(2, 8000, seed=2)
    ours = kaldi_fbank(wav, num_mel_bins=40, use_log_fbank=False)
    ref = _reference(wav, num_mel_bins=40, use_log_fbank=False)
    rel = (ours - ref).abs() / ref.abs().clamp_min(1e-3)
    assert rel.max() < 1e-3


def test_float64_input_matches_torchaudio_float64():
    wav = _audio(2, 6000, seed=3).double()
    ours = kaldi_fbank(wav, **BEATS_OPTS)
    assert ours.dtype == torch.float64
    assert (ours - _reference(wav, **BEATS_OPTS)).abs().max() < 1e-6


@pytest.mark.parametrize("relative", [False, True])
def test_per_row_lengths_equal_rows_alone(relative):
    wav = _audio(4, 16000, seed=4)
    samples = torch.tensor([16000, 9999, 400, 2800])
    lengths = samples.float() / 16000 if relative else samples
    ours = kaldi_fbank(wav, lengths, padding_value=-7.0, **BEATS_OPTS)
    counts = num_frames(samples)
    for i, n in enumerate(samples.tolist()):
        alone = ta_kaldi.fbank(wav[i : i + 1, :n], **BEATS_OPTS)
        assert alone.shape[0] == counts[i]
        assert (ours[i, : counts[i]] - alone).abs().max() < TOL
        assert (ours[i, counts[i] :] == -7.0).all()


def test_subtract_mean_uses_valid_frames_only():
    wav = _audio(2, 8000, seed=5)
    samples = torch.tensor([8000, 5000])
    ours = kaldi_fbank(wav, samples, num_mel_bins=40, subtract_mean=True)
    m = int(num_frames(5000))
    alone = ta_kaldi.fbank(wav[1:2, :5000], num_mel_bins=40, subtract_mean=True)
    assert (ours[1, :m] - alone).abs().max() < TOL


def test_short_rows_and_short_batch():
    wav = _audio(2, 399)
    assert kaldi_fbank(wav, num_mel_bins=40).shape == (2, 0, 40)
    wav = _audio(2, 1000)
    out = kaldi_fbank(wav, torch.tensor([1000, 300]), num_mel_bins=40)
    assert out.shape == (2, 4, 40)
    assert (out[1] == 0).all()  # a row shorter than one window has no valid frame


def test_half_precision_and_autocast_stay_float32():
    wav = _audio(2, 4000)
    ref = kaldi_fbank(wav, **BEATS_OPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = kaldi_fbank(wav, **BEATS_OPTS)
    assert auto.dtype == torch.float32
    assert (auto - ref).abs().max() < 1e-5
    half = kaldi_fbank((wav / 2**15).bfloat16() * 2**15, **BEATS_OPTS)
    assert half.dtype == torch.float32


def test_rows_longer_than_a_block_match_torchaudio():
    # the CPU path goes through blocks of 2048 frames (all rows together): 3 rows of 1248 frames take two
    # blocks of 682 and 566 frames, one row of 2498 frames two blocks of 2048 and 450
    for batch, samples in ((3, 200000), (1, 400000)):
        wav = _audio(batch, samples, seed=8)
        ours = kaldi_fbank(wav, **BEATS_OPTS)
        ref = _reference(wav, **BEATS_OPTS)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < TOL


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("batch, samples", [(8, 64000), (1, 400000), (3, 2000)])
def test_thread_count_does_not_change_the_result(threads, batch, samples):
    wav = _audio(batch, samples, seed=9)
    lengths = torch.linspace(1.0, 0.5, batch)
    threads(1)
    one = kaldi_fbank(wav, lengths, **BEATS_OPTS)
    threads(2)
    two = kaldi_fbank(wav, lengths, **BEATS_OPTS)
    assert (one - two).abs().max() < 1e-5


def test_nan_and_inf_propagate_like_torchaudio():
    wav = _audio(2, 8000, seed=10)
    wav[0, 1000] = float("nan")
    wav[1, 5000] = float("inf")
    ours = kaldi_fbank(wav, num_mel_bins=40)
    ref = _reference(wav, num_mel_bins=40)
    assert ours.isnan().any() and torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.isinf(), ref.isinf())
    finite = ours.isfinite() & ref.isfinite()
    assert finite.any() and (ours[finite] - ref[finite]).abs().max() < TOL


def test_waveforms_that_require_grad_are_refused():
    wav = _audio(1, 4000).requires_grad_()
    with pytest.raises(ValueError, match="not differentiable"):
        kaldi_fbank(wav, **BEATS_OPTS)
    with torch.no_grad():
        assert kaldi_fbank(wav, **BEATS_OPTS).shape == (1, 23, 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    wav = _audio(3, 16000)
    cpu = kaldi_fbank(wav, **BEATS_OPTS)
    gpu = kaldi_fbank(wav.cuda(), **BEATS_OPTS)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < TOL


@pytest.mark.parametrize(
    "wav, kwargs, err, match",
    [
        (torch.zeros(2, 800, dtype=torch.int16), {}, TypeError, "floating point"),
        (torch.zeros(2, 2, 800), {}, ValueError, r"\(B, T\)"),
        (torch.zeros(800), {}, ValueError, r"\(B, T\)"),
        (torch.zeros(2, 800), dict(snip_edges=False), ValueError, "snip_edges"),
        (torch.zeros(2, 800), dict(use_energy=True), ValueError, "use_energy"),
        (torch.zeros(2, 800), dict(window_type="kaiser"), ValueError, "window_type"),
        (torch.zeros(2, 800), dict(vtln_warp=0.9), ValueError, "vtln_warp"),
        (torch.zeros(2, 800), dict(lengths=torch.tensor([1.0])), ValueError, r"shape \(2,\)"),
        (torch.zeros(2, 800), dict(lengths=torch.tensor([1.0, 1.5])), ValueError, r"\(0, 1\]"),
        (torch.zeros(2, 800), dict(lengths=torch.tensor([0.0, 1.0])), ValueError, r"\(0, 1\]"),
        (torch.zeros(2, 800), dict(lengths=torch.tensor([900, 10])), ValueError, r"\[0, 800\]"),
        (torch.zeros(2, 800), dict(high_freq=9000.0), ValueError, "Nyquist"),
    ],
)
def test_bad_input_raises_clear_errors(wav, kwargs, err, match):
    with pytest.raises(err, match=match):
        kaldi_fbank(wav, **kwargs)


def test_length_utilities():
    assert relative_to_absolute(torch.tensor([1.0, 0.5, 1 / 3]), 3000).tolist() == [3000, 1500, 1000]
    assert to_sample_lengths(None, 3, 10).tolist() == [10, 10, 10]
    assert to_sample_lengths(torch.tensor([4, 10]), 2, 10).tolist() == [4, 10]
    assert num_frames(399) == 0 and num_frames(400) == 1 and num_frames(560) == 2
    mask = lengths_to_mask(torch.tensor([2, 0, 3]), 3)
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert torch.equal(lengths_to_padding_mask(torch.tensor([2, 0, 3]), 3), ~mask)


def test_float_lengths_round_to_the_nearest_frame():
    """Absolute lengths computed as relative length x T (e.g. 0.6 * 5 = 3.0000000000000004) round."""
    expected = lengths_to_padding_mask(torch.tensor([3, 3]), 5)
    assert torch.equal(lengths_to_padding_mask(torch.tensor([2.9999, 3.0001]), 5), expected)
    with pytest.raises(ValueError, match="shape"):
        lengths_to_mask(torch.tensor([[3]]), 5)
