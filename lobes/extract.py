"""Embedding extraction with BEATs: ``python -m lobes.extract --input DIR_OR_CSV --output DIR``.

Every readable audio file (wav / flac / ogg, anything soundfile opens) is mixed down to mono,
resampled to 16 kHz and encoded by BEATs; the features are written as one ``.npy`` per input file,
plus a manifest CSV. Files are batched by duration (longest first inside a sorted order) so that little
padding is computed, and the model only ever sees the valid tokens of each file (token masks from the
true lengths), so a file gives the same features alone or in a batch.

Outputs under ``--output``:

- ``<key>.npy`` per input, where the key (see :func:`lobes.inputs.collect_inputs`) is the path relative
  to the folder given (``sub/a.flac.npy``), the CSV's ``ID`` (``utt1.npy``), or for a CSV without IDs
  the path relative to the common parent folder of its files. Shapes: ``(T, C)`` per-token frames or
  ``(C,)`` mean-pooled; with ``--layer all`` a leading layer axis ``(L + 1, ...)``.
- ``manifest.csv`` (``input, output, duration, shape``), ``errors.csv`` (``input, reason``) and, with
  ``--tags K``, ``tags.csv`` (``input, rank, label, probability``) plus one ``<key>.tags.json`` per file.
  With sharding each process writes ``manifest.shard-I-of-N.csv`` etc.; ``--merge`` joins the parts.
- ``settings.json``: what the outputs depend on (checkpoint fingerprint, model cfg, layer, pooling,
  precision, tags). A rerun with the same settings skips inputs whose outputs exist; with other settings
  it stops with exit code 2 before any work, unless ``--overwrite`` is given, which deletes the earlier
  outputs (every ``.npy`` / ``.tags.json`` below ``--output`` and the CSVs above) and starts over.

With ``--tokens``, ``--checkpoint`` is a tokenizer checkpoint (Microsoft's BEATs tokenizer layout, or the
random-projection tokenizer of ``recipes/BEATsPretrain``; see :func:`lobes.beats.load_tokenizer`) and each
``<key>.npy`` holds the file's token ids, int16 of shape ``(T,)`` (time-major, valid tokens only), with the same
batching, resume, settings and error rules.

Every file is written under a temporary name and moved into place (:mod:`lobes.io`), so an interrupted
run (even ``kill -9``) leaves only complete files; permissions follow the umask.

With ``--backend onnx``, ``--checkpoint`` is an ``.onnx`` file written by ``python -m lobes.export_onnx``
from a BEATs checkpoint (its layer and tag names were chosen at export) and the run uses onnxruntime and
numpy only: torch is not imported.

Example
-------
>>> import numpy as np, soundfile as sf, tempfile, os
>>> root, out = tempfile.mkdtemp(), tempfile.mkdtemp()
>>> sf.write(os.path.join(root, "a.wav"), np.zeros(8000, dtype="float32"), 16000)
>>> tiny = os.path.join(out, "tiny.yaml")
>>> _ = open(tiny, "w").write("encoder_layers: 1\\nencoder_embed_dim: 32\\nencoder_ffn_embed_dim: 64\\n"
...                           "encoder_attention_heads: 4\\nembed_dim: 16\\nconv_pos: 8\\nconv_pos_groups: 2\\n")
>>> main(["--input", root, "--output", os.path.join(out, "feats"), "--config", tiny, "--quiet"])
0
>>> np.load(os.path.join(out, "feats", "a.wav.npy")).shape  # 0.5 s: 3 time patches x 8 frequency patches
(24, 32)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from lobes.inference.precision import warn_if_emulated
from lobes.inputs import (
    AUDIO_EXTENSIONS,
    EXIT_FAILED_FILES,
    EXIT_OK,
    EXIT_USAGE,
    AudioInput,
    UsageError,
    check_run_settings,
    collect_inputs,
    fingerprint,
    length_batches,
    parse_shard,
    resolve_device,
    write_csv,
)
from lobes.io import atomic_open, atomic_write_text, load_audio, read_audio

if TYPE_CHECKING:  # imported on first use by _import_torch_side: --backend onnx runs without torch
    import torch

    from lobes.beats import (
        BEATs,
        label_names,
        layer_index,
        load_beats,
        min_num_samples,
        parse_layer,
        read_audioset_names,
        token_padding_mask,
        top_k_labels,
    )

__all__ = ["RANDOM_SEED", "SAMPLE_RATE", "SETTINGS_FILE", "main", "merge_parts", "run"]

logger = logging.getLogger("lobes.extract")

SAMPLE_RATE = 16000
"""BEATs works on 16 kHz mono audio; everything else is converted first."""
SETTINGS_FILE = "settings.json"
"""Record of the settings the outputs in ``--output`` were made with."""
RANDOM_SEED = 0
"""Seed of the randomly initialised model used without ``--checkpoint`` (the same model on every run)."""
_OUTPUT_STEMS = ("manifest", "errors", "tags")
_TORCH_NAMES = (
    "BEATs",
    "label_names",
    "layer_index",
    "load_beats",
    "min_num_samples",
    "parse_layer",
    "read_audioset_names",
    "token_padding_mask",
    "top_k_labels",
)


def _import_torch_side() -> None:
    """Import torch and the BEATs helpers into this module on first use (``--backend onnx`` never does);
    names already set (by a test's monkeypatch, say) are kept."""
    import torch

    import lobes.beats

    globals().setdefault("torch", torch)
    for name in _TORCH_NAMES:
        globals().setdefault(name, getattr(lobes.beats, name))


def __getattr__(name: str) -> Any:
    if name == "torch" or name in _TORCH_NAMES:
        _import_torch_side()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# set-up: every check that can fail happens here, before any audio is encoded
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    """Everything the encoding loop needs, checked."""

    output: Path
    shard: tuple[int, int]
    files: list[AudioInput]
    errors: list[tuple[str, str]]
    model: BEATs | Any  # lobes.onnx.runtime.OnnxModel with --backend onnx
    layer: int | None
    labels: list[str] | None
    device: torch.device | None


def _check_output(output: Path) -> None:
    """``--output`` must be a folder or a path where one can be created."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: is an existing file; expected a folder (created if missing)")
    parent = output
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output {output}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: no permission to write in {parent}")


def _collect(args: argparse.Namespace, shard: tuple[int, int]) -> tuple[list[AudioInput], list[tuple[str, str]]]:
    files, errors = collect_inputs(args.input, args.data_root, shard)
    if files or errors:
        return files, errors
    # An empty shard is fine when the inputs are fewer than the shards; no inputs at all is a usage error.
    if shard[1] == 1 or collect_inputs(args.input, args.data_root) == ([], []):
        raise UsageError(
            f"--input {' '.join(map(str, args.input))}: no audio inputs found (folders are searched "
            f"recursively for {', '.join(AUDIO_EXTENSIONS)}; CSVs need at least one row)"
        )
    logger.info("shard %d/%d holds no inputs (fewer inputs than shards)", *shard)
    return files, errors


def _settings(args: argparse.Namespace, model: BEATs, layer: int | None) -> dict[str, Any]:
    """What the outputs depend on; a rerun into the same folder must match (see ``check_run_settings``)."""
    cfg = json.loads(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str))
    return {
        "checkpoint_sha256": fingerprint(args.checkpoint),
        "random_seed": None if args.checkpoint else RANDOM_SEED,
        "cfg": cfg,
        "layer": args.layer if layer is None else layer,  # "last", "all" or the index
        "pooling": args.pooling,
        "precision": args.precision,
        "tags": args.tags,
        "label_names_sha256": fingerprint(args.label_names) if args.tags else None,
    }


def _remove_outputs(output: Path) -> int:
    """Delete what an earlier extraction wrote to ``output`` (not the settings record); returns the count."""
    removed = 0
    for pattern in ("**/*.npy", "**/*.tags.json", "**/.*.tmp"):
        for path in output.glob(pattern):
            if path.is_file():
                path.unlink()
                removed += 1
    for stem in _OUTPUT_STEMS:
        for path in output.glob(f"{stem}*.csv"):
            path.unlink()
            removed += 1
    for folder in sorted((p for p in output.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _prepare_onnx(args: argparse.Namespace) -> _Plan:
    """:func:`_prepare` for ``--backend onnx``: an exported BEATs file, no torch."""
    from lobes.onnx.runtime import OnnxModel
    from lobes.onnx.tasks import check_onnx_args

    output = Path(args.output)
    _check_output(output)
    check_onnx_args(args)
    shard = parse_shard(args.shard)
    _check_common(args)
    if args.checkpoint is None or args.config is not None:
        raise UsageError("--backend onnx needs --checkpoint MODEL.onnx (python -m lobes.export_onnx) and no --config")
    if args.label_names:
        raise UsageError(
            "--label-names: with --backend onnx the tag names are chosen at export "
            "(python -m lobes.export_onnx CHECKPOINT OUT.onnx --label-names CSV)"
        )
    model = OnnxModel(args.checkpoint, threads=args.threads)
    if model.kind != "beats":
        raise UsageError(
            f"--checkpoint {args.checkpoint}: holds a {model.kind!r} model; extraction needs a BEATs export"
        )
    exported = str(model.meta.get("layer", "last"))
    if args.layer not in ("last", exported):
        raise UsageError(
            f"--layer {args.layer}: {args.checkpoint} was exported with layer {exported}; export again with "
            f"--layer {args.layer} (python -m lobes.export_onnx) or pass --layer {exported}"
        )
    if args.tags and "probs" not in model.outputs:
        raise UsageError(f"--tags needs a fine-tuned BEATs export with tag probabilities; {args.checkpoint} has none")
    files, errors = _collect(args, shard)
    output.mkdir(parents=True, exist_ok=True)
    settings = {
        "backend": "onnx",
        "checkpoint_sha256": fingerprint(args.checkpoint),
        "cfg": model.meta.get("cfg"),
        "layer": exported,
        "pooling": args.pooling,
        "precision": model.meta.get("precision", "fp32"),
        "tags": args.tags,
    }

    def clear() -> None:
        removed = _remove_outputs(output)
        if removed:
            logger.warning("--overwrite: removed %d files of earlier outputs from %s", removed, output)

    check_run_settings(output / SETTINGS_FILE, settings, overwrite=args.overwrite, clear=clear)
    labels = model.labels if args.tags else None
    return _Plan(output, shard, files, errors, model, None, labels, None)


def _check_common(args: argparse.Namespace) -> None:
    if args.tags < 0:
        raise UsageError(f"--tags {args.tags}: expected K >= 0")
    if args.batch_seconds <= 0:
        raise UsageError(f"--batch-seconds {args.batch_seconds}: expected a positive number of seconds")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers {args.num_workers}: expected 0 or more")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected a positive number")
    for option, path in (("--checkpoint", args.checkpoint), ("--config", args.config)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{option} {path}: no such file")


def _prepare(args: argparse.Namespace) -> _Plan:
    """Check the arguments, list the inputs, load the model and reconcile with earlier outputs.

    Raises ``ValueError`` (``UsageError``, ``BEATsCheckpointError``, ...) or ``OSError`` for anything that
    stops the run before work: the caller turns them into exit code 2.
    """
    if getattr(args, "tokens", False):
        return _prepare_tokens(args)
    if args.backend == "onnx":
        return _prepare_onnx(args)
    _import_torch_side()
    output = Path(args.output)
    _check_output(output)
    device = resolve_device(args.device, option="--device")
    shard = parse_shard(args.shard)
    parse_layer(args.layer)
    if args.checkpoint is not None and args.config is not None:
        raise UsageError(
            f"--config {args.config} describes a randomly initialised model and --checkpoint "
            f"{args.checkpoint} carries its own cfg: give one or the other"
        )
    _check_common(args)
    if args.label_names and not args.tags:
        logger.warning("--label-names %s has no effect without --tags K", args.label_names)
    display_names = read_audioset_names(args.label_names) if args.tags and args.label_names else None

    files, errors = _collect(args, shard)
    logger.info(
        "%d inputs for shard %d/%d (%.1f s of audio), %d unreadable",
        len(files),
        shard[0],
        shard[1],
        sum(f.duration for f in files),
        len(errors),
    )

    model = load_beats(
        args.checkpoint, args.config, output_all_hiddens=args.layer == "all", device=device, seed=RANDOM_SEED
    )
    try:
        layer = layer_index(args.layer, len(model.encoder.layers))
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    labels = None
    if args.tags:
        if model.predictor is None:
            raise UsageError(
                f"--tags needs a fine-tuned checkpoint with a predictor (label_dict + "
                f"predictor.weight); {args.checkpoint or 'the random model'} has none"
            )
        labels = label_names(model, display_names)

    output.mkdir(parents=True, exist_ok=True)

    def clear() -> None:
        removed = _remove_outputs(output)
        if removed:
            logger.warning("--overwrite: removed %d files of earlier outputs from %s", removed, output)

    check_run_settings(output / SETTINGS_FILE, _settings(args, model, layer), overwrite=args.overwrite, clear=clear)
    return _Plan(output, shard, files, errors, model, layer, labels, device)


def _prepare_tokens(args: argparse.Namespace) -> _Plan:
    """:func:`_prepare` for ``--tokens``: a tokenizer checkpoint, one int16 id per valid token."""
    if args.backend != "torch":
        raise UsageError("--tokens runs with --backend torch (tokenizers are not exported to ONNX)")
    if args.checkpoint is None or args.config is not None:
        raise UsageError(
            "--tokens needs --checkpoint TOKENIZER.pt (a BEATs tokenizer in Microsoft's format, e.g. "
            "Tokenizer_iter3_plus_AS2M.pt, or a tokenizer written by recipes/BEATsPretrain) and no --config"
        )
    if args.tags or args.pooling != "none" or args.layer != "last":
        raise UsageError("--tokens writes one id per token: --tags, --pooling mean and --layer do not apply to it")
    _import_torch_side()
    from lobes.beats import load_tokenizer

    output = Path(args.output)
    _check_output(output)
    device = resolve_device(args.device, option="--device")
    shard = parse_shard(args.shard)
    _check_common(args)
    files, errors = _collect(args, shard)
    tokenizer = load_tokenizer(args.checkpoint, device)
    cfg = tokenizer.cfg if isinstance(tokenizer.cfg, dict) else tokenizer.cfg.to_dict()
    if int(cfg["quant_n"]) > np.iinfo(np.int16).max + 1:
        raise UsageError(f"--tokens: {args.checkpoint} has {cfg['quant_n']} codes; int16 ids hold at most 32768")
    output.mkdir(parents=True, exist_ok=True)
    settings = {
        "tokens": True,
        "checkpoint_sha256": fingerprint(args.checkpoint),
        "cfg": json.loads(json.dumps(cfg, sort_keys=True, default=str)),
        "precision": args.precision,
    }

    def clear() -> None:
        removed = _remove_outputs(output)
        if removed:
            logger.warning("--overwrite: removed %d files of earlier outputs from %s", removed, output)

    check_run_settings(output / SETTINGS_FILE, settings, overwrite=args.overwrite, clear=clear)
    return _Plan(output, shard, files, errors, tokenizer, None, None, device)


# --------------------------------------------------------------------------------------------------
# work
# --------------------------------------------------------------------------------------------------
def _read_checked(path: str, read, need: int):
    """``(waveform or None, error or None)`` of one input: unreadable, too short and non-finite audio fail."""
    try:
        wav = read(path, SAMPLE_RATE)
    except Exception as exc:  # AudioError, or whatever a decoder raises: report the file, keep going
        return None, f"unreadable: {exc}".replace("\n", " ")
    if len(wav) < need:
        return None, (
            f"too short: {len(wav) / SAMPLE_RATE:.3f} s at 16 kHz, BEATs needs at least {need / SAMPLE_RATE:.3f} s"
        )
    if not np.isfinite(np.asarray(wav)).all():
        return None, "invalid: the audio holds NaN or infinite samples"
    return wav, None


class _AudioDataset:
    """Loads one input: ``(index, waveform or None, error or None)`` (a map-style dataset for torch's loader)."""

    def __init__(self, files: list[AudioInput]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return (i, *_read_checked(self.files[i].path, load_audio, min_num_samples()))


def _collate(items):
    return items


def _worker_init(_):
    torch.set_num_threads(1)


def _iter_batches(dataset, batches, num_workers) -> Iterator[list]:
    if isinstance(dataset, _OnnxAudio):  # no torch: read in this process
        for batch in batches:
            yield [dataset[i] for i in batch]
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    yield from loader


def _part_name(stem: str, shard: tuple[int, int]) -> str:
    index, count = shard
    return f"{stem}.csv" if count == 1 else f"{stem}.shard-{index}-of-{count}.csv"


def _feature_path(output: Path, f: AudioInput) -> Path:
    return output / f"{f.key}.npy"


def _tags_path(output: Path, f: AudioInput) -> Path:
    return output / f"{f.key}.tags.json"


def _done(output: Path, f: AudioInput, tags: int) -> bool:
    return _feature_path(output, f).exists() and (tags == 0 or _tags_path(output, f).exists())


def _save_outputs(output: Path, f: AudioInput, feats: np.ndarray, tags: list | None) -> None:
    if tags is not None:
        payload = json.dumps([{"label": lab, "probability": p} for lab, p in tags], indent=1)
        atomic_write_text(_tags_path(output, f), payload)
    with atomic_open(_feature_path(output, f)) as fh:
        np.save(fh, feats)


class _OnnxAudio(_AudioDataset):
    """:class:`_AudioDataset` reading numpy arrays (``--backend onnx``)."""

    def __init__(self, files: list[AudioInput], need: int):
        super().__init__(files)
        self.need = need

    def __getitem__(self, i: int):
        return (i, *_read_checked(self.files[i].path, read_audio, self.need))


def _encode_batch_onnx(plan: _Plan, good: list, args: argparse.Namespace) -> None:
    """:func:`_encode_batch` with the exported model (the graph pads and masks; rows are cut to their tokens)."""
    from lobes.onnx.tasks import top_k

    out = plan.model.run([w for _, w in good])
    feats = out["features"]  # (B, N, C), or (B, L + 1, N, C)
    tags = top_k(out["probs"], plan.labels, args.tags) if args.tags else [None] * len(good)
    for row, (i, _) in enumerate(good):
        x = feats[row][..., : int(out["token_lengths"][row]), :]
        if args.pooling == "mean":
            x = x.mean(axis=-2)
        _save_outputs(plan.output, plan.files[i], x.astype(np.float32), tags[row])


def _encode_batch(plan: _Plan, good: list, args: argparse.Namespace) -> None:
    """Pad one batch, run BEATs with the true lengths, and save each file's valid tokens."""
    if plan.device is None:
        return _encode_batch_onnx(plan, good, args)
    with torch.no_grad():
        _encode_batch_torch(plan, good, args)


def _tokenize_batch(plan: _Plan, good: list, args: argparse.Namespace) -> None:
    """Pad one batch, tokenize it with the true lengths, and save each file's valid ids as int16 ``(T,)``."""
    lengths = torch.tensor([w.numel() for _, w in good])
    wavs = torch.zeros(len(good), int(lengths.max()))  # (B, T) zero-padded
    for row, (_, w) in enumerate(good):
        wavs[row, : w.numel()] = w
    rel_lens = (lengths.double() / lengths.max()).float()
    device = plan.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        tokens = plan.model.tokenize(wavs.to(device), rel_lens.to(device))
    ids, valid = tokens.ids.cpu(), tokens.mask.cpu()  # (B, N)
    for row, (i, _) in enumerate(good):
        _save_outputs(plan.output, plan.files[i], ids[row][valid[row]].numpy().astype(np.int16), None)


def _encode_batch_torch(plan: _Plan, good: list, args: argparse.Namespace) -> None:
    if getattr(args, "tokens", False):
        return _tokenize_batch(plan, good, args)
    model = plan.model
    lengths = torch.tensor([w.numel() for _, w in good])
    wavs = torch.zeros(len(good), int(lengths.max()))  # (B, T) zero-padded
    for row, (_, w) in enumerate(good):
        wavs[row, : w.numel()] = w
    rel_lens = (lengths.double() / lengths.max()).float()
    out = model.extract_features(wavs.to(plan.device), rel_lens.to(plan.device), layer=plan.layer)
    feats = out[0].float().cpu()  # (B, N, C), or (L + 1, B, N, C) for --layer all
    if feats.dim() == 4:
        feats = feats.transpose(0, 1)  # (B, L + 1, N, C)
    pad = token_padding_mask(wavs, rel_lens, model.cfg.input_patch_size)  # (B, N), True = padding
    tags = top_k_labels(out[1].cpu(), plan.labels, args.tags) if args.tags else [None] * len(good)
    for row, (i, _) in enumerate(good):
        n = int((~pad[row]).sum())
        x = feats[row][..., :n, :]  # (N_valid, C) or (L + 1, N_valid, C): valid tokens come first
        if args.pooling == "mean":
            x = x.mean(dim=-2)  # (C,) or (L + 1, C)
        _save_outputs(plan.output, plan.files[i], x.numpy().astype(np.float32), tags[row])


def _execute(plan: _Plan, args: argparse.Namespace) -> int:
    """Encode what is not done yet, then write the manifest, errors and tags of this shard."""
    files, errors, output, model = plan.files, list(plan.errors), plan.output, plan.model
    todo = [i for i, f in enumerate(files) if not _done(output, f, args.tags)]
    logger.info("%d already done, %d to encode", len(files) - len(todo), len(todo))
    batches = [[todo[j] for j in b] for b in length_batches([files[i].duration for i in todo], args.batch_seconds)]
    from tqdm import tqdm

    if args.precision == "bf16" and plan.device is not None:
        warn_if_emulated(plan.device, "bf16", "lobes.extract")
        if not getattr(args, "tokens", False):
            # weights cast once: faster than autocast, which re-casts them at every call; the fbank stays float32
            model.to(torch.bfloat16)
    start = time.perf_counter()
    seconds = 0.0
    with tqdm(
        total=round(sum(files[i].duration for i in todo), 2),
        unit="audio-s",
        unit_scale=False,
        disable=args.quiet,
        dynamic_ncols=True,
        desc="extract",
    ) as bar:
        dataset = _AudioDataset(files) if plan.device is not None else _OnnxAudio(files, model.min_samples)
        for items in _iter_batches(dataset, batches, args.num_workers):
            good = [(i, w) for i, w, err in items if err is None]
            errors.extend((files[i].path, err) for i, _, err in items if err is not None)
            if good:
                _encode_batch(plan, good, args)
            done_s = sum(files[i].duration for i, _, _ in items)
            seconds += done_s
            bar.update(round(done_s, 2))
    elapsed = time.perf_counter() - start
    if seconds:
        logger.info(
            "encoded %.1f s of audio in %.1f s: %.1f audio-s/s (%s, %s)",
            seconds,
            elapsed,
            seconds / elapsed,
            args.precision,
            plan.device or "onnxruntime",
        )

    failed = {p for p, _ in errors}
    manifest, tag_rows = [], []
    for f in files:
        out_path = _feature_path(output, f)
        if f.path in failed or not out_path.exists():
            continue
        shape = np.load(out_path, mmap_mode="r").shape
        manifest.append(
            [f.path, out_path.relative_to(output).as_posix(), f"{f.duration:.4f}", "x".join(map(str, shape))]
        )
        if args.tags:
            with open(_tags_path(output, f), encoding="utf-8") as fh:
                for rank, t in enumerate(json.load(fh), 1):
                    tag_rows.append([f.path, rank, t["label"], f"{t['probability']:.6f}"])
    write_csv(output / _part_name("manifest", plan.shard), ["input", "output", "duration", "shape"], manifest)
    write_csv(output / _part_name("errors", plan.shard), ["input", "reason"], sorted(errors))
    if args.tags:
        write_csv(output / _part_name("tags", plan.shard), ["input", "rank", "label", "probability"], tag_rows)
    for path, reason in sorted(errors):
        logger.error("%s: %s", path, reason)
    logger.info("wrote %d outputs to %s; %d failed", len(manifest), output, len(errors))
    return EXIT_FAILED_FILES if errors else EXIT_OK


def merge_parts(output: str | os.PathLike) -> list[Path]:
    """Join the per-shard ``manifest`` / ``errors`` / ``tags`` parts of ``output`` into single CSVs.

    Arguments
    ---------
    output : str or PathLike
        The ``--output`` folder of sharded runs.

    Returns
    -------
    list of Path
        The merged files written.

    Example
    -------
    >>> import tempfile
    >>> merge_parts(tempfile.mkdtemp())
    []
    """
    output = Path(output)
    if not output.is_dir():
        raise UsageError(f"--output {output}: expected the folder of sharded runs to merge")
    written = []
    for stem in _OUTPUT_STEMS:
        parts = sorted(output.glob(f"{stem}.shard-*-of-*.csv"))
        if not parts:
            continue
        header, rows = None, []
        for part in parts:
            with open(part, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                head = next(reader, None)
                header = header or head
                rows.extend(reader)
        rows.sort()
        write_csv(output / f"{stem}.csv", header, rows)
        written.append(output / f"{stem}.csv")
    return written


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lobes.extract",
        description=(
            "Encode audio files with BEATs and write one .npy of features per file. Every input is "
            "mixed down to mono (mean of its channels) and resampled to 16 kHz before encoding. "
            "Rerunning with the same --output and settings skips files already done."
        ),
        epilog=(
            f"exit codes: {EXIT_OK} = every file encoded; {EXIT_FAILED_FILES} = some files were "
            f"unreadable or invalid (listed with the reason in errors.csv), the others were encoded; "
            f"{EXIT_USAGE} = bad arguments, input list, device or checkpoint, or --output holds outputs "
            "made with other settings (nothing encoded). Under torchrun (RANK / WORLD_SIZE) or with --shard "
            "each process writes manifest.shard-I-of-N.csv etc.; join them with "
            "`python -m lobes.extract --output DIR --merge`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input",
        nargs="+",
        help="folders (searched recursively for audio files), audio files, "
        "or CSVs with a 'wav' column and optional 'ID' column",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="BEATs checkpoint in Microsoft's format "
        "({'cfg', 'model'[, 'label_dict']}); without it a randomly initialised model is used",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML of BEATsConfig fields for the randomly "
        "initialised model (e.g. hparams/beats_tiny.yaml); not with --checkpoint",
    )
    parser.add_argument(
        "--layer",
        default="last",
        help="'last', a layer index (0 = input of the first transformer "
        "layer, 1..L = output of layer i; negative counts from the end) or 'all' (adds a leading "
        "layer axis of size L + 1)",
    )
    parser.add_argument(
        "--pooling",
        default="none",
        choices=["none", "mean"],
        help="none = one vector per token (T, C); mean = average over the file's valid tokens (C,)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="compute precision (outputs are always saved as float32)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N or another torch device")
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=60.0,
        help="padded audio per batch, in seconds (a longer file forms its own batch)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument(
        "--shard",
        default=None,
        help="i/n: take every n-th input starting at i (combined with torchrun's RANK / WORLD_SIZE)",
    )
    parser.add_argument(
        "--tags",
        type=int,
        default=0,
        metavar="K",
        help="with a fine-tuned (AS2M) checkpoint: write the top-K labels and probabilities "
        "per file (.tags.json next to each output and tags.csv)",
    )
    parser.add_argument(
        "--label-names",
        default=None,
        help="CSV with 'mid' and 'display_name' columns "
        "(AudioSet's class_labels_indices.csv) to turn label ids into names for --tags",
    )
    parser.add_argument("--data-root", default=None, help="replaces $data_root in CSV paths")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="if --output holds outputs made with other "
        "settings (see its settings.json), delete them and start over instead of stopping",
    )
    parser.add_argument(
        "--merge", action="store_true", help="only join the per-shard manifest/errors/tags parts in --output, then exit"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx"),
        help="torch, or onnx: --checkpoint is an .onnx file (python -m lobes.export_onnx) run by onnxruntime",
    )
    parser.add_argument("--threads", type=int, default=None, help="with --backend onnx: onnxruntime threads")
    parser.add_argument(
        "--tokens",
        action="store_true",
        help="write token ids instead of features: --checkpoint is a tokenizer (BEATs tokenizer in Microsoft's "
        "format or a recipes/BEATsPretrain tokenizer); one int16 .npy of shape (T,) per file",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Encode the inputs described by parsed command-line ``args``; returns the exit code.

    Set-up problems (arguments, inputs, device, checkpoint, settings of earlier outputs) are logged and give
    :data:`lobes.inputs.EXIT_USAGE` before any audio is encoded.
    """
    try:
        plan = _prepare(args)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    return _execute(plan, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (see ``--help``)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        try:
            paths = merge_parts(args.output)
        except UsageError as exc:
            logger.error("%s", exc)
            return EXIT_USAGE
        for path in paths:
            logger.info("wrote %s", path)
        return EXIT_OK
    if not args.input:
        parser.error("--input is required (unless --merge)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
