"""Streaming recognition with an exported chunk-step graph, numpy and onnxruntime only (no torch).

A file written by ``python -m lobes.export_onnx STREAMING_FOLDER OUT.onnx --chunk-ms 320`` (``kind``
``asr_streaming``; see :mod:`lobes.onnx.streaming_graph`) holds one chunk step: ``chunk_samples`` samples and
the state in, the CTC log-probabilities of ``chunk_frames`` encoder frames and the new state out. Its metadata
says everything a client needs: ``chunk_samples``, ``lookahead`` (the first call holds the stream's first
``lookahead`` samples at its end, zeros before), ``state`` (name, shape without the batch axis, dtype; every
state starts as zeros), the SentencePiece ``tokenizer`` and the ``sample_rate``.

:class:`OnnxStreamingASR` is the numpy counterpart of :class:`lobes.streaming.StreamingASR` (``accept`` pieces
of any length, ``finish``; the same chunks come out after the same samples, with the same greedy partial
hypotheses); :func:`stream_log_probs` runs whole recordings of different lengths together, chunk by chunk;
:func:`main` is ``python -m lobes.transcribe MODEL.onnx FILES --streaming --backend onnx``, printing the lines
of :mod:`lobes.inference.asr_streaming`.

Example
-------
>>> main(["no/such/model.onnx", "a.wav", "--streaming", "--backend", "onnx"])
2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, BinaryIO, Iterator, Optional, Sequence, TextIO

import numpy as np

from lobes.inference.live import check_inputs, follow, piece_samples, run_inputs
from lobes.inputs import EXIT_USAGE, UsageError
from lobes.onnx.runtime import OnnxModel

__all__ = [
    "KIND",
    "ChunkStepper",
    "OnnxStreamStep",
    "OnnxStreamingASR",
    "main",
    "stream_log_probs",
]

logger = logging.getLogger(__name__)

KIND = "asr_streaming"
"""``kind`` of a chunk-step file."""
_DTYPES = {"float32": np.float32, "int64": np.int64}


class ChunkStepper:
    """Runs a chunk-step graph for a batch of streams, carrying its state.

    Arguments
    ---------
    session : onnxruntime.InferenceSession
        The graph.
    meta : dict
        Its metadata (``chunk_samples``, ``chunk_frames``, ``lookahead``, ``state``).
    batch : int
        Number of streams.
    """

    def __init__(self, session: Any, meta: dict, batch: int) -> None:
        self.session = session
        self.chunk_samples = int(meta["chunk_samples"])
        self.chunk_frames = int(meta["chunk_frames"])
        self.lookahead = int(meta["lookahead"])
        self.names = [s["name"] for s in meta["state"]]
        self.state = [np.zeros((batch, *s["shape"]), dtype=_DTYPES[s["dtype"]]) for s in meta["state"]]
        self.batch = batch
        self.steps = 0

    def state_elements(self) -> int:
        """Numbers held in the state (constant over a stream)."""
        return sum(int(s.size) for s in self.state)

    def step(self, chunk: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, chunk_samples)`` samples and ``(B,)`` how many belong to each stream -> ``(B, C, V)``
        log-probabilities and ``(B,)`` valid frames of the chunk the call completed."""
        feed = {"chunk": np.ascontiguousarray(chunk, dtype=np.float32), "lengths": np.asarray(lengths, np.int64)}
        feed.update(zip(self.names, self.state))
        log_probs, frames, *self.state = self.session.run(None, feed)
        self.steps += 1
        return log_probs, frames


def stream_log_probs(session: Any, meta: dict, waves: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Run 1-D recordings of different lengths together through the chunk graph, one chunk at a time (a
    batch with padding: each row ends on its own).

    Returns every row's ``(frames, V)`` log-probabilities and the state's size (numbers) after the last call.
    """
    stepper = ChunkStepper(session, meta, len(waves))
    S, look, C = stepper.chunk_samples, stepper.lookahead, stepper.chunk_frames
    lengths = np.array([len(w) for w in waves], np.int64)
    outs: list[list[np.ndarray]] = [[] for _ in waves]
    done = np.zeros(len(waves), bool)
    while not done.all():
        start = (stepper.steps - 1) * S + look  # stream index of the chunk's first sample
        chunk = np.zeros((len(waves), S), np.float32)
        counts = np.zeros(len(waves), np.int64)
        for i, wav in enumerate(waves):
            a, b = max(start, 0), min(start + S, len(wav))
            if b > a:
                chunk[i, a - start : b - start] = wav[a:b]
                counts[i] = b - a
        log_probs, frames = stepper.step(chunk, counts)
        for i in range(len(waves)):
            if not done[i]:
                outs[i].append(log_probs[i, : frames[i]])
        ended = lengths < start + S
        done |= ended & (frames < C) & (stepper.steps > 1)
    return [np.concatenate(o) for o in outs], stepper.state_elements()


@dataclasses.dataclass
class OnnxStreamStep:
    """What one piece of audio gave (as :class:`lobes.streaming.StreamStep`, numpy).

    Attributes
    ----------
    log_probs : np.ndarray
        (B, n, V) CTC log-probabilities of the encoder frames completed by this piece.
    tokens : list[list[int]]
        Every stream's greedy CTC tokens so far.
    text : list[str] or None
        The tokens as text (with a tokenizer).
    final : bool
        The last step of the stream.
    """

    log_probs: np.ndarray
    tokens: list
    text: Optional[list]
    final: bool = False


class OnnxStreamingASR:
    """Recognise live audio with an exported chunk-step graph (see :class:`lobes.streaming.StreamingASR`).

    Feed pieces of any length with :meth:`accept`; every chunk is run as soon as its samples and the
    front-end's look-ahead have arrived and its greedy CTC tokens extend the partial hypothesis; :meth:`finish`
    ends the stream. ``batch`` streams of equal length run together.

    Arguments
    ---------
    model : OnnxModel
        An exported chunk-step graph (``kind`` ``asr_streaming``).
    batch : int
        Number of streams.
    tokenizer : object, optional
        A SentencePiece processor (default: the one in the file, if it has one; False: no text).
    """

    def __init__(self, model: OnnxModel, batch: int = 1, tokenizer: Any = None) -> None:
        if model.kind != KIND:
            raise UsageError(
                f"{model.path} holds a {model.kind!r} model; streaming needs a chunk-step graph (python -m "
                "lobes.export_onnx STREAMING_FOLDER OUT.onnx --chunk-ms 320)"
            )
        self.model = model
        self.stepper = ChunkStepper(model.session, model.meta, batch)
        if tokenizer is None and model.meta.get("tokenizer"):
            tokenizer = model.tokenizer()
        self.tokenizer = None if tokenizer is False else tokenizer
        self.blank_index = int(model.meta["blank_index"])
        self.batch = batch
        S, look = self.stepper.chunk_samples, self.stepper.lookahead
        self._buffer = np.zeros((batch, S - look), np.float32)  # positions before the stream: ignored
        self._virtual = S - look  # leading buffer samples that are not the stream's
        self._tokens: list[list[int]] = [[] for _ in range(batch)]
        self._last = [self.blank_index] * batch
        self.finished = False

    @property
    def chunk_samples(self) -> int:
        return self.stepper.chunk_samples

    def _run(self, chunk: np.ndarray, count: int) -> np.ndarray:
        log_probs, frames = self.stepper.step(chunk, np.full(self.batch, count, np.int64))
        kept = log_probs[:, : int(frames.min())]  # equal streams: the same frames in every row
        for b, path in enumerate(log_probs.argmax(-1)):
            for token in path[: int(frames[b])].tolist():
                if token != self.blank_index and token != self._last[b]:
                    self._tokens[b].append(token)
                self._last[b] = token
        return kept

    def _step(self, pieces: list, final: bool) -> OnnxStreamStep:
        log_probs = np.concatenate(pieces, axis=1) if pieces else np.zeros((self.batch, 0, 0), np.float32)
        text = None
        if self.tokenizer is not None:
            text = [self.tokenizer.decode_ids(t) if t else "" for t in self._tokens]
        return OnnxStreamStep(log_probs, [list(t) for t in self._tokens], text, final)

    def accept(self, samples: np.ndarray) -> OnnxStreamStep:
        """Feed the next samples: (S,) for one stream or (B, S); returns the chunks they completed."""
        if self.finished:
            raise RuntimeError("OnnxStreamingASR.accept: the stream is finished; start a new one")
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim == 1:
            samples = samples[None]
        if samples.ndim != 2 or samples.shape[0] != self.batch:
            raise ValueError(f"expected samples of shape ({self.batch}, S) or (S,), got {samples.shape}")
        self._buffer = np.concatenate([self._buffer, samples], axis=1)
        S, pieces = self.chunk_samples, []
        while self._buffer.shape[1] >= S:
            pieces.append(self._run(self._buffer[:, :S], S - self._virtual))
            self._buffer, self._virtual = self._buffer[:, S:], 0
        return self._step(pieces, final=False)

    def finish(self) -> OnnxStreamStep:
        """End the stream: run the rest of the audio and the chunks of the front-end's right padding."""
        if self.finished:
            raise RuntimeError("OnnxStreamingASR.finish: the stream is already finished")
        self.finished = True
        S, C = self.chunk_samples, self.stepper.chunk_frames
        rest = self._buffer.shape[1] - self._virtual
        chunk = np.zeros((self.batch, S), np.float32)
        chunk[:, : self._buffer.shape[1]] = self._buffer
        pieces = []
        while True:
            before = self.stepper.steps
            piece = self._run(chunk, rest)
            pieces.append(piece)
            chunk, rest = np.zeros_like(chunk), 0
            if before >= 1 and piece.shape[1] < C:  # a chunk reaching past the stream's last frame: done
                break
        return self._step(pieces, final=True)


# --------------------------------------------------------------------------------------------------
# python -m lobes.transcribe MODEL.onnx FILES --streaming --backend onnx
# --------------------------------------------------------------------------------------------------
def transcribe_stream(
    model: OnnxModel, pieces: Iterator[np.ndarray], realtime: bool = False
) -> Iterator[tuple[float, str, bool]]:
    """Yield ``(seconds received, partial text, final)`` each time the partial text changes, and at the end."""
    streamer = OnnxStreamingASR(model)
    return follow(
        lambda piece: streamer.accept(piece).text[0],
        lambda: streamer.finish().text[0],
        pieces,
        model.sample_rate,
        realtime,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lobes-transcribe --streaming --backend onnx",
        description="Live transcription with an exported chunk-step graph (onnxruntime, no torch).",
    )
    parser.add_argument("model", help="an .onnx file written by python -m lobes.export_onnx from a streaming folder")
    parser.add_argument("inputs", nargs="+", help="audio files, or - for raw 16 kHz 16-bit mono PCM on stdin")
    parser.add_argument("--streaming", action="store_true", required=True, help="transcribe live, chunk by chunk")
    parser.add_argument("--backend", choices=("onnx",), required=True, help="onnx: run the file with onnxruntime")
    parser.add_argument("--chunk-ms", type=float, default=None, help="must be the chunk the file was exported with")
    parser.add_argument("--piece-ms", type=float, help="audio read at a time in ms (default: the chunk)")
    parser.add_argument("--realtime", action="store_true", help="read no faster than real time")
    parser.add_argument("--output", help="also write the final results to this .jsonl file")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: one per core)")
    parser.add_argument("--device", default="cpu", help="cpu (the only one of this backend)")
    return parser


def main(
    argv: Optional[Sequence[str]] = None, stdin: Optional[BinaryIO] = None, stdout: Optional[TextIO] = None
) -> int:
    """Command-line entry point; returns the exit code (0 all inputs done, 1 some failed, 2 usage error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.device not in ("auto", "cpu"):
            raise UsageError(f"--device {args.device}: --backend onnx runs on the CPU; use --device cpu or auto")
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads {args.threads}: expected a positive number")
        model = OnnxModel(args.model, threads=args.threads)
        OnnxStreamingASR(model)  # refuses a file that is not a chunk-step graph
        exported_ms = float(model.meta["chunk_ms"])
        if args.chunk_ms is not None and abs(args.chunk_ms - exported_ms) > 1e-6:
            raise UsageError(
                f"--chunk-ms {args.chunk_ms:g}: {args.model} was exported with chunks of {exported_ms:g} ms (the "
                "chunk is fixed at export: python -m lobes.export_onnx FOLDER OUT.onnx --chunk-ms ...)"
            )
        piece = piece_samples(exported_ms if args.piece_ms is None else args.piece_ms, model.sample_rate)
        check_inputs(args.inputs, args.output)  # last: the model's own errors come first
    except UsageError as exc:  # OnnxModelError is a UsageError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    return run_inputs(
        args.inputs,
        lambda pieces: transcribe_stream(model, pieces, args.realtime),
        model.sample_rate,
        piece,
        args.output,
        stdin,
        stdout,
    )
