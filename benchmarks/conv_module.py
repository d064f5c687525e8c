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
    """(ours, speechbrain's): zero-argument training steps of the two modules on the same input."""
    import torch
    from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule as SBConvolutionModule

    from lobes.conformer import ConvolutionModule

    torch.manual_seed(0)
    reference = SBConvolutionModule(144, 15)
    ours = ConvolutionModule(144, 15)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(batch, frames, 144, requires_grad=True)

    def step(module):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
            out.float().sum().backward()

        return run

    return step(ours), step(reference)


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
    sides = dict(zip(("ours", "speechbrain"), _steps(args.batch, args.frames)))
    for step in (*sides.values(), *sides.values()):  # warm-up
        step()
    times_ms = {side: [] for side in sides}
    for _ in range(rounds):
        for side, step in sides.items():
            start = time.perf_counter()
            step()
            times_ms[side].append(1e3 * (time.perf_counter() - start))
    ours_ms, sb_ms = (statistics.median(times_ms[side]) for side in sides)
    row = {"module": "convolution module", "ours ms": ours_ms, "speechbrain ms": sb_ms, "speed-up": sb_ms / ours_ms}
    print_table([{k: (fmt(v, ".3g") if isinstance(v, float) else v) for k, v in row.items()}], list(row))
    print(f"batch {args.batch} x {args.frames} encoder frames, bf16 autocast, {args.threads} threads, {rounds} rounds")
    path = write_json("conv_module", {"args": vars(args), "rows": [row], "times_ms": times_ms})
    png = plot_lines(
        "conv_module",
        list(range(1, rounds + 1)),
        {"convolution module": times_ms},
        "round (the two sides one after the other)",
        ("ms per training step",),
        ("convolution module",),
        f"Conformer convolution module, bf16 autocast, {args.threads} threads, batch {args.batch} x {args.frames}",
        logy=False,
    )
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
