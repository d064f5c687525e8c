"""BEATs (arXiv 2212.09058): encoder, acoustic tokenizer, Microsoft checkpoint I/O, AudioSet tagging, pooling.

``lobes.beats.config`` holds ``BEATsConfig``; ``lobes.beats.checkpoint`` safe checkpoint loading and the
check of a checkpoint's cfg against its weights; ``lobes.beats.model`` the encoder; ``lobes.beats.pooling``
the token masks, pooling modules and the tagging utility; ``lobes.beats.loading`` the model and layer
choice of the commands; ``lobes.beats.labels`` class names; ``lobes.beats.tokenizer`` the acoustic tokenizer
(BEATs backbone + ``quantize_layer`` + the normalised EMA codebook of ``lobes.beats.quantizer``) and the
random-projection tokenizer; ``lobes.beats.pretraining`` masked token prediction and tokenizer distillation
(``recipes/BEATsPretrain``). Everything but ``lobes.beats.pretraining`` is importable from ``lobes.beats``.
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
from lobes.beats.quantizer import NormEMAVectorQuantizer, QuantizerOutput, cosine_kmeans
from lobes.beats.tokenizer import (
    PAD_TOKEN_ID,
    BEATsTokenizer,
    RandomProjectionTokenizer,
    TokenizerOutput,
    TokenizersConfig,
    Tokens,
    load_tokenizer,
)

__all__ = [
    "FBANK_MEAN",
    "FBANK_STD",
    "LOUD_INPUT_PEAK",
    "NUM_MEL_BINS",
    "PAD_TOKEN_ID",
    "AttentivePooling",
    "BEATs",
    "BEATsCheckpointError",
    "BEATsConfig",
    "BEATsTokenizer",
    "NormEMAVectorQuantizer",
    "QuantizerOutput",
    "RandomProjectionTokenizer",
    "TokenizerOutput",
    "Tokens",
    "TokenizersConfig",
    "WeightedLayerSum",
    "check_config_against_weights",
    "config_from_weights",
    "cosine_kmeans",
    "label_names",
    "layer_index",
    "load_beats",
    "load_checkpoint",
    "load_tokenizer",
    "masked_mean",
    "min_num_samples",
    "parse_layer",
    "read_audioset_names",
    "read_config",
    "token_padding_mask",
    "top_k_labels",
    "valid_token_counts",
]
