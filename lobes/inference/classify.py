"""Audio classification in one line: package a trained run or a Microsoft BEATs checkpoint, then load it.

A *pretrained folder* holds ``hyperparams.yaml`` in speechbrain's inference layout, the weights as
``<name>.ckpt`` for every loadable of its ``pretrainer`` and a ``README.md``::

    OUT/
      hyperparams.yaml        modules + pretrainer (no optimizer state, no paths of the training machine)
      embedding_model.ckpt    BEATs encoder + pooling over the valid tokens (+ layer mix)
      classifier.ckpt         linear head (absent for a pre-trained BEATs checkpoint: embeddings only)
      label_encoder.ckpt      class names, speechbrain's CategoricalEncoder text format (idem)
      README.md               where it comes from, test accuracy, how to load it

:func:`package_classification_run` writes one from a run of ``recipes/AudioClassification`` (its best
checkpoint by validation accuracy, the one the run was tested with), :func:`package_beats_checkpoint` from
a Microsoft BEATs file (pre-trained: embeddings; AudioSet fine-tuned: tags). Both load with
``speechbrain.inference.classifiers.EncoderClassifier.from_hparams(source=OUT, savedir=...)``
(``classify_batch`` / ``classify_file`` return log-probabilities and label names) and with
:meth:`AudioClassifier.from_pretrained`, which takes files, tensors or arrays at any rate and returns the
top-k labels with probabilities (softmax for a trained classifier, independent sigmoids for AudioSet tags).

BEATs computes its own filterbank from the 16 kHz waveform, so ``compute_features`` and ``mean_var_norm``
are pass-throughs and ``embedding_model(wavs, wav_lens)`` runs BEATs and pools over the tokens that the
true length of each clip covers: a clip gives the same result alone or padded inside a batch.

Example
-------
>>> import tempfile, torch
>>> from lobes.beats import BEATs, BEATsConfig
>>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64, embed_dim=32,
...                            encoder_attention_heads=4, conv_pos=16, conv_pos_groups=2, finetuned_model=True,
...                            predictor_class=3)
>>> beats = BEATs(cfg=cfg); beats.label_dict = {0: "/m/dog", 1: "/m/cat", 2: "/m/owl"}
>>> folder = tempfile.mkdtemp()
>>> ckpt = beats.save_checkpoint(f"{folder}/as2m.pt")
>>> out = package_beats_checkpoint(ckpt, f"{folder}/pretrained")
>>> model = AudioClassifier.from_pretrained(out)
>>> tags = model.classify(torch.randn(8000) * 0.1, sample_rate=8000, top_k=2)
>>> len(tags), sorted(model.labels)
(2, ['/m/cat', '/m/dog', '/m/owl'])
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from speechbrain.dataio.encoder import CategoricalEncoder
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_transfer, register_checkpoint_hooks
from torch import Tensor, nn

from lobes.beats import (
    AttentivePooling,
    BEATs,
    WeightedLayerSum,
    label_names,
    load_checkpoint,
    masked_mean,
    min_num_samples,
    token_padding_mask,
    top_k_labels,
)
from lobes.checkpoints import COMPLETE_MARKER
from lobes.inference.common import (
    HPARAMS_FILE,
    PretrainedError,
    PretrainedWriter,
    audio_sources,
    autocast,
    batches_by_length,
    load_pretrained,
    resolve_device,
    resolve_precision,
)

__all__ = [
    "DEFAULT_BATCH_SECONDS",
    "AudioClassifier",
    "BEATsEmbedding",
    "ClassLabels",
    "ClassifierHead",
    "Passthrough",
    "package_beats_checkpoint",
    "package_classification_run",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SECONDS = 60.0
"""Padded audio per batch (seconds) when :class:`AudioClassifier` groups inputs of similar length."""

KIND = "classification"
"""``kind`` of the folders written here (``package.json``)."""


# --------------------------------------------------------------------------------------------------
# modules of the pretrained folder (built by hyperparams.yaml)
# --------------------------------------------------------------------------------------------------
def _load_strict(module: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a state dict file into ``module``; every key and shape must match (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{path}: missing weights file for {name!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedError(f"{path}: cannot read the weights of {name!r} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise PretrainedError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
        for k in own
        if k in state and tuple(own[k].shape) != tuple(state[k].shape)
    ]
    problems = (
        ([f"missing keys {missing[:6]}"] if missing else [])
        + ([f"unexpected keys {unexpected[:6]}"] if unexpected else [])
        + shapes[:6]
    )
    if problems:
        raise PretrainedError(f"{path}: does not match {name!r} as hyperparams.yaml builds it: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


class Passthrough(nn.Module):
    """Returns its first argument: ``compute_features`` and ``mean_var_norm`` of a model that reads waveforms.

    Example
    -------
    >>> Passthrough()(torch.zeros(2, 16000), torch.ones(2)).shape
    torch.Size([2, 16000])
    """

    def forward(self, x: Tensor, *_: Any) -> Tensor:
        """``x`` unchanged."""
        return x


@register_checkpoint_hooks
class BEATsEmbedding(nn.Module):
    """BEATs encoder, optional layer mix and pooling over the valid tokens: waveforms -> one vector per clip.

    Arguments
    ---------
    encoder : lobes.beats.BEATs
        The encoder (its ``output_all_hiddens`` decides whether ``layer_mix`` is needed).
    pooling : nn.Module or callable
        ``pooling(features (B, T, C), padding_mask (B, T)) -> (B, C)``, e.g. ``AttentivePooling`` or
        ``masked_mean``.
    layer_mix : nn.Module, optional
        ``(L + 1, B, T, C) -> (B, T, C)`` (``WeightedLayerSum``), for an encoder returning every layer.

    Example
    -------
    >>> from lobes.beats import BEATsConfig
    >>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
    ...                            embed_dim=32, encoder_attention_heads=4, conv_pos=16, conv_pos_groups=2)
    >>> emb = BEATsEmbedding(BEATs(cfg=cfg), masked_mean)
    >>> emb(torch.randn(2, 16000), torch.tensor([1.0, 0.5])).shape
    torch.Size([2, 1, 32])
    """

    def __init__(
        self,
        encoder: BEATs,
        pooling: nn.Module | Callable[[Tensor, Tensor], Tensor],
        layer_mix: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if encoder.output_all_hiddens and layer_mix is None:
            raise ValueError(
                "the encoder returns every layer (output_all_hiddens=True): give a layer_mix "
                "module such as lobes.beats.WeightedLayerSum"
            )
        self.encoder, self.pooling, self.layer_mix = encoder, pooling, layer_mix

    def forward(self, wavs: Tensor, wav_lens: Tensor | None = None) -> Tensor:
        """``wavs`` (B, N) 16 kHz, ``wav_lens`` (B,) relative lengths -> embeddings (B, 1, C)."""
        feats = self.encoder(wavs, wav_lens)[0]  # (B, T, C) or (L + 1, B, T, C)
        if feats.dim() == 4:
            feats = self.layer_mix(feats)  # (B, T, C)
        padding = token_padding_mask(wavs, wav_lens, self.encoder.cfg.input_patch_size)  # (B, T), True = pad
        return self.pooling(feats, padding).unsqueeze(1)  # (B, 1, C)

    @mark_as_transfer
    @mark_as_loader
    def load_checked(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """speechbrain's load hook: strict, with an error naming the file on any mismatch."""
        _load_strict(self, path, "embedding_model")


@register_checkpoint_hooks
class ClassifierHead(nn.Module):
    """Linear layer returning log-probabilities: log-softmax over classes, or log-sigmoid per label.

    Arguments
    ---------
    input_size : int
        Embedding size ``C``.
    n_classes : int
        Number of classes.
    multi_label : bool
        True for independent labels (AudioSet tags: sigmoid), False for one class per clip (softmax).
    bias : bool
        Whether the linear layer has a bias.

    Example
    -------
    >>> head = ClassifierHead(32, 5)
    >>> log_probs = head(torch.randn(2, 1, 32))
    >>> log_probs.shape, torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 1))
    (torch.Size([2, 1, 5]), True)
    """

    def __init__(self, input_size: int, n_classes: int, multi_label: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, n_classes, bias=bias)
        self.multi_label = bool(multi_label)

    @property
    def n_classes(self) -> int:
        """Number of outputs."""
        return self.linear.out_features

    def forward(self, emb: Tensor) -> Tensor:
        """``(..., C)`` embeddings -> ``(..., n_classes)`` float32 log-probabilities."""
        logits = self.linear(emb).float()
        return F.logsigmoid(logits) if self.multi_label else F.log_softmax(logits, dim=-1)

    @mark_as_transfer
    @mark_as_loader
    def load_checked(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """speechbrain's load hook: strict, with an error naming the file on any mismatch."""
        _load_strict(self, path, "classifier")


@register_checkpoint_hooks
class ClassLabels(CategoricalEncoder):
    """speechbrain's ``CategoricalEncoder`` whose loading fails loudly: missing file or wrong class count.

    Arguments
    ---------
    n_classes : int, optional
        Number of labels the file must hold (the classifier's outputs).

    Example
    -------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "labels.ckpt")
    >>> enc = ClassLabels(); enc.update_from_iterable(["dog", "cat"]); enc.save(path)
    >>> ClassLabels(n_classes=3).load_checked(path)
    Traceback (most recent call last):
    ...
    lobes.inference.common.PretrainedError: ...labels.ckpt holds 2 labels, but the classifier has 3 outputs
    """

    def __init__(self, n_classes: int | None = None) -> None:
        super().__init__()
        self.n_classes = n_classes
        if n_classes is not None:
            self.expect_len(n_classes)

    @mark_as_transfer
    @mark_as_loader
    def load_checked(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """Read the label file; raise if it is missing, unreadable or of the wrong size."""
        path = Path(path)
        if not path.is_file():
            raise PretrainedError(f"{path}: missing label file (speechbrain CategoricalEncoder format)")
        try:
            self.load(path)
        except Exception as exc:
            raise PretrainedError(
                f"{path}: not a CategoricalEncoder label file ({type(exc).__name__}: {exc})"
            ) from None
        if self.n_classes is not None and len(self) != self.n_classes:
            raise PretrainedError(f"{path} holds {len(self)} labels, but the classifier has {self.n_classes} outputs")


# --------------------------------------------------------------------------------------------------
# writing a pretrained folder
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Package:
    """Everything a pretrained folder is made of, before it is written."""

    title: str
    source_lines: list[str]
    sample_rate: int
    beats_cfg: dict
    output_all_hiddens: bool
    pooling: str  # "attentive" or "mean"
    pooling_hidden: int | None
    layer_mix_layers: int | None
    encoder_state: dict
    pooling_state: dict | None = None
    layer_mix_state: dict | None = None
    classifier_state: dict | None = None  # torch.nn.Linear: weight (n_classes, C)[, bias]
    labels: list[str] | None = None
    multi_label: bool = False
    test_accuracy: float | None = None
    accuracy_line: str | None = None


def _render_hparams(pkg: _Package) -> str:
    """hyperparams.yaml: deterministic text, commented like the recipes' YAML files."""
    has_head = pkg.classifier_state is not None
    lines = ["# " + "#" * 76, f"# {pkg.title}", "#"]
    lines += [f"# {line}" for line in pkg.source_lines]
    lines += [
        "#",
        "# Load with speechbrain.inference.classifiers.EncoderClassifier.from_hparams(source=<this folder>,",
        "# savedir=<cache>) or lobes.inference.AudioClassifier.from_pretrained(<this folder>).",
        "# " + "#" * 76,
        "",
        f"sample_rate: {int(pkg.sample_rate)}   # mono input rate; files at other rates are resampled",
        f"emb_dim: {int(pkg.beats_cfg['encoder_embed_dim'])}",
    ]
    if has_head:
        lines += [
            f"n_classes: {len(pkg.labels)}",
            f"multi_label: {json.dumps(pkg.multi_label)}   # true: independent sigmoid scores (tags)",
        ]
    lines += ["", "# BEATs encoder: the architecture of the weights in embedding_model.ckpt", "beats_cfg:"]
    lines += [f"    {key}: {json.dumps(pkg.beats_cfg[key])}" for key in sorted(pkg.beats_cfg)]
    lines += [
        "",
        "# BEATs computes its own filterbank from the waveform: features and normalisation pass through",
        "compute_features: !new:lobes.inference.classify.Passthrough",
        "mean_var_norm: !new:lobes.inference.classify.Passthrough",
        "",
        "# waveform -> BEATs -> pooling over the tokens inside each clip's true length -> (B, 1, emb_dim)",
        "embedding_model: !new:lobes.inference.classify.BEATsEmbedding",
        "    encoder: !new:lobes.beats.BEATs",
        "        cfg: !ref <beats_cfg>",
        "        freeze: True",
        f"        output_all_hiddens: {pkg.output_all_hiddens}",
    ]
    if pkg.pooling == "attentive":
        lines += [
            "    pooling: !new:lobes.beats.AttentivePooling",
            "        input_size: !ref <emb_dim>",
            f"        hidden_size: {int(pkg.pooling_hidden)}",
        ]
    else:
        lines += ["    pooling: !name:lobes.beats.masked_mean"]
    if pkg.layer_mix_layers is not None:
        lines += [
            "    layer_mix: !new:lobes.beats.WeightedLayerSum",
            f"        num_layers: {int(pkg.layer_mix_layers)}",
        ]
    if has_head:
        lines += [
            "",
            "# log-probabilities (B, 1, n_classes): log-softmax, or log-sigmoid when multi_label",
            "classifier: !new:lobes.inference.classify.ClassifierHead",
            "    input_size: !ref <emb_dim>",
            "    n_classes: !ref <n_classes>",
            "    multi_label: !ref <multi_label>",
            f"    bias: {'bias' in pkg.classifier_state}",
            "",
            "label_encoder: !new:lobes.inference.classify.ClassLabels",
            "    n_classes: !ref <n_classes>",
        ]
    lines += [
        "",
        "audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer",
        "    sample_rate: !ref <sample_rate>",
        "    mix: avg-to-mono",
        "",
        "modules:",
        "    compute_features: !ref <compute_features>",
        "    mean_var_norm: !ref <mean_var_norm>",
        "    embedding_model: !ref <embedding_model>",
    ]
    if has_head:
        lines += ["    classifier: !ref <classifier>"]
    lines += [
        "",
        "# every loadable is read from <source>/<name>.ckpt",
        "pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer",
        "    loadables:",
        "        embedding_model: !ref <embedding_model>",
    ]
    if has_head:
        lines += ["        classifier: !ref <classifier>", "        label_encoder: !ref <label_encoder>"]
    return "\n".join(lines) + "\n"


def _render_readme(pkg: _Package) -> str:
    """README.md of the folder: origin, accuracy, classes, how to load (no folder name: same bytes anywhere)."""
    out_name = "path/to/this/folder"
    has_head = pkg.classifier_state is not None
    if not has_head:
        kind = "audio embedding model (no classifier)"
    elif pkg.multi_label:
        kind = f"audio tagger over {len(pkg.labels)} labels (independent sigmoid scores)"
    else:
        kind = f"{len(pkg.labels)}-class audio classifier (softmax)"
    head = ", then a linear layer" if has_head else ""
    lines = [
        f"# {pkg.title}",
        "",
        f"Model: {kind}; BEATs encoder, {pkg.pooling} pooling over the valid tokens{head}.",
        "",
    ]
    lines += [f"- {line}" for line in pkg.source_lines]
    lines += [
        f"- input: mono audio at {pkg.sample_rate} Hz (files at other rates are resampled, channels averaged)",
        f"- embedding size: {pkg.beats_cfg['encoder_embed_dim']}",
    ]
    if pkg.accuracy_line:
        lines += [f"- {pkg.accuracy_line}"]
    if has_head:
        shown = ", ".join(f"`{name}`" for name in pkg.labels[:30])
        more = f" and {len(pkg.labels) - 30} more" if len(pkg.labels) > 30 else ""
        lines += [f"- classes ({len(pkg.labels)}, in output order): {shown}{more}"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from lobes.inference import AudioClassifier",
        "",
        f'model = AudioClassifier.from_pretrained("{out_name}")',
    ]
    if has_head:
        lines += ['print(model.classify("clip.wav", top_k=3))  # [(label, probability), ...]']
    lines += [
        'embedding = model.embed("clip.wav")  # (emb_dim,) tensor',
        "```",
        "",
        "```python",
        "from speechbrain.inference.classifiers import EncoderClassifier",
        "",
        f'model = EncoderClassifier.from_hparams(source="{out_name}", savedir="pretrained_cache")',
    ]
    if has_head:
        lines += ['out_prob, score, index, labels = model.classify_file("clip.wav")  # log-probabilities']
    lines += [
        f"embeddings = model.encode_batch(wavs, wav_lens)  # (B, 1, emb_dim); wavs at {pkg.sample_rate} Hz",
        "```",
    ]
    if has_head:
        lines += [
            "",
            "```shell",
            f"python -m lobes.classify {out_name} clip.wav more_clips --top-k 3 --output predictions.jsonl",
            "```",
        ]
    return "\n".join(lines) + "\n"


def _label_file_bytes(labels: Sequence[str]) -> bytes:
    """speechbrain's CategoricalEncoder text file of ``labels`` (class index = position)."""
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise PretrainedError(f"label names must be unique, got duplicates {dup[:5]}")
    encoder = CategoricalEncoder()
    encoder.update_from_iterable(labels)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labels.txt"
        encoder.save(path)
        return path.read_bytes()


def _write_package(pkg: _Package, out_dir: str | os.PathLike) -> Path:
    """Build the modules from the rendered YAML, load the weights into them strictly, write the folder."""
    from hyperpyyaml import load_hyperpyyaml

    writer = PretrainedWriter(out_dir, kind=KIND)  # refuses a folder it must not replace, before any work
    text = _render_hparams(pkg)
    with torch.random.fork_rng(devices=[]):  # the initial weights are replaced below
        hparams = load_hyperpyyaml(text)
    embedding: BEATsEmbedding = hparams["embedding_model"]
    embedding.encoder.load_beats_state_dict(pkg.encoder_state, source="the encoder weights")
    if pkg.pooling_state is not None:
        embedding.pooling.load_state_dict(pkg.pooling_state, strict=True)
    if pkg.layer_mix_state is not None:
        embedding.layer_mix.load_state_dict(pkg.layer_mix_state, strict=True)
    writer.add_state_dict("embedding_model.ckpt", embedding.state_dict())
    if pkg.classifier_state is not None:
        head: ClassifierHead = hparams["classifier"]
        head.linear.load_state_dict(pkg.classifier_state, strict=True)
        writer.add_state_dict("classifier.ckpt", head.state_dict())
        writer.add_bytes("label_encoder.ckpt", _label_file_bytes(pkg.labels))
    writer.add_text("README.md", _render_readme(pkg))
    writer.add_text(HPARAMS_FILE, text)
    info = {
        "sample_rate": pkg.sample_rate,
        "embedding_size": int(pkg.beats_cfg["encoder_embed_dim"]),
        "n_classes": len(pkg.labels) if pkg.labels else 0,
        "multi_label": pkg.multi_label,
        "test_accuracy": pkg.test_accuracy,
        "source": pkg.source_lines[0],
    }
    return writer.commit(info=info)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_beats_checkpoint(
    ckpt: str | os.PathLike, out_dir: str | os.PathLike, label_names_csv: str | os.PathLike | None = None
) -> Path:
    """Wrap a Microsoft BEATs checkpoint into a pretrained folder.

    A pre-trained checkpoint (``{"cfg", "model"}``) gives an embedding model (mean of the last layer over
    the valid tokens); an AudioSet fine-tuned one (``label_dict`` + ``predictor``) also gives tags, the
    same as :meth:`lobes.beats.BEATs.tag` (sigmoid of the predictor averaged over the valid tokens; the
    predictor is linear, so it is applied to the mean instead).

    Arguments
    ---------
    ckpt : str or PathLike
        The checkpoint file.
    out_dir : str or PathLike
        Folder to write (created; an earlier pretrained folder there is replaced).
    label_names_csv : str or PathLike, optional
        AudioSet's ``class_labels_indices.csv``: label ids (``/m/09x0r``) become display names ("Speech").

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    lobes.inference.common.PretrainedError
        ``label_names_csv`` for a model without a predictor, duplicate label names, or ``out_dir`` is a
        folder that is not an earlier pretrained folder.
    """
    ckpt = Path(ckpt)
    load_checkpoint(ckpt)  # checks the file's form first; names the file on error
    encoder = BEATs(ckp_path=ckpt)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("predictor.")}
    tagger = encoder.predictor is not None
    pkg = _Package(
        title=f"BEATs {'AudioSet tagger' if tagger else 'embeddings'} from {ckpt.name}",
        source_lines=[f"source: Microsoft-format BEATs checkpoint `{ckpt.name}` (sha256 {_file_sha256(ckpt)[:16]})"],
        sample_rate=16000,
        beats_cfg={**encoder.cfg.to_dict(), "finetuned_model": False},
        output_all_hiddens=False,
        pooling="mean",
        pooling_hidden=None,
        layer_mix_layers=None,
        encoder_state=state,
    )
    if tagger:
        pkg.labels = label_names(encoder, label_names_csv)
        pkg.classifier_state = {"weight": encoder.predictor.weight, "bias": encoder.predictor.bias}
        pkg.multi_label = True
        if label_names_csv is not None:
            pkg.source_lines.append(f"label names: `{Path(label_names_csv).name}`")
    elif label_names_csv is not None:
        raise PretrainedError(
            f"{ckpt}: label names given, but the checkpoint has no predictor (a pre-trained, "
            "not fine-tuned, BEATs model gives embeddings only)"
        )
    return _write_package(pkg, out_dir)


# --------------------------------------------------------------------------------------------------
# reading a recipe run
# --------------------------------------------------------------------------------------------------
def _run_objects(hparams_path: Path, keys: Sequence[str]) -> tuple[dict, dict]:
    """Build only ``keys`` of a run's saved hyperparams.yaml (no seeding, data, logger or checkpointer).

    Returns the built objects and the YAML tree (ruamel nodes, nothing built).
    """
    from hyperpyyaml import load_hyperpyyaml
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML()
    with open(hparams_path, encoding="utf-8") as f:
        doc = yaml.load(f)
    if not isinstance(doc, dict):
        raise PretrainedError(f"{hparams_path}: expected a mapping of hyper-parameters")
    subset = CommentedMap((k, doc[k]) for k in keys if k in doc)
    buffer = io.StringIO()
    yaml.dump(subset, buffer)
    try:
        with torch.random.fork_rng(devices=[]):  # random initialisations leave the caller's generator alone
            return load_hyperpyyaml(buffer.getvalue()), doc
    except FileNotFoundError as exc:
        raise PretrainedError(
            f"{hparams_path}: cannot build the run's encoder ({exc}); the run's ckpt_path must exist here: it "
            "gives the encoder's configuration (and its weights when the encoder was frozen)"
        ) from None


def _best_checkpoint(save: Path) -> Path:
    """The complete checkpoint with the best ``acc`` (the one the recipe tests), else the latest."""
    import yaml

    found = []
    for folder in sorted(save.glob("CKPT+*")):
        meta_file = folder / "CKPT.yaml"
        if folder.is_dir() and meta_file.is_file() and (folder / COMPLETE_MARKER).exists():  # else: cut off
            found.append((folder, yaml.safe_load(meta_file.read_text(encoding="utf-8")) or {}))
    if not found:
        raise PretrainedError(
            f"{save}: no complete checkpoint (CKPT+*/ with CKPT.yaml and COMPLETE); has the run finished an epoch?"
        )
    scored = [(m["acc"], m.get("unixtime", 0.0), f.name, f) for f, m in found if isinstance(m.get("acc"), (int, float))]
    if scored:
        return max(scored)[3]
    logger.warning("%s: no checkpoint records a validation accuracy; packaging the latest", save)
    return max((m.get("unixtime", 0.0), f.name, f) for f, m in found)[2]


def _read_state(path: Path) -> dict:
    if not path.is_file():
        raise PretrainedError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def package_classification_run(results_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a pretrained folder from a ``recipes/AudioClassification`` run.

    Reads ``results_dir/hyperparams.yaml`` (encoder, pooling, classifier, sample rate; nothing else is
    built), the complete checkpoint in ``save/`` with the best validation accuracy (the one the run was
    tested with), ``save/label_encoder.txt`` and ``test_results.json``. A frozen encoder, which the run
    does not save, is read from the run's ``ckpt_path``. Optimizer, scheduler, counters and data paths are
    left out; packaging the same run twice gives byte-identical files.

    Arguments
    ---------
    results_dir : str or PathLike
        The run's ``output_folder``.
    out_dir : str or PathLike
        Folder to write (created; an earlier pretrained folder there is replaced).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    lobes.inference.common.PretrainedError
        A missing piece of the run (named), or a head / label count that does not match.
    """
    run = Path(results_dir)
    hparams_path, save = run / HPARAMS_FILE, run / "save"
    for need, what in (
        (hparams_path, "the run's hyperparams.yaml"),
        (save, "the checkpoint folder save/"),
        (save / "label_encoder.txt", "the label encoder save/label_encoder.txt"),
    ):
        if not need.exists():
            raise PretrainedError(
                f"{run}: missing {what}; expected the output_folder of a recipes/AudioClassification run"
            )
    ckpt = _best_checkpoint(save)
    hp, tree = _run_objects(hparams_path, ["encoder", "pooling", "layer_mix", "classifier", "sample_rate"])
    encoder = hp.get("encoder")
    if not isinstance(encoder, BEATs):
        raise PretrainedError(f"{hparams_path}: 'encoder' must build a lobes.beats.BEATs, got {type(encoder).__name__}")
    emb_dim = int(encoder.cfg.encoder_embed_dim)
    if (ckpt / "encoder.ckpt").exists():
        enc_state = _read_state(ckpt / "encoder.ckpt")
    elif isinstance(tree["encoder"], dict) and tree["encoder"].get("ckp_path"):
        enc_state = encoder.state_dict()  # a frozen encoder is not saved: its weights are the run's ckpt_path
    else:
        raise PretrainedError(
            f"{ckpt}: no encoder.ckpt, and the run's encoder has no ckp_path to read its weights from; the "
            "encoder weights of this run are lost"
        )
    enc_state = {k: v for k, v in enc_state.items() if not k.startswith("predictor.")}

    label_file = CategoricalEncoder()
    label_file.load(save / "label_encoder.txt")
    labels = [str(label_file.ind2lab[i]) for i in range(len(label_file))]
    head_state = _read_state(ckpt / "classifier.ckpt")
    factory = hp.get("classifier")
    if factory is None:
        raise PretrainedError(f"{hparams_path}: no 'classifier'")
    head = factory if isinstance(factory, nn.Module) else factory(emb_dim, len(labels))  # as train.py builds it
    if not isinstance(head, nn.Linear):
        raise PretrainedError(
            f"{hparams_path}: 'classifier' builds a {type(head).__name__}; a torch.nn.Linear head is expected"
        )
    weight = head_state.get("weight")
    if weight is None or tuple(weight.shape) != tuple(head.weight.shape) or set(head_state) != set(head.state_dict()):
        got = tuple(weight.shape) if weight is not None else sorted(head_state)
        raise PretrainedError(
            f"{ckpt / 'classifier.ckpt'}: holds {got}, but {len(labels)} labels in "
            f"save/label_encoder.txt and an encoder of width {emb_dim} need a Linear weight "
            f"{tuple(head.weight.shape)}"
        )

    pooling, pooling_state, hidden = hp.get("pooling"), None, None
    if isinstance(pooling, AttentivePooling):
        kind, hidden = "attentive", pooling.proj.out_features
        pooling_state = _read_state(ckpt / "pooling.ckpt")
    elif pooling is masked_mean:
        kind = "mean"
    else:
        raise PretrainedError(
            f"{hparams_path}: pooling {pooling!r} is not supported; expected "
            "lobes.beats.AttentivePooling or lobes.beats.masked_mean"
        )
    mix_layers, mix_state = None, None
    if encoder.output_all_hiddens:
        mix = hp.get("layer_mix")
        if not isinstance(mix, WeightedLayerSum):
            raise PretrainedError(
                f"{hparams_path}: the encoder returns every layer, but there is no "
                "lobes.beats.WeightedLayerSum 'layer_mix'"
            )
        mix_layers, mix_state = mix.weights.shape[0], _read_state(ckpt / "layer_mix.ckpt")

    accuracy, accuracy_line = None, "test accuracy: not available (the run has no test_results.json)"
    results = run / "test_results.json"
    if results.exists():
        res = json.loads(results.read_text(encoding="utf-8"))
        accuracy = float(res["accuracy"])
        accuracy_line = (
            f"test accuracy: **{100 * accuracy:.2f} %** on {res.get('num_test', '?')} clips "
            "(the run's test_results.json)"
        )
    else:
        logger.warning("%s: no test_results.json (the run was not tested); the README gives no accuracy", run)
    name = f"{run.parent.name}/{run.name}"  # e.g. beats_tiny/1234: no path of this machine
    pkg = _Package(
        title=f"Audio classifier from the run {name}",
        source_lines=[
            f"source: recipes/AudioClassification run `{name}`, checkpoint `{ckpt.name}` (best validation accuracy)"
        ],
        sample_rate=int(hp.get("sample_rate", 16000)),
        beats_cfg={**encoder.cfg.to_dict(), "finetuned_model": False},
        output_all_hiddens=bool(encoder.output_all_hiddens),
        pooling=kind,
        pooling_hidden=hidden,
        layer_mix_layers=mix_layers,
        encoder_state=enc_state,
        pooling_state=pooling_state,
        layer_mix_state=mix_state,
        classifier_state=head_state,
        labels=labels,
        multi_label=False,
        test_accuracy=accuracy,
        accuracy_line=accuracy_line,
    )
    return _write_package(pkg, out_dir)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def _check_loaded(hparams: dict, folder: Path) -> None:
    """Refuse a folder whose modules would keep random weights or whose labels do not fit the classifier."""
    modules = hparams.get("modules") or {}
    missing = [m for m in ("compute_features", "mean_var_norm", "embedding_model") if m not in modules]
    if missing:
        raise PretrainedError(
            f"{folder / HPARAMS_FILE}: 'modules' lacks {missing}; expected compute_features, "
            "mean_var_norm, embedding_model (and classifier)"
        )
    loadables = hparams["pretrainer"].loadables
    loaded = {id(obj) for obj in loadables.values()}
    for name, module in modules.items():
        if any(True for _ in module.parameters()) and id(module) not in loaded:
            raise PretrainedError(
                f"{folder / HPARAMS_FILE}: module {name!r} has weights but is not a loadable of "
                "the pretrainer: it would keep random values"
            )
    classifier = modules.get("classifier")
    if classifier is None:
        return
    if not isinstance(classifier, ClassifierHead):
        raise PretrainedError(
            f"{folder / HPARAMS_FILE}: 'classifier' must be a lobes.inference.classify."
            f"ClassifierHead, got {type(classifier).__name__}"
        )
    labels = hparams.get("label_encoder")
    if labels is None or id(labels) not in loaded:
        raise PretrainedError(
            f"{folder / HPARAMS_FILE}: a classifier needs a 'label_encoder' loadable "
            "(label_encoder.ckpt) to name its outputs"
        )
    if len(labels) != classifier.n_classes:
        raise PretrainedError(
            f"{folder}: label_encoder.ckpt holds {len(labels)} labels, but the classifier has "
            f"{classifier.n_classes} outputs"
        )


class AudioClassifier:
    """A pretrained audio classifier (or BEATs embedding model) that takes files, tensors or arrays.

    Build it with :meth:`from_pretrained`. Inputs are batched by length internally; a clip gives the same
    result alone or in a batch (the model sees only its valid tokens).

    Arguments
    ---------
    hparams : dict
        A built and loaded pretrained folder (see :func:`lobes.inference.common.load_pretrained`).
    device : str or torch.device
        ``auto`` (GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``.
    precision : str
        ``fp32`` or ``bf16`` (autocast; the filterbank stays float32).

    Example
    -------
    See the module docstring.
    """

    def __init__(self, hparams: dict, device: str | torch.device = "auto", precision: str = "fp32") -> None:
        resolve_precision(precision)
        self.device = resolve_device(device)
        self.precision = precision
        modules = hparams["modules"]
        self.compute_features = modules["compute_features"]
        self.mean_var_norm = modules["mean_var_norm"]
        self.embedding_model = modules["embedding_model"]
        self.classifier: ClassifierHead | None = modules.get("classifier")
        self.label_encoder = hparams.get("label_encoder") if self.classifier is not None else None
        self.sample_rate = int(hparams["sample_rate"])
        for module in modules.values():
            module.to(self.device).eval()
            module.requires_grad_(False)
        encoder = getattr(self.embedding_model, "encoder", None)
        patch = getattr(getattr(encoder, "cfg", None), "input_patch_size", 16)
        self.min_samples = -(-min_num_samples(patch) * self.sample_rate // 16000)  # ceil, at the model's rate

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, device: str | torch.device = "auto", precision: str = "fp32"
    ) -> "AudioClassifier":
        """Load a folder written by :func:`package_classification_run` / :func:`package_beats_checkpoint`.

        Raises
        ------
        lobes.inference.common.PretrainedError
            No such folder, no ``hyperparams.yaml`` / ``package.json``, a missing ``<name>.ckpt``, a module
            with weights that the pretrainer does not load, weights or labels that do not fit the model.
        """
        hparams, _ = load_pretrained(source, kind=KIND)
        _check_loaded(hparams, Path(source))
        return cls(hparams, device=device, precision=precision)

    @property
    def labels(self) -> list[str] | None:
        """Class names in output order (None for an embedding model)."""
        if self.label_encoder is None:
            return None
        return [str(self.label_encoder.ind2lab[i]) for i in range(len(self.label_encoder))]

    @property
    def multi_label(self) -> bool:
        """True when scores are independent sigmoids (tags), False for a softmax over classes."""
        return bool(self.classifier is not None and self.classifier.multi_label)

    @property
    def embedding_size(self) -> int:
        """Size of :meth:`embed`'s vectors."""
        return int(self.embedding_model.encoder.cfg.encoder_embed_dim)

    # ------------------------------------------------------------------------------------------ batches
    def require_length(self, name: str, samples: int) -> None:
        """Raise a ``ValueError`` naming ``name`` when ``samples`` (at the model's rate) are too few for the model."""
        if samples < self.min_samples:
            raise ValueError(
                f"{name}: {samples / self.sample_rate:.3f} s is too short; the model needs at "
                f"least {self.min_samples / self.sample_rate:.3f} s ({self.min_samples} samples at "
                f"{self.sample_rate} Hz)"
            )

    def _forward(self, waves: list[Tensor], with_scores: bool) -> tuple[Tensor, Tensor | None]:
        """Embeddings ``(B, C)`` and class probabilities ``(B, n_classes)`` of mono waveforms at the model rate."""
        lengths = torch.tensor([w.numel() for w in waves], dtype=torch.float64)
        wavs = torch.zeros(len(waves), int(lengths.max()))
        for row, w in enumerate(waves):
            wavs[row, : w.numel()] = w
        wavs, rel = wavs.to(self.device), (lengths / lengths.max()).to(self.device)  # (B, N), (B,)
        with torch.no_grad(), autocast(self.device, self.precision):
            feats = self.mean_var_norm(self.compute_features(wavs), rel)  # the waveform itself for BEATs
            emb = self.embedding_model(feats, rel)  # (B, 1, C)
            log_probs = self.classifier(emb).squeeze(1) if with_scores else None  # (B, n_classes)
        probs = log_probs.float().exp().cpu() if log_probs is not None else None
        return emb.squeeze(1).float().cpu(), probs

    def _run(
        self, inputs: Any, sample_rate: int | None, batch_seconds: float, with_scores: bool
    ) -> tuple[list[tuple[Tensor, Tensor | None]], bool]:
        if with_scores and self.classifier is None:
            raise ValueError(
                "this folder holds an embedding model only (a pre-trained BEATs without a label predictor): use embed()"
            )
        if not batch_seconds > 0:
            raise ValueError(f"batch_seconds must be positive, got {batch_seconds}")
        single = not isinstance(inputs, (list, tuple))
        sources = audio_sources(inputs, sample_rate=sample_rate, target_rate=self.sample_rate)
        results: list = [None] * len(sources)
        for batch in batches_by_length(sources, batch_seconds):
            waves = []
            for i in batch:
                wav = sources[i].load()
                self.require_length(sources[i].name, wav.numel())
                waves.append(wav)
            emb, probs = self._forward(waves, with_scores)
            for row, i in enumerate(batch):
                results[i] = (emb[row], probs[row] if probs is not None else None)
        return results, single

    # ------------------------------------------------------------------------------------------ public
    def classify(
        self, inputs: Any, sample_rate: int | None = None, top_k: int = 5, batch_seconds: float = DEFAULT_BATCH_SECONDS
    ) -> list:
        """The ``top_k`` labels of each input with their probabilities.

        Arguments
        ---------
        inputs : path, tensor, array, or a list of them
            Audio files (any rate / channels), or waveforms ``(samples,)`` / ``(channels, samples)`` with
            ``sample_rate`` (see :func:`lobes.inference.common.audio_sources`).
        sample_rate : int, optional
            Rate of the waveforms (required for tensors and arrays; they are resampled to the model's).
        top_k : int
            Labels per input.
        batch_seconds : float
            Padded audio per batch.

        Returns
        -------
        list
            For one input, ``[(label, probability), ...]`` by decreasing probability; for a list, one such
            list per input, in order.
        """
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        results, single = self._run(inputs, sample_rate, batch_seconds, with_scores=True)
        probs = torch.stack([p for _, p in results])  # (N, n_classes)
        tags = top_k_labels(probs, self.labels, top_k)
        return tags[0] if single else tags

    def probabilities(
        self, inputs: Any, sample_rate: int | None = None, batch_seconds: float = DEFAULT_BATCH_SECONDS
    ) -> Tensor | list[Tensor]:
        """Class probabilities ``(n_classes,)`` per input (softmax, or sigmoids for a multi-label model)."""
        results, single = self._run(inputs, sample_rate, batch_seconds, with_scores=True)
        probs = [p for _, p in results]
        return probs[0] if single else probs

    def embed(
        self, inputs: Any, sample_rate: int | None = None, batch_seconds: float = DEFAULT_BATCH_SECONDS
    ) -> Tensor | list[Tensor]:
        """The pooled embedding ``(embedding_size,)`` of each input (what the classifier reads).

        Arguments and inputs as in :meth:`classify`; one tensor for one input, a list for a list.
        """
        results, single = self._run(inputs, sample_rate, batch_seconds, with_scores=False)
        embs = [e for e, _ in results]
        return embs[0] if single else embs
