"""What a faster Kaldi fbank buys end to end, and the fbank itself against torchaudio and kaldi-native-fbank.

Three measurements, one run, all in this process with alternating rounds (the machine may be shared: each
candidate runs once per round, in an order that rotates, and every figure is a median over rounds):

1. BEATs extraction (released size, random weights, B x 10 s clips, ``extract_features`` as
   ``python -m lobes.extract`` calls it), fp32 and bf16 (weights cast once, fbank in float32, as
   ``lobes.extract --precision bf16`` does). Candidates for the fbank inside BEATs: ``lobes.features.kaldi_fbank``
   (pure torch); the compiled C kernel of an earlier revision (``--native-rev REV``: its ``lobes/features.py``,
   ``lobes/_native.py`` and ``lobes/csrc/fbank.c`` read with ``git show``); and a zero-cost fbank (the features
   computed beforehand): the most that any faster fbank could buy.
2. ASR training step: the calls of ``lobes.features.kaldi_fbank`` during one forward + CTC loss + backward of the
   ASR preset are counted (the ASR model computes speechbrain's ``Fbank``, so a faster ``kaldi_fbank`` buys it
   nothing).
3. The fbank alone, seconds per 1000 s of audio: ours (pure torch, batched), the kernel of ``--native-rev``,
   torchaudio's ``kaldi.fbank`` and kaldi-native-fbank (``pip install .[bench]``) per clip, same audio, same
   options, at 80 mel bins (all candidates) and at BEATs' 128 bins from 20 Hz, which kaldi-native-fbank refuses
   (one of its filters would cover no FFT bin); its message is printed instead of a time.

    python benchmarks/fbank_end_to_end.py --native-rev 630f50b   # released size, 8 x 10 s; fbank 100 x 10 s
    python benchmarks/fbank_end_to_end.py --quick                # 2 layers, short clips (smoke test)

Prints the tables (ratios are medians of per-round ratios) and writes ``benchmarks/out/fbank_end_to_end.json``
and ``benchmarks/out/fbank_end_to_end.png`` (``fbank_end_to_end_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import fmt, plot_lines, print_table, write_json  # noqa: E402

PURE = "ours, pure torch"
NATIVE = "ours, C kernel"
FREE = "zero-cost fbank (bound)"
TORCHAUDIO = "torchaudio loop"
KNF = "kaldi-native-fbank loop"


def _audio(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, int(16000 * seconds), generator=g)


# ---------------------------------------------------------------- candidates
def native_fbank_from_revision(rev: str, folder: Path) -> Callable:
    """``kaldi_fbank`` with the compiled kernel as it was at git revision ``rev``, loaded as its own package.

    Raises ``RuntimeError`` naming what is missing when ``rev`` has no such kernel or git cannot read it.
    """
    package = folder / "lobes_fbank_rev"
    (package / "csrc").mkdir(parents=True)
    for path in ("lobes/features.py", "lobes/_native.py", "lobes/csrc/fbank.c"):
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"git show {rev}:{path} failed: {done.stderr.strip()}")
        text = done.stdout
        if path == "lobes/features.py":
            if "from lobes import _native" not in text:
                raise RuntimeError(f"{rev}:{path} does not use a compiled kernel")
            text = text.replace("from lobes import _native", "from . import _native")
        (package / path.removeprefix("lobes/")).write_text(text)
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    module = importlib.import_module("lobes_fbank_rev.features")
    native = importlib.import_module("lobes_fbank_rev._native")
    if native.fbank_library() is None:
        raise RuntimeError(f"the kernel of {rev} did not build: {native.native_status()['fbank']}")
    return module.kaldi_fbank


def _knf_fbank(wav: torch.Tensor, bins: int) -> torch.Tensor:
    """kaldi-native-fbank, one clip at a time, with torchaudio's defaults (no dither)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.dither = 0.0  # its default is 3e-5
    opts.mel_opts.num_bins = bins
    out = []
    for clip in wav.numpy():
        fb = knf.OnlineFbank(opts)
        fb.accept_waveform(16000, clip)
        fb.input_finished()
        out.append(np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)]))
    return torch.from_numpy(np.stack(out))


def _fbank_candidates(native: Callable | None) -> tuple[dict[str, Callable], dict[str, str]]:
    """``name -> f(wav (B, T), bins) -> (B, frames, bins)`` and ``name -> why skipped``."""
    import torchaudio.compliance.kaldi as ta_kaldi

    from lobes.features import kaldi_fbank

    found: dict[str, Callable] = {PURE: lambda w, bins: kaldi_fbank(w, num_mel_bins=bins)}
    skipped = {}
    if native is not None:
        found[NATIVE] = lambda w, bins: native(w, num_mel_bins=bins)
    found[TORCHAUDIO] = lambda w, bins: torch.stack([ta_kaldi.fbank(c.unsqueeze(0), num_mel_bins=bins) for c in w])
    try:
        import kaldi_native_fbank  # noqa: F401

        found[KNF] = _knf_fbank
    except ImportError:
        skipped[KNF] = "kaldi-native-fbank is not installed (pip install -e .[bench])"
    return found, skipped


def _rounds(steps: dict[str, Callable], rounds: int) -> dict[str, list[float]]:
    """Time each step once per round, the order rotating from round to round, after one untimed call of each
    (caches, compiled kernels, thread pools); ``name -> times``."""
    names = list(steps)
    for run in steps.values():
        run()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _summary(times: dict[str, list[float]], base: str) -> dict[str, dict]:
    """Median time and median per-round speedup over ``base`` for each candidate."""
    out = {}
    for name, ts in times.items():
        per_round = [b / t for b, t in zip(times[base], ts)]
        out[name] = {
            "time_s": statistics.median(ts),
            "round_times_s": ts,
            "speedup": statistics.median(per_round),
            "round_speedups": per_round,
        }
    return out


# ---------------------------------------------------------------- 1. BEATs extraction
def beats_end_to_end(native: Callable | None, layers: int, batch: int, seconds: float, rounds: int) -> dict:
    """BEATs ``extract_features`` with each fbank candidate (fp32 and bf16 weights), in alternating rounds.

    Per candidate: the step time and its median ratio to the pure-torch step of the same round (direct, but as
    noisy as the machine), and the time spent inside the fbank during each step. From the latter,
    ``estimated_speedup`` = median over rounds of ``step_pure / (step_pure - fbank_pure + fbank_candidate)``:
    what the candidate's fbank alone changes in the pure-torch step of the same round.
    """
    import lobes.beats.model as beats_model
    from lobes.beats import BEATs, BEATsConfig
    from lobes.features import kaldi_fbank

    if getattr(beats_model, "kaldi_fbank", None) is not kaldi_fbank:
        raise RuntimeError(
            "lobes.beats.model no longer calls lobes.features.kaldi_fbank by that name: update this benchmark"
        )
    wav, lens = _audio(batch, seconds), torch.ones(batch)
    precomputed = kaldi_fbank(wav * 2**15, num_mel_bins=128)

    def zero_cost(waveforms, *args, **kwargs):
        if waveforms.shape != wav.shape:
            raise ValueError(
                f"zero-cost fbank: expected the benchmark's batch {tuple(wav.shape)}, got {tuple(waveforms.shape)}"
            )
        return precomputed

    fbanks = {PURE: kaldi_fbank, FREE: zero_cost}
    if native is not None:
        fbanks[NATIVE] = native
    inside: dict[str, list[float]] = {}  # seconds spent in the fbank, one entry per step

    def step(model, name):
        def fbank(*args, **kwargs):
            t0 = time.perf_counter()
            out = fbanks[name](*args, **kwargs)
            inside[name].append(time.perf_counter() - t0)
            return out

        def run():
            beats_model.kaldi_fbank = fbank
            try:
                with torch.no_grad():
                    model.extract_features(wav, lens)
            finally:
                beats_model.kaldi_fbank = kaldi_fbank

        return run

    torch.manual_seed(0)
    models = {"fp32": BEATs(cfg=BEATsConfig.released(encoder_layers=layers)).eval()}
    models["bf16"] = BEATs(cfg=BEATsConfig.released(encoder_layers=layers)).eval()
    models["bf16"].load_state_dict(models["fp32"].state_dict())
    models["bf16"].to(torch.bfloat16)  # as lobes.extract --precision bf16: weights cast once, fbank float32

    audio = batch * seconds
    out: dict[str, dict] = {}
    for precision, model in models.items():
        inside.clear()
        inside.update({n: [] for n in fbanks})
        times = _rounds({name: step(model, name) for name in fbanks}, rounds)
        if any(len(v) != rounds + 1 for v in inside.values()):
            raise RuntimeError(
                f"BEATs did not call the fbank candidate once per step: "
                f"{ {n: len(v) for n, v in inside.items()} } calls in {rounds} rounds and a warm-up"
            )
        fb = {n: v[1:] for n, v in inside.items()}  # without the warm-up
        summary = _summary(times, PURE)
        for name, entry in summary.items():
            estimated = [p / (p - fp + fc) for p, fp, fc in zip(times[PURE], fb[PURE], fb[name])]
            entry.update(
                audio_s_per_s=audio / entry["time_s"],
                fbank_s=statistics.median(fb[name]),
                fbank_share=statistics.median(f / t for f, t in zip(fb[name], times[name])),
                estimated_speedup=statistics.median(estimated),
                round_estimated_speedups=estimated,
            )
        out[precision] = summary
    return out


# ---------------------------------------------------------------- 2. ASR training step
def asr_fbank_calls(preset: Path, batch: int, seconds: float) -> dict:
    """Calls of ``lobes.features.kaldi_fbank`` and of speechbrain's ``Fbank`` in one ASR training step."""
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.lobes.features import Fbank

    import lobes.asr
    import lobes.features

    with open(preset, encoding="utf-8") as fh:
        model = load_hyperpyyaml(fh)["model"].train()
    codes = {
        "lobes.features.kaldi_fbank": lobes.features.kaldi_fbank.__code__,
        "speechbrain.lobes.features.Fbank.forward": Fbank.forward.__code__,
    }
    counts = dict.fromkeys(codes, 0)

    def profiler(frame, event, arg):
        if event == "call":
            for name, code in codes.items():
                if frame.f_code is code:
                    counts[name] += 1

    wav, lens = _audio(batch, seconds, seed=1), torch.linspace(1.0, 0.7, batch)
    targets = torch.randint(1, model.ctc_lin.out_features, (batch, 8))
    sys.setprofile(profiler)
    try:
        log_probs, frames, _ = model(wav, lens)
        loss = torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1), targets, frames, torch.full((batch,), 8), blank=0
        )
        loss.backward()
    finally:
        sys.setprofile(None)
    lines, first = inspect.getsourcelines(lobes.asr.ASRModel.__init__)
    where = next(
        (f"lobes/asr.py:{first + i}: {line.strip()}" for i, line in enumerate(lines) if "Fbank(" in line),
        "no Fbank( line in ASRModel.__init__",
    )
    return {"preset": str(preset.relative_to(ROOT)), "calls": counts, "fbank_line": where}


# ---------------------------------------------------------------- 3. fbank alone
def fbank_table(
    candidates: dict[str, Callable],
    batch: int,
    seconds: float,
    bins_list: list[int],
    threads_list: list[int],
    rounds: int,
) -> dict:
    """Seconds per 1000 s of audio and max abs difference to torchaudio, per (bins, threads) and candidate."""
    wav = _audio(batch, seconds, seed=2) * 2**15
    per_1000 = 1000.0 / (batch * seconds)
    saved = torch.get_num_threads()
    out = {}
    try:
        for bins in bins_list:
            refused, diffs = {}, {}
            ref = candidates[TORCHAUDIO](wav[:4], bins)
            for name, f in candidates.items():
                try:
                    diffs[name] = (f(wav[:4], bins) - ref).abs().max().item()
                except Exception as exc:  # kaldi-native-fbank refuses some settings
                    refused[name] = f"{type(exc).__name__}: {exc}"
            for threads in threads_list:
                torch.set_num_threads(threads)
                steps = {n: (lambda f=f, bins=bins: f(wav, bins)) for n, f in candidates.items() if n not in refused}
                summary = _summary(_rounds(steps, rounds), TORCHAUDIO)
                for name, s in summary.items():
                    s["s_per_1000_s"] = s["time_s"] * per_1000
                    s["max_abs_vs_torchaudio"] = diffs[name]
                out[f"{bins} bins, {threads} thread{'s' if threads > 1 else ''}"] = {
                    "bins": bins,
                    "threads": threads,
                    "results": summary,
                    "refused": refused,
                }
    finally:
        torch.set_num_threads(saved)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, short clips: a smoke test")
    parser.add_argument("--native-rev", help="git revision whose lobes/csrc/fbank.c kernel joins the comparison")
    parser.add_argument("--threads", type=int, default=2, help="threads for BEATs and the ASR step (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of BEATs extraction (default 5)")
    parser.add_argument("--fbank-rounds", type=int, default=5, help="alternating rounds of the fbank table")
    parser.add_argument("--fbank-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bins", type=int, nargs="+", default=[80, 128], help="mel bins of the fbank table")
    parser.add_argument("--layers", type=int, help="BEATs layers (default 12; 2 with --quick)")
    parser.add_argument("--batch", type=int, help="BEATs batch (default 8; 2 with --quick)")
    args = parser.parse_args(argv)
    layers, batch, seconds = (2, 2, 2.0) if args.quick else (12, 8, 10.0)
    layers, batch = args.layers or layers, args.batch or batch
    fb_batch, fb_seconds = (8, 2.0) if args.quick else (100, 10.0)
    rounds = 2 if args.quick else args.rounds
    fb_rounds = 2 if args.quick else args.fbank_rounds
    torch.set_num_threads(args.threads)
    out_name = "fbank_end_to_end_quick" if args.quick else "fbank_end_to_end"
    load_before = os.getloadavg()[0]  # other work on the machine: OpenMP threads that wait for cores slow torch

    with tempfile.TemporaryDirectory() as tmp:
        native, native_note = None, "not measured: no --native-rev given"
        if args.native_rev:
            try:
                native = native_fbank_from_revision(args.native_rev, Path(tmp))
                native_note = f"the kernel of revision {args.native_rev}"
            except RuntimeError as exc:
                native_note = f"not measured: {exc}"
        print(f"{NATIVE}: {native_note}", flush=True)

        beats = beats_end_to_end(native, layers, batch, seconds, rounds)
        asr = asr_fbank_calls(ROOT / "hparams" / "hyperconformer_small.yaml", 2, 3.0)
        candidates, skipped = _fbank_candidates(native)
        fbank = fbank_table(candidates, fb_batch, fb_seconds, args.bins, args.fbank_threads, fb_rounds)

    rows = [
        {
            "precision": p,
            "fbank": n,
            "time_s": fmt(e["time_s"]),
            "audio_s_per_s": fmt(e["audio_s_per_s"]),
            "measured": fmt(e["speedup"], ".3f"),
            "round_ratios": " ".join(fmt(v, ".2f") for v in e["round_speedups"]),
            "fbank_ms": fmt(1000 * e["fbank_s"]),
            "fbank_share_%": fmt(100 * e["fbank_share"], ".2f"),
            "estimated": fmt(e["estimated_speedup"], ".4f"),
        }
        for p in ("fp32", "bf16")
        for n, e in beats[p].items()
    ]
    print(
        f"\nBEATs extraction, {layers} layers, B = {batch} x {seconds:g} s, {args.threads} threads, {rounds} "
        "alternating rounds.\nmeasured = median of per-round step-time ratios to pure torch; estimated = the same "
        "from the time spent inside the fbank during each step (fbank_ms, median) against the pure-torch step"
    )
    print_table(
        rows,
        [
            "precision",
            "fbank",
            "time_s",
            "audio_s_per_s",
            "measured",
            "round_ratios",
            "fbank_ms",
            "fbank_share_%",
            "estimated",
        ],
    )

    print(
        f"\nASR training step ({asr['preset']}, forward + CTC loss + backward): "
        + ", ".join(f"{k} called {v} times" for k, v in asr["calls"].items())
    )
    print(f"  the ASR model's fbank: {asr['fbank_line']}")

    fb_rows = []
    for setting, entry in fbank.items():
        for name, s in entry["results"].items():
            fb_rows.append(
                {
                    "setting": setting,
                    "fbank": name,
                    "s_per_1000_s": fmt(s["s_per_1000_s"]),
                    "vs_torchaudio": fmt(s["speedup"]),
                    "max_abs_vs_torchaudio": fmt(s["max_abs_vs_torchaudio"], ".2g"),
                }
            )
        for name, why in entry["refused"].items():
            fb_rows.append(
                {
                    "setting": setting,
                    "fbank": name,
                    "s_per_1000_s": "refused",
                    "vs_torchaudio": "-",
                    "max_abs_vs_torchaudio": why,
                }
            )
    print(
        f"\nKaldi fbank, {fb_batch} x {fb_seconds:g} s, seconds per 1000 s of audio, {fb_rounds} alternating rounds "
        "(vs_torchaudio = median of per-round ratios)"
    )
    print_table(fb_rows, ["setting", "fbank", "s_per_1000_s", "vs_torchaudio", "max_abs_vs_torchaudio"])
    for name, why in skipped.items():
        print(f"{name}: skipped, {why}")

    payload = {
        "config": {
            "layers": layers,
            "batch": batch,
            "seconds": seconds,
            "threads": args.threads,
            "rounds": rounds,
            "fbank_batch": fb_batch,
            "fbank_seconds": fb_seconds,
            "fbank_rounds": fb_rounds,
            "native": native_note,
            "quick": args.quick,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average_1min": [load_before, os.getloadavg()[0]],
        },
        "beats": beats,
        "asr": asr,
        "fbank": fbank,
        "skipped": skipped,
    }
    print(
        f"\n{os.cpu_count()} CPUs; 1-minute load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print("wrote", write_json(out_name, payload))
    x = [PURE, NATIVE, FREE, TORCHAUDIO, KNF]
    print(
        "wrote",
        plot_lines(
            out_name,
            x,
            {
                "beats": {
                    f"BEATs {p}": [beats[p][n]["audio_s_per_s"] if n in beats[p] else None for n in x]
                    for p in ("fp32", "bf16")
                },
                "fbank": {
                    setting: [1000.0 / e["results"][n]["s_per_1000_s"] if n in e["results"] else None for n in x]
                    for setting, e in fbank.items()
                },
            },
            xlabel="fbank",
            ylabels=("BEATs extraction, seconds of audio per second", "fbank, seconds of audio per second"),
            panels=("beats", "fbank"),
            title=f"BEATs {layers} layers, B={batch}x{seconds:g}s ({args.threads} threads); "
            f"fbank {fb_batch}x{fb_seconds:g}s",
        ),
    )
    return payload


if __name__ == "__main__":
    main()
