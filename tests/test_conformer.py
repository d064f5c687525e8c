"""Conformer encoder with injected token mixers: shapes, masks, padding invariance, speechbrain parity."""

import functools

import pytest
import torch
from speechbrain.lobes.models.transformer import Conformer as sb_conformer
from speechbrain.nnet.attention import RelPosEncXL, RelPosMHAXL

from lobes.attention import MultiDConvHeadAttention, MultiHeadAttention
from lobes.conformer import (
    ConformerEncoder,
    ConformerEncoderLayer,
    ConvolutionModule,
    hyperconformer_encoder,
)
from lobes.hypermixing import HyperMixing
from lobes.masks import lengths_to_padding_mask

D, FFN, H = 16, 32, 2
TOL = 1e-5


def _mixers():
    """name -> (mixer factory, relative position encoding or None)."""
    return {
        "hypermixing": (functools.partial(HyperMixing, D, FFN, num_heads=H), None),
        "mha": (functools.partial(MultiHeadAttention, H, D), None),
        "relpos_mha": (functools.partial(RelPosMHAXL, D, H), RelPosEncXL(D)),
        "primer_dconv": (functools.partial(MultiDConvHeadAttention, H, D), None),
        "primer_dconv_causal": (functools.partial(MultiDConvHeadAttention, H, D, causal=True), None),
    }


@pytest.mark.parametrize("name", list(_mixers()))
@pytest.mark.parametrize("length", [1, 2, 13])
def test_shapes(name, length):
    factory, pos = _mixers()[name]
    enc = ConformerEncoder(2, D, FFN, factory, kernel_size=5, pos_encoding=pos).eval()
    out, weights = enc(torch.randn(3, length, D))
    assert out.shape == (3, length, D)
    assert weights == []
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(_mixers()))
def test_padding_invariance(name):
    factory, pos = _mixers()[name]
    enc = ConformerEncoder(2, D, FFN, factory, kernel_size=5, pos_encoding=pos).eval()
    lengths = [17, 9, 3, 1]
    x = torch.randn(len(lengths), max(lengths), D)
    x_pad = x.clone()
    for i, n in enumerate(lengths):
        x_pad[i, n:] = 1e3 * torch.randn(max(lengths) - n, D)  # garbage in padding must not matter
    batched, _ = enc(x_pad, src_key_padding_mask=lengths_to_padding_mask(torch.tensor(lengths), max(lengths)))
    for i, n in enumerate(lengths):
        alone, _ = enc(x[i : i + 1, :n])
        assert (batched[i, :n] - alone[0]).abs().max().item() <= TOL, f"{name}: row {i} depends on padding"


def test_speechbrain_encoder_leaks_padding_ours_does_not():
    """The reason for our masking: speechbrain's HyperConformer lets padding reach valid frames."""
    torch.manual_seed(0)
    sb = sb_conformer.ConformerEncoder(2, D, FFN, H, kernel_size=5, attention_type="hypermixing").eval()
    x = torch.randn(2, 12, D)
    mask = lengths_to_padding_mask(torch.tensor([12, 6]), 12)
    leak = (sb(x, src_key_padding_mask=mask)[0][1, :6] - sb(x[1:, :6])[0][0]).abs().max().item()
    assert leak > 1e-3


def test_mixer_injection_module_is_copied_per_layer():
    enc = ConformerEncoder(3, D, FFN, HyperMixing(D, FFN, num_heads=H), kernel_size=3)
    mixers = [layer.mha_layer for layer in enc.layers]
    assert len({id(m) for m in mixers}) == 3
    assert all(isinstance(m, HyperMixing) for m in mixers)
    with pytest.raises(TypeError, match="mixer"):
        ConformerEncoder(2, D, FFN, "hypermixing")
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        enc(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        enc(torch.randn(2, 5, D), src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_convolution_module_matches_speechbrain():
    torch.manual_seed(1)
    sb = sb_conformer.ConvolutionModule(D, 7).eval()
    ours = ConvolutionModule(D, 7).eval()
    ours.load_state_dict(sb.state_dict())
    x = torch.randn(2, 11, D)
    assert (sb(x) - ours(x)).abs().max().item() <= TOL


@pytest.mark.parametrize("causal", [False, True])
def test_convolution_module_gradients_match_speechbrain(causal):
    """Training path (depthwise convolution with its own gradients) against speechbrain's module: outputs
    and the gradients of the input and of every parameter."""
    torch.manual_seed(4)
    sb = sb_conformer.ConvolutionModule(D, 7, causal=causal)
    ours = ConvolutionModule(D, 7, causal=causal)
    ours.load_state_dict(sb.state_dict())
    x = torch.randn(3, 13, D, requires_grad=True)
    target = torch.randn(3, 13, D)
    outs, grads = [], []
    for module in (sb, ours):
        out = module(x)
        grads.append(torch.autograd.grad((out * target).sum(), [x, *module.parameters()]))
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max().item() <= TOL
    names = ["input"] + [name for name, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads[0], grads[1]):
        assert (a - b).abs().max().item() <= TOL * max(1.0, a.abs().max().item()), name


def test_convolution_module_gradients_ignore_padding():
    """A padded row's gradients (input and kernel) equal those of the row alone."""
    torch.manual_seed(6)
    module = ConvolutionModule(D, 7)
    x = torch.randn(2, 10, D)
    x[1, 4:] = 1e3
    mask = lengths_to_padding_mask(torch.tensor([10, 4]), 10)
    grads = []
    for inputs, pad in ((x, mask), (x[1:, :4], None)):
        inputs = inputs.clone().requires_grad_()
        out = module(inputs, pad)
        row = out[-1, :4]
        g_in, g_kernel = torch.autograd.grad(row.square().sum(), [inputs, module.conv.weight])
        grads.append((g_in[-1, :4], g_kernel))
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= TOL * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("batch", [1, 3])
def test_convolution_module_under_bf16_autocast(batch):
    """The depthwise convolution runs in float32 under autocast (oneDNN's bfloat16 kernel in that layout
    stalls on a batch of one): bfloat16 accuracy, gradients everywhere, the input's dtype kept."""
    torch.manual_seed(5)
    module = ConvolutionModule(D, 15)
    x = torch.randn(batch, 70, D, requires_grad=True)
    ref = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert (out.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    out.float().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())
    half = ConvolutionModule(D, 15).to(torch.bfloat16)
    assert half(x.detach().to(torch.bfloat16)).dtype == torch.bfloat16


def test_layer_matches_speechbrain_submodule_by_submodule():
    torch.manual_seed(2)
    sb = sb_conformer.ConformerEncoderLayer(D, FFN, H, kernel_size=5, attention_type="regularMHA").eval()
    ours = ConformerEncoderLayer(D, FFN, MultiHeadAttention(H, D), kernel_size=5).eval()
    x = torch.randn(2, 9, D)
    for name in ["ffn_module1", "ffn_module2", "norm1", "norm2", "convolution_module"]:
        getattr(ours, name).load_state_dict(getattr(sb, name).state_dict())
        assert (getattr(ours, name)(x) - getattr(sb, name)(x)).abs().max().item() <= TOL, name


def test_hyperconformer_encoder_matches_speechbrain_after_conversion():
    from lobes.compat import convert_speechbrain_state_dict

    torch.manual_seed(3)
    sb = sb_conformer.ConformerEncoder(3, 24, 48, 4, kernel_size=7, attention_type="hypermixing").eval()
    ours = hyperconformer_encoder(3, 24, 48, 4, kernel_size=7).eval()
    ours.load_state_dict(convert_speechbrain_state_dict(sb.state_dict()))
    for length in (1, 5, 40):
        x = torch.randn(2, length, 24)
        assert (ours(x)[0] - sb(x)[0]).abs().max().item() <= TOL


def test_attention_weights_are_collected_when_asked():
    enc = ConformerEncoder(2, D, FFN, functools.partial(MultiHeadAttention, H, D), kernel_size=3).eval()
    _, weights = enc(torch.randn(1, 6, D), return_attn_weights=True)
    assert len(weights) == 2


def test_gradients_reach_every_parameter():
    enc = hyperconformer_encoder(2, D, FFN, H, kernel_size=3)
    mask = lengths_to_padding_mask(torch.tensor([8, 5]), 8)
    out, _ = enc(torch.randn(2, 8, D), src_key_padding_mask=mask)
    out[~mask].sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, missing
