"""Conversion of speechbrain state dicts (HyperMixing alone and inside a ConformerEncoder)."""

import pytest
import torch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
from speechbrain.nnet.hypermixing import HyperMixing as SBHyperMixing

from lobes.compat import convert_speechbrain_state_dict
from lobes.hypermixing import HyperMixing


def _sb_state(heads=4, tied=False, fix=False):
    return SBHyperMixing(32, 64, tied=tied, num_heads=heads, fix_tm_hidden_size=fix).state_dict()


@pytest.mark.parametrize("tied,fix", [(False, False), (True, True)])
def test_hypermixing_state_dict_converts_and_loads_strictly(tied, fix):
    ref = SBHyperMixing(32, 64, tied=tied, num_heads=4, fix_tm_hidden_size=fix)
    converted = convert_speechbrain_state_dict(ref.state_dict())
    assert "positional_encoding.pe" not in converted
    assert set(converted) == set(ref.state_dict()) - {"positional_encoding.pe"}
    ours = HyperMixing(32, 64, tied=tied, num_heads=4, fix_tm_hidden_size=fix)
    ours.load_state_dict(converted)  # strict
    x = torch.randn(2, 10, 32)
    assert (ours(x, x, x)[0] - ref(x, x, x)[0]).abs().max().item() <= 1e-5


def test_conformer_encoder_state_dict():
    enc = ConformerEncoder(num_layers=2, d_model=32, d_ffn=64, nhead=4, attention_type="hypermixing")
    state = enc.state_dict()
    converted = convert_speechbrain_state_dict(state)
    dropped = {k for k in state if k.endswith("mha_layer.positional_encoding.pe")}
    assert len(dropped) == 2
    assert list(converted) == [k for k in state if k not in dropped]  # order kept, others pass through
    for i, layer in enumerate(enc.layers):
        prefix = f"layers.{i}.mha_layer."
        ours = HyperMixing(32, 64, num_heads=4)
        ours.load_state_dict({k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)})
        x = torch.randn(2, 12, 32)
        assert (ours(x, x, x)[0] - layer.mha_layer(x, x, x)[0]).abs().max().item() <= 1e-5


def test_only_hypermixing_positional_tables_are_dropped():
    """Keys outside HyperMixing modules pass through unchanged, a look-alike table included."""
    pe = SBHyperMixing(32, 64, num_heads=4).state_dict()["positional_encoding.pe"]
    state = {
        **{f"enc.{k}": v for k, v in _sb_state().items()},
        "norm.norm.weight": torch.ones(3),
        "other.positional_encoding.pe": pe,
        "other.weight": torch.zeros(2),
    }
    converted = convert_speechbrain_state_dict(state)
    assert list(converted) == [k for k in state if k != "enc.positional_encoding.pe"]
    assert all(converted[k] is state[k] for k in converted)  # not copied


def _broken(key, value):
    state = dict(_sb_state())
    if value is None:
        del state[key]
    else:
        state[key] = value
    return state


@pytest.mark.parametrize(
    "state,error,match",
    [
        (_broken("hyper.w1_gen.fc1_weights", torch.zeros(4, 8, 9)), ValueError, "fc1_weights"),
        (_broken("hyper.w2_gen.fc2_biases", torch.zeros(4, 7)), ValueError, "w2_gen.fc2_biases"),
        (_broken("layer_norm.weight", torch.zeros(31)), ValueError, "layer_norm.weight"),
        (_broken("positional_encoding.pe", torch.zeros(1, 10, 16)), ValueError, "positional_encoding.pe"),
        (_broken("positional_encoding.pe", torch.randn(1, 10, 32)), ValueError, "sinusoidal"),
        (_broken("hyper.w2_gen.fc1_biases", None), KeyError, "missing"),
        (_broken("hyper.w3_gen.fc1_weights", torch.zeros(1)), KeyError, "cannot interpret"),
        (_broken("hyper.w1_gen.fc1_biases", [0.0]), TypeError, "expected a tensor"),
    ],
)
def test_errors_name_the_key(state, error, match):
    with pytest.raises(error, match=match):
        convert_speechbrain_state_dict(state)


def test_rejects_a_module():
    with pytest.raises(TypeError, match="state_dict"):
        convert_speechbrain_state_dict(HyperMixing(32, 64))
