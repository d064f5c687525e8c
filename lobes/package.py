"""Turn a training run into a pretrained folder: ``python -m lobes.package RESULTS_DIR OUT_DIR``.

The kind of run is read from ``RESULTS_DIR/hyperparams.yaml`` (the resolved copy speechbrain saves with
every run): a ``model`` built by ``lobes.asr.ASRModel`` is a speech-recognition run
(:func:`lobes.inference.asr.package_asr_run`); a run with a ``label_encoder`` and a classifier on a
``lobes.beats.BEATs`` encoder is an audio-classification run
(:func:`lobes.inference.classify.package_classification_run`). ``--beats CKPT OUT_DIR`` packages a
Microsoft-format BEATs checkpoint instead (:func:`lobes.inference.classify.package_beats_checkpoint`).

The folder loads with speechbrain's ``from_hparams`` and with ``lobes.inference.Transcriber`` /
``AudioClassifier``; packaging the same run twice gives byte-identical files. Exit codes: 0 done, 2 usage
or set-up error (the message names the missing or wrong piece).

Example
-------
>>> import tempfile, os
>>> run = tempfile.mkdtemp()
>>> _ = open(os.path.join(run, "hyperparams.yaml"), "w").write("model: !new:lobes.asr.ASRModel\\n  vocab_size: 4\\n")
>>> detect_run_kind(run)
'asr'
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from lobes.inputs import EXIT_OK, EXIT_USAGE, UsageError

__all__ = ["RUN_KINDS", "detect_run_kind", "main", "package_run", "read_run_yaml"]

logger = logging.getLogger("lobes.package")

RUN_KINDS = ("asr", "classification")
"""What :func:`detect_run_kind` recognises."""


def read_run_yaml(results_dir: str | os.PathLike):
    """The YAML tree (ruamel round-trip nodes, tags kept, nothing built) of a run's ``hyperparams.yaml``.

    Raises
    ------
    lobes.inputs.UsageError
        No such folder or file, or a file that is not YAML.
    """
    import ruamel.yaml

    results_dir = Path(results_dir)
    path = results_dir / "hyperparams.yaml"
    if not results_dir.is_dir():
        raise UsageError(f"{results_dir}: no such folder; expected the output folder of a training run")
    if not path.is_file():
        raise UsageError(
            f"{results_dir}: no hyperparams.yaml; expected the output folder of a training run (the "
            "recipe saves its resolved hyperparameters there)"
        )
    try:
        tree = ruamel.yaml.YAML().load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # ruamel raises several parser / scanner errors
        raise UsageError(f"{path}: not readable YAML ({type(exc).__name__}: {exc})") from None
    if not isinstance(tree, dict):
        raise UsageError(f"{path}: expected a mapping of hyperparameters")
    return tree


def _tag(node) -> str:
    tag = getattr(node, "tag", None)
    return (getattr(tag, "value", None) or "") if tag is not None else ""


def detect_run_kind(results_dir: str | os.PathLike) -> str:
    """``"asr"`` or ``"classification"`` from a run's ``hyperparams.yaml`` (see the module docstring).

    Raises
    ------
    lobes.inputs.UsageError
        The YAML is neither kind.
    """
    tree = read_run_yaml(results_dir)
    model_tag = _tag(tree.get("model"))
    if model_tag.startswith("!new:") and model_tag[len("!new:") :].split(".")[-1] == "ASRModel":
        return "asr"
    encoder_tag = _tag(tree.get("encoder"))
    if "label_encoder" in tree and "classifier" in tree and encoder_tag.endswith("BEATs"):
        return "classification"
    raise UsageError(
        f"{Path(results_dir) / 'hyperparams.yaml'}: neither an ASR run (expected 'model: "
        "!new:lobes.asr.ASRModel') nor an audio-classification run (expected 'encoder: "
        "!new:lobes.beats.BEATs', 'classifier' and 'label_encoder')"
    )


def package_run(results_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Package a training run of either kind; returns the pretrained folder."""
    kind = detect_run_kind(results_dir)
    if kind == "asr":
        from lobes.inference.asr import package_asr_run

        return package_asr_run(results_dir, out_dir)
    from lobes.inference.classify import package_classification_run

    return package_classification_run(results_dir, out_dir)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lobes.package",
        description="Write a pretrained folder (hyperparams.yaml, weights, tokenizer or labels, README.md) that "
        "speechbrain's from_hparams and lobes.inference load.",
        epilog="Examples: python -m lobes.package results/ASR/hyperconformer/1234 pretrained/asr ; "
        "python -m lobes.package --beats BEATs_iter3.pt pretrained/beats",
    )
    parser.add_argument(
        "source", metavar="RESULTS_DIR", help="output folder of a training run (or, with --beats, a BEATs checkpoint)"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (replaced if it is an earlier package)")
    parser.add_argument(
        "--beats",
        action="store_true",
        help="SOURCE is a Microsoft-format BEATs checkpoint ({'cfg', 'model'}), not a run folder",
    )
    parser.add_argument(
        "--label-names",
        metavar="CSV",
        default=None,
        help="with --beats and an AudioSet fine-tuned checkpoint: AudioSet's class_labels_indices.csv "
        "('mid' and 'display_name' columns), so tags carry display names instead of label ids",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # `--beats CKPT OUT_DIR`: the flag may come first
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.beats:
            from lobes.inference.classify import package_beats_checkpoint

            out = package_beats_checkpoint(args.source, args.out_dir, label_names_csv=args.label_names)
        else:
            if args.label_names is not None:
                raise UsageError("--label-names goes with --beats; a training run's folder has its own labels")
            out = package_run(args.source, args.out_dir)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    logger.info("pretrained folder ready: %s", out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
