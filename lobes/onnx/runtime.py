"""Run an exported model with onnxruntime and numpy alone (no torch, no speechbrain).

:class:`OnnxModel` opens a file written by ``python -m lobes.export_onnx``, reads what the model is from its
metadata and runs batches of 1-D float32 waveforms at the model's rate (zero-padded to the longest, with
their sample counts). :func:`asr_fbank_stats` computes the fbank statistics of a long recording the way
:class:`lobes.inference.asr.Transcriber` does, for the windows of a long recording.

Example
-------
>>> OnnxModel("no/such/model.onnx")
Traceback (most recent call last):
...
lobes.onnx.runtime.OnnxModelError: no/such/model.onnx: no such file; expected an .onnx file written by ...
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lobes.inference.words import windowed_fbank_stats
from lobes.inputs import UsageError

__all__ = ["FORMAT_VERSION", "META_PREFIX", "OnnxModel", "OnnxModelError", "asr_fbank_stats", "pad_waves"]

META_PREFIX = "lobes."
"""Prefix of the metadata keys the exporter writes."""
FORMAT_VERSION = 1
KINDS = ("beats", "classification", "asr", "asr_streaming")


class OnnxModelError(UsageError):
    """An ONNX file that cannot be used (missing, unreadable, not written by the exporter), found before any work."""


def pad_waves(waves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(B, S)`` float32 zero-padded batch and ``(B,)`` int64 sample counts of 1-D waveforms.

    Example
    -------
    >>> wav, lengths = pad_waves([np.ones(3, np.float32), np.ones(5, np.float32)])
    >>> wav.shape, lengths.tolist()
    ((2, 5), [3, 5])
    """
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    batch = np.zeros((len(waves), int(lengths.max())), dtype=np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    return batch, lengths


class OnnxModel:
    """An exported model, its metadata and an onnxruntime session.

    Arguments
    ---------
    path : str or PathLike
        The ``.onnx`` file, or a folder holding ``model.onnx``.
    threads : int, optional
        onnxruntime's intra-op threads (default: onnxruntime's choice, one per core).

    Raises
    ------
    OnnxModelError
        Missing or unreadable file, or a file without the exporter's metadata.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise OnnxModelError(f"{path}: no such file; expected an .onnx file written by python -m lobes.export_onnx")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for damaged or foreign files
            raise OnnxModelError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None
        self.path = path
        raw = self.session.get_modelmeta().custom_metadata_map
        meta = {k[len(META_PREFIX) :]: v for k, v in raw.items() if k.startswith(META_PREFIX)}
        if meta.get("kind") not in KINDS:
            raise OnnxModelError(
                f"{path}: no lobes metadata (kind {meta.get('kind')!r}); expected a file written by "
                "python -m lobes.export_onnx"
            )
        self.meta: dict[str, Any] = {k: _decode(v) for k, v in meta.items()}
        if int(self.meta.get("format_version", 0)) > FORMAT_VERSION:
            raise OnnxModelError(f"{path}: format version {self.meta['format_version']} is newer than this lobes reads")
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def kind(self) -> str:
        """``beats``, ``classification``, ``asr`` or ``asr_streaming`` (a chunk-step graph)."""
        return self.meta["kind"]

    @property
    def sample_rate(self) -> int:
        """Rate of the waveforms the graph takes."""
        return int(self.meta["sample_rate"])

    @property
    def min_samples(self) -> int:
        """Fewest samples (at :attr:`sample_rate`) an input needs."""
        return int(self.meta.get("min_samples", 1))

    @property
    def labels(self) -> list[str] | None:
        """Class names in output order (None without a classifier)."""
        return self.meta.get("labels")

    def require_length(self, name: str, samples: int) -> None:
        """A ``ValueError`` naming ``name`` when ``samples`` are too few for the model (same text as torch's)."""
        if samples < self.min_samples:
            raise ValueError(
                f"{name}: {samples / self.sample_rate:.3f} s is too short; the model needs at least "
                f"{self.min_samples / self.sample_rate:.3f} s ({self.min_samples} samples at {self.sample_rate} Hz)"
            )

    def run(self, waves: Sequence[np.ndarray], **extra: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for a batch of 1-D float32 waveforms (padded here) and any further inputs."""
        batch, lengths = pad_waves(waves)
        feed = {"waveforms": batch, "lengths": lengths, **extra}
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def tokenizer(self):
        """The SentencePiece tokenizer of an ASR model (kept in the file)."""
        import sentencepiece as spm

        proto = base64.b64decode(self.meta["tokenizer"])
        return spm.SentencePieceProcessor(model_proto=proto)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def asr_fbank(model: OnnxModel, wav: np.ndarray) -> np.ndarray:
    """``(S,)`` -> ``(S // hop + 1, n_mels)`` fbank of an exported ASR model, in numpy (the graph's operations)."""
    fb = model.meta["fbank"]
    tables = getattr(model, "_fbank_tables", None)
    if tables is None:
        with np.load(io.BytesIO(base64.b64decode(fb["tables_npz"]))) as npz:
            tables = model._fbank_tables = (npz["dft"], npz["mel"])
    dft, mel = tables
    n_fft, hop = int(fb["n_fft"]), int(fb["hop"])
    x = np.pad(wav.astype(np.float32), (n_fft // 2, n_fft // 2))
    count = len(wav) // hop + 1
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop][:count]  # (M, n_fft)
    spec = frames.astype(dft.dtype) @ dft
    half = spec.shape[1] // 2
    power = (spec[:, :half] ** 2 + spec[:, half:] ** 2).astype(np.float32)
    feats = power @ mel
    if not fb["log_mel"]:
        return feats
    db = np.float32(fb["multiplier"]) * np.log10(np.maximum(feats, np.float32(fb["amin"])))
    db = db - np.float32(fb["multiplier"] * fb["db_multiplier"])
    return np.maximum(db, db.max() - np.float32(fb["top_db"]))


def asr_fbank_stats(model: OnnxModel, wav: np.ndarray, window: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(F,) mean and variance of a whole recording's fbank, read ``window`` samples at a time with ``pad``
    samples of context on either side, as :meth:`lobes.inference.asr.Transcriber._fbank_stats` reads them."""
    hop = int(model.meta["hop_length"])
    return windowed_fbank_stats(len(wav), hop, window, pad, lambda a, b: asr_fbank(model, wav[a:b]))
