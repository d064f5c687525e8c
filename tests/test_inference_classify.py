"""lobes.inference.classify: package a classification run / a Microsoft BEATs checkpoint, load it with
speechbrain's EncoderClassifier (in this process and a fresh one) and with AudioClassifier.

A tiny run of recipes/AudioClassification (three easy classes at mixed rates and channel counts, ~4 s) is
the reference: the packaged model must give the run's own predictions (its test confusion matrix, and the
logits of the run's checkpoint rebuilt the way the recipe evaluates it).
"""

import hashlib
import json
import shutil
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
    TINY_BEATS_CFG,
    classification_csv_args,
    classification_recipe,
    recipe_env,
    tone_class_corpus,
)

from lobes.beats import BEATs, BEATsConfig, masked_mean, token_padding_mask
from lobes.inference.classify import AudioClassifier, package_beats_checkpoint, package_classification_run
from lobes.inference.pretrained import PretrainedError
from lobes.io import load_audio

FILES = {
    "embedding_model.ckpt",
    "classifier.ckpt",
    "label_encoder.ckpt",
    "hyperparams.yaml",
    "README.md",
    "package.json",
}


def make_corpus(root: Path):
    """ID, wav, label CSVs in ``root``; clips at 16 / 22.05 / 8 kHz, every other one stereo."""
    return tone_class_corpus(root, {"train": 4, "valid": 1, "test": 3}, stereo_every=2, right_gain=0.5)


def held_out_items(corpus):
    """``(path, label)`` of the test split, in CSV order."""
    root, csvs = corpus
    rows = [line.split(",") for line in csvs["test"].read_text().splitlines()[1:]]
    return [(str(root / f"{uid}.wav"), label) for uid, _, _, label in rows]


_RUNS = {}


def tiny_classification_run(tmp_path_factory):
    """``(run folder, corpus)``: a 3-epoch beats_tiny run (attentive pooling) on :func:`make_corpus`, made once
    per test session (the README test uses it too)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _RUNS:
        corpus = make_corpus(tmp_path_factory.mktemp("corpus"))
        out = tmp_path_factory.mktemp("runs") / "tiny"
        classification_recipe().main([
            str(CLASSIFICATION / "hparams" / "beats_tiny.yaml"), *classification_csv_args(corpus, out),
            "--beats_cfg", json.dumps(TINY_BEATS_CFG), "--emb_dim", "32", "--number_of_epochs", "3",
            "--batch_size", "6", "--warmup_steps", "2", "--lr_head", "0.003", "--lr_encoder", "0.003",
        ])  # fmt: skip
        _RUNS[key] = (out, corpus)
    return _RUNS[key]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_classification_run(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_classification_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def packaged(run, tmp_path_factory):
    return package_classification_run(run, tmp_path_factory.mktemp("pkg") / "tiny_classifier")


@pytest.fixture(scope="module")
def model(packaged):
    return AudioClassifier.from_pretrained(packaged, device="cpu")


def _copy(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _refresh_manifest(folder):
    """Rewrite package.json checksums after editing a file (a hand-edited but self-consistent folder)."""
    manifest = json.loads((folder / "package.json").read_text())
    manifest["files"] = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in manifest["files"]
        if (folder / name).exists()
    }
    (folder / "package.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- the folder
def test_run_folder_contents(run, packaged, corpus):
    assert {p.name for p in packaged.iterdir()} == FILES
    results = json.loads((run / "test_results.json").read_text())
    readme = (packaged / "README.md").read_text()
    assert f"{100 * results['accuracy']:.2f} %" in readme and f"on {results['num_test']} clips" in readme
    assert "AudioClassifier.from_pretrained" in readme and "EncoderClassifier.from_hparams" in readme
    assert "- training data: the CSV manifest train.csv\n" in readme  # from the run's `prepare` entry
    for name in ("hyperparams.yaml", "README.md", "package.json", "label_encoder.ckpt"):
        text = (packaged / name).read_text()
        assert str(run) not in text and str(corpus[0]) not in text and "/tmp" not in text
    hparams = (packaged / "hyperparams.yaml").read_text()
    assert "optimizer" not in hparams and "ckp_path" not in hparams
    for name in ("embedding_model.ckpt", "classifier.ckpt"):
        state = torch.load(packaged / name, weights_only=True)
        assert all(torch.is_tensor(v) for v in state.values())
    assert not any(k.startswith("encoder.predictor") for k in torch.load(packaged / "embedding_model.ckpt"))


def test_packaging_twice_gives_identical_files(run, packaged, tmp_path):
    again = package_classification_run(run, tmp_path / "again")
    assert {p.name for p in again.iterdir()} == FILES
    for name in FILES:
        assert (again / name).read_bytes() == (packaged / name).read_bytes(), name
    package_classification_run(run, again)  # an earlier package is replaced in place
    assert (again / "classifier.ckpt").read_bytes() == (packaged / "classifier.ckpt").read_bytes()


# ---------------------------------------------------------------------------------------------- predictions
def _recipe_logits(run, paths):
    """The run's best checkpoint evaluated as train.py evaluates it (its own YAML, checkpointer, forward)."""
    from hyperpyyaml import load_hyperpyyaml

    with open(run / "hyperparams.yaml", encoding="utf-8") as f:
        hp = load_hyperpyyaml(f)
    encoder, pooling = hp["encoder"], hp["pooling"]
    hp["label_encoder"].load(run / "save" / "label_encoder.txt")
    head = hp["classifier"](32, len(hp["label_encoder"]))
    checkpointer = hp["checkpointer"]
    checkpointer.add_recoverable("classifier", head)
    checkpointer.add_recoverable("pooling", pooling)
    if "encoder" not in checkpointer.recoverables:  # train.py registers a trained encoder itself
        checkpointer.add_recoverable("encoder", encoder)
    assert checkpointer.recover_if_possible(max_key="acc") is not None
    for module in (encoder, pooling, head):
        module.eval()
    logits = []
    with torch.no_grad():
        for path in paths:
            wav = load_audio(path, 16000)[None]  # (1, N)
            feats = encoder(wav)[0]
            logits.append(head(pooling(feats, token_padding_mask(wav)))[0])
    return torch.stack(logits), [hp["label_encoder"].ind2lab[i] for i in range(len(hp["label_encoder"]))]


def test_labels_equal_the_recipes_own_predictions(run, model, corpus):
    items = held_out_items(corpus)
    paths = [p for p, _ in items]
    top = [tags[0][0] for tags in model.classify(paths, top_k=1)]
    results = json.loads((run / "test_results.json").read_text())
    classes = results["classes"]
    assert model.labels == classes
    confusion = [[0] * len(classes) for _ in classes]
    for (_, truth), pred in zip(items, top):
        confusion[classes.index(truth)][classes.index(pred)] += 1
    assert confusion == results["confusion"]  # the run's own test predictions, clip by clip in aggregate
    logits, names = _recipe_logits(run, paths)
    probs = torch.stack(model.probabilities(paths))
    assert names == model.labels
    torch.testing.assert_close(probs, logits.softmax(-1), atol=2e-5, rtol=1e-4)
    assert len(set(top)) > 1  # a model that learned something, so equality means something


def test_batched_equals_alone_and_any_input_form(model, corpus):
    paths = [p for p, _ in held_out_items(corpus)]
    batched = model.probabilities(paths, batch_seconds=100.0)
    alone = [model.probabilities(p) for p in paths]
    torch.testing.assert_close(torch.stack(batched), torch.stack(alone), atol=1e-5, rtol=1e-4)
    emb_batched, emb_alone = model.embed(paths), [model.embed(p) for p in paths]
    assert emb_batched[0].shape == (32,)
    torch.testing.assert_close(torch.stack(emb_batched), torch.stack(emb_alone), atol=1e-5, rtol=1e-4)
    # the same audio as a tensor, a (samples, channels) int16 array at 8 kHz-equivalent, mixed in one list
    data, rate = sf.read(paths[0], dtype="float32", always_2d=True)
    as_tensor = torch.from_numpy(data.T.copy())  # (channels, samples)
    pcm = (np.clip(data, -1, 1) * 32767).astype(np.int16)  # (samples, channels)
    mixed = model.classify([paths[0], as_tensor, pcm], sample_rate=rate, top_k=3)
    assert [t[0] for t in mixed[0]] == [t[0] for t in mixed[1]] == [t[0] for t in mixed[2]]
    assert [s for _, s in mixed[0]] == pytest.approx([s for _, s in mixed[1]], abs=1e-5)
    single = model.classify(paths[0], top_k=2)
    assert len(single) == 2 and isinstance(single[0][0], str) and 0 < single[0][1] <= 1


def test_sample_rate_is_required_and_resampled(model):
    import torchaudio.functional as AF

    g = torch.Generator().manual_seed(3)
    t = torch.arange(16000) / 16000
    wav = 0.5 * torch.sin(2 * torch.pi * 3000 * t) + 0.01 * torch.randn(16000, generator=g)
    with pytest.raises(ValueError, match="needs sample_rate="):
        model.classify(wav)
    ref = model.probabilities(wav, sample_rate=16000)
    up = model.probabilities(AF.resample(wav, 16000, 48000), sample_rate=48000)
    assert torch.argmax(up) == torch.argmax(ref)
    torch.testing.assert_close(up, ref, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="too short"):
        model.classify([wav, torch.zeros(1000)], sample_rate=16000)


def test_bf16_precision_matches_fp32(packaged, model, corpus):
    paths = [p for p, _ in held_out_items(corpus)]
    bf16 = AudioClassifier.from_pretrained(packaged, device="cpu", precision="bf16")
    torch.testing.assert_close(
        torch.stack(bf16.probabilities(paths)), torch.stack(model.probabilities(paths)), atol=0.05, rtol=0
    )
    with pytest.raises(ValueError, match="precision 'fp8'"):
        AudioClassifier.from_pretrained(packaged, precision="fp8")


# ---------------------------------------------------------------------------------------------- speechbrain
def test_speechbrain_encoder_classifier_in_this_process(packaged, model, corpus, tmp_path):
    from speechbrain.inference.classifiers import EncoderClassifier

    sb_model = EncoderClassifier.from_hparams(
        source=str(packaged), savedir=str(tmp_path / "sb"), run_opts={"device": "cpu"}
    )
    paths = [p for p, _ in held_out_items(corpus)]
    waves = [load_audio(p, 16000) for p in paths]
    lengths = torch.tensor([w.numel() for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : w.numel()] = w
    out_prob, score, index, text = sb_model.classify_batch(batch, lengths / lengths.max())
    ours = model.probabilities(paths)
    torch.testing.assert_close(out_prob.exp(), torch.stack(ours), atol=2e-5, rtol=1e-4)
    assert text == [model.labels[int(p.argmax())] for p in ours]
    emb = sb_model.encode_batch(batch, lengths / lengths.max())
    assert emb.shape == (len(paths), 1, 32)
    torch.testing.assert_close(emb[:, 0], torch.stack(model.embed(paths)), atol=1e-5, rtol=1e-4)
    for path, probs in zip(paths[:3], ours):  # stereo / 22.05 kHz / 8 kHz files through speechbrain's loader
        prob, _, _, label = sb_model.classify_file(path)
        assert label == [model.labels[int(probs.argmax())]]
        torch.testing.assert_close(prob.exp()[0], probs, atol=1e-3, rtol=0)


def test_speechbrain_loads_it_in_a_new_process(packaged, model, corpus, tmp_path):
    paths = [p for p, _ in held_out_items(corpus)]
    script = (
        "import json, sys\n"
        "from speechbrain.inference.classifiers import EncoderClassifier\n"
        "m = EncoderClassifier.from_hparams(source=sys.argv[1], savedir=sys.argv[2], run_opts={'device': 'cpu'})\n"
        "print(json.dumps([m.classify_file(p)[3][0] for p in sys.argv[3:]]))\n"
    )
    env = recipe_env()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(packaged), str(tmp_path / "sb"), *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert labels == [tags[0][0] for tags in model.classify(paths, top_k=1)]


def test_commands_on_the_run(run, packaged, corpus, model, tmp_path):
    from lobes.classify import main as classify_main
    from lobes.package import main as package_main

    assert package_main([str(run), str(tmp_path / "pretrained")]) == 0
    assert all((tmp_path / "pretrained" / n).read_bytes() == (packaged / n).read_bytes() for n in FILES)
    paths = [p for p, _ in held_out_items(corpus)]
    out = tmp_path / "predictions.jsonl"
    assert classify_main([str(tmp_path / "pretrained"), *paths, "--top-k", "2", "--output", str(out), "-q"]) == 0
    records = {r["path"]: [x["label"] for x in r["labels"]] for r in map(json.loads, out.read_text().splitlines())}
    assert records == {p: [label for label, _ in tags] for p, tags in zip(paths, model.classify(paths, top_k=2))}


# ---------------------------------------------------------------------------------------------- loading errors
def test_loading_never_falls_back_silently(packaged, tmp_path):
    from speechbrain.inference.classifiers import EncoderClassifier

    with pytest.raises(PretrainedError, match="no such folder"):
        AudioClassifier.from_pretrained(tmp_path / "nowhere")
    no_weights = _copy(packaged, tmp_path / "a")
    (no_weights / "embedding_model.ckpt").unlink()
    _refresh_manifest(no_weights)
    with pytest.raises(PretrainedError, match=r"no weights for embedding_model: expected embedding_model\.ckpt"):
        AudioClassifier.from_pretrained(no_weights)

    no_loadable = _copy(packaged, tmp_path / "b")
    yaml_path = no_loadable / "hyperparams.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("        classifier: !ref <classifier>\n", ""))
    _refresh_manifest(no_loadable)
    with pytest.raises(PretrainedError, match="'classifier' has weights but is not a loadable"):
        AudioClassifier.from_pretrained(no_loadable)

    mismatch = _copy(packaged, tmp_path / "c")
    (mismatch / "label_encoder.ckpt").write_text(
        "'a' => 0\n'b' => 1\n'c' => 2\n'd' => 3\n================\n'starting_index' => 0\n"
    )
    with pytest.raises(PretrainedError, match="checksum differs"):  # a file swapped behind the manifest
        AudioClassifier.from_pretrained(mismatch)
    _refresh_manifest(mismatch)
    with pytest.raises(PretrainedError, match="holds 4 labels, but the classifier has 3 outputs"):
        AudioClassifier.from_pretrained(mismatch)
    with pytest.raises(PretrainedError, match="holds 4 labels, but the classifier has 3 outputs"):
        EncoderClassifier.from_hparams(source=str(mismatch), savedir=str(tmp_path / "sb_c"))

    wrong_head = _copy(packaged, tmp_path / "d")
    torch.save({"linear.weight": torch.zeros(5, 32), "linear.bias": torch.zeros(5)}, wrong_head / "classifier.ckpt")
    with pytest.raises(PretrainedError, match=r"linear\.weight"):  # speechbrain's own loader is strict too
        EncoderClassifier.from_hparams(source=str(wrong_head), savedir=str(tmp_path / "sb_d"))
    _refresh_manifest(wrong_head)
    with pytest.raises(PretrainedError, match=r"classifier.*linear\.weight"):
        AudioClassifier.from_pretrained(wrong_head)


def test_packaging_errors_name_the_missing_piece(run, tmp_path):
    with pytest.raises(PretrainedError, match="missing the run's hyperparams.yaml"):
        package_classification_run(tmp_path, tmp_path / "out")
    broken = Path(shutil.copytree(run, tmp_path / "run"))
    for ckpt in (broken / "save").glob("CKPT+*"):
        (ckpt / "classifier.ckpt").unlink()
    with pytest.raises(PretrainedError, match=r"classifier\.ckpt: missing"):
        package_classification_run(broken, tmp_path / "out")
    for ckpt in (broken / "save").glob("CKPT+*"):
        (ckpt / "COMPLETE").unlink()
    with pytest.raises(PretrainedError, match="no complete checkpoint"):
        package_classification_run(broken, tmp_path / "out")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(PretrainedError, match="not a pretrained folder"):
        package_classification_run(run, occupied)
    assert (occupied / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- frozen encoder
def microsoft_checkpoint(path, finetuned, classes=4, seed=0):
    """A tiny BEATs checkpoint in Microsoft's format (AudioSet-style ``label_dict`` + predictor when ``finetuned``)."""
    cfg = BEATsConfig.released(**{**TINY_BEATS_CFG, "dropout": 0.0, "attention_dropout": 0.0}).to_dict()
    if finetuned:
        cfg.update(finetuned_model=True, predictor_class=classes, predictor_dropout=0.0)
    torch.manual_seed(seed)
    beats = BEATs(cfg=cfg)
    with torch.no_grad():  # no parameter keeps a trivial value (LayerNorm 1 / 0, zero biases)
        for p in beats.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if finetuned:
        beats.label_dict = {i: f"/m/{i:02d}x" for i in range(classes)}
    return beats.save_checkpoint(path)


def test_frozen_as2m_encoder_run_with_mean_pooling(corpus, tmp_path):
    ckpt = microsoft_checkpoint(tmp_path / "as2m.pt", finetuned=True)
    out = tmp_path / "frozen"
    classification_recipe().main(
        [
            str(CLASSIFICATION / "hparams" / "beats_frozen.yaml"),
            "--ckpt_path",
            str(ckpt),
            "--emb_dim",
            "32",
            *classification_csv_args(corpus, out),
            "--debug",
            "--debug_persistently",
            "--debug_batches",
            "2",
            "--batch_size",
            "5",  # 2 debug batches cover the 9 test clips
            "--pooling",
            "!ref <mean_pooling>",
        ]
    )
    assert not list((out / "save").glob("CKPT+*/encoder.ckpt"))  # the frozen encoder is the checkpoint file
    folder = package_classification_run(out, tmp_path / "pkg")
    assert "masked_mean" in (folder / "hyperparams.yaml").read_text()
    state = torch.load(folder / "embedding_model.ckpt", weights_only=True)
    source = torch.load(ckpt, weights_only=True)["model"]
    assert not any(k.startswith("encoder.predictor") for k in state)
    assert all(torch.equal(state[f"encoder.{k}"], v) for k, v in source.items() if not k.startswith("predictor"))
    model = AudioClassifier.from_pretrained(folder, device="cpu")
    items = held_out_items(corpus)
    results = json.loads((out / "test_results.json").read_text())
    confusion = [[0] * len(CLASSES) for _ in CLASSES]
    for (_, truth), tags in zip(items, model.classify([p for p, _ in items], top_k=1)):
        confusion[results["classes"].index(truth)][results["classes"].index(tags[0][0])] += 1
    assert confusion == results["confusion"]
    ckpt.rename(tmp_path / "moved.pt")  # the frozen encoder's weights exist nowhere else
    with pytest.raises(PretrainedError, match="ckpt_path must exist"):
        package_classification_run(out, tmp_path / "pkg2")


# ---------------------------------------------------------------------------------------------- BEATs checkpoints
def _wavs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    waves = []
    for i in range(n):
        length = 8000 + 3000 * i
        t = torch.arange(length) / 16000
        waves.append(0.3 * torch.sin(2 * torch.pi * (300 + 500 * i) * t) + 0.05 * torch.randn(length, generator=g))
    return waves


def test_as2m_checkpoint_gives_the_same_tags_as_beats_tag(tmp_path):
    from speechbrain.inference.classifiers import EncoderClassifier

    ckpt = microsoft_checkpoint(tmp_path / "as2m.pt", finetuned=True, classes=6)
    names = tmp_path / "class_labels_indices.csv"
    names.write_text("index,mid,display_name\n" + "".join(f'{i},/m/{i:02d}x,"Sound {i}"\n' for i in range(6)))
    folder = package_beats_checkpoint(ckpt, tmp_path / "tagger", names)
    model = AudioClassifier.from_pretrained(folder, device="cpu")
    assert model.multi_label and model.labels == [f"Sound {i}" for i in range(6)]
    beats = BEATs(ckpt)
    waves = _wavs(4)
    ref = [beats.tag(w[None], k=3)[0] for w in waves]
    ours = model.classify(waves, sample_rate=16000, top_k=3)
    display = {f"/m/{i:02d}x": f"Sound {i}" for i in range(6)}
    assert [[label for label, _ in row] for row in ours] == [[display[lab] for lab, _ in row] for row in ref]
    for row, ref_row in zip(ours, ref):
        assert [s for _, s in row] == pytest.approx([s for _, s in ref_row], abs=1e-5)
    sb_model = EncoderClassifier.from_hparams(source=str(folder), savedir=str(tmp_path / "sb"))
    out_prob, _, _, text = sb_model.classify_batch(waves[1][None])
    assert text == [ours[1][0][0]]
    assert out_prob.exp()[0].topk(3).values.tolist() == pytest.approx([s for _, s in ours[1]], abs=1e-5)
    plain = package_beats_checkpoint(ckpt, tmp_path / "ids")  # without names: the checkpoint's label ids
    assert AudioClassifier.from_pretrained(plain).labels == [f"/m/{i:02d}x" for i in range(6)]


def test_pretrained_checkpoint_gives_embeddings_only(tmp_path):
    from speechbrain.inference.classifiers import EncoderClassifier

    ckpt = microsoft_checkpoint(tmp_path / "iter3.pt", finetuned=False)
    folder = package_beats_checkpoint(ckpt, tmp_path / "emb")
    assert {p.name for p in folder.iterdir()} == {
        "embedding_model.ckpt",
        "hyperparams.yaml",
        "README.md",
        "package.json",
    }
    model = AudioClassifier.from_pretrained(folder, device="cpu")
    assert model.labels is None and model.embedding_size == 32
    beats = BEATs(ckpt)
    waves = _wavs(3, seed=1)
    ref = [masked_mean(beats(w[None])[0], token_padding_mask(w[None]))[0] for w in waves]
    torch.testing.assert_close(
        torch.stack(model.embed(waves, sample_rate=16000)), torch.stack(ref), atol=1e-5, rtol=1e-4
    )
    with pytest.raises(ValueError, match="embedding model only"):
        model.classify(waves, sample_rate=16000)
    sb_model = EncoderClassifier.from_hparams(source=str(folder), savedir=str(tmp_path / "sb"))
    torch.testing.assert_close(sb_model.encode_batch(waves[0][None])[0, 0], ref[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(PretrainedError, match="no predictor"):
        package_beats_checkpoint(ckpt, tmp_path / "x", tmp_path / "names.csv")
