"""What the two live-transcription commands share (torch: :mod:`lobes.inference.asr_streaming`, onnxruntime:
:mod:`lobes.onnx.streaming`): audio read piece by piece from a file or raw PCM on standard input, the partial
results of a streamer followed as pieces arrive, and the loop over the inputs that prints JSON lines and
returns the exit code. numpy only: the onnxruntime command must not import torch.

Example
-------
>>> import io
>>> class Echo:  # a streamer whose text is the number of samples received
...     def __init__(self):
...         self.n = 0
...     def accept(self, piece):
...         self.n += len(piece)
...         return str(self.n // 4)
...     def finish(self):
...         return "done"
>>> echo = Echo()
>>> pieces = pcm_pieces(io.BytesIO(np.zeros(10, dtype="<i2").tobytes()), 4)
>>> list(follow(echo.accept, echo.finish, pieces, sample_rate=8))
[(0.5, '1', False), (1.0, '2', False), (1.25, 'done', True)]
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import BinaryIO, Callable, Iterable, Iterator, Optional, Sequence, TextIO

import numpy as np

from lobes.inputs import EXIT_FAILED_FILES, EXIT_OK, UsageError

__all__ = ["STDIN", "check_inputs", "file_pieces", "follow", "pcm_pieces", "piece_samples", "run_inputs"]

logger = logging.getLogger(__name__)

STDIN = "-"
"""The input name that reads raw 16-bit little-endian mono PCM from standard input."""


def pcm_pieces(stream: BinaryIO, piece_samples: int) -> Iterator[np.ndarray]:
    """Float32 samples in [-1, 1) from raw 16-bit little-endian mono PCM, ``piece_samples`` at a time (the last
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
            yield np.frombuffer(rest[:need], dtype="<i2").astype(np.float32) / 32768.0
            rest = rest[need:]
    usable = len(rest) - len(rest) % 2
    if usable:
        yield np.frombuffer(rest[:usable], dtype="<i2").astype(np.float32) / 32768.0


def file_pieces(path: str, sample_rate: int, piece_samples: int) -> Iterator[np.ndarray]:
    """Mono float32 samples of an audio file at ``sample_rate``, ``piece_samples`` at a time. A file at that rate
    is read block by block from disk (as audio would arrive); another rate is read whole and resampled."""
    import soundfile as sf

    with sf.SoundFile(path) as f:
        if f.samplerate == sample_rate:
            for block in f.blocks(blocksize=piece_samples, dtype="float32", always_2d=True):
                yield block.mean(axis=1, dtype=np.float32)
            return
    from lobes.io import read_audio

    wav = read_audio(path, sample_rate)
    for start in range(0, len(wav), piece_samples):
        yield wav[start : start + piece_samples]


def follow(
    accept: Callable[[np.ndarray], str],
    finish: Callable[[], str],
    pieces: Iterable[np.ndarray],
    sample_rate: int,
    realtime: bool = False,
) -> Iterator[tuple[float, str, bool]]:
    """Yield ``(seconds received, partial text, final)`` each time the text ``accept(piece)`` returns changes,
    and ``finish()``'s text at the end; with ``realtime``, no piece is taken before it would have been recorded."""
    received, shown, start = 0, None, time.monotonic()
    for piece in pieces:
        received += len(piece)
        if realtime:
            time.sleep(max(0.0, received / sample_rate - (time.monotonic() - start)))
        text = accept(piece)
        if text != shown:
            shown = text
            yield received / sample_rate, text, False
    yield received / sample_rate, finish(), True


def piece_samples(piece_ms: float, sample_rate: int) -> int:
    """Samples read at a time for ``--piece-ms`` (a ``UsageError`` unless positive)."""
    if not piece_ms > 0:
        raise UsageError(f"--piece-ms must be positive, got {piece_ms}")
    return max(1, int(round(piece_ms * sample_rate / 1000)))


def check_inputs(inputs: Sequence[str], output: Optional[str]) -> None:
    """``UsageError`` for a bad ``--output``, standard input named twice or an input that is not readable audio."""
    import soundfile as sf

    if output is not None and not output.endswith(".jsonl"):
        raise UsageError(f"--output {output}: expected a .jsonl file")
    if list(inputs).count(STDIN) > 1:
        raise UsageError("- (standard input) can be given once")
    for path in inputs:
        if path != STDIN:
            try:
                sf.info(path)
            except Exception as exc:
                raise UsageError(f"{path}: not a readable audio file ({exc})") from None


def run_inputs(
    inputs: Sequence[str],
    transcribe: Callable[[Iterator[np.ndarray]], Iterable[tuple[float, str, bool]]],
    sample_rate: int,
    piece: int,
    output: Optional[str] = None,
    stdin: Optional[BinaryIO] = None,
    stdout: Optional[TextIO] = None,
) -> int:
    """Transcribe every input live: ``transcribe(pieces)`` yields ``(seconds, text, final)`` (see :func:`follow`),
    printed as JSON lines ``{"path", "time", "text", "final"}``; an input that fails is logged and skipped.
    ``output`` also collects the final lines. Returns the exit code (0, or 1 when some input failed)."""
    stdout = stdout or sys.stdout
    finals, failed = [], []
    for path in inputs:
        pieces = (
            pcm_pieces(stdin or sys.stdin.buffer, piece) if path == STDIN else file_pieces(path, sample_rate, piece)
        )
        try:
            for seconds, text, final in transcribe(pieces):
                record = {"path": path, "time": round(seconds, 3), "text": text, "final": final}
                stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
                stdout.flush()
                if final:
                    finals.append(record)
        except Exception as exc:  # this input only
            logger.error("%s: %s", path, exc)
            failed.append(path)
    if output is not None:
        from lobes.io import atomic_write_text

        atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in finals))
    return EXIT_FAILED_FILES if failed else EXIT_OK
