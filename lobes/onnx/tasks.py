"""What ``--backend onnx`` of ``python -m lobes.transcribe`` / ``lobes.classify`` runs: numpy and onnxruntime only.

:class:`OnnxTranscriber` gives the words and word timestamps :class:`lobes.inference.asr.Transcriber` gives
(greedy CTC decoding; recordings longer than ``window_seconds`` in the same overlapping windows, normalised
with the fbank statistics of the whole recording), :class:`OnnxClassifyTask` the top-k labels of
:class:`lobes.classify.ClassifyTask`. Both plug into the command runner (:func:`lobes.inference.cli.run`)
as its ``Task``; neither imports torch or speechbrain, so ``pip install lobes[onnx]`` is enough to run them.

Example
-------
>>> [(name, round(p, 2)) for name, p in top_k(np.array([[0.1, 0.9, 0.5]]), ["dog", "cat", "bird"], k=2)[0]]
[('cat', 0.9), ('bird', 0.5)]
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from lobes.inference.words import Transcript, best_path, collapse, text, words
from lobes.inputs import AudioInput, UsageError
from lobes.io import read_audio
from lobes.onnx.runtime import OnnxModel, asr_fbank_stats

__all__ = ["OnnxClassifyTask", "OnnxTranscribeTask", "OnnxTranscriber", "check_onnx_args", "top_k"]


def check_onnx_args(args: argparse.Namespace) -> None:
    """Refuse options that the ONNX backend cannot honour (before any work)."""
    if args.device not in ("auto", "cpu"):
        raise UsageError(f"--device {args.device}: --backend onnx runs on the CPU; use --device cpu or auto")
    if args.precision != "fp32":
        raise UsageError(
            f"--precision {args.precision}: an ONNX file has its precision fixed at export "
            "(python -m lobes.export_onnx --quantize ...); use --precision fp32"
        )


def top_k(probs: np.ndarray, labels: Sequence[str] | None, k: int) -> list[list[tuple[str, float]]]:
    """Per row of ``(B, classes)`` probabilities, the ``k`` best ``(label, probability)`` (as
    :func:`lobes.beats.top_k_labels`)."""
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs.astype(np.float32), axis=-1, kind="stable")[:, :k]
    return [
        [(str(labels[i]) if labels is not None else f"class_{i}", float(row[i])) for i in idx]
        for row, idx in zip(probs.astype(np.float32), order)
    ]


# --------------------------------------------------------------------------------------------------
# speech recognition
# --------------------------------------------------------------------------------------------------
class OnnxTranscriber:
    """Greedy CTC transcription with an exported ASR model (see :class:`lobes.inference.asr.Transcriber`).

    Arguments
    ---------
    model : OnnxModel
        An exported ASR model (``kind`` ``asr``).
    window_seconds, context_seconds : float
        As :class:`lobes.inference.asr.Transcriber`.
    """

    def __init__(self, model: OnnxModel, window_seconds: float = 30.0, context_seconds: float = 5.0) -> None:
        if model.kind == "asr_streaming":
            raise UsageError(f"{model.path} is the chunk-step graph of a streaming model; use it with --streaming")
        if model.kind != "asr":
            raise UsageError(f"{model.path} holds a {model.kind!r} model; transcription needs an exported ASR model")
        self.model = model
        self.tokenizer = model.tokenizer()
        self.blank = int(model.meta["blank_index"])
        self.step = int(model.meta["frame_samples"])
        self.sample_rate = model.sample_rate
        self.frame_shift = self.step / self.sample_rate
        n_mels = int(model.meta["n_mels"])
        self._no_stats = (np.zeros(n_mels, np.float32), np.ones(n_mels, np.float32), np.zeros(1, np.float32))
        step = self.step
        self.window = max(int(round(window_seconds * self.sample_rate / step)), 3) * step
        self.context = int(round(context_seconds * self.sample_rate / step)) * step
        if self.window - 2 * self.context < step:
            raise ValueError(
                f"window_seconds ({window_seconds}) must exceed 2 * context_seconds ({context_seconds}) "
                f"by at least one frame ({self.frame_shift} s)"
            )

    def log_probs(self, waves: Sequence[np.ndarray], stats=None) -> tuple[np.ndarray, list[int]]:
        """(B, T, V) log-probs and valid frames of 1-D waveforms at the model's rate."""
        mean, var, use = self._no_stats if stats is None else (stats[0], stats[1], np.ones(1, np.float32))
        out = self.model.run(waves, stats_mean=mean, stats_var=var, use_stats=use)
        return out["log_probs"], out["frames"].tolist()

    def _decode(self, log_probs: np.ndarray, offset: int = 0) -> Transcript:
        tokens, spans = collapse(best_path(log_probs[:, : self.tokenizer.get_piece_size()]), self.blank)
        return Transcript(text(self.tokenizer, tokens), words(self.tokenizer, tokens, spans, self.frame_shift, offset))

    def transcribe(self, waves: Sequence[np.ndarray], batch_seconds: float = 60.0) -> list[Transcript]:
        """Transcripts of 1-D waveforms at the model's rate: the short ones in one batch, the long ones in windows."""
        results: list[Transcript | None] = [None] * len(waves)
        short = [i for i, w in enumerate(waves) if len(w) <= self.window]
        if short:
            log_probs, lengths = self.log_probs([waves[i] for i in short])
            for i, lp, n in zip(short, log_probs, lengths):
                results[i] = self._decode(lp[:n])
        per_batch = max(1, int(batch_seconds // (self.window / self.sample_rate)))
        for i, wav in enumerate(waves):
            if len(wav) > self.window:
                path = np.concatenate(
                    [best_path(lp[:, : self.tokenizer.get_piece_size()]) for lp in self._windows(wav, per_batch)]
                )
                tokens, spans = collapse(path, self.blank)
                results[i] = Transcript(
                    text(self.tokenizer, tokens), words(self.tokenizer, tokens, spans, self.frame_shift)
                )
        return results  # type: ignore[return-value]

    def _windows(self, wav: np.ndarray, per_batch: int):
        """Log-probs of the recording's frames, in order, one window centre at a time (as the torch path)."""
        step, n = self.step, len(wav)
        stride = self.window - 2 * self.context
        cores = [(c, min(c + stride, n)) for c in range(0, n, stride)]
        stats = asr_fbank_stats(self.model, wav, self.window, step)
        for first in range(0, len(cores), per_batch):
            group = cores[first : first + per_batch]
            spans = [(max(c0 - self.context, 0), min(c1 + self.context, n)) for c0, c1 in group]
            log_probs, lengths = self.log_probs([wav[a:b] for a, b in spans], stats)
            for (c0, c1), (a, _), lp, length in zip(group, spans, log_probs, lengths):
                lo = (c0 - a) // step
                hi = length if c1 == n else (c1 - a) // step
                yield lp[lo:hi]


class OnnxTranscribeTask:
    """The runner's task for ``python -m lobes.transcribe MODEL.onnx ... --backend onnx`` (greedy decoding)."""

    def __init__(self, args: argparse.Namespace) -> None:
        check_onnx_args(args)
        if args.decoder != "greedy":
            raise UsageError(
                f"--decoder {args.decoder}: --backend onnx decodes greedily (the lexicon beam search runs on "
                "the torch backend); use --decoder greedy"
            )
        self.args = args
        try:
            self.transcriber = OnnxTranscriber(
                OnnxModel(args.model, threads=args.threads), args.window_seconds, args.context_seconds
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def settings(self) -> dict:
        return {
            "backend": "onnx",
            "decoder": self.args.decoder,
            "window_seconds": self.args.window_seconds,
            "context_seconds": self.args.context_seconds,
        }

    def process(self, files: list[AudioInput]) -> list[dict | Exception]:
        results: list = [None] * len(files)
        good, waves = [], []
        for i, f in enumerate(files):
            try:
                waves.append(read_audio(f.path, self.transcriber.sample_rate))
                good.append(i)
            except Exception as exc:  # reported for this file only
                results[i] = exc
        if waves:
            for i, transcript in zip(good, self.transcriber.transcribe(waves, self.args.batch_seconds)):
                results[i] = transcript.to_dict()
        return results


# --------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------
class OnnxClassifyTask:
    """The runner's task for ``python -m lobes.classify MODEL.onnx ... --backend onnx``: top-k labels per file."""

    def __init__(self, args: argparse.Namespace) -> None:
        check_onnx_args(args)
        if args.top_k < 1:
            raise UsageError(f"--top-k {args.top_k}: expected a positive number of labels")
        self.model = OnnxModel(args.model, threads=args.threads)
        if self.model.kind == "asr" or "probs" not in self.model.outputs or self.model.labels is None:
            raise UsageError(
                f"{args.model} holds a {self.model.kind!r} model without class probabilities; classification "
                "needs an exported classification folder or AudioSet fine-tuned BEATs checkpoint"
            )
        self.top_k = args.top_k

    def settings(self) -> dict:
        return {"backend": "onnx", "top_k": self.top_k}

    def process(self, files: list[AudioInput]) -> list[dict | Exception]:
        results: list = [None] * len(files)
        good, waves = [], []
        for i, item in enumerate(files):
            try:
                wav = read_audio(item.path, self.model.sample_rate)
                self.model.require_length(item.path, len(wav))
            except Exception as exc:  # unreadable, empty or too short: this file fails, the others go on
                results[i] = exc
                continue
            good.append(i)
            waves.append(wav)
        if waves:
            probs = self.model.run(waves)["probs"]
            for i, row in zip(good, top_k(probs, self.model.labels, self.top_k)):
                results[i] = {"labels": [{"label": label, "score": round(score, 6)} for label, score in row]}
        return results
