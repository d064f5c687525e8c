"""Streaming HyperConformer: causal mixers, live encoding chunk by chunk, incremental attention decoding.

Three sections, one run, one JSON (benchmarks/out/streaming.json) and one PNG (streaming.png):

``causal``: forward + backward of causal HyperMixing against causal SDPA attention at L = 1k, 4k, 16k. The
times and memories of both come from ``benchmarks/causal_hypermixing.py`` (its last run,
benchmarks/out/causal_hypermixing.json; ``--remeasure-causal`` reruns it first); this run adds the memory
floor of any token mixer there: a per-frame ``nn.Linear(d, d)`` forward + backward, whose live tensors are
just the input, the output and their gradients (all (L, d) float32), measured the same way
(``benchmarks.common.measure``, peak live tensor memory).

``stream``: the streaming HyperConformer preset (hparams/hyperconformer_streaming_small.yaml, random
weights) fed one chunk of audio at a time, 1 thread, for chunks of 160, 320 and 640 ms, over 1000 chunks:
compute time of the 1st, 100th and 1000th chunk (median of the 5 chunks ending there), the bytes of
everything the stream holds between chunks (encoder state, front-end and fbank buffers) and the process's
resident memory at those chunks, the real-time factor (compute / audio), and the latency: the audio a chunk
needs beyond its own (the front-end's look-ahead, found by feeding 40 samples at a time) plus its compute.
The streaming Conformer preset (attention limited to 16 chunks of left context) runs beside it.

``decoder``: time per generated token of the 8M preset's attention decoder (4 layers, d = 144, 5000 tokens,
250 encoder frames) at output lengths 50, 500 and 5000: incremental steps with causal HyperMixing
self-attention (a constant state), incremental steps with multi-head self-attention (a key / value cache),
and the full decoder rerun over the prefix (what speechbrain's ``S2STransformerBeamSearcher`` does per token).

    python benchmarks/streaming.py
    python benchmarks/streaming.py --chunks 200 --decoder-lengths 50 500   # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import OUT_DIR, _rss_mib, fmt, measure, print_table, ratio, write_json  # noqa: E402

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CHUNK_MS = (160, 320, 640)
CHECKPOINTS = (1, 100, 1000)


# -------------------------------------------------------------------------------------------- causal
def linear_floor_setup(length: int):
    """Forward + backward of a per-frame Linear(d, d): the live tensors any token mixer's step has at least."""
    import torch

    from benchmarks.causal_hypermixing import BATCH, D_MODEL
    from benchmarks.common import forward_backward_step

    torch.manual_seed(0)
    module = torch.nn.Linear(D_MODEL, D_MODEL)
    x = torch.randn(BATCH, length, D_MODEL, requires_grad=True)
    return forward_backward_step(module, module, x)


def run_causal(args) -> dict:
    from benchmarks import causal_hypermixing as causal

    path = OUT_DIR / "causal_hypermixing.json"
    if args.remeasure_causal or not path.exists():
        causal.main(["speed", "--threads", "2"])
    stored = json.loads(path.read_text())
    lengths = stored["config"]["lengths"]
    results = stored["results"]
    floor = {}
    for length in lengths:
        res = measure(linear_floor_setup, length, repeats=2, warmup=1, threads=2)
        floor[str(length)] = res
        logger.info("linear floor L=%d: %s", length, res.get("alloc_peak_mib"))
    io_mib = {str(L): 4 * stored["config"]["batch"] * L * stored["config"]["d_model"] * 4 / 2**20 for L in lengths}
    ref = causal.REFERENCE
    rows = []
    for length in lengths:
        key = str(length)
        r = results[ref][key]
        row = {
            "L": length,
            f"{ref} MiB": fmt(r.get("alloc_peak_mib"), ".1f"),
            "floor MiB": fmt(floor[key].get("alloc_peak_mib"), ".1f"),
        }
        row["4 (L,d) tensors MiB"] = fmt(io_mib[key], ".1f")
        for name in [n for n in results if n != ref]:
            ours = results[name][key]
            row[f"{name} speedup"] = fmt(ratio(r.get("time_s"), ours.get("time_s")), ".2f")
            row[f"{name} memory"] = fmt(ratio(ours.get("alloc_peak_mib"), r.get("alloc_peak_mib")), ".2f")
        row["floor / sdpa"] = fmt(ratio(floor[key].get("alloc_peak_mib"), r.get("alloc_peak_mib")), ".2f")
        rows.append(row)
    print("\nCausal mixers, forward + backward (from benchmarks/out/causal_hypermixing.json) and this run's floor")
    table = print_table(rows, list(rows[0]))
    return {
        "source": str(path.relative_to(ROOT)),
        "causal_hypermixing": stored,
        "linear_floor": floor,
        "io_tensors_mib": io_mib,
        "table": table,
    }


# -------------------------------------------------------------------------------------------- stream
def _build(preset: str):
    from hyperpyyaml import load_hyperpyyaml

    with open(ROOT / "hparams" / f"{preset}.yaml") as f:
        return load_hyperpyyaml(f)["model"].eval()


def _held_bytes(obj, seen=None) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` (NamedTuples, tuples, lists, objects' attributes)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_held_bytes(o, seen) for o in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        return sum(_held_bytes(v, seen) for k, v in vars(obj).items() if k not in ("model", "tokenizer"))
    return 0


def _stream_state_bytes(streamer) -> int:
    return _held_bytes([streamer._state, streamer._fbank, streamer._blocks, streamer._pending])


def _lookahead_samples(model, chunk) -> int:
    """Samples fed before the first chunk comes out, minus the chunk's own audio."""
    import torch

    streamer = model.stream(chunk)
    fed = 0
    while True:
        fed += 40
        if streamer.accept(torch.zeros(40)).frames.shape[1]:
            return fed - chunk.chunk_size * model.frame_samples


def stream_one(preset: str, chunk_ms: int, n_chunks: int, left_context_chunks=None) -> dict:
    import torch

    from lobes.chunking import ChunkConfig, ms_to_frames

    torch.manual_seed(0)
    model = _build(preset)
    frames = ms_to_frames(chunk_ms)
    config = ChunkConfig(frames, left_context_chunks)
    piece = frames * model.frame_samples
    streamer = model.stream(config)
    gen = torch.Generator().manual_seed(1)
    times, held, rss = [], {}, {}
    audio = torch.randn(piece * 4, generator=gen) * 0.1
    done = 0
    i = 0
    while done < n_chunks:
        x = audio[(i % 4) * piece : (i % 4 + 1) * piece]
        i += 1
        t0 = time.perf_counter()
        step = streamer.accept(x)
        elapsed = time.perf_counter() - t0
        got = step.frames.shape[1] // frames
        for _ in range(got):
            done += 1
            times.append(elapsed / got)
            if done in CHECKPOINTS or done == n_chunks:
                held[done] = _stream_state_bytes(streamer)
                rss[done] = _rss_mib()
    look = _lookahead_samples(model, config)
    at = {}
    for c in CHECKPOINTS:
        if c <= n_chunks:
            window = times[max(0, c - 5) : c]
            at[c] = {"time_s": statistics.median(window), "held_bytes": held[c], "rss_mib": rss[c]}
    chunk_s = chunk_ms / 1000.0
    compute = statistics.median(times)
    return {
        "preset": preset,
        "chunk_ms": chunk_ms,
        "chunk_frames": frames,
        "left_context_chunks": left_context_chunks,
        "chunks": n_chunks,
        "at_chunk": at,
        "median_chunk_s": compute,
        "rtf": sum(times) / (n_chunks * chunk_s),
        "lookahead_ms": 1000.0 * look / model.sample_rate,
        # from a chunk's first sample / on average over its samples, until its frames are out
        "latency_first_sample_ms": chunk_ms + 1000.0 * (look / model.sample_rate + compute),
        "latency_mean_ms": chunk_ms / 2 + 1000.0 * (look / model.sample_rate + compute),
    }


def run_stream(args) -> dict:
    import torch

    torch.set_num_threads(1)
    runs = []
    for preset, left in (("hyperconformer_streaming_small", None), ("conformer_streaming_small", 16)):
        for ms in args.chunk_ms:
            t0 = time.perf_counter()
            runs.append(stream_one(preset, ms, args.chunks, left))
            logger.info("%s %d ms: %.0f s", preset, ms, time.perf_counter() - t0)
    rows = []
    for r in runs:
        row = {"model": r["preset"].replace("_small", ""), "chunk": f"{r['chunk_ms']} ms"}
        for c, v in r["at_chunk"].items():
            row[f"#{c} ms"] = fmt(1000 * v["time_s"], ".3g")
        for c, v in r["at_chunk"].items():
            row[f"#{c} KiB held"] = fmt(v["held_bytes"] / 1024, ".4g")
        for c, v in r["at_chunk"].items():
            row[f"#{c} RSS MiB"] = fmt(v["rss_mib"], ".4g")
        row["RTF"] = fmt(r["rtf"], ".3f")
        row["look-ahead ms"] = fmt(r["lookahead_ms"], ".3g")
        row["latency ms (first / mean sample)"] = f"{r['latency_first_sample_ms']:.0f} / {r['latency_mean_ms']:.0f}"
        rows.append(row)
    print(f"\nStreaming, 1 thread, {args.chunks} chunks of audio fed one at a time (compute per chunk; state held)")
    table = print_table(rows, list(rows[0]))
    return {"runs": runs, "table": table}


# -------------------------------------------------------------------------------------------- decoder
def _decoder(self_attention: bool):
    import torch

    from lobes.asr import AttentionDecoder
    from lobes.attention import PositionalEncoding
    from lobes.hypermixing import ChunkCausalHyperMixing

    torch.manual_seed(0)
    mixer = partial(ChunkCausalHyperMixing, 144, 576, num_heads=8, chunk_size=1) if self_attention else None
    return AttentionDecoder(5000, 144, 4, 8, 576, PositionalEncoding(144), dropout=0.0, self_attention=mixer).eval()


def run_decoder(args) -> dict:
    import torch

    from lobes.incremental import IncrementalDecoder

    torch.set_num_threads(1)
    lengths = list(args.decoder_lengths)
    longest = max(lengths)
    memory = torch.randn(1, 250, 144)
    lens = torch.tensor([250])
    tokens = torch.randint(3, 5000, (1, longest), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, hyper in (("hypermixing_state", True), ("attention_cache", False)):
        dec = IncrementalDecoder(_decoder(hyper))
        state = dec.start(memory, lens)
        times = []
        for t in range(longest):
            t0 = time.perf_counter()
            _, state = dec.step(tokens[:, t], state)
            times.append(time.perf_counter() - t0)
        out[name] = {str(u): statistics.median(times[max(0, u - 11) : u]) for u in lengths}
        logger.info("%s: %s", name, out[name])
    full = _decoder(False)
    out["full_prefix"] = {}
    with torch.no_grad():
        for u in lengths:
            reps = []
            for _ in range(3 if u <= 1000 else 1):
                t0 = time.perf_counter()
                h, _ = full(tokens[:, :u], memory, lens)
                full.seq_lin(h[:, -1:])
                reps.append(time.perf_counter() - t0)
            out["full_prefix"][str(u)] = statistics.median(reps)
    rows = []
    for u in lengths:
        k = str(u)
        rows.append(
            {
                "output length": u,
                "HyperMixing state ms": fmt(1000 * out["hypermixing_state"][k], ".3g"),
                "attention cache ms": fmt(1000 * out["attention_cache"][k], ".3g"),
                "full prefix ms": fmt(1000 * out["full_prefix"][k], ".3g"),
                "cache / state": fmt(ratio(out["attention_cache"][k], out["hypermixing_state"][k]), ".2f"),
            }
        )
    print("\nAttention decoder, time per generated token (1 thread, 4 layers, d=144, vocab 5000, 250 encoder frames)")
    table = print_table(rows, list(rows[0]))
    return {"per_token_s": out, "lengths": lengths, "table": table}


# -------------------------------------------------------------------------------------------- figure
def plot(payload: dict, out_name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lobes.io import atomic_open

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
    causal = payload.get("causal")
    if causal:
        stored = causal["causal_hypermixing"]
        lengths = stored["config"]["lengths"]
        for name, res in stored["results"].items():
            axes[0].plot(lengths, [res[str(L)].get("alloc_peak_mib") for L in lengths], marker="o", label=name)
        axes[0].plot(
            lengths,
            [causal["linear_floor"][str(L)].get("alloc_peak_mib") for L in lengths],
            "k--",
            marker="x",
            label="Linear(d, d) floor",
        )
        axes[0].set(
            xscale="log",
            yscale="log",
            xlabel="frames L",
            ylabel="peak tensor MiB (fwd + bwd)",
            title="causal mixers: memory",
        )
    stream = payload.get("stream")
    if stream:
        for r in stream["runs"]:
            cs = sorted(int(c) for c in r["at_chunk"])
            label = f"{r['preset'].split('_')[0]} {r['chunk_ms']} ms"
            axes[1].plot(cs, [1000 * r["at_chunk"][c]["time_s"] for c in cs], marker="o", label=label)
            axes[2].plot(cs, [r["at_chunk"][c]["held_bytes"] / 1024 for c in cs], marker="o", label=label)
        axes[1].set(xscale="log", xlabel="chunk index", ylabel="ms per chunk (1 thread)", title="stream: compute")
        axes[2].set(xscale="log", xlabel="chunk index", ylabel="KiB held between chunks", title="stream: state")
    dec = payload.get("decoder")
    if dec:
        for name, vals in dec["per_token_s"].items():
            axes[3].plot(dec["lengths"], [1000 * vals[str(u)] for u in dec["lengths"]], marker="o", label=name)
        axes[3].set(
            xscale="log", yscale="log", xlabel="output length", ylabel="ms per token", title="decoder: time per token"
        )
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = OUT_DIR / f"{out_name}.png"
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections", nargs="+", default=["causal", "stream", "decoder"], choices=["causal", "stream", "decoder"]
    )
    parser.add_argument("--chunks", type=int, default=1000, help="chunks per stream (default 1000)")
    parser.add_argument("--chunk-ms", type=int, nargs="+", default=list(CHUNK_MS))
    parser.add_argument("--decoder-lengths", type=int, nargs="+", default=[50, 500, 5000])
    parser.add_argument("--remeasure-causal", action="store_true", help="rerun benchmarks/causal_hypermixing.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    payload = {"config": vars(args)}
    runners = {"causal": run_causal, "stream": run_stream, "decoder": run_decoder}
    for section in args.sections:
        payload[section] = runners[section](args)
    name = (
        "streaming" if args.sections == ["causal", "stream", "decoder"] and args.chunks == 1000 else "streaming_partial"
    )
    json_path = write_json(name, payload)
    png = plot(payload, name)
    logger.info("wrote %s and %s", json_path, png)
    return payload


if __name__ == "__main__":
    main()
