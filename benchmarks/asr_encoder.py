"""HyperConformer vs Conformer encoder: train-step time (forward + backward) and peak memory by utterance length.

Both encoders have the 8M preset sizes (d_model 144, d_ffn 576, 8 heads, 10 layers, kernel 31) and differ
only in the token mixer: multi-head HyperMixing (linear in length) vs relative-position multi-head
attention (speechbrain's ``RelPosMHAXL``, quadratic). speechbrain's own
``ConformerEncoder(attention_type="hypermixing")`` runs as a third column. Lengths are 5, 15, 30, 60 s of
audio at 100 frames/s before the 4x subsampling, i.e. 25 encoder frames per second.

    python benchmarks/asr_encoder.py            # full run (on an otherwise idle machine)
    python benchmarks/asr_encoder.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt, measure, plot_lines, print_table, ratio, write_json  # noqa: E402

logger = logging.getLogger(__name__)

CANDIDATES = ("hyperconformer", "conformer_relpos", "speechbrain_hyperconformer")
FRAMES_PER_SECOND = 25  # after 4x subsampling of 100 frames/s


def build_encoder(kind: str, layers: int, d_model: int, d_ffn: int, nhead: int):
    """The encoder named ``kind`` with the given sizes."""
    from speechbrain.nnet.attention import RelPosEncXL, RelPosMHAXL

    from lobes.conformer import ConformerEncoder, hyperconformer_encoder

    if kind == "hyperconformer":
        return hyperconformer_encoder(layers, d_model, d_ffn, nhead, kernel_size=31)
    if kind == "conformer_relpos":
        return ConformerEncoder(
            layers,
            d_model,
            d_ffn,
            functools.partial(RelPosMHAXL, d_model, nhead),
            kernel_size=31,
            pos_encoding=RelPosEncXL(d_model),
        )
    if kind == "speechbrain_hyperconformer":
        from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder as SBConformerEncoder

        return SBConformerEncoder(layers, d_model, d_ffn, nhead, kernel_size=31, attention_type="hypermixing")
    raise ValueError(f"kind must be one of {', '.join(CANDIDATES)}; got {kind!r}")


def setup_step(kind: str, seconds: float, batch: int, layers: int, d_model: int, d_ffn: int, nhead: int):
    """Build the encoder and a padded batch; return one train step (forward + backward)."""
    import torch

    from lobes.masks import lengths_to_padding_mask

    torch.manual_seed(0)
    enc = build_encoder(kind, layers, d_model, d_ffn, nhead).train()
    frames = int(seconds * FRAMES_PER_SECOND)
    x = torch.randn(batch, frames, d_model)
    lengths = torch.tensor([frames] + [int(frames * 0.8)] * (batch - 1))  # one full row, others padded
    mask = lengths_to_padding_mask(lengths, frames)
    pos = enc.pos_encoding(x) if kind == "conformer_relpos" else None

    def step():
        enc.zero_grad(set_to_none=True)
        out = enc(x, src_key_padding_mask=mask, pos_embs=pos)[0]
        out.pow(2).mean().backward()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short lengths, 2 layers, 1 repeat (smoke test)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    seconds = [5, 15] if args.quick else [5, 15, 30, 60]
    layers = 2 if args.quick else 10
    repeats, batch = (1, 2) if args.quick else (5, args.batch)
    sizes = dict(layers=layers, d_model=144, d_ffn=576, nhead=8)

    results = {kind: {} for kind in CANDIDATES}
    rows = []
    for sec in seconds:
        row = {"seconds": sec, "frames": int(sec * FRAMES_PER_SECOND)}
        for kind in CANDIDATES:
            res = measure(
                setup_step, kind, sec, batch, *sizes.values(), repeats=repeats, warmup=1, threads=args.threads
            )
            results[kind][sec] = res
            if not res["ok"]:
                logger.warning("%s at %s s failed: %s", kind, sec, res["error"])
            row[f"{kind}_s"] = fmt(res.get("time_s"))
            row[f"{kind}_MiB"] = fmt(res.get("peak_mib"), ".0f")
        hyper, conf = results["hyperconformer"][sec], results["conformer_relpos"][sec]
        sbh = results["speechbrain_hyperconformer"][sec]
        row["speedup_vs_conformer"] = fmt(ratio(conf.get("time_s"), hyper.get("time_s")), ".2f")
        row["memory_ratio_conformer/ours"] = fmt(ratio(conf.get("peak_mib"), hyper.get("peak_mib")), ".2f")
        row["speedup_vs_speechbrain"] = fmt(ratio(sbh.get("time_s"), hyper.get("time_s")), ".2f")
        rows.append(row)

    columns = (
        ["seconds", "frames"]
        + [f"{k}_{u}" for k in CANDIDATES for u in ("s", "MiB")]
        + ["speedup_vs_conformer", "memory_ratio_conformer/ours", "speedup_vs_speechbrain"]
    )
    table = print_table(rows, columns)
    name = "asr_encoder_quick" if args.quick else "asr_encoder"
    payload = {
        "config": {
            **sizes,
            "batch": batch,
            "repeats": repeats,
            "threads": args.threads,
            "frames_per_second": FRAMES_PER_SECOND,
            "quick": args.quick,
        },
        "results": {k: {str(s): v for s, v in r.items()} for k, r in results.items()},
        "table": table,
    }
    print(f"JSON: {write_json(name, payload)}")
    series = {
        "time": {k: [results[k][s].get("time_s") for s in seconds] for k in CANDIDATES},
        "memory": {k: [results[k][s].get("peak_mib") for s in seconds] for k in CANDIDATES},
    }
    png = plot_lines(
        name,
        seconds,
        series,
        "utterance length (s)",
        ("train step time (s)", "peak memory (MiB)"),
        ("time", "memory"),
        f"ASR encoder train step, batch {batch}, {layers} layers, d_model 144",
    )
    print(f"PNG: {png}")


if __name__ == "__main__":
    main()
