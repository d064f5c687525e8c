"""BEATs for the project's commands: a model from a checkpoint or a configuration, and the layer to read.

:func:`load_beats` builds a frozen model in eval mode from a Microsoft-format checkpoint, or a randomly
initialised one (from a fixed seed, with a loud warning) for trying a pipeline without weights.
:func:`parse_layer` and :func:`layer_index` turn a ``--layer`` option (``last``, ``all`` or an index,
negative from the end) into the ``layer`` argument of :meth:`lobes.beats.BEATs.extract_features`.
"""

from __future__ import annotations

import logging
import os

import torch

from lobes.beats.config import BEATsConfig
from lobes.beats.model import BEATs

__all__ = ["layer_index", "load_beats", "parse_layer", "read_config"]

logger = logging.getLogger(__name__)


def read_config(config: str | os.PathLike | dict | BEATsConfig) -> BEATsConfig:
    """A :class:`BEATsConfig` from a YAML file of its fields (e.g. ``hparams/beats_tiny.yaml``) or a dict.

    Fields missing from ``config`` take the released architecture's values.

    Arguments
    ---------
    config : path, dict or BEATsConfig
        YAML file (read with hyperpyyaml, so ``!include`` works) or mapping of ``BEATsConfig`` fields.

    Returns
    -------
    BEATsConfig

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file cannot be parsed, does not hold a mapping, or names fields ``BEATsConfig`` does not know.

    Example
    -------
    >>> read_config({"encoder_layers": 3}).encoder_layers, read_config({}).deep_norm
    (3, True)
    >>> read_config({"encoder_layer": 3})
    Traceback (most recent call last):
    ...
    ValueError: BEATs config {'encoder_layer': 3}: unknown fields ['encoder_layer']; expected BEATsConfig fields ...
    """
    if isinstance(config, BEATsConfig):
        return BEATsConfig(config.to_dict())
    source = config
    if not isinstance(config, dict):
        from hyperpyyaml import load_hyperpyyaml

        if not os.path.isfile(config):
            raise FileNotFoundError(f"BEATs config {config}: no such file")
        try:
            with open(config, encoding="utf-8") as f:
                config = load_hyperpyyaml(f)
        except Exception as exc:  # YAML and hyperpyyaml raise many types
            raise ValueError(
                f"BEATs config {source}: cannot read it as a YAML mapping of BEATsConfig fields "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(config, dict):
            raise ValueError(
                f"BEATs config {source}: expected a YAML mapping of BEATsConfig fields, got {type(config).__name__}"
            )
        config = dict(config)
    unknown = sorted(set(config) - set(BEATsConfig.fields()))
    if unknown:
        raise ValueError(
            f"BEATs config {source}: unknown fields {unknown}; expected BEATsConfig fields {BEATsConfig.fields()}"
        )
    return BEATsConfig.released(**config)


def load_beats(
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | dict | BEATsConfig | None = None,
    *,
    output_all_hiddens: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> BEATs:
    """A frozen BEATs in eval mode, from a checkpoint or (loudly) with random weights.

    Arguments
    ---------
    checkpoint : path, optional
        Microsoft-format checkpoint (``{"cfg", "model"[, "label_dict"]}``). Its cfg is checked against its
        weights (see :func:`lobes.beats.checkpoint.check_config_against_weights`).
    config : path, dict or BEATsConfig, optional
        Only without ``checkpoint``: architecture of the random model (see :func:`read_config`); default
        the released architecture.
    output_all_hiddens : bool
        Return every layer's output, ``(layers + 1, B, T, C)``.
    device : str or torch.device
        Where the model goes.
    seed : int
        Seed of the random weights (the global RNG is left as it was), so two loads give the same model.

    Returns
    -------
    BEATs

    Raises
    ------
    FileNotFoundError
        Missing checkpoint or config file.
    ValueError
        Both ``checkpoint`` and ``config`` given, or a bad config; :class:`lobes.beats.BEATsCheckpointError`
        for an unusable checkpoint.

    Example
    -------
    >>> tiny = {"encoder_layers": 1, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
    ...         "encoder_attention_heads": 4, "embed_dim": 16, "conv_pos": 8, "conv_pos_groups": 2}
    >>> a, b = load_beats(config=tiny), load_beats(config=tiny)
    >>> torch.equal(a.encoder.layers[0].fc1.weight, b.encoder.layers[0].fc1.weight), a.training
    (True, False)
    """
    if checkpoint is not None and config is not None:
        raise ValueError(
            f"a config ({config}) only describes a randomly initialised model; the checkpoint "
            f"{checkpoint} carries its own cfg: pass one or the other"
        )
    if checkpoint is not None:
        model = BEATs(ckp_path=checkpoint, freeze=True, output_all_hiddens=output_all_hiddens)
    else:
        cfg = read_config(config if config is not None else {})
        what = "given config" if isinstance(config, (dict, BEATsConfig)) else str(config or "released architecture")
        logger.warning(
            "No checkpoint given: using a RANDOMLY INITIALISED BEATs (%s, seed %d). Its features are meaningless "
            "except for trying a pipeline out; give a checkpoint for real embeddings.",
            what,
            seed,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BEATs(ckp_path=None, freeze=True, output_all_hiddens=output_all_hiddens, cfg=cfg)
    return model.to(device).eval()


def parse_layer(layer: str | int) -> str | int:
    """Check the form of a layer choice: ``"last"``, ``"all"`` or an integer (as text or int).

    Example
    -------
    >>> parse_layer("last"), parse_layer("-2"), parse_layer(3)
    ('last', -2, 3)
    >>> parse_layer("first")
    Traceback (most recent call last):
    ...
    ValueError: layer 'first': expected 'last', 'all' or an integer (0 = input of the first transformer layer)
    """
    if layer in ("last", "all"):
        return layer
    try:
        return int(layer)
    except (TypeError, ValueError):
        raise ValueError(
            f"layer {layer!r}: expected 'last', 'all' or an integer (0 = input of the first transformer layer)"
        ) from None


def layer_index(layer: str | int, num_layers: int) -> int | None:
    """The ``layer`` argument of :meth:`lobes.beats.BEATs.extract_features` for a layer choice.

    Arguments
    ---------
    layer : str or int
        ``"last"`` or ``"all"`` (both give None: the model's normal output), or an index: 0 = the input of
        the first transformer layer, ``i`` = the output of layer ``i``, negative counts from the end
        (``-1`` = the last layer).
    num_layers : int
        The model's transformer layers (``model.cfg.encoder_layers``).

    Returns
    -------
    int or None
        An index in ``[0, num_layers]``, or None.

    Example
    -------
    >>> layer_index("last", 12), layer_index("3", 12), layer_index(-1, 12), layer_index(-13, 12)
    (None, 3, 12, 0)
    >>> layer_index(13, 12)
    Traceback (most recent call last):
    ...
    ValueError: layer 13: this model has layers 0..12 (0 = input of the first transformer layer, 12 = last)
    """
    choice = parse_layer(layer)
    if choice in ("last", "all"):
        return None
    index = choice + (num_layers + 1 if choice < 0 else 0)
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"layer {layer}: this model has layers 0..{num_layers} (0 = input of the first "
            f"transformer layer, {num_layers} = last)"
        )
    return index
