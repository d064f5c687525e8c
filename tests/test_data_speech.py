"""The synthetic speech corpus: format, determinism, voice-disjoint splits, resume, no regeneration."""

import hashlib
import json
import os

import numpy as np
import pytest
import soundfile as sf

from lobes.data import speech
from lobes.data.manifest import load_manifest
from lobes.data.text import VOCABULARY

SIZES = dict(num_train=10, num_valid=3, num_test=4, chunk_size=4)


def _checksums(paths):
    out = {}
    for split, path in paths.items():
        for row in load_manifest(path, required=speech.SPEECH_COLUMNS):
            with open(row["wav"], "rb") as handle:
                out[(split, row["ID"])] = hashlib.md5(handle.read()).hexdigest()
    return out


def _manifest_texts(paths, folder):
    """Manifest contents with the data folder replaced, to compare corpora written in two places."""
    return {split: open(path).read().replace(str(folder), "<root>") for split, path in paths.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech_a")
    paths = speech.prepare_speech_corpus(str(folder), seed=3, num_workers=0, **SIZES)
    return folder, paths


def test_manifests_and_audio(corpus):
    folder, paths = corpus
    assert set(paths) == {"train", "valid", "test"}
    for split, expected in (("train", 10), ("valid", 3), ("test", 4)):
        assert paths[split] == os.path.join(str(folder), f"{split}.csv")
        with open(paths[split]) as handle:
            assert handle.readline().strip() == "ID,duration,wav,spk_id,wrd"
        rows = load_manifest(paths[split], required=speech.SPEECH_COLUMNS)
        assert len(rows) == expected
        for row in rows:
            assert os.path.isabs(row["wav"]) and row["wav"].startswith(str(folder))
            info = sf.info(row["wav"])
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            assert abs(float(row["duration"]) - info.frames / 16000) < 1e-4
            assert 0.8 < float(row["duration"]) < 8.0
            words = row["wrd"].split()
            assert row["wrd"] == row["wrd"].upper() and 4 <= len(words) <= 14
            assert set(words) <= set(VOCABULARY)
            wav, _ = sf.read(row["wav"])
            assert 0.05 < np.abs(wav).max() <= 1.0


def test_speechbrain_reads_the_manifest(corpus):
    from speechbrain.dataio.dataio import read_audio
    from speechbrain.dataio.dataset import DynamicItemDataset

    _, paths = corpus
    data = DynamicItemDataset.from_csv(paths["valid"])
    data.add_dynamic_item(read_audio, takes="wav", provides="sig")
    data.set_output_keys(["id", "sig", "wrd", "duration"])
    item = data[0]
    assert item["sig"].shape[0] == item["duration"] * 16000
    assert item["wrd"].isupper()


def test_vocabulary_and_variety(tmp_path):
    assert len(VOCABULARY) >= 300
    bases = speech._base_voices(speech._options({}))
    assert len(bases) >= 6 and "en-shaw" not in bases
    opts = speech._options({})
    items = speech._plan_split("train", 300, str(tmp_path), 1, bases, [None, "m1", "f2", "klatt"], opts)
    assert len({i["wrd"] for i in items}) == 300
    assert len({w for i in items for w in i["wrd"].split()}) > 250
    assert len({i["base"] for i in items}) == len(bases)
    assert len({i["rate"] for i in items}) > 50 and len({i["pitch"] for i in items}) > 40
    kinds = [i["noise"] for i in items]
    assert None in kinds and {"white", "pink", "brown", "hum", "rumble"} <= set(kinds)


def test_voice_disjoint_splits(corpus):
    folder, paths = corpus
    voices = json.load(open(os.path.join(str(folder), "voices.json")))["variants"]
    train_v, valid_v, test_v = set(voices["train"]), set(voices["valid"]), set(voices["test"])
    assert not (train_v & test_v) and not (train_v & valid_v) and not (valid_v & test_v)
    assert test_v and valid_v
    # every family of variants is represented in test
    assert any(v.startswith("m") and v[1:].isdigit() for v in test_v)
    assert any(v.startswith("f") and v[1:].isdigit() for v in test_v)

    def speakers(split):
        return {row["spk_id"] for row in load_manifest(paths[split], required=speech.SPEECH_COLUMNS)}

    def variant(spk):
        return spk.partition("+")[2] or None

    for spk in speakers("test"):
        assert variant(spk) in test_v
    for spk in speakers("valid"):
        assert variant(spk) in valid_v
    train_spk = speakers("train")
    assert all(variant(s) is None or variant(s) in train_v for s in train_spk)
    assert not train_spk & (speakers("test") | speakers("valid"))


def test_split_variants_is_a_partition():
    variants = speech.list_voice_variants()
    parts = speech.split_variants(variants, seed=11)
    together = parts["train"] + parts["valid"] + parts["test"]
    assert sorted(together) == sorted(variants)
    assert 0.1 < len(parts["test"]) / len(variants) < 0.25
    assert parts != speech.split_variants(variants, seed=12)
    with pytest.raises(ValueError, match="valid_fraction"):
        speech.split_variants(variants, valid_fraction=0.6, test_fraction=0.5)


def test_same_seed_identical_other_seed_different(corpus, tmp_path):
    folder, paths = corpus
    again = speech.prepare_speech_corpus(str(tmp_path / "b"), seed=3, num_workers=0, **SIZES)
    assert _manifest_texts(again, tmp_path / "b") == _manifest_texts(paths, folder)
    assert _checksums(again) == _checksums(paths)

    other = speech.prepare_speech_corpus(str(tmp_path / "c"), seed=4, num_workers=0, **SIZES)
    a, c = _checksums(paths), _checksums(other)
    assert all(a[key] != c[key] for key in a)
    texts_a = [r["wrd"] for r in load_manifest(paths["train"])]
    texts_c = [r["wrd"] for r in load_manifest(other["train"])]
    assert texts_a != texts_c


def test_worker_processes_give_the_same_corpus(corpus, tmp_path):
    folder, paths = corpus
    parallel = speech.prepare_speech_corpus(str(tmp_path / "p"), seed=3, num_workers=2, **SIZES)
    assert _checksums(parallel) == _checksums(paths)
    assert _manifest_texts(parallel, tmp_path / "p") == _manifest_texts(paths, folder)


def _mtimes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def test_complete_corpus_is_not_regenerated(corpus, monkeypatch):
    folder, paths = corpus
    before = _mtimes(folder)

    def must_not_render(items):
        raise AssertionError("a complete corpus was rendered again")

    monkeypatch.setattr(speech, "render_utterances", must_not_render)
    assert speech.prepare_speech_corpus(str(folder), seed=3, num_workers=0, **SIZES) == paths
    after = _mtimes(folder)
    assert after == before


def test_interrupted_run_resumes_to_the_same_corpus(corpus, tmp_path, monkeypatch):
    folder, paths = corpus
    target = tmp_path / "resume"
    calls = {"n": 0}
    real_render = speech.render_utterances

    def render_then_crash(items):
        calls["n"] += 1
        if calls["n"] > 2:  # killed while rendering the third chunk of 4
            raise KeyboardInterrupt("killed")
        return real_render(items)

    monkeypatch.setattr(speech, "render_utterances", render_then_crash)
    with pytest.raises(KeyboardInterrupt):
        speech.prepare_speech_corpus(str(target), seed=3, num_workers=0, **SIZES)
    written = sorted(os.listdir(target / "train"))
    assert [n for n in written if n.endswith(".wav")] == [f"train_{i:05d}.wav" for i in range(8)]
    assert not (target / "train.csv").exists() and not [n for n in written if n.endswith(".tmp")]

    rendered = []

    def counting_render(items):
        rendered.extend(item["ID"] for item in items)
        return real_render(items)

    monkeypatch.setattr(speech, "render_utterances", counting_render)
    resumed = speech.prepare_speech_corpus(str(target), seed=3, num_workers=0, **SIZES)
    assert rendered == ["train_00008", "train_00009"] + [f"valid_{i:05d}" for i in range(3)] + [
        f"test_{i:05d}" for i in range(4)
    ]  # only what was missing
    assert _checksums(resumed) == _checksums(paths)
    assert _manifest_texts(resumed, target) == _manifest_texts(paths, folder)

    # a lost marker and a lost file: only that file's chunk is rendered again, to the same bytes
    os.remove(target / ".test.csv.done")
    os.remove(target / "test" / "test_00002.wav")
    rendered.clear()
    speech.prepare_speech_corpus(str(target), seed=3, num_workers=0, **SIZES)
    assert rendered == [f"test_{i:05d}" for i in range(4)]
    assert _checksums(resumed) == _checksums(paths)


def test_other_plan_in_same_folder_replaces_the_split(tmp_path):
    folder = tmp_path / "plan"
    speech.prepare_speech_corpus(str(folder), num_train=5, num_valid=1, num_test=1, seed=1, num_workers=0)
    speech.prepare_speech_corpus(str(folder), num_train=3, num_valid=1, num_test=1, seed=2, num_workers=0)
    rows = load_manifest(str(folder / "train.csv"))
    assert sorted(os.path.basename(r["wav"]) for r in rows) == sorted(
        n for n in os.listdir(folder / "train") if n.endswith(".wav")
    )
    assert len(rows) == 3


def test_train_formant_jitter_changes_only_the_training_voices(corpus, tmp_path):
    folder, paths = corpus
    other = tmp_path / "jitter"
    jittered = speech.prepare_speech_corpus(str(other), seed=3, num_workers=0, train_formant_jitter=(0.2, 0.3), **SIZES)
    before, after = _checksums(paths), _checksums(jittered)
    for key, digest in before.items():
        assert (after[key] == digest) == (key[0] != "train"), key  # every training wav changes, nothing else
    rows = {split: load_manifest(path) for split, path in jittered.items()}
    for split, path in paths.items():
        assert [r["wrd"] for r in load_manifest(path)] == [r["wrd"] for r in rows[split]]
        assert [r["spk_id"] for r in load_manifest(path)] == [r["spk_id"] for r in rows[split]]
    # the same seed gives the same voices again
    again = speech.prepare_speech_corpus(
        str(tmp_path / "again"), seed=3, num_workers=0, train_formant_jitter=(0.2, 0.3), **SIZES
    )
    assert _checksums(again) == after
    # switched off in that folder: the training split is synthesized again, valid and test files are kept
    kept = {row["wav"]: os.stat(row["wav"]).st_mtime_ns for split in ("valid", "test") for row in rows[split]}
    plain = speech.prepare_speech_corpus(str(other), seed=3, num_workers=0, **SIZES)
    assert _checksums(plain) == {key: before[key] for key in after}
    assert kept == {wav: os.stat(wav).st_mtime_ns for wav in kept}


def test_train_echo_share_borrows_the_echo_of_training_variants(corpus, tmp_path):
    from lobes.data.espeak import variant_echo

    folder, paths = corpus
    voices = json.loads((folder / "voices.json").read_text())["variants"]
    opts = speech._options({"train_echo_share": 0.5})
    train_voices = [None] + voices["train"]
    items = speech._plan_split("train", 400, str(tmp_path), 3, ["en-us"], train_voices, opts)
    plain = speech._plan_split("train", 400, str(tmp_path), 3, ["en-us"], train_voices, speech._options({}))
    echoes = {variant_echo(v) for v in voices["train"]} - {(0, 0)}
    drawn = [tuple(item["echo"]) for item in items if "echo" in item]
    assert 150 < len(drawn) < 250 and set(drawn) <= echoes and len(set(drawn)) > 3
    assert [{k: v for k, v in item.items() if k != "echo"} for item in items] == plain  # the rest of the plan kept
    # every training utterance with an echo: valid and test audio unchanged, the texts and voices too
    echoed = speech.prepare_speech_corpus(str(tmp_path / "echo"), seed=3, num_workers=0, train_echo_share=1.0, **SIZES)
    before, after = _checksums(paths), _checksums(echoed)
    assert {k: v for k, v in after.items() if k[0] != "train"} == {k: v for k, v in before.items() if k[0] != "train"}
    assert sum(after[key] != before[key] for key in after if key[0] == "train") >= 8
    for split, path in paths.items():
        assert [(r["wrd"], r["spk_id"]) for r in load_manifest(path)] == [
            (r["wrd"], r["spk_id"]) for r in load_manifest(echoed[split])
        ]
    with pytest.raises(ValueError, match="train_echo_share needs a training voice variant with an echo"):
        speech.prepare_speech_corpus(str(tmp_path / "none"), 2, 1, 1, variants=["m1", "m3", "m4"], train_echo_share=0.5)


def test_option_errors(tmp_path):
    with pytest.raises(TypeError, match="unknown options \\['snr'\\]"):
        speech.prepare_speech_corpus(str(tmp_path), 1, 1, 1, snr=3)
    with pytest.raises(ValueError, match="unknown voice variants \\['zz9'\\]"):
        speech.prepare_speech_corpus(str(tmp_path), 1, 1, 1, variants=["m1", "zz9"])
    with pytest.raises(ValueError, match="too few variants"):
        speech.prepare_speech_corpus(str(tmp_path), 1, 1, 1, variants=["m1"])
    with pytest.raises(ValueError, match="num_train must be a non-negative integer"):
        speech.prepare_speech_corpus(str(tmp_path), -1)
    with pytest.raises(ValueError, match="rate_range"):
        speech.prepare_speech_corpus(str(tmp_path), 1, 1, 1, rate_range=(200, 100))
    for jitter in ((0.2,), (3.0, 0.1), (-0.1, 0.1), "ab"):
        with pytest.raises(ValueError, match="train_formant_jitter must be \\(frequency, strength\\)"):
            speech.prepare_speech_corpus(str(tmp_path), 1, 1, 1, train_formant_jitter=jitter)
    for share in (1.5, -0.1, "a", True, None):
        with pytest.raises(ValueError, match="train_echo_share must be a number in \\[0, 1\\]"):
            speech.prepare_speech_corpus(str(tmp_path), 1, 1, 1, train_echo_share=share)


def test_noise_corpus_works_with_speechbrain_addnoise(tmp_path):
    import torch
    from speechbrain.augment.time_domain import AddNoise

    path = speech.prepare_noise_corpus(str(tmp_path), num=7, duration=1.0, seed=5, num_workers=0)
    rows = load_manifest(path, required=("ID", "duration", "wav"))
    kinds = [row["ID"].split("_", 2)[2] for row in rows]
    assert kinds == ["white", "pink", "brown", "blue", "hum", "rumble", "babble"]
    for row in rows:
        info = sf.info(row["wav"])
        assert info.samplerate == 16000 and info.frames == 16000 and float(row["duration"]) == 1.0
    again = speech.prepare_noise_corpus(str(tmp_path / "again"), num=7, duration=1.0, seed=5, num_workers=0)
    assert [open(r["wav"], "rb").read() for r in load_manifest(again)] == [open(r["wav"], "rb").read() for r in rows]

    clean = torch.zeros(2, 12000)
    noisy = AddNoise(csv_file=path, snr_low=0, snr_high=0, pad_noise=True)(clean + 0.1, torch.ones(2))
    assert noisy.shape == clean.shape and float((noisy - 0.1).abs().mean()) > 1e-3


def test_new_words_split_holds_words_no_training_sentence_has(tmp_path):
    from lobes.data.text import HELD_OUT_WORDS

    paths = speech.prepare_speech_corpus(str(tmp_path), seed=4, num_workers=0, num_test_new_words=12, **SIZES)
    rows = {split: load_manifest(path, required=speech.SPEECH_COLUMNS) for split, path in paths.items()}
    assert sorted(rows) == ["test", "test_new_words", "train", "valid"] and len(rows["test_new_words"]) == 12
    held_out = set(HELD_OUT_WORDS)
    training_words = {w for row in rows["train"] for w in row["wrd"].split()}
    assert not training_words & held_out
    for row in rows["valid"] + rows["test"]:
        assert not set(row["wrd"].split()) & held_out
    for row in rows["test_new_words"]:
        assert set(row["wrd"].split()) & held_out, row["wrd"]
    # test voices, and no sentence of another split is a training sentence
    voices = json.load(open(tmp_path / "voices.json"))["variants"]["test"]
    assert all(row["spk_id"].partition("+")[2] in voices for row in rows["test_new_words"])
    train_sentences = {row["wrd"] for row in rows["train"]}
    others = [row["wrd"] for split in ("valid", "test", "test_new_words") for row in rows[split]]
    assert not train_sentences.intersection(others)
    # asking for the split leaves the other splits byte-identical
    plain = speech.prepare_speech_corpus(str(tmp_path / "plain"), seed=4, num_workers=0, **SIZES)
    assert sorted(plain) == ["test", "train", "valid"]
    assert _manifest_texts(plain, tmp_path / "plain") == {
        k: v for k, v in _manifest_texts(paths, tmp_path).items() if k != "test_new_words"
    }


def test_with_new_words_fixes_articles_and_keeps_other_words():
    from lobes.data.text import HELD_OUT_WORDS, with_new_words

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        words = with_new_words(rng, "AN OLD DOG SAW A BOX NEAR THE RIVER").split()
        assert len(words) == 9 and words[:2] == ["AN", "OLD"] and words[3] == "SAW" and words[6:8] == ["NEAR", "THE"]
        replaced = [i for i in (2, 5, 8) if words[i] in HELD_OUT_WORDS]
        assert replaced, words
        seen.update(words[i] for i in replaced)
        if 5 in replaced:  # the article before a replaced noun agrees with it
            assert words[4] == ("AN" if words[5][0] in "AEIOU" else "A")
    assert {"UMBRELLA", "ENVELOPE"} & seen and {"TIGER", "ZEBRA"} & seen
    assert with_new_words(rng, "WE WILL WAIT") == "WE WILL WAIT"  # no noun: unchanged
