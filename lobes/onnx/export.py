"""Export the project's models to ONNX files that onnxruntime runs without torch.

:func:`export_model` takes what ``python -m lobes.export_onnx`` is given (a Microsoft-format BEATs
checkpoint, or a pretrained folder written by ``python -m lobes.package``) and writes one self-contained
``.onnx`` file: the graph (:mod:`lobes.onnx.graphs`, fbank inside, dynamic batch and time axes) and, in the
model's metadata, everything the runtime needs (what the model is, its sample rate, labels, the
SentencePiece tokenizer of an ASR model). Graphs are traced with torch's dynamo exporter
(``torch.onnx.export(..., dynamo=True)``); the TorchScript exporter silently drops in-place buffer writes,
so it is not used.

Every export is checked before the file is written: onnxruntime runs the new graph on two batches of
other lengths than the one traced (one padded) and its outputs must equal torch eager's
(:data:`CHECK_TOLERANCE`); a graph that does not is an :class:`ExportError`, not a file.

Variant (``--quantize int8``): onnxruntime's dynamic quantization (int8 weights of the matrix products,
activations quantized per call); its cost in accuracy is measured by ``benchmarks/onnx.py``.

Pretrained folders are exported by ``kind`` (``package.json``) through :data:`EXPORTERS`; a new model family
(the streaming HyperConformer, whose graph carries state between chunks) adds its exporter there.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lobes.io import atomic_write_bytes
from lobes.onnx.graphs import ASRGraph, BEATsGraph, ClassifierGraph, ExportError
from lobes.onnx.runtime import FORMAT_VERSION, META_PREFIX

__all__ = [
    "CHECK_TOLERANCE",
    "DEFAULT_CHUNK_MS",
    "EXPORTERS",
    "QUANTIZATIONS",
    "ExportError",
    "export_asr",
    "export_beats",
    "export_classifier",
    "export_graph",
    "export_model",
    "export_streaming_asr",
    "export_streaming_model",
    "quantize",
]

logger = logging.getLogger(__name__)

OPSET = 18
CHECK_TOLERANCE = 1e-3
"""Largest difference between onnxruntime and torch eager an export may show on its check batches (fp32).
Exports show ~1e-5 (BEATs, ASR log-probabilities); the bound only catches a broken graph."""
QUANTIZATIONS = ("int8",)
MAX_SAMPLES = 16000 * 3600 * 4  # upper bound of the time axis given to the exporter (4 h at 16 kHz)


# --------------------------------------------------------------------------------------------------
# tracing, checking, writing
# --------------------------------------------------------------------------------------------------
def _trace(graph: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dynamic: tuple) -> bytes:
    """The ONNX bytes of ``graph`` traced on ``args`` (dynamo exporter), with ``dynamic`` axes per input."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    samples = torch.export.Dim("samples", min=int(args[0].shape[1]) // 8, max=MAX_SAMPLES)
    axes = {"batch": batch, "samples": samples}

    def dims(d):  # a tuple groups the dynamic axes of a ``*args`` parameter (the state of a chunk step)
        if isinstance(d, tuple):
            return tuple(dims(x) for x in d)
        return None if d is None else {i: axes[name] for i, name in d.items()}

    shapes = tuple(dims(d) for d in dynamic)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                graph.eval(),
                args,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                dynamo=True,
                opset_version=OPSET,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; say which model could not be traced
            raise ExportError(
                f"{type(graph).__name__}: torch.onnx.export (dynamo) failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
    model = program.model_proto
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _with_metadata(model_bytes: bytes, metadata: dict[str, Any]) -> bytes:
    import onnx

    model = onnx.load_from_string(model_bytes)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = model.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    model.producer_name = "lobes"
    return model.SerializeToString()


def _session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _check(model_bytes: bytes, graph: nn.Module, batches: list[tuple], inputs: list[str], what: str) -> float:
    """Largest |onnxruntime - torch| over every output of ``batches``; an ``ExportError`` above tolerance."""
    session = _session(model_bytes)
    worst = 0.0
    for args in batches:
        with torch.no_grad():
            expected = graph(*args)
        got = session.run(None, {name: a.numpy() for name, a in zip(inputs, args)})
        for ref, out in zip(expected, got):
            ref = ref.numpy()
            if ref.shape != out.shape:
                raise ExportError(f"{what}: the ONNX graph gives shape {out.shape} where torch gives {ref.shape}")
            if ref.size:
                worst = max(worst, float(np.abs(ref.astype(np.float64) - out.astype(np.float64)).max()))
    if not worst <= CHECK_TOLERANCE:
        raise ExportError(
            f"{what}: onnxruntime differs from torch by {worst:.3g} (> {CHECK_TOLERANCE}); the graph is not written"
        )
    return worst


def _batches(rng: torch.Generator, lengths: list[list[int]], extra: Callable[[int], tuple] | None = None) -> list:
    """Check batches: rows of noise (0.1 rms) zero-padded to the longest, with their sample counts."""
    out = []
    for rows in lengths:
        wav = torch.zeros(len(rows), max(rows))
        for i, n in enumerate(rows):
            wav[i, :n] = torch.randn(n, generator=rng) * 0.1
        out.append((wav, torch.tensor(rows, dtype=torch.int64)) + (extra(len(rows)) if extra else ()))
    return out


def export_graph(
    graph: nn.Module,
    out: str | os.PathLike,
    inputs: list[str],
    outputs: list[str],
    dynamic: tuple,
    metadata: dict[str, Any],
    extra: Callable[[int], tuple] | None = None,
    quantization: str | None = None,
    trace_lengths: tuple[int, ...] = (32000, 24000),
    check_lengths: tuple[tuple[int, ...], ...] = ((3600, 41000, 9000), (16000 * 7 + 123,)),
) -> Path:
    """Trace ``graph`` (inputs ``waveforms``, ``lengths`` and what ``extra(batch)`` adds), check it in
    onnxruntime against torch on batches of other lengths, and write it with ``metadata`` atomically.

    Arguments
    ---------
    graph : nn.Module
        One of :mod:`lobes.onnx.graphs`.
    out : path
        The ``.onnx`` file.
    inputs, outputs : list of str
        Names of the graph's inputs and outputs.
    dynamic : tuple
        Per input, ``{axis: "batch" | "samples"}`` or None (static).
    metadata : dict
        What the runtime reads (``kind`` at least); values are JSON-encoded.
    extra : callable, optional
        ``extra(batch) -> tuple`` of the inputs after ``waveforms`` and ``lengths``.
    quantization : str, optional
        ``"int8"``: write the quantized variant instead.
    trace_lengths, check_lengths
        Rows of the traced batch, and of the check batches (other lengths, one padded).

    Returns
    -------
    Path
        ``out``.
    """
    trace_lengths, check_lengths = list(trace_lengths), [list(rows) for rows in check_lengths]
    rng = torch.Generator().manual_seed(0)
    [trace_args] = _batches(rng, [trace_lengths], extra)
    model_bytes = _trace(graph, trace_args, inputs, outputs, dynamic)
    what = f"{metadata['kind']} export"
    diff = _check(model_bytes, graph, _batches(rng, check_lengths, extra), inputs, what)
    logger.info("%s: onnxruntime equals torch to %.2g on %s", what, diff, check_lengths)
    metadata = {"format_version": FORMAT_VERSION, "precision": "fp32", **metadata}
    model_bytes = _with_metadata(model_bytes, metadata)
    if quantization is not None:
        model_bytes = quantize(model_bytes, quantization)
    return atomic_write_bytes(out, model_bytes)


# --------------------------------------------------------------------------------------------------
# quantized variants
# --------------------------------------------------------------------------------------------------
def quantize(model_bytes: bytes, kind: str) -> bytes:
    """An ``int8`` variant of an exported model (metadata kept): onnxruntime's dynamic quantization of the
    weights of the matrix products (``MatMul`` / ``Gemm``) to int8, activations quantized per call; the fbank
    stays float32.

    float16 is not offered: onnxruntime's float16 converter (``onnxruntime.transformers.float16``) gives NaN
    outputs on these graphs, and its CPU kernels run float16 through float32 anyway.
    """
    import onnx

    if kind not in QUANTIZATIONS:
        raise ExportError(f"quantization {kind!r}: expected one of {', '.join(QUANTIZATIONS)}")
    source = onnx.load_from_string(model_bytes)
    meta = {p.key: p.value for p in source.metadata_props}
    front_end = [n.name for n in source.graph.node if _in_front_end(n)]
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=front_end,  # power spectra span ~1e9: one int8 scale would erase the quiet bins
        )
        model = onnx.load(dst)
    del model.metadata_props[:]
    meta[META_PREFIX + "precision"] = kind
    for key, value in sorted(meta.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def _in_front_end(node) -> bool:
    """Whether a node belongs to the fbank: the dynamo exporter records each node's module path in its
    ``namespace`` metadata (``.../core.fbank: ...`` for BEATs, ``.../fbank: ...`` for ASR)."""
    scope = " ".join(p.value for p in node.metadata_props if p.key == "namespace")
    return ".fbank:" in scope or "/fbank:" in scope


# --------------------------------------------------------------------------------------------------
# the three model families
# --------------------------------------------------------------------------------------------------
def _layer_name(layer: int | str | None) -> str:
    return "last" if layer is None else str(layer)


def export_beats(
    model: nn.Module | str | os.PathLike,
    out: str | os.PathLike,
    layer: int | str | None = None,
    quantization: str | None = None,
    label_names: dict | None = None,
) -> Path:
    """Export a BEATs model (or checkpoint file): waveform in, features (and tag probabilities) out.

    Arguments
    ---------
    model : lobes.beats.BEATs or path
        The model, or a Microsoft-format checkpoint.
    out : path
        The ``.onnx`` file to write (atomically).
    layer : int or str, optional
        ``"last"`` (default), ``"all"`` (every layer, ``(B, L + 1, T, C)``) or a layer index (negative from
        the end; see :func:`lobes.beats.layer_index`).
    quantization : str, optional
        ``"int8"`` for the dynamically quantized variant.
    label_names : dict, optional
        Label id -> display name for the tags of a fine-tuned model.

    Returns
    -------
    Path
        ``out``.
    """
    from lobes.beats import BEATs, layer_index, load_beats, min_num_samples

    source = None
    layer = "last" if layer is None else layer
    if not isinstance(model, BEATs):
        source = str(model)
        model = load_beats(model, output_all_hiddens=layer == "all")
    elif layer == "all" and not model.output_all_hiddens:
        model = _all_hiddens_copy(model)
    try:
        index = layer_index(layer, len(model.encoder.layers))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    graph = BEATsGraph(model, index)
    finetuned = model.predictor is not None
    outputs = ["features", "token_lengths"] + (["probs"] if finetuned else [])
    labels = None
    if finetuned:
        from lobes.beats import label_names as names_of

        labels = names_of(model, label_names)
    need = min_num_samples(model.cfg.input_patch_size)
    metadata = {
        "kind": "beats",
        "sample_rate": 16000,
        "min_samples": need,
        "layer": _layer_name(layer if index is None else index),
        "layers": len(model.encoder.layers),
        "labels": labels,
        "cfg": json.loads(json.dumps(model.cfg.to_dict(), default=str)),
        "source": Path(source).name if source else None,
    }
    return export_graph(
        graph,
        out,
        ["waveforms", "lengths"],
        outputs,
        ({0: "batch", 1: "samples"}, {0: "batch"}),
        metadata,
        quantization=quantization,
        check_lengths=((need + 5 * 160, 41000, 9000), (16000 * 7 + 123,)),
    )


def _all_hiddens_copy(model: nn.Module) -> nn.Module:
    import copy

    model = copy.copy(model)
    model.output_all_hiddens = True
    return model


def export_classifier(folder: str | os.PathLike, out: str | os.PathLike, quantization: str | None = None) -> Path:
    """Export a classification folder (``python -m lobes.package``): waveform in, class probabilities and the
    pooled embedding out (embedding only for a pre-trained BEATs folder)."""
    from lobes.beats import min_num_samples
    from lobes.inference.classify import AudioClassifier
    from lobes.inference.classify_modules import Passthrough

    model = AudioClassifier.from_pretrained(folder, device="cpu")
    for name in ("compute_features", "mean_var_norm"):
        if not isinstance(getattr(model, name), Passthrough):
            raise ExportError(
                f"{folder}: {name} is a {type(getattr(model, name)).__name__}; the export handles folders whose "
                "model reads waveforms (BEATs, compute_features and mean_var_norm are Passthrough)"
            )
    if model.sample_rate != 16000:
        raise ExportError(f"{folder}: sample_rate {model.sample_rate}; BEATs folders run at 16000 Hz")
    graph = ClassifierGraph(model.embedding_model, model.classifier)
    outputs = (["probs"] if model.classifier is not None else []) + ["embeddings"]
    need = min_num_samples(model.embedding_model.encoder.cfg.input_patch_size)
    metadata = {
        "kind": "classification",
        "sample_rate": model.sample_rate,
        "min_samples": need,
        "labels": model.labels,
        "multi_label": model.multi_label,
        "source": Path(folder).name,
    }
    return export_graph(
        graph,
        out,
        ["waveforms", "lengths"],
        outputs,
        ({0: "batch", 1: "samples"}, {0: "batch"}),
        metadata,
        quantization=quantization,
        check_lengths=((need + 5 * 160, 41000, 9000), (16000 * 7 + 123,)),
    )


def export_asr(folder: str | os.PathLike, out: str | os.PathLike, quantization: str | None = None) -> Path:
    """Export an ASR folder (``python -m lobes.package``): waveform and lengths in, CTC log-probabilities out.

    The tokenizer travels in the file's metadata; the CTC decoding stays outside the graph.
    """
    from lobes.inference.asr import Transcriber

    transcriber = Transcriber.from_pretrained(folder, device="cpu")
    encoder = transcriber.encoder
    model = encoder.model
    graph = ASRGraph(model, encoder.blank_index)
    n_mels = int(graph.fbank.mel.shape[1])

    def stats(batch: int) -> tuple:
        return torch.zeros(n_mels), torch.ones(n_mels), torch.zeros(1)

    proto = transcriber.tokenizer.serialized_model_proto()
    metadata = {
        "kind": "asr",
        "sample_rate": encoder.sample_rate,
        "min_samples": 1,
        "blank_index": encoder.blank_index,
        "frame_samples": encoder.frame_samples,
        "hop_length": int(model.hop_length),
        "n_mels": n_mels,
        "tokenizer": base64.b64encode(proto).decode("ascii"),
        "fbank": _fbank_tables(graph),
        "source": Path(folder).name,
    }
    inputs = ["waveforms", "lengths", "stats_mean", "stats_var", "use_stats"]
    return export_graph(
        graph,
        out,
        inputs,
        ["log_probs", "frames"],
        ({0: "batch", 1: "samples"}, {0: "batch"}, None, None, None),
        metadata,
        extra=stats,
        quantization=quantization,
        check_lengths=((16000 * 3 + 77, 12000, 700), (16000 * 5,)),
    )


def _fbank_tables(graph: ASRGraph) -> dict:
    """The ASR fbank's constants (for the runtime's statistics of long recordings, computed outside the graph)."""
    fb = graph.fbank
    buffer = io.BytesIO()
    np.savez(buffer, dft=fb.dft.numpy(), mel=fb.mel.numpy())
    return {
        "n_fft": fb.n_fft,
        "hop": fb.hop,
        "multiplier": fb.multiplier,
        "db_multiplier": fb.db_multiplier,
        "amin": fb.amin,
        "top_db": fb.top_db,
        "log_mel": fb.log_mel,
        "tables_npz": base64.b64encode(buffer.getvalue()).decode("ascii"),
    }


# --------------------------------------------------------------------------------------------------
# the streaming HyperConformer: one chunk step, the state in and out
# --------------------------------------------------------------------------------------------------
DEFAULT_CHUNK_MS = 320.0
"""Chunk of a streaming export when none is given (8 encoder frames of 40 ms)."""


def _stream_check(model_bytes: bytes, graph: nn.Module, model: nn.Module, meta: dict, blank_index: int) -> float:
    """Largest |onnxruntime - torch streaming| over the log-probabilities of a batch of recordings of different
    lengths streamed chunk by chunk (the reference: :class:`lobes.streaming.StreamingASR`, one row at a time)."""
    from lobes.onnx.streaming import stream_log_probs

    S, look = graph.chunk_samples, graph.lookahead
    rng = np.random.default_rng(0)
    lengths = [3 * S + look + 1, S + 17, look, S - look]  # past several chunks, one, within the first call
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    got, _ = stream_log_probs(_session(model_bytes), meta, waves)
    worst = 0.0
    for wav, out in zip(waves, got):
        stream = model.stream(graph.chunk_frames, blank_index=blank_index)
        steps = [stream.accept(piece) for piece in torch.from_numpy(wav).split(S)] + [stream.finish()]
        ref = torch.cat([s.log_probs for s in steps], dim=1)[0].numpy()
        if ref.shape != out.shape:
            raise ExportError(
                f"asr_streaming export: the ONNX graph gives {out.shape[0]} frames for {len(wav)} samples where "
                f"torch streaming gives {ref.shape[0]}"
            )
        worst = max(worst, float(np.abs(ref.astype(np.float64) - out).max()))
    if not worst <= CHECK_TOLERANCE:
        raise ExportError(
            f"asr_streaming export: onnxruntime differs from torch streaming by {worst:.3g} (> {CHECK_TOLERANCE}); "
            "the graph is not written"
        )
    return worst


def export_streaming_model(
    model: nn.Module,
    out: str | os.PathLike,
    chunk_frames: int,
    blank_index: int = 0,
    tokenizer_proto: bytes | None = None,
    quantization: str | None = None,
    source: str | None = None,
) -> Path:
    """Export the chunk step of a streaming :class:`lobes.asr.ASRModel` (:class:`StreamingASRGraph`).

    The graph is checked before the file is written: recordings of several lengths streamed through
    onnxruntime chunk by chunk (a batch, each row ending on its own) must give the log-probabilities of
    :class:`lobes.streaming.StreamingASR` (:data:`CHECK_TOLERANCE`).

    Arguments
    ---------
    model : lobes.asr.ASRModel
        A streaming model with chunk-causal HyperMixing layers.
    out : path
        The ``.onnx`` file to write (atomically).
    chunk_frames : int
        Encoder frames per chunk (fixed in the graph).
    blank_index : int
        The CTC blank.
    tokenizer_proto : bytes, optional
        The serialized SentencePiece model, kept in the metadata.
    quantization : str, optional
        ``"int8"`` for the dynamically quantized variant (written after the fp32 graph passed its check).
    source : str, optional
        Name of what was exported, for the metadata.

    Returns
    -------
    Path
        ``out``.
    """
    from lobes.onnx.streaming import KIND
    from lobes.onnx.streaming_graph import StreamingASRGraph

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    model = model.eval()
    graph = StreamingASRGraph(model, chunk_frames, blank_index)
    spec = graph.state_spec()
    names = [name for name, _, _ in spec]
    inputs = ["chunk", "lengths", *names]
    outputs = ["log_probs", "frames", *(f"new_{name}" for name in names)]
    rate = int(model.sample_rate)
    meta = {
        "kind": KIND,
        "sample_rate": rate,
        "min_samples": 1,
        "blank_index": blank_index,
        "vocab_size": int(model.ctc_lin.out_features),
        "frame_samples": graph.frame_samples,
        "chunk_frames": graph.chunk_frames,
        "chunk_samples": graph.chunk_samples,
        "chunk_ms": 1000.0 * graph.chunk_samples / rate,
        "lookahead": graph.lookahead,
        "inputs": inputs,
        "outputs": outputs,
        "state": [
            {"name": name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
            for name, shape, dtype in spec
        ],
        "tokenizer": base64.b64encode(tokenizer_proto).decode("ascii") if tokenizer_proto is not None else None,
        "source": source,
    }
    args = (torch.zeros(2, graph.chunk_samples), torch.full((2,), graph.lookahead), *graph.initial_state(2))
    batch = {0: "batch"}
    model_bytes = _trace(graph, args, inputs, outputs, (batch, batch, tuple(batch for _ in names)))
    diff = _stream_check(model_bytes, graph, model, meta, blank_index)
    logger.info("asr_streaming export: onnxruntime equals torch streaming to %.2g", diff)
    meta = {"format_version": FORMAT_VERSION, "precision": "fp32", **meta}
    model_bytes = _with_metadata(model_bytes, meta)
    if quantization is not None:
        model_bytes = quantize(model_bytes, quantization)
    return atomic_write_bytes(out, model_bytes)


def export_streaming_asr(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    quantization: str | None = None,
    chunk_ms: float | None = None,
) -> Path:
    """Export a streaming ASR folder (``python -m lobes.package`` of a streaming recipe run) as a chunk-step
    graph: ``chunk_ms`` of audio (default :data:`DEFAULT_CHUNK_MS`) and the state in, the chunk's CTC
    log-probabilities and the new state out (see :mod:`lobes.onnx.streaming_graph`)."""
    from lobes.chunking import ms_to_frames
    from lobes.inference.asr import Transcriber
    from lobes.onnx.streaming_graph import streaming_export_problems

    transcriber = Transcriber.from_pretrained(folder, device="cpu")
    encoder = transcriber.encoder
    model = encoder.model
    problems = streaming_export_problems(model)
    if problems:
        raise ExportError(
            f"{folder} is not a streaming model, so it has no chunk-step graph ({'; '.join(problems)}); export it "
            "without --chunk-ms for the whole-utterance graph"
        )
    chunk_ms = DEFAULT_CHUNK_MS if chunk_ms is None else float(chunk_ms)
    frame_ms = 1000.0 * model.frame_samples / model.sample_rate
    try:
        chunk = ms_to_frames(chunk_ms, frame_ms)
    except ValueError as exc:
        raise ExportError(f"--chunk-ms {chunk_ms:g}: {exc}") from None
    proto = transcriber.tokenizer.serialized_model_proto()
    return export_streaming_model(
        model, out, chunk, encoder.blank_index, proto, quantization=quantization, source=Path(folder).name
    )


def _is_streaming_folder(folder: Path) -> bool:
    """Whether an ASR folder's model streams (its hyperparams build a streamable model)."""
    from lobes.inference.asr import Transcriber
    from lobes.onnx.streaming_graph import streaming_export_problems

    return not streaming_export_problems(Transcriber.from_pretrained(folder, device="cpu").encoder.model)


EXPORTERS: dict[str, Callable[..., Path]] = {"asr": export_asr, "classification": export_classifier}
EXPORTERS["asr_streaming"] = export_streaming_asr
"""Exporter of each pretrained-folder ``kind`` (``package.json``): ``exporter(folder, out, quantization=None)``.
``asr_streaming`` is the chunk-step graph of a streaming ASR folder (``kind`` ``asr`` whose model streams;
``exporter(folder, out, quantization=None, chunk_ms=None)``), chosen by :func:`export_model`."""


def export_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    layer: int | str | None = None,
    quantization: str | None = None,
    label_names: str | os.PathLike | None = None,
    chunk_ms: float | None = None,
) -> Path:
    """Export what ``python -m lobes.export_onnx`` is given: a BEATs checkpoint file or a pretrained folder.

    A streaming ASR folder is exported as its chunk-step graph (chunks of ``chunk_ms``, default
    :data:`DEFAULT_CHUNK_MS`); ``chunk_ms`` for any other source is an error.

    Raises
    ------
    ExportError
        A source that is neither, a folder kind without exporter, an option that does not apply, or a graph
        that cannot be traced or does not reproduce torch's outputs.
    """
    from lobes.inference.pretrained import read_manifest

    source = Path(source)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if source.is_file():
        if chunk_ms is not None:
            raise ExportError(f"--chunk-ms {chunk_ms:g}: only for a streaming ASR folder, not a BEATs checkpoint")
        names = None
        if label_names is not None:
            from lobes.beats import read_audioset_names

            names = read_audioset_names(label_names)
        return export_beats(source, out, layer, quantization, names)
    if not source.is_dir():
        raise ExportError(f"{source}: no such file or folder; expected a BEATs checkpoint or a pretrained folder")
    manifest = read_manifest(source)
    kind = manifest.get("kind")
    if kind not in EXPORTERS or kind == "asr_streaming":
        folder_kinds = sorted(k for k in EXPORTERS if k != "asr_streaming")
        raise ExportError(
            f"{source} holds a {kind!r} model; ONNX export exists for {', '.join(folder_kinds)} folders "
            "and BEATs checkpoints"
        )
    if layer not in (None, "last"):
        raise ExportError(f"--layer {layer}: only for a BEATs checkpoint; a {kind} folder has one output layer")
    if kind == "asr" and (chunk_ms is not None or _is_streaming_folder(source)):
        return EXPORTERS["asr_streaming"](source, out, quantization=quantization, chunk_ms=chunk_ms)
    if chunk_ms is not None:
        raise ExportError(f"--chunk-ms {chunk_ms:g}: only for a streaming ASR folder, not a {kind} folder")
    return EXPORTERS[kind](source, out, quantization=quantization)
