"""recipes/ASR/train.py end to end on a tiny tone corpus: training, resume, kill -9 and resume, 2-process DDP
(torchrun, and the recipe's own CPU workers)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _builders import (
    ASR_TRAIN,
    ROOT,
    TINY_ASR_PRESET,
    asr_recipe,
    asr_recipe_args,
    letter_tone_corpus,
    recipe_env,
    run_asr_recipe,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return letter_tone_corpus(tmp_path_factory.mktemp("tones"), test_size=4)


def _args(corpus, out, epochs, *extra, **kwargs):
    """A tiny run's arguments, with the lexicon-corrected decoding added to the test stage."""
    return asr_recipe_args(corpus, out, epochs, "--lexicon_correction=True", *extra, **kwargs)


def _test_wer(out):
    """test_wer.txt: the YAML decoder's WER (first line), then ``name: WER`` for the other decodings."""
    first, *rest = (out / "test_wer.txt").read_text().splitlines()
    others = dict(line.split(": ") for line in rest)
    return float(first), {name: float(v) for name, v in others.items()}


def _history(out):
    return json.loads((out / "history.json").read_text())


def test_tiny_training_then_resume_with_a_higher_epoch_limit(corpus, tmp_path):
    out = tmp_path / "run"
    run_asr_recipe(_args(corpus, out, 2))
    history = _history(out)
    assert sorted(history, key=int) == ["1", "2"]
    assert history["2"]["train_loss"] < history["1"]["train_loss"]
    assert history["2"]["valid_loss"] < history["1"]["valid_loss"]
    assert (out / "curves.png").stat().st_size > 0
    wer, others = _test_wer(out)
    assert {"greedy", "lexicon-corrected", "out-of-lexicon words %"} <= set(others)
    assert all(0.0 <= v <= 200.0 for v in [wer, *others.values()])
    for name in ("wer.txt", "wer_greedy.txt", "wer_lexicon.txt"):
        assert "test_0" in (out / name).read_text()
    log_before = (out / "log.txt").read_text()
    assert "Going into epoch 2" in log_before and "Going into epoch 3" not in log_before
    # the cosine schedule spans exactly the 2 epochs: mid-way after the first, zero after the last
    lrs = [
        float(line.split("lr: ")[1].split(" ")[0])
        for line in (out / "train_log.txt").read_text().splitlines()
        if line.startswith("epoch:")
    ]
    assert lrs[0] > 0.001 and lrs[1] == 0.0

    # the same command with a higher limit continues from epoch 2's checkpoint (and tests with speechbrain's
    # CTC beam search instead of the lexicon decoder)
    run_asr_recipe(_args(corpus, out, 3, "--test_decoder=null", "--test_beam_size=3"))
    log_after = (out / "log.txt").read_text()[len(log_before) :]
    assert "Loading a checkpoint" in log_after
    assert "Going into epoch 3" in log_after and "Going into epoch 1" not in log_after
    assert sorted(_history(out), key=int) == ["1", "2", "3"]


def test_intermediate_ctc_trains_and_a_layer_out_of_range_is_refused(corpus, tmp_path):
    """Intermediate CTC on the first of two layers: the run trains (falling losses) and says what it taps; a
    layer the encoder does not have is refused before training, naming the valid range."""
    two_layers = TINY_ASR_PRESET.replace("num_encoder_layers: 1", "num_encoder_layers: 2")
    out = tmp_path / "inter"
    run_asr_recipe(
        _args(corpus, out, 2, f"--preset={two_layers}", "--intermediate_ctc_weight=0.3", "--intermediate_ctc_layer=1")
    )
    history = _history(out)
    assert history["2"]["train_loss"] < history["1"]["train_loss"]
    assert history["2"]["valid_loss"] < history["1"]["valid_loss"]
    assert "intermediate CTC: weight 0.3 on the output of encoder layer 1 of 2" in (out / "log.txt").read_text()

    bad = ["--intermediate_ctc_weight=0.3", "--intermediate_ctc_layer=2", f"--preset={two_layers}"]
    args = _args(corpus, tmp_path / "bad", 1, *bad)
    proc = subprocess.run(
        [sys.executable, str(ASR_TRAIN), *args], cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "intermediate_ctc_layer must name an encoder layer before the last, 1 to 1 (the encoder has 2" in (
        proc.stdout + proc.stderr
    )
    # refused before any work: only the empty checkpoint folder that loading the YAML makes
    assert [p.name for p in (tmp_path / "bad").rglob("*")] == ["save"]


def _children(pid):
    """Process ids of the direct children of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("processes", [1, 2])
def test_kill_during_training_then_resume(corpus, tmp_path, processes):
    out = tmp_path / "killed"
    # length-bucketed batches (2 s of audio each): resuming mid-epoch goes through speechbrain's batch sampler;
    # with 2 processes, plain `python train.py` runs 2 DDP workers that must die with it
    args = _args(
        corpus,
        out,
        1,
        "--ckpt_interval_minutes=0",
        "--ckpt_interval_steps=1",
        "--dynamic_batching=True",
        "--max_batch_len=2",
        "--num_buckets=3",
        f"--cpu_processes={processes}",
    )
    proc = subprocess.Popen(
        [sys.executable, str(ASR_TRAIN)] + args,
        cwd=ROOT,
        env=recipe_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    save = out / "save"
    try:
        while time.time() < deadline and not any(save.glob("CKPT*/COMPLETE")):
            assert proc.poll() is None, "training finished before it could be interrupted"
            time.sleep(0.1)
        assert any(save.glob("CKPT*/COMPLETE")), "no intra-epoch checkpoint appeared"
    finally:
        workers = _children(proc.pid) if processes > 1 else []
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if processes > 1:
        assert len(workers) == processes
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "DDP workers outlived the killed command"
    assert not (out / "test_wer.txt").exists()
    run_asr_recipe(args)
    log = (out / "log.txt").read_text()
    assert "Loading a checkpoint" in log
    assert ("data-parallel training over 2 processes" in log) == (processes == 2)
    assert (out / "test_wer.txt").exists()
    assert sorted(_history(out), key=int) == ["1"]


def test_two_process_ddp_debug_run(corpus, tmp_path):
    out = tmp_path / "ddp"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    run_asr_recipe(
        _args(
            corpus,
            out,
            1,
            "--debug",
            "--distributed_backend=gloo",
            "--dynamic_batching=True",
            "--max_batch_len=2",
            "--num_buckets=3",
        ),
        launcher=launcher,
    )
    assert (out / "test_wer.txt").exists()
    log = (out / "log.txt").read_text()
    assert log.count("Beginning experiment!") >= 1


def test_default_debug_run_from_inside_the_recipe_folder(tmp_path):
    """`cd recipes/ASR && python train.py hparams/hyperconformer.yaml --debug`: the default data, at debug size, in
    folders of their own under <root> (moved to tmp_path); the saved hyperparams.yaml loads back."""
    from hyperpyyaml import load_hyperpyyaml

    recipe = ROOT / "recipes" / "ASR"
    before = sorted(os.listdir(recipe))
    args = [
        "hparams/hyperconformer.yaml",
        "--debug",
        f"--root={tmp_path}",
        f"--preset={TINY_ASR_PRESET}",
        "--intermediate_ctc_weight=0",  # the tiny encoder has one layer
        "--noprogressbar",
    ]
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=recipe, env=recipe_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(recipe)) == before  # nothing written beside the recipe
    assert sorted(os.listdir(tmp_path / "data")) == ["embedded_speech_debug"]  # the full corpus is not touched
    corpus = tmp_path / "data" / "embedded_speech_debug"
    sizes = {split: len(list((corpus / split).glob("*.wav"))) for split in ("train", "valid", "test", "noise")}
    assert sizes == {"train": 24, "valid": 8, "test": 8, "noise": 4}
    assert sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file()) < 10e6
    out = tmp_path / "results" / "debug" / "ASR" / "hyperconformer" / "1234"
    assert _test_wer(out)[0] >= 0.0 and sorted(_history(out)) == ["1", "2"]
    saved = load_hyperpyyaml((out / "hyperparams.yaml").read_text())
    assert saved["prepare"].keywords["data_folder"] == str(corpus)
    assert saved["wav_augment"] is None and saved["fea_augment"] is None  # off by default (see _base.yaml)
    assert [type(a).__name__ for a in saved["spec_augment"].augmentations.values()] == ["SpectrogramDrop"] * 2
    assert any(type(m).__name__ == "HyperMixing" for m in saved["model"].modules())


@pytest.mark.slow
def test_main_job_on_the_embedded_corpus(tmp_path):
    """The full default recipe: synthesize the corpus, train, evaluate on unseen voices (long: ~10-20 min)."""
    out = tmp_path / "main"
    start = time.time()
    run_asr_recipe(
        ["recipes/ASR/hparams/hyperconformer.yaml", f"--output_folder={out}", f"--data_folder={tmp_path / 'corpus'}"],
        timeout=3600,
    )
    wer, others = _test_wer(out)
    print(
        f"test WER on unseen voices: {wer:.2f} % (greedy {others['greedy']:.2f} %) in "
        f"{(time.time() - start) / 60:.1f} min"
    )
    assert wer <= 10.0 and others["greedy"] <= 30.0


def test_test_wer_summary_has_the_new_words_slice_and_out_of_lexicon_figures(tmp_path):
    """test_wer.txt of a run with both test slices: per-slice WERs and the out-of-lexicon figures."""
    from speechbrain.utils.metric_stats import ErrorRateStats

    train = asr_recipe()
    test, greedy, new, new_greedy = (ErrorRateStats() for _ in range(4))
    test.append(["t0", "t1"], [["A", "DOG"], ["THE", "CAT"]], [["A", "DOG"], ["THE", "BAT"]])
    greedy.append(["t0", "t1"], [["A", "DAG"], ["THE", "CAT"]], [["A", "DOG"], ["THE", "BAT"]])
    new.append(["n0"], [["A", "TIGER", "RAN"]], [["A", "TIGER", "RAN"]])
    new_greedy.append(["n0"], [["A", "TIGR", "RUN"]], [["A", "TIGER", "RAN"]])
    sets = {"test": (test, {"greedy": greedy}), "test_new_words": (new, {"greedy": new_greedy})}
    train.write_test_wers(str(tmp_path / "wer.txt"), str(tmp_path), sets, {"A", "DOG", "THE", "CAT", "RAN"})
    lines = (tmp_path / "test_wer.txt").read_text().splitlines()
    assert lines == [
        "25.00",  # 1 of the 4 test words (BAT) is wrong
        "greedy: 50.00",
        "new words: 0.00",
        "new words greedy: 66.67",
        "out-of-lexicon words %: 28.57",  # BAT and TIGER of the 7 reference words
        "utterances with an out-of-lexicon word: 20.00",  # t1 (1 error) and n0 (none) over 5 words
    ]
    for name in ("wer.txt", "wer_greedy.txt", "wer_new_words.txt", "wer_new_words_greedy.txt"):
        assert (tmp_path / name).stat().st_size > 0


def test_greedy_words_skip_outputs_beyond_the_tokenizer(tmp_path):
    """output_neurons may exceed the tokenizer's pieces (a char tokenizer of a small corpus): an output no piece
    has, likely from a barely trained model, is passed over instead of failing in SentencePiece."""
    import types

    import torch
    from speechbrain.tokenizers.SentencePiece import SentencePiece

    text = tmp_path / "train.txt"
    text.write_text("A CAT\nA DOG\n")
    sp = SentencePiece(str(tmp_path), 40, annotation_read="wrd", model_type="char", text_file=str(text))
    pieces = sp.sp.get_piece_size()
    assert pieces < 40
    cat = sp.sp.encode_as_ids("CAT")
    frames = [cat[0], 0, 39, 39, 0] + cat[1:]  # 39: beyond the pieces; 0: blank
    logits = torch.full((1, len(frames), 40), -10.0)
    for t, k in enumerate(frames):
        logits[0, t, k] = 0.0
    logits[0, 2:4, 0] = -1.0  # the blank is the best of the tokenizer's outputs where 39 wins
    brain = types.SimpleNamespace(tokenizer=sp, hparams=types.SimpleNamespace(blank_index=0))
    words = asr_recipe().ASR.greedy_words(brain, torch.log_softmax(logits, -1), torch.tensor([len(frames)]))
    assert words == [["CAT"]]
