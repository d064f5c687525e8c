"""Attention family: parity with torch.nn.MultiheadAttention (masks included), speechbrain's wrapper and
positional table; Multi-DConv-Head attention variants, causality and padding invariance; errors."""

import pytest
import torch
from memory_probe import largest_storage
from speechbrain.lobes.models.transformer.Transformer import PositionalEncoding as SBPositionalEncoding
from speechbrain.nnet.attention import MultiheadAttention as SBMultiheadAttention
from speechbrain.nnet.attention import PositionalwiseFeedForward

from lobes.attention import (
    DCONV_VARIANTS,
    MultiDConvHeadAttention,
    MultiHeadAttention,
    PositionalEncoding,
    SquaredReLU,
    squared_relu,
)

# torch.nn.MultiheadAttention warns when the reference is given a float and a bool mask together
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

B, L, S, D, H = 3, 7, 9, 32, 4
TOL = 1e-5


def _padding_mask(lengths, total):
    return torch.arange(total).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)  # (B, T), True = pad


def _masks(kind):
    """(attn_mask, key_padding_mask) for self-attention over L frames."""
    kpm = _padding_mask([L, 5, 3], L)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    float_mask = torch.randn(L, L)
    per_head = torch.rand(B * H, L, L) < 0.3
    per_head[..., 0] = False  # every query keeps one key
    return {
        "none": (None, None),
        "key_padding": (None, kpm),
        "bool_attn": (torch.rand(L, L) < 0.3, None),
        "float_attn": (float_mask, None),
        "causal": (causal, None),
        "causal+padding": (causal, kpm),
        "float+padding": (float_mask, kpm),
        "per_head_bool": (per_head, None),
        "float_key_padding": (None, torch.zeros(B, L).masked_fill(kpm, float("-inf"))),
    }[kind]


# ------------------------------------------------------------------------------------------ MHA
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(
    "kind",
    [
        "none",
        "key_padding",
        "bool_attn",
        "float_attn",
        "causal",
        "causal+padding",
        "float+padding",
        "per_head_bool",
        "float_key_padding",
    ],
)
def test_mha_matches_torch(kind, need_weights):
    ref = torch.nn.MultiheadAttention(D, H, batch_first=True)
    torch.nn.init.normal_(ref.in_proj_bias)
    ours = MultiHeadAttention.from_torch(ref)
    x = torch.randn(B, L, D)
    attn_mask, kpm = _masks(kind)
    out_r, w_r = ref(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=True)
    res = ours(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm, return_attn_weights=need_weights)
    out_o = res[0] if need_weights else res
    assert (out_o - out_r).abs().max().item() <= TOL
    if need_weights:
        assert res[1].shape == (B, L, L)
        assert (res[1] - w_r).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kdim=24, vdim=40),
        dict(bias=False),
        dict(add_bias_kv=True),
        dict(add_zero_attn=True),
        dict(add_bias_kv=True, add_zero_attn=True),
    ],
)
def test_mha_options_match_torch(kwargs):
    ref = torch.nn.MultiheadAttention(D, H, batch_first=True, **kwargs)
    ours = MultiHeadAttention.from_torch(ref)
    q = torch.randn(B, L, D)
    k = torch.randn(B, S, kwargs.get("kdim", D))
    v = torch.randn(B, S, kwargs.get("vdim", D))
    kpm = _padding_mask([S, 6, 2], S)
    out_r, w_r = ref(q, k, v, key_padding_mask=kpm)
    out_o, w_o = ours(q, k, v, key_padding_mask=kpm)
    assert (out_o - out_r).abs().max().item() <= TOL
    assert (w_o - w_r).abs().max().item() <= TOL
    fused = ours(q, k, v, key_padding_mask=kpm, return_attn_weights=False)
    assert (fused - out_r).abs().max().item() <= TOL


def test_mha_loads_speechbrain_wrapper_and_matches_it():
    ref = SBMultiheadAttention(nhead=H, d_model=D)
    ours = MultiHeadAttention(nhead=H, d_model=D).load_from(ref)
    x = torch.randn(B, L, D)
    kpm = _padding_mask([L, 4, 2], L)
    pos = torch.randn(L, L)
    out_r, w_r = ref(x, x, x, key_padding_mask=kpm, pos_embs=pos.clone())
    out_o, w_o = ours(x, x, x, key_padding_mask=kpm, pos_embs=pos)
    assert (out_o - out_r).abs().max().item() <= TOL
    assert (w_o - w_r).abs().max().item() <= TOL
    assert torch.is_tensor(ours(x, x, x, return_attn_weights=False))  # speechbrain returns only the output


def test_mha_fully_masked_rows_are_defined():
    ours = MultiHeadAttention(nhead=H, d_model=D)
    torch.nn.init.normal_(ours.out_proj.bias)
    x = torch.randn(B, L, D)
    attn_mask = torch.zeros(L, L, dtype=torch.bool)
    attn_mask[2] = True  # query 2 may attend to nothing
    kpm = _padding_mask([L, L, 0], L)  # sequence 2 is entirely padding
    for need_weights in (True, False):
        res = ours(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm, return_attn_weights=need_weights)
        out = res[0] if need_weights else res
        assert torch.isfinite(out).all()
        bias = ours.out_proj.bias
        assert torch.allclose(out[:, 2], bias.expand(B, D), atol=1e-6)
        assert torch.allclose(out[2], bias.expand(L, D), atol=1e-6)
        if need_weights:
            assert not res[1][:, 2].any() and not res[1][2].any()


def test_mha_load_from_rejects_other_configurations():
    with pytest.raises(ValueError, match="nhead"):
        MultiHeadAttention(nhead=2, d_model=D).load_from(torch.nn.MultiheadAttention(D, H))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiHeadAttention(nhead=2, d_model=D).load_from(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ DConv
def _dconv(variant, causal, **kw):
    return MultiDConvHeadAttention(nhead=H, d_model=D, variant=variant, causal=causal, **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_dconv_with_identity_kernel_equals_torch_mha(causal):
    """With a delta kernel the convolutions are the identity: the layer is plain (causal) attention."""
    net = _dconv("per_head", causal)
    with torch.no_grad():
        for w in (net.q_dconv, net.k_dconv, net.v_dconv):
            w.zero_()
            w[:, -1 if causal else 1] = 1.0  # tap aligned with the current frame
    ref = torch.nn.MultiheadAttention(D, H, batch_first=True)
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if "dconv" not in k})
    x = torch.randn(B, L, D)
    mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal else None
    out_r, w_r = ref(x, x, x, attn_mask=mask)
    out_o, w_o = net(x, x, x)
    assert (out_o - out_r).abs().max().item() <= TOL
    assert (w_o - w_r).abs().max().item() <= TOL


def test_dconv_variants_are_tied_versions_of_per_head():
    x = torch.randn(B, L, D)
    per_head = _dconv("per_head", False)
    for variant in ("per_channel", "shared"):
        tied = _dconv(variant, False)
        state = {k: v for k, v in per_head.state_dict().items() if "dconv" not in k}
        tied.load_state_dict(state, strict=False)
        expanded = {}
        for name in ("q_dconv", "k_dconv", "v_dconv"):
            w = getattr(tied, name).detach()
            expanded[name] = w.repeat(H, 1) if variant == "per_channel" else w.expand(D, -1).clone()
        per_head_copy = _dconv("per_head", False)
        per_head_copy.load_state_dict({**state, **expanded})
        assert (tied(x, x, x)[0] - per_head_copy(x, x, x)[0]).abs().max().item() <= TOL
    assert _dconv("per_channel", False).q_dconv.shape == (D // H, 3)
    assert _dconv("shared", False).q_dconv.shape == (1, 3)
    assert _dconv("per_head", False).q_dconv.shape == (D, 3)


@pytest.mark.parametrize("variant", DCONV_VARIANTS)
def test_dconv_causal_does_not_see_the_future(variant):
    net = _dconv(variant, True, kernel_size=3)
    x = torch.randn(2, 12, D)
    base = net(x, x, x, return_attn_weights=False)
    for t in (0, 5, 10):
        y = x.clone()
        y[:, t + 1] += 10 * torch.randn(2, D)
        out = net(y, y, y, return_attn_weights=False)
        assert (out[:, : t + 1] - base[:, : t + 1]).abs().max().item() <= 1e-6
        assert (out[:, t + 1] - base[:, t + 1]).abs().max().item() > 1e-3  # the change is seen at t + 1


def test_dconv_non_causal_sees_the_next_frame():
    net = _dconv("per_head", False)
    x = torch.randn(1, 6, D)
    y = x.clone()
    y[:, 3] += 10.0
    assert (net(y, y, y)[0][:, 2] - net(x, x, x)[0][:, 2]).abs().max().item() > 1e-3


def _mixers():
    return [("mha", MultiHeadAttention(nhead=H, d_model=D))] + [
        (f"dconv-{v}-{'causal' if c else 'centred'}", _dconv(v, c)) for v in DCONV_VARIANTS for c in (False, True)
    ]


@pytest.mark.parametrize("name,net", _mixers())
def test_padding_invariance(name, net):
    lengths = [11, 6, 1]
    x = torch.randn(3, 11, D)
    mask = _padding_mask(lengths, 11)
    x_padded = x.masked_fill(mask.unsqueeze(-1), 50.0)
    for need_weights in (True, False):
        res = net(x_padded, x_padded, x_padded, key_padding_mask=mask, return_attn_weights=need_weights)
        batched = res[0] if need_weights else res
        for i, n in enumerate(lengths):
            xi = x[i : i + 1, :n]
            alone = net(xi, xi, xi, return_attn_weights=False)
            assert (batched[i, :n] - alone[0]).abs().max().item() <= TOL, (name, i)


@pytest.mark.parametrize("name,net", _mixers())
def test_gradients_reach_every_parameter(name, net):
    x = torch.randn(2, 8, D)
    out, _ = net(x, x, x, key_padding_mask=_padding_mask([8, 5], 8))
    out.square().sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, (name, pname)


# ------------------------------------------------------------------------------------------ positions
def test_positional_encoding_matches_speechbrain_and_has_no_ceiling():
    ref = SBPositionalEncoding(64, max_len=2500)
    ours = PositionalEncoding(64, max_len=2500)
    x = torch.zeros(1, 2500, 64)
    assert (ours(x) - ref(x)).abs().max().item() <= 1e-6
    long = ours(torch.zeros(2, 8000, 64))
    assert long.shape == (1, 8000, 64)
    assert (long[:, :2500] - ref(x)).abs().max().item() <= 1e-6
    short = PositionalEncoding(64, max_len=10)  # computed on demand equals the precomputed table
    assert (short(torch.zeros(1, 8000, 64)) - long).abs().max().item() <= 1e-6
    assert "pe" not in ours.state_dict()


def test_positional_encoding_errors():
    with pytest.raises(ValueError, match="even"):
        PositionalEncoding(31)
    with pytest.raises(ValueError, match="64 features"):
        PositionalEncoding(64)(torch.zeros(1, 5, 32))


# ------------------------------------------------------------------------------------------ squared ReLU
def test_squared_relu_in_speechbrain_feed_forward():
    x = torch.randn(2, 5, D)
    assert torch.equal(squared_relu(x), torch.relu(x) ** 2)
    ffn = PositionalwiseFeedForward(d_ffn=64, input_size=D, activation=SquaredReLU)
    assert ffn(x).shape == (2, 5, D)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: MultiHeadAttention(nhead=3, d_model=32), "multiple of nhead"),
        (lambda: MultiDConvHeadAttention(nhead=3, d_model=32), "multiple of nhead"),
        (lambda: MultiDConvHeadAttention(nhead=4, d_model=32, variant="depthwise"), "per_head.*shared.*per_channel"),
    ],
)
def test_bad_constructor_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("net", [MultiHeadAttention(nhead=H, d_model=D), _dconv("per_head", True)])
@pytest.mark.parametrize(
    "q_shape,kwargs,match",
    [
        ((B, L), {}, "query"),
        ((B, L, D + 1), {}, "query"),
        ((B, L, D), {"key_padding_mask": torch.zeros(B, L + 1, dtype=torch.bool)}, "key_padding_mask"),
        ((B, L, D), {"attn_mask": torch.zeros(L, L + 2, dtype=torch.bool)}, "attn_mask"),
    ],
)
def test_bad_inputs(net, q_shape, kwargs, match):
    x = torch.randn(*q_shape)
    with pytest.raises(ValueError, match=match):
        net(x, x, x, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_dconv_fused_and_explicit_paths_agree(causal):
    net = _dconv("per_channel", causal)
    x = torch.randn(2, 10, D)
    fused = net(x, x, x, return_attn_weights=False)
    explicit, weights = net(x, x, x)
    assert (fused - explicit).abs().max().item() <= TOL
    if causal:
        assert not weights.triu(1).any()  # no weight on future frames


def test_dconv_cross_attention_shapes():
    net = MultiDConvHeadAttention(nhead=H, d_model=D, kdim=24, vdim=40)
    q, k, v = torch.randn(2, 5, D), torch.randn(2, 9, 24), torch.randn(2, 9, 40)
    out, weights = net(q, k, v, key_padding_mask=_padding_mask([9, 4], 9))
    assert out.shape == (2, 5, D) and weights.shape == (2, 5, 9)
    assert not weights[1, :, 4:].any()


@pytest.mark.parametrize(
    "make", [lambda: MultiHeadAttention(2, 16), lambda: MultiDConvHeadAttention(2, 16)], ids=["mha", "dconv"]
)
def test_fused_path_allocates_nothing_quadratic(make):
    """Without requested weights or masks, attention stays on SDPA's fused path: no (B, H, L, L) scores."""
    module, (B, L) = make(), (2, 1024)
    x = torch.randn(B, L, 16, requires_grad=True)
    largest = largest_storage(lambda: module(x, x, x, return_attn_weights=False).sum().backward())
    assert largest < B * 2 * L * L * 4 / 16
