"""Weight conversion from speechbrain modules to ours.

``convert_speechbrain_state_dict`` takes the ``state_dict`` of a speechbrain ``HyperMixing`` or of a whole
model that contains HyperMixing modules (for example ``ConformerEncoder(attention_type="hypermixing")``,
where they sit under ``layers.<i>.mha_layer.``) and returns one that ``load_state_dict`` accepts on the
corresponding ``lobes`` modules.

* HyperMixing parameters keep their names (``hyper.w{1,2}_gen.fc{1,2}_{weights,biases}``,
  ``layer_norm.{weight,bias}``); their shapes are checked against each other.
* HyperMixing's positional table ``positional_encoding.pe`` (1, max_length, d) is checked to be the
  sinusoidal table and dropped: ours computes it on demand and keeps it out of the state dict.
* Every other key passes through unchanged: :class:`lobes.conformer.ConformerEncoder` keeps speechbrain's
  submodule names (``layers.N.mha_layer``, ``convolution_module``, ``ffn_module1`` ...).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Mapping

import torch

from lobes.attention import sinusoidal_table

__all__ = ["convert_speechbrain_state_dict"]

logger = logging.getLogger(__name__)

_HYPER_KEY = re.compile(r"(?P<prefix>(?:.+\.)?)hyper\.(?P<rest>.+)")
_HYPER_PARAM = re.compile(r"w(?P<gen>[12])_gen\.(?P<name>fc[12]_(?:weights|biases))")
_OWN_KEYS = ("layer_norm.weight", "layer_norm.bias", "positional_encoding.pe")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_hypermixing(prefix: str, params: dict[str, torch.Tensor]) -> int:
    """Check the shapes of one HyperMixing's parameters (names relative to ``prefix``); returns d."""
    where = f"HyperMixing at '{prefix or '<root>'}'"
    for gen in ("w1_gen", "w2_gen"):
        missing = [
            n for n in ("fc1_weights", "fc1_biases", "fc2_weights", "fc2_biases") if f"hyper.{gen}.{n}" not in params
        ]
        if missing:
            raise KeyError(f"{where}: missing {', '.join(f'{prefix}hyper.{gen}.{n}' for n in missing)}")
    w1 = params["hyper.w1_gen.fc1_weights"]
    if w1.dim() != 3:
        raise ValueError(f"{where}: hyper.w1_gen.fc1_weights must be (heads, d/heads, d/heads), got {_shape(w1)}")
    heads, hidden, d_head = w1.shape
    out = params["hyper.w1_gen.fc2_weights"].shape[1] if params["hyper.w1_gen.fc2_weights"].dim() == 3 else -1
    expected = {
        "fc1_weights": (heads, hidden, d_head),
        "fc1_biases": (heads, hidden),
        "fc2_weights": (heads, out, hidden),
        "fc2_biases": (heads, out),
    }
    for gen in ("w1_gen", "w2_gen"):
        for name, shape in expected.items():
            got = _shape(params[f"hyper.{gen}.{name}"])
            if got != shape:
                raise ValueError(f"{where}: {prefix}hyper.{gen}.{name} has shape {got}, expected {shape}")
    d = heads * d_head
    if hidden != d_head:
        raise ValueError(f"{where}: hypernetwork hidden size per head ({hidden}) must equal d/heads ({d_head})")
    for name in ("layer_norm.weight", "layer_norm.bias"):
        if name not in params:
            raise KeyError(f"{where}: missing {prefix}{name}")
        if _shape(params[name]) != (d,):
            raise ValueError(f"{where}: {prefix}{name} has shape {_shape(params[name])}, expected ({d},)")
    pe = params.get("positional_encoding.pe")
    if pe is not None:
        if pe.dim() != 3 or pe.size(0) != 1 or pe.size(2) != d:
            raise ValueError(
                f"{where}: {prefix}positional_encoding.pe has shape {_shape(pe)}, expected (1, max_length, {d})"
            )
        rows = min(pe.size(1), 256)
        reference = sinusoidal_table(rows, d)
        if not torch.allclose(pe[0, :rows].float().cpu(), reference, atol=1e-4):
            raise ValueError(
                f"{where}: {prefix}positional_encoding.pe is not the sinusoidal table that HyperMixing computes; "
                "it cannot be dropped safely"
            )
    return d


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def convert_speechbrain_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Convert a speechbrain ``HyperMixing`` (or a model containing some) state dict to ours.

    Arguments
    ---------
    state_dict : Mapping[str, torch.Tensor]
        speechbrain ``state_dict()`` (of a ``HyperMixing``, a ``ConformerEncoder`` with
        ``attention_type="hypermixing"``, or any model holding HyperMixing modules).

    Returns
    -------
    OrderedDict[str, torch.Tensor]
        The same tensors (not copied) under the same names, in the same order, without the positional
        tables of HyperMixing modules.

    Raises
    ------
    TypeError
        If ``state_dict`` is not a mapping of names to tensors.
    KeyError, ValueError
        If a HyperMixing module's keys are incomplete, unknown or have inconsistent shapes.

    Example
    -------
    >>> from lobes.hypermixing import HyperMixing
    >>> src = HyperMixing(64, 128, num_heads=4).state_dict()
    >>> src["positional_encoding.pe"] = torch.zeros(1, 10, 64)
    >>> src["positional_encoding.pe"][0] = sinusoidal_table(10, 64)
    >>> converted = convert_speechbrain_state_dict(src)
    >>> HyperMixing(64, 128, num_heads=4).load_state_dict(converted)
    <All keys matched successfully>
    >>> len(converted)
    10
    """
    if isinstance(state_dict, torch.nn.Module):
        raise TypeError("convert_speechbrain_state_dict: pass module.state_dict(), not the module")
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"convert_speechbrain_state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}"
        )
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(
                f"convert_speechbrain_state_dict: entry {key!r} is a {type(value).__name__}, expected a tensor "
                "(pass the model's state dict, not a whole checkpoint)"
            )

    # find HyperMixing modules by their hypernetwork keys
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _HYPER_KEY.fullmatch(key)
        if m is None:
            continue
        prefix, rest = m.group("prefix"), m.group("rest")
        if _HYPER_PARAM.fullmatch(rest) is None:
            raise KeyError(
                f"convert_speechbrain_state_dict: cannot interpret {key!r}; expected "
                f"'{prefix}hyper.w{{1,2}}_gen.fc{{1,2}}_{{weights,biases}}'"
            )
        modules.setdefault(prefix, {})["hyper." + rest] = value
    for key, value in state_dict.items():
        for prefix in modules:
            if key.startswith(prefix) and key[len(prefix) :] in _OWN_KEYS:
                modules[prefix][key[len(prefix) :]] = value
    for prefix, params in modules.items():
        _check_hypermixing(prefix, params)

    tables = {prefix + "positional_encoding.pe" for prefix in modules}  # constant buffers ours computes
    converted = OrderedDict((key, value) for key, value in state_dict.items() if key not in tables)
    logger.debug(
        "converted %d HyperMixing modules, dropped %d positional tables", len(modules), len(state_dict) - len(converted)
    )
    return converted
