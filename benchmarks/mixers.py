"""Token mixers: forward + backward time and peak memory against sequence length.

Compares, in one run, our HyperMixing with speechbrain's (the reference), torch.nn.MultiheadAttention,
our SDPA MultiHeadAttention and our Multi-DConv-Head attention, at B = 8, d = 256, 4 heads, hypernetwork
size 1024 (CPU, 2 threads, float32). Every measurement runs in a fresh process (benchmarks.common.measure).

    python benchmarks/mixers.py            # full sweep, L in 250 ... 8000
    python benchmarks/mixers.py --quick    # L in 250, 500, one repeat (smoke test)
    python benchmarks/mixers.py --lengths 3000 --only ours_hypermixing sb_hypermixing

Prints per-L timings, peak memory and the ratios of ours vs speechbrain's HyperMixing (speedup =
their time / ours, memory = ours / theirs), writes benchmarks/out/mixers.json and mixers.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt, forward_backward_step, measure, plot_lines, print_table, ratio, write_json  # noqa: E402

logger = logging.getLogger(__name__)

BATCH, D_MODEL, HEADS, HYPERNET = 8, 256, 4, 1024
LENGTHS = (250, 500, 1000, 2000, 3000, 4000, 8000)
QUICK_LENGTHS = (250, 500)
MEMORY_LIMIT_GIB = 16.0
CANDIDATES = ("ours_hypermixing", "sb_hypermixing", "torch_mha", "ours_mha", "ours_dconv")


def _estimated_gib(name: str, length: int) -> float:
    """Rough peak-memory estimate, to skip runs that cannot fit (float32)."""
    tokens = BATCH * length * D_MODEL * 4
    if name == "sb_hypermixing":  # (B, L, L) zeros + generated W1, W2 (and their copies) + activations
        return (BATCH * length * length * 4 + 6 * BATCH * length * HYPERNET * 4 + 20 * tokens) / 2**30
    return 30 * tokens / 2**30  # attention through SDPA and our HyperMixing are linear in memory


def _skip_reason(name: str, length: int) -> str | None:
    if name == "sb_hypermixing" and length > 3000:
        return "speechbrain's positional table stops at 3000 tokens"
    if _estimated_gib(name, length) > MEMORY_LIMIT_GIB:
        return f"needs > {MEMORY_LIMIT_GIB:g} GiB"
    return None


def setup(name: str, length: int):
    """Build module and input in the worker process; return the forward + backward step."""
    import torch

    torch.manual_seed(0)
    if name == "ours_hypermixing":
        from lobes.hypermixing import HyperMixing

        module = HyperMixing(D_MODEL, HYPERNET, num_heads=HEADS, max_length=3000)
        call = lambda x: module(x, x, x)[0]  # noqa: E731
    elif name == "sb_hypermixing":
        from speechbrain.nnet.hypermixing import HyperMixing as SBHyperMixing

        module = SBHyperMixing(D_MODEL, HYPERNET, num_heads=HEADS, max_length=3000)
        call = lambda x: module(x, x, x)[0]  # noqa: E731
    elif name == "torch_mha":
        module = torch.nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        call = lambda x: module(x, x, x, need_weights=False)[0]  # noqa: E731
    elif name == "ours_mha":
        from lobes.attention import MultiHeadAttention

        module = MultiHeadAttention(nhead=HEADS, d_model=D_MODEL)
        call = lambda x: module(x, x, x, return_attn_weights=False)  # noqa: E731
    elif name == "ours_dconv":
        from lobes.attention import MultiDConvHeadAttention

        module = MultiDConvHeadAttention(nhead=HEADS, d_model=D_MODEL)
        call = lambda x: module(x, x, x, return_attn_weights=False)  # noqa: E731
    else:
        raise ValueError(f"unknown candidate {name!r}; expected one of {', '.join(CANDIDATES)}")
    x = torch.randn(BATCH, length, D_MODEL, requires_grad=True)
    return forward_backward_step(module, call, x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small lengths, one repeat")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths to measure")
    parser.add_argument("--only", nargs="+", choices=CANDIDATES, help="measure only these candidates")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5, quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = 0 if args.quick else 1
    names = args.only or CANDIDATES

    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    rows = []
    for length in lengths:
        row = {"L": length}
        for name in names:
            reason = _skip_reason(name, length)
            if reason is not None:
                res = {"ok": False, "skipped": reason}
            else:
                logger.info("L=%d %s ...", length, name)
                res = measure(setup, name, length, repeats=repeats, warmup=warmup, threads=args.threads)
                if not res["ok"]:
                    logger.warning("L=%d %s failed: %s", length, name, res.get("error"))
            results[name][length] = res
            row[f"{name} s"] = fmt(res.get("time_s")) if res["ok"] else ("skip" if "skipped" in res else "fail")
            row[f"{name} MiB"] = fmt(res.get("alloc_peak_mib"), ".0f") if res["ok"] else "-"
            row[f"{name} RSS"] = fmt(res.get("peak_mib"), ".0f") if res["ok"] else "-"
        ours, ref = results.get("ours_hypermixing", {}).get(length), results.get("sb_hypermixing", {}).get(length)
        if ours and ref and ours["ok"] and ref["ok"]:
            row["speedup vs sb"] = fmt(ratio(ref["time_s"], ours["time_s"]), ".2f")
            row["memory vs sb"] = fmt(ratio(ours["alloc_peak_mib"], ref["alloc_peak_mib"]), ".2f")
            row["RSS vs sb"] = fmt(ratio(ours["peak_mib"], ref["peak_mib"]), ".2f")
        else:
            row["speedup vs sb"] = row["memory vs sb"] = row["RSS vs sb"] = "-"
        rows.append(row)

    columns = (
        ["L"]
        + [f"{n} {u}" for n in names for u in ("s", "MiB", "RSS")]
        + ["speedup vs sb", "memory vs sb", "RSS vs sb"]
    )
    print(
        f"\nForward + backward, B={BATCH}, d={D_MODEL}, heads={HEADS}, hypernet={HYPERNET}, "
        f"{args.threads} threads (s = median seconds per step, MiB = peak live tensor memory, "
        f"RSS = peak resident memory above baseline, MiB)"
    )
    table = print_table(rows, columns)
    skipped = sorted({f"{n}: {r['skipped']}" for n in names for r in results[n].values() if "skipped" in r})
    for line in skipped:
        print(f"skipped  {line}")

    payload = {
        "config": {
            "batch": BATCH,
            "d_model": D_MODEL,
            "heads": HEADS,
            "hypernet_size": HYPERNET,
            "threads": args.threads,
            "repeats": repeats,
            "warmup": warmup,
            "lengths": list(lengths),
        },
        "results": {n: {str(k): v for k, v in r.items()} for n, r in results.items()},
        "table": table,
    }
    name = "mixers_quick" if args.quick else "mixers"
    path = write_json(name, payload)
    series = {
        panel: {
            n: [results[n][length].get(key) if results[n][length]["ok"] else None for length in lengths] for n in names
        }
        for panel, key in (("time", "time_s"), ("memory", "alloc_peak_mib"))
    }
    png = plot_lines(
        name,
        list(lengths),
        series,
        xlabel="sequence length L",
        ylabels=("seconds per forward + backward", "peak live tensor MiB"),
        panels=("time", "memory"),
        title=f"Token mixers, B={BATCH}, d={D_MODEL}, {HEADS} heads",
    )
    print(f"wrote {path} and {png}")
    return payload


if __name__ == "__main__":
    main()
