"""Does BEATs pre-training help? Linear probe and fine-tuning from random init, iteration 1 and iteration 2.

On the sound-event corpus (spoken keywords in espeak-ng voices + synthetic events, 12 classes):

1. ``recipes/BEATsPretrain`` pre-trains the ``hparams/beats_tiny.yaml`` encoder on the unlabeled train split
   (iteration 1: random-projection tokenizer), distils a tokenizer from it, and pre-trains a fresh encoder on
   that tokenizer's ids (iteration 2). Wall time of each stage is measured.
2. ``recipes/AudioClassification`` trains on a small labeled subset of the same train split, with the same
   model size and the same budget (epochs, batch, learning rates) for every initialisation (the random one is
   written as a checkpoint too, so the three runs differ only in ``--ckpt_path``): a linear probe
   (frozen encoder, mean pooling over valid tokens, linear head) and full fine-tuning, from (a) random init,
   (b) iteration 1, (c) iteration 2. Test clips are the corpus' test split: voices never heard in training
   or pre-training.
3. Codebook usage of each iteration's tokenizer over the pre-training clips (perplexity, share of codes
   used), and how often bf16 autocast changes a token id (test clips).

    python benchmarks/beats_pretrain_probe.py              # the proof (~15-20 min on 2 cores)
    python benchmarks/beats_pretrain_probe.py --quick      # a smoke run of every step (~2 min)

Prints the table and writes ``benchmarks/out/beats_pretrain_probe.json`` (work files under ``--work``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, write_json  # noqa: E402

PRETRAIN = ROOT / "recipes" / "BEATsPretrain"
CLASSIFY = ROOT / "recipes" / "AudioClassification"

FULL = {
    "unlabeled_per_class": 200,
    "labeled_per_class": 16,
    "valid_per_class": 10,
    "test_per_class": 50,
    "iter1_epochs": 12,
    "tokenizer_epochs": 6,
    "iter2_epochs": 12,
    "classify_epochs": 15,
    "probe_lr_head": 0.05,
    "finetune_lr_head": 0.005,
    "finetune_lr_encoder": 0.001,
}
QUICK = {
    "unlabeled_per_class": 8,
    "labeled_per_class": 4,
    "valid_per_class": 2,
    "test_per_class": 4,
    "iter1_epochs": 1,
    "tokenizer_epochs": 1,
    "iter2_epochs": 1,
    "classify_epochs": 1,
    "probe_lr_head": 0.05,
    "finetune_lr_head": 0.005,
    "finetune_lr_encoder": 0.001,
}


def _run(cmd: list[str], log: Path) -> float:
    """Run a recipe command (its output to ``log``); returns the wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def _prepare_corpus(work: Path, s: dict) -> dict[str, str]:
    from lobes.data.events import prepare_event_corpus

    paths = prepare_event_corpus(
        str(work / "events"), s["unlabeled_per_class"], s["valid_per_class"], s["test_per_class"], seed=1234
    )
    # the labeled subset: the first clips of each class of the (unlabeled) pre-training split
    with open(paths["train"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept, per_class = [], {}
    for row in rows:
        if per_class.get(row["label"], 0) < s["labeled_per_class"]:
            per_class[row["label"]] = per_class.get(row["label"], 0) + 1
            kept.append(row)
    labeled = work / "labeled_train.csv"
    with open(labeled, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return {**paths, "labeled": str(labeled)}


def _pretrain(work: Path, s: dict, threads: int) -> dict[str, float]:
    common = [f"--data_folder={work / 'events'}", f"--results_folder={work / 'pretrain'}"]
    prepare = (
        "!name:lobes.data.events.prepare_event_corpus {data_folder: !ref <data_folder>, seed: 1234, "
        f"num_train_per_class: {s['unlabeled_per_class']}, num_valid_per_class: {s['valid_per_class']}, "
        f"num_test_per_class: {s['test_per_class']}}}"
    )
    times = {}
    for stage, epochs in (
        ("iter1", "iter1_epochs"),
        ("tokenizer_iter2", "tokenizer_epochs"),
        ("iter2", "iter2_epochs"),
    ):
        cmd = [
            sys.executable,
            str(PRETRAIN / "train.py"),
            str(PRETRAIN / "hparams" / f"{stage}.yaml"),
            *common,
            f"--prepare={prepare}",
            f"--number_of_epochs={s[epochs]}",
            f"--cpu_processes={threads}",
        ]
        times[stage] = _run(cmd, work / f"pretrain_{stage}.log")
        print(f"{stage}: {times[stage]:.0f} s", flush=True)
    return times


def _random_init(work: Path) -> Path:
    """The randomly initialised encoder of the same size (``hparams/beats_tiny.yaml``), as a checkpoint file."""
    import torch
    import yaml

    from lobes.beats import BEATs

    torch.manual_seed(1234)
    cfg = yaml.safe_load((ROOT / "hparams" / "beats_tiny.yaml").read_text())
    return BEATs(cfg=cfg, freeze=False).save_checkpoint(work / "random_init.pt")


def _classify(work: Path, s: dict, corpus: dict, init: str, mode: str) -> dict:
    out = work / "classify" / f"{init}_{mode}"
    checkpoint = {
        "random": work / "random_init.pt",
        "iter1": work / "pretrain" / "iter1" / "1234" / "beats_iter1.pt",
        "iter2": work / "pretrain" / "iter2" / "1234" / "beats_iter2.pt",
    }[init]
    yaml = "beats_frozen.yaml" if mode == "probe" else "beats_finetune.yaml"
    prepare = (
        f"!name:lobes.data.manifest.manifest_paths {{train: {corpus['labeled']}, valid: {corpus['valid']}, "
        f"test: {corpus['test']}, required: [ID, wav, label]}}"
    )
    cmd = [
        sys.executable,
        str(CLASSIFY / "train.py"),
        str(CLASSIFY / "hparams" / yaml),
        f"--output_folder={out}",
        f"--data_folder={work / 'events'}",
        f"--prepare={prepare}",
        f"--number_of_epochs={s['classify_epochs']}",
        "--batch_size=16",
        f"--lr_head={s[mode + '_lr_head']}",
        f"--lr_encoder={s['finetune_lr_encoder'] if mode == 'finetune' else 0.0}",
        "--layer_decay=1.0",
        "--warmup_steps=20",
        "--emb_dim=128",
        f"--freeze_encoder={mode == 'probe'}",
        "--pooling=!ref <mean_pooling>" if mode == "probe" else "--pooling=!ref <attentive_pooling>",
        f"--ckpt_path={checkpoint}",
    ]
    seconds = _run(cmd, work / f"classify_{init}_{mode}.log")
    results = json.loads((out / "test_results.json").read_text())
    return {"accuracy": results["accuracy"], "num_test": results["num_test"], "seconds": seconds}


def _tokenizer_figures(work: Path, corpus: dict) -> dict:
    """Codebook usage over the pre-training clips and bf16 / fp32 token agreement on the test clips."""
    import torch

    from lobes.beats import load_tokenizer
    from lobes.beats.pretraining import CodeUsage
    from lobes.data.manifest import load_manifest
    from lobes.io import load_audio

    def clips(split):
        return [torch.as_tensor(load_audio(r["wav"], 16000)) for r in load_manifest(corpus[split])]

    def batches(wavs, size=64):
        for i in range(0, len(wavs), size):
            chunk = wavs[i : i + size]
            n = max(w.numel() for w in chunk)
            x = torch.zeros(len(chunk), n)
            for j, w in enumerate(chunk):
                x[j, : w.numel()] = w
            yield x, torch.tensor([w.numel() / n for w in chunk])

    train, test = clips("train"), clips("test")
    figures = {}
    for name, path in (
        ("iter1", work / "pretrain" / "iter1" / "1234" / "tokenizer_iter1.pt"),
        ("iter2", work / "pretrain" / "tokenizer_iter2" / "1234" / "tokenizer_iter2.pt"),
    ):
        tokenizer = load_tokenizer(path)
        usage = CodeUsage(tokenizer.cfg["quant_n"] if isinstance(tokenizer.cfg, dict) else tokenizer.cfg.quant_n)
        for x, lens in batches(train):
            usage.update(tokenizer.tokenize(x, lens).ids)
        changed = total = 0
        for x, lens in batches(test):
            ref = tokenizer.tokenize(x, lens)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = tokenizer.tokenize(x, lens).ids
            valid = ref.mask
            changed += int((low != ref.ids)[valid].sum())
            total += int(valid.sum())
        figures[name] = {**usage.summary(), "bf16_changed_share": changed / max(total, 1), "bf16_tokens": total}
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks every step runs")
    parser.add_argument("--work", default="/tmp/beats_pretrain_probe", help="work folder (corpus, runs, logs)")
    parser.add_argument("--threads", type=int, default=2, help="DDP CPU processes of the pre-training runs")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "classify").mkdir(exist_ok=True)

    start = time.perf_counter()
    corpus = _prepare_corpus(work, settings)
    prep_seconds = time.perf_counter() - start
    print(f"corpus: {prep_seconds:.0f} s", flush=True)
    pretrain_seconds = _pretrain(work, settings, args.threads)
    _random_init(work)
    rows, results = [], {}
    for mode in ("probe", "finetune"):
        for init in ("random", "iter1", "iter2"):
            results[f"{init}_{mode}"] = r = _classify(work, settings, corpus, init, mode)
            print(f"{init} {mode}: {100 * r['accuracy']:.1f} % ({r['seconds']:.0f} s)", flush=True)
    for init in ("random", "iter1", "iter2"):
        rows.append(
            {
                "init": init,
                "linear probe acc %": f"{100 * results[f'{init}_probe']['accuracy']:.1f}",
                "fine-tune acc %": f"{100 * results[f'{init}_finetune']['accuracy']:.1f}",
            }
        )
    tokens = _tokenizer_figures(work, corpus)
    print()
    table = print_table(rows, ["init", "linear probe acc %", "fine-tune acc %"])
    print()
    usage_rows = [
        {
            "tokenizer": name,
            "perplexity": f"{f['perplexity']:.1f}",
            "codes used %": f"{100 * f['used_share']:.1f}",
            "bf16 changed ids %": f"{100 * f['bf16_changed_share']:.2f}",
        }
        for name, f in tokens.items()
    ]
    usage_table = print_table(usage_rows, ["tokenizer", "perplexity", "codes used %", "bf16 changed ids %"])
    print(
        "pre-training wall time (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in pretrain_seconds.items())
        + f"; total {sum(pretrain_seconds.values()):.0f}"
    )
    write_json(
        "beats_pretrain_probe" + ("_quick" if args.quick else ""),
        {
            "settings": settings,
            "threads": args.threads,
            "corpus_seconds": prep_seconds,
            "pretrain_seconds": pretrain_seconds,
            "classification": results,
            "tokenizers": tokens,
            "table": table,
            "usage_table": usage_table,
            "total_seconds": time.perf_counter() - start,
        },
    )


if __name__ == "__main__":
    main()
