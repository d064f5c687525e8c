"""BEATs checkpoint files: safe loading, and the check of a checkpoint's ``cfg`` against its weights.

Microsoft's format is ``{"cfg": dict, "model": state dict[, "label_dict": {index: label}]}``. A ``cfg``
that lacks a field silently falls back to the reference default, which may not be what the weights were
trained with: :func:`check_config_against_weights` compares every field the weights reveal (widths, depth,
patch size, bucket count, optional modules) and refuses a mismatch naming the key, and warns about each
missing field that changes the computation but cannot be read from the weights (e.g. ``deep_norm``,
``max_distance``), saying which value is assumed and how to set another.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from lobes.beats.config import HIDDEN_FORWARD_FIELDS, BEATsConfig

__all__ = ["BEATsCheckpointError", "check_config_against_weights", "config_from_weights", "load_checkpoint"]

logger = logging.getLogger(__name__)


class BEATsCheckpointError(ValueError):
    """A file or state dict that is not a loadable BEATs checkpoint (the message names file and key)."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a BEATs checkpoint file safely (``map_location="cpu"``, ``weights_only=True``) and check its form.

    Arguments
    ---------
    path : str or path-like
        A Microsoft BEATs file: a dict with ``"cfg"`` (dict) and ``"model"`` (state dict), plus
        ``"label_dict"`` for AudioSet fine-tuned ones.

    Returns
    -------
    dict
        The checkpoint dict.

    Raises
    ------
    FileNotFoundError
        No such file.
    BEATsCheckpointError
        Unreadable / truncated file, or not a BEATs checkpoint.

    Example
    -------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "other.pt")
    >>> torch.save({"state_dict": {}}, path)
    >>> load_checkpoint(path)
    Traceback (most recent call last):
    ...
    lobes.beats.checkpoint.BEATsCheckpointError: ...: not a BEATs checkpoint: expected a dict with 'cfg' and 'model' ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BEATs checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BEATsCheckpointError(
            f"{path}: cannot read as a torch checkpoint (truncated or not a torch file?): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "cfg" not in ckpt:
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise BEATsCheckpointError(
            f"{path}: not a BEATs checkpoint: expected a dict with 'cfg' and 'model' (and optionally 'label_dict'), "
            f"got {keys}"
        )
    if not isinstance(ckpt["cfg"], dict):
        raise BEATsCheckpointError(
            f"{path}: 'cfg' must be a dict of hyper-parameters, got {type(ckpt['cfg']).__name__}"
        )
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(torch.is_tensor(v) for v in model.values()):
        raise BEATsCheckpointError(f"{path}: 'model' must be a state dict (name -> tensor)")
    return ckpt


def _tensor(state_dict: Mapping[str, Any], key: str, ndim: int) -> Tensor | None:
    value = state_dict.get(key)
    return value if torch.is_tensor(value) and value.dim() == ndim else None


def config_from_weights(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[Any, str]]:
    """The architecture fields that a BEATs state dict determines, each with the key that shows it.

    Arguments
    ---------
    state_dict : mapping
        A BEATs state dict (Microsoft's or SpeechBrain's weight-norm names).

    Returns
    -------
    dict
        ``field -> (value, key)`` for every field of :data:`lobes.beats.config.WEIGHT_FIELDS` that the
        present keys reveal.

    Example
    -------
    >>> from lobes.beats import BEATs
    >>> cfg = BEATsConfig.released(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
    ...                            encoder_attention_heads=4, embed_dim=16, conv_pos=8, conv_pos_groups=2,
    ...                            num_buckets=40)
    >>> found = config_from_weights(BEATs(cfg=cfg).state_dict())
    >>> found["num_buckets"]
    (40, 'encoder.layers.0.self_attn.relative_attention_bias.weight')
    >>> {k: v for k, (v, _) in found.items() if k in ("encoder_layers", "conv_pos_groups")}
    {'encoder_layers': 2, 'conv_pos_groups': 2}
    """
    found: dict[str, tuple[Any, str]] = {}
    key = "patch_embedding.weight"
    if (w := _tensor(state_dict, key, 4)) is not None:  # (E, 1, p, p)
        found["embed_dim"] = (int(w.shape[0]), key)
        found["input_patch_size"] = (int(w.shape[-1]), key)
    found["conv_bias"] = ("patch_embedding.bias" in state_dict, "patch_embedding.bias")
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if layers:
        found["encoder_layers"] = (max(layers) + 1, f"encoder.layers.{max(layers)}.*")
    key = "encoder.layer_norm.weight"
    if (w := _tensor(state_dict, key, 1)) is not None:  # (C,)
        found["encoder_embed_dim"] = (int(w.shape[0]), key)
    key = "encoder.layers.0.fc1.weight"
    if (w := _tensor(state_dict, key, 2)) is not None:  # (ffn, C)
        found["encoder_ffn_embed_dim"] = (int(w.shape[0]), key)
    key = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    found["relative_position_embedding"] = (key in state_dict, key)
    if (w := _tensor(state_dict, key, 2)) is not None:  # (buckets, H)
        found["num_buckets"] = (int(w.shape[0]), key)
        found["encoder_attention_heads"] = (int(w.shape[1]), key)
    key = "encoder.layers.0.self_attn.grep_a"
    found["gru_rel_pos"] = (key in state_dict, key)
    if (w := _tensor(state_dict, key, 4)) is not None:  # (1, H, 1, 1)
        found["encoder_attention_heads"] = (int(w.shape[1]), key)
    for key in ("encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.parametrizations.weight.original1"):
        if (w := _tensor(state_dict, key, 3)) is not None:  # (C, C / groups, K)
            found["conv_pos"] = (int(w.shape[-1]), key)
            channels = int(w.shape[0])
            if w.shape[1] > 0 and channels % w.shape[1] == 0:
                found["conv_pos_groups"] = (channels // int(w.shape[1]), key)
    key = "predictor.weight"
    found["finetuned_model"] = (key in state_dict, key)
    if (w := _tensor(state_dict, key, 2)) is not None:  # (classes, C)
        found["predictor_class"] = (int(w.shape[0]), key)
    return found


def check_config_against_weights(
    config: BEATsConfig, state_dict: Mapping[str, Tensor], given: Iterable[str], source: str = "checkpoint"
) -> None:
    """Refuse a cfg that contradicts the weights; warn about each assumed field the weights cannot confirm.

    Arguments
    ---------
    config : BEATsConfig
        The configuration the model will be built with (checkpoint cfg plus any overrides).
    state_dict : mapping
        The weights to be loaded.
    given : iterable of str
        Fields set explicitly (the checkpoint cfg's keys and the overrides); any other field holds the
        reference default.
    source : str
        Names the checkpoint in messages.

    Raises
    ------
    BEATsCheckpointError
        A field disagrees with the weights; the message names the field, the key that shows it, the value
        the weights imply, and whether the cfg set the field or lacked it.

    Example
    -------
    >>> from lobes.beats import BEATs
    >>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
    ...                            encoder_attention_heads=4, embed_dim=16, conv_pos=8, conv_pos_groups=2,
    ...                            num_buckets=40)
    >>> weights = BEATs(cfg=cfg).state_dict()
    >>> partial = {k: v for k, v in cfg.to_dict().items() if k != "num_buckets"}
    >>> check_config_against_weights(BEATsConfig(partial), weights, partial, "ckpt.pt")
    Traceback (most recent call last):
    ...
    lobes.beats.checkpoint.BEATsCheckpointError: ckpt.pt: cfg has no 'num_buckets', so 320 was assumed, but ...
    """
    given = set(given)
    implied = config_from_weights(state_dict)
    problems = []
    for field, (value, key) in implied.items():
        have = getattr(config, field, None)
        if (bool(have) == value) if isinstance(value, bool) else (have == value):
            continue
        if field in given:
            problems.append(f"cfg {field}={have!r} but the weights ({key}) imply {field}={value!r}")
        else:
            problems.append(
                f"cfg has no {field!r}, so {have!r} was assumed, but the weights ({key}) imply "
                f"{value!r}; add {field!r}: {value!r} to the checkpoint's cfg or pass "
                f"cfg={{{field!r}: {value!r}}} when loading"
            )
    if problems:
        raise BEATsCheckpointError(f"{source}: " + "; ".join(problems))
    for field in HIDDEN_FORWARD_FIELDS:
        if field in given or field in implied:
            continue
        if field == "max_distance" and not config.relative_position_embedding:
            continue
        assumed = getattr(config, field)
        released = BEATsConfig.released().to_dict()[field]
        note = f"; released BEATs checkpoints use {released!r}" if released != assumed else ""
        logger.warning(
            "%s: cfg has no %r, which changes the computation and cannot be read from the weights; assuming "
            "%r (the reference default%s). If the model was trained with another value, add it to the "
            "checkpoint's cfg or pass cfg={%r: ...} when loading.",
            source,
            field,
            assumed,
            note,
            field,
        )
