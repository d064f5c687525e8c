"""Classify audio files with a pretrained folder: ``python -m lobes.classify MODEL_DIR INPUTS...``.

``MODEL_DIR`` is a folder written by ``python -m lobes.package`` (a trained audio-classification run, or
``--beats`` on an AudioSet fine-tuned BEATs checkpoint); ``INPUTS`` are audio files, folders (searched
recursively) or CSV manifests with a ``wav`` column. Every readable file is mixed to mono, resampled to
the model's rate and classified; files are batched by length, and a file gives the same labels alone or in
a batch.

Output: with ``--output FILE.jsonl`` one JSON object per good input,
``{"path": ..., "labels": [{"label": ..., "score": ...}, ...]}`` (top ``--top-k`` labels by decreasing
probability: softmax for a classifier, sigmoid per tag for AudioSet tags); with ``FILE.csv`` one row per
input with the labels as JSON text; without ``--output`` the JSON lines go to standard output. A rerun
skips the inputs already in the output (``--overwrite`` starts over). Exit codes: 0 every input was
classified, 1 some inputs failed (listed with the reason in the log and ``FILE.errors.csv``; the others are
written), 2 usage or set-up error (bad options, no inputs, unusable model folder) before any work.
With ``--backend onnx``, ``MODEL_DIR`` is an ``.onnx`` file from ``python -m lobes.export_onnx`` and the
command runs with onnxruntime, without torch.

Example
-------
>>> parser = build_parser()
>>> args = parser.parse_args(["pretrained/events", "clips/", "--top-k", "3", "--output", "out.jsonl"])
>>> args.top_k, args.output
(3, 'out.jsonl')
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lobes.inference.cli import build_parser as _base_parser
from lobes.inference.cli import run_command
from lobes.inputs import AudioInput, UsageError
from lobes.io import load_audio

__all__ = ["ClassifyTask", "build_parser", "main"]


class ClassifyTask:
    """The runner's task: top-k labels of each file of a batch (a bad file fails alone).

    Arguments
    ---------
    model : lobes.inference.classify.AudioClassifier
        A loaded classifier (not an embedding-only folder).
    top_k : int
        Labels per file.
    """

    def __init__(self, model, top_k: int) -> None:
        self.model, self.top_k = model, top_k

    def settings(self) -> dict:
        """What changes the outputs besides the model and the precision."""
        return {"top_k": self.top_k}

    def process(self, files: list[AudioInput]) -> list[dict | Exception]:
        """``{"labels": [{"label", "score"}, ...]}`` per file, or the exception that made it fail."""
        results: list[dict | Exception | None] = [None] * len(files)
        good, waves = [], []
        for i, item in enumerate(files):
            try:
                wav = load_audio(item.path, self.model.sample_rate)
                self.model.require_length(item.path, wav.numel())
            except Exception as exc:  # unreadable, empty or too short: this file fails, the others go on
                results[i] = exc
                continue
            good.append(i)
            waves.append(wav)
        if waves:
            tags = self.model.classify(
                waves, sample_rate=self.model.sample_rate, top_k=self.top_k, batch_seconds=float("inf")
            )  # the runner already batched by length
            for i, row in zip(good, tags):
                results[i] = {"labels": [{"label": label, "score": round(score, 6)} for label, score in row]}
        return results


def build_parser() -> argparse.ArgumentParser:
    """The shared options of the runner plus ``--top-k``."""
    parser = _base_parser(
        "python -m lobes.classify",
        "Top-k labels of audio files with a pretrained audio classifier (a folder made by python -m lobes.package).",
        formats=(".jsonl", ".csv"),
    )
    parser.add_argument("--top-k", type=int, default=5, help="labels per file (default 5)")
    return parser


def _load_task(args: argparse.Namespace) -> ClassifyTask:
    if getattr(args, "backend", "torch") == "onnx":  # onnxruntime and numpy only
        from lobes.onnx.tasks import OnnxClassifyTask

        return OnnxClassifyTask(args)
    from lobes.inference.classify import AudioClassifier

    if args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: expected a positive number of labels")
    model = AudioClassifier.from_pretrained(args.model, device=args.device, precision=args.precision)
    if model.labels is None:
        raise UsageError(
            f"{args.model} holds an embedding model without a classifier (a pre-trained BEATs "
            "checkpoint); classification needs a trained run or an AudioSet fine-tuned checkpoint"
        )
    return ClassifyTask(model, args.top_k)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0, 1 or 2)."""
    return run_command(build_parser(), _load_task, argv)


if __name__ == "__main__":
    sys.exit(main())
