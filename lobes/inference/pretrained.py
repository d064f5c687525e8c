"""Pretrained folders: writing one atomically and reproducibly, reading and loading one with checks.

A pretrained folder holds ``hyperparams.yaml`` in speechbrain's inference layout (a ``pretrainer`` whose
loadables are ``<name>.ckpt`` beside it), the weights, a ``README.md`` and ``package.json`` (what the folder
is, the checksum of every file, facts for the loaders).

:class:`PretrainedWriter` stages every file of a folder, writes them with :mod:`lobes.io`'s atomic writers
and moves the folder into place; the same inputs always give byte-identical files (state dicts saved in a
fixed order, no timestamps). :func:`load_pretrained` reads a folder's ``hyperparams.yaml``, checks that
every loadable of its ``pretrainer`` has its ``<name>.ckpt`` file and that the files are the ones packaged
(``package.json`` checksums), and loads them (modules strictly: every key, every shape).

Example
-------
>>> import tempfile, os
>>> out = os.path.join(tempfile.mkdtemp(), "pretrained")
>>> writer = PretrainedWriter(out, kind="demo")
>>> yaml = "lin: !new:torch.nn.Linear [2, 3]\\npretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer\\n"
>>> writer.add_text(HPARAMS_FILE, yaml + "    loadables: {lin: !ref <lin>}\\n")
>>> writer.add_state_dict("lin.ckpt", torch.nn.Linear(2, 3).state_dict())
>>> hparams, manifest = load_pretrained(writer.commit(), kind="demo")
>>> manifest["kind"], sorted(manifest["files"]), hparams["lin"].training
('demo', ['hyperparams.yaml', 'lin.ckpt'], False)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lobes.checkpoints import state_dict_mismatches
from lobes.inputs import UsageError, fingerprint
from lobes.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "HPARAMS_FILE",
    "MANIFEST_FILE",
    "PretrainedError",
    "PretrainedWriter",
    "check_no_absolute_paths",
    "load_pretrained",
    "load_state_strict",
    "read_manifest",
    "read_state_dict",
    "state_dict_bytes",
    "yaml_text",
]

logger = logging.getLogger(__name__)

HPARAMS_FILE = "hyperparams.yaml"
"""The folder's HyperPyYAML file, as speechbrain's ``from_hparams`` reads it."""
MANIFEST_FILE = "package.json"
"""What the folder is (``kind``), the checksum of every file, and facts for the loaders."""
FORMAT = "lobes-pretrained"
FORMAT_VERSION = 1


class PretrainedError(UsageError):
    """A pretrained folder that cannot be used (missing file, mismatched weights, ...), found before any work."""


# --------------------------------------------------------------------------------------------------------------
# Writing a pretrained folder
# --------------------------------------------------------------------------------------------------------------
def state_dict_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """``torch.save`` bytes of a state dict that are the same every time for the same values.

    Tensors are detached, moved to the CPU and made contiguous copies (so no view saves a larger storage),
    in the given key order.

    Example
    -------
    >>> sd = {"w": torch.arange(6.0).view(2, 3)[:, :2]}
    >>> state_dict_bytes(sd) == state_dict_bytes({"w": sd["w"].clone()})
    True
    """
    clean = {}
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, expected a tensor")
        clean[key] = value.detach().to("cpu", copy=True).contiguous()
    buffer = io.BytesIO()
    torch.save(clean, buffer)
    return buffer.getvalue()


def check_no_absolute_paths(
    text: str, what: str, forbidden: Sequence[str | os.PathLike] = (), allowed: Sequence[str] = ()
) -> None:
    """Refuse a text file that names an absolute path (or one of the ``forbidden`` folders).

    A pretrained folder is copied to other machines; a path of the training machine in it is either
    useless or a leak. Absolute paths are found as YAML / JSON string values that start with ``/`` (or a
    drive letter) and contain another separator. ``allowed`` strings are known not to be paths although
    they look like ones (AudioSet label ids such as ``/m/09x0r``).

    Example
    -------
    >>> check_no_absolute_paths("a: 3\\nb: relative/file.txt\\nsee https://example.org/a/b\\n", "hyperparams.yaml")
    >>> check_no_absolute_paths("csv_file: /home/me/noise.csv\\n", "hyperparams.yaml")
    Traceback (most recent call last):
    ...
    ValueError: hyperparams.yaml names an absolute path of this machine ('/home/me/noise.csv'); ...
    >>> check_no_absolute_paths("classes: `/m/09x0r`, `/m/05zppz`\\n", "README.md", allowed=["/m/09x0r", "/m/05zppz"])
    """
    import re

    for name in allowed:
        text = text.replace(name, " ")

    for folder in forbidden:
        folder = os.path.abspath(os.fspath(folder))
        if len(folder) > 1 and folder in text:
            raise ValueError(f"{what} names {folder!r} of this machine; a pretrained folder must not")
    found = re.search(
        r"""(?:^|(?<=[\s'"`=\[,(]))((?:/|[A-Za-z]:\\)[^\s/\\'",\]\)]+[/\\][^\s'",\]\)]*)""", text, re.MULTILINE
    )  # /a/b or C:\a\b; not the // of a URL
    if found:
        raise ValueError(
            f"{what} names an absolute path of this machine ({found.group(1)!r}); a pretrained folder must not"
        )


class PretrainedWriter:
    """Collects the files of a pretrained folder and writes them all at once.

    Files are written (atomically, with :mod:`lobes.io`) into a staging folder beside ``out_dir``, then
    ``package.json`` (kind, checksums, ``info``), then the staging folder takes the place of ``out_dir``.
    An existing ``out_dir`` is replaced only if it is an earlier pretrained folder (it has a
    ``package.json`` of this format) or empty; anything else is refused, so no user data is deleted.
    The same files give byte-identical folders: contents are bytes the caller made deterministic
    (:func:`state_dict_bytes`), names are written sorted, and ``package.json`` holds no time or path.

    Arguments
    ---------
    out_dir : str or PathLike
        The folder to create or replace.
    kind : str
        What the folder holds (``"asr"``, ``"classification"``, ...), recorded in ``package.json``.

    Example
    -------
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "pretrained")
    >>> w = PretrainedWriter(out, kind="demo")
    >>> w.add_text("README.md", "# demo\\n")
    >>> w.add_state_dict("model.ckpt", {"w": torch.zeros(2)})
    >>> sorted(os.listdir(w.commit(info={"sample_rate": 16000})))
    ['README.md', 'model.ckpt', 'package.json']
    >>> read_manifest(out)["kind"]
    'demo'
    """

    def __init__(self, out_dir: str | os.PathLike, kind: str):
        self.out_dir = Path(out_dir)
        self.kind = kind
        self._files: dict[str, bytes] = {}
        if self.out_dir.exists():
            self._check_replaceable()

    def _check_replaceable(self) -> None:
        if not self.out_dir.is_dir():
            raise PretrainedError(f"{self.out_dir} exists and is not a folder; choose another output folder")
        if any(self.out_dir.iterdir()) and not _is_package(self.out_dir):
            raise PretrainedError(
                f"{self.out_dir} is a non-empty folder that is not a pretrained folder; choose a new "
                "or empty output folder (it would be replaced)"
            )

    def _add(self, name: str, data: bytes) -> None:
        if name in self._files:
            raise ValueError(f"{name} was added twice")
        if name == MANIFEST_FILE or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(
                f"unusable file name {name!r} in a pretrained folder: expected a plain file name "
                f"other than {MANIFEST_FILE}"
            )
        self._files[name] = data

    def add_bytes(self, name: str, data: bytes) -> None:
        """Add a file with the given contents."""
        self._add(name, bytes(data))

    def add_text(
        self,
        name: str,
        text: str,
        check_paths: bool = True,
        forbidden: Sequence[str | os.PathLike] = (),
        allowed: Sequence[str] = (),
    ) -> None:
        """Add a UTF-8 text file; with ``check_paths``, refuse absolute paths in it (see
        :func:`check_no_absolute_paths`)."""
        if check_paths:
            check_no_absolute_paths(text, name, forbidden, allowed)
        self._add(name, text.encode("utf-8"))

    def add_state_dict(self, name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Add a state dict (weights only: no optimizer or scheduler state) saved by :func:`state_dict_bytes`."""
        self._add(name, state_dict_bytes(state_dict))

    def add_file(self, name: str, source: str | os.PathLike) -> None:
        """Add a copy of an existing file."""
        self._add(name, Path(source).read_bytes())

    def commit(self, info: Mapping[str, Any] | None = None) -> Path:
        """Write every file and put the folder in place; ``info`` (JSON values) goes into ``package.json``.

        Returns
        -------
        Path
            ``out_dir``.
        """
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "files": {name: hashlib.sha256(self._files[name]).hexdigest() for name in sorted(self._files)},
            "info": json.loads(json.dumps(dict(info or {}))),
        }
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        check_no_absolute_paths(text, MANIFEST_FILE)
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        stage = parent / f".{self.out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.staging"
        old = parent / f".{self.out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.old"
        stage.mkdir()
        try:
            for name in sorted(self._files):
                atomic_write_bytes(stage / name, self._files[name])
            atomic_write_text(stage / MANIFEST_FILE, text)
            if self.out_dir.exists():
                self._check_replaceable()
                self.out_dir.rename(old)  # a folder cannot be replaced in one step: move the old one aside first
            stage.rename(self.out_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if old.exists() and not self.out_dir.exists():
                old.rename(self.out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
        logger.info("wrote %s (%d files)", self.out_dir, len(self._files) + 1)
        return self.out_dir


def _is_package(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------------------
# Reading a pretrained folder
# --------------------------------------------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> dict:
    """The ``package.json`` of a pretrained folder (``kind``, ``files`` checksums, ``info``).

    Raises
    ------
    PretrainedError
        No such folder, or no readable ``package.json`` of this format.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainedError(
            f"{folder}: no such folder; expected a pretrained folder made by "
            "`python -m lobes.package RESULTS_DIR OUT_DIR`"
        )
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PretrainedError(
            f"{folder}: no {MANIFEST_FILE}; expected a pretrained folder made by "
            "`python -m lobes.package RESULTS_DIR OUT_DIR`"
        ) from None
    except (OSError, ValueError) as exc:
        raise PretrainedError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PretrainedError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise PretrainedError(
            f"{path}: format version {manifest['version']} is newer than this lobes reads "
            f"({FORMAT_VERSION}); upgrade lobes"
        )
    return manifest


def _verify_files(folder: Path, manifest: dict) -> None:
    for name, digest in sorted(manifest.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            raise PretrainedError(f"{folder}: {name} is missing (listed in {MANIFEST_FILE})")
        if fingerprint(path) != digest:
            raise PretrainedError(
                f"{folder}: {name} is not the file that was packaged (checksum differs); the "
                "folder mixes files of different models. Package the run again"
            )


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The state dict saved in ``path`` (weights only, on the CPU); errors name the file and ``what`` it is for.

    Example
    -------
    >>> read_state_dict("no/such/model.ckpt", "the model")
    Traceback (most recent call last):
    ...
    lobes.inference.pretrained.PretrainedError: no/such/model.ckpt: missing (the weights of the model)
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{path}: missing (the weights of {what})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise PretrainedError(f"{path}: cannot read the weights of {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, Mapping):
        raise PretrainedError(f"{path}: expected a state dict (name -> tensor) for {what}, got {type(state).__name__}")
    return dict(state)


def load_state_strict(module: torch.nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load the state dict file ``path`` into ``module`` (the folder's loadable ``name``): every key, every shape.

    Raises
    ------
    PretrainedError
        A missing or unreadable file, or weights that do not fit (the message lists the keys and shapes).
    """
    state = read_state_dict(path, repr(name))
    problems = state_dict_mismatches(module.state_dict(), state)
    if problems:
        raise PretrainedError(f"{path} does not fit the {name!r} that {HPARAMS_FILE} builds: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def load_pretrained(
    folder: str | os.PathLike, kind: str | None = None, overrides: Mapping | None = None, verify: bool = True
) -> tuple[dict, dict]:
    """Build a pretrained folder's ``hyperparams.yaml`` and load every loadable of its ``pretrainer``.

    Arguments
    ---------
    folder : str or PathLike
        The pretrained folder.
    kind : str, optional
        Expected ``kind`` of ``package.json`` (e.g. ``"asr"``); another kind is an error.
    overrides : mapping, optional
        HyperPyYAML overrides.
    verify : bool
        Compare every file with the checksums of ``package.json``.

    Returns
    -------
    hparams : dict
        The built objects, loadables loaded (modules in eval mode, on the CPU).
    manifest : dict
        ``package.json``.

    Raises
    ------
    PretrainedError
        A missing ``hyperparams.yaml``, ``pretrainer`` or ``<name>.ckpt`` (the message names it), a file that
        differs from the packaged one, or weights that do not fit the model the YAML builds.
    """
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.utils.checkpoints import DEFAULT_LOAD_HOOKS, DEFAULT_TRANSFER_HOOKS, get_default_hook

    folder = Path(folder)
    manifest = read_manifest(folder)
    if kind is not None and manifest.get("kind") != kind:
        raise PretrainedError(f"{folder} holds a {manifest.get('kind')!r} model, expected {kind!r}")
    hparams_path = folder / HPARAMS_FILE
    if not hparams_path.is_file():
        raise PretrainedError(f"{folder}: no {HPARAMS_FILE}")
    if verify:
        _verify_files(folder, manifest)
    with open(hparams_path, encoding="utf-8") as f:
        try:
            hparams = load_hyperpyyaml(f, dict(overrides or {}))
        except Exception as exc:
            raise PretrainedError(f"{hparams_path}: cannot build it ({type(exc).__name__}: {exc})") from None
    pretrainer = hparams.get("pretrainer")
    loadables = getattr(pretrainer, "loadables", None)
    if not loadables:
        raise PretrainedError(f"{hparams_path}: expected a 'pretrainer' (speechbrain Pretrainer) with loadables")
    missing = [name for name in loadables if not (folder / f"{name}.ckpt").is_file()]
    if missing:
        raise PretrainedError(
            f"{folder}: no weights for {', '.join(missing)}: expected "
            f"{', '.join(f'{n}.ckpt' for n in missing)} beside {HPARAMS_FILE}"
        )
    for name, obj in loadables.items():
        path = folder / f"{name}.ckpt"
        if isinstance(obj, torch.nn.Module):
            load_state_strict(obj, path, name)
            obj.eval()
            continue
        hook = get_default_hook(obj, DEFAULT_TRANSFER_HOOKS)
        try:
            if hook is not None:
                hook(obj, path)
            else:
                hook = get_default_hook(obj, DEFAULT_LOAD_HOOKS)
                if hook is None:
                    raise PretrainedError(f"{hparams_path}: no speechbrain loader for {name!r} ({type(obj).__name__})")
                hook(obj, path, False)
        except PretrainedError:
            raise
        except Exception as exc:
            raise PretrainedError(f"{path}: cannot load {name!r} ({type(exc).__name__}: {exc})") from None
    return hparams, manifest


# --------------------------------------------------------------------------------------------------------------
# YAML text
# --------------------------------------------------------------------------------------------------------------
def _strip_yaml_extras(node: Any) -> None:
    """Remove comments and anchor names from a ruamel node tree (in place)."""
    comments = getattr(node, "ca", None)
    if comments is not None:
        comments.items.clear()
        comments.comment = None
        if hasattr(comments, "end"):
            comments.end = []
    anchor = getattr(node, "anchor", None)
    if anchor is not None and getattr(anchor, "value", None) is not None:
        anchor.value = None
    if isinstance(node, dict):
        for value in node.values():
            _strip_yaml_extras(value)
    elif isinstance(node, list):
        for value in node:
            _strip_yaml_extras(value)


def yaml_text(entries: Mapping[str, Any], header: str = "") -> str:
    """HyperPyYAML text of top-level ``entries``: plain values or nodes of a YAML tree read with ruamel
    (for instance the ``model`` of a run's ``hyperparams.yaml``), tags kept, comments dropped.

    The nodes are copied, so the tree they come from is unchanged. Values shared inside the entries become
    YAML anchors and aliases, named in order of appearance (the same entries give the same text).

    Arguments
    ---------
    entries : mapping
        Key -> value (ruamel node, or a plain ``int`` / ``float`` / ``str`` / ``bool`` / ``None`` / list / dict).
    header : str
        Comment lines (without ``#``) put on top.

    Example
    -------
    >>> import ruamel.yaml
    >>> text = "lin: !new:torch.nn.Linear  # a layer\\n    in_features: 2\\n    out_features: 3\\n"
    >>> tree = ruamel.yaml.YAML().load(text)
    >>> print(yaml_text({"sample_rate": 16000, "model": tree["lin"]}, header="demo"), end="")
    # demo
    <BLANKLINE>
    sample_rate: 16000
    model: !new:torch.nn.Linear
        in_features: 2
        out_features: 3
    """
    import copy

    import ruamel.yaml

    document = ruamel.yaml.comments.CommentedMap()
    for key, value in entries.items():
        value = copy.deepcopy(value)
        _strip_yaml_extras(value)
        document[key] = value
    yaml = ruamel.yaml.YAML()
    yaml.indent(mapping=4, sequence=4, offset=2)
    yaml.width = 4096
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    top = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + "\n" if header else ""
    return top + buffer.getvalue()
