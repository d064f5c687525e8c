"""Long recordings through ``lobes.inference.Transcriber``: time and peak memory for 1, 5 and 30 minutes.

A pretrained folder is packaged (``lobes.inference.asr.package_asr_run``) from a run folder made on the spot:
the small HyperConformer preset (``hparams/hyperconformer_small.yaml``) with random weights and a character
SentencePiece tokenizer. The audio is syllable-like bursts of shaped noise with pauses, written as 16 kHz
wavs. Each (length, mode) pair is measured in a fresh process that loads the folder, then transcribes the
file: ``windowed`` is the default (30 s windows, 5 s of context on each side); ``whole`` turns windowing off
(one pass over the whole recording) and is measured only up to ``--whole-up-to`` minutes. Peak RSS is the
process's high-water mark; "growth" is that minus the resident size once the model was loaded.

    python benchmarks/long_audio.py                 # 1, 5, 30 minutes (windowed), whole up to 5
    python benchmarks/long_audio.py --quick         # 0.5, 1, 2 minutes, 2-layer model (smoke test)

Prints a table and writes ``benchmarks/out/long_audio.json`` and ``long_audio.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import fmt, plot_lines, print_table, write_json  # noqa: E402

RATE = 16000


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_pretrained(folder: Path, layers: int) -> Path:
    """A run folder with the small preset (random weights) and a char tokenizer, packaged; returns the folder."""
    import io

    import sentencepiece as spm
    import torch
    from hyperpyyaml import load_hyperpyyaml, resolve_references

    from lobes.inference.asr import package_asr_run

    run = folder / "run"
    save = run / "save"
    (save / "CKPT+benchmark").mkdir(parents=True)
    with open(ROOT / "hparams" / "hyperconformer_small.yaml") as f:
        preset = resolve_references(f, {"num_encoder_layers": layers}).getvalue()
    text = (
        f"sample_rate: {RATE}\nblank_index: 0\ntest_decoder: null\npreset:\n"
        + "".join(f"    {line}\n" for line in preset.splitlines())
        + "model: !ref <preset[model]>\n"
    )
    resolved = resolve_references(text).getvalue()
    (run / "hyperparams.yaml").write_text(resolved)
    torch.manual_seed(0)
    model = load_hyperpyyaml(resolved)["model"]
    torch.save(model.state_dict(), save / "CKPT+benchmark" / "model.ckpt")
    sentences = ["THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS"] * 20
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        vocab_size=31,
        model_type="char",
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    (save / "40_char.model").write_bytes(buffer.getvalue())
    return package_asr_run(run, folder / "pretrained")


def write_audio(path: Path, minutes: float, seed: int = 0) -> None:
    """Syllable-like bursts of band-limited noise (80-250 ms) with pauses, written block by block."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * RATE)
    with sf.SoundFile(path, "w", samplerate=RATE, channels=1, subtype="PCM_16") as f:
        written = 0
        while written < total:
            burst = int(rng.uniform(0.08, 0.25) * RATE)
            pause = int(rng.uniform(0.02, 0.4) * RATE)
            noise = np.convolve(rng.standard_normal(burst), np.ones(8) / 8, mode="same")
            chunk = np.concatenate([0.3 * noise * np.hanning(burst), np.zeros(pause)])[: total - written]
            f.write(chunk.astype(np.float32))
            written += len(chunk)


def worker(folder: str, wav: str, window_seconds: float, threads: int) -> None:
    """Run in a fresh process: load, transcribe, print one JSON line."""
    import torch

    torch.set_num_threads(threads)
    from lobes.inference import Transcriber

    asr = Transcriber.from_pretrained(folder, device="cpu", window_seconds=window_seconds)
    loaded = _rss_mib()
    start = time.perf_counter()
    result = asr.transcribe(wav)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "time_s": elapsed,
                "loaded_rss_mib": loaded,
                "peak_rss_mib": peak,
                "growth_mib": peak - loaded,
                "words": len(result.words),
            }
        )
    )


def measure(folder: Path, wav: Path, window_seconds: float, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", str(folder), str(wav), str(window_seconds), str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {
            "ok": False,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}",
        }
    return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short lengths, 2-layer model")
    parser.add_argument("--minutes", type=float, nargs="+", default=None)
    parser.add_argument("--whole-up-to", type=float, default=None, help="longest length also run without windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, wav, window, threads = args.worker
        worker(folder, wav, float(window), int(threads))
        return
    minutes = args.minutes or ([0.5, 1.0, 2.0] if args.quick else [1.0, 5.0, 30.0])
    whole_up_to = args.whole_up_to if args.whole_up_to is not None else (1.0 if args.quick else 5.0)
    layers = 2 if args.quick else 6
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pretrained = make_pretrained(tmp, layers)
        for m in minutes:
            wav = tmp / f"audio_{m:g}min.wav"
            write_audio(wav, m)
            for mode in ("windowed", "whole"):
                if mode == "whole" and m > whole_up_to:
                    continue
                window = 30.0 if mode == "windowed" else m * 60 + 1
                result = measure(pretrained, wav, window, args.threads)
                record = {"minutes": m, "mode": mode, **result}
                records.append(record)
                ok = result["ok"]
                rows.append(
                    {
                        "minutes": f"{m:g}",
                        "mode": mode,
                        "time s": fmt(result.get("time_s"), ".1f") if ok else result["error"][:40],
                        "x real time": fmt(m * 60 / result["time_s"], ".1f") if ok else "-",
                        "peak RSS MiB": fmt(result.get("peak_rss_mib"), ".0f"),
                        "growth MiB": fmt(result.get("growth_mib"), ".0f"),
                        "words": result.get("words", "-"),
                    }
                )
                print(f"{m:g} min {mode}: {json.dumps(result)}", flush=True)
        table = print_table(rows, ["minutes", "mode", "time s", "x real time", "peak RSS MiB", "growth MiB", "words"])
    settings = {
        "layers": layers,
        "threads": args.threads,
        "window_seconds": 30.0,
        "context_seconds": 5.0,
        "preset": "hparams/hyperconformer_small.yaml (random weights)",
    }
    write_json("long_audio", {"settings": settings, "results": records, "table": table})
    series = {
        panel: {
            mode: [
                next((r.get(key) for r in records if r["minutes"] == m and r["mode"] == mode and r.get("ok")), None)
                for m in minutes
            ]
            for mode in ("windowed", "whole")
        }
        for panel, key in (("peak", "peak_rss_mib"), ("time", "time_s"))
    }
    plot_lines(
        "long_audio",
        minutes,
        series,
        "minutes of audio",
        ("peak RSS (MiB)", "time (s)"),
        ("peak", "time"),
        f"Transcriber on long recordings ({layers}-layer HyperConformer, {args.threads} threads)",
        logy=False,
    )


if __name__ == "__main__":
    main()
