"""BEATs (arXiv 2212.09058): encoder, Microsoft checkpoint I/O, AudioSet tagging, pooling over valid tokens.

``lobes.beats.model`` holds the encoder and checkpoint I/O; ``lobes.beats.pooling`` the token masks,
pooling modules and the tagging utility. Everything is importable from ``lobes.beats``.
"""

from lobes.beats.model import FBANK_MEAN, FBANK_STD, BEATs, BEATsCheckpointError, BEATsConfig, load_checkpoint
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
    "NUM_MEL_BINS",
    "AttentivePooling",
    "BEATs",
    "BEATsCheckpointError",
    "BEATsConfig",
    "WeightedLayerSum",
    "load_checkpoint",
    "masked_mean",
    "min_num_samples",
    "token_padding_mask",
    "top_k_labels",
    "valid_token_counts",
]
