"""Throughput of ``python -m lobes.extract`` (seconds of audio encoded per second) at fp32 and bf16.

A folder of synthetic 16 kHz wavs and a released-size BEATs checkpoint with random weights are written
to a temporary folder; the extraction command then runs end to end (reading, batching by length, model,
atomic ``.npy`` writes, manifest) once per precision, each in a fresh process, with 2 threads.

    python benchmarks/extract.py                 # 48 files of 10 s, released size (12 layers)
    python benchmarks/extract.py --quick         # 8 files of 3 s, 2 layers (smoke test)

Prints a table and writes ``benchmarks/out/extract.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, write_json  # noqa: E402


def _write_inputs(folder: Path, files: int, seconds: float) -> float:
    """Write the wavs; returns their total duration in seconds."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    total = 0
    for i in range(files):
        n = int(16000 * seconds * rng.uniform(0.8, 1.0))  # lengths vary a little, as real folders do
        sf.write(folder / f"clip_{i:03d}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        total += n
    return total / 16000


def _write_checkpoint(path: Path, layers: int) -> None:
    import torch

    from lobes.beats import BEATs, BEATsConfig

    torch.manual_seed(0)
    BEATs(cfg=BEATsConfig.released(encoder_layers=layers)).save_checkpoint(path)


def _run_extraction(inputs: Path, output: Path, ckpt: Path, precision: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "lobes.extract",
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--checkpoint",
        str(ckpt),
        "--precision",
        precision,
        "--quiet",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-2000:]}
    found = re.search(r"encoded ([\d.]+) s of audio in ([\d.]+) s: ([\d.]+) audio-s/s", proc.stderr + proc.stdout)
    if not found:
        return {"ok": False, "error": "no throughput line in the extraction log"}
    audio_s, encode_s, rate = map(float, found.groups())
    return {"ok": True, "audio_s": audio_s, "encode_s": encode_s, "audio_s_per_s": rate, "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 files of 3 s, 2 layers: a smoke test")
    parser.add_argument("--files", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    files = args.files or (8 if args.quick else 48)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    layers = 2 if args.quick else 12
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = _write_inputs(tmp / "audio", files, seconds)
        _write_checkpoint(tmp / "beats.pt", layers)
        for precision in ("fp32", "bf16"):
            results[precision] = _run_extraction(
                tmp / "audio", tmp / f"out_{precision}", tmp / "beats.pt", precision, args.threads
            )
    rows = [
        {
            "precision": p,
            "audio_s_per_s": r.get("audio_s_per_s"),
            "encode_s": r.get("encode_s"),
            "wall_s (process)": round(r["wall_s"], 1) if r.get("wall_s") else None,
            "error": r.get("error", ""),
        }
        for p, r in results.items()
    ]
    print(
        f"\nlobes.extract, BEATs {layers} layers (random weights), {files} files, {total:.0f} s of audio, "
        f"{args.threads} threads"
    )
    print_table(rows, ["precision", "audio_s_per_s", "encode_s", "wall_s (process)", "error"])
    payload = {
        "config": {
            "files": files,
            "seconds": seconds,
            "audio_s": total,
            "layers": layers,
            "threads": args.threads,
            "quick": args.quick,
        },
        "results": results,
    }
    print(f"wrote {write_json('extract_quick' if args.quick else 'extract', payload)}")
    return payload


if __name__ == "__main__":
    main()
