"""Shared helpers for the benchmark scripts: timing, peak memory, tables, JSON and PNG output.

Each measurement runs in a fresh spawned process, so the peak resident memory it reports belongs to
that one measurement and the timings of one candidate are not disturbed by another's allocations.
Ratios are always computed between candidates measured in the same run of the same script.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

from lobes.io import atomic_open, atomic_write_text

logger = logging.getLogger(__name__)

OUT_DIR = Path(__file__).resolve().parent / "out"


def _rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _allocated_peak_mib(step: Callable) -> float:
    """Peak of live tensor memory during one more (untimed) ``step()``, from torch's allocation events.

    This is the CPU counterpart of ``torch.cuda.max_memory_allocated``: it counts what tensors need, not what
    the C allocator keeps. Peak RSS alone misleads on glibc, whose heap keeps freed blocks below its mmap
    threshold (32 MiB at most), so a run whose tensors sit just under it looks larger than one above it.
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet: no GPU probing messages on CPU machines
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    changes = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    )  # allocations (+) and frees (-), in time order
    live = peak = 0
    for _, delta in changes:
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def _worker(queue, setup: Callable, args: tuple, repeats: int, warmup: int, threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        step = setup(*args)  # builds model and inputs; returns a zero-argument callable
        base = _rss_mib()
        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        queue.put(
            {
                "ok": True,
                "time_s": statistics.median(times),
                "times_s": times,
                "peak_mib": max(peak - base, 0.0),
                "alloc_peak_mib": _allocated_peak_mib(step),
            }
        )
    except Exception as exc:  # reported to the parent, which records the failure in the table
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)})


def measure(
    setup: Callable, *args: Any, repeats: int = 5, warmup: int = 1, threads: int = 2, timeout_s: float = 1800.0
) -> dict:
    """Run ``setup(*args)()`` ``warmup + repeats`` times in a fresh process.

    ``setup`` must be a module-level function (it is pickled by reference). It builds what the step needs
    and returns the step. Returns ``{"ok", "time_s" (median), "times_s", "peak_mib", "alloc_peak_mib"}``
    where ``peak_mib`` is the peak resident memory above the level reached once the model and inputs
    existed and ``alloc_peak_mib`` the peak of live tensor memory during one extra step, or
    ``{"ok": False, "error": ...}`` when the step failed (an exception or out of memory).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, setup, args, repeats, warmup, threads))
    proc.start()
    result = None
    deadline = time.monotonic() + timeout_s
    while result is None and time.monotonic() < deadline:
        try:
            result = queue.get(timeout=1.0)
        except queue_module.Empty:
            if not proc.is_alive() and queue.empty():  # died without a word: out of memory, signal
                break
    if result is None:
        proc.join(timeout=1)
        why = "timed out" if proc.exitcode is None else f"exit code {proc.exitcode}, e.g. killed for memory"
        result = {"ok": False, "error": f"no result ({why})"}
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
    return result


def forward_backward_step(module: Any, call: Callable, x: Any) -> Callable[[], None]:
    """A zero-argument training step for :func:`measure`: ``call(x)``, backward through its sum, gradients reset."""

    def step() -> None:
        call(x).sum().backward()
        x.grad = None
        module.zero_grad(set_to_none=True)

    return step


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], columns: list[str]) -> str:
    """Print rows as an aligned text table; returns the text."""
    cells = [[str(c) for c in columns]] + [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict, out_dir: Path = OUT_DIR) -> Path:
    """Write ``payload`` to ``out_dir/name.json`` atomically."""
    return atomic_write_text(out_dir / f"{name}.json", json.dumps(payload, indent=2, default=str))


def plot_lines(
    name: str,
    x: list,
    series: dict[str, list],
    xlabel: str,
    ylabels: tuple[str, ...],
    panels: tuple[str, ...],
    title: str,
    out_dir: Path = OUT_DIR,
    logy: bool = True,
) -> Path:
    """One PNG with one panel per metric: ``series[panel][label] -> values over x`` (None = not run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel, ylabel in zip(axes[0], panels, ylabels):
        for label, values in series[panel].items():
            pts = [(xi, v) for xi, v in zip(x, values) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if any(isinstance(v, str) for v in x):  # candidate names: slanted so that they do not overlap
            ax.tick_params(axis="x", labelrotation=30)
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
        if logy:
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 6, not 6 x 10^0
            ax.yaxis.set_major_formatter(plain)
            low, high = ax.get_ylim()  # label the minor ticks only where few decades leave room for them
            ax.yaxis.set_minor_formatter(plain if high / low < 30 else matplotlib.ticker.NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
