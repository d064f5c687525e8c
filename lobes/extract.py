"""Embedding extraction with BEATs: ``python -m lobes.extract --input DIR_OR_CSV --output DIR``.

Every readable audio file (wav / flac / ogg, anything soundfile opens) is mixed down to mono,
resampled to 16 kHz and encoded by BEATs; the features are written as one ``.npy`` per input file,
mirroring the input tree, plus a manifest CSV. Files are batched by duration (longest first inside a
sorted order) so that little padding is computed, and the model only ever sees the valid tokens of
each file (token masks from the true lengths), so a file gives the same features alone or in a batch.

Outputs under ``--output``:

- ``<relative path of the input>.npy`` (e.g. ``sub/a.flac.npy``) for directory input; for CSV input,
  ``<ID>.npy`` when the CSV has an ``ID`` column, else the path relative to the common parent folder of
  all inputs. Shapes: ``(T, C)`` per-token frames or ``(C,)`` mean-pooled; with ``--layer all`` a
  leading layer axis ``(L + 1, ...)``.
- ``manifest.csv`` (``input, output, duration, shape``), ``errors.csv`` (``input, reason``) and, with
  ``--tags K``, ``tags.csv`` (``input, rank, label, probability``) plus one ``.tags.json`` per file.
  With sharding each process writes ``manifest.shard-I-of-N.csv`` etc.; ``--merge`` joins the parts.

Every file is written to a temporary name and moved into place, so an interrupted run (even
``kill -9``) leaves only complete files, and a rerun skips inputs whose outputs already exist.

Example
-------
>>> import numpy as np, soundfile as sf, tempfile, os
>>> root = tempfile.mkdtemp()
>>> sf.write(os.path.join(root, "a.wav"), np.zeros(8000, dtype="float32"), 16000)
>>> files, errors = collect_inputs(root)
>>> [(f.rel_output, round(f.duration, 2)) for f in files], errors
([('a.wav.npy', 0.5)], [])
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lobes.beats import BEATs, BEATsConfig, min_num_samples, token_padding_mask, top_k_labels

__all__ = [
    "AUDIO_EXTENSIONS",
    "EXIT_FAILED_FILES",
    "EXIT_OK",
    "EXIT_USAGE",
    "SAMPLE_RATE",
    "AudioInput",
    "collect_inputs",
    "length_batches",
    "load_audio",
    "main",
    "merge_parts",
    "parse_shard",
]

logger = logging.getLogger("lobes.extract")

SAMPLE_RATE = 16000
"""BEATs works on 16 kHz mono audio; everything else is converted first."""
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")
"""File endings picked up when ``--input`` is a folder (case-insensitive)."""

EXIT_OK = 0
"""Every input was encoded."""
EXIT_FAILED_FILES = 1
"""Some inputs could not be read or were invalid; they are listed in the errors file."""
EXIT_USAGE = 2
"""Bad arguments, a missing or malformed input list, or an unusable checkpoint: nothing was done."""

@dataclasses.dataclass
class AudioInput:
    """One file to encode: where it is, where its features go, how long it lasts (seconds)."""

    path: str
    rel_output: str
    duration: float


def _audio_info(path: str) -> float:
    """Duration of an audio file in seconds, read from its header (raises on unreadable files)."""
    import soundfile as sf

    info = sf.info(path)
    if info.samplerate <= 0:
        raise ValueError(f"invalid sample rate {info.samplerate}")
    return info.frames / info.samplerate


def _safe_rel(name: str) -> str:
    """A relative output path that cannot leave the output folder."""
    parts = [p for p in Path(name).parts if p not in ("", ".", "/")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"unusable output name {name!r}: expected a relative path without '..'")
    return str(Path(*parts))


def _read_csv_inputs(csv_path: Path, data_root: str | None) -> list[tuple[str, str | None]]:
    """Rows ``(wav path, ID or None)`` of a manifest; relative paths are taken from the CSV's folder."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "wav" not in fields:
            raise ValueError(
                f"{csv_path}: expected a CSV with a 'wav' column (and optionally 'ID'), got columns {fields}"
            )
        rows = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            wav = row["wav"]
            if data_root is not None:
                wav = wav.replace("$data_root", data_root)
            if not os.path.isabs(wav):
                wav = str(csv_path.parent / wav)
            rows.append((os.path.normpath(wav), row.get("ID") or None))
    return rows


def collect_inputs(source: str | os.PathLike, data_root: str | None = None,
                   shard: tuple[int, int] = (0, 1)) -> tuple[list[AudioInput], list[tuple[str, str]]]:
    """List the audio files of a folder (recursively) or of a CSV manifest, in a fixed order.

    Arguments
    ---------
    source : str or PathLike
        A folder (files ending in one of ``AUDIO_EXTENSIONS``) or a CSV with a ``wav`` column and an
        optional ``ID`` column.
    data_root : str, optional
        Replaces ``$data_root`` in the CSV's paths.
    shard : (int, int)
        ``(index, count)``: keep the sorted inputs ``index, index + count, ...`` (see ``parse_shard``).

    Returns
    -------
    files : list of AudioInput
        Readable inputs, sorted by path (deterministic, the basis of sharding).
    errors : list of (str, str)
        ``(path, reason)`` for inputs whose header cannot be read.

    Example
    -------
    >>> collect_inputs("/does/not/exist")
    Traceback (most recent call last):
    ...
    FileNotFoundError: --input /does/not/exist: expected an existing folder or CSV file
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(
            str(p) for p in source.rglob("*")
            if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
        )
        entries = [(p, os.path.relpath(p, source) + ".npy") for p in paths]
    elif source.is_file():
        rows = _read_csv_inputs(source, data_root)
        if any(i is not None for _, i in rows):
            missing = [w for w, i in rows if i is None]
            if missing:
                raise ValueError(f"{source}: empty ID for {missing[:3]}")
            entries = [(w, _safe_rel(i) + ".npy") for w, i in rows]
        else:
            parents = [os.path.dirname(os.path.abspath(w)) for w, _ in rows]
            common = os.path.commonpath(parents) if parents else ""
            entries = [(w, os.path.relpath(os.path.abspath(w), common) + ".npy") for w, _ in rows]
        seen: dict[str, str] = {}
        for wav, out in entries:
            if out in seen:
                raise ValueError(f"{source}: {wav} and {seen[out]} would both be written to {out}")
            seen[out] = wav
        entries.sort()
    else:
        raise FileNotFoundError(f"--input {source}: expected an existing folder or CSV file")

    files, errors = [], []
    for path, rel in entries[shard[0]::shard[1]]:
        try:
            files.append(AudioInput(path, rel, _audio_info(path)))
        except Exception as exc:  # any header failure: report the file, keep going
            errors.append((path, f"unreadable: {type(exc).__name__}: {exc}".replace("\n", " ")))
    return files, errors


def load_audio(path: str, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read a file, mix its channels to mono (mean) and resample to ``sample_rate``.

    Arguments
    ---------
    path : str
        Audio file readable by soundfile.
    sample_rate : int
        Target rate in Hz.

    Returns
    -------
    torch.Tensor
        Waveform ``(T,)``, float32.

    Example
    -------
    >>> import soundfile as sf, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "s.wav")
    >>> sf.write(p, np.zeros((4410, 2), dtype="float32"), 44100)
    >>> load_audio(p).shape
    torch.Size([1600])
    """
    import soundfile as sf
    import torchaudio.functional as AF

    data, rate = sf.read(path, dtype="float32", always_2d=True)  # (T, channels)
    wav = torch.from_numpy(data).mean(dim=1)  # (T,)
    if rate != sample_rate:
        wav = AF.resample(wav, rate, sample_rate)
    return wav.contiguous()


def length_batches(durations: Sequence[float], batch_seconds: float) -> list[list[int]]:
    """Group indices into batches of similar length whose padded size stays within ``batch_seconds``.

    Indices are sorted by duration (longest first, ties by index), then cut greedily so that
    ``len(batch) * longest_in_batch <= batch_seconds`` (a batch always holds at least one item).

    Arguments
    ---------
    durations : sequence of float
        Duration of each item in seconds.
    batch_seconds : float
        Budget of padded audio per batch, in seconds.

    Returns
    -------
    list of list of int
        Batches of indices into ``durations``.

    Example
    -------
    >>> length_batches([1.0, 5.0, 2.0, 1.5, 4.0], batch_seconds=8.0)
    [[1], [4, 2], [3, 0]]
    """
    if batch_seconds <= 0:
        raise ValueError(f"batch_seconds must be positive, got {batch_seconds}")
    order = sorted(range(len(durations)), key=lambda i: (-durations[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = durations[current[0]] if current else durations[i]
        if current and (len(current) + 1) * longest > batch_seconds:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def parse_shard(text: str | None, env: dict | None = None) -> tuple[int, int]:
    """Combine ``--shard i/n`` with ``torchrun``'s ``RANK`` / ``WORLD_SIZE`` into one ``(index, count)``.

    Arguments
    ---------
    text : str, optional
        ``"i/n"`` with ``0 <= i < n``, or None for no explicit shard.
    env : dict, optional
        Environment to read ``RANK`` / ``WORLD_SIZE`` from (default ``os.environ``).

    Returns
    -------
    (int, int)
        This process takes the sorted inputs ``index, index + count, index + 2 * count, ...``.

    Example
    -------
    >>> parse_shard("1/3", env={}), parse_shard("1/3", env={"RANK": "1", "WORLD_SIZE": "2"})
    ((1, 3), (3, 6))
    """
    env = os.environ if env is None else env
    index, count = 0, 1
    if text:
        try:
            index, count = (int(v) for v in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r}: expected the form i/n, e.g. 0/4") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard {text!r}: expected 0 <= i < n")
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} outside WORLD_SIZE={world}")
    return index * world + rank, count * world


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    def write(f):
        import io

        text = io.StringIO()
        w = csv.writer(text)
        w.writerow(header)
        w.writerows(rows)
        f.write(text.getvalue().encode("utf-8"))

    _atomic_write(path, write)


def _part_name(stem: str, shard: tuple[int, int]) -> str:
    index, count = shard
    return f"{stem}.csv" if count == 1 else f"{stem}.shard-{index}-of-{count}.csv"


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
    written = []
    for stem in ("manifest", "errors", "tags"):
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
        _write_csv(output / f"{stem}.csv", header, rows)
        written.append(output / f"{stem}.csv")
    return written


class _AudioDataset(torch.utils.data.Dataset):
    """Loads one input: ``(index, waveform or None, error or None)``."""

    def __init__(self, files: list[AudioInput]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i].path
        try:
            wav = load_audio(path)
        except Exception as exc:
            return i, None, f"unreadable: {type(exc).__name__}: {exc}".replace("\n", " ")
        need = min_num_samples()
        if wav.numel() < need:
            return i, None, (f"too short: {wav.numel() / SAMPLE_RATE:.3f} s at 16 kHz, "
                             f"BEATs needs at least {need / SAMPLE_RATE:.3f} s")
        if not torch.isfinite(wav).all():
            return i, None, "invalid: the audio holds NaN or infinite samples"
        return i, wav, None


def _collate(items):
    return items


def _worker_init(_):
    torch.set_num_threads(1)


def _load_model(checkpoint: str | None, config: str | None, output_all_hiddens: bool, device: str) -> BEATs:
    """BEATs from a Microsoft checkpoint, or randomly initialised (loudly) when none is given."""
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
        model = BEATs(ckp_path=checkpoint, freeze=True, output_all_hiddens=output_all_hiddens)
    else:
        cfg = BEATsConfig.released()
        if config is not None:
            from hyperpyyaml import load_hyperpyyaml

            with open(config, encoding="utf-8") as f:
                cfg.update(dict(load_hyperpyyaml(f)))
        logger.warning(
            "No --checkpoint given: using a RANDOMLY INITIALISED BEATs%s. The features are meaningless "
            "except for trying the tool out; pass --checkpoint PATH for real embeddings.",
            f" ({config})" if config else " (released architecture)",
        )
        model = BEATs(ckp_path=None, freeze=True, output_all_hiddens=output_all_hiddens, cfg=cfg)
    return model.to(device).eval()


def _label_names(model: BEATs, names_csv: str | None) -> list[str]:
    """Class names of a fine-tuned checkpoint's predictor, in predictor order."""
    labels = model.labels
    if labels is None:
        logger.warning("The checkpoint has no label_dict: tags are written as class indices.")
        labels = [f"class_{i}" for i in range(model.predictor.out_features)]
    if names_csv:  # AudioSet's class_labels_indices.csv: index, mid, display_name
        with open(names_csv, newline="", encoding="utf-8") as f:
            display = {row["mid"]: row["display_name"] for row in csv.DictReader(f)}
        labels = [display.get(lab, lab) for lab in labels]
    return labels


def _layer_index(layer: str, model: BEATs) -> int | None:
    """``--layer`` as the ``layer`` argument of ``BEATs.extract_features`` (None = last or all)."""
    if layer in ("last", "all"):
        return None
    n = len(model.encoder.layers)
    index = int(layer) + (n + 1 if int(layer) < 0 else 0)
    if not 0 <= index <= n:
        raise ValueError(f"--layer {layer}: this model has layers 0..{n} (0 = input to the first "
                         "transformer layer, n = last)")
    return index


def _iter_batches(dataset, batches, num_workers) -> Iterator[list]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=_collate, num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    yield from loader


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lobes.extract",
        description=(
            "Encode audio files with BEATs and write one .npy of features per file. Every input is "
            "mixed down to mono (mean of its channels) and resampled to 16 kHz before encoding. "
            "Rerunning with the same --output skips files already done."
        ),
        epilog=(
            f"exit codes: {EXIT_OK} = every file encoded; {EXIT_FAILED_FILES} = some files were "
            f"unreadable or invalid (listed with the reason in errors.csv), the others were encoded; "
            f"{EXIT_USAGE} = bad arguments, input list or checkpoint (nothing encoded). Under torchrun "
            "(RANK / WORLD_SIZE) or with --shard each process writes manifest.shard-I-of-N.csv etc.; "
            "join them with `python -m lobes.extract --output DIR --merge`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", help="folder (searched recursively for audio files) or CSV with a "
                        "'wav' column and optional 'ID' column")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--checkpoint", default=None, help="BEATs checkpoint in Microsoft's format "
                        "({'cfg', 'model'[, 'label_dict']}); without it a randomly initialised model is used")
    parser.add_argument("--config", default=None, help="YAML of BEATsConfig fields for the randomly "
                        "initialised model (e.g. hparams/beats_tiny.yaml); ignored with --checkpoint")
    parser.add_argument("--layer", default="last", help="'last', a layer index (0 = input of the first transformer layer, "
                        "1..L = output of layer i; negative counts from the end) or 'all' (adds a leading "
                        "layer axis of size L + 1)")
    parser.add_argument("--pooling", default="none", choices=["none", "mean"],
                        help="none = one vector per token (T, C); mean = average over the file's valid tokens (C,)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="compute precision (outputs are always saved as float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--batch-seconds", type=float, default=60.0,
                        help="padded audio per batch, in seconds (a longer file forms its own batch)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--shard", default=None, help="i/n: take every n-th input starting at i "
                        "(combined with torchrun's RANK / WORLD_SIZE)")
    parser.add_argument("--tags", type=int, default=0, metavar="K",
                        help="with a fine-tuned (AS2M) checkpoint: write the top-K labels and probabilities "
                        "per file (.tags.json next to each output and tags.csv)")
    parser.add_argument("--label-names", default=None, help="CSV with 'mid' and 'display_name' columns "
                        "(AudioSet's class_labels_indices.csv) to turn label ids into names for --tags")
    parser.add_argument("--data-root", default=None, help="replaces $data_root in CSV paths")
    parser.add_argument("--merge", action="store_true",
                        help="only join the per-shard manifest/errors/tags parts in --output, then exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _done(out_path: Path, tags: int) -> bool:
    return out_path.exists() and (tags == 0 or out_path.with_suffix(".tags.json").exists())


def _save_outputs(out_path: Path, feats: np.ndarray, tags: list | None) -> None:
    if tags is not None:
        payload = json.dumps([{"label": lab, "probability": p} for lab, p in tags], indent=1)
        _atomic_write(out_path.with_suffix(".tags.json"), lambda f: f.write(payload.encode("utf-8")))
    _atomic_write(out_path, lambda f: np.save(f, feats))


def run(args: argparse.Namespace) -> int:
    """Encode the inputs described by parsed command-line ``args``; returns the exit code."""
    output = Path(args.output)
    shard = parse_shard(args.shard)
    if args.layer not in ("last", "all"):
        try:
            int(args.layer)
        except ValueError:
            raise ValueError(f"--layer {args.layer!r}: expected 'last', 'all' or an integer") from None
    if args.tags < 0:
        raise ValueError(f"--tags {args.tags}: expected K >= 0")

    files, errors = collect_inputs(args.input, args.data_root, shard)
    logger.info("%d inputs for shard %d/%d (%.1f s of audio), %d unreadable",
                len(files), shard[0], shard[1], sum(f.duration for f in files), len(errors))

    model = _load_model(args.checkpoint, args.config, args.layer == "all", args.device)
    layer = _layer_index(args.layer, model)
    if args.tags and getattr(model, "predictor", None) is None:
        raise ValueError(f"--tags needs a fine-tuned checkpoint with a predictor (label_dict + "
                         f"predictor.weight); {args.checkpoint or 'the random model'} has none")
    labels = _label_names(model, args.label_names) if args.tags else None

    todo = [i for i, f in enumerate(files) if not _done(output / f.rel_output, args.tags)]
    logger.info("%d already done, %d to encode", len(files) - len(todo), len(todo))
    batches = [[todo[j] for j in b] for b in length_batches([files[i].duration for i in todo],
                                                             args.batch_seconds)]
    from tqdm import tqdm

    if args.precision == "bf16":
        # weights cast once: faster than autocast, which re-casts them at every call; the fbank stays float32
        model = model.to(torch.bfloat16)
    start = time.perf_counter()
    seconds = 0.0
    with tqdm(total=round(sum(files[i].duration for i in todo), 2), unit="audio-s", unit_scale=False,
              disable=args.quiet, dynamic_ncols=True, desc="extract") as bar:
        for items in _iter_batches(_AudioDataset(files), batches, args.num_workers):
            good = [(i, w) for i, w, err in items if err is None]
            errors.extend((files[i].path, err) for i, _, err in items if err is not None)
            if good:
                _encode_batch(model, good, files, output, args, layer, labels)
            done_s = sum(files[i].duration for i, _, _ in items)
            seconds += done_s
            bar.update(round(done_s, 2))
    elapsed = time.perf_counter() - start
    if seconds:
        logger.info("encoded %.1f s of audio in %.1f s: %.1f audio-s/s (%s, %s)",
                    seconds, elapsed, seconds / elapsed, args.precision, args.device)

    failed = {p for p, _ in errors}
    manifest, tag_rows = [], []
    for f in files:
        out_path = output / f.rel_output
        if f.path in failed or not out_path.exists():
            continue
        shape = np.load(out_path, mmap_mode="r").shape
        manifest.append([f.path, f.rel_output, f"{f.duration:.4f}", "x".join(map(str, shape))])
        if args.tags:
            with open(out_path.with_suffix(".tags.json"), encoding="utf-8") as fh:
                for rank, t in enumerate(json.load(fh), 1):
                    tag_rows.append([f.path, rank, t["label"], f"{t['probability']:.6f}"])
    _write_csv(output / _part_name("manifest", shard), ["input", "output", "duration", "shape"], manifest)
    _write_csv(output / _part_name("errors", shard), ["input", "reason"], sorted(errors))
    if args.tags:
        _write_csv(output / _part_name("tags", shard), ["input", "rank", "label", "probability"], tag_rows)
    for path, reason in sorted(errors):
        logger.error("%s: %s", path, reason)
    logger.info("wrote %d outputs to %s; %d failed", len(manifest), output, len(errors))
    return EXIT_FAILED_FILES if errors else EXIT_OK


@torch.no_grad()
def _encode_batch(model: BEATs, good, files, output: Path, args, layer, labels) -> None:
    """Pad one batch, run BEATs with the true lengths, and save each file's valid tokens."""
    lengths = torch.tensor([w.numel() for _, w in good])
    wavs = torch.zeros(len(good), int(lengths.max()))  # (B, T) zero-padded
    for row, (_, w) in enumerate(good):
        wavs[row, : w.numel()] = w
    rel_lens = lengths.double() / lengths.max()
    out = model.extract_features(wavs.to(args.device), rel_lens.float().to(args.device), layer=layer)
    feats = out[0].float().cpu()  # (B, N, C), or (L + 1, B, N, C) for --layer all
    if feats.dim() == 4:
        feats = feats.transpose(0, 1)  # (B, L + 1, N, C)
    pad = token_padding_mask(wavs, rel_lens.float(), model.cfg.input_patch_size)  # (B, N), True = padding
    tags = top_k_labels(out[1].cpu(), labels, args.tags) if args.tags else [None] * len(good)
    for row, (i, _) in enumerate(good):
        n = int((~pad[row]).sum())
        x = feats[row][..., :n, :]  # (N_valid, C) or (L + 1, N_valid, C): valid tokens come first
        if args.pooling == "mean":
            x = x.mean(dim=-2)  # (C,) or (L + 1, C)
        _save_outputs(output / files[i].rel_output, x.numpy().astype(np.float32), tags[row])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (see ``--help``)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        for path in merge_parts(args.output):
            logger.info("wrote %s", path)
        return EXIT_OK
    if not args.input:
        parser.error("--input is required (unless --merge)")
    try:
        return run(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
