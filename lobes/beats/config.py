"""BEATs hyper-parameters (``BEATsConfig``), with Microsoft's field names and defaults.

The fields fall into three groups, which matters when a checkpoint's ``cfg`` lacks one of them:

* :data:`WEIGHT_FIELDS` can be read back from the weights' shapes and key names (widths, depth, patch size,
  bucket count, which optional modules exist); a wrong value is caught when the checkpoint loads;
* :data:`HIDDEN_FORWARD_FIELDS` change the forward pass but leave no trace in the weights (activation,
  norm placement, deep-norm scaling, maximum relative distance, and the head count when no per-head
  parameter exists); a missing one has to be assumed;
* the rest only act during training (dropouts, layer drop, layer-wise gradient decay).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["HIDDEN_FORWARD_FIELDS", "WEIGHT_FIELDS", "BEATsConfig"]

logger = logging.getLogger(__name__)

WEIGHT_FIELDS = (
    "input_patch_size",
    "embed_dim",
    "conv_bias",
    "encoder_layers",
    "encoder_embed_dim",
    "encoder_ffn_embed_dim",
    "encoder_attention_heads",
    "conv_pos",
    "conv_pos_groups",
    "relative_position_embedding",
    "num_buckets",
    "gru_rel_pos",
    "finetuned_model",
    "predictor_class",
)
"""Fields that a state dict reveals (``encoder_attention_heads`` only through the relative-position
table or the gate parameters, ``num_buckets`` only with relative positions)."""

HIDDEN_FORWARD_FIELDS = (
    "activation_fn",
    "layer_norm_first",
    "deep_norm",
    "max_distance",
    "encoder_attention_heads",
)
"""Fields that change the computation of a loaded model but cannot be read from its weights
(``encoder_attention_heads`` only when no per-head parameter exists, ``max_distance`` only with relative
positions)."""


class BEATsConfig:
    """BEATs hyper-parameters, with the field names and defaults of Microsoft's ``BEATsConfig``.

    The defaults are those of the reference code (not of a released model); released checkpoints carry
    their full configuration. :meth:`released` returns the released architecture (iter1/2/3, iter3+).

    Arguments
    ---------
    cfg : dict, optional
        Values overriding the defaults (e.g. a checkpoint's ``"cfg"``). Unknown keys are kept (and
        saved back) but unused.
    **overrides
        Further overrides as keyword arguments.

    Example
    -------
    >>> cfg = BEATsConfig(encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4)
    >>> cfg.encoder_layers, BEATsConfig.released().deep_norm
    (2, True)
    """

    _DEFAULTS: dict[str, Any] = {
        "input_patch_size": 16,
        "embed_dim": 512,
        "conv_bias": False,
        "encoder_layers": 12,
        "encoder_embed_dim": 768,
        "encoder_ffn_embed_dim": 3072,
        "encoder_attention_heads": 12,
        "activation_fn": "gelu",
        "layer_wise_gradient_decay_ratio": 1.0,
        "layer_norm_first": False,
        "deep_norm": False,
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "dropout_input": 0.0,
        "conv_pos": 128,
        "conv_pos_groups": 16,
        "relative_position_embedding": False,
        "num_buckets": 320,
        "max_distance": 1280,
        "gru_rel_pos": False,
        "finetuned_model": False,
        "predictor_dropout": 0.1,
        "predictor_class": 527,
    }
    _RELEASED: dict[str, Any] = {
        "deep_norm": True,
        "relative_position_embedding": True,
        "max_distance": 800,
        "gru_rel_pos": True,
    }

    def __init__(self, cfg: dict | None = None, **overrides: Any) -> None:
        self.__dict__.update(self._DEFAULTS)
        if cfg is not None:
            self.update(cfg)
        if overrides:
            self.update(overrides)

    @classmethod
    def released(cls, **overrides: Any) -> "BEATsConfig":
        """The released BEATs architecture (12 x 768, deep norm, gated relative positions)."""
        return cls({**cls._RELEASED, **overrides})

    @classmethod
    def default(cls, field: str) -> Any:
        """The value assumed for ``field`` when a cfg lacks it (the reference code's default).

        Example
        -------
        >>> BEATsConfig.default("max_distance"), BEATsConfig.released().max_distance
        (1280, 800)
        """
        if field not in cls._DEFAULTS:
            raise KeyError(f"unknown BEATsConfig field {field!r}; expected one of {sorted(cls._DEFAULTS)}")
        return cls._DEFAULTS[field]

    @classmethod
    def fields(cls) -> list[str]:
        """Names of every known field, sorted."""
        return sorted(cls._DEFAULTS)

    def update(self, cfg: "dict | BEATsConfig") -> None:
        """Override fields from a dict (or another config)."""
        if isinstance(cfg, BEATsConfig):
            cfg = cfg.to_dict()
        if not isinstance(cfg, dict):
            raise TypeError(f"BEATs cfg must be a dict or BEATsConfig, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - set(self._DEFAULTS))
        if unknown:
            logger.debug("BEATs cfg: keeping unused keys %s", unknown)
        self.__dict__.update(cfg)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (what a checkpoint's ``"cfg"`` holds)."""
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"BEATsConfig({self.to_dict()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BEATsConfig) and self.to_dict() == other.to_dict()
