"""The command-line runner behind ``python -m lobes.transcribe`` and ``python -m lobes.classify``.

A command supplies a parser (:func:`build_parser` plus its own options) and a function that loads its model
into a :class:`Task`; :func:`run_command` does the rest, the same way for every command:

* inputs: audio files, folders (recursively) and CSV manifests (``wav`` column, optional ``ID``), listed by
  :func:`lobes.inputs.collect_inputs` and batched by :func:`lobes.inputs.length_batches` within
  ``--batch-seconds`` of padded audio;
* output (``--output``): ``.jsonl`` (one JSON object per good input), ``.csv`` (one row per good input,
  lists and objects JSON-encoded) or ``.srt`` (subtitles of one recording, from word timestamps); without
  ``--output`` the JSON lines go to standard output. The file is rewritten atomically (after a batch, at
  most every few seconds, and at the end), so an interrupted run leaves a complete file, and a rerun skips
  the inputs it already holds. The settings that change the outputs (model checksum, precision, the
  command's own) are kept in ``<output>.settings.json``; a rerun with other settings is refused unless
  ``--overwrite`` (which starts the output over);
* errors: unreadable or invalid inputs are listed with the reason (log and ``<output>.errors.csv``) while
  every good input is still written: exit code 1. Usage and set-up problems (bad options, missing inputs,
  an unusable model folder, a settings mismatch) exit with code 2 before any work; 0 means every input
  was done;
* ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``), ``--precision`` (``fp32``, ``bf16``), a progress
  bar on standard error (tqdm; ``--quiet`` hides it);
* ``--backend onnx``: ``MODEL`` is an ``.onnx`` file written by ``python -m lobes.export_onnx`` and the
  command runs it with onnxruntime on the CPU (``--threads``), importing neither torch nor speechbrain.

Example
-------
>>> parser = build_parser("demo", "A demo command.", formats=(".jsonl",))
>>> args = parser.parse_args(["model", "a.wav", "--output", "out.jsonl"])
>>> args.model, args.inputs, args.output, args.precision
('model', ['a.wav'], 'out.jsonl', 'fp32')
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from lobes.inference.precision import PRECISIONS
from lobes.inputs import (
    EXIT_FAILED_FILES,
    EXIT_OK,
    EXIT_USAGE,
    AudioInput,
    SettingsMismatch,
    UsageError,
    check_run_settings,
    collect_inputs,
    fingerprint,
    length_batches,
    resolve_device,
    write_csv,
)
from lobes.io import atomic_write_text

__all__ = [
    "OUTPUT_FORMATS",
    "CsvOutput",
    "JsonlOutput",
    "SrtOutput",
    "Task",
    "build_parser",
    "format_srt",
    "open_output",
    "run",
    "run_command",
    "srt_cues",
]

logger = logging.getLogger(__name__)

SAVE_EVERY_S = 5.0
"""Least time between two rewrites of the output file during a run."""


class Task(Protocol):
    """What a command plugs into the runner: a loaded model and how it handles a batch of inputs."""

    def settings(self) -> dict:
        """JSON values that change the outputs (besides the model checksum and precision the runner adds)."""

    def process(self, files: list[AudioInput]) -> list[dict | Exception]:
        """One JSON-able record per file (without ``path``: the runner adds it first) or the exception that
        made the file fail (its message is the reason listed)."""


# --------------------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------------------
class _Output:
    """Records keyed by input path, rewritten atomically in the input order."""

    suffix = ""

    def __init__(self, path: str | os.PathLike, order: Sequence[str] = ()):
        self.path = Path(path)
        self.order = {p: i for i, p in enumerate(order)}
        self.records: dict[str, Any] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        raise NotImplementedError

    def done(self) -> set[str]:
        """Input paths already in the file."""
        return set(self.records)

    def clear(self) -> None:
        """Forget every earlier record (the next :meth:`save` starts the file over)."""
        self.records = {}

    def add(self, path: str, record: Mapping[str, Any]) -> None:
        """Add or replace the record of ``path``."""
        self.records[path] = {"path": path, **{k: v for k, v in record.items() if k != "path"}}

    def _sorted(self) -> list[Any]:
        known = len(self.order)
        keys = sorted(enumerate(self.records), key=lambda ik: (self.order.get(ik[1], known), ik[0]))
        return [self.records[k] for _, k in keys]

    def render(self) -> str:
        raise NotImplementedError

    def save(self) -> None:
        """Rewrite the file atomically with every record."""
        atomic_write_text(self.path, self.render())


class JsonlOutput(_Output):
    """One JSON object per line, ``path`` first.

    Example
    -------
    >>> import tempfile, os
    >>> out = JsonlOutput(os.path.join(tempfile.mkdtemp(), "o.jsonl"), order=["b.wav", "a.wav"])
    >>> out.add("a.wav", {"text": "HI"}); out.add("b.wav", {"text": "YES"}); out.save()
    >>> open(out.path).read()
    '{"path": "b.wav", "text": "YES"}\\n{"path": "a.wav", "text": "HI"}\\n'
    >>> sorted(JsonlOutput(out.path).done())
    ['a.wav', 'b.wav']
    """

    suffix = ".jsonl"

    def _read(self) -> None:
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                path = record["path"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(
                    f"{self.path}:{number}: not a JSON object with a 'path'; this file was not written "
                    "by this command: choose another --output or pass --overwrite"
                ) from None
            self.records[path] = record

    def render(self) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._sorted())


class CsvOutput(_Output):
    """One row per input; columns in first-seen order (``path`` first); lists and objects as JSON text.

    Example
    -------
    >>> import tempfile, os
    >>> out = CsvOutput(os.path.join(tempfile.mkdtemp(), "o.csv"))
    >>> out.add("a.wav", {"text": "HI", "words": [{"word": "HI", "start": 0.0, "end": 0.2}]}); out.save()
    >>> print(open(out.path).read().strip())
    path,text,words
    a.wav,HI,"[{""word"": ""HI"", ""start"": 0.0, ""end"": 0.2}]"
    """

    suffix = ".csv"

    def __init__(self, path: str | os.PathLike, order: Sequence[str] = ()):
        self.columns: list[str] = ["path"]
        super().__init__(path, order)

    def _read(self) -> None:
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or reader.fieldnames[0] != "path":
                raise UsageError(
                    f"{self.path}: expected a CSV whose first column is 'path'; this file was not "
                    "written by this command: choose another --output or pass --overwrite"
                )
            self.columns = list(reader.fieldnames)
            for row in reader:
                self.records[row["path"]] = row

    def add(self, path: str, record: Mapping[str, Any]) -> None:
        flat = {
            k: (json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict, tuple)) else v)
            for k, v in record.items()
            if k != "path"
        }
        for key in flat:
            if key not in self.columns:
                self.columns.append(key)
        super().add(path, flat)

    def render(self) -> str:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._sorted())
        return text.getvalue()


def _srt_time(seconds: float) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def srt_cues(
    words: Iterable[Mapping[str, Any]], max_words: int = 12, max_seconds: float = 6.0, max_gap: float = 1.0
) -> list[tuple[float, float, str]]:
    """Group timed words into subtitle cues ``(start, end, text)``.

    A cue ends before a word that would make it longer than ``max_words`` words or ``max_seconds``, or that
    starts more than ``max_gap`` seconds after the previous word ended.

    Example
    -------
    >>> srt_cues([{"word": "A", "start": 0.0, "end": 0.5}, {"word": "B", "start": 0.6, "end": 1.0},
    ...           {"word": "C", "start": 3.0, "end": 3.4}])
    [(0.0, 1.0, 'A B'), (3.0, 3.4, 'C')]
    """
    cues: list[tuple[float, float, str]] = []
    current: list[Mapping[str, Any]] = []
    for word in words:
        if current and (
            len(current) >= max_words
            or word["end"] - current[0]["start"] > max_seconds
            or word["start"] - current[-1]["end"] > max_gap
        ):
            cues.append((current[0]["start"], current[-1]["end"], " ".join(w["word"] for w in current)))
            current = []
        current.append(word)
    if current:
        cues.append((current[0]["start"], current[-1]["end"], " ".join(w["word"] for w in current)))
    return cues


def format_srt(cues: Sequence[tuple[float, float, str]]) -> str:
    """SubRip text of ``(start, end, text)`` cues.

    Example
    -------
    >>> print(format_srt([(0.0, 1.25, "HELLO THERE")]), end="")
    1
    00:00:00,000 --> 00:00:01,250
    HELLO THERE
    <BLANKLINE>
    """
    return "".join(
        f"{i}\n{_srt_time(start)} --> {_srt_time(end)}\n{text}\n\n"
        for i, (start, end, text) in enumerate(cues, start=1)
    )


class SrtOutput(_Output):
    """Subtitles of one recording from its record's ``words`` (``word``, ``start``, ``end`` in seconds).

    An existing file counts as done for the input its settings record names (the runner adds the input to
    the settings of an ``.srt`` output).
    """

    suffix = ".srt"

    def _read(self) -> None:
        self.existing = True

    def done(self) -> set[str]:
        return set(self.order) if getattr(self, "existing", False) and not self.records else set(self.records)

    def clear(self) -> None:
        super().clear()
        self.existing = False

    def add(self, path: str, record: Mapping[str, Any]) -> None:
        if "words" not in record:
            raise UsageError("an .srt output needs word timestamps, which this command does not produce; use .jsonl")
        super().add(path, record)

    def render(self) -> str:
        records = self._sorted()
        return format_srt(srt_cues(records[0]["words"])) if records else ""

    def save(self) -> None:
        if self.records:
            super().save()


OUTPUT_FORMATS: dict[str, type[_Output]] = {".jsonl": JsonlOutput, ".csv": CsvOutput, ".srt": SrtOutput}
"""Output writers by file ending."""


def open_output(
    path: str | os.PathLike, order: Sequence[str] = (), formats: Sequence[str] = tuple(OUTPUT_FORMATS)
) -> _Output:
    """The writer for ``path`` by its ending (one of ``formats``), holding the file's earlier records."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in formats or suffix not in OUTPUT_FORMATS:
        raise UsageError(f"--output {path}: expected a file ending in {', '.join(formats)}")
    if path.is_dir():
        raise UsageError(f"--output {path} is a folder; expected a file ending in {', '.join(formats)}")
    return OUTPUT_FORMATS[suffix](path, order)


# --------------------------------------------------------------------------------------------------------------
# Parser and runner
# --------------------------------------------------------------------------------------------------------------
def build_parser(
    prog: str, description: str, formats: Sequence[str] = (".jsonl", ".csv"), batch_seconds: float = 60.0
) -> argparse.ArgumentParser:
    """The options every command shares; a command adds its own to the parser it gets back.

    Arguments
    ---------
    prog : str
        Program name in the usage text.
    description : str
        Help text.
    formats : sequence of str
        Output endings the command writes (keys of :data:`OUTPUT_FORMATS`).
    batch_seconds : float
        Default of ``--batch-seconds``.

    Returns
    -------
    argparse.ArgumentParser
        With ``model``, ``inputs``, ``--output``, ``--batch-seconds``, ``--device``, ``--precision``,
        ``--overwrite``, ``--data-root``, ``--quiet``.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Exit codes: 0 all inputs done, 1 some inputs failed (listed; the others "
        "are written), 2 usage or set-up error (nothing done).",
    )
    parser.add_argument(
        "model",
        metavar="MODEL_DIR",
        help="pretrained folder (python -m lobes.package); with --backend onnx an .onnx file "
        "(python -m lobes.export_onnx)",
    )
    parser.add_argument(
        "inputs",
        metavar="INPUTS",
        nargs="+",
        help="audio files, folders (searched recursively) or CSV files with a 'wav' column",
    )
    parser.add_argument(
        "--output",
        "-o",
        default=None,
        help=f"results file ({', '.join(formats)}); default: JSON lines on standard output. "
        "A rerun skips the inputs already in it",
    )
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=batch_seconds,
        help=f"padded audio per batch, in seconds (default {batch_seconds:g})",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="default fp32")
    parser.add_argument(
        "--overwrite", action="store_true", help="start the output over, also when it was made with other settings"
    )
    parser.add_argument("--data-root", default=None, help="replaces $data_root in CSV paths")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx"),
        help="torch (default): a pretrained folder; onnx: an exported .onnx file run by onnxruntime (no torch)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="with --backend onnx: onnxruntime threads (default: one per core)"
    )
    parser.set_defaults(formats=tuple(formats))
    return parser


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("speechbrain").setLevel(logging.WARNING)  # its start-up notes are not about the inputs


def _reason(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).replace("\n", " ")


def _process_batch(task: Task, batch: list[AudioInput]) -> list[dict | Exception]:
    """The task's results; a batch that fails as a whole is retried one file at a time."""
    try:
        results = task.process(batch)
        if len(results) != len(batch):
            raise RuntimeError(f"the task returned {len(results)} results for {len(batch)} inputs")
        return results
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
        logger.warning("a batch of %d inputs failed (%s); retrying them one by one", len(batch), _reason(exc))
        return [_process_batch(task, [f])[0] for f in batch]


def run(args: argparse.Namespace, load_task: Callable[[argparse.Namespace], Task]) -> int:
    """Run a command whose arguments come from a :func:`build_parser` parser.

    Arguments
    ---------
    args : argparse.Namespace
        Parsed arguments.
    load_task : callable
        ``load_task(args) -> Task``; raise :class:`lobes.inputs.UsageError` (or a subclass, e.g.
        ``lobes.inference.pretrained.PretrainedError``) for an unusable model.

    Returns
    -------
    int
        ``EXIT_OK``, ``EXIT_FAILED_FILES`` (raises ``UsageError`` for set-up problems: see :func:`run_command`).
    """
    if not args.batch_seconds > 0:
        raise UsageError(f"--batch-seconds must be positive, got {args.batch_seconds}")
    if getattr(args, "backend", "torch") == "torch":  # the onnx backend checks its own options (no torch import)
        resolve_device(args.device, option="--device")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected a positive number")
    files, errors = collect_inputs(args.inputs, data_root=args.data_root)
    if not files and not errors:
        raise UsageError(f"no audio files found in {' '.join(args.inputs)}")
    order = [f.path for f in files]
    output = None
    if args.output is not None:
        output = open_output(args.output, order, args.formats)
        if isinstance(output, SrtOutput) and len(files) + len(errors) != 1:
            raise UsageError(
                f"--output {args.output}: an .srt file holds the subtitles of one recording, got "
                f"{len(files) + len(errors)} inputs; use .jsonl or .csv for several"
            )
    task = load_task(args)
    settings = {"model": fingerprint(args.model), "precision": args.precision, **task.settings()}
    if isinstance(output, SrtOutput):
        settings["input"] = order[0] if order else None
    if output is not None:
        record = Path(f"{output.path}.settings.json")
        if args.overwrite:

            def clear() -> None:  # the file too: a kill before the next save must not leave it under the new record
                output.clear()
                Path(output.path).unlink(missing_ok=True)

            clear()
            check_run_settings(record, settings, overwrite=True, clear=clear)
        else:
            try:
                check_run_settings(record, settings)
            except SettingsMismatch as exc:  # name the output file rather than its folder
                raise SettingsMismatch(
                    str(exc).replace(f"{record.parent} was made", f"{output.path} was made", 1)
                ) from None
    done = output.done() if output is not None else set()
    todo = [f for f in files if f.path not in done]
    if done & set(order):
        logger.info("%d inputs already in %s; %d to do", len(done & set(order)), args.output, len(todo))
    failures = [(path, reason) for path, reason in errors]
    from tqdm import tqdm

    last_save = time.monotonic()
    progress = tqdm(total=len(todo), unit="file", disable=True if args.quiet else None, file=sys.stderr)
    try:
        for batch_ids in length_batches([f.duration for f in todo], args.batch_seconds):
            batch = [todo[i] for i in batch_ids]
            for item, result in zip(batch, _process_batch(task, batch)):
                if isinstance(result, BaseException):
                    failures.append((item.path, _reason(result)))
                elif output is None:
                    sys.stdout.write(json.dumps({"path": item.path, **result}, ensure_ascii=False) + "\n")
                    sys.stdout.flush()
                else:
                    output.add(item.path, result)
            progress.update(len(batch))
            if output is not None and time.monotonic() - last_save > SAVE_EVERY_S:
                output.save()
                last_save = time.monotonic()
    finally:
        progress.close()
        if output is not None:
            output.save()
            _write_errors(output.path, failures)
    for path, reason in failures:
        logger.error("failed: %s: %s", path, reason)
    if failures:
        logger.error(
            "%d of %d inputs failed; the others are %s",
            len(failures),
            len(files) + len(errors),
            f"in {args.output}" if args.output else "written",
        )
        return EXIT_FAILED_FILES
    return EXIT_OK


def _write_errors(output: Path, failures: list[tuple[str, str]]) -> None:
    path = Path(f"{output}.errors.csv")
    if failures:
        write_csv(path, ["path", "reason"], sorted(failures))
    elif path.exists():
        path.unlink()


def run_command(
    parser: argparse.ArgumentParser, load_task: Callable[[argparse.Namespace], Task], argv: Sequence[str] | None = None
) -> int:
    """Parse ``argv`` and :func:`run`; usage and set-up errors are logged and give ``EXIT_USAGE``.

    Returns
    -------
    int
        The exit code (``main`` functions pass it to ``sys.exit``).
    """
    _configure_logging()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        return int(exc.code or 0)
    try:
        return run(args, load_task)
    except UsageError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
