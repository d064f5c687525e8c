"""CSV manifests in SpeechBrain's format: read with checks, write atomically.

A manifest is a CSV file with a header row and one row per item; SpeechBrain's
``DynamicItemDataset.from_csv`` reads it (``ID`` is the key, ``duration`` in seconds, ``wav`` a path).
Files are written atomically through :mod:`lobes.io`; :func:`manifest_paths` hands manifests prepared
elsewhere to a recipe (``prepare: !name:lobes.data.manifest.manifest_paths`` in its YAML).

Example
-------
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "train.csv")
>>> write_manifest(path, [{"ID": "a", "duration": 1.5, "wav": "/x/a.wav"}], ["ID", "duration", "wav"])
>>> rows = load_manifest(path, required=("ID", "wav"))
>>> len(rows), rows[0]["wav"]
(1, '/x/a.wav')
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence

from lobes.io import atomic_write_text

__all__ = ["ManifestError", "atomic_write_text", "check_manifest", "load_manifest", "manifest_paths", "write_manifest"]


class ManifestError(ValueError):
    """A manifest file is missing, malformed, or lacks required columns."""


def _format(value: object) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    return str(value)


def write_manifest(path: str, rows: Iterable[Mapping[str, object]], columns: Sequence[str]) -> None:
    """Write ``rows`` as a CSV manifest with the given ``columns`` (atomically, :func:`lobes.io.atomic_write_text`).

    Arguments
    ---------
    path : str
        Destination CSV file; its folder is created if needed.
    rows : iterable of mappings
        One mapping per item, holding at least every name of ``columns``. Floats are written in
        their shortest exact form (``n / 16000`` reads back exactly).
    columns : sequence of str
        Column names, in order.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "m.csv")
    >>> write_manifest(path, [{"ID": "u1", "wav": "/a.wav", "wrd": "HELLO"}], ["ID", "wav", "wrd"])
    >>> open(path).read().splitlines()
    ['ID,wav,wrd', 'u1,/a.wav,HELLO']
    """
    columns = list(columns)
    if len(set(columns)) != len(columns):
        raise ManifestError(f"duplicate column names in {columns} for manifest {path}")
    lines = []
    for index, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ManifestError(f"row {index} of manifest {path} lacks columns {missing}: {dict(row)}")
        lines.append([_format(row[c]) for c in columns])

    class _Buffer(list):
        def write(self, chunk: str) -> None:
            self.append(chunk)

    buffer = _Buffer()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(lines)
    atomic_write_text(path, "".join(buffer))


def check_manifest(path: str, required_columns: Sequence[str] = ("ID", "wav")) -> list[str]:
    """Check that ``path`` is a CSV manifest whose header holds ``required_columns``.

    Arguments
    ---------
    path : str
        The CSV file.
    required_columns : sequence of str
        Column names that must be present (e.g. ``("ID", "duration", "wav", "wrd")``).

    Returns
    -------
    list of str
        The header's column names.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "m.csv")
    >>> write_manifest(path, [{"ID": "u1", "wav": "/a.wav"}], ["ID", "wav"])
    >>> check_manifest(path, ["ID", "wav"])
    ['ID', 'wav']
    """
    if not os.path.isfile(path):
        raise ManifestError(f"manifest not found: {path} (expected a CSV file with columns {list(required_columns)})")
    with open(path, encoding="utf-8", newline="") as handle:
        header_line = handle.readline()
    if not header_line.strip():
        raise ManifestError(f"manifest {path} is empty; expected a header row with columns {list(required_columns)}")
    header = [name.strip() for name in next(csv.reader([header_line]))]
    missing = [c for c in required_columns if c not in header]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks required columns {missing}; it has {header}, expected at least "
            f"{list(required_columns)}"
        )
    return header


def load_manifest(path: str, required: Sequence[str] = ("ID", "wav")) -> list[dict[str, str]]:
    """Read a CSV manifest into a list of dicts, after checking its columns and rows.

    Arguments
    ---------
    path : str
        The CSV file.
    required : sequence of str
        Columns that must be present and non-empty in every row.

    Returns
    -------
    list of dict
        One ``{column: value}`` dict (strings) per row, in file order.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "m.csv")
    >>> write_manifest(path, [{"ID": "u1", "wav": "/a.wav", "label": "dog"}], ["ID", "wav", "label"])
    >>> load_manifest(path, required=("ID", "wav", "label"))
    [{'ID': 'u1', 'wav': '/a.wav', 'label': 'dog'}]
    """
    header = check_manifest(path, required)
    rows = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        for line_number, values in enumerate(reader, start=2):
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise ManifestError(
                    f"manifest {path}, line {line_number}: expected {len(header)} fields ({header}), "
                    f"got {len(values)}"
                )
            row = {name: value.strip() for name, value in zip(header, values)}
            empty = [c for c in required if not row[c]]
            if empty:
                raise ManifestError(f"manifest {path}, line {line_number}: empty value in columns {empty}")
            if "ID" in row:
                if row["ID"] in seen:
                    raise ManifestError(
                        f"manifest {path}, line {line_number}: duplicate ID {row['ID']!r} "
                        f"(first on line {seen[row['ID']]})"
                    )
                seen[row["ID"]] = line_number
            rows.append(row)
    return rows


def manifest_paths(train: str, valid: str, test: str, required: Sequence[str] = ("ID", "wav")) -> dict[str, str]:
    """The train / valid / test manifests of a corpus prepared elsewhere, after checking their columns.

    A recipe's ``prepare`` for data that needs no preparation: the YAML names the files, the recipe gets
    their paths (absolute) once each is known to be a CSV with the ``required`` columns.

    Arguments
    ---------
    train, valid, test : str
        The CSV files.
    required : sequence of str
        Columns every file must have (e.g. ``["ID", "duration", "wav", "wrd"]`` for ASR).

    Returns
    -------
    dict
        ``{"train": path, "valid": path, "test": path}``.

    Example
    -------
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for split in ("train", "valid", "test"):
    ...     write_manifest(os.path.join(folder, split + ".csv"), [{"ID": "u1", "wav": "/a.wav"}], ["ID", "wav"])
    >>> paths = manifest_paths(*(os.path.join(folder, s + ".csv") for s in ("train", "valid", "test")))
    >>> sorted(paths), os.path.basename(paths["valid"])
    (['test', 'train', 'valid'], 'valid.csv')
    """
    paths = {"train": train, "valid": valid, "test": test}
    for split, path in paths.items():
        if not path or not os.path.isfile(path):
            raise ManifestError(f"{split} manifest not found: {path!r} (expected a CSV file with columns "
                                f"{list(required)})")
        check_manifest(path, required)
    return {split: os.path.abspath(path) for split, path in paths.items()}
