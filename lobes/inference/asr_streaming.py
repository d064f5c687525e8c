"""Live transcription with a streaming pretrained folder: ``python -m lobes.transcribe MODEL FILES --streaming``.

    python -m lobes.transcribe results/ASR/hyperconformer_streaming/1234/pretrained talk.wav --streaming --chunk-ms 320
    arecord -f S16_LE -r 16000 -c 1 | python -m lobes.transcribe MODEL - --streaming --chunk-ms 160

Each input is read piece by piece (``--piece-ms`` of audio at a time, the chunk duration by default; with
``--realtime`` no faster than it would arrive from a microphone) and fed to
:class:`lobes.streaming.StreamingASR`; whenever a chunk is done and the partial hypothesis changed, a JSON line
``{"path", "time", "text", "final": false}`` is printed (``time``: seconds of audio received), and at the end
of each input ``{"path", "time", "text", "final": true}``. ``-`` reads raw 16 kHz, 16-bit little-endian mono
PCM from standard input. ``--output FILE.jsonl`` also collects the final lines. The model must have been
trained for streaming (e.g. ``recipes/ASR/hparams/hyperconformer_streaming.yaml``): chunked encoder, causal
convolutions, no per-utterance normalisation. Exit codes: 0 all inputs done, 1 some failed (the others done),
2 usage or set-up error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import BinaryIO, Iterator, Optional, Sequence, TextIO

import numpy as np
import torch

from lobes.inference.live import STDIN, check_inputs, file_pieces, follow, pcm_pieces, piece_samples, run_inputs
from lobes.inputs import EXIT_USAGE, UsageError

__all__ = ["STDIN", "file_pieces", "main", "pcm_pieces", "transcribe_stream"]  # the readers: lobes.inference.live

logger = logging.getLogger(__name__)


def transcribe_stream(
    model: torch.nn.Module,
    tokenizer,
    pieces: Iterator[np.ndarray],
    chunk_frames: int,
    left_context_chunks: Optional[int] = None,
    realtime: bool = False,
    blank_index: int = 0,
) -> Iterator[tuple[float, str, bool]]:
    """Yield ``(seconds received, partial text, final)`` each time the partial text changes, and at the end."""
    from lobes.chunking import ChunkConfig

    streamer = model.stream(
        ChunkConfig(chunk_frames, left_context_chunks), tokenizer=tokenizer, blank_index=blank_index
    )
    return follow(
        lambda piece: streamer.accept(torch.as_tensor(piece)).text[0],
        lambda: streamer.finish().text[0],
        pieces,
        model.sample_rate,
        realtime,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lobes-transcribe --streaming",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="pretrained folder of a streaming model")
    parser.add_argument("inputs", nargs="+", help="audio files, or - for raw 16 kHz 16-bit mono PCM on stdin")
    parser.add_argument("--streaming", action="store_true", required=True, help="transcribe live, chunk by chunk")
    parser.add_argument("--chunk-ms", type=float, default=320.0, help="encoder chunk in ms, a multiple of 40 (320)")
    parser.add_argument("--piece-ms", type=float, help="audio read at a time in ms (default: --chunk-ms)")
    parser.add_argument("--left-context-chunks", type=int, help="attention encoders: chunks of left context")
    parser.add_argument("--realtime", action="store_true", help="read no faster than real time")
    parser.add_argument("--output", help="also write the final results to this .jsonl file")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx"),
        help="torch (default): a pretrained folder; onnx: a chunk-step .onnx file (python -m lobes.export_onnx "
        "FOLDER OUT.onnx --chunk-ms ...), run by onnxruntime without torch (lobes.onnx.streaming)",
    )
    return parser


def main(
    argv: Optional[Sequence[str]] = None, stdin: Optional[BinaryIO] = None, stdout: Optional[TextIO] = None
) -> int:
    """Command-line entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.backend == "onnx":  # python -m lobes.transcribe dispatches it before torch is imported
        from lobes.onnx.streaming import main as onnx_main

        return onnx_main(argv, stdin=stdin, stdout=stdout)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        from lobes.chunking import ms_to_frames
        from lobes.inference.asr import Transcriber
        from lobes.streaming import check_streamable

        transcriber = Transcriber.from_pretrained(args.model, device=args.device)
        model = transcriber.encoder.model
        check_streamable(model)
        frame_ms = 1000.0 * model.frame_samples / model.sample_rate
        chunk = ms_to_frames(args.chunk_ms, frame_ms)
        piece = piece_samples(args.chunk_ms if args.piece_ms is None else args.piece_ms, model.sample_rate)
        check_inputs(args.inputs, args.output)  # last: the model's own errors come first
    except (UsageError, ValueError) as exc:  # PretrainedError and check_streamable's errors are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    return run_inputs(
        args.inputs,
        lambda pieces: transcribe_stream(
            model, transcriber.tokenizer, pieces, chunk, args.left_context_chunks, args.realtime
        ),
        model.sample_rate,
        piece,
        args.output,
        stdin,
        stdout,
    )
