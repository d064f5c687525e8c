"""CTC decoders of a pretrained ASR folder compared on test sets: WER by slice, new words, speed.

The CTC log-probabilities of every test utterance are computed once (1 thread) and every decoder reads the
same ones:

* ``greedy``: best path;
* ``lexicon``: the project's CTC prefix beam search over the training words with their word trigram LM
  (closed vocabulary; with beam 16: the recipe's former test decoder);
* ``open``: the same plus new words spelled token by token, scored by a trigram model of the pieces of the
  training words and an unknown-word score (the recipe's test decoder);
* ``flashlight lexicon``: torchaudio's flashlight-text ``ctc_decoder`` with the same lexicon and the same word
  trigram written as an ARPA file (closed vocabulary);
* ``flashlight lexicon-free``: the same decoder without lexicon, with a token n-gram LM (ARPA, at most 6-gram:
  the KenLM of the flashlight-text wheel stops there) estimated on the training transcripts;
* with ``--lm FILE.arpa``: ``open`` and ``flashlight lexicon`` again with that word LM (its words as lexicon).

Every LM and lexicon comes from the training transcripts (the folder's ``transcripts.ckpt``, or ``--train-csv``).
The weights are the ones chosen on the valid set (see the options). Printed per decoder: WER over all test
utterances, per test CSV (``test``: sentences of training words only; ``test_new_words``: sentences holding
words that no training sentence has), over the utterances that hold a word missing from the decoder's lexicon,
the share of test words missing from that lexicon, how many of those words the decoder got right (bag of words
per utterance) and how many words outside the lexicon it wrote, and utterances decoded per second of the
decoding thread's CPU time (1 thread; CPU time, so that other work on the machine does not count).

    python benchmarks/ctc_decoders.py --pretrained results/ASR/hyperconformer/1234/pretrained \\
        --test data/embedded_speech/test.csv data/embedded_speech/test_new_words.csv
    python benchmarks/ctc_decoders.py ... --limit 30      # a quick look
    python benchmarks/ctc_decoders.py ... --tune data/embedded_speech/valid.csv   # choose the settings

``--tune`` chooses the open decoder's settings on the valid set in two steps. First the LM weight and word bonus
(``--tune-lm-weights`` by ``--tune-word-bonuses``, the spelling settings of the options): the pair with the lowest
valid WER. Then, with that pair, the spelling settings: its WER there (lexicon and LMs from all the
training transcripts) and, to see new words, its WER on the valid sentences holding one of 60 training words
drawn at random (beyond the 100 most frequent) when lexicon and LMs come from the transcripts without them.
(The acoustic model has heard those words in training, so this overstates what it does on words it never
heard.) The defaults below are its pick: the lowest WER on the left-out words among the settings whose valid
WER is at most ``--tune-tolerance`` (0.25) points above the closed decoder's, so that the accuracy on training
words comes first (where none is, the one with the lowest valid WER).

Writes ``benchmarks/out/ctc_decoders.json`` and ``ctc_decoders.png``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import fmt, plot_lines, print_table, write_json  # noqa: E402

WORD_MARKER = "\u2581"


def _log_probs(transcriber, csv_paths: list[str], limit: int | None) -> list[dict]:
    """Per utterance: its slice (CSV stem), reference words and (T, V) CTC log-probabilities."""
    import torch

    from lobes.data.manifest import load_manifest
    from lobes.io import load_audio

    utterances = []
    for path in csv_paths:
        rows = load_manifest(path, ("wav", "wrd"))[:limit]
        for first in range(0, len(rows), 16):
            chunk = rows[first : first + 16]
            waves = [load_audio(r["wav"], transcriber.sample_rate).reshape(-1) for r in chunk]
            with torch.inference_mode():
                log_probs, lengths = transcriber._log_probs(waves)
            for row, lp, n in zip(chunk, log_probs, lengths):
                utterances.append({"slice": Path(path).stem, "ref": row["wrd"].split(), "log_probs": lp[:n]})
    return utterances


def _greedy(sp, blank: int):
    pieces = sp.get_piece_size()

    def decode(log_probs: np.ndarray) -> list[str]:
        path = log_probs[:, :pieces].argmax(-1)
        keep = (path != blank) & np.append(True, path[1:] != path[:-1])
        return sp.decode_ids(path[keep].tolist()).split()

    return decode


def _flashlight(sp, num_outputs: int, blank: int, folder: Path, lexicon_words, lm_path, options: dict):
    """torchaudio's flashlight-text decoder on (T, V) log-probs; lexicon-free when ``lexicon_words`` is None."""
    import torch
    from torchaudio.models.decoder import ctc_decoder

    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    tokens = pieces + [f"<output{i}>" for i in range(len(pieces), num_outputs)]
    tokens[blank] = "<blank>"
    lexicon = None
    if lexicon_words is not None:
        lexicon = folder / "lexicon.txt"
        lexicon.write_text("".join(f"{w} {' '.join(sp.encode_as_pieces(w))}\n" for w in lexicon_words))
        sil = tokens[-1]  # words start with "▁" in their spelling; an output the model never uses as silence
    else:
        sil = WORD_MARKER  # the word boundary, scored by the token LM like any token
    decoder = ctc_decoder(
        lexicon=str(lexicon) if lexicon else None,
        tokens=tokens,
        lm=str(lm_path),
        blank_token="<blank>",
        sil_token=sil,
        unk_word="<unk>",
        **options,
    )

    def decode(log_probs: np.ndarray) -> list[str]:
        best = decoder(torch.from_numpy(np.ascontiguousarray(log_probs, dtype=np.float32))[None])[0][0]
        if lexicon is not None:
            return list(best.words)
        return sp.decode_ids([t for t in best.tokens.tolist() if 0 <= t < len(pieces) and t != blank]).split()

    return decode


def _wer(pairs) -> float | None:
    from speechbrain.utils.edit_distance import accumulatable_wer_stats

    pairs = list(pairs)
    if not pairs:
        return None
    refs, hyps = zip(*pairs)
    return accumulatable_wer_stats(list(refs), list(hyps), collections.Counter())["WER"]


def tune_weights(sp, transcripts: list[str], valid: list[dict], grid: list[dict], settings: dict) -> list[dict]:
    """Valid WER of the open decoder (``settings``: beam, spelling, blank) at each LM weight and word bonus of
    ``grid``; lexicon and LMs from all the transcripts."""
    from lobes.decoding import CTCLexiconDecoder

    rows = []
    for weights in grid:
        decoder = CTCLexiconDecoder.from_sentencepiece(sp, transcripts, lm_order=3, **{**settings, **weights})
        rows.append({**weights, "valid": _wer((u["ref"], decoder.decode_one(u["log_probs"])) for u in valid)})
        print(rows[-1], flush=True)
    return rows


def tune(sp, transcripts: list[str], valid: list[dict], grid: list[dict], project: dict, held_out: int) -> list[dict]:
    """The open decoder's settings on the valid set: WER of its sentences (lexicon and LMs from all the
    transcripts) and of the valid sentences that hold one of ``held_out`` training words drawn at random
    (beyond the 100 most frequent) when lexicon and LMs come from the transcripts without those words."""
    from lobes.decoding import CTCLexiconDecoder

    counts = collections.Counter(w for t in transcripts for w in t.split())
    ranked = [w for w, _ in counts.most_common()]
    held = set(np.random.default_rng(0).choice(ranked[100:], size=held_out, replace=False).tolist())
    reduced = [t for t in transcripts if not set(t.split()) & held]
    new = [u for u in valid if set(u["ref"]) & held]
    print(
        f"tuning: {len(valid)} valid utterances; {len(held)} training words left out of {len(reduced)} kept "
        f"transcripts, in {len(new)} valid utterances",
        flush=True,
    )
    rows = []
    for settings in grid:
        row = dict(settings)
        for name, text, data in (("valid", transcripts, valid), ("valid, words left out", reduced, new)):
            decoder = CTCLexiconDecoder.from_sentencepiece(sp, text, lm_order=3, **{**project, **settings})
            row[name] = _wer((u["ref"], decoder.decode_one(u["log_probs"])) for u in data)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="pretrained ASR folder (python -m lobes.package)")
    parser.add_argument("--test", nargs="+", help="test CSVs (columns wav, wrd); one slice each")
    parser.add_argument("--train-csv", help="training manifest for lexicon and LMs (default: the folder's transcripts)")
    parser.add_argument("--lm", help="a word ARPA LM of your own, decoded with too")
    parser.add_argument("--limit", type=int, help="first N utterances of each CSV")
    parser.add_argument("--beam-size", type=int, default=32, help="the project's decoders")
    parser.add_argument("--lm-weight", type=float, default=1.4, help="the project's decoders (natural-log LM)")
    parser.add_argument("--word-bonus", type=float, default=4.0)
    parser.add_argument("--spelling-order", type=int, default=3)
    parser.add_argument("--unk-score", type=float, default=2.0)
    parser.add_argument("--spelling-weight", type=float, default=0.5)
    parser.add_argument("--fl-beam-size", type=int, default=50, help="flashlight")
    parser.add_argument("--fl-lm-weight", type=float, default=1.3, help="flashlight lexicon (log10 LM scores)")
    parser.add_argument("--fl-word-score", type=float, default=2.5, help="flashlight lexicon")
    parser.add_argument("--fl-free-order", type=int, default=6, help="flashlight lexicon-free token LM (<= 6)")
    parser.add_argument("--fl-free-lm-weight", type=float, default=0.1, help="flashlight lexicon-free")
    parser.add_argument("--name", default="ctc_decoders", help="output file stem under benchmarks/out/")
    parser.add_argument("--tune", metavar="VALID_CSV", help="only choose the open decoder's settings on this set")
    parser.add_argument("--tune-lm-weights", type=float, nargs="+", default=[0.8, 1.0, 1.2, 1.4, 1.6, 1.8])
    parser.add_argument("--tune-word-bonuses", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5, 4.0])
    parser.add_argument("--tune-spelling-orders", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--tune-unk-scores", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0])
    parser.add_argument("--tune-held-out", type=int, default=60, help="training words left out when tuning")
    parser.add_argument("--tune-tolerance", type=float, default=0.25, help="valid WER points given up for new words")
    args = parser.parse_args(argv)
    if not (args.test or args.tune):
        parser.error("give the test CSVs (--test) or a valid CSV to tune on (--tune)")

    import torch

    torch.set_num_threads(1)
    from lobes.data.manifest import load_manifest
    from lobes.decoding import CTCLexiconDecoder
    from lobes.inference import Transcriber
    from lobes.inference.pretrained import load_pretrained
    from lobes.lm import WordNgramLM, read_arpa

    transcriber = Transcriber.from_pretrained(args.pretrained, device="cpu")
    sp, blank = transcriber.tokenizer, transcriber.encoder.blank_index
    if args.train_csv:
        transcripts = [r["wrd"] for r in load_manifest(args.train_csv, ("wrd",))]
    else:
        hparams, _ = load_pretrained(args.pretrained, kind="asr")
        if hparams.get("transcripts") is None:
            parser.error(f"{args.pretrained} carries no training transcripts; pass --train-csv")
        transcripts = hparams["transcripts"].sentences
    transcripts = [t for t in transcripts if t.strip()]
    train_words = sorted({w for t in transcripts for w in t.split()})

    project = dict(beam_size=args.beam_size, lm_weight=args.lm_weight, word_bonus=args.word_bonus, blank_index=blank)
    spelling = dict(spelling_order=args.spelling_order, unk_score=args.unk_score, spelling_weight=args.spelling_weight)
    if args.tune:
        valid = _log_probs(transcriber, [args.tune], args.limit)
        weight_grid = [{"lm_weight": w, "word_bonus": b} for w in args.tune_lm_weights for b in args.tune_word_bonuses]
        weight_rows = tune_weights(sp, transcripts, valid, weight_grid, {**project, **spelling})
        print_table([{k: fmt(v, ".2f") for k, v in r.items()} for r in weight_rows], list(weight_rows[0]))
        weights = min(weight_rows, key=lambda r: r["valid"])
        project.update(lm_weight=weights["lm_weight"], word_bonus=weights["word_bonus"])
        print(f"weights (the lowest valid WER of the open decoder): {weights}")
        grid = [
            {"spelling_order": 0},
            *(
                {"spelling_order": o, "unk_score": u, "spelling_weight": args.spelling_weight}
                for o in args.tune_spelling_orders
                for u in args.tune_unk_scores
            ),
        ]
        rows = tune(sp, transcripts, valid, grid, project, args.tune_held_out)
        table = print_table(
            [{k: fmt(v, ".2f") if isinstance(v, float) else v for k, v in r.items()} for r in rows], list(rows[-1])
        )
        limit = rows[0]["valid"] + args.tune_tolerance  # rows[0]: the closed decoder
        close = [r for r in rows[1:] if r["valid"] <= limit]
        if close:
            pick = min(close, key=lambda r: r["valid, words left out"])
            print(f"pick (valid WER <= {limit:.2f}, then the lowest WER on the left-out words): {pick}")
        else:
            pick = min(rows[1:], key=lambda r: (r["valid"], r["valid, words left out"]))
            print(f"pick (no setting has a valid WER <= {limit:.2f}; the lowest valid WER): {pick}")
        payload = {
            "valid": args.tune,
            "settings": project,
            "weight_rows": weight_rows,
            "weights": weights,
            "rows": rows,
            "table": table,
            "pick": pick,
        }
        print(f"JSON: {write_json(args.name + '_tune', payload)}")
        return {"rows": rows}

    t0 = time.perf_counter()
    utterances = _log_probs(transcriber, args.test, args.limit)
    print(f"CTC log-probabilities of {len(utterances)} utterances: {time.perf_counter() - t0:.1f} s", flush=True)
    num_outputs = utterances[0]["log_probs"].shape[1]

    fl_lexicon = dict(beam_size=args.fl_beam_size, lm_weight=args.fl_lm_weight, word_score=args.fl_word_score)
    fl_free = dict(beam_size=args.fl_beam_size, lm_weight=args.fl_free_lm_weight)
    work = Path(tempfile.mkdtemp(prefix="ctc_decoders_"))
    word_arpa = WordNgramLM(transcripts, order=3).write_arpa(work / "words3.arpa")
    token_arpa = WordNgramLM(
        (" ".join(sp.encode_as_pieces(t)) for t in transcripts),
        order=args.fl_free_order,
        vocabulary=[sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)],
    ).write_arpa(work / f"tokens{args.fl_free_order}.arpa")

    # name -> (builder, lexicon words or None for open / lexicon-free decoding, settings)
    former = {**project, "beam_size": 16}  # the recipe's former test decoder
    candidates = {
        "greedy": (lambda: _greedy(sp, blank), None, {}),
        "lexicon, beam 16": (
            lambda: CTCLexiconDecoder.from_sentencepiece(sp, transcripts, lm_order=3, **former).decode_one,
            train_words,
            former,
        ),
        "lexicon": (
            lambda: CTCLexiconDecoder.from_sentencepiece(sp, transcripts, lm_order=3, **project).decode_one,
            train_words,
            project,
        ),
        "open": (
            lambda: CTCLexiconDecoder.from_sentencepiece(sp, transcripts, lm_order=3, **project, **spelling).decode_one,
            train_words,
            {**project, **spelling},
        ),
        "flashlight lexicon": (
            lambda: _flashlight(sp, num_outputs, blank, work, train_words, word_arpa, fl_lexicon),
            train_words,
            fl_lexicon,
        ),
        "flashlight lexicon-free": (
            lambda: _flashlight(sp, num_outputs, blank, work, None, token_arpa, fl_free),
            None,
            {**fl_free, "token_lm_order": args.fl_free_order},
        ),
    }
    if args.lm:
        user_words = [w for w in read_arpa(args.lm).words if sp.unk_id() not in sp.encode_as_ids(w)]
        candidates["open, --lm"] = (
            lambda: (
                CTCLexiconDecoder.from_sentencepiece(sp, transcripts, lm_path=args.lm, **project, **spelling).decode_one
            ),
            user_words,
            {**project, **spelling, "lm_path": args.lm},
        )
        candidates["flashlight lexicon, --lm"] = (
            lambda: _flashlight(sp, num_outputs, blank, work, user_words, args.lm, fl_lexicon),
            user_words,
            {**fl_lexicon, "lm": args.lm},
        )

    slices = list(dict.fromkeys(u["slice"] for u in utterances))
    rows, results = [], {}
    for name, (build, lexicon, settings) in candidates.items():
        t0 = time.perf_counter()
        decode = build()
        build_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.thread_time()
        hyps = [decode(u["log_probs"]) for u in utterances]
        seconds, cpu_seconds = time.perf_counter() - t0, time.thread_time() - c0
        known = set(lexicon if lexicon is not None else train_words)
        with_oov = [i for i, u in enumerate(utterances) if any(w not in known for w in u["ref"])]
        words = [w for u in utterances for w in u["ref"]]
        result = {
            "settings": settings,
            "wer": _wer((u["ref"], h) for u, h in zip(utterances, hyps)),
            "wer_by_slice": {
                s: _wer((u["ref"], h) for u, h in zip(utterances, hyps) if u["slice"] == s) for s in slices
            },
            "wer_utterances_with_oov": _wer((utterances[i]["ref"], hyps[i]) for i in with_oov),
            "utterances_with_oov": len(with_oov),
            "oov_word_share": sum(w not in known for w in words) / max(len(words), 1),
            "oov_words_emitted": sum(w not in known for h in hyps for w in h),
            "oov_words_recognised": sum(
                sum((collections.Counter(w for w in u["ref"] if w not in known) & collections.Counter(h)).values())
                for u, h in zip(utterances, hyps)
            ),
            "oov_words_in_references": sum(w not in known for w in words),
            "utterances_per_s": len(utterances) / cpu_seconds,
            "utterances_per_s_wall": len(utterances) / seconds,
            "build_s": build_s,
        }
        results[name] = result
        row = {"decoder": name, "WER %": fmt(result["wer"], ".2f")}
        row.update({f"{s} %": fmt(result["wer_by_slice"][s], ".2f") for s in slices})
        row.update(
            {
                "OOV utts %": fmt(result["wer_utterances_with_oov"], ".2f"),
                "OOV words": f"{100 * result['oov_word_share']:.1f} %",
                "OOV right": f"{result['oov_words_recognised']}/{result['oov_words_in_references']}",
                "new emitted": result["oov_words_emitted"],
                "utt/s": fmt(result["utterances_per_s"], ".1f"),
                "build s": fmt(build_s, ".1f"),
            }
        )
        rows.append(row)
        print(f"{name}: WER {fmt(result['wer'], '.2f')} %, {fmt(result['utterances_per_s'], '.1f')} utt/s", flush=True)
    print()
    table = print_table(rows, list(rows[0]))
    payload = {
        "pretrained": str(args.pretrained),
        "test": args.test,
        "utterances": {s: sum(u["slice"] == s for u in utterances) for s in slices},
        "training_transcripts": len(transcripts),
        "lexicon_words": len(train_words),
        "threads": 1,
        "results": results,
        "table": table,
    }
    print(f"JSON: {write_json(args.name, payload)}")
    names = list(results)
    wer_series = {"all": [results[n]["wer"] for n in names]}
    wer_series.update({s: [results[n]["wer_by_slice"][s] for n in names] for s in slices})
    wer_series["with OOV word"] = [results[n]["wer_utterances_with_oov"] for n in names]
    png = plot_lines(
        args.name,
        names,
        {  # greedy (tens of thousands per second) left out of the speed panel, which it would flatten
            "wer": wer_series,
            "speed": {"utterances / s": [None if n == "greedy" else results[n]["utterances_per_s"] for n in names]},
        },
        xlabel="decoder",
        ylabels=("WER %", "utterances / s (1 thread)"),
        panels=("wer", "speed"),
        title="CTC decoders on the same log-probabilities",
        logy=False,
    )
    print(f"PNG: {png}")
    return payload


if __name__ == "__main__":
    main()
