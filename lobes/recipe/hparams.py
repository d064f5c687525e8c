"""Recipe YAML files: a model file extends a base file, paths from the repository root, ``--debug`` settings.

:func:`load_hparams` reads a recipe YAML the way ``train.py`` does. On top of HyperPyYAML it adds three rules:

- **A file can extend another.** A file whose only top-level entry is an ``!include:`` is that file with the
  entry's contents as overrides, the way ``!include:`` passes overrides to the file it includes; the
  overrides are written in the included file's namespace (``!ref <output_neurons>`` means its
  ``output_neurons``) and may add settings. ``recipes/ASR/hparams/hyperconformer.yaml`` is ::

      base: !include:_base.yaml
          model_name: hyperconformer
          preset: !include:../../../hparams/hyperconformer_small.yaml
              vocab_size: !ref <output_neurons>

  so every training setting is written once, in ``_base.yaml``. A mapping override merges into the setting it
  overrides unless it carries another tag (``!name:`` of another function): then it replaces it.
- **Relative paths are taken from the repository root.** A recipe YAML writes its paths as
  ``!ref <root>/data/...``; ``root`` is a ``!PLACEHOLDER`` that the loader fills with the folder holding
  ``recipes/``, so a run finds the same folders from any working directory. Paths given on the command line
  are ordinary paths, relative to the current directory, and are made absolute. A top-level setting named
  like a path (``*_folder``, ``*_csv``, ``*_file``, ``*_path``, ``*_log``, ``*_dir``) that is still relative
  after this is an error, so no run depends on its working directory. ``!include:`` paths stay relative to
  the file that holds them (HyperPyYAML's rule).
- **``--debug`` has its own settings.** The top-level ``debug_overrides`` entry is merged over the file
  (before the command-line overrides) in a debug run and dropped otherwise. A tagged mapping in it applies
  only while the setting it overrides carries the same tag, so swapping ``prepare`` for another function
  also drops its debug arguments.

The result is one flat, fully resolved YAML text with absolute paths and no comments: ``train.py`` saves it
as ``<output_folder>/hyperparams.yaml`` (:func:`save_hyperparams`), and ``load_hyperpyyaml`` loads that copy
back from anywhere into the same objects.

Example
-------
>>> import os, tempfile
>>> folder = os.path.join(tempfile.mkdtemp(), "recipes", "Demo", "hparams")
>>> os.makedirs(folder)
>>> _ = open(os.path.join(folder, "_base.yaml"), "w").write(
...     "root: !PLACEHOLDER\\nmodel_name: !PLACEHOLDER\\nepochs: 3\\n"
...     "output_folder: !ref <root>/results/<model_name>\\n")
>>> _ = open(os.path.join(folder, "small.yaml"), "w").write("base: !include:_base.yaml\\n    model_name: small\\n")
>>> hparams = load_hparams(os.path.join(folder, "small.yaml"), "epochs: 5")
>>> hparams["epochs"], os.path.relpath(hparams["output_folder"], hparams["root"])
(5, 'results/small')
"""

from __future__ import annotations

import datetime
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lobes.io import atomic_write_text

__all__ = ["PATH_SUFFIXES", "RecipeHparams", "load_hparams", "repository_root", "resolve_hparams", "save_hyperparams"]

logger = logging.getLogger(__name__)

PATH_SUFFIXES = ("_folder", "_csv", "_file", "_path", "_log", "_dir")
"""Endings of the top-level settings that hold paths (they must be absolute once loaded)."""

_INCLUDE = "!include:"
_MAX_EXTENDS = 8


def repository_root(path: str | os.PathLike) -> Path:
    """The folder holding the ``recipes/`` folder that ``path`` lies in.

    Raises
    ------
    ValueError
        ``path`` is not inside a folder named ``recipes``.

    Example
    -------
    >>> str(repository_root("/src/lobes/recipes/ASR/hparams/_base.yaml"))
    '/src/lobes'
    """
    path = Path(os.path.abspath(path))
    for parent in path.parents:
        if parent.name == "recipes":
            return parent.parent
    raise ValueError(f"{path} is not inside a recipes/ folder, so its repository root is unknown; pass root=")


def _tag(node: Any) -> str | None:
    tag = getattr(node, "tag", None)
    return getattr(tag, "value", None) if tag is not None else None


def _set_tag(node: Any, value: str) -> None:
    from ruamel.yaml.tag import Tag

    node.yaml_set_ctag(Tag(suffix=value))


def _children(node: Any) -> list:
    if isinstance(node, Mapping):
        return list(node.values())
    if isinstance(node, list):
        return list(node)
    return []


def _prepare_tree(node: Any, folder: Path) -> None:
    """Drop comments (ruamel moves some of them when it writes the tree back, which can change its meaning)
    and make every relative ``!include:`` path absolute, from ``folder``."""
    from ruamel.yaml.comments import Comment, CommentedBase

    if isinstance(node, CommentedBase):
        node._yaml_comment = Comment()
    tag = _tag(node)
    if tag is not None and tag.startswith(_INCLUDE) and not os.path.isabs(tag[len(_INCLUDE) :]):
        _set_tag(node, _INCLUDE + os.path.normpath(folder / tag[len(_INCLUDE) :]))
    for child in _children(node):
        _prepare_tree(child, folder)


def _yaml():
    import ruamel.yaml

    return ruamel.yaml.YAML()  # round trip: keeps the tags


def _read(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        tree = _yaml().load(handle)
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a mapping of settings at the top level, got {type(tree).__name__}")
    _prepare_tree(tree, path.parent)
    return tree


def _extended(tree: Mapping) -> tuple[str, Any] | None:
    """``(included file, overrides)`` when ``tree`` only extends another file, else None."""
    if len(tree) != 1:
        return None
    (node,) = tree.values()
    tag = _tag(node)
    if tag is None or not tag.startswith(_INCLUDE):
        return None
    return tag[len(_INCLUDE) :], node if isinstance(node, Mapping) else {}


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """The settings of ``path``, with the files it extends merged in."""
    path = Path(os.path.abspath(path))
    if path in seen or len(seen) > _MAX_EXTENDS:
        raise ValueError(f"{path} extends itself through {[str(p) for p in seen]}")
    tree = _read(path)
    extended = _extended(tree)
    if extended is None:
        return tree
    base_file, overrides = extended
    base = _read_recipe(Path(base_file), (*seen, path))
    _merge(base, overrides, where=str(path))
    return base


def _merge(target: Any, overrides: Mapping, where: str, must_match: bool = False, debug: bool = False) -> None:
    """Merge ``overrides`` into ``target`` in place (see the module's rules)."""
    for key, value in overrides.items():
        if must_match and key not in target:
            raise KeyError(f"{where}: {key!r} is not a setting of this recipe; its settings: {sorted(target)}")
        current = target.get(key) if key in target else None
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            if _tag(value) is None or _tag(value) == _tag(current):
                _merge(current, value, where=f"{where}[{key}]")
                continue
            if debug:
                logger.info(
                    "--debug: %s[%s] is %s, not %s: its debug overrides are not used",
                    where,
                    key,
                    _tag(current),
                    _tag(value),
                )
                continue
        elif debug and isinstance(value, Mapping) and _tag(value) is not None:
            continue  # a tagged debug override of a setting that is no longer that object
        target[key] = value


def _plain(value: Any) -> Any:
    """Overrides given as Python objects, in types ruamel writes (paths as strings)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping) and type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return [_plain(v) for v in value]
    return value


def _is_path_key(key: Any) -> bool:
    return isinstance(key, str) and (key == "root" or key.endswith(PATH_SUFFIXES))


def _command_line(overrides: str | Mapping | None, folder: Path) -> Mapping:
    if overrides is None or (isinstance(overrides, str) and not overrides.strip()):
        return {}
    if isinstance(overrides, str):
        parsed = _yaml().load(overrides)
        if not isinstance(parsed, Mapping):
            raise ValueError(f"overrides must be a YAML mapping, got {overrides!r}")
        overrides = parsed
    else:
        overrides = {key: _plain(value) for key, value in overrides.items()}
    _prepare_tree(overrides, folder)
    for key, value in overrides.items():  # a path typed on the command line is relative to the current directory
        if _is_path_key(key) and isinstance(value, str) and _tag(value) is None and not os.path.isabs(value):
            overrides[key] = os.path.abspath(value)
    return overrides


def _check_paths(hparams: Mapping, source: Path) -> None:
    relative = {k: v for k, v in hparams.items() if _is_path_key(k) and isinstance(v, str) and not os.path.isabs(v)}
    if relative:
        key, value = next(iter(relative.items()))
        raise ValueError(
            f"{source}: {key}: {value!r} is a relative path, which would depend on the working "
            f"directory; write it as !ref <root>/{value} (from the repository root) or give an absolute "
            f"path (relative settings: {sorted(relative)})"
        )


def resolve_hparams(
    path: str | os.PathLike,
    overrides: str | Mapping | None = None,
    *,
    debug: bool = False,
    root: str | os.PathLike | None = None,
) -> str:
    """The flat, resolved YAML text of a recipe file (see the module's rules); builds no object.

    Arguments
    ---------
    path : str or PathLike
        The recipe YAML (a per-model file or any plain HyperPyYAML file).
    overrides : str or mapping, optional
        Command-line overrides, as speechbrain's ``parse_arguments`` returns them (a YAML string) or a dict.
        They must name existing settings.
    debug : bool
        Merge the file's ``debug_overrides`` (``--debug``).
    root : str or PathLike, optional
        Value of a ``root: !PLACEHOLDER`` setting; default: :func:`repository_root` of ``path``.

    Returns
    -------
    str
        YAML text with every ``!ref``, ``!copy`` and ``!include:`` resolved, no comments, absolute paths.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "r.yaml")
    >>> _ = open(path, "w").write("lr: 0.1  # peak\\ndebug_overrides:\\n    lr: 0.5\\nhalf: !ref <lr> / 2\\n")
    >>> print(resolve_hparams(path, debug=True), end="")
    lr: 0.5
    half: 0.25
    """
    from hyperpyyaml import resolve_references

    path = Path(os.path.abspath(path))
    tree = _read_recipe(path)
    if _tag(tree.get("root")) == "!PLACEHOLDER":
        tree["root"] = os.path.abspath(root) if root is not None else str(repository_root(path))
    debug_overrides = tree.pop("debug_overrides", None) or {}
    if debug:
        if not isinstance(debug_overrides, Mapping):
            raise ValueError(f"{path}: debug_overrides must be a mapping of settings")
        _merge(tree, debug_overrides, where=f"{path} debug_overrides", must_match=True, debug=True)
    _merge(tree, _command_line(overrides, path.parent), where="overrides", must_match=True)

    text = io.StringIO()
    _yaml().dump(tree, text)
    resolved = resolve_references(io.StringIO(text.getvalue())).getvalue()
    # the included files bring their comments back: drop them so that the text loads back unchanged
    tree = _yaml().load(resolved) or {}
    _prepare_tree(tree, path.parent)
    _check_paths(tree, path)
    out = io.StringIO()
    _yaml().dump(tree, out)
    return out.getvalue()


class RecipeHparams(dict):
    """The objects of a recipe YAML (a dict, as ``load_hyperpyyaml`` gives), with the resolved text they were
    built from (``yaml``) and the file it came from (``source``)."""

    yaml: str
    source: Path


def load_hparams(
    path: str | os.PathLike,
    overrides: str | Mapping | None = None,
    *,
    debug: bool = False,
    root: str | os.PathLike | None = None,
) -> RecipeHparams:
    """Load a recipe YAML into its objects, the way ``train.py`` does (see the module's rules).

    Arguments are those of :func:`resolve_hparams`.

    Returns
    -------
    RecipeHparams
        The settings and objects; ``.yaml`` is the resolved text, ready for :func:`save_hyperparams`.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "r.yaml")
    >>> _ = open(path, "w").write("size: 3\\nlayer: !new:torch.nn.Linear [!ref <size>, 2]\\n")
    >>> hparams = load_hparams(path, {"size": 4})
    >>> hparams["layer"].in_features, hparams.yaml.splitlines()[0]
    (4, 'size: 4')
    """
    from hyperpyyaml import load_hyperpyyaml

    text = resolve_hparams(path, overrides, debug=debug, root=root)
    hparams = RecipeHparams(load_hyperpyyaml(text))
    hparams.yaml = text
    hparams.source = Path(os.path.abspath(path))
    return hparams


def save_hyperparams(hparams: RecipeHparams, folder: str | os.PathLike) -> Path | None:
    """Write ``<folder>/hyperparams.yaml`` (atomically, on the main process): the resolved settings of the run,
    which ``load_hyperpyyaml`` loads back into the same objects from any working directory.

    Returns
    -------
    Path or None
        The file written, None on the other processes.

    Example
    -------
    >>> import os, tempfile
    >>> from hyperpyyaml import load_hyperpyyaml
    >>> folder = tempfile.mkdtemp()
    >>> _ = open(os.path.join(folder, "r.yaml"), "w").write("layer: !new:torch.nn.Linear [2, 2]\\n")
    >>> saved = save_hyperparams(load_hparams(os.path.join(folder, "r.yaml")), folder)
    >>> type(load_hyperpyyaml(saved.read_text())["layer"]).__name__
    'Linear'
    """
    from speechbrain.utils.distributed import if_main_process

    if not if_main_process():
        return None
    header = (
        f"# Generated {datetime.date.today()} from {hparams.source}, with its overrides resolved\n# yamllint disable\n"
    )
    return atomic_write_text(Path(folder) / "hyperparams.yaml", header + hparams.yaml)
