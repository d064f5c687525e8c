"""Streaming ASR recipes: dynamic chunk training and the test WER per chunk size.

A recipe YAML makes a model streaming-trained by defining ``dynamic_chunk_training`` (a
:class:`lobes.chunking.DynamicChunkSampler`); ``train.py`` then asks :func:`chunk_kwargs` for the chunk
configuration of every batch and, after the usual (full-context) test, calls :func:`evaluate_chunk_sizes`, which
repeats the test with the encoder in chunked mode for every duration of ``test_chunk_ms`` and reports the WERs.
YAMLs without ``dynamic_chunk_training`` are unaffected (both functions do nothing).

Settings read from the YAML:

* ``dynamic_chunk_training``: the sampler (training batches; its ``valid_config`` for validation);
* ``test_chunk_ms``: chunk durations of the extra test passes, e.g. ``[160, 320, 640]``;
* ``test_left_context_chunks``: left context of those passes in chunks (None: unlimited).

The test writes, besides the usual files, one line ``chunk <ms> ms: <WER>`` per duration at the end of
``test_wer.txt``, ``test_wer_chunks.txt`` (a table: context, WER, greedy WER) and per-duration details in
``<output_folder>/chunks/<ms>ms/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from lobes.chunking import ChunkConfig, ms_to_frames
from lobes.io import atomic_write_text

__all__ = ["chunk_kwargs", "evaluate_chunk_sizes", "read_test_wers"]

logger = logging.getLogger(__name__)


def chunk_kwargs(brain: Any, stage: Any) -> dict:
    """Keyword arguments for ``ASRModel.forward`` in this batch: ``{"chunk": ChunkConfig}`` or ``{}`` (full context).

    Training batches draw from ``hparams.dynamic_chunk_training``; validation uses its ``valid_config``; the
    test uses ``brain.test_chunk`` (set by :func:`evaluate_chunk_sizes`, None for the full-context pass).
    """
    import speechbrain as sb

    sampler = getattr(brain.hparams, "dynamic_chunk_training", None)
    if sampler is None:
        return {}
    if stage == sb.Stage.TRAIN:
        chunk = sampler()
    elif stage == sb.Stage.VALID:
        chunk = sampler.valid_config
    else:
        chunk = getattr(brain, "test_chunk", None)
    return {} if chunk is None else {"chunk": chunk}


def read_test_wers(path: Path) -> tuple[Optional[str], Optional[str]]:
    """(first line's WER, greedy WER) of a ``test_wer.txt`` (None where absent)."""
    lines = path.read_text().splitlines() if path.exists() else []
    first = lines[0].strip() if lines else None
    greedy = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("greedy:")), first)
    return first, greedy


def evaluate_chunk_sizes(brain: Any, test_set: Any, hparams: Any, test_loader_kwargs: Optional[dict] = None) -> list:
    """Run the test again in chunked mode for every duration of ``hparams["test_chunk_ms"]``; report the WERs.

    Arguments
    ---------
    brain : speechbrain.Brain
        The recipe's Brain, after its full-context ``evaluate`` (its ``test_wer.txt`` exists).
    test_set : Dataset
        The test set.
    hparams : Mapping
        The recipe's settings.
    test_loader_kwargs : dict, optional
        The test loader options.

    Returns
    -------
    list
        ``(ms, WER, greedy WER)`` per duration (empty when the YAML asks for none).
    """
    import speechbrain as sb

    durations = hparams.get("test_chunk_ms") or []
    if hparams.get("dynamic_chunk_training") is None or not durations:
        return []
    model = hparams["model"]
    frame_ms = 1000.0 * model.frame_samples / model.sample_rate
    left = hparams.get("test_left_context_chunks")
    out = Path(brain.hparams.output_folder)
    saved = brain.hparams.output_folder, brain.hparams.wer_file
    results = []
    try:
        for ms in durations:
            brain.test_chunk = ChunkConfig(ms_to_frames(ms, frame_ms), left)
            folder = out / "chunks" / f"{ms:g}ms"
            folder.mkdir(parents=True, exist_ok=True)
            brain.hparams.output_folder, brain.hparams.wer_file = str(folder), str(folder / "wer.txt")
            logger.info("test with chunks of %g ms (%s)", ms, brain.test_chunk)
            brain.evaluate(test_set, min_key="WER", test_loader_kwargs=test_loader_kwargs or {})
            results.append((ms, *read_test_wers(folder / "test_wer.txt")))
    finally:
        brain.test_chunk = None
        brain.hparams.output_folder, brain.hparams.wer_file = saved
    if sb.utils.distributed.if_main_process():
        summary = out / "test_wer.txt"
        full, full_greedy = read_test_wers(summary)
        text = summary.read_text() if summary.exists() else ""
        text += "".join(f"chunk {ms:g} ms: {wer}\n" for ms, wer, _ in results)
        atomic_write_text(summary, text)
        left_text = "unlimited" if left is None else f"{left} chunks"
        table = f"# test WER by encoder context (left context {left_text}); first column as test_wer.txt's first line\n"
        table += "context\tWER\tgreedy_WER\n" + f"full\t{full}\t{full_greedy}\n"
        table += "".join(f"{ms:g}ms\t{wer}\t{greedy}\n" for ms, wer, greedy in results)
        atomic_write_text(out / "test_wer_chunks.txt", table)
    return results
