"""onnxruntime vs torch eager: BEATs (released size, fbank in the graph) and the small HyperConformer CTC model.

One 10 s clip (batch of one), random weights. For each model: torch eager (the project's public call:
``BEATs.extract_features`` / ``CTCEncoder.log_probs``), the exported fp32 graph and its int8 variant
(dynamic quantization) in onnxruntime, each on 1 and 2 threads, in a fresh process per measurement
(:func:`benchmarks.common.measure`): median latency, throughput (seconds of audio per second), peak resident
memory above the loaded model (the measuring processes are spawned from a parent that never holds a model),
the file size (torch: the checkpoint / state dict; ONNX: the graph with its weights and fbank tables), and the
change of the outputs against torch eager: max abs diff of the features / log-probabilities, and the cosine of
the BEATs features or the share of equal best-path tokens of the ASR model.

    python benchmarks/onnx.py            # full run (on an otherwise idle machine; sets its own thread counts)
    python benchmarks/onnx.py --quick    # smoke test: tiny models, 2 s clip
    python benchmarks/onnx.py --streaming [--quick]  # only the streaming model: per-chunk latency, 1 thread

``--streaming``: the small streaming HyperConformer (``hparams/hyperconformer_streaming_small.yaml``, random
weights) fed the clip in 320 ms chunks, torch (:class:`lobes.streaming.StreamingASR`) against its chunk-step
graph in onnxruntime (:class:`lobes.onnx.streaming.OnnxStreamingASR`), 1 thread: the median time per chunk.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # per measurement the thread count is set explicitly below
# run as a script, this file's folder comes first on the path, where its name would hide the onnx package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks.common import fmt, measure, plot_lines, print_table, ratio, write_json  # noqa: E402

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
ASR_PRESET = ROOT / "hparams" / "hyperconformer_small.yaml"
STREAMING_PRESET = ROOT / "hparams" / "hyperconformer_streaming_small.yaml"
STREAM_CHUNK = 8  # encoder frames of 40 ms: 320 ms
TINY_BEATS = {
    "encoder_layers": 2,
    "encoder_embed_dim": 64,
    "encoder_ffn_embed_dim": 128,
    "encoder_attention_heads": 4,
    "embed_dim": 32,
    "conv_pos": 16,
    "conv_pos_groups": 4,
}
THREADS = (1, 2)
BACKENDS = ("torch", "onnx_fp32", "onnx_int8")


def _clip(seconds: float):
    import numpy as np

    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def _asr_model(quick: bool, preset: Path = ASR_PRESET):
    import torch
    from hyperpyyaml import load_hyperpyyaml

    overrides = {"vocab_size": 40}
    if quick:
        overrides.update(d_model=32, d_ffn=64, nhead=2, num_encoder_layers=1, frontend_channels=[8, 8])
    with open(preset) as f:
        model = load_hyperpyyaml(f, overrides)["model"]
    torch.manual_seed(0)
    with torch.no_grad():  # random weights everywhere (no LayerNorm left at 1 / 0)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# steps (module level: pickled by reference into the measuring process)
# --------------------------------------------------------------------------------------------------
def setup_torch_beats(checkpoint: str, seconds: float):
    import torch

    from lobes.beats import BEATs

    model = BEATs(ckp_path=checkpoint, freeze=True).eval()
    wav = torch.from_numpy(_clip(seconds))[None]

    def step():
        with torch.no_grad():
            model.extract_features(wav)

    return step


def setup_torch_asr(state: str, quick: bool, seconds: float):
    import torch

    from lobes.inference.asr import CTCEncoder

    model = _asr_model(quick)
    model.load_state_dict(torch.load(state, weights_only=True))
    encoder = CTCEncoder(model.eval())
    wav = torch.from_numpy(_clip(seconds))[None]

    def step():
        with torch.no_grad():
            encoder.log_probs(wav, torch.ones(1))

    return step


def _onnx_call(model, wav):
    """One run of an exported model on ``wav`` (an ASR graph normalises with the clip's own statistics)."""
    import numpy as np

    if model.kind != "asr":
        return model.run(wav)
    n = int(model.meta["n_mels"])
    return model.run(
        wav, stats_mean=np.zeros(n, np.float32), stats_var=np.ones(n, np.float32), use_stats=np.zeros(1, np.float32)
    )


def setup_onnx(path: str, seconds: float, threads: int):
    from lobes.onnx.runtime import OnnxModel

    model = OnnxModel(path, threads=threads)
    wav = [_clip(seconds)]
    return lambda: _onnx_call(model, wav)


def setup_torch_stream(state: str, quick: bool, seconds: float):
    import torch

    model = _asr_model(quick, STREAMING_PRESET)
    model.load_state_dict(torch.load(state, weights_only=True))
    pieces = torch.from_numpy(_clip(seconds)).split(STREAM_CHUNK * model.frame_samples)

    def step():
        stream = model.stream(STREAM_CHUNK)
        for piece in pieces:
            stream.accept(piece)
        stream.finish()

    return step


def setup_onnx_stream(path: str, seconds: float, threads: int):
    from lobes.onnx.runtime import OnnxModel
    from lobes.onnx.streaming import OnnxStreamingASR

    model = OnnxModel(path, threads=threads)
    wav = _clip(seconds)
    size = int(model.meta["chunk_samples"])

    def step():
        stream = OnnxStreamingASR(model, tokenizer=False)
        for start in range(0, len(wav), size):
            stream.accept(wav[start : start + size])
        stream.finish()

    return step


def _prepare_streaming(tmp: Path, quick: bool, seconds: float) -> dict:
    """The streaming model's state dict and chunk-step export; the clip's number of encoder chunks and the
    largest difference of the log-probabilities, onnxruntime vs torch streaming."""
    import torch

    from lobes.onnx.export import export_streaming_model
    from lobes.onnx.runtime import OnnxModel
    from lobes.onnx.streaming import stream_log_probs

    model = _asr_model(quick, STREAMING_PRESET)
    torch.save(model.state_dict(), tmp / "stream.pt")
    path = export_streaming_model(model, tmp / "stream.onnx", STREAM_CHUNK)
    onnx_model = OnnxModel(path, threads=1)
    [got], _ = stream_log_probs(onnx_model.session, onnx_model.meta, [_clip(seconds)])
    stream = model.stream(STREAM_CHUNK)
    pieces = torch.from_numpy(_clip(seconds)).split(int(onnx_model.meta["chunk_samples"]))
    ref = torch.cat([stream.accept(p).log_probs for p in pieces] + [stream.finish().log_probs], dim=1)[0].numpy()
    return {
        "torch": str(tmp / "stream.pt"),
        "onnx": str(path),
        "params": sum(p.numel() for p in model.parameters()),
        "chunks": -(-got.shape[0] // STREAM_CHUNK),  # encoder chunks of the clip
        "max_abs_diff": float(abs(got - ref).max()),
    }


def streaming_main(quick: bool, repeats: int) -> int:
    """``--streaming``: per-chunk latency of the streaming model, torch vs onnxruntime, 1 thread."""
    seconds = 2.0 if quick else 10.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            prepared = pool.submit(_prepare_streaming, tmp, quick, seconds).result()
        torch_r = measure(setup_torch_stream, prepared["torch"], quick, seconds, repeats=repeats, warmup=1, threads=1)
        onnx_r = measure(setup_onnx_stream, prepared["onnx"], seconds, 1, repeats=repeats, warmup=1, threads=1)
    rows, results = [], []
    for backend, r in (("torch", torch_r), ("onnx_fp32", onnx_r)):
        if not r.get("ok"):
            logger.error("streaming %s failed: %s", backend, r.get("error"))
            return 1
        per_chunk = r["time_s"] / prepared["chunks"]
        results.append({"backend": backend, "clip_s": r["time_s"], "per_chunk_ms": 1000 * per_chunk})
        rows.append(
            {
                "model": "asr_streaming",
                "thr": 1,
                "backend": backend,
                "ms / 320 ms chunk": fmt(1000 * per_chunk, ".2f"),
                "x torch": fmt(ratio(torch_r["time_s"], r["time_s"]), ".2f"),
                "max diff": fmt(prepared["max_abs_diff"] if backend != "torch" else None, ".2g"),
            }
        )
    table = print_table(rows, list(rows[0]))
    payload = {"seconds": seconds, "repeats": repeats, "params": prepared["params"], "chunks": prepared["chunks"]}
    write_json("onnx_streaming_quick" if quick else "onnx_streaming", {**payload, "results": results, "table": table})
    return 0


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
def _compare(kind: str, reference, files: dict[str, Path], seconds: float) -> dict:
    """Output change of each ONNX file against torch eager on the clip."""
    import numpy as np

    from lobes.onnx.runtime import OnnxModel

    out = {}
    for name, path in files.items():
        model = OnnxModel(path, threads=2)
        if kind == "asr":
            got = _onnx_call(model, [_clip(seconds)])["log_probs"][0]
            agree = float((got.argmax(-1) == reference.argmax(-1)).mean())
            out[name] = {"max_abs_diff": float(np.abs(got - reference).max()), "best_path_agreement": agree}
        else:
            got = model.run([_clip(seconds)])["features"][0]
            cos = float((got * reference).sum() / np.linalg.norm(got) / np.linalg.norm(reference))
            out[name] = {"max_abs_diff": float(np.abs(got - reference).max()), "cosine": cos}
    return out


def _prepare(tmp: Path, quick: bool, seconds: float) -> dict:
    """Build the models, write the torch files and the ONNX exports; reference outputs and file sizes."""
    import torch

    from lobes.beats import BEATs, BEATsConfig
    from lobes.inference.asr import CTCEncoder
    from lobes.onnx.export import export_beats, quantize
    from lobes.onnx.graphs import ASRGraph

    torch.manual_seed(0)
    cfg = BEATsConfig.released(**(TINY_BEATS if quick else {}), dropout=0.0, attention_dropout=0.0)
    beats = BEATs(cfg=cfg).eval()
    checkpoint = beats.save_checkpoint(tmp / "beats.pt")
    export_beats(beats, tmp / "beats_fp32.onnx")
    (tmp / "beats_int8.onnx").write_bytes(quantize((tmp / "beats_fp32.onnx").read_bytes(), "int8"))
    with torch.no_grad():
        beats_ref = beats.extract_features(torch.from_numpy(_clip(seconds))[None])[0][0].numpy()

    asr = _asr_model(quick)
    torch.save(asr.state_dict(), tmp / "asr.pt")
    fp32 = _export_asr(ASRGraph(asr), tmp / "asr_fp32.onnx")
    (tmp / "asr_int8.onnx").write_bytes(quantize(fp32, "int8"))
    with torch.no_grad():
        asr_ref = CTCEncoder(asr).log_probs(torch.from_numpy(_clip(seconds))[None], torch.ones(1))[0][0].numpy()
    params = {"beats": sum(p.numel() for p in beats.parameters()), "asr": sum(p.numel() for p in asr.parameters())}
    return {
        "beats": {"torch": str(checkpoint), "reference": beats_ref, "params": params["beats"]},
        "asr": {"torch": str(tmp / "asr.pt"), "reference": asr_ref, "params": params["asr"]},
    }


def _prepare_and_compare(tmp: Path, quick: bool, seconds: float) -> dict:
    """:func:`_prepare`, then the output change of every ONNX file (without the reference arrays)."""
    prepared = _prepare(tmp, quick, seconds)
    for kind in ("beats", "asr"):
        files = {b: tmp / f"{kind}_{b.split('_')[1]}.onnx" for b in BACKENDS[1:]}
        prepared[kind]["changes"] = _compare(kind, prepared[kind].pop("reference"), files, seconds)
    return prepared


def _export_asr(graph, path: Path) -> bytes:
    """The ASR graph with the metadata the runtime reads (no tokenizer: the benchmark decodes nothing)."""
    import base64
    import io

    import numpy as np
    import torch

    from lobes.onnx.export import export_graph

    n_mels = int(graph.fbank.mel.shape[1])
    buffer = io.BytesIO()
    np.savez(buffer, dft=graph.fbank.dft.numpy(), mel=graph.fbank.mel.numpy())
    metadata = {
        "kind": "asr",
        "sample_rate": 16000,
        "blank_index": 0,
        "frame_samples": 640,
        "hop_length": 160,
        "n_mels": n_mels,
        "tokenizer": "",
        "fbank": {"tables_npz": base64.b64encode(buffer.getvalue()).decode("ascii")},
    }
    extra = lambda b: (torch.zeros(n_mels), torch.ones(n_mels), torch.zeros(1))  # noqa: E731
    inputs = ["waveforms", "lengths", "stats_mean", "stats_var", "use_stats"]
    dynamic = ({0: "batch", 1: "samples"}, {0: "batch"}, None, None, None)
    export_graph(graph, path, inputs, ["log_probs", "frames"], dynamic, metadata, extra)
    return path.read_bytes()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 s clip (smoke test)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--streaming", action="store_true", help="only the streaming model, per chunk, 1 thread")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the exporters' INFO steps are noise here
    if args.streaming:
        return streaming_main(args.quick, args.repeats or (2 if args.quick else 3))
    seconds = 2.0 if args.quick else 10.0
    repeats = args.repeats or (2 if args.quick else 3)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # models, exports and output checks in a child process: the measuring processes are spawned from this
        # one, and Linux carries the parent's peak resident size into a child's ru_maxrss
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            prepared = pool.submit(_prepare_and_compare, tmp, args.quick, seconds).result()
        for kind in ("beats", "asr"):
            files = {b: tmp / f"{kind}_{b.split('_')[1]}.onnx" for b in BACKENDS[1:]}
            changes = prepared[kind]["changes"]
            for threads in THREADS:
                base = None
                for backend in BACKENDS:
                    if backend == "torch":
                        setup = setup_torch_beats if kind == "beats" else setup_torch_asr
                        call = (
                            (prepared[kind]["torch"], seconds)
                            if kind == "beats"
                            else (prepared[kind]["torch"], args.quick, seconds)
                        )
                        r = measure(setup, *call, repeats=repeats, warmup=1, threads=threads)
                        size = Path(prepared[kind]["torch"]).stat().st_size
                    else:
                        r = measure(
                            setup_onnx,
                            str(files[backend]),
                            seconds,
                            threads,
                            repeats=repeats,
                            warmup=1,
                            threads=threads,
                        )
                        size = files[backend].stat().st_size
                    if not r.get("ok"):
                        logger.error("%s %s %d threads failed: %s", kind, backend, threads, r.get("error"))
                        continue
                    base = r["time_s"] if backend == "torch" else base
                    change = changes.get(backend, {})
                    row = {
                        "model": kind,
                        "threads": threads,
                        "backend": backend,
                        "latency_s": r["time_s"],
                        "audio_s_per_s": seconds / r["time_s"],
                        "speedup_vs_torch": ratio(base, r["time_s"]),
                        "peak_rss_mib": r.get("peak_mib"),
                        "file_mib": size / 2**20,
                        **change,
                    }
                    results.setdefault(kind, []).append(row)
                    rows.append(
                        {
                            "model": kind,
                            "thr": threads,
                            "backend": backend,
                            "latency s": fmt(r["time_s"]),
                            "audio s/s": fmt(seconds / r["time_s"]),
                            "x torch": fmt(ratio(base, r["time_s"]), ".2f"),
                            "peak MiB": fmt(r.get("peak_mib"), ".0f"),
                            "file MiB": fmt(size / 2**20, ".1f"),
                            "max diff": fmt(change.get("max_abs_diff"), ".2g"),
                            "agreement": fmt(change.get("best_path_agreement", change.get("cosine")), ".4f"),
                        }
                    )
        table = print_table(rows, list(rows[0]))
        params = {k: prepared[k]["params"] for k in ("beats", "asr")}
    name = "onnx_quick" if args.quick else "onnx"
    write_json(name, {"seconds": seconds, "repeats": repeats, "params": params, "results": results, "table": table})
    series = {
        panel: {
            f"{kind} {backend}": [
                next((r[key] for r in results.get(kind, []) if r["backend"] == backend and r["threads"] == t), None)
                for t in THREADS
            ]
            for kind in ("beats", "asr")
            for backend in BACKENDS
        }
        for panel, key in (("latency", "latency_s"), ("memory", "peak_rss_mib"))
    }
    plot_lines(
        name,
        list(THREADS),
        series,
        "threads",
        ("latency of a 10 s clip (s)", "peak RSS above the model (MiB)"),
        ("latency", "memory"),
        "onnxruntime vs torch eager (random weights)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
