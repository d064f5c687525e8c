"""``python -m lobes.extract``: outputs equal a direct BEATs call, errors, resume, shards, tags, settings
records, set-up errors before any work, file permissions."""

import csv
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from _builders import ROOT
from _builders import TINY_BEATS_CFG as TINY_CFG

import lobes.extract as extract
from lobes.beats import BEATs, BEATsConfig, valid_token_counts
from lobes.extract import SETTINGS_FILE, _build_parser, main
from lobes.inputs import EXIT_FAILED_FILES, EXIT_OK, EXIT_USAGE, fingerprint, length_batches

ATOL = 2e-4  # fp32, batched-and-padded vs. alone
# conv_pos_groups = 2 (16 channels per group): with 8 channels per group, torch 2.11's CPU bf16 grouped
# conv1d returns wrong values, which would hide the bf16 check below behind that unrelated defect.


def _checkpoint(path: Path, num_classes: int = 0, seed: int = 1) -> Path:
    """A Microsoft-format checkpoint with random weights; with a predictor and label_dict if asked."""
    cfg = BEATsConfig(TINY_CFG).to_dict()  # every field, as released checkpoints carry them
    if num_classes:
        cfg.update(finetuned_model=True, predictor_class=num_classes)
    torch.manual_seed(seed)
    model = BEATs(cfg=cfg)
    ckpt = {"cfg": cfg, "model": model.state_dict()}
    if num_classes:
        ckpt["label_dict"] = {i: f"/m/class{i}" for i in range(num_classes)}
    torch.save(ckpt, path)
    return path


def _tone(seconds, rate, channels=1, freq=440.0, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(len(t))
    if channels == 2:
        wav = np.stack([wav, 0.5 * np.roll(wav, 7)], axis=1)
    return wav.astype(np.float32)


@pytest.fixture(scope="module")
def audio_tree(tmp_path_factory):
    """Mixed formats, rates and channel counts, plus a corrupt file and one too short for BEATs."""
    root = tmp_path_factory.mktemp("audio")
    (root / "sub" / "deeper").mkdir(parents=True)
    sf.write(root / "a.wav", _tone(1.2, 16000, 1, 300, 1), 16000)
    sf.write(root / "sub" / "b.flac", _tone(0.9, 8000, 2, 500, 2), 8000)
    sf.write(root / "sub" / "c.ogg", _tone(1.5, 44100, 1, 700, 3), 44100, format="OGG", subtype="VORBIS")
    sf.write(root / "sub" / "deeper" / "d.wav", _tone(2.1, 44100, 2, 900, 4), 44100)
    sf.write(root / "e.wav", _tone(0.5, 16000, 1, 1100, 5), 16000)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage" + os.urandom(200))
    sf.write(root / "short.wav", _tone(0.05, 16000), 16000)
    return root


GOOD = ["a.wav", "e.wav", "sub/b.flac", "sub/c.ogg", "sub/deeper/d.wav"]
BAD = ["corrupt.wav", "short.wav"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def tagger_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "as2m_style.pt", num_classes=6)


def _reference_input(path: Path) -> torch.Tensor:
    """The documented preprocessing, written independently: mean of channels, resample to 16 kHz."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(data.mean(axis=1).astype(np.float32))
    return AF.resample(wav, rate, 16000) if rate != 16000 else wav


def _load(ckpt, **kw):
    return BEATs(ckp_path=str(ckpt), freeze=True, **kw).eval()


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_match_direct_model_call_errors_listed_and_rerun_skips(audio_tree, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--input",
        str(audio_tree),
        "--output",
        str(out),
        "--checkpoint",
        str(tiny_ckpt),
        "--batch-seconds",
        "4",
        "--quiet",
    ]
    assert main(argv) == EXIT_FAILED_FILES

    model = _load(tiny_ckpt)
    for rel in GOOD:
        feats = np.load(out / f"{rel}.npy")
        wav = _reference_input(audio_tree / rel)
        with torch.no_grad():
            ref = model.extract_features(wav[None])[0][0]  # (N, C), alone, no padding
        assert feats.shape == tuple(ref.shape), rel
        assert feats.shape[0] == int(valid_token_counts(wav[None])[0])
        np.testing.assert_allclose(feats, ref.numpy(), atol=ATOL, rtol=0, err_msg=rel)

    manifest = {Path(r["input"]).relative_to(audio_tree).as_posix(): r for r in _read_csv(out / "manifest.csv")}
    assert sorted(manifest) == GOOD
    assert manifest["sub/b.flac"]["output"] == "sub/b.flac.npy"
    assert abs(float(manifest["sub/b.flac"]["duration"]) - 0.9) < 1e-3
    assert manifest["a.wav"]["shape"] == "x".join(map(str, np.load(out / "a.wav.npy").shape))
    errors = {Path(r["input"]).name: r["reason"] for r in _read_csv(out / "errors.csv")}
    assert sorted(errors) == BAD
    assert "unreadable" in errors["corrupt.wav"] and "too short" in errors["short.wav"]

    # A rerun skips every finished file: nothing is rewritten.
    mtimes = {rel: os.stat(out / f"{rel}.npy").st_mtime_ns for rel in GOOD}
    os.remove(out / "manifest.csv")
    assert main(argv) == EXIT_FAILED_FILES
    assert {rel: os.stat(out / f"{rel}.npy").st_mtime_ns for rel in GOOD} == mtimes
    assert len(_read_csv(out / "manifest.csv")) == len(GOOD)  # rebuilt from the existing outputs
    assert not list(out.rglob("*.tmp"))


def test_mean_pooling_all_layers_and_bf16(audio_tree, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "--input",
            str(audio_tree),
            "--output",
            str(out),
            "--checkpoint",
            str(tiny_ckpt),
            "--pooling",
            "mean",
            "--layer",
            "all",
            "--quiet",
        ]
    )
    assert rc == EXIT_FAILED_FILES
    model = _load(tiny_ckpt, output_all_hiddens=True)
    wav = _reference_input(audio_tree / "sub/deeper/d.wav")
    with torch.no_grad():
        ref = model.extract_features(wav[None])[0][:, 0].mean(dim=1)  # (L + 1, C)
    feats = np.load(out / "sub/deeper/d.wav.npy")
    assert feats.shape == (TINY_CFG["encoder_layers"] + 1, TINY_CFG["encoder_embed_dim"])
    np.testing.assert_allclose(feats, ref.numpy(), atol=ATOL, rtol=0)

    out16 = tmp_path / "bf16"
    assert (
        main(
            [
                "--input",
                str(audio_tree),
                "--output",
                str(out16),
                "--checkpoint",
                str(tiny_ckpt),
                "--pooling",
                "mean",
                "--layer",
                "1",
                "--precision",
                "bf16",
                "--quiet",
            ]
        )
        == EXIT_FAILED_FILES
    )
    got = np.load(out16 / "sub/deeper/d.wav.npy")
    assert got.dtype == np.float32 and got.shape == (TINY_CFG["encoder_embed_dim"],)
    cosine = float(np.dot(got, ref[1]) / np.linalg.norm(got) / np.linalg.norm(ref[1]))
    assert cosine > 0.99, cosine  # bf16 keeps ~3 significant digits


def test_shards_cover_every_file_exactly_once(audio_tree, tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    codes = [
        main(
            [
                "--input",
                str(audio_tree),
                "--output",
                str(out),
                "--checkpoint",
                str(tiny_ckpt),
                "--shard",
                f"{i}/3",
                "--quiet",
                "--pooling",
                "mean",
            ]
        )
        for i in range(3)
    ]
    assert set(codes) <= {EXIT_OK, EXIT_FAILED_FILES} and EXIT_FAILED_FILES in codes
    seen = []
    for i in range(3):
        seen += [r["input"] for r in _read_csv(out / f"manifest.shard-{i}-of-3.csv")]
        seen += [r["input"] for r in _read_csv(out / f"errors.shard-{i}-of-3.csv")]
    assert sorted(Path(p).relative_to(audio_tree).as_posix() for p in seen) == sorted(GOOD + BAD)
    assert main(["--output", str(out), "--merge"]) == EXIT_OK
    assert len(_read_csv(out / "manifest.csv")) == len(GOOD)
    assert len(_read_csv(out / "errors.csv")) == len(BAD)

    # torchrun-style environment splits the same way, combined with --shard.
    env_out = tmp_path / "env"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    main(
        [
            "--input",
            str(audio_tree),
            "--output",
            str(env_out),
            "--checkpoint",
            str(tiny_ckpt),
            "--quiet",
            "--pooling",
            "mean",
        ]
    )
    rows = _read_csv(env_out / "manifest.shard-1-of-2.csv") + _read_csv(env_out / "errors.shard-1-of-2.csv")
    assert len(rows) == len(GOOD + BAD) // 2  # sorted inputs 1, 3, 5


def test_tags_with_as2m_style_checkpoint(audio_tree, tagger_ckpt, tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "--input",
            str(audio_tree),
            "--output",
            str(out),
            "--checkpoint",
            str(tagger_ckpt),
            "--tags",
            "3",
            "--pooling",
            "mean",
            "--quiet",
        ]
    )
    assert rc == EXIT_FAILED_FILES
    rows = _read_csv(out / "tags.csv")
    assert len(rows) == 3 * len(GOOD)
    model = _load(tagger_ckpt)
    for rel in GOOD:
        wav = _reference_input(audio_tree / rel)
        with torch.no_grad():
            _, probs, _ = model.extract_features(wav[None], torch.ones(1))
        p, k = probs[0].topk(3)
        tags = json.loads((out / f"{rel}.tags.json").read_text())
        assert [t["label"] for t in tags] == [f"/m/class{int(i)}" for i in k]
        np.testing.assert_allclose([t["probability"] for t in tags], p.numpy(), atol=ATOL)
        mine = [r for r in rows if r["input"] == str(audio_tree / rel)]
        assert [r["label"] for r in mine] == [t["label"] for t in tags]

    # AudioSet's class_labels_indices.csv turns the label ids into display names.
    names = tmp_path / "class_labels_indices.csv"
    names.write_text("index,mid,display_name\n" + "".join(f'{i},/m/class{i},"Sound {i}"\n' for i in range(6)))
    named = tmp_path / "named"
    assert (
        main(
            [
                "--input",
                str(audio_tree / "a.wav"),
                "--output",
                str(named),
                "--checkpoint",
                str(tagger_ckpt),
                "--tags",
                "3",
                "--pooling",
                "mean",
                "--label-names",
                str(names),
                "--quiet",
            ]
        )
        == EXIT_OK
    )
    first = json.loads((out / "a.wav.tags.json").read_text())
    renamed = json.loads((named / "a.wav.tags.json").read_text())
    assert [t["label"] for t in renamed] == [t["label"].replace("/m/class", "Sound ") for t in first]


def test_tags_need_a_predictor_and_bad_arguments_exit_2(audio_tree, tiny_ckpt, tmp_path, caplog):
    base = ["--input", str(audio_tree), "--output", str(tmp_path / "o"), "--quiet"]
    assert main(base + ["--checkpoint", str(tiny_ckpt), "--tags", "2"]) == EXIT_USAGE
    assert main(base + ["--checkpoint", str(tmp_path / "missing.pt")]) == EXIT_USAGE
    assert main(base + ["--checkpoint", str(tiny_ckpt), "--shard", "3/2"]) == EXIT_USAGE
    assert main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == EXIT_USAGE
    assert main(base + ["--checkpoint", str(tiny_ckpt), "--layer", "first"]) == EXIT_USAGE
    caplog.clear()
    assert main(base + ["--checkpoint", str(tiny_ckpt), "--layer", "3"]) == EXIT_USAGE
    assert "--layer 3: this model has layers 0..2" in caplog.text
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("encoder_layers: 2\n")
    caplog.clear()
    assert main(base + ["--checkpoint", str(tiny_ckpt), "--config", str(cfg)]) == EXIT_USAGE
    assert "one or the other" in caplog.text
    assert not list((tmp_path / "o").rglob("*.npy"))


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the set-up was bad")


def test_output_that_is_a_file_exits_2_before_the_model_loads(audio_tree, tiny_ckpt, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(extract, "load_beats", _must_not_load)
    target = tmp_path / "features.npy"
    target.write_bytes(b"keep me")
    for output in (target, target / "sub"):
        caplog.clear()
        rc = main(["--input", str(audio_tree), "--output", str(output), "--checkpoint", str(tiny_ckpt), "--quiet"])
        assert rc == EXIT_USAGE
        assert f"--output {output}" in caplog.text and "file" in caplog.text
    assert target.read_bytes() == b"keep me"


def test_missing_gpu_or_bad_device_exits_2_before_the_model_loads(audio_tree, tiny_ckpt, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(extract, "load_beats", _must_not_load)
    base = ["--input", str(audio_tree), "--output", str(tmp_path / "o"), "--checkpoint", str(tiny_ckpt), "--quiet"]
    assert main(base + ["--device", "cuda:0"]) == EXIT_USAGE
    assert "--device cuda:0" in caplog.text and "no CUDA GPU" in caplog.text
    caplog.clear()
    assert main(base + ["--device", "gpu0"]) == EXIT_USAGE
    assert "not a torch device" in caplog.text
    assert not (tmp_path / "o").exists()


def test_no_audio_inputs_exit_2_but_an_empty_shard_is_fine(audio_tree, tiny_ckpt, tmp_path, caplog):
    empty = tmp_path / "empty"
    (empty / "docs").mkdir(parents=True)
    (empty / "docs" / "notes.txt").write_text("no audio here")
    header_only = tmp_path / "list.csv"
    header_only.write_text("ID,wav\n")
    for source in (empty, header_only):
        caplog.clear()
        rc = main(["--input", str(source), "--output", str(tmp_path / "o"), "--checkpoint", str(tiny_ckpt)])
        assert rc == EXIT_USAGE
        assert "no audio inputs found" in caplog.text
    assert (
        main(["--input", str(empty), "--output", str(tmp_path / "o"), "--checkpoint", str(tiny_ckpt), "--shard", "1/2"])
        == EXIT_USAGE
    )
    # 7 inputs, 8 shards: the last shard is empty, which is not an error.
    out = tmp_path / "shards"
    assert (
        main(
            [
                "--input",
                str(audio_tree),
                "--output",
                str(out),
                "--checkpoint",
                str(tiny_ckpt),
                "--shard",
                "7/8",
                "--quiet",
            ]
        )
        == EXIT_OK
    )
    assert _read_csv(out / "manifest.shard-7-of-8.csv") == []


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.npy")}


def test_other_settings_are_refused_unless_overwrite(audio_tree, tiny_ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    base = [
        "--input",
        str(audio_tree / "sub"),
        "--output",
        str(out),
        "--checkpoint",
        str(tiny_ckpt),
        "--pooling",
        "mean",
        "--quiet",
    ]
    assert main(base) == EXIT_OK
    record = json.loads((out / SETTINGS_FILE).read_text())
    assert record["checkpoint_sha256"] == fingerprint(tiny_ckpt)
    assert (record["layer"], record["pooling"], record["precision"]) == ("last", "mean", "fp32")
    done = _mtimes(out)
    assert len(done) == 3

    other_ckpt = _checkpoint(tmp_path / "other.pt", seed=2)
    changes = [
        (["--layer", "1"], "layer"),
        (["--precision", "bf16"], "precision"),
        (["--pooling", "none"], "pooling"),
        (["--checkpoint", str(other_ckpt)], "checkpoint_sha256"),
    ]
    for extra, field in changes:
        caplog.clear()
        assert main(base + extra) == EXIT_USAGE, field
        assert f"{field}:" in caplog.text and "--overwrite" in caplog.text, caplog.text
    assert _mtimes(out) == done  # nothing was encoded or removed

    # The same settings resume (the same checkpoint under another name included): nothing is rewritten.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(tiny_ckpt.read_bytes())
    assert main(base + ["--checkpoint", str(copy)]) == EXIT_OK
    assert _mtimes(out) == done

    # --overwrite removes the earlier outputs and starts over with the new settings.
    stale = out / "gone" / "old.wav.npy"
    stale.parent.mkdir()
    np.save(stale, np.zeros(3))
    assert main(base + ["--layer", "1", "--overwrite"]) == EXIT_OK
    assert not stale.exists() and not stale.parent.exists()
    assert json.loads((out / SETTINGS_FILE).read_text())["layer"] == 1
    model = _load(tiny_ckpt)
    wav = _reference_input(audio_tree / "sub" / "b.flac")
    with torch.no_grad():
        ref = model.extract_features(wav[None], layer=1)[0][0].mean(dim=0)
    np.testing.assert_allclose(np.load(out / "b.flac.npy"), ref.numpy(), atol=ATOL, rtol=0)
    assert len(_read_csv(out / "manifest.csv")) == 3
    # ... and a rerun with those settings resumes, --overwrite or not.
    done = _mtimes(out)
    assert main(base + ["--layer", "1", "--overwrite"]) == EXIT_OK
    assert main(base + ["--layer", "1"]) == EXIT_OK
    assert _mtimes(out) == done


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_follow_the_umask(audio_tree, tagger_ckpt, tmp_path, umask, mode):
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        rc = main(
            [
                "--input",
                str(audio_tree / "sub"),
                "--output",
                str(out),
                "--checkpoint",
                str(tagger_ckpt),
                "--pooling",
                "mean",
                "--tags",
                "2",
                "--quiet",
            ]
        )
    finally:
        os.umask(old)
    assert rc == EXIT_OK
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert {"settings.json", "manifest.csv", "errors.csv", "tags.csv", "b.flac.npy", "b.flac.tags.json"} <= set(modes)
    assert set(modes.values()) == {mode}, modes


def test_csv_input_uses_ids(audio_tree, tiny_ckpt, tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("ID,wav\nutt1,{}\nutt2,{}\n".format(audio_tree / "a.wav", audio_tree / "sub/c.ogg"))
    out = tmp_path / "out"
    assert main(["--input", str(manifest), "--output", str(out), "--checkpoint", str(tiny_ckpt), "--quiet"]) == EXIT_OK
    assert sorted(p.name for p in out.glob("*.npy")) == ["utt1.npy", "utt2.npy"]
    with torch.no_grad():
        ref = _load(tiny_ckpt).extract_features(_reference_input(audio_tree / "a.wav")[None])[0][0]
    np.testing.assert_allclose(np.load(out / "utt1.npy"), ref.numpy(), atol=ATOL, rtol=0)
    (tmp_path / "nowav.csv").write_text("ID,path\nx,y\n")
    assert main(["--input", str(tmp_path / "nowav.csv"), "--output", str(out)]) == EXIT_USAGE


def test_length_batches_cover_all_and_respect_budget():
    durations = list(np.random.default_rng(0).uniform(0.2, 9.0, size=200))
    batches = length_batches(durations, batch_seconds=20.0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(b) == 1 or len(b) * max(durations[i] for i in b) <= 20.0


def test_help_and_random_model_warning(audio_tree, tmp_path, caplog):
    help_text = _build_parser().format_help()
    assert "exit codes" in help_text and "16 kHz" in help_text and "mono" in help_text
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in TINY_CFG.items()))
    argv = ["--input", str(audio_tree / "sub"), "--config", str(cfg), "--pooling", "mean", "--quiet"]
    with caplog.at_level(logging.INFO, logger="lobes"):
        rc = main(argv + ["--output", str(tmp_path / "o")])
    assert rc == EXIT_OK
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("RANDOMLY INITIALISED" in w for w in warnings)
    assert any("audio-s/s" in r.getMessage() for r in caplog.records)  # throughput in the log
    outputs = sorted((tmp_path / "o").rglob("*.npy"))
    assert len(outputs) == 3
    # The random model comes from a fixed seed: a second run gives the same features.
    assert main(argv + ["--output", str(tmp_path / "again")]) == EXIT_OK
    for path in outputs:
        assert np.array_equal(np.load(path), np.load(tmp_path / "again" / path.relative_to(tmp_path / "o")))
    # Another architecture into the same folder is refused, naming the cfg field that differs.
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in {**TINY_CFG, "encoder_layers": 1}.items()))
    caplog.clear()
    assert main(argv + ["--output", str(tmp_path / "o")]) == EXIT_USAGE
    assert "cfg" in caplog.text and "encoder_layers" in caplog.text


@pytest.mark.slow
def test_module_entry_point(audio_tree, tiny_ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lobes.extract",
            "--input",
            str(audio_tree),
            "--output",
            str(tmp_path / "o"),
            "--checkpoint",
            str(tiny_ckpt),
            "--num-workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == EXIT_FAILED_FILES, proc.stderr[-2000:]
    assert "audio-s/s" in proc.stderr  # progress bar unit
    assert len(list((tmp_path / "o").rglob("*.npy"))) == len(GOOD)
