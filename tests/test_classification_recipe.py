"""recipes/AudioClassification: tiny training runs, ESC-50 layout, checkpoints in the three YAMLs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from _builders import (
    CLASSES,
    CLASSIFICATION,
    ROOT,
    TINY_BEATS_CFG,
    class_clip,
    classification_csv_args,
    classification_recipe,
    recipe_env,
    tone_class_corpus,
)

from lobes.beats import BEATs


@pytest.fixture(scope="module")
def csv_corpus(tmp_path_factory):
    """Three easy classes at mixed sample rates and channel counts, as ID, wav, label CSVs."""
    return tone_class_corpus(
        tmp_path_factory.mktemp("corpus"), {"train": 8, "valid": 2, "test": 4}, stereo_every=4, right_gain=1.0
    )


def _checkpoint(path, label_dict):
    cfg = dict(TINY_BEATS_CFG)
    if label_dict:
        cfg.update(finetuned_model=True, predictor_class=4)
    model = BEATs(cfg=cfg)
    ckpt = {"cfg": cfg, "model": model.state_dict()}
    if label_dict:
        ckpt["label_dict"] = {i: f"/m/{i}" for i in range(4)}
    torch.save(ckpt, path)
    return path


def _tiny_model_args():
    return ["--beats_cfg", json.dumps(TINY_BEATS_CFG), "--emb_dim", "32"]


def test_tiny_training_beats_chance_and_writes_outputs(csv_corpus, tmp_path):
    out = tmp_path / "run"
    classification_recipe().main(
        [
            str(CLASSIFICATION / "hparams" / "beats_tiny.yaml"),
            *classification_csv_args(csv_corpus, out),
            *_tiny_model_args(),
            "--number_of_epochs",
            "4",
            "--batch_size",
            "6",
            "--warmup_steps",
            "4",
            "--lr_head",
            "0.003",
            "--lr_encoder",
            "0.003",
        ]
    )
    results = json.loads((out / "test_results.json").read_text())
    assert results["num_test"] == 4 * len(CLASSES)
    assert sorted(results["per_class_accuracy"]) == sorted(CLASSES)
    assert results["accuracy"] > 1 / len(CLASSES) + 0.2, results  # chance is 1/3
    assert (out / "confusion.png").stat().st_size > 1000
    assert (out / "curves.png").stat().st_size > 1000
    ckpts = list((out / "save").glob("CKPT+*"))
    assert ckpts and all((c / "classifier.ckpt").exists() for c in ckpts)
    log = (out / "train_log.txt").read_text()
    assert log.count("epoch:") == 4 and "test loss" in log


def test_param_groups_layer_wise_decay():
    recipe = classification_recipe()
    modules = torch.nn.ModuleDict(
        {
            "encoder": BEATs(cfg={**TINY_BEATS_CFG, "encoder_layers": 3}, freeze=False),
            "classifier": torch.nn.Linear(32, 5),
        }
    )
    groups = recipe.param_groups(modules, lr_head=1e-3, lr_encoder=1e-4, layer_decay=0.5, freeze_encoder=False)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == pytest.approx(
        {
            "head": 1e-3,
            "encoder.depth3": 1e-4,
            "encoder.depth2": 5e-5,
            "encoder.depth1": 2.5e-5,
            "encoder.depth0": 1.25e-5,
        }
    )
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(modules.parameters()))
    top = {id(p) for n, p in modules["encoder"].named_parameters() if n.startswith("encoder.layers.2.")}
    assert {id(p) for g in groups if g["name"] == "encoder.depth3" for p in g["params"]} == top
    frozen = recipe.param_groups(modules, 1e-3, 1e-4, 0.5, freeze_encoder=True)
    assert [g["name"] for g in frozen] == ["head"]


def _load_hparams(yaml_name, overrides):
    from lobes.recipe import load_hparams

    return load_hparams(CLASSIFICATION / "hparams" / yaml_name, overrides)


@pytest.mark.parametrize("label_dict", [False, True], ids=["pretrained", "as2m"])
@pytest.mark.parametrize("yaml_name", ["beats_frozen.yaml", "beats_finetune.yaml"])
def test_microsoft_checkpoint_loads_in_frozen_and_finetune(tmp_path, yaml_name, label_dict):
    ckpt = _checkpoint(tmp_path / "beats.pt", label_dict)
    hparams = _load_hparams(yaml_name, {"ckpt_path": str(ckpt), "emb_dim": 32, "output_folder": str(tmp_path / "out")})
    encoder = hparams["encoder"]
    saved = torch.load(ckpt)
    own = encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved["model"].items() if k in own)
    assert (encoder.predictor is not None) == label_dict
    assert encoder.freeze == (yaml_name == "beats_frozen.yaml")
    if label_dict:
        assert encoder.labels == [f"/m/{i}" for i in range(4)]
    classification_recipe().check_hparams(hparams)  # emb_dim matches the checkpoint


@pytest.mark.parametrize(
    "yaml_name,label_dict,extra",
    [
        ("beats_frozen.yaml", True, ["--pooling", "!ref <mean_pooling>"]),
        ("beats_finetune.yaml", False, []),
    ],
    ids=["frozen-as2m-mean", "finetune-pretrained-attentive"],
)
def test_frozen_and_finetune_debug_runs(csv_corpus, tmp_path, yaml_name, label_dict, extra):
    ckpt = _checkpoint(tmp_path / "beats.pt", label_dict)
    out = tmp_path / "run"
    before = torch.load(ckpt)["model"]
    classification_recipe().main(
        [
            str(CLASSIFICATION / "hparams" / yaml_name),
            "--ckpt_path",
            str(ckpt),
            "--emb_dim",
            "32",
            *classification_csv_args(csv_corpus, out),
            "--debug",
            "--debug_persistently",
            "--debug_batches",
            "2",
            "--batch_size",
            "4",
            *extra,
        ]
    )
    assert (out / "test_results.json").exists()
    saved = list((out / "save").glob("CKPT+*/encoder.ckpt"))
    if yaml_name == "beats_frozen.yaml":
        assert not saved  # the frozen encoder is the checkpoint file, not saved again
        assert not list((out / "save").glob("CKPT+*/pooling.ckpt"))  # mean pooling has no weights
    else:
        after = torch.load(saved[0])
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the encoder trained
        assert list((out / "save").glob("CKPT+*/pooling.ckpt"))


def test_bad_emb_dim_settings_and_data_fail_fast(tmp_path):
    from lobes.data.manifest import ManifestError

    recipe = classification_recipe()
    ckpt = _checkpoint(tmp_path / "beats.pt", False)
    out = {"output_folder": str(tmp_path / "out")}
    with pytest.raises(ValueError, match="encoder_embed_dim is 32"):
        recipe.check_hparams(_load_hparams("beats_frozen.yaml", {"ckpt_path": str(ckpt), "emb_dim": 48, **out}))
    base = {"ckpt_path": str(ckpt), "emb_dim": 32, **out}
    with pytest.raises(KeyError, match="'dataset' is not a setting"):  # the old switch is gone, loudly
        _load_hparams("beats_frozen.yaml", {**base, "dataset": "esc50"})
    with pytest.raises(ValueError, match="'ckpt_path' is a !PLACEHOLDER"):
        _load_hparams("beats_frozen.yaml", {"emb_dim": 32, **out})
    hparams = _load_hparams(
        "beats_frozen.yaml",
        f"ckpt_path: {ckpt}\noutput_folder: {tmp_path / 'out'}\n"
        "prepare: !name:lobes.data.manifest.manifest_paths "
        f"{{train: {tmp_path / 'no.csv'}, valid: v.csv, test: t.csv}}",
    )
    with pytest.raises(ManifestError, match="train manifest not found"):
        hparams["prepare"]()


def _fake_esc50(root: Path, per_fold: int = 2, classes=("dog", "rain", "siren")):
    """ESC-50's real layout: audio/<fold>-<src>-<take>-<target>.wav (44.1 kHz) and meta/esc50.csv."""
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rng = np.random.default_rng(1)
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, category in enumerate(classes):
            for k in range(per_fold):
                name = f"{fold}-{1000 + 10 * target + k}-A-{target}.wav"
                label = ["low_tone", "high_tone", "noise"][target]
                sf.write(root / "audio" / name, class_clip(label, rng, 44100), 44100)
                lines.append(f"{name},{fold},{target},{category},False,{1000 + 10 * target + k},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")


def test_esc50_layout_and_fold_selection(tmp_path):
    data = tmp_path / "ESC-50-master"
    _fake_esc50(data)
    out = tmp_path / "run"
    prepare = (
        "!name:lobes.data.esc50.prepare_esc50 {data_folder: !ref <data_folder>, "
        "save_folder: !ref <save_folder>, test_fold: 2, valid_fold: null, sample_rate: !ref <sample_rate>}"
    )
    classification_recipe().main(
        [
            str(CLASSIFICATION / "hparams" / "beats_tiny.yaml"),
            "--prepare",
            prepare,
            "--data_folder",
            str(tmp_path),
            "--output_folder",
            str(out),
            *_tiny_model_args(),
            "--debug",
            "--debug_batches",
            "2",
            "--noprogressbar",
        ]
    )
    results = json.loads((out / "test_results.json").read_text())
    assert results["num_test"] == 3 * 2  # fold 2 only
    assert sorted(results["classes"]) == ["dog", "rain", "siren"]
    test_ids = [line.split(",")[0] for line in (out / "save" / "test.csv").read_text().splitlines()[1:]]
    assert test_ids and all(i.startswith("2-") for i in test_ids)


def test_default_debug_run_from_inside_the_recipe_folder(tmp_path):
    """`cd recipes/AudioClassification && python train.py hparams/beats_tiny.yaml --debug`: a few clips per class of
    the default corpus in a folder of its own under <root> (moved to tmp_path); the saved copy loads back."""
    from hyperpyyaml import load_hyperpyyaml

    before = sorted(os.listdir(CLASSIFICATION))
    env = recipe_env()
    cmd = [
        sys.executable,
        "train.py",
        "hparams/beats_tiny.yaml",
        "--debug",
        "--root",
        str(tmp_path),
        *_tiny_model_args(),
        "--noprogressbar",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=CLASSIFICATION, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(CLASSIFICATION)) == before  # nothing written beside the recipe
    assert sorted(os.listdir(tmp_path / "data")) == ["event_corpus_debug"]  # the full corpus is not touched
    corpus = tmp_path / "data" / "event_corpus_debug"
    assert [len(list((corpus / s).glob("*.wav"))) for s in ("train", "valid", "test")] == [48, 24, 24]
    out = tmp_path / "results" / "debug" / "audio_classification" / "beats_tiny" / "1234"
    assert json.loads((out / "test_results.json").read_text())["num_test"] == 24
    assert sorted(json.loads((out / "history.json").read_text())) == ["1", "2"]
    saved = load_hyperpyyaml((out / "hyperparams.yaml").read_text())
    assert type(saved["encoder"]).__name__ == "BEATs" and saved["emb_dim"] == 32
    assert saved["prepare"].keywords["data_folder"] == str(corpus)


@pytest.mark.slow
def test_torchrun_two_processes_debug(csv_corpus, tmp_path):
    out = tmp_path / "ddp"
    env = recipe_env()
    # --debug alone gives each process its own temporary checkpoint folder: --debug_persistently
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        str(CLASSIFICATION / "train.py"),
        str(CLASSIFICATION / "hparams" / "beats_tiny.yaml"),
        *classification_csv_args(csv_corpus, out),
        *_tiny_model_args(),
        "--distributed_backend",
        "gloo",
        "--debug",
        "--debug_batches",
        "2",
        "--debug_persistently",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "test_results.json").exists()


@pytest.mark.slow
def test_resume_after_kill(csv_corpus, tmp_path):
    """kill -9 after the first epoch's checkpoint; the rerun continues from it and finishes."""
    out = tmp_path / "resume"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(CLASSIFICATION / "train.py"),
        str(CLASSIFICATION / "hparams" / "beats_tiny.yaml"),
        *classification_csv_args(csv_corpus, out),
        *_tiny_model_args(),
        "--number_of_epochs",
        "4",
        "--batch_size",
        "6",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.time() + 500
        while not list((out / "save").glob("CKPT+*/COMPLETE")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.kill()  # SIGKILL
    finally:
        proc.wait()
    assert list((out / "save").glob("CKPT+*/COMPLETE")), "no checkpoint before the kill"
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
    log = (out / "train_log.txt").read_text()
    epochs = [int(line.split("epoch: ")[1].split(",")[0]) for line in log.splitlines() if "epoch: " in line]
    assert epochs[-1] == 4 and sorted(set(epochs)) == [1, 2, 3, 4]
    assert epochs.count(1) == 1  # the second run resumed after epoch 1 instead of starting over
    assert (out / "test_results.json").exists()


@pytest.mark.slow
def test_default_beats_tiny_run_on_unseen_voices(tmp_path):
    """The default recipe from nothing: synthesize the event corpus, train, test on unseen voices (~7 min)."""
    import time

    out = tmp_path / "default"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(CLASSIFICATION / "train.py"),
        str(CLASSIFICATION / "hparams" / "beats_tiny.yaml"),
        f"--output_folder={out}",
        f"--data_folder={tmp_path / 'events'}",
    ]
    start = time.time()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=3600)
    results = json.loads((out / "test_results.json").read_text())
    print(
        f"test accuracy {results['accuracy']:.4f} on {results['num_test']} clips in "
        f"{(time.time() - start) / 60:.1f} min"
    )
    assert results["num_test"] == 1200
    assert results["accuracy"] >= 0.90
