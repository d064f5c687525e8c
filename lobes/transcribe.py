"""Transcribe audio files with a pretrained folder: ``python -m lobes.transcribe MODEL_DIR INPUTS...``.

    python -m lobes.transcribe pretrained/asr talk.wav recordings/ --output transcripts.jsonl
    python -m lobes.transcribe pretrained/asr talk.flac --output talk.srt --decoder beam
    lobes-transcribe pretrained/asr manifest.csv --output transcripts.csv --device cuda --precision bf16
    python -m lobes.transcribe asr.onnx talk.wav --output transcripts.jsonl --backend onnx
    python -m lobes.transcribe pretrained/asr_streaming talk.wav --streaming --chunk-ms 320
    python -m lobes.transcribe asr_streaming.onnx talk.wav --streaming --backend onnx

``INPUTS`` are audio files (any format soundfile reads, any rate, any channel count), folders (searched
recursively) or CSV files with a ``wav`` column. Each good input gives one JSON object
``{"path", "text", "words": [{"word", "start", "end"}]}`` (seconds) in the ``.jsonl`` output (standard output
without ``--output``), one row in a ``.csv`` output, or the subtitles of an ``.srt`` output (one recording).
Recordings longer than ``--window-seconds`` are transcribed in overlapping windows (bounded memory).
Inputs already in the output are skipped; exit codes 0 (all done), 1 (some inputs failed: listed, the others
written), 2 (usage or set-up error, nothing done). See :mod:`lobes.inference.cli` for the shared options.
``--streaming`` (with ``--chunk-ms``, ``-`` for raw PCM on standard input) prints partial results as the audio
arrives, for models trained for streaming (:mod:`lobes.inference.asr_streaming`); with ``--backend onnx`` from
their exported chunk-step graph, without torch (:mod:`lobes.onnx.streaming`).

Example
-------
>>> main(["no/such/model", "a.wav"])
2
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lobes.inference.cli import build_parser, run_command
from lobes.inputs import UsageError

__all__ = ["main"]


class _TranscribeTask:
    """The runner's task: a :class:`lobes.inference.asr.Transcriber` and the decoding options."""

    def __init__(self, args: argparse.Namespace):
        from lobes.inference.asr import Transcriber

        self.args = args
        try:
            self.transcriber = Transcriber.from_pretrained(
                args.model,
                device=args.device,
                precision=args.precision,
                window_seconds=args.window_seconds,
                context_seconds=args.context_seconds,
            )
        except ValueError as exc:  # PretrainedError is a UsageError (a ValueError): exit 2 either way
            raise UsageError(str(exc)) from None
        if args.decoder == "beam" and self.transcriber.beam_decoder is None:
            raise UsageError(f"--decoder beam: {args.model} has no lexicon / language model; use --decoder greedy")

    def settings(self) -> dict:
        return {
            "decoder": self.args.decoder,
            "window_seconds": self.args.window_seconds,
            "context_seconds": self.args.context_seconds,
        }

    def process(self, files):
        from lobes.inference.sources import audio_sources

        results: list = [None] * len(files)
        sources, where = [], []
        for i, f in enumerate(files):
            try:
                sources.append(audio_sources(f.path, target_rate=self.transcriber.sample_rate)[0])
                where.append(i)
            except Exception as exc:  # reported for this file only
                results[i] = exc
        done = self.transcriber.transcribe_sources(sources, self.args.decoder, self.args.batch_seconds)
        for i, result in zip(where, done):
            results[i] = result if isinstance(result, Exception) else result.to_dict()
        return results


def _parser() -> argparse.ArgumentParser:
    parser = build_parser("lobes-transcribe", __doc__.split("\n\n")[0].strip(), formats=(".jsonl", ".csv", ".srt"))
    parser.add_argument(
        "--decoder",
        default="greedy",
        choices=("greedy", "beam"),
        help="greedy CTC (default) or the recipe's lexicon + word-LM beam search",
    )
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=30.0,
        help="longest recording transcribed in one piece; longer ones go in windows (default 30)",
    )
    parser.add_argument(
        "--context-seconds",
        type=float,
        default=5.0,
        help="audio seen on either side of a window's kept centre (default 5)",
    )
    return parser


def _load_task(args: argparse.Namespace):
    if getattr(args, "backend", "torch") == "onnx":  # onnxruntime and numpy only
        from lobes.onnx.tasks import OnnxTranscribeTask

        return OnnxTranscribeTask(args)
    return _TranscribeTask(args)


def _backend(argv: Sequence[str]) -> str | None:
    """The value of ``--backend`` in ``argv`` (``--backend X`` or ``--backend=X``), None without one."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--backend="):
            found = arg.split("=", 1)[1]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--streaming" in argv and _backend(argv) == "onnx":  # a chunk-step graph, onnxruntime and numpy only
        from lobes.onnx.streaming import main as onnx_streaming_main

        return onnx_streaming_main(argv)
    if "--streaming" in argv:  # live partial results, chunk by chunk (lobes.inference.asr_streaming)
        from lobes.inference.asr_streaming import main as streaming_main

        return streaming_main(argv)
    return run_command(_parser(), _load_task, argv)


if __name__ == "__main__":
    sys.exit(main())
