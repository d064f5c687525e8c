"""BEATs throughput: ours (fp32, bf16) against SpeechBrain's BEATs (fp32), same random weights, same run.

The Kaldi fbank alone (against torchaudio and kaldi-native-fbank) and its share of BEATs' time are measured by
``benchmarks/fbank_end_to_end.py``.

    python benchmarks/beats.py            # released size: 12 layers, B = 8 x 10 s
    python benchmarks/beats.py --quick    # 2 layers, B = 2 x 2 s (smoke test)

Prints a table (seconds of audio per second, ratio to SpeechBrain fp32), the accuracy of each candidate
against SpeechBrain's fp32 output (max abs difference, minimum per-token cosine similarity), and writes
``benchmarks/out/beats.json`` and ``benchmarks/out/beats.png``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt, measure, plot_lines, print_table, ratio, write_json  # noqa: E402


def _audio(batch: int, seconds: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 0.1 * torch.randn(batch, int(16000 * seconds), generator=g)


def _write_checkpoint(path: Path, layers: int) -> Path:
    from lobes.beats import BEATs, BEATsConfig

    torch.manual_seed(0)
    cfg = BEATsConfig.released(encoder_layers=layers)
    return BEATs(cfg=cfg).save_checkpoint(path)


# ---------------------------------------------------------------- steps (run in fresh processes)
def setup_ours(ckpt: str, batch: int, seconds: float, mode: str):
    from lobes.beats import BEATs

    model = BEATs(ckpt, freeze=True)
    wav, lens = _audio(batch, seconds), torch.ones(batch)
    if mode == "bf16-cast":
        model.to(torch.bfloat16)
    if mode == "bf16-autocast":

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(wav, lens)

        return step
    return lambda: model(wav, lens)


def setup_speechbrain(ckpt: str, batch: int, seconds: float):
    from speechbrain.lobes.models.beats import BEATs as SBBEATs

    model = SBBEATs(ckpt, freeze=True).eval()
    wav, lens = _audio(batch, seconds), torch.ones(batch)
    return lambda: model(wav, lens)


# ---------------------------------------------------------------- accuracy (in this process)
def _accuracy(ckpt: str, batch: int, seconds: float) -> dict:
    from speechbrain.lobes.models.beats import BEATs as SBBEATs

    from lobes.beats import BEATs

    wav, lens = _audio(batch, seconds), torch.ones(batch)
    with torch.no_grad():
        ref = SBBEATs(ckpt, freeze=True).eval()(wav, lens)[0].float()
        model = BEATs(ckpt)
        out = {"ours fp32": model(wav, lens)[0]}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["ours bf16 autocast"] = model(wav, lens)[0]
        out["ours bf16 cast"] = model.to(torch.bfloat16)(wav, lens)[0]
    acc = {}
    for name, feats in out.items():
        feats = feats.float()
        acc[name] = {
            "max_abs": (feats - ref).abs().max().item(),
            "min_cosine": torch.nn.functional.cosine_similarity(feats, ref, dim=-1).min().item(),
        }
    return acc


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, short audio: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, help="override the number of layers (default 12; 2 with --quick)")
    parser.add_argument("--batch", type=int, help="override the BEATs batch size (default 8; 2 with --quick)")
    parser.add_argument("--seconds", type=float, help="override the clip length (default 10; 2 with --quick)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    layers, batch, seconds = (2, 2, 2.0) if args.quick else (12, 8, 10.0)
    layers, batch, seconds = args.layers or layers, args.batch or batch, args.seconds or seconds
    kw = dict(repeats=args.repeats, warmup=1, threads=args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(_write_checkpoint(Path(tmp) / "beats_random.pt", layers))
        results = {
            "speechbrain fp32": measure(setup_speechbrain, ckpt, batch, seconds, **kw),
            "ours fp32": measure(setup_ours, ckpt, batch, seconds, "fp32", **kw),
            "ours bf16 autocast": measure(setup_ours, ckpt, batch, seconds, "bf16-autocast", **kw),
            "ours bf16 cast": measure(setup_ours, ckpt, batch, seconds, "bf16-cast", **kw),
        }
        accuracy = _accuracy(ckpt, batch, seconds)

    audio = batch * seconds
    base = results.get("speechbrain fp32", {}).get("time_s")
    rows = []
    for name, r in results.items():
        t = r.get("time_s")
        acc = accuracy.get(name, {})
        rows.append(
            {
                "model": name,
                "time_s": fmt(t),
                "audio_s_per_s": fmt(ratio(audio, t)),
                "speedup_vs_sb_fp32": fmt(ratio(base, t)),
                "peak_MiB": fmt(r.get("peak_mib"), ".0f"),
                "max_abs_vs_sb": fmt(acc.get("max_abs")),
                "min_cosine_vs_sb": fmt(acc.get("min_cosine"), ".6f"),
                "error": r.get("error", ""),
            }
        )
    print(f"\nBEATs, {layers} layers, B = {batch} x {seconds:g} s, {args.threads} threads")
    print_table(
        rows,
        [
            "model",
            "time_s",
            "audio_s_per_s",
            "speedup_vs_sb_fp32",
            "peak_MiB",
            "max_abs_vs_sb",
            "min_cosine_vs_sb",
            "error",
        ],
    )
    payload = {
        "config": {
            "layers": layers,
            "batch": batch,
            "seconds": seconds,
            "threads": args.threads,
            "quick": args.quick,
            "torch": torch.__version__,
        },
        "beats": {n: {**r, **accuracy.get(n, {})} for n, r in results.items()},
    }
    print("\nwrote", write_json("beats", payload))
    names = list(results)
    print(
        "wrote",
        plot_lines(
            "beats",
            names,
            {
                "throughput": {"BEATs": [ratio(audio, results[n].get("time_s")) for n in names]},
                "speedup": {"vs speechbrain fp32": [ratio(base, results[n].get("time_s")) for n in names]},
            },
            xlabel="candidate",
            ylabels=("seconds of audio per second", "speedup"),
            panels=("throughput", "speedup"),
            title=f"BEATs {layers} layers, B={batch}x{seconds:g}s ({args.threads} threads)",
        ),
    )
    return payload


if __name__ == "__main__":
    main()
