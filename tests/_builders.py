"""What several test files build the same way: the tiny tone corpora, the tiny BEATs configuration and the
recipe command lines that train on them.

* ASR: words spelled with the letters ``A`` to ``H``, one tone per letter (:func:`letter_tone_corpus`), trained
  with :func:`asr_recipe_args` / :func:`run_asr_recipe`.
* Audio classification: low tone / high tone / noise clips at mixed rates and channel counts
  (:func:`tone_class_corpus`), trained with :func:`classification_recipe` and :func:`classification_csv_args`.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------- ASR
ASR_TRAIN = ROOT / "recipes" / "ASR" / "train.py"
RATE = 16000
LETTERS = "ABCDEFGH"
#: A 1-layer HyperConformer preset small enough to train in seconds.
TINY_ASR_PRESET = "{d_model: 32, d_ffn: 64, nhead: 2, num_encoder_layers: 1, kernel_size: 7, frontend_channels: [8, 8]}"


def letter_tones(text: str, rng: np.random.Generator) -> np.ndarray:
    """One tone per letter (its own pitch), silence between words, a little noise; float32 at :data:`RATE`."""
    pieces = [np.zeros(800)]
    for word in text.split():
        for ch in word:
            t = np.arange(int(rng.uniform(0.07, 0.09) * RATE)) / RATE
            pieces.append(0.5 * np.sin(2 * np.pi * 300.0 * 2 ** (LETTERS.index(ch) / 4) * t))
        pieces.append(np.zeros(int(0.06 * RATE)))
    wav = np.concatenate(pieces)
    return (wav + 0.01 * rng.standard_normal(len(wav))).astype(np.float32)


def letter_tone_split(folder: Path, name: str, num: int, seed: int) -> str:
    """``num`` random one- or two-word utterances as ``folder/name/*.wav`` and ``folder/name.csv`` (ID, duration,
    wav, wrd); returns the CSV path."""
    rng = np.random.default_rng(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        text = " ".join("".join(rng.choice(list(LETTERS), rng.integers(2, 4))) for _ in range(rng.integers(1, 3)))
        wav = letter_tones(text, rng)
        path = folder / name / f"{name}_{i}.wav"
        sf.write(path, wav, RATE)
        rows.append({"ID": f"{name}_{i}", "duration": len(wav) / RATE, "wav": str(path), "wrd": text})
    with open(folder / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ID", "duration", "wav", "wrd"])
        writer.writeheader()
        writer.writerows(rows)
    return str(folder / f"{name}.csv")


def letter_tone_corpus(folder: Path, test_size: int) -> dict[str, str]:
    """Train (32), valid (4) and test (``test_size``) splits of :func:`letter_tone_split`: split name -> CSV."""
    return {
        split: letter_tone_split(folder, split, n, seed)
        for split, n, seed in (("train", 32, 1), ("valid", 4, 2), ("test", test_size, 3))
    }


def recipe_env() -> dict[str, str]:
    """The environment of a recipe subprocess: one OpenMP thread, the repository importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def asr_recipe_args(
    corpus: dict[str, str], out: Path, epochs: int, *extra: str, yaml: str = "recipes/ASR/hparams/hyperconformer.yaml"
) -> list[str]:
    """recipes/ASR/train.py's arguments for a tiny run on ``corpus`` (one CPU process, fixed batches, no
    intermediate CTC: the tiny encoder has one layer; unless ``extra`` says otherwise)."""
    prepare = (
        "--prepare=!name:lobes.data.manifest.manifest_paths "
        f"{{train: {corpus['train']}, valid: {corpus['valid']}, test: {corpus['test']}}}"
    )
    return [
        yaml,
        prepare,
        f"--output_folder={out}",
        "--noise_csv=null",
        "--num_workers=0",
        f"--number_of_epochs={epochs}",
        "--batch_size=8",
        "--n_warmup_steps=4",
        "--lr=0.005",
        *([] if any(a.startswith("--preset") for a in extra) else [f"--preset={TINY_ASR_PRESET}"]),
        *([] if any(a.startswith("--cpu_processes") for a in extra) else ["--cpu_processes=1"]),
        *([] if any(a.startswith("--dynamic_batching") for a in extra) else ["--dynamic_batching=False"]),
        *([] if any(a.startswith("--intermediate_ctc") for a in extra) else ["--intermediate_ctc_weight=0"]),
        *extra,
    ]


def run_asr_recipe(
    args: Sequence[str], timeout: float = 300, launcher: Optional[list[str]] = None
) -> subprocess.CompletedProcess:
    """Run recipes/ASR/train.py from the repository root (``launcher``: e.g. torchrun instead of python) and
    assert that it succeeded."""
    cmd = (launcher or [sys.executable]) + [str(ASR_TRAIN)] + list(args)
    proc = subprocess.run(cmd, cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------- audio classification
CLASSIFICATION = ROOT / "recipes" / "AudioClassification"
CLASSES = ["low_tone", "high_tone", "noise"]
#: A 2-layer BEATs configuration (Microsoft's keys) that builds and trains in seconds.
TINY_BEATS_CFG = {
    "embed_dim": 32,
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4,
    "conv_pos": 16,
    "conv_pos_groups": 2,
    "deep_norm": True,
    "relative_position_embedding": True,
    "gru_rel_pos": True,
    "num_buckets": 32,
    "max_distance": 800,
}


def asr_recipe() -> ModuleType:
    """recipes/ASR/train.py as a module (its ``main``, ``write_test_wers``, ...)."""
    spec = importlib.util.spec_from_file_location("asr_train", ASR_TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classification_recipe() -> ModuleType:
    """recipes/AudioClassification/train.py as a module (its ``main``, ``param_groups``, ``check_hparams``)."""
    spec = importlib.util.spec_from_file_location("audio_classification_train", CLASSIFICATION / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def class_clip(label: str, rng: np.random.Generator, rate: int) -> np.ndarray:
    """0.8 - 1.2 s of one of :data:`CLASSES` at ``rate``: a low (250 - 400 Hz) or high (2.5 - 4 kHz) tone, or noise."""
    n = int(rng.uniform(0.8, 1.2) * rate)
    t = np.arange(n) / rate
    if label == "noise":
        return (0.3 * rng.standard_normal(n)).astype(np.float32)
    f0 = rng.uniform(250, 400) if label == "low_tone" else rng.uniform(2500, 4000)
    return (0.5 * np.sin(2 * np.pi * f0 * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)


def tone_class_corpus(
    root: Path, per_class: dict[str, int], stereo_every: int, right_gain: float
) -> tuple[Path, dict[str, Path]]:
    """ID, duration, wav, label CSVs in ``root`` (``$data_root`` paths), ``per_class[split]`` clips of each class
    at 16 / 22.05 / 8 kHz in turn; clip ``i`` is stereo (right channel ``right_gain`` x left) when
    ``i % stereo_every == 1``. Returns ``(root, split -> CSV path)``."""
    rng = np.random.default_rng(0)
    csvs = {}
    for split, count in per_class.items():
        lines = ["ID,duration,wav,label"]
        for i in range(count):
            for label in CLASSES:
                rate = [16000, 22050, 8000][i % 3]
                wav = class_clip(label, rng, rate)
                if i % stereo_every == 1:
                    wav = np.stack([wav, right_gain * wav], axis=1)
                uid = f"{split}_{label}_{i}"
                sf.write(root / f"{uid}.wav", wav, rate)
                lines.append(f"{uid},{len(wav) / rate:.3f},$data_root/{uid}.wav,{label}")
        csvs[split] = root / f"{split}.csv"
        csvs[split].write_text("\n".join(lines) + "\n")
    return root, csvs


def classification_csv_args(corpus: tuple[Path, dict[str, Path]], out: Path) -> list[str]:
    """The recipe's options for a :func:`tone_class_corpus` (its ``prepare`` swapped for the manifest reader) and
    an output folder."""
    root, csvs = corpus
    paths = ", ".join(f"{split}: {csvs[split]}" for split in ("train", "valid", "test"))
    prepare = f"!name:lobes.data.manifest.manifest_paths {{{paths}, required: [ID, wav, label]}}"
    return ["--prepare", prepare, "--data_folder", str(root), "--output_folder", str(out), "--noprogressbar"]
