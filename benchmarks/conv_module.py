"""The Conformer convolution module of the main job: ours against speechbrain's, one training step (forward +
backward) under bf16 autocast, interleaved in one process.

:class:`lobes.conformer.ConvolutionModule` (a (B, T, D) forward, pointwise convolution as a linear layer, depthwise
convolution as a channels-last image with gradients of its own) against speechbrain's ``ConvolutionModule``
holding the same weights (``nn.Conv1d`` on (B, D, T) tensors and autograd), as a Conformer layer of the main job
uses it: d_model 144, kernel 15 (``hparams/hyperconformer_small.yaml``), on a batch of its length-bucketed loader
(12 utterances of 2.8 s: 70 encoder frames).
The two sides of a pair run one after the other, round after round, so a machine whose speed drifts slows both;
the table gives the median of the rounds, ``benchmarks/out/conv_module.png`` every round (JSON beside it).

    python benchmarks/conv_module.py            # 2 threads, 30 rounds
    python benchmarks/conv_module.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt, plot_lines, print_table, write_json  # noqa: E402


def _steps(batch: int, frames: int):
    """name -> (ours, reference): zero-argument training steps."""
    import torch
    from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule as SBConvolutionModule

    from lobes.conformer import ConvolutionModule

    torch.manual_seed(0)
    reference = SBConvolutionModule(144, 15)
    ours = ConvolutionModule(144, 15)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(batch, frames, 144, requires_grad=True)

    def step(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fn()
            out.float().sum().backward()

        return run

    return {
        "convolution module": (step(lambda: ours(x)), step(lambda: reference(x))),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--frames", type=int, default=70, help="frames per utterance")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    rows, series = [], {}
    for name, (ours, reference) in _steps(args.batch, args.frames).items():
        times = {"ours": [], "reference": []}
        for fn in (ours, reference, ours, reference):  # warm-up
            fn()
        for _ in range(rounds):
            for side, fn in (("ours", ours), ("reference", reference)):
                start = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - start)
        ours_ms = 1e3 * statistics.median(times["ours"])
        ref_ms = 1e3 * statistics.median(times["reference"])
        rows.append({"module": name, "ours ms": ours_ms, "speechbrain ms": ref_ms, "speed-up": ref_ms / ours_ms})
        series[name] = {side: [1e3 * t for t in values] for side, values in times.items()}
    print_table(
        [{k: (fmt(v, ".3g") if isinstance(v, float) else v) for k, v in row.items()} for row in rows],
        ["module", "ours ms", "speechbrain ms", "speed-up"],
    )
    print(f"batch {args.batch} x {args.frames} encoder frames, bf16 autocast, {args.threads} threads, {rounds} rounds")
    path = write_json("conv_module", {"args": vars(args), "rows": rows, "times_ms": series})
    png = plot_lines(
        "conv_module",
        list(range(1, rounds + 1)),
        {
            name: {"ours" if side == "ours" else "speechbrain": v for side, v in sides.items()}
            for name, sides in series.items()
        },
        "round (the two sides one after the other)",
        tuple("ms per training step" for _ in series),
        tuple(series),
        f"Conformer convolution module, bf16 autocast, {args.threads} threads, batch {args.batch} x {args.frames}",
        logy=False,
    )
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
