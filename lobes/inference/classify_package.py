"""Package audio classifiers: a run of ``recipes/AudioClassification`` or a Microsoft BEATs checkpoint.

A folder written here holds ``hyperparams.yaml`` in speechbrain's inference layout, the weights as
``<name>.ckpt`` for every loadable of its ``pretrainer``, a ``README.md`` and ``package.json``::

    OUT/
      hyperparams.yaml        modules + pretrainer (no optimizer state, no paths of the training machine)
      embedding_model.ckpt    BEATs encoder + pooling over the valid tokens (+ layer mix)
      classifier.ckpt         linear head (absent for a pre-trained BEATs checkpoint: embeddings only)
      label_encoder.ckpt      class names, speechbrain's CategoricalEncoder text format (idem)
      README.md               where it comes from, training data, test accuracy, how to load it

:func:`package_classification_run` writes one from a run (its best checkpoint by validation accuracy, the one
the run was tested with), :func:`package_beats_checkpoint` from a Microsoft BEATs file (pre-trained:
embeddings; AudioSet fine-tuned: tags). Both load with
``speechbrain.inference.classifiers.EncoderClassifier.from_hparams(source=OUT, savedir=...)`` and with
:meth:`lobes.inference.classify.AudioClassifier.from_pretrained`. The modules the YAML builds are in
:mod:`lobes.inference.classify_modules`; packaging the same source twice gives byte-identical files.

Example
-------
>>> package_classification_run("no/such/run", "out")
Traceback (most recent call last):
...
lobes.inference.pretrained.PretrainedError: no/such/run: missing the run's hyperparams.yaml; expected the ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from speechbrain.dataio.encoder import CategoricalEncoder
from torch import nn

from lobes.beats import AttentivePooling, BEATs, WeightedLayerSum, label_names, load_checkpoint, masked_mean
from lobes.inference.classify_modules import KIND, BEATsEmbedding, ClassifierHead
from lobes.inference.pretrained import HPARAMS_FILE, PretrainedError, PretrainedWriter, read_state_dict
from lobes.inference.runs import best_checkpoint, build_entries, describe_training_data
from lobes.inputs import fingerprint

__all__ = ["package_beats_checkpoint", "package_classification_run"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# The folder's files
# --------------------------------------------------------------------------------------------------------------
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
    training_data: str | None = None


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
    if pkg.training_data:
        lines += [f"- training data: {pkg.training_data}"]
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
    writer.add_text("README.md", _render_readme(pkg), allowed=pkg.labels or ())  # AudioSet ids look like paths
    writer.add_text(HPARAMS_FILE, text)
    info = {
        "sample_rate": pkg.sample_rate,
        "embedding_size": int(pkg.beats_cfg["encoder_embed_dim"]),
        "n_classes": len(pkg.labels) if pkg.labels else 0,
        "multi_label": pkg.multi_label,
        "test_accuracy": pkg.test_accuracy,
        "source": pkg.source_lines[0],
        "training_data": pkg.training_data,
    }
    return writer.commit(info=info)


# --------------------------------------------------------------------------------------------------------------
# Sources: a Microsoft BEATs checkpoint, a recipe run
# --------------------------------------------------------------------------------------------------------------
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
    lobes.inference.pretrained.PretrainedError
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
        source_lines=[f"source: Microsoft-format BEATs checkpoint `{ckpt.name}` (sha256 {fingerprint(ckpt)[:16]})"],
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


def package_classification_run(results_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a pretrained folder from a ``recipes/AudioClassification`` run.

    Reads ``results_dir/hyperparams.yaml`` (encoder, pooling, classifier, sample rate; nothing else is
    built; ``prepare`` names the training data in the README), the complete checkpoint in ``save/`` with
    the best validation accuracy (the one the run was tested with), ``save/label_encoder.txt`` and
    ``test_results.json``. A frozen encoder, which the run does not save, is read from the run's
    ``ckpt_path``. Optimizer, scheduler, counters and data paths are left out; packaging the same run twice
    gives byte-identical files.

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
    lobes.inference.pretrained.PretrainedError
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
    from lobes.package import read_run_yaml

    ckpt = best_checkpoint(save, "acc", maximize=True)
    tree = read_run_yaml(run)
    try:
        hp = build_entries(tree, ["encoder", "pooling", "layer_mix", "classifier", "sample_rate"])
    except FileNotFoundError as exc:
        raise PretrainedError(
            f"{hparams_path}: cannot build the run's encoder ({exc}); the run's ckpt_path must exist here: it "
            "gives the encoder's configuration (and its weights when the encoder was frozen)"
        ) from None
    encoder = hp.get("encoder")
    if not isinstance(encoder, BEATs):
        raise PretrainedError(f"{hparams_path}: 'encoder' must build a lobes.beats.BEATs, got {type(encoder).__name__}")
    emb_dim = int(encoder.cfg.encoder_embed_dim)
    if (ckpt / "encoder.ckpt").exists():
        enc_state = read_state_dict(ckpt / "encoder.ckpt", "the run's encoder")
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
    head_state = read_state_dict(ckpt / "classifier.ckpt", "the run's classifier")
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
        pooling_state = read_state_dict(ckpt / "pooling.ckpt", "the run's pooling")
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
        mix_layers, mix_state = mix.weights.shape[0], read_state_dict(ckpt / "layer_mix.ckpt", "the run's layer_mix")

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
        training_data=describe_training_data(tree),
    )
    return _write_package(pkg, out_dir)
