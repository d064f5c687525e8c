"""The compiled CPU kernels of ``kaldi_fbank`` (``lobes/csrc/fbank.c``): exact frame pre-processing, the
same features as the pure-torch path, threads, and the fallback when no compiler is available."""

import ctypes
import logging
import multiprocessing as mp
import threading

import pytest
import torch
import torchaudio.compliance.kaldi as ta_kaldi

import lobes.features as features
from lobes import _native
from lobes.features import kaldi_fbank

BEATS_OPTS = dict(num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)

needs_compiler = pytest.mark.skipif(
    _native._compiler() is None or _native.fbank_library() is None,
    reason="no working C compiler: the native kernels are unavailable here",
)


def _loud_noise(batch, samples, seed=7):
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, samples, generator=g) * 2**15


def _torch_path(fn):
    """Run ``fn`` with the native kernels switched off (the pure-torch CPU path)."""
    saved = dict(_native._loaded)
    _native._loaded["fbank"] = (None, "switched off by the test")
    try:
        return fn()
    finally:
        _native._loaded.clear()
        _native._loaded.update(saved)


def _fused_available():
    lib = _native.fbank_library()
    return lib is not None and _native.fft_matches_torch(lib, 512)


@pytest.fixture(params=["fused", "blocks"])
def path(request, monkeypatch):
    """The two native paths: one kernel call per thread with MKL's FFT called directly, or blocks of frames
    with ``torch.fft.rfft`` between two kernel calls (torch builds without MKL)."""
    if request.param == "fused" and not _fused_available():
        pytest.skip("torch is not built with MKL (or MKL's FFT differs from torch.fft.rfft): no fused path")
    if request.param == "blocks":
        monkeypatch.setattr(_native, "fft_matches_torch", lambda lib, padded: False)
    return request.param


@pytest.fixture
def fresh_native():
    """Forget the loaded kernels for the test (to exercise building and the fallback); restore them after."""
    saved = dict(_native._loaded)
    _native._reset()
    yield
    _native._reset()
    _native._loaded.update(saved)


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@needs_compiler
def test_native_kernels_are_used_on_cpu_float32():
    kaldi_fbank(_loud_noise(1, 4000), **BEATS_OPTS)
    assert _native.native_status()["fbank"].startswith("native: ")


@needs_compiler
def test_frame_kernel_rounds_exactly_like_torchaudio():
    # DC removal, pre-emphasis and window, bit for bit: a fused multiply-add (or another order of the same
    # operations) changes ~30 % of these values in the last bit, which moves the log energies of the lowest
    # mel bins of loud input by ~1e-3
    lib = _native.fbank_library()
    wav = _loud_noise(3, 8000)
    frames = wav.unfold(1, 400, 160)  # (3, 48, 400)
    B, n, win = frames.shape
    window = features._window_cpu("povey", 400, 0.42, torch.float32)
    means = frames.mean(dim=-1)
    buf = torch.full((B * n, 512), 123.0)
    lib.lobes_fbank_frames(wav.data_ptr(), wav.shape[1], 160, n, 0, B * n, win, means.data_ptr(), n, 0.97,
                           window.data_ptr(), buf.data_ptr(), 512)
    z = frames - means.unsqueeze(-1)  # torchaudio's operations, in its order
    prev = torch.cat([z[..., :1], z[..., :-1]], dim=-1)
    ref = ((z - 0.97 * prev) * window).reshape(B * n, win)
    assert torch.equal(buf[:, :win], ref)
    assert (buf[:, win:] == 123.0).all()  # the zero padding of the FFT buffer is left alone


@needs_compiler
@pytest.mark.parametrize(
    "opts",
    [
        BEATS_OPTS,
        dict(num_mel_bins=40, window_type="hamming", frame_length=20, frame_shift=12),
        dict(num_mel_bins=64, window_type="blackman", preemphasis_coefficient=0.0, remove_dc_offset=False),
        dict(num_mel_bins=80, window_type="rectangular", use_power=False),
        dict(num_mel_bins=23, use_log_fbank=False),
        dict(num_mel_bins=80, sample_frequency=8000, low_freq=50, high_freq=-200, round_to_power_of_two=False),
        dict(num_mel_bins=30, sample_frequency=48000, frame_length=50),  # 2048-point FFT, 1024 bins
    ],
)
def test_native_equals_torch_path(opts, path):
    wav = _loud_noise(3, 20000)
    wav[1, 3000:9000] = 0.0  # digital silence: energies under the floor
    native = kaldi_fbank(wav, **opts)
    ref = _torch_path(lambda: kaldi_fbank(wav, **opts))
    assert native.shape == ref.shape
    if opts.get("use_log_fbank", True):
        assert (native - ref).abs().max() < 2e-5
    else:
        assert ((native - ref).abs() / ref.abs().clamp_min(1e-3)).max() < 1e-5


@needs_compiler
def test_native_loud_noise_matches_torchaudio_float32(path):
    wav = _loud_noise(2, 48000)
    ours = kaldi_fbank(wav, **BEATS_OPTS)
    ref = torch.stack([ta_kaldi.fbank(w.unsqueeze(0), **BEATS_OPTS) for w in wav])
    assert (ours - ref).abs().max() < 1e-4


@needs_compiler
def test_native_dither_draws_the_same_noise(path):
    wav = _loud_noise(2, 8000)
    torch.manual_seed(3)
    native = kaldi_fbank(wav, dither=1.0, **BEATS_OPTS)
    torch.manual_seed(3)
    ref = _torch_path(lambda: kaldi_fbank(wav, dither=1.0, **BEATS_OPTS))
    assert (native - ref).abs().max() < 2e-5


@needs_compiler
def test_nan_and_inf_propagate_like_torch(path):
    wav = _loud_noise(2, 8000)
    wav[0, 1000] = float("nan")
    wav[1, 5000] = float("inf")
    native = kaldi_fbank(wav, num_mel_bins=40)
    ref = _torch_path(lambda: kaldi_fbank(wav, num_mel_bins=40))
    assert torch.equal(native.isnan(), ref.isnan())
    assert torch.equal(native.isinf(), ref.isinf())
    finite = native.isfinite()
    assert (native[finite] - ref[finite]).abs().max() < 2e-5


@needs_compiler
@pytest.mark.parametrize("batch, samples", [(8, 64000), (1, 400000), (3, 2000)])
def test_threads_give_the_same_result(threads, path, batch, samples):
    wav = _loud_noise(batch, samples)
    lengths = torch.linspace(1.0, 0.5, batch)
    threads(1)
    one = kaldi_fbank(wav, lengths, **BEATS_OPTS)
    threads(2)
    two = kaldi_fbank(wav, lengths, **BEATS_OPTS)
    assert torch.equal(one, two)  # rows (or, for one long row, stretches of time) split between threads


@needs_compiler
@pytest.mark.parametrize("padded_opts", [dict(), dict(sample_frequency=8000, round_to_power_of_two=False),
                                         dict(sample_frequency=48000, frame_length=50)])
def test_fused_and_block_paths_agree_bit_for_bit(padded_opts, monkeypatch):
    if not _fused_available():
        pytest.skip("no fused path here")
    wav = _loud_noise(5, 30000)
    opts = dict(num_mel_bins=40, **padded_opts)
    fused = kaldi_fbank(wav, **opts)
    monkeypatch.setattr(_native, "fft_matches_torch", lambda lib, padded: False)
    blocks = kaldi_fbank(wav, **opts)
    assert torch.equal(fused, blocks)


@needs_compiler
@pytest.mark.parametrize("padded", [512, 200, 2048])
def test_direct_fft_is_torch_rfft_bit_for_bit(padded):
    lib = _native.fbank_library()
    if not getattr(lib, "has_dfti", False):
        pytest.skip("torch is not built with MKL")
    assert _native.fft_matches_torch(lib, padded)
    x = _loud_noise(130, padded)
    out = torch.empty(130, padded // 2 + 1, dtype=torch.complex64)
    assert lib.lobes_rfft(x.data_ptr(), out.data_ptr(), padded, 130) == 0
    assert torch.equal(out, torch.fft.rfft(x))


@needs_compiler
def test_worker_threads_stay_single_threaded(threads):
    # a worker running torch with the process's thread count would start its own OpenMP team and slow the
    # whole process down; the caller's thread count must be left as it was
    threads(2)
    kaldi_fbank(_loud_noise(8, 64000), **BEATS_OPTS)
    assert torch.get_num_threads() == 2
    pool = features._fbank_pool(2)

    def probe(_):
        torch.empty(1 << 18).fill_(1.0)  # a parallel op: the first one in a thread sets its thread count
        return torch.get_num_threads(), threading.current_thread().name

    seen = list(pool.map(probe, range(8)))
    assert {count for count, _ in seen} == {1}
    assert all(name.startswith("lobes-fbank") for _, name in seen)
    assert torch.get_num_threads() == 2


def _child_fbank(queue):
    torch.set_num_threads(1)  # as in DataLoader workers: OpenMP does not survive a fork
    queue.put(kaldi_fbank(_loud_noise(8, 64000), **BEATS_OPTS).numpy())  # plain pickle, no shared memory


@needs_compiler
def test_forked_child_computes_without_the_parents_threads(threads):
    threads(2)
    ref = kaldi_fbank(_loud_noise(8, 64000), **BEATS_OPTS)  # the parent's pool exists
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_fbank, args=(queue,))
    child.start()
    out = queue.get(timeout=60)
    child.join(timeout=10)
    assert torch.equal(torch.from_numpy(out), ref)


@needs_compiler
def test_pool_of_another_process_is_not_reused(threads, monkeypatch):
    threads(2)
    kaldi_fbank(_loud_noise(8, 64000), **BEATS_OPTS)
    pid, workers, pool = features._POOL
    monkeypatch.setattr(features, "_POOL", (pid + 1, workers, pool))  # as a forked child sees it
    fresh = features._fbank_pool(2)
    assert fresh is not pool and features._POOL[0] == pid
    assert torch.get_num_threads() == 2
    pool.shutdown(wait=False)


def test_fallback_without_compiler(monkeypatch, tmp_path, caplog, fresh_native):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LOBES_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="lobes._native"):
        wav = _loud_noise(2, 8000)
        ours = kaldi_fbank(wav, **BEATS_OPTS)
    status = _native.native_status()["fbank"]
    assert status.startswith("torch: ") and "no-such-compiler" in status
    assert "pure-torch" in caplog.text
    ref = torch.stack([ta_kaldi.fbank(w.unsqueeze(0), **BEATS_OPTS) for w in wav])
    assert (ours - ref).abs().max() < 1e-4


def test_switched_off_by_environment(monkeypatch, tmp_path, fresh_native):
    monkeypatch.setenv("LOBES_NATIVE", "0")
    monkeypatch.setenv("LOBES_CACHE_DIR", str(tmp_path / "cache"))
    assert _native.fbank_library() is None
    assert _native.native_status() == {"fbank": "torch: disabled by LOBES_NATIVE=0"}
    assert not (tmp_path / "cache").exists()


@needs_compiler
def test_build_is_cached_and_atomic(monkeypatch, tmp_path, fresh_native):
    monkeypatch.setenv("LOBES_CACHE_DIR", str(tmp_path / "cache"))
    lib = _native.fbank_library()
    assert isinstance(lib, ctypes.CDLL)
    built = sorted((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
    stamp = built[0].stat().st_mtime_ns
    _native._reset()
    assert _native.fbank_library() is not None  # a later process loads the cached file
    assert sorted((tmp_path / "cache").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp


def test_waveforms_that_require_grad_are_refused():
    wav = _loud_noise(1, 4000).requires_grad_()
    with pytest.raises(ValueError, match="not differentiable"):
        kaldi_fbank(wav, **BEATS_OPTS)
    with torch.no_grad():
        assert kaldi_fbank(wav, **BEATS_OPTS).shape == (1, 23, 128)


@needs_compiler
def test_a_cache_folder_others_can_write_is_not_used(monkeypatch, tmp_path, fresh_native):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("LOBES_CACHE_DIR", str(shared))
    monkeypatch.setattr(_native.tempfile, "gettempdir", lambda: str(tmp_path / "private-tmp"))
    assert _native.fbank_library() is not None
    assert "private-tmp" in _native.native_status()["fbank"]  # built in the fallback folder instead
    assert not list(shared.iterdir())
