"""HyperMixing: parity with speechbrain's module (forward and gradients, submodule by submodule),
padding invariance, linear memory, no length ceiling, argument checks."""

import copy
import itertools

import pytest
import torch
from memory_probe import largest_storage
from speechbrain.nnet import hypermixing as sb_hm

from lobes.attention import sinusoidal_table
from lobes.compat import convert_speechbrain_state_dict
from lobes.hypermixing import HyperMixing, HyperNetwork, ParallelMLPs

D, HYPER = 64, 128
CONFIGS = list(itertools.product([1, 4, 8], [False, True], [False, True]))  # heads, tied, fix_tm_hidden_size


def _pair(heads, tied, fix, d=D, hyper=HYPER):
    ref = sb_hm.HyperMixing(d, hyper, tied=tied, num_heads=heads, fix_tm_hidden_size=fix)
    ours = HyperMixing(d, hyper, tied=tied, num_heads=heads, fix_tm_hidden_size=fix)
    ours.load_state_dict(convert_speechbrain_state_dict(ref.state_dict()))
    return ref, ours


def _padding_mask(lengths, total):
    return torch.arange(total).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)  # (B, L), True = pad


def _close(ours, ref, tol=1e-5):
    """max |ours - ref| <= tol, relative to the reference's scale once that exceeds 1 (float32 rounding
    of sums over many tokens grows with the values themselves)."""
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} > {tol:g} * {scale:.3g}"


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("heads,tied,fix", CONFIGS)
def test_parity_with_speechbrain_forward_and_gradients(heads, tied, fix):
    ref, ours = _pair(heads, tied, fix)
    x = torch.randn(3, 23, D)
    mask = _padding_mask([23, 15, 4], 23)
    grad_out = torch.randn(3, 23, D)
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_()
        out, _ = module(xi, xi, xi, key_padding_mask=mask)
        (out * grad_out).sum().backward()
        results.append((out, xi.grad, dict(module.named_parameters())))
    (out_r, gx_r, p_r), (out_o, gx_o, p_o) = results
    assert (out_o - out_r).abs().max().item() <= 1e-5
    assert (gx_o - gx_r).abs().max().item() <= 1e-5 * max(1.0, gx_r.abs().max().item())
    assert p_r.keys() == p_o.keys()
    for name in p_r:
        _close(p_o[name].grad, p_r[name].grad)


def test_parity_error_no_worse_than_speechbrain_against_float64():
    """Against a float64 oracle, our float32 result is as accurate as speechbrain's float32 result."""
    ref, ours = _pair(4, False, False)
    oracle = copy.deepcopy(ref).double()
    x = torch.randn(2, 200, D)
    grad_out = torch.randn(2, 200, D)
    runs = []
    for module, dtype in ((ref, torch.float32), (ours, torch.float32), (oracle, torch.float64)):
        out, _ = module(x.to(dtype), None, None)
        (out * grad_out.to(dtype)).sum().backward()
        runs.append((out.double(), {n: p.grad.double() for n, p in module.named_parameters()}))
    (o_r, g_r), (o_o, g_o), (o_x, g_x) = runs
    assert (o_o - o_x).abs().max() <= 2 * (o_r - o_x).abs().max() + 1e-6
    for name in g_x:
        err_ours = (g_o[name] - g_x[name]).abs().max()
        err_ref = (g_r[name] - g_x[name]).abs().max()
        assert err_ours <= 4 * err_ref + 1e-5, name


@pytest.mark.parametrize("keep_output_size", [False, True])
def test_parallel_mlps_and_hypernetwork_match_speechbrain(keep_output_size):
    ref = sb_hm.HyperNetwork(D, HYPER, num_heads=4, keep_output_size=keep_output_size)
    ours = HyperNetwork(D, HYPER, num_heads=4, keep_output_size=keep_output_size)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, D)
    for a, b in zip(ours(x), ref(x)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5
    mlps_ref, mlps = ref.w1_gen, ours.w1_gen
    assert isinstance(mlps, ParallelMLPs)
    assert (mlps(x) - mlps_ref(x)).abs().max().item() <= 1e-5


def test_byte_mask_equals_bool_mask():
    _, ours = _pair(4, False, False)
    x = torch.randn(2, 9, D)
    mask = _padding_mask([9, 5], 9)
    a, _ = ours(x, x, x, key_padding_mask=mask)
    b, _ = ours(x, x, x, key_padding_mask=mask.to(torch.uint8))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("heads,tied", [(1, False), (4, True), (8, False)])
def test_padding_invariance(heads, tied):
    net = HyperMixing(D, HYPER, tied=tied, num_heads=heads)
    lengths = [30, 17, 1]
    x = torch.randn(3, 30, D)
    mask = _padding_mask(lengths, 30)
    x_padded = x.masked_fill(mask.unsqueeze(-1), 123.0)  # garbage in the padding must not matter
    batched, _ = net(x_padded, x_padded, x_padded, key_padding_mask=mask)
    for i, n in enumerate(lengths):
        alone, _ = net(x[i : i + 1, :n], None, None)
        assert (batched[i, :n] - alone[0]).abs().max().item() <= 1e-5
        # padded frames give the layer norm's bias, like speechbrain
        if n < 30:
            assert torch.allclose(batched[i, n:], net.layer_norm.bias.expand(30 - n, D))


def test_weights_are_stride0_zeros_without_quadratic_storage():
    net = HyperMixing(D, HYPER, num_heads=4)
    x = torch.randn(2, 500, D)
    _, weights = net(x, x, x)
    assert weights.shape == (2, 500, 500)
    assert weights.stride() == (0, 0, 0)
    assert weights.untyped_storage().nbytes() <= weights.element_size()
    assert not weights.any()


def _largest_allocation(module, x):
    """Largest tensor storage (bytes) created during forward + backward."""
    x = x.clone().requires_grad_()

    def step():
        out, weights = module(x, x, x)
        out.sum().backward()

    return largest_storage(step)


def test_memory_is_linear_in_length():
    B, L, d = 2, 1024, 16
    quadratic = B * L * L * 4  # one float32 (B, L, L) tensor
    x = torch.randn(B, L, d)
    ref = sb_hm.HyperMixing(d, 32, num_heads=2)
    assert _largest_allocation(ref, x) >= quadratic  # the check sees speechbrain's (B, L, L) zeros
    ours = HyperMixing(d, 32, num_heads=2)
    assert _largest_allocation(ours, x) < quadratic / 16  # ours allocates O(B * L * d) at most


def test_long_sequence_beyond_max_length():
    net = HyperMixing(32, 64, num_heads=2, max_length=3000)
    x = torch.randn(1, 8000, 32, requires_grad=True)
    out, weights = net(x, x, x)
    out.sum().backward()
    assert out.shape == (1, 8000, 32) and weights.shape == (1, 8000, 8000)
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    table = net.positional_encoding(x)
    assert torch.allclose(table[0, 7990:], sinusoidal_table(8000, 32)[7990:], atol=1e-6)


def test_gradients_reach_every_parameter():
    for tied in (False, True):
        net = HyperMixing(D, HYPER, tied=tied, num_heads=4)
        x = torch.randn(2, 7, D)
        out, _ = net(x, x, x, key_padding_mask=_padding_mask([7, 3], 7))
        out.square().sum().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("length", [0, 1])
def test_zero_and_one_frame(length):
    ref, ours = _pair(4, False, False)
    x = torch.randn(2, length, D)
    out, weights = ours(x, x, x)
    assert out.shape == (2, length, D) and weights.shape == (2, length, length)
    if length:
        assert (out - ref(x, x, x)[0]).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_output_dim=30, hypernet_size=64, num_heads=4), "input_output_dim"),
        (dict(input_output_dim=32, hypernet_size=66, num_heads=4), "hypernet_size"),
        (dict(input_output_dim=32, hypernet_size=64, num_heads=0), "num_heads"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HyperMixing(**kwargs)


def test_parallel_mlps_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        ParallelMLPs(32, 30, num_mlps=4)


@pytest.mark.parametrize(
    "shape,mask_shape,match",
    [((2, 5), None, "query of shape"), ((2, 5, 16), None, "query of shape"), ((2, 5, 32), (2, 4), "key_padding_mask")],
)
def test_bad_inputs(shape, mask_shape, match):
    net = HyperMixing(32, 64, num_heads=4)
    x = torch.randn(*shape)
    mask = None if mask_shape is None else torch.zeros(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        net(x, x, x, key_padding_mask=mask)
