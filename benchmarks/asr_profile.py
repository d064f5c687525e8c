"""Where the ASR main job spends its time: a training step and a whole epoch, broken down by stage.

For each configuration (a recipe YAML plus command-line overrides, as ``train.py`` takes them) the script
loads the recipe exactly as ``train.py`` does (same data, tokenizer, batches, augmentation, model, optimizer,
precision), runs real training steps on real batches of the embedded corpus and times every stage:

- data: reading and collating a batch (the loader of the recipe, length-bucketed batches)
- wav augment / fbank + normalise / feature augment
- front-end (strided convolutions), input projection, and per encoder sub-module: feed-forward blocks,
  token mixer, convolution module, layer norms; CTC head; forward and backward timed apart
- CTC loss (plus the intermediate CTC loss when the YAML has intermediate_ctc_weight > 0), the rest of the backward
  pass, gradient clipping + optimizer step
- per epoch: the steps of one epoch, one validation pass (forward + greedy decoding of the valid set) and
  the checkpoints written (end of epoch and every ``ckpt_interval_minutes``)

Module times come from forward / backward hooks (on CPU every op is synchronous, so wall-clock time between
hooks is the time of the module); what no hook covers (residual additions, autograd bookkeeping) is "other".
The features are marked as requiring a gradient so that the front-end's backward is timed too (its first
convolution then also computes a gradient for its one input channel, a small extra).

    python benchmarks/asr_profile.py --config before=recipes/ASR/hparams/hyperconformer.yaml
    python benchmarks/asr_profile.py --config a=recipes/ASR/hparams/hyperconformer.yaml \\
        --config b=recipes/ASR/hparams/hyperconformer.yaml,--token_type=unigram,--output_neurons=128
    python benchmarks/asr_profile.py --quick ...   # a few steps, a smoke test

Writes ``benchmarks/out/asr_profile.json`` and ``asr_profile.png`` (stacked seconds per epoch by stage, one
bar per configuration) and prints the tables. Needs the corpus of the YAML (the main job synthesizes it;
``--prepare`` synthesizes it here when missing).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import OUT_DIR, fmt, print_table, write_json  # noqa: E402
from lobes.io import atomic_save  # noqa: E402

logger = logging.getLogger(__name__)

LAYER_PARTS = {
    "ffn_module1": "feed-forward",
    "ffn_module2": "feed-forward",
    "mha_layer": "token mixer",
    "convolution_module": "convolution module",
    "norm1": "layer norms",
    "norm2": "layer norms",
    "norm": "layer norms",
    "pos_ffn": "feed-forward",
    "self_att": "token mixer",
}
STAGES = (
    "data",
    "wav augment",
    "fbank + normalise",
    "feature augment",
    "front-end",
    "input projection",
    "feed-forward",
    "token mixer",
    "convolution module",
    "layer norms",
    "CTC head",
    "CTC loss",
    "other forward / backward",
    "optimizer",
)


def _train_module():
    spec = importlib.util.spec_from_file_location("asr_train", ROOT / "recipes" / "ASR" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HookTimer:
    """Forward and backward wall time of chosen sub-modules, summed by stage name."""

    def __init__(self):
        self.totals = collections.Counter()
        self.handles = []
        self._start = {}

    def watch(self, module, stage: str) -> None:
        key = id(module)

        def start(kind):
            def hook(*_):
                self._start[(key, kind)] = time.perf_counter()

            return hook

        def stop(kind):
            def hook(*_):
                self.totals[f"{stage}|{kind}"] += time.perf_counter() - self._start.pop((key, kind))

            return hook

        self.handles += [
            module.register_forward_pre_hook(start("fwd")),
            module.register_forward_hook(stop("fwd")),
            module.register_full_backward_pre_hook(start("bwd")),
            module.register_full_backward_hook(stop("bwd")),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _watch_model(timer: HookTimer, model) -> None:
    timer.watch(model.frontend, "front-end")
    timer.watch(model.proj, "input projection")
    timer.watch(model.ctc_lin, "CTC head")
    for layer in model.encoder.layers:
        for name, child in layer.named_children():
            if name in LAYER_PARTS:
                timer.watch(child, LAYER_PARTS[name])
    if getattr(model.encoder, "norm", None) is not None:
        timer.watch(model.encoder.norm, "layer norms")


def profile_config(name: str, yaml_file: str, overrides: list[str], steps: int, warmup: int, prepare: bool) -> dict:
    """The stage times of one configuration; its run folder (tokenizer, checkpoint) is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="asr_profile_") as out:
        return _profile_in(out, name, yaml_file, overrides, steps, warmup, prepare)


def _profile_in(out: str, name: str, yaml_file: str, overrides: list[str], steps: int, warmup: int, prepare: bool):
    import speechbrain as sb
    import torch

    from lobes.recipe import load_hparams, resolve_training_precision

    train = _train_module()
    argv = [yaml_file, f"--output_folder={out}", *overrides]
    hparams_file, run_opts, override_text = sb.parse_arguments(argv)
    hparams = load_hparams(hparams_file, override_text, root=ROOT)
    resolve_training_precision(hparams, run_opts)  # as train.py: fp32 where the CPU only emulates bf16
    if prepare:
        manifests = hparams["prepare"]()
    else:
        data = Path(hparams["data_folder"])
        manifests = {s: str(data / f"{s}.csv") for s in ("train", "valid", "test")}
        missing = [p for p in manifests.values() if not Path(p).exists()]
        if missing:
            raise SystemExit(f"corpus missing ({missing[0]}): run the main job once or pass --prepare")
    train.prepare_noise(hparams)
    tokenizer = train.build_tokenizer(hparams, manifests["train"])
    datasets = train.dataio_prepare(hparams, manifests, tokenizer)
    loader_kwargs = dict(hparams["train_dataloader_opts"])
    if hparams.get("dynamic_batching", False):
        loader_kwargs = train.length_bucketed_loader(hparams, datasets["train"], loader_kwargs)
    loader = sb.dataio.dataloader.make_dataloader(datasets["train"], **loader_kwargs)
    steps_per_epoch = len(loader)

    model = hparams["model"]
    model.train()
    optimizer = hparams["opt_class"](model.parameters())
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hparams["precision"])
    timer = HookTimer()
    _watch_model(timer, model)
    stage_times = collections.Counter()
    step_times, n_timed = [], 0
    # intermediate CTC (the recipe's intermediate_ctc_weight): the CTC head also on a middle layer's output
    inter_weight, tapped = hparams["intermediate_ctc_weight"], []
    layer = train.intermediate_ctc_layer(model, inter_weight, hparams["intermediate_ctc_layer"])
    if layer is not None:
        tap = layer.register_forward_hook(lambda m, i, o: tapped.append(o[0] if isinstance(o, tuple) else o))
    batches = iter(loader)
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        timed = step >= warmup
        if timed:
            stage_times["data"] += t1 - t0
        timer.totals.clear()
        wavs, wav_lens = batch.sig
        tokens, token_lens = batch.tokens
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            ta = time.perf_counter()
            if hparams["wav_augment"] is not None:
                wavs, wav_lens = hparams["wav_augment"](wavs, wav_lens)
                tokens = hparams["wav_augment"].replicate_labels(tokens)
                token_lens = hparams["wav_augment"].replicate_labels(token_lens)
            tb = time.perf_counter()
            feats, lengths = model.features(wavs, wav_lens)
            tc = time.perf_counter()
            if hparams["fea_augment"] is not None:
                feats = hparams["fea_augment"](feats, lengths.float() / feats.shape[1])
                feats = feats[0] if isinstance(feats, tuple) else feats
            feats.requires_grad_(True)  # so the front-end's backward hook sees its input gradient
            td = time.perf_counter()
            enc, enc_lens = model.encode(feats, lengths)
            log_probs = model.ctc_log_probs(enc)
            inter_log_probs = model.ctc_log_probs(tapped.pop()) if tapped else None
            te = time.perf_counter()
            rel_lens = enc_lens.float() / log_probs.shape[1]
            loss = hparams["ctc_cost"](log_probs, tokens, rel_lens, token_lens)
            if inter_log_probs is not None:
                inter_loss = hparams["ctc_cost"](inter_log_probs, tokens, rel_lens, token_lens)
                loss = (1 - inter_weight) * loss + inter_weight * inter_loss
            tf = time.perf_counter()
        loss.backward()
        tg = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hparams["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        th = time.perf_counter()
        if not timed:
            continue
        n_timed += 1
        stage_times["wav augment"] += tb - ta
        stage_times["fbank + normalise"] += tc - tb
        stage_times["feature augment"] += td - tc
        stage_times["CTC loss"] += tf - te
        stage_times["optimizer"] += th - tg
        hooked = 0.0
        for key, value in timer.totals.items():
            stage_times[key.split("|")[0]] += value
            hooked += value
        stage_times["other forward / backward"] += (te - td) + (tg - tf) - hooked
        step_times.append(th - t0)
    timer.remove()
    if layer is not None:
        tap.remove()
    per_step = {stage: stage_times[stage] / n_timed for stage in STAGES}

    # validation: forward in fp32 + greedy decoding of the whole valid set (what every epoch does)
    model.eval()
    valid_loader = sb.dataio.dataloader.make_dataloader(datasets["valid"], **hparams["valid_dataloader_opts"])
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in valid_loader:
            wavs, wav_lens = batch.sig
            log_probs, enc_lens, _ = model(wavs, wav_lens)
            from lobes.asr import ctc_greedy_decode

            ctc_greedy_decode(log_probs, enc_lens, hparams["blank_index"])
    valid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(out) / "ckpt.pt")
    ckpt_s = time.perf_counter() - t0

    step_s = sum(step_times) / len(step_times)
    train_epoch_s = step_s * steps_per_epoch
    checkpoints = 1 + math.floor(train_epoch_s / 60 / max(hparams["ckpt_interval_minutes"], 1e-9))
    per_epoch = {stage: per_step[stage] * steps_per_epoch for stage in STAGES}
    per_epoch["validation"] = valid_s
    per_epoch["checkpoints"] = ckpt_s * checkpoints
    return {
        "name": name,
        "yaml": yaml_file,
        "overrides": overrides,
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
        "steps_timed": n_timed,
        "steps_per_epoch": steps_per_epoch,
        "step_s": step_s,
        "per_step_s": per_step,
        "per_epoch_s": per_epoch,
        "epoch_s": sum(per_epoch.values()),
        "epochs": hparams["number_of_epochs"],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(STAGES) + ["validation", "checkpoints"]
    fig, ax = plt.subplots(figsize=(5 + 1.6 * len(results), 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, result in enumerate(results):
        bottom = 0.0
        for j, stage in enumerate(stages):
            value = result["per_epoch_s"][stage] * result["epochs"] / 60
            ax.bar(i, value, bottom=bottom, color=colors[j % len(colors)], label=stage if i == 0 else None)
            bottom += value
        ax.text(i, bottom, f"{bottom:.1f} min", ha="center", va="bottom")
    ax.set_xticks(range(len(results)), [f"{r['name']}\n{r['epochs']} epochs" for r in results])
    ax.set_ylabel("minutes of training (all epochs)")
    ax.set_title("ASR main job:\nwhere the training time goes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    from lobes.recipe.history import save_figure

    save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="NAME=YAML[,--override=value,...] (repeat to compare configurations)",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 timed steps (smoke test)")
    parser.add_argument("--prepare", action="store_true", help="synthesize the corpus when missing")
    parser.add_argument("--out", default="asr_profile", help="name of the JSON / PNG under benchmarks/out/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    results = []
    for spec in args.config:
        name, _, rest = spec.partition("=")
        yaml_file, *overrides = rest.split(",")
        results.append(profile_config(name, yaml_file, overrides, steps, warmup, args.prepare))
    rows = []
    for stage in list(STAGES) + ["validation", "checkpoints"]:
        row = {"stage": stage}
        for r in results:
            per_step = r["per_step_s"].get(stage)
            row[f"{r['name']} ms/step"] = fmt(per_step * 1e3 if per_step is not None else None, ".1f")
            row[f"{r['name']} s/epoch"] = fmt(r["per_epoch_s"][stage], ".1f")
        rows.append(row)
    total = {"stage": "total"}
    for r in results:
        total[f"{r['name']} ms/step"] = fmt(r["step_s"] * 1e3, ".1f")
        total[f"{r['name']} s/epoch"] = fmt(r["epoch_s"], ".1f")
    rows.append(total)
    columns = ["stage"] + [f"{r['name']} {u}" for r in results for u in ("ms/step", "s/epoch")]
    print_table(rows, columns)
    for r in results:
        print(
            f"{r['name']}: {r['parameters_M']:.2f} M parameters, {r['steps_per_epoch']} steps/epoch, "
            f"{r['epochs']} epochs -> {r['epoch_s'] * r['epochs'] / 60:.1f} min of training, {r['threads']} threads"
        )
    path = write_json(args.out, {"results": results})
    plot(results, OUT_DIR / f"{args.out}.png")
    print(f"wrote {path} and {OUT_DIR / (args.out + '.png')}")


if __name__ == "__main__":
    main()
