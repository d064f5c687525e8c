"""Causal token mixers: chunk-causal HyperMixing against causal SDPA attention; and the running-sum normalisation.

``speed`` (default): forward + backward time and peak memory of ``lobes.hypermixing.ChunkCausalHyperMixing``
(chunk 1 = strictly causal, and chunk-causal with a few chunk sizes) against causal multi-head attention
(``lobes.attention.MultiHeadAttention`` with ``causal`` on, i.e. ``scaled_dot_product_attention(...,
is_causal=True)``), batch 1, d = 144, 4 heads, hypernetwork 576 (the 8M HyperConformer's layer sizes),
float32, 2 threads, every measurement in a fresh process (``benchmarks.common.measure``). HyperMixing runs
on its compiled kernels (``lobes/csrc/causal_mixing.c``) where they build; ``LOBES_NATIVE=0`` measures its
pure-torch kernels instead. The report names the kernels used and the memory floor: the gradients of the input
and of the parameters, which every candidate's step returns.

    python benchmarks/causal_hypermixing.py                        # L = 1k, 4k, 16k
    python benchmarks/causal_hypermixing.py --lengths 1024 --repeats 1
    python benchmarks/causal_hypermixing.py normalization          # running sum vs running mean

Prints, per length, the median seconds per step, peak live tensor memory (MiB) and the ratios of each
HyperMixing variant to attention (speedup = attention's time / ours; memory = ours / attention's), and the
growth of each candidate's time from one length to the next (4 = linear for 4x longer inputs). Writes
benchmarks/out/causal_hypermixing.json and .png (causal_hypermixing_<n>threads.* for --threads n other than 2).

``normalization``: (1) the RMS of the GELU input against the frame index at random initialisation, for
a running sum and a running mean, with white-noise frames and with frames around a fixed vector; (2) a toy
causal task (one mixer layer reports which of 4 symbols was most frequent so far; trained on 64 frames,
tested on 2048) for both. Writes benchmarks/out/causal_hypermixing_normalization.json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt, forward_backward_step, measure, plot_lines, print_table, ratio, write_json  # noqa: E402

logger = logging.getLogger(__name__)

D_MODEL, HEADS, HYPERNET, BATCH = 144, 4, 576, 1
LENGTHS = (1024, 4096, 16384)
CHUNKS = (1, 4, 16)
REFERENCE = "sdpa_causal"
TARGET_SPEEDUP, TARGET_MEMORY = 3.0, 0.2  # at the longest length: >= 3x faster, <= 0.2x the memory


def _candidates(chunks: tuple[int, ...]) -> list[str]:
    return [f"hypermixing_c{c}" for c in chunks] + [REFERENCE]


def setup(name: str, length: int):
    """Build module and input in the worker process; return the forward + backward step."""
    import torch

    torch.manual_seed(0)
    if name == REFERENCE:
        from lobes.attention import MultiHeadAttention

        module = MultiHeadAttention(nhead=HEADS, d_model=D_MODEL)
        module.causal = True  # the fused kernel with is_causal=True

        def call(x):
            return module(x, x, x, return_attn_weights=False)
    elif name.startswith("hypermixing_c"):
        from lobes.hypermixing import ChunkCausalHyperMixing

        module = ChunkCausalHyperMixing(
            D_MODEL, HYPERNET, num_heads=HEADS, chunk_size=int(name[len("hypermixing_c") :])
        )

        def call(x):
            return module(x, x, x)[0]
    else:
        raise ValueError(f"unknown candidate {name!r}; expected {REFERENCE} or hypermixing_c<chunk size>")
    x = torch.randn(BATCH, length, D_MODEL, requires_grad=True)
    return forward_backward_step(module, call, x)


def _kernels_and_memory_floor(length: int) -> tuple[str, float]:
    """Which kernels the HyperMixing candidates run on here (compiled or torch, and why), and the MiB that the
    gradients of a ``length``-frame input and of the mixer's parameters take: no mixer that returns them
    (as every candidate's step does) can peak lower."""
    from lobes import _native
    from lobes.hypermixing import ChunkCausalHyperMixing

    _native.library("causal_mixing")
    params = sum(p.numel() for p in ChunkCausalHyperMixing(D_MODEL, HYPERNET, num_heads=HEADS).parameters())
    return _native.native_status()["causal_mixing"], (BATCH * length * D_MODEL + params) * 4 / 2**20


def run_speed(args: argparse.Namespace) -> dict:
    names = _candidates(tuple(args.chunks))
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    rows = []
    for length in args.lengths:
        repeats = args.repeats if args.repeats is not None else (2 if length > 8192 else 5)
        row = {"L": length}
        for name in names:
            logger.info("L=%d %s (%d repeats) ...", length, name, repeats)
            t0 = time.perf_counter()
            res = measure(setup, name, length, repeats=repeats, warmup=1, threads=args.threads)
            logger.info(
                "  done in %.0f s: %s",
                time.perf_counter() - t0,
                f"{res['time_s']:.3g} s, {res['alloc_peak_mib']:.1f} MiB" if res["ok"] else res["error"],
            )
            results[name][length] = res
            row[f"{name} s"] = fmt(res.get("time_s")) if res["ok"] else "fail"
            row[f"{name} MiB"] = fmt(res.get("alloc_peak_mib"), ".1f") if res["ok"] else "-"
        ref = results[REFERENCE][length]
        for name in names[:-1]:
            ours = results[name][length]
            ok = ours["ok"] and ref["ok"]
            row[f"{name} speedup"] = fmt(ratio(ref["time_s"], ours["time_s"]), ".2f") if ok else "-"
            row[f"{name} memory"] = fmt(ratio(ours["alloc_peak_mib"], ref["alloc_peak_mib"]), ".2f") if ok else "-"
        rows.append(row)

    columns = (
        ["L"]
        + [f"{n} {u}" for n in names for u in ("s", "MiB")]
        + [f"{n} {u}" for n in names[:-1] for u in ("speedup", "memory")]
    )
    print(
        f"\nForward + backward, B={BATCH}, d={D_MODEL}, heads={HEADS}, hypernet={HYPERNET}, {args.threads} threads, "
        f"float32 (s = median seconds per step, MiB = peak live tensor memory; speedup = {REFERENCE} time / "
        f"ours, memory = ours / {REFERENCE})"
    )
    table = print_table(rows, [c for c in columns if "speedup" not in c and "memory" not in c])
    ratios = print_table(rows, ["L"] + [c for c in columns if "speedup" in c or "memory" in c])

    growth_rows = []
    lengths = list(args.lengths)
    for a, b in zip(lengths, lengths[1:]):
        grow = {"L": f"{a} -> {b} ({b / a:g}x)"}
        for name in names:
            ra, rb = results[name][a], results[name][b]
            grow[name] = fmt(ratio(rb["time_s"], ra["time_s"]), ".2f") if ra["ok"] and rb["ok"] else "-"
        growth_rows.append(grow)
    print("\nTime growth between lengths (linear = the length ratio; quadratic = its square)")
    growth = print_table(growth_rows, ["L"] + names)

    longest = lengths[-1]
    ref = results[REFERENCE][longest]
    kernels, floor = _kernels_and_memory_floor(longest)
    print(f"\nHyperMixing token mixing: {kernels}")
    print(f"\nTargets at L={longest}: speedup >= {TARGET_SPEEDUP:g}x, memory <= {TARGET_MEMORY:g}x of {REFERENCE}")
    if ref["ok"]:
        print(
            f"  floor: the gradients of the input and of the parameters alone take {floor:.2f} MiB, "
            f"{ratio(floor, ref['alloc_peak_mib']):.3f}x of {REFERENCE}'s peak"
        )
    for name in names[:-1]:
        ours = results[name][longest]
        if ours["ok"] and ref["ok"]:
            s = ratio(ref["time_s"], ours["time_s"])
            m = ratio(ours["alloc_peak_mib"], ref["alloc_peak_mib"])
            print(
                f"  {name}: speedup {s:.2f}x ({'met' if s >= TARGET_SPEEDUP else 'NOT met'}), "
                f"memory {m:.2f}x ({'met' if m <= TARGET_MEMORY else 'NOT met'})"
            )

    payload = {
        "config": {
            "batch": BATCH,
            "d_model": D_MODEL,
            "heads": HEADS,
            "hypernet_size": HYPERNET,
            "threads": args.threads,
            "lengths": lengths,
            "chunks": list(args.chunks),
            "kernels": kernels,
            "gradient_floor_mib": floor,
        },
        "results": {n: {str(k): v for k, v in r.items()} for n, r in results.items()},
        "table": table,
        "ratios": ratios,
        "growth": growth,
    }
    name = "causal_hypermixing" if args.threads == 2 else f"causal_hypermixing_{args.threads}threads"
    json_path = write_json(name, payload)
    series = {
        "time": {n: [results[n][length].get("time_s") for length in lengths] for n in names},
        "memory": {n: [results[n][length].get("alloc_peak_mib") for length in lengths] for n in names},
    }
    png = plot_lines(
        name,
        lengths,
        series,
        "sequence length (frames)",
        ("seconds per forward + backward", "peak tensor memory (MiB)"),
        ("time", "memory"),
        f"causal token mixers, B={BATCH}, d={D_MODEL}, {HEADS} heads, {args.threads} threads",
    )
    logger.info("wrote %s and %s", json_path, png)
    return payload


# ------------------------------------------------------------------------------------ normalisation
def _gelu_input_rms(normalize: bool, frames: str, length: int, positions: list[int]) -> list[float]:
    """RMS of the GELU input of every chunk (chunk 1) at random initialisation, for frames that are white
    noise (``"noise"``: zero mean, unit variance) or layer-normed noise around a fixed vector (``"biased"``:
    each channel keeps its sign on average over time, as encoder features do)."""
    import torch

    from lobes.hypermixing import ChunkCausalHyperMixing

    torch.manual_seed(0)
    mixer = ChunkCausalHyperMixing(D_MODEL, HYPERNET, num_heads=HEADS, chunk_size=1, normalize=normalize)
    seen = []
    hook = mixer.activation.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    x = torch.randn(1, length, D_MODEL)
    if frames == "biased":
        x = torch.nn.functional.layer_norm(torch.randn(1, 1, D_MODEL) + 0.5 * x, (D_MODEL,))
    with torch.no_grad():
        mixer(x, x, x)
    hook.remove()
    dh = D_MODEL // HEADS
    # each call: (H, B * chunks * dh, hs) -> (chunks, H * dh * hs)
    per_frame = torch.cat([s.view(HEADS, -1, dh, s.size(-1)).transpose(0, 1).flatten(1) for s in seen])
    rms = per_frame.square().mean(1).sqrt()
    return [rms[p - 1].item() for p in positions]


def _majority_batch(batch: int, length: int, symbols: int, generator):
    """Random symbol sequences with per-sequence skewed frequencies; target = most frequent symbol so far
    (-100 where the count is tied, ignored by the loss and the accuracy)."""
    import torch

    probs = torch.distributions.Dirichlet(torch.ones(symbols)).sample((batch,))
    seq = torch.multinomial(probs, length, replacement=True, generator=generator)  # (B, L)
    counts = torch.nn.functional.one_hot(seq, symbols).cumsum(1)  # (B, L, S)
    top2 = counts.topk(2, dim=-1).values
    target = counts.argmax(-1).masked_fill(top2[..., 0] == top2[..., 1], -100)
    return seq, target


def _toy_task(normalize: bool, seed: int, steps: int, train_len: int, test_len: int) -> dict:
    import torch
    from torch import nn

    from lobes.hypermixing import ChunkCausalHyperMixing

    torch.manual_seed(seed)
    symbols, d = 4, 32
    emb = nn.Embedding(symbols, d)
    mixer = ChunkCausalHyperMixing(d, 128, num_heads=2, chunk_size=1, normalize=normalize)
    head = nn.Linear(d, symbols)
    params = list(emb.parameters()) + list(mixer.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(seed)

    def logits(seq):
        h = emb(seq)
        return head(h + mixer(h, h, h)[0])

    losses = []
    for _ in range(steps):
        seq, target = _majority_batch(32, train_len, symbols, gen)
        loss = nn.functional.cross_entropy(logits(seq).flatten(0, 1), target.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        seq, target = _majority_batch(256, test_len, symbols, torch.Generator().manual_seed(1000 + seed))
        pred = logits(seq).argmax(-1)
    hit, valid = pred == target, target != -100

    def acc(lo, hi):
        v = valid[:, lo:hi]
        return (hit[:, lo:hi] & v).sum().item() / max(v.sum().item(), 1)

    return {
        "final_train_loss": statistics.mean(losses[-20:]),
        "acc_seen_lengths": acc(0, train_len),
        "acc_longer": acc(train_len, test_len),
    }


def run_normalization(args: argparse.Namespace) -> dict:
    torch_threads(args.threads)
    positions = [1, 10, 100, 1000]
    rms = {
        f"{frames}, normalize={n}": _gelu_input_rms(n, frames, positions[-1], positions)
        for frames in ("noise", "biased")
        for n in (False, True)
    }
    rows = [{"frame": p, **{k: fmt(v[i], ".3g") for k, v in rms.items()}} for i, p in enumerate(positions)]
    print("\nRMS of the GELU input by frame (random init, chunk 1, d=144, 4 heads, hypernet 576)")
    rms_table = print_table(rows, ["frame"] + list(rms))

    task: dict[str, list[dict]] = {}
    for normalize in (False, True):
        key = f"normalize={normalize}"
        task[key] = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            task[key].append(_toy_task(normalize, seed, args.steps, args.train_length, args.test_length))
            logger.info("%s seed %d: %s (%.0f s)", key, seed, task[key][-1], time.perf_counter() - t0)
    rows = []
    for key, runs in task.items():
        mean = {
            m: fmt(statistics.mean(r[m] for r in runs), ".3f")
            for m in ("final_train_loss", "acc_seen_lengths", "acc_longer")
        }
        rows.append(
            {
                "variant": key,
                "train loss (last 20)": mean["final_train_loss"],
                f"acc frames 1-{args.train_length}": mean["acc_seen_lengths"],
                f"acc frames {args.train_length + 1}-{args.test_length}": mean["acc_longer"],
            }
        )
    print(
        f"\nToy causal task: most frequent of 4 symbols so far; d=32, 2 heads, hypernet 128, {args.steps} steps on "
        f"{args.train_length} frames, mean of {args.seeds} seeds"
    )
    task_table = print_table(rows, list(rows[0]))
    payload = {
        "gelu_input_rms": {"positions": positions, **rms},
        "toy_task": task,
        "config": {
            "steps": args.steps,
            "seeds": args.seeds,
            "train_length": args.train_length,
            "test_length": args.test_length,
        },
        "tables": [rms_table, task_table],
    }
    path = write_json("causal_hypermixing_normalization", payload)
    logger.info("wrote %s", path)
    return payload


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("speed", "normalization"), default="speed")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="sequence lengths (speed)")
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS), help="HyperMixing chunk sizes (speed)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 5, 2 above 8192 frames)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the toy task (normalization)")
    parser.add_argument("--seeds", type=int, default=4, help="toy-task runs per variant (normalization)")
    parser.add_argument("--train-length", type=int, default=64)
    parser.add_argument("--test-length", type=int, default=2048)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_speed(args) if args.what == "speed" else run_normalization(args)


if __name__ == "__main__":
    main()
