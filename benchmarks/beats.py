"""BEATs throughput: ours (fp32, bf16) against SpeechBrain's BEATs (fp32), same random weights, same run.

Also the batched Kaldi fbank against torchaudio's per-utterance ``kaldi.fbank`` loop, measured in alternating
rounds (``--fbank-rounds``); its speedup is the median of the per-round ratios. "ours batched" uses the
compiled CPU kernels when a C compiler is available; "ours, pure torch" is the same function with
``LOBES_NATIVE=0``.

    python benchmarks/beats.py            # released size: 12 layers, B = 8 x 10 s; fbank 32 x 10 s
    python benchmarks/beats.py --quick    # 2 layers, B = 2 x 2 s; fbank 8 x 2 s (smoke test)

Prints a table (seconds of audio per second, ratio to SpeechBrain fp32), the accuracy of each candidate
against SpeechBrain's fp32 output (max abs difference, minimum per-token cosine similarity), and writes
``benchmarks/out/beats.json`` and ``benchmarks/out/beats.png``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt, measure, plot_lines, print_table, ratio, write_json  # noqa: E402

BEATS_FBANK = dict(num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)


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


def setup_fbank_ours(batch: int, seconds: float):
    from lobes.features import kaldi_fbank

    wav = _audio(batch, seconds) * 2**15
    return lambda: kaldi_fbank(wav, **BEATS_FBANK)


def setup_fbank_ours_torch(batch: int, seconds: float):
    import os

    os.environ["LOBES_NATIVE"] = "0"  # read when kaldi_fbank first loads its kernels
    return setup_fbank_ours(batch, seconds)


def setup_fbank_torchaudio(batch: int, seconds: float):
    import torchaudio.compliance.kaldi as ta_kaldi

    wav = _audio(batch, seconds) * 2**15
    return lambda: torch.stack([ta_kaldi.fbank(w.unsqueeze(0), **BEATS_FBANK) for w in wav])


def _measure_fbank(rounds: int, batch: int, seconds: float, kw: dict) -> dict:
    """Alternate torchaudio's loop and ours ``rounds`` times (fresh processes, same inputs and options).

    Each entry keeps the median time over all rounds; ``speedup_vs_torchaudio`` is the median of the
    per-round ratios, so a slow change of load on a shared machine affects both sides of each ratio.
    """
    setups = {"torchaudio loop": setup_fbank_torchaudio, "ours batched": setup_fbank_ours,
              "ours, pure torch": setup_fbank_ours_torch}
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, setup in setups.items():
            runs[name].append(measure(setup, batch, seconds, **kw))
    base = [r.get("time_s") for r in runs["torchaudio loop"]]
    out = {}
    for name, rs in runs.items():
        failed = [r for r in rs if not r.get("ok")]
        if failed:
            out[name] = failed[0]
            continue
        times = [r["time_s"] for r in rs]
        pairs = [ratio(b, t) for b, t in zip(base, times)]
        pairs = [p for p in pairs if p is not None]
        out[name] = {"ok": True, "time_s": statistics.median(times), "round_times_s": times,
                     "peak_mib": max(r["peak_mib"] for r in rs), "round_speedups": pairs,
                     "speedup_vs_torchaudio": statistics.median(pairs) if pairs else None}
    return out


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
    parser.add_argument("--fbank-only", action="store_true", help="measure the fbank comparison only")
    parser.add_argument("--fbank-rounds", type=int, default=3,
                        help="alternating torchaudio / ours rounds for the fbank comparison (default 3)")
    parser.add_argument("--layers", type=int, help="override the number of layers (default 12; 2 with --quick)")
    parser.add_argument("--batch", type=int, help="override the BEATs batch size (default 8; 2 with --quick)")
    parser.add_argument("--seconds", type=float, help="override the clip length (default 10; 2 with --quick)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    layers, batch, seconds = (2, 2, 2.0) if args.quick else (12, 8, 10.0)
    layers, batch, seconds = args.layers or layers, args.batch or batch, args.seconds or seconds
    fb_batch, fb_seconds = (8, 2.0) if args.quick else (32, 10.0)
    kw = dict(repeats=args.repeats, warmup=1, threads=args.threads)

    results: dict[str, dict] = {}
    accuracy: dict[str, dict] = {}
    if not args.fbank_only:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = str(_write_checkpoint(Path(tmp) / "beats_random.pt", layers))
            results = {
                "speechbrain fp32": measure(setup_speechbrain, ckpt, batch, seconds, **kw),
                "ours fp32": measure(setup_ours, ckpt, batch, seconds, "fp32", **kw),
                "ours bf16 autocast": measure(setup_ours, ckpt, batch, seconds, "bf16-autocast", **kw),
                "ours bf16 cast": measure(setup_ours, ckpt, batch, seconds, "bf16-cast", **kw),
            }
            accuracy = _accuracy(ckpt, batch, seconds)
    fbank = _measure_fbank(args.fbank_rounds, fb_batch, fb_seconds, kw)

    audio = batch * seconds
    base = results.get("speechbrain fp32", {}).get("time_s")
    rows = []
    for name, r in results.items():
        t = r.get("time_s")
        acc = accuracy.get(name, {})
        rows.append({
            "model": name, "time_s": fmt(t), "audio_s_per_s": fmt(ratio(audio, t)),
            "speedup_vs_sb_fp32": fmt(ratio(base, t)), "peak_MiB": fmt(r.get("peak_mib"), ".0f"),
            "max_abs_vs_sb": fmt(acc.get("max_abs")), "min_cosine_vs_sb": fmt(acc.get("min_cosine"), ".6f"),
            "error": r.get("error", ""),
        })
    if rows:
        print(f"\nBEATs, {layers} layers, B = {batch} x {seconds:g} s, {args.threads} threads")
        print_table(rows, ["model", "time_s", "audio_s_per_s", "speedup_vs_sb_fp32", "peak_MiB", "max_abs_vs_sb",
                           "min_cosine_vs_sb", "error"])
    fb_rows = [{"fbank": n, "time_s": fmt(r.get("time_s")),
                "speedup_vs_torchaudio": fmt(r.get("speedup_vs_torchaudio")),
                "round_speedups": " ".join(fmt(v) for v in r.get("round_speedups", [])),
                "error": r.get("error", "")} for n, r in fbank.items()]
    print(f"\nKaldi fbank (128 bins), {fb_batch} x {fb_seconds:g} s, {args.threads} threads, "
          f"{args.fbank_rounds} alternating rounds (speedup = median of per-round ratios)")
    print_table(fb_rows, ["fbank", "time_s", "speedup_vs_torchaudio", "round_speedups", "error"])
    from lobes import _native

    _native.fbank_library()
    backend = _native.native_status()["fbank"]
    print(f"'ours batched' ran on {backend.split(':')[0]} kernels ({backend.split(': ', 1)[1]}); "
          "'ours, pure torch' with LOBES_NATIVE=0")

    payload = {
        "config": {"layers": layers, "batch": batch, "seconds": seconds, "threads": args.threads,
                   "fbank_batch": fb_batch, "fbank_seconds": fb_seconds, "quick": args.quick,
                   "torch": torch.__version__, "fbank_backend": backend},
        "beats": {n: {**r, **accuracy.get(n, {})} for n, r in results.items()},
        "fbank": fbank,
    }
    print("\nwrote", write_json("beats", payload))
    names = list(results)
    fb_names = list(fbank)
    print("wrote", plot_lines(
        "beats", names + fb_names,
        {"throughput": {"BEATs": [ratio(audio, results[n].get("time_s")) for n in names] + [None] * len(fb_names),
                        "fbank": [None] * len(names) + [ratio(fb_batch * fb_seconds, fbank[n].get("time_s"))
                                                        for n in fb_names]},
         "speedup": {"BEATs vs speechbrain fp32": [ratio(base, results[n].get("time_s")) for n in names]
                     + [None] * len(fb_names),
                     "fbank vs torchaudio loop": [None] * len(names) + [fbank[n].get("speedup_vs_torchaudio")
                                                                        for n in fb_names]}},
        xlabel="candidate", ylabels=("seconds of audio per second", "speedup"), panels=("throughput", "speedup"),
        title=f"BEATs {layers} layers, B={batch}x{seconds:g}s; fbank {fb_batch}x{fb_seconds:g}s ({args.threads} threads)",
        logy=True,  # BEATs (tens of seconds of audio per second) and fbank (thousands) on one axis
    ))
    return payload


if __name__ == "__main__":
    main()
