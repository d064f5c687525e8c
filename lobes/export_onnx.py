"""Export a model to ONNX: ``python -m lobes.export_onnx MODEL OUT.onnx``.

``MODEL`` is a Microsoft-format BEATs checkpoint (pre-trained: features of ``--layer``; AudioSet fine-tuned:
features and tag probabilities) or a pretrained folder written by ``python -m lobes.package`` (an ASR
folder: CTC log-probabilities and the tokenizer; a classification folder: class probabilities and the pooled
embedding). The graph takes the waveform and the valid sample count of each row (the fbank runs inside),
with dynamic batch and time axes; the file holds everything the runtime needs (labels, tokenizer) and runs
with onnxruntime alone. A streaming ASR folder gives its chunk-step graph instead (``--chunk-ms`` of audio and
the carried state in, the chunk's CTC log-probabilities and the new state out; :mod:`lobes.onnx.streaming`):

    python -m lobes.export_onnx BEATs_iter3_plus_AS2M.pt beats_as2m.onnx
    python -m lobes.export_onnx results/ASR/pretrained asr.onnx --quantize int8
    python -m lobes.transcribe asr.onnx talk.wav --backend onnx
    python -m lobes.export_onnx results/ASR/hyperconformer_streaming/1234/pretrained stream.onnx --chunk-ms 320
    python -m lobes.transcribe stream.onnx talk.wav --streaming --backend onnx

Before the file is written, onnxruntime runs the graph on batches of other lengths than the traced one and
its outputs are compared with torch's; a model that cannot be exported exits with code 2 and says why.

Example
-------
>>> main(["no/such/model.pt", "out.onnx"])
2
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from lobes.inputs import EXIT_OK, EXIT_USAGE

__all__ = ["main"]

logger = logging.getLogger("lobes.export_onnx")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lobes.export_onnx",
        description="Export a BEATs checkpoint or a pretrained folder to a self-contained ONNX file.",
        epilog="Exit codes: 0 written, 2 the model cannot be exported (nothing written).",
    )
    parser.add_argument("model", metavar="MODEL", help="BEATs checkpoint (.pt) or pretrained folder")
    parser.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    parser.add_argument(
        "--layer",
        default=None,
        help="BEATs checkpoints: 'last' (default), 'all' or a layer index (0 = input of the first layer)",
    )
    parser.add_argument(
        "--quantize", default=None, choices=("int8",), help="write the int8 variant (dynamic quantization)"
    )
    parser.add_argument(
        "--label-names", default=None, help="AudioSet class_labels_indices.csv: tag names for a fine-tuned BEATs"
    )
    parser.add_argument(
        "--chunk-ms",
        type=float,
        default=None,
        help="streaming ASR folders: the chunk of the chunk-step graph in ms, a multiple of 40 (default 320)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("lobes").setLevel(logging.INFO)  # the exporters and quantizers log their steps at INFO
    if not args.output.endswith(".onnx"):
        logger.error("%s: expected an output file ending in .onnx", args.output)
        return EXIT_USAGE
    try:
        from lobes.onnx.export import export_model

        path = export_model(args.model, args.output, args.layer, args.quantize, args.label_names, args.chunk_ms)
    except (ValueError, OSError) as exc:  # ExportError, PretrainedError, BEATsCheckpointError, missing files
        logger.error("%s", exc)
        return EXIT_USAGE
    logger.info("wrote %s", path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
