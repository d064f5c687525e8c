"""Compiled chunk-causal kernels (lobes/csrc/causal_mixing.c): equal to the pure-torch kernels (output and every
gradient, any chunk size, padding, several blocks), GELU accuracy over the whole float range the running sums
reach, and the build: cached, refused folders, a missing compiler or LOBES_NATIVE=0 fall back to torch."""

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from lobes import _native
from lobes.hypermixing import ChunkCausalHyperMixing, _causal_core, _native_core, _native_core_backward


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A private kernel cache and no library loaded yet; the loaded set is forgotten again afterwards."""
    monkeypatch.setenv("LOBES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LOBES_NATIVE", raising=False)
    _native._reset()
    yield tmp_path / "cache"
    _native._reset()


def _library():
    lib = _native.library("causal_mixing")
    if lib is None:
        pytest.skip(f"native kernels unavailable here: {_native.native_status()}")
    return lib


def _step(mixer, x, mask, weights):
    mixer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = mixer(x, x, x, key_padding_mask=mask)[0]
    (out * weights).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in mixer.parameters()]


@pytest.mark.parametrize(
    "chunk,tied,fix,block",
    [(1, False, False, 7), (2, True, False, 6), (3, False, True, 1000), (5, False, False, 9), (16, False, False, 20)],
)
def test_native_kernels_equal_the_torch_kernels(monkeypatch, chunk, tied, fix, block):
    """The same mixer, the same batch (padded sequences, lengths not a multiple of the chunk, several blocks):
    the compiled kernels and the pure-torch ones give the same output and gradients."""
    _library()
    torch.manual_seed(chunk)
    mixer = ChunkCausalHyperMixing(24, 48, tied=tied, num_heads=2, fix_tm_hidden_size=fix, chunk_size=chunk)
    mixer._native_block_frames = block
    mixer._native_below_chunk = 10**6  # the compiled kernels for every chunk size
    x = torch.randn(3, 53, 24) * 2.0
    mask = torch.arange(53).unsqueeze(0) >= torch.tensor([53, 37, 4]).unsqueeze(1)
    weights = torch.randn(3, 53, 24)
    out, grads = _step(mixer, x, mask, weights)
    assert _native.native_status()["causal_mixing"].startswith("native:")
    monkeypatch.setenv("LOBES_NATIVE", "0")
    _native._reset()
    try:
        ref_out, ref_grads = _step(mixer, x, mask, weights)
        assert _native.native_status()["causal_mixing"].startswith("torch: disabled")
    finally:
        monkeypatch.delenv("LOBES_NATIVE")
        _native._reset()
    assert (out - ref_out).abs().max() <= 1e-5
    for g, ref in zip(grads, ref_grads):
        assert (g - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("chunk", [1, 3])
def test_native_core_and_backward_equal_the_torch_core(chunk):
    """The kernels alone against :func:`_causal_core` and autograd through it, with running sums from tiny
    (subnormal products) to large (saturated GELU), a start state and a carried gradient."""
    lib = _library()
    g = torch.Generator().manual_seed(chunk)
    Z, T, dh, hs = 3, 29, 5, 16
    x = torch.randn(Z, T, dh, generator=g) * torch.logspace(-20, 1, T).view(1, T, 1)
    w1 = torch.randn(Z, T, hs, generator=g) * 3.0
    w2 = torch.randn(Z, T, hs, generator=g)
    start = torch.randn(Z, dh, hs, generator=g)
    later = torch.randn(Z, dh, hs, generator=g)
    grad_out = torch.randn(Z, T, dh, generator=g)
    out, state = _native_core(lib, x, w1, w2, start, chunk)
    pad = (-T) % chunk
    leaves = [t.double().requires_grad_() for t in (x, w1, w2, start)]
    xa, w1a, w2a = (F.pad(t, (0, 0, 0, pad)) for t in leaves[:3])
    ref, _, _ = _causal_core(xa, w1a, w2a, leaves[3], chunk, chunk)
    ref = ref[:, :T]
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(state.double(), leaves[3] + torch.einsum("ztc,zto->zco", leaves[0], leaves[1]), atol=1e-4)
    # the gradient carried in from later chunks reaches every frame through the final running sum
    (ref * grad_out.double()).sum().backward()
    final = leaves[3] + torch.einsum("ztc,zto->zco", leaves[0], leaves[1])
    extra = torch.autograd.grad((final * later.double()).sum(), leaves, allow_unused=True)
    gx, gw1, gw2, carried = _native_core_backward(lib, x, w1, w2, start, later.clone(), grad_out, chunk)
    for mine, leaf, add in zip((gx, gw1, gw2), leaves, extra):
        expected = leaf.grad + (0 if add is None else add)
        assert (mine.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert carried.shape == later.shape


def test_native_gelu_accuracy():
    """One frame, one hidden unit per channel: the output is gelu(x) itself, within 1e-6 relative or 5e-7
    absolute of the exact GELU (float64) from -100 to 100, subnormal-sized inputs included (torch's own float32
    GELU is off by up to 9.6e-7 there)."""
    lib = _library()
    v = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([1e-39, -1e-39, 1e-30, -7.5, 7.5, 0.0])])
    n = v.numel()
    out, _ = _native_core(lib, v.view(1, 1, n), torch.ones(1, 1, 1), torch.ones(1, 1, 1), torch.zeros(1, n, 1), 1)
    exact = F.gelu(v.double())
    err = (out.view(-1).double() - exact).abs()
    assert (err <= torch.maximum(1e-6 * exact.abs(), torch.full_like(exact, 5e-7))).all(), err.max()


def test_build_is_cached_and_private(fresh_native, caplog):
    with caplog.at_level(logging.INFO, logger="lobes._native"):
        _library()
    built = list(fresh_native.glob("causal_mixing-*.so"))
    assert len(built) == 1
    assert f"native causal_mixing kernels: {built[0]}" in caplog.text
    assert (fresh_native.stat().st_mode & 0o777) == 0o700
    stamp = built[0].stat().st_mtime_ns
    _native._reset()
    assert _native.library("causal_mixing") is not None
    assert [p.stat().st_mtime_ns for p in fresh_native.glob("causal_mixing-*.so")] == [stamp]  # not rebuilt


@pytest.mark.parametrize(
    "setting,reason",
    [({"LOBES_NATIVE": "0"}, "disabled by LOBES_NATIVE=0"), ({"CC": "/nonexistent/cc"}, "does not run")],
)
def test_fallback_without_kernels(fresh_native, monkeypatch, caplog, setting, reason):
    """No kernels (switched off, or no working compiler): a log line says why, and the mixer trains on its torch
    kernels with the same results."""
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    mixer = ChunkCausalHyperMixing(16, 32, num_heads=2, chunk_size=1)
    x = torch.randn(2, 12, 16, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="lobes._native"):
        out = mixer(x, x, x)[0]
    assert _native.library("causal_mixing") is None
    assert reason in _native.native_status()["causal_mixing"] and reason in caplog.text
    out.sum().backward()
    with torch.no_grad():
        streamed = mixer.forward_chunk(x)[0]
    assert (out - streamed).abs().max() <= 1e-5 and torch.isfinite(x.grad).all()


def test_a_folder_others_may_write_is_not_used(fresh_native):
    fresh_native.mkdir(mode=0o700)
    os.chmod(fresh_native, 0o777)
    lib = _native.library("causal_mixing")
    assert not list(fresh_native.glob("*.so"))  # nothing built or loaded from there
    if lib is not None:  # built in the per-user temporary folder instead
        assert "lobes-" in _native.native_status()["causal_mixing"]


def test_unknown_kernel_name_is_refused():
    with pytest.raises(ValueError, match="unknown native kernel 'nope'"):
        _native.library("nope")
