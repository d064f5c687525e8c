"""lobes.recipe and the recipe YAML files: extension of a base file, the path rule, --debug settings, the saved
hyperparams.yaml copy, training history and per-group learning rates."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from _builders import ROOT, TINY_BEATS_CFG
from hyperpyyaml import load_hyperpyyaml
from ruamel.yaml import YAML

from lobes.recipe import (
    ParamGroupSchedule,
    TrainingHistory,
    load_hparams,
    repository_root,
    resolve_hparams,
    save_hyperparams,
    warmup_cosine_factor,
)

ASR = ROOT / "recipes" / "ASR" / "hparams"
CLASSIFICATION = ROOT / "recipes" / "AudioClassification" / "hparams"
ASR_MODELS = ["hyperconformer", "conformer", "transformer", "primer", "hyperconformer_streaming", "conformer_streaming"]
CLASSIFIERS = ["beats_tiny", "beats_frozen", "beats_finetune"]
#: What the classification model files may set (the ASR ones: model_name, preset and, for streaming, chunking).
CLASSIFIER_SETTINGS = {
    "model_name",
    "prepare",
    "number_of_epochs",
    "batch_size",
    "lr_head",
    "lr_encoder",
    "layer_decay",
    "warmup_steps",
    "freeze_encoder",
    "beats_cfg",
    "emb_dim",
    "ckpt_path",
}


def _model_files(folder):
    return sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def beats_checkpoint(tmp_path_factory):
    from lobes.beats import BEATs

    path = tmp_path_factory.mktemp("beats") / "beats.pt"
    torch.save({"cfg": TINY_BEATS_CFG, "model": BEATs(cfg=TINY_BEATS_CFG).state_dict()}, path)
    return path


def _overrides(name, checkpoint="/nowhere/beats.pt"):
    """What a model file needs on the command line (the checkpoint of the released-BEATs files)."""
    return {"ckpt_path": str(checkpoint), "emb_dim": 32} if name in ("beats_frozen", "beats_finetune") else None


# ---------------------------------------------------------------------------------------------------------
# One base YAML per recipe
# ---------------------------------------------------------------------------------------------------------


def test_the_recipe_folders_hold_the_expected_model_files():
    assert [p.stem for p in _model_files(ASR)] == sorted(ASR_MODELS)
    assert [p.stem for p in _model_files(CLASSIFICATION)] == sorted(CLASSIFIERS)


@pytest.mark.parametrize(
    "folder,allowed",
    [
        # streaming models also pick their chunked training and the chunk sizes they are tested at
        (ASR, {"model_name", "preset", "dynamic_chunk_training", "test_chunk_ms", "test_left_context_chunks"}),
        (CLASSIFICATION, CLASSIFIER_SETTINGS),
    ],
    ids=["ASR", "AudioClassification"],
)
def test_model_files_extend_the_base_and_set_only_model_settings(folder, allowed):
    for path in _model_files(folder):
        tree = YAML().load(path.read_text())
        assert list(tree) == ["base"], path
        assert tree["base"].tag.value == "!include:_base.yaml", path
        assert set(tree["base"]) <= allowed, (path, set(tree["base"]) - allowed)
        assert tree["base"]["model_name"] == path.stem


def _plain(node):
    """A ruamel tree as plain data, each tag kept beside its value (``{"!new:...": {...}}``)."""
    tag = getattr(getattr(node, "tag", None), "value", None)
    if isinstance(node, dict):
        value = {key: _plain(v) for key, v in node.items()}
    elif isinstance(node, list):
        value = [_plain(v) for v in node]
    else:
        value = getattr(node, "value", node)
    return {tag: value} if tag else value


def _resolved(path, overrides=None):
    return _plain(YAML().load(resolve_hparams(path, overrides)))


def _normalised(value, name):
    """``value`` with the model's name replaced, so that per-model output paths compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str).replace(name, "<model>"))


@pytest.mark.parametrize(
    "folder,names,differ",
    [
        (
            ASR,
            ASR_MODELS,
            {"model_name", "preset", "model", "modules", "checkpointer"}
            | {"dynamic_chunk_training", "test_chunk_ms", "test_left_context_chunks"},  # streaming models
        ),
        (
            CLASSIFICATION,
            CLASSIFIERS,
            CLASSIFIER_SETTINGS
            | {
                # built from the settings above
                "epoch_counter",
                "checkpointer",
                "train_dataloader_opts",
                "valid_dataloader_opts",
                "lr_schedule",
                "encoder",
                "modules",
                "attentive_pooling",
                "pooling",
            },
        ),
    ],
    ids=["ASR", "AudioClassification"],
)
def test_model_files_agree_on_every_shared_setting(folder, names, differ):
    trees = {name: _resolved(folder / f"{name}.yaml", _overrides(name)) for name in names}
    keys = set.union(*(set(t) for t in trees.values()))
    assert all(set(t) == keys for t in trees.values())  # the same settings everywhere
    differing = {key for key in keys if len({json.dumps(_normalised(t[key], n)) for n, t in trees.items()}) > 1}
    assert differing <= differ, differing - differ
    for name, tree in trees.items():
        assert Path(tree["output_folder"]).relative_to(ROOT).parts[-2:] == (name, "1234")


def test_asr_models_differ_only_in_their_model():
    trees = {name: _resolved(ASR / f"{name}.yaml") for name in ASR_MODELS}
    ref = trees["hyperconformer"]
    for name, tree in trees.items():
        assert tree["output_folder"] == str(ROOT / "results" / "ASR" / name / "1234")
        for key in ("number_of_epochs", "lr", "prepare", "test_decoder", "fea_augment", "wav_augment"):
            assert tree[key] == ref[key], (name, key)
    presets = {json.dumps(tree["preset"], sort_keys=True, default=str) for tree in trees.values()}
    assert len(presets) == len(ASR_MODELS)


def test_the_base_files_are_not_run_on_their_own():
    with pytest.raises(ValueError, match="is a !PLACEHOLDER"):
        resolve_hparams(ASR / "_base.yaml")
    with pytest.raises(ValueError, match="is a !PLACEHOLDER"):
        resolve_hparams(CLASSIFICATION / "_base.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*/hparams/*.yaml")), ids=lambda p: p.name)
def test_no_comment_follows_a_list_item(path):
    """ruamel moves such a comment when it writes the YAML back, and the item then reads as a mapping."""
    offending = [line for line in path.read_text().splitlines() if re.match(r"\s*- [^#]*\S\s+#", line)]
    assert not offending, offending


# ---------------------------------------------------------------------------------------------------------
# The saved copy: results/.../hyperparams.yaml loads back into the same objects
# ---------------------------------------------------------------------------------------------------------


def _types(value):
    """The classes of an object tree: containers by content, modules with their parameter names."""
    if isinstance(value, dict):
        return {key: _types(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_types(v) for v in value]
    if isinstance(value, torch.nn.Module):
        return (type(value).__name__, sorted(value.state_dict()))
    if callable(value) and hasattr(value, "func"):  # functools.partial from !name:
        return ("partial", value.func.__qualname__, sorted(value.keywords))
    return type(value).__name__


@pytest.mark.parametrize("path", _model_files(ASR) + _model_files(CLASSIFICATION), ids=lambda p: p.stem)
@pytest.mark.parametrize("debug", [False, True], ids=["run", "debug"])
def test_saved_hyperparams_load_back_into_the_same_objects(path, debug, beats_checkpoint, tmp_path, monkeypatch):
    overrides = _overrides(path.stem, beats_checkpoint) or {}
    if path.stem == "beats_tiny":
        overrides = {"beats_cfg": TINY_BEATS_CFG, "emb_dim": 32}
    hparams = load_hparams(path, {**overrides, "output_folder": tmp_path / "out"}, debug=debug)
    saved = save_hyperparams(hparams, tmp_path / "out")
    monkeypatch.chdir(tmp_path)  # loaded from elsewhere: every path is absolute
    again = load_hyperpyyaml(saved.read_text())
    assert sorted(again) == sorted(hparams)
    assert _types(again) == _types(hparams)
    assert again["checkpointer"].checkpoints_dir == hparams["checkpointer"].checkpoints_dir == tmp_path / "out" / "save"
    assert again["prepare"].keywords == hparams["prepare"].keywords


# ---------------------------------------------------------------------------------------------------------
# Paths: from the repository root, whatever the working directory
# ---------------------------------------------------------------------------------------------------------


def test_paths_resolve_from_the_repository_root_in_any_working_directory(tmp_path, monkeypatch):
    for cwd in (ROOT, ROOT / "recipes" / "ASR", tmp_path):
        monkeypatch.chdir(cwd)
        tree = _resolved(os.path.relpath(ASR / "primer.yaml", cwd))  # builds nothing: no folder is created
        assert tree["data_folder"] == str(ROOT / "data" / "embedded_speech")
        assert tree["output_folder"] == str(ROOT / "results" / "ASR" / "primer" / "1234")
        checkpointer = tree["checkpointer"]["!new:speechbrain.utils.checkpoints.Checkpointer"]
        assert checkpointer["checkpoints_dir"] == str(ROOT / "results" / "ASR" / "primer" / "1234" / "save")
        assert tree["prepare"]["!name:lobes.data.speech.prepare_speech_corpus"]["data_folder"] == tree["data_folder"]
        assert tree["noise_csv"] == str(ROOT / "data" / "embedded_speech" / "noise.csv")
    # a relative path on the command line is the user's: from the current directory
    hparams = load_hparams(ASR / "primer.yaml", "data_folder: corpus\noutput_folder: out")
    assert hparams["data_folder"] == str(tmp_path / "corpus") and hparams["output_folder"] == str(tmp_path / "out")
    assert hparams["checkpointer"].checkpoints_dir == tmp_path / "out" / "save"
    # another root moves every path of the YAML
    hparams = load_hparams(ASR / "primer.yaml", root=tmp_path / "elsewhere")
    assert hparams["output_folder"] == str(tmp_path / "elsewhere" / "results" / "ASR" / "primer" / "1234")


def test_a_relative_path_in_a_yaml_file_is_refused(tmp_path):
    recipe = tmp_path / "recipes" / "X" / "hparams"
    recipe.mkdir(parents=True)
    (recipe / "r.yaml").write_text("root: !PLACEHOLDER\ndata_folder: data/corpus\n")
    with pytest.raises(ValueError, match=r"data_folder: 'data/corpus' is a relative path.*!ref <root>/data/corpus"):
        load_hparams(recipe / "r.yaml")
    assert load_hparams(recipe / "r.yaml", {"data_folder": "/abs"})["data_folder"] == "/abs"


def test_plain_hyperpyyaml_cannot_misread_a_model_file():
    """Loaded without lobes.recipe, a model file fails loudly instead of yielding cwd-relative folders."""
    with pytest.raises(Exception, match="output_neurons"), open(ASR / "hyperconformer.yaml") as handle:
        load_hyperpyyaml(handle)


def test_repository_root():
    assert repository_root(ASR / "conformer.yaml") == ROOT
    with pytest.raises(ValueError, match="not inside a recipes/ folder"):
        repository_root("/tmp/x.yaml")


# ---------------------------------------------------------------------------------------------------------
# Overrides and --debug
# ---------------------------------------------------------------------------------------------------------


def test_overrides_merge_into_mappings_and_replace_other_objects():
    tree = _resolved(ASR / "hyperconformer.yaml", "preset: {d_model: 32}\nprepare: {num_train: 100}")
    assert tree["preset"]["d_model"] == 32 and tree["preset"]["nhead"] == 8  # merged into the include
    prepare = tree["prepare"]["!name:lobes.data.speech.prepare_speech_corpus"]  # keeps its function
    assert prepare["num_train"] == 100 and prepare["num_test"] == 600
    text = resolve_hparams(
        ASR / "hyperconformer.yaml", "prepare: !name:lobes.data.manifest.manifest_paths {train: a, valid: b, test: c}"
    )
    assert "prepare: !name:lobes.data.manifest.manifest_paths {train: a, valid: b, test: c}" in text
    with pytest.raises(KeyError, match="'number_of_epoch' is not a setting"):
        resolve_hparams(ASR / "hyperconformer.yaml", "number_of_epoch: 2")


def test_debug_uses_a_small_corpus_and_folders_of_its_own(tmp_path, beats_checkpoint):
    full = load_hparams(ASR / "transformer.yaml", {"data_folder": tmp_path / "speech"}, root=tmp_path)
    debug = load_hparams(ASR / "transformer.yaml", {"data_folder": tmp_path / "speech"}, debug=True, root=tmp_path)
    assert full["prepare"].keywords["data_folder"] == str(tmp_path / "speech")
    assert debug["prepare"].keywords == {
        "data_folder": str(tmp_path / "speech_debug"),
        "num_train": 24,
        "num_valid": 8,
        "num_test": 8,
        "num_test_new_words": 4,
        "train_formant_jitter": [0.15, 0.3],  # the same voices as the full corpus
        "train_echo_share": 0.3,
        "seed": 1234,
    }
    assert debug["noise_csv"] == str(tmp_path / "speech_debug" / "noise.csv") and debug["num_noise"] == 4
    assert full["output_folder"] == str(tmp_path / "results" / "ASR" / "transformer" / "1234")
    assert debug["output_folder"] == str(tmp_path / "results" / "debug" / "ASR" / "transformer" / "1234")
    assert "debug_overrides" not in full and "debug_overrides" not in debug
    events = load_hparams(
        CLASSIFICATION / "beats_frozen.yaml", _overrides("beats_frozen", beats_checkpoint), debug=True, root=tmp_path
    )
    assert events["prepare"].keywords["data_folder"] == str(tmp_path / "data" / "event_corpus_debug")
    assert events["prepare"].keywords["num_train_per_class"] == 4
    # another prepare (command line or YAML) takes no debug arguments meant for the corpus synthesis
    csv = "prepare: !name:lobes.data.manifest.manifest_paths {train: a.csv, valid: b.csv, test: c.csv}"
    assert load_hparams(ASR / "transformer.yaml", csv, debug=True, root=tmp_path)["prepare"].keywords == {
        "train": "a.csv",
        "valid": "b.csv",
        "test": "c.csv",
    }
    recipe = tmp_path / "recipes" / "X" / "hparams"
    recipe.mkdir(parents=True)
    (recipe / "librispeech.yaml").write_text(
        f"base: !include:{ASR / 'transformer.yaml'}\n"
        "    prepare: !name:lobes.data.librispeech.prepare_librispeech\n"
        "        data_folder: !ref <data_folder>\n        save_folder: !ref <output_folder>\n"
    )
    librispeech = load_hparams(recipe / "librispeech.yaml", debug=True, root=tmp_path)
    assert librispeech["prepare"].func.__name__ == "prepare_librispeech"
    assert sorted(librispeech["prepare"].keywords) == ["data_folder", "save_folder"]


def test_files_extending_each_other(tmp_path):
    folder = tmp_path / "recipes" / "R" / "hparams"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.yaml").write_text("root: !PLACEHOLDER\nx: 1\ny: !ref <x> + 1\nobj: !new:collections.OrderedDict\n")
    (folder / "sub" / "b.yaml").write_text("base: !include:../a.yaml\n    x: 10\n")
    (folder / "c.yaml").write_text("base: !include:sub/b.yaml\n    z: !ref <y> * 2\n")
    hparams = load_hparams(folder / "c.yaml", "x: 20")
    assert (hparams["x"], hparams["y"], hparams["z"]) == (20, 21, 42)
    (folder / "loop.yaml").write_text("base: !include:loop.yaml\n")
    with pytest.raises(ValueError, match="extends itself"):
        load_hparams(folder / "loop.yaml")


# ---------------------------------------------------------------------------------------------------------
# History, learning rates
# ---------------------------------------------------------------------------------------------------------


def test_training_history_replaces_a_retrained_epoch(tmp_path):
    history = TrainingHistory(tmp_path, "valid_wer", "valid WER (%)")
    history.record(1, train_loss=3.0, valid_loss=2.0, valid_wer=90.0)
    history.record(2, train_loss=2.0, valid_loss=1.5, valid_wer=70.0)
    history.record(2, train_loss=1.9, valid_loss=1.4, valid_wer=65.0)  # resumed run trained epoch 2 again
    assert TrainingHistory(tmp_path, "valid_wer", "").load() == {
        "1": {"train_loss": 3.0, "valid_loss": 2.0, "valid_wer": 90.0},
        "2": {"train_loss": 1.9, "valid_loss": 1.4, "valid_wer": 65.0},
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "history.json"]  # no temporary left
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_param_group_schedule_keeps_each_group_rate():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = torch.optim.AdamW([{"params": [p], "base_lr": lr} for p, lr in zip(params, (1e-3, 5e-4, 2.5e-4))])
    schedule = ParamGroupSchedule(warmup_steps=10)
    with pytest.raises(RuntimeError, match="total_steps is not set"):
        schedule(optimizer, 0)
    schedule.set_total_steps(100)
    for step in (0, 9, 50, 99):
        top = schedule(optimizer, step)
        factor = warmup_cosine_factor(step, 10, 100)
        expected = [1e-3 * factor, 5e-4 * factor, 2.5e-4 * factor]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)
        assert top == pytest.approx(1e-3 * factor)
    assert warmup_cosine_factor(100, 10, 100) == 0.0
    with pytest.raises(KeyError, match="base_lr"):
        schedule(torch.optim.SGD(params, lr=0.1), 0)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_falls_back_to_fp32_where_the_cpu_only_emulates_it(native, monkeypatch, caplog):
    import speechbrain as sb

    import lobes.inference.precision as precision
    from lobes.recipe import resolve_training_precision

    monkeypatch.setattr(precision, "native_bfloat16", lambda device: native)
    monkeypatch.delenv(precision.FORCE_BF16_ENV, raising=False)
    # from the YAML
    hparams = {"precision": "bf16"}
    _, run_opts, _ = sb.parse_arguments(["x.yaml"])
    with caplog.at_level("WARNING"):
        resolve_training_precision(hparams, run_opts)
    assert hparams["precision"] == ("bf16" if native else "fp32")
    assert ("no native bfloat16" in caplog.text) is (not native)
    # from the command line (which speechbrain's Brain prefers)
    _, run_opts, _ = sb.parse_arguments(["x.yaml", "--precision", "bf16"])
    assert resolve_training_precision({"precision": "fp32"}, run_opts).precision == ("bf16" if native else "fp32")
    # kept when asked to
    monkeypatch.setenv(precision.FORCE_BF16_ENV, "1")
    for asked in ("bf16", "fp32"):
        hparams = {"precision": asked}
        resolve_training_precision(hparams, sb.parse_arguments(["x.yaml"])[1])
        assert hparams["precision"] == asked


def test_native_bfloat16_answers_for_each_device():
    from lobes.inference.precision import native_bfloat16

    assert native_bfloat16("cpu") == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert native_bfloat16("cuda") == bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_inference_bf16_on_an_emulating_device_warns_once(monkeypatch, caplog):
    import lobes.inference.precision as precision

    monkeypatch.setattr(precision, "native_bfloat16", lambda device: False)
    monkeypatch.setattr(precision, "_warned", set())
    with caplog.at_level("WARNING"):
        for _ in range(2):
            with precision.autocast(torch.device("cpu"), "bf16"):
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # still bf16: asked for
            with precision.autocast(torch.device("cpu"), "fp32"):
                pass
    assert caplog.text.count("no native bfloat16") == 1
