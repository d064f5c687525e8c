"""recipes/BEATsPretrain: the --debug chain iter1 -> tokenizer_iter2 -> iter2 (loss falls, checkpoints load back
through lobes.beats, speechbrain's BEATs and the tokenizer lobe), failures before work, resume after kill -9."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from _builders import ROOT, TINY_BEATS_CFG, recipe_env, tone_class_corpus

from lobes.beats import BEATs, BEATsTokenizer, RandomProjectionTokenizer, load_tokenizer

RECIPE = ROOT / "recipes" / "BEATsPretrain"


def _recipe():
    spec = importlib.util.spec_from_file_location("beats_pretrain_train", RECIPE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tone_class_corpus(
        tmp_path_factory.mktemp("corpus"), {"train": 8, "valid": 2, "test": 1}, stereo_every=4, right_gain=1.0
    )


def _args(stage, corpus, results, *extra):
    root, csvs = corpus
    paths = ", ".join(f"{split}: {csvs[split]}" for split in ("train", "valid", "test"))
    return [
        str(RECIPE / "hparams" / f"{stage}.yaml"),
        "--prepare",
        f"!name:lobes.data.manifest.manifest_paths {{{paths}, required: [ID, wav]}}",
        "--data_folder",
        str(root),
        "--results_folder",
        str(results),
        "--beats_cfg",
        json.dumps(TINY_BEATS_CFG),
        "--noprogressbar",
        *extra,
    ]


def test_debug_chain_loss_falls_and_checkpoints_load(corpus, tmp_path):
    from speechbrain.lobes.models.beats import BEATs as SpeechBrainBEATs

    results = tmp_path / "results"
    debug = ["--debug", "--debug_persistently", "--batch_size", "8", "--warmup_steps", "2"]
    recipe = _recipe()
    recipe.main(
        _args("iter1", corpus, results, *debug, "--debug_batches", "3", "--debug_epochs", "8", "--lr", "0.005")
        + ["--quant_n", "32"]
    )
    out1 = results / "iter1" / "1234"
    history = json.loads((out1 / "history.json").read_text())
    losses = [history[str(e)]["train_loss"] for e in range(1, 9)]
    assert losses[-1] < 0.8 * losses[0], losses
    usage = json.loads((out1 / "code_usage.json").read_text())
    assert 1 < usage["8"]["train"]["perplexity"] <= 32 and 0 < usage["8"]["train"]["used"] <= 1

    wav = torch.randn(2, 16000) * 0.1
    model = BEATs(out1 / "beats_iter1.pt")
    assert model.cfg.encoder_embed_dim == TINY_BEATS_CFG["encoder_embed_dim"]
    reference = SpeechBrainBEATs(str(out1 / "beats_iter1.pt"))  # speechbrain's own class loads the file
    torch.testing.assert_close(model(wav)[0], reference(wav, torch.ones(2))[0], atol=1e-4, rtol=1e-4)
    rp = load_tokenizer(out1 / "tokenizer_iter1.pt")
    assert isinstance(rp, RandomProjectionTokenizer) and rp.quant_n == 32

    recipe.main(_args("tokenizer_iter2", corpus, results, *debug, "--quant_n", "16", "--quant_dim", "8"))
    out2 = results / "tokenizer_iter2" / "1234"
    tokenizer = BEATsTokenizer(out2 / "tokenizer_iter2.pt")  # Microsoft's tokenizer layout
    ids = tokenizer.tokenize(wav).ids
    assert ids.shape == (2, 48) and ids.min() >= 0 and ids.max() < 16
    ckpt = torch.load(out2 / "tokenizer_iter2.pt", weights_only=True)
    assert set(ckpt) == {"cfg", "model"} and "quantize.embedding.weight" in ckpt["model"]
    assert "teacher" not in "".join(ckpt["model"]) and "estimator" not in "".join(ckpt["model"])

    recipe.main(_args("iter2", corpus, results, *debug))
    out3 = results / "iter2" / "1234"
    model2 = BEATs(out3 / "beats_iter2.pt")
    assert model2(wav)[0].shape == (2, 48, TINY_BEATS_CFG["encoder_embed_dim"])
    assert "tokenizer_iter2.pt" in (out3 / "hyperparams.yaml").read_text()
    from hyperpyyaml import load_hyperpyyaml

    for folder, kind in (
        (out1, "MaskedTokenPretraining"),
        (out2, "TokenizerDistillation"),
        (out3, "MaskedTokenPretraining"),
    ):
        with open(folder / "hyperparams.yaml") as fh:  # the saved copy loads back anywhere
            assert type(load_hyperpyyaml(fh)["task"]).__name__ == kind


def test_missing_teacher_fails_before_work(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="beats_iter1.pt"):
        _recipe().main(_args("tokenizer_iter2", corpus, tmp_path / "none", "--debug"))
    assert not (tmp_path / "none" / "tokenizer_iter2").exists()


def test_resume_after_kill(corpus, tmp_path):
    """kill -9 once an intra-epoch checkpoint exists; the same command resumes from it and finishes."""
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        str(RECIPE / "train.py"),
        *_args("iter1", corpus, results, "--batch_size", "2", "--number_of_epochs", "3", "--quant_n", "32"),
        "--ckpt_interval_minutes",
        "0",
        "--ckpt_interval_steps",
        "3",
    ]
    out = results / "iter1" / "1234"
    env = recipe_env()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list((out / "save").glob("CKPT+*/COMPLETE")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, 9)
    finally:
        proc.wait()
    kept = list((out / "save").glob("CKPT+*/CKPT.yaml"))
    assert kept, "no checkpoint before the kill"
    assert any("brain_intra_epoch_ckpt: true" in p.read_text() for p in kept)  # killed mid-epoch
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Loading a checkpoint from" in second.stderr + second.stdout
    log = (out / "train_log.txt").read_text()
    epochs = [int(line.split("epoch: ")[1].split(",")[0]) for line in log.splitlines() if "epoch: " in line]
    assert sorted(epochs) == [1, 2, 3]  # no epoch logged twice: the rerun went on from the checkpoint
    assert BEATs(out / "beats_iter1.pt").cfg.encoder_layers == TINY_BEATS_CFG["encoder_layers"]


def test_two_processes_from_the_recipe_folder_on_a_folder_of_audio(corpus, tmp_path):
    """`cd recipes/BEATsPretrain && python train.py hparams/iter1.yaml --cpu_processes 2` on unlabeled folder audio."""
    root, _ = corpus
    prepare = (
        f"!name:lobes.data.unlabeled.prepare_unlabeled_audio {{inputs: [{root}], save_folder: !ref <save_folder>, "
        "valid_fraction: 0.2}"
    )
    cmd = [
        sys.executable,
        "train.py",
        "hparams/iter1.yaml",
        "--prepare",
        prepare,
        "--results_folder",
        str(tmp_path / "results"),
        "--beats_cfg",
        json.dumps(TINY_BEATS_CFG),
        "--quant_n",
        "32",
        "--number_of_epochs",
        "1",
        "--batch_size",
        "4",
        "--cpu_processes",
        "2",
        "--noprogressbar",
    ]
    proc = subprocess.run(cmd, env=recipe_env(), cwd=RECIPE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "results" / "iter1" / "1234"
    assert "data-parallel training over 2 processes" in proc.stderr + proc.stdout
    rows = (out / "save" / "train.csv").read_text().splitlines()
    assert len(rows) - 1 == 26  # 33 readable clips (24 + 6 + 3), 20 % held out for validation
    assert BEATs(out / "beats_iter1.pt").cfg.encoder_embed_dim == TINY_BEATS_CFG["encoder_embed_dim"]
