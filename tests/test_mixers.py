"""The TokenMixer and Encoder protocols: every mixer and encoder implements them, obeys the padding convention
(a sequence alone == the same sequence padded in a batch), and wrong modules are refused with a clear error."""

import functools

import pytest
import torch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder as SBConformerEncoder
from speechbrain.nnet.attention import MultiheadAttention as SBMultiheadAttention
from speechbrain.nnet.attention import RelPosEncXL, RelPosMHAXL
from torch import nn

from lobes.attention import MultiDConvHeadAttention, MultiHeadAttention, SquaredReLU
from lobes.conformer import ConformerEncoder, hyperconformer_encoder
from lobes.hypermixing import HyperMixing
from lobes.masks import lengths_to_padding_mask
from lobes.mixers import Encoder, TokenMixer, check_token_mixer, make_mixers, signature_mismatches
from lobes.transformer import TransformerEncoder

D, FFN, H = 16, 32, 2
TOL = 1e-5
LENGTHS = [11, 7, 3, 1]


def _mixers():
    """name -> (factory, relative position encoding or None)."""
    return {
        "hypermixing": (functools.partial(HyperMixing, D, FFN, num_heads=H), None),
        "mha": (functools.partial(MultiHeadAttention, H, D), None),
        "dconv": (functools.partial(MultiDConvHeadAttention, H, D), None),
        "dconv_causal": (functools.partial(MultiDConvHeadAttention, H, D, causal=True), None),
        "sb_relpos_mha": (functools.partial(RelPosMHAXL, D, H), RelPosEncXL(D)),
        "sb_mha": (functools.partial(SBMultiheadAttention, H, D), None),
    }


def _padded_batch(lengths):
    """Random sequences, garbage in their padding, and the padding mask."""
    x = torch.randn(len(lengths), max(lengths), D)
    garbage = x.clone()
    for i, n in enumerate(lengths):
        garbage[i, n:] = 1e3 * torch.randn(max(lengths) - n, D)  # must not reach valid frames
    return x, garbage, lengths_to_padding_mask(torch.tensor(lengths), max(lengths))


# --------------------------------------------------------------------------------------------- token mixers
@pytest.mark.parametrize("name", list(_mixers()))
def test_mixer_implements_the_protocol(name):
    factory, _ = _mixers()[name]
    mixer = factory()
    assert isinstance(mixer, TokenMixer)
    assert signature_mismatches(mixer, TokenMixer) == []
    assert check_token_mixer(mixer) is mixer


@pytest.mark.parametrize("name", list(_mixers()))
@torch.no_grad()
def test_mixer_return_value(name):
    factory, pos = _mixers()[name]
    mixer = factory().eval()
    x = torch.randn(2, 5, D)
    pos_embs = None if pos is None else pos(x)
    out = mixer(x, x, x, attn_mask=None, key_padding_mask=None, return_attn_weights=True, pos_embs=pos_embs)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == (2, 5, D)
    quiet = mixer(x, x, x, attn_mask=None, key_padding_mask=None, return_attn_weights=False, pos_embs=pos_embs)
    quiet = quiet[0] if isinstance(quiet, tuple) else quiet
    assert torch.allclose(quiet, out[0], atol=TOL)


@pytest.mark.parametrize("name", list(_mixers()))
@torch.no_grad()
def test_mixer_obeys_the_padding_convention(name):
    factory, pos = _mixers()[name]
    mixer = factory().eval()
    x, garbage, mask = _padded_batch(LENGTHS)
    pos_embs = None if pos is None else pos(garbage)
    batched = mixer(
        garbage, garbage, garbage, attn_mask=None, key_padding_mask=mask, return_attn_weights=False, pos_embs=pos_embs
    )
    batched = batched[0] if isinstance(batched, tuple) else batched
    for i, n in enumerate(LENGTHS):
        alone_x = x[i : i + 1, :n]
        alone = mixer(
            alone_x,
            alone_x,
            alone_x,
            attn_mask=None,
            key_padding_mask=None,
            return_attn_weights=False,
            pos_embs=None if pos is None else pos(alone_x),
        )
        alone = alone[0] if isinstance(alone, tuple) else alone
        assert (batched[i, :n] - alone[0]).abs().max().item() <= TOL, f"{name}: row {i} depends on padding"


class _NeedsExtra(nn.Module):
    def forward(
        self,
        query,
        key,
        value,
        attn_mask=None,
        key_padding_mask=None,
        return_attn_weights=True,
        pos_embs=None,
        *,
        scale,
    ):
        return query * scale, None


class _TakesKwargs(nn.Module):
    def forward(self, query, key, value, **kwargs):
        return query, None


def test_signature_check_names_what_is_missing():
    assert signature_mismatches(_TakesKwargs(), TokenMixer) == []
    problems = signature_mismatches(nn.Linear(D, D), TokenMixer)
    assert problems[0] == "forward takes 1 positional argument(s), the call passes 3 (query, key, value)"
    assert "forward has no parameter 'key_padding_mask'" in problems
    assert signature_mismatches(_NeedsExtra(), TokenMixer) == ["forward requires 'scale', which the call does not pass"]
    assert signature_mismatches(object(), TokenMixer) == ["object has no forward method"]
    with pytest.raises(TypeError, match=r"_NeedsExtra is not a token mixer .*'scale'"):
        check_token_mixer(_NeedsExtra())
    with pytest.raises(TypeError, match="must be an nn.Module, got function"):
        check_token_mixer(lambda q, k, v: q)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ConformerEncoder(2, D, FFN, nn.Linear(D, D), kernel_size=3),
        lambda: TransformerEncoder(2, D, FFN, functools.partial(nn.Linear, D, D)),
    ],
)
def test_encoders_refuse_a_module_that_is_not_a_mixer(build):
    with pytest.raises(TypeError, match="Linear is not a token mixer"):
        build()


def test_make_mixers_copies_or_calls():
    module = HyperMixing(D, FFN, num_heads=H)
    copies = make_mixers(module, 3)
    assert copies[0] is module and len({id(m) for m in copies}) == 3
    for m in copies[1:]:
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), module.parameters()))
    made = make_mixers(functools.partial(MultiHeadAttention, H, D), 2)
    assert not torch.equal(made[0].in_proj_weight, made[1].in_proj_weight)  # independent initialisations
    with pytest.raises(ValueError, match="num_layers"):
        make_mixers(module, 0)
    with pytest.raises(TypeError, match="got str"):
        make_mixers("hypermixing", 2)


# --------------------------------------------------------------------------------------------- encoders
ENCODERS = {  # name -> builder; every kind of encoder the project assembles, small
    "hyperconformer": lambda: hyperconformer_encoder(2, D, FFN, H, kernel_size=3),
    "conformer_relpos": lambda: ConformerEncoder(
        2, D, FFN, functools.partial(RelPosMHAXL, D, H), kernel_size=3, pos_encoding=RelPosEncXL(D)
    ),
    "transformer_mha": lambda: TransformerEncoder(2, D, FFN, functools.partial(MultiHeadAttention, H, D)),
    "transformer_primer": lambda: TransformerEncoder(
        2, D, FFN, functools.partial(MultiDConvHeadAttention, H, D), activation=SquaredReLU
    ),
    "transformer_hypermixing": lambda: TransformerEncoder(
        2, D, FFN, functools.partial(HyperMixing, D, FFN, num_heads=H)
    ),
    "transformer_relpos": lambda: TransformerEncoder(
        2, D, FFN, functools.partial(RelPosMHAXL, D, H), pos_encoding=RelPosEncXL(D)
    ),
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_implements_the_protocol(name):
    enc = ENCODERS[name]()
    assert isinstance(enc, Encoder)
    assert signature_mismatches(enc, Encoder) == []


def test_speechbrain_encoder_has_the_same_call():
    enc = SBConformerEncoder(1, D, FFN, H, kernel_size=3, attention_type="hypermixing")
    assert isinstance(enc, Encoder) and signature_mismatches(enc, Encoder) == []


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("length", [1, 2, 13])
@torch.no_grad()
def test_encoder_return_value(name, length):
    enc = ENCODERS[name]().eval()
    out, weights = enc(torch.randn(3, length, D))
    assert out.shape == (3, length, D) and torch.isfinite(out).all()
    assert weights == []
    out_w, weights = enc(torch.randn(3, length, D), return_attn_weights=True)
    assert len(weights) == len(enc.layers) and all(w is not None for w in weights)


@pytest.mark.parametrize("name", list(ENCODERS))
@torch.no_grad()
def test_encoder_obeys_the_padding_convention(name):
    enc = ENCODERS[name]().eval()
    x, garbage, mask = _padded_batch(LENGTHS)
    batched, _ = enc(garbage, src_key_padding_mask=mask)
    for i, n in enumerate(LENGTHS):
        alone, _ = enc(x[i : i + 1, :n])
        assert (batched[i, :n] - alone[0]).abs().max().item() <= TOL, f"{name}: row {i} depends on padding"


def test_transformer_encoder_checks_its_input():
    enc = TransformerEncoder(1, D, FFN, functools.partial(MultiHeadAttention, H, D))
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        enc(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        enc(torch.randn(2, 5, D), src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_transformer_encoder_state_dict_layout():
    """The names trained checkpoints hold (kept when the class moved to lobes.transformer)."""
    keys = set(TransformerEncoder(1, D, FFN, functools.partial(MultiHeadAttention, H, D)).state_dict())
    assert {
        "layers.0.norm1.weight",
        "layers.0.mixer.in_proj_weight",
        "layers.0.ffn.0.weight",
        "layers.0.ffn.1.ffn.0.weight",
        "layers.0.ffn.1.ffn.3.weight",
        "norm.weight",
    } <= keys
