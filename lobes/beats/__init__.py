"""BEATs (arXiv 2212.09058): encoder, Microsoft checkpoint I/O, AudioSet tagging, pooling over valid tokens.

``lobes.beats.config`` holds ``BEATsConfig``; ``lobes.beats.checkpoint`` safe checkpoint loading and the
check of a checkpoint's cfg against its weights; ``lobes.beats.model`` the encoder; ``lobes.beats.pooling``
the token masks, pooling modules and the tagging utility; ``lobes.beats.loading`` the model and layer
choice of the commands; ``lobes.beats.labels`` class names. Everything is importable from ``lobes.beats``.
"""

from lobes.beats.checkpoint import (
    BEATsCheckpointError,
    check_config_against_weights,
    config_from_weights,
    load_checkpoint,
)
from lobes.beats.config import BEATsConfig
from lobes.beats.labels import label_names, read_audioset_names
from lobes.beats.loading import layer_index, load_beats, parse_layer, read_config
from lobes.beats.model import FBANK_MEAN, FBANK_STD, LOUD_INPUT_PEAK, BEATs
from lobes.beats.pooling import (
    NUM_MEL_BINS,
    AttentivePooling,
    WeightedLayerSum,
    masked_mean,
    min_num_samples,
    token_padding_mask,
    top_k_labels,
    valid_token_counts,
)

__all__ = [
    "FBANK_MEAN",
    "FBANK_STD",
    "LOUD_INPUT_PEAK",
    "NUM_MEL_BINS",
    "AttentivePooling",
    "BEATs",
    "BEATsCheckpointError",
    "BEATsConfig",
    "WeightedLayerSum",
    "check_config_against_weights",
    "config_from_weights",
    "label_names",
    "layer_index",
    "load_beats",
    "load_checkpoint",
    "masked_mean",
    "min_num_samples",
    "parse_layer",
    "read_audioset_names",
    "read_config",
    "token_padding_mask",
    "top_k_labels",
    "valid_token_counts",
]
