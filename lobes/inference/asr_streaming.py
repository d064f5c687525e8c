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
import json
import logging
import sys
import time
from typing import BinaryIO, Iterator, Optional, Sequence, TextIO

import numpy as np
import torch

from lobes.inputs import EXIT_FAILED_FILES, EXIT_OK, EXIT_USAGE, UsageError

__all__ = ["main", "pcm_pieces", "file_pieces", "transcribe_stream"]

logger = logging.getLogger(__name__)

STDIN = "-"


def pcm_pieces(stream: BinaryIO, piece_samples: int) -> Iterator[torch.Tensor]:
    """Float samples in [-1, 1) from raw 16-bit little-endian mono PCM, ``piece_samples`` at a time (the last
    piece may be shorter; a trailing odd byte is dropped).

    Example
    -------
    >>> import io
    >>> raw = np.array([0, 16384, -32768, 32767, 1], dtype="<i2").tobytes()
    >>> [p.tolist() for p in pcm_pieces(io.BytesIO(raw), 2)]
    [[0.0, 0.5], [-1.0, 0.999969482421875], [3.0517578125e-05]]
    """
    need = 2 * piece_samples
    rest = b""
    while True:
        data = stream.read(need - len(rest))
        if not data:
            break
        rest += data
        if len(rest) >= need:
            yield torch.from_numpy(np.frombuffer(rest[:need], dtype="<i2").astype(np.float32) / 32768.0)
            rest = rest[need:]
    usable = len(rest) - len(rest) % 2
    if usable:
        yield torch.from_numpy(np.frombuffer(rest[:usable], dtype="<i2").astype(np.float32) / 32768.0)


def file_pieces(path: str, sample_rate: int, piece_samples: int) -> Iterator[torch.Tensor]:
    """Mono float samples of an audio file at ``sample_rate``, ``piece_samples`` at a time. A file at that rate
    is read block by block from disk (as audio would arrive); another rate is read whole and resampled."""
    import soundfile as sf

    with sf.SoundFile(path) as f:
        if f.samplerate == sample_rate:
            for block in f.blocks(blocksize=piece_samples, dtype="float32", always_2d=True):
                yield torch.from_numpy(block.mean(axis=1))
            return
    from lobes.io import load_audio

    yield from load_audio(path, sample_rate).split(piece_samples)


def transcribe_stream(
    model: torch.nn.Module,
    tokenizer,
    pieces: Iterator[torch.Tensor],
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
    rate = model.sample_rate
    received, shown, start = 0, None, time.monotonic()
    for piece in pieces:
        received += piece.numel()
        if realtime:  # wait until this piece would have been recorded
            time.sleep(max(0.0, received / rate - (time.monotonic() - start)))
        text = streamer.accept(piece).text[0]
        if text != shown:
            shown = text
            yield received / rate, text, False
    yield received / rate, streamer.finish().text[0], True


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


def _emit(out: TextIO, record: dict) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


def main(
    argv: Optional[Sequence[str]] = None, stdin: Optional[BinaryIO] = None, stdout: Optional[TextIO] = None
) -> int:
    """Command-line entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.backend == "onnx":  # python -m lobes.transcribe dispatches it before torch is imported
        from lobes.onnx.streaming import main as onnx_main

        return onnx_main(argv, stdin=stdin, stdout=stdout)
    stdout = stdout or sys.stdout
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        from lobes.chunking import ms_to_frames
        from lobes.inference.asr import Transcriber
        from lobes.streaming import check_streamable

        if args.output is not None and not args.output.endswith(".jsonl"):
            raise UsageError(f"--output {args.output}: expected a .jsonl file")
        if args.inputs.count(STDIN) > 1:
            raise UsageError("- (standard input) can be given once")
        transcriber = Transcriber.from_pretrained(args.model, device=args.device)
        model = transcriber.encoder.model
        check_streamable(model)
        frame_ms = 1000.0 * model.frame_samples / model.sample_rate
        chunk = ms_to_frames(args.chunk_ms, frame_ms)
        piece_ms = args.chunk_ms if args.piece_ms is None else args.piece_ms
        if not piece_ms > 0:
            raise UsageError(f"--piece-ms must be positive, got {piece_ms}")
        piece = max(1, int(round(piece_ms * model.sample_rate / 1000)))
        for path in args.inputs:
            if path != STDIN:
                import soundfile as sf

                try:
                    sf.info(path)
                except Exception as exc:
                    raise UsageError(f"{path}: not a readable audio file ({exc})") from None
    except (UsageError, ValueError) as exc:  # PretrainedError and check_streamable's errors are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    finals, failed = [], []
    for path in args.inputs:
        pieces = (
            pcm_pieces(stdin or sys.stdin.buffer, piece)
            if path == STDIN
            else file_pieces(path, model.sample_rate, piece)
        )
        try:
            for seconds, text, final in transcribe_stream(
                model, transcriber.tokenizer, pieces, chunk, args.left_context_chunks, args.realtime
            ):
                record = {"path": path, "time": round(seconds, 3), "text": text, "final": final}
                _emit(stdout, record)
                if final:
                    finals.append(record)
        except Exception as exc:  # this input only
            logger.error("%s: %s", path, exc)
            failed.append(path)
    if args.output is not None:
        from lobes.io import atomic_write_text

        atomic_write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in finals))
    return EXIT_FAILED_FILES if failed else EXIT_OK
