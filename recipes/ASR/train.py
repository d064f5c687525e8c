#!/usr/bin/env python3
"""Train a CTC (+ attention) ASR model whose encoder is chosen by the YAML file.

    python recipes/ASR/train.py recipes/ASR/hparams/hyperconformer.yaml
    python recipes/ASR/train.py recipes/ASR/hparams/conformer.yaml --number_of_epochs=2
    python recipes/ASR/train.py recipes/ASR/hparams/hyperconformer.yaml --debug
    cd recipes/ASR && python train.py hparams/primer.yaml
    torchrun --nproc_per_node=2 recipes/ASR/train.py recipes/ASR/hparams/hyperconformer.yaml

Each model file (``hparams/<model>.yaml``) extends ``hparams/_base.yaml``, which holds every other setting;
the YAML is read by ``lobes.recipe.load_hparams``. Relative paths in the YAML are written from ``<root>``, the
repository root (the folder holding ``recipes/``), so the command runs the same from any working directory;
a relative path given on the command line is taken from the current directory.

The data come from the YAML's ``prepare`` (default: the embedded corpus, synthesized offline with espeak-ng,
test voices unseen in training; LibriSpeech and CSV alternatives are in ``_base.yaml``). ``--debug`` runs a few
steps on a corpus of a few dozen utterances synthesized in a folder of its own (``<data_folder>_debug``) and
writes under ``results/debug/``. On CPU, ``cpu_processes: N`` (YAML or ``--cpu_processes=N``) makes the plain
``python`` command start N data-parallel workers itself (DDP over gloo, the cores shared out among them), as
``torchrun`` would.

The test WER goes to ``<output_folder>/wer.txt`` (per-utterance details) and ``<output_folder>/test_wer.txt``
(the number); training curves to ``<output_folder>/curves.png`` and ``history.json``; the resolved settings to
``<output_folder>/hyperparams.yaml``.
"""

import functools
import logging
import os
import sys
from pathlib import Path

import speechbrain as sb
import speechbrain.utils.distributed
import torch
from speechbrain.tokenizers.SentencePiece import SentencePiece

from lobes.io import atomic_open, atomic_write_text, load_audio
from lobes.recipe import (
    TrainingHistory,
    guard_checkpoints,
    load_hparams,
    prepare_on_main,
    resolve_training_precision,
    save_hyperparams,
    set_schedule_length,
    spawn_workers_if_asked,
    unwrap_ddp,
    world_size,
    write_pretrained,
)
from lobes.recipe.streaming import chunk_kwargs, evaluate_chunk_sizes

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
"""``<root>`` of the YAML files: the folder holding ``recipes/``."""


class ASR(sb.Brain):
    """CTC / joint CTC-attention training; greedy or beam-search CTC decoding for validation and test."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos = batch.tokens_bos[0] if self.hparams.ctc_weight < 1.0 else None
        feature_augment = None
        if stage == sb.Stage.TRAIN:
            if self.hparams.wav_augment is not None:
                wavs, wav_lens = self.hparams.wav_augment(wavs, wav_lens)
            feature_augment = self.hparams.fea_augment
        # streaming models: the chunk configuration of this batch (lobes.recipe.streaming; {} for the others)
        chunking = chunk_kwargs(self, stage)
        return self.modules.model(wavs, wav_lens, tokens_bos, feature_augment=feature_augment, **chunking)

    def on_fit_start(self):
        super().on_fit_start()
        self.intermediate = None  # the tapped layer's output of the current training batch
        model = unwrap_ddp(self.modules.model)
        weight, index = self.hparams.intermediate_ctc_weight, self.hparams.intermediate_ctc_layer
        layer = intermediate_ctc_layer(model, weight, index)
        if layer is not None:
            layer.register_forward_hook(self._keep_intermediate)
            logger.info(
                "intermediate CTC: weight %s on the output of encoder layer %d of %d",
                weight,
                index,
                len(model.encoder.layers),
            )

    def _keep_intermediate(self, layer, inputs, output):
        if layer.training:
            self.intermediate = output[0] if isinstance(output, tuple) else output  # (B, T', D)

    def compute_objectives(self, predictions, batch, stage):
        ctc_lp, enc_lens, seq_lp = predictions
        tokens, token_lens = batch.tokens
        rel_lens = enc_lens.float() / ctc_lp.shape[1]
        loss = self.hparams.ctc_cost(ctc_lp, tokens, rel_lens, token_lens)
        if stage == sb.Stage.TRAIN and self.hparams.intermediate_ctc_weight > 0:
            # intermediate CTC (Lee & Watanabe, 2021): the same CTC head on a middle layer's output
            inter_lp = unwrap_ddp(self.modules.model).ctc_log_probs(self.intermediate)
            self.intermediate = None
            weight = self.hparams.intermediate_ctc_weight
            loss = (1 - weight) * loss + weight * self.hparams.ctc_cost(inter_lp, tokens, rel_lens, token_lens)
        if seq_lp is not None:
            tokens_eos, eos_lens = batch.tokens_eos
            seq_loss = self.hparams.seq_cost(seq_lp, tokens_eos, length=eos_lens)
            loss = self.hparams.ctc_weight * loss + (1 - self.hparams.ctc_weight) * seq_loss
        if stage != sb.Stage.TRAIN:
            refs = [w.split() for w in batch.wrd]
            greedy = self.greedy_words(ctc_lp, enc_lens)
            hyps = self.search(ctc_lp, enc_lens) if stage == sb.Stage.TEST else greedy
            self.wer_metric.append(batch.id, hyps, refs)
            if hyps is not greedy:
                self.extra_metrics["greedy"].append(batch.id, greedy, refs)
            if self.lexicon is not None:
                self.extra_metrics["lexicon"].append(batch.id, [self.lexicon(h) for h in greedy], refs)
        return loss

    def greedy_words(self, ctc_lp, enc_lens):
        """Words per utterance from the best CTC path over the tokenizer's pieces (``output_neurons`` may exceed
        them: outputs that no training target uses are left out, as the inference interfaces do)."""
        from lobes.asr import ctc_greedy_decode

        pieces = self.tokenizer.sp.get_piece_size()
        return [
            self.tokenizer.sp.decode_ids(h).split()
            for h in ctc_greedy_decode(ctc_lp[..., :pieces], enc_lens, self.hparams.blank_index)
        ]

    def search(self, ctc_lp, enc_lens):
        """Test-time words: the YAML's ``test_decoder`` (lexicon + word LM), else speechbrain's CTC beam
        search when ``test_beam_size`` > 1, else greedy."""
        if self.test_decoder is not None:
            return self.test_decoder(ctc_lp, enc_lens)
        if self.ctc_beam is not None:
            pieces = self.tokenizer.sp.get_piece_size()  # the searcher's vocabulary: the tokenizer's pieces
            hyps = self.ctc_beam(ctc_lp[..., :pieces], enc_lens.float() / ctc_lp.shape[1])
            return [h[0].text.split() for h in hyps]
        return self.greedy_words(ctc_lp, enc_lens)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.lr_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.extra_metrics = {
                "greedy": self.hparams.error_rate_computer(),
                "lexicon": self.hparams.error_rate_computer(),
            }

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["WER"] = self.wer_metric.summarize("error_rate")
        extras = {name: m for name, m in self.extra_metrics.items() if m.scores}
        for name, metric in extras.items():
            stats[f"{name}_WER"] = metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            lr = self.hparams.lr_annealing.current_lr
            self.hparams.train_logger.log_stats(
                {"epoch": epoch, "lr": lr}, train_stats=self.train_stats, valid_stats=stats
            )
            self.checkpointer.save_and_keep_only(
                meta={"WER": stats["WER"], "epoch": epoch}, min_keys=["WER"], num_to_keep=self.hparams.keep_checkpoints
            )
            self.history.record(
                epoch, train_loss=self.train_stats["loss"], valid_loss=stage_loss, valid_wer=stats["WER"]
            )
        else:
            test_set = getattr(self, "test_set", "test")
            self.hparams.train_logger.log_stats(
                {"Epoch loaded": self.hparams.epoch_counter.current, "test set": test_set}, test_stats=stats
            )
            # the slices tested into this output folder so far (a later evaluate elsewhere starts afresh)
            tested = getattr(self, "tested", {})
            tested = (
                tested if tested.get("folder") == self.hparams.output_folder else {"folder": self.hparams.output_folder}
            )
            tested[test_set] = (self.wer_metric, extras)
            self.tested = tested
            if sb.utils.distributed.if_main_process():
                sets = {k: v for k, v in tested.items() if k != "folder"}
                write_test_wers(
                    self.hparams.wer_file, self.hparams.output_folder, sets, getattr(self, "lexicon_words", None)
                )


def intermediate_ctc_layer(model, weight: float, index: int):
    """The encoder layer of ``model`` whose output intermediate CTC scores (``index`` counted from 1), or None when
    ``weight`` is 0; a ``ValueError`` when the encoder has no such layer before its last."""
    if weight <= 0:
        return None
    layers = model.encoder.layers
    if not 1 <= index < len(layers):
        raise ValueError(
            f"intermediate_ctc_layer must name an encoder layer before the last, 1 to {len(layers) - 1} "
            f"(the encoder has {len(layers)} layers); got {index}. intermediate_ctc_weight: 0 trains without "
            "intermediate CTC"
        )
    return layers[index - 1]


TEST_WER_NAMES = {"greedy": "greedy", "lexicon": "lexicon-corrected"}
TEST_SET_NAMES = {"test": "", "test_new_words": "new words"}  # prefix of a slice's lines in test_wer.txt


def out_of_lexicon_figures(metrics, lexicon_words):
    """(share of reference words not in ``lexicon_words`` in %, WER of the utterances holding one or None)
    over the per-utterance scores of speechbrain ``ErrorRateStats`` objects."""
    words = missing = edits = ref_words = 0
    for metric in metrics:
        for score in metric.scores:
            absent = sum(w not in lexicon_words for w in score["ref_tokens"])
            words += len(score["ref_tokens"])
            missing += absent
            if absent:
                edits += score["num_edits"]
                ref_words += score["num_ref_tokens"]
    return 100.0 * missing / max(words, 1), (100.0 * edits / ref_words if ref_words else None)


def write_test_wers(wer_file, output_folder, sets, lexicon_words=None):
    """Per-utterance details and the summary ``test_wer.txt`` of the tested slices ``sets``
    (``{slice: (metric, {name: extra_metric})}``, ``test`` and optionally ``test_new_words``).

    ``wer_file`` (``wer_new_words.txt`` for the new-words slice) and ``<stem>_<name><ext>`` for the extra
    decodings hold the alignments. ``test_wer.txt``: first line the test WER of the YAML's decoding, then
    ``greedy: X`` (``lexicon-corrected: X``), the same for the new-words slice (``new words: X``,
    ``new words greedy: X``) and, given the decoder's lexicon, ``out-of-lexicon words %: X`` (share of the
    test words of all slices that the lexicon lacks) and ``utterances with an out-of-lexicon word: X``."""
    summary = ""
    stem, ext = os.path.splitext(wer_file)
    for test_set, (metric, extras) in sets.items():
        prefix = TEST_SET_NAMES[test_set]
        suffix = f"_{test_set.removeprefix('test_')}" if prefix else ""
        with atomic_open(f"{stem}{suffix}{ext}", "w") as f:
            metric.write_stats(f)
        wer = f"{metric.summarize('error_rate'):.2f}"
        summary += f"{prefix}: {wer}\n" if prefix else f"{wer}\n"
        for name, extra in extras.items():
            with atomic_open(f"{stem}{suffix}_{name}{ext}", "w") as f:
                extra.write_stats(f)
            label = f"{prefix} {TEST_WER_NAMES[name]}" if prefix else TEST_WER_NAMES[name]
            summary += f"{label}: {extra.summarize('error_rate'):.2f}\n"
    if lexicon_words:
        share, wer = out_of_lexicon_figures([metric for metric, _ in sets.values()], lexicon_words)
        summary += f"out-of-lexicon words %: {share:.2f}\n"
        if wer is not None:
            summary += f"utterances with an out-of-lexicon word: {wer:.2f}\n"
    atomic_write_text(os.path.join(output_folder, "test_wer.txt"), summary)


def prepare_noise(hparams):
    """Synthesize the noise clips used by AddNoise, next to ``noise_csv`` (only when the YAML asks for them)."""
    if not hparams.get("noise_csv"):
        return
    from lobes.data.noise import prepare_noise_corpus

    folder, name = os.path.split(hparams["noise_csv"])
    if name != "noise.csv":
        raise ValueError(
            f"noise_csv must end in noise.csv (the clips are synthesized beside it); got {hparams['noise_csv']}"
        )
    prepare_on_main(
        functools.partial(prepare_noise_corpus, folder, num=hparams["num_noise"], seed=hparams["corpus_seed"])
    )


def build_tokenizer(hparams, train_csv):
    """The SentencePiece tokenizer of ``token_type`` trained on the ``wrd`` column of ``train_csv`` (or loaded from
    ``save_folder``); a ``ValueError`` when it has more tokens than ``output_neurons``."""
    tokenizer = SentencePiece(
        model_dir=hparams["save_folder"],
        vocab_size=hparams["output_neurons"],
        annotation_train=train_csv,
        annotation_read="wrd",
        model_type=hparams["token_type"],
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=hparams["unk_index"],
    )
    if tokenizer.sp.get_piece_size() > hparams["output_neurons"]:
        raise ValueError(
            f"the tokenizer has {tokenizer.sp.get_piece_size()} tokens but output_neurons is "
            f"{hparams['output_neurons']}; raise output_neurons"
        )
    return tokenizer


def dataio_prepare(hparams, manifests, tokenizer):
    """Datasets with the pipelines ``sig`` (16 kHz waveform) and ``tokens_bos``, ``tokens_eos``, ``tokens``."""
    from lobes.data.manifest import check_manifest

    datasets = {}
    for split in ("train", "valid", "test", "test_new_words"):
        if split not in manifests:  # test_new_words: only the embedded corpus has it
            continue
        check_manifest(manifests[split], ["ID", "duration", "wav", "wrd"])
        ds = sb.dataio.dataset.DynamicItemDataset.from_csv(manifests[split])
        if split == "train":
            ds = ds.filtered_sorted(key_max_value={"duration": hparams["max_duration"]}, sort_key="duration")
        else:
            ds = ds.filtered_sorted(sort_key="duration", reverse=True)
        datasets[split] = ds

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav, hparams["sample_rate"])  # mono, resampled when the file has another rate

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens_bos", "tokens_eos", "tokens")
    def text_pipeline(wrd):
        yield wrd
        ids = tokenizer.sp.encode_as_ids(wrd)
        yield torch.LongTensor([hparams["bos_index"]] + ids)
        yield torch.LongTensor(ids + [hparams["eos_index"]])
        yield torch.LongTensor(ids)

    sets = list(datasets.values())
    sb.dataio.dataset.add_dynamic_item(sets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(sets, text_pipeline)
    sb.dataio.dataset.set_output_keys(sets, ["id", "sig", "wrd", "tokens_bos", "tokens_eos", "tokens"])
    return datasets


def length_bucketed_loader(hparams, train_set, loader_kwargs):
    """Loader options whose batches group utterances of similar duration (speechbrain's
    ``DynamicBatchSampler``): about ``max_batch_len`` seconds of audio per batch, little padding."""
    from speechbrain.dataio.sampler import DynamicBatchSampler

    sampler = DynamicBatchSampler(
        train_set,
        max_batch_length=hparams["max_batch_len"],
        num_buckets=hparams["num_buckets"],
        length_func=lambda x: float(x["duration"]),
        shuffle=True,
        batch_ordering="random",
        seed=hparams["seed"],
    )
    kept = {k: v for k, v in loader_kwargs.items() if k not in ("batch_size", "shuffle", "sampler", "drop_last")}
    return {**kept, "batch_sampler": sampler}


def build_test_decoding(hparams, asr, tokenizer, train_csv):
    """The YAML's test-time decoders, given the tokenizer and the training transcripts: ``test_decoder``
    (lexicon + word LM), the optional ``lexicon_correction`` and, with ``test_decoder: null`` and
    ``test_beam_size`` > 1, speechbrain's CTC beam search."""
    from lobes.data.manifest import load_manifest

    asr.lexicon, asr.test_decoder, asr.ctc_beam = None, hparams["test_decoder"], None
    transcripts = [row["wrd"] for row in load_manifest(train_csv, ("wrd",))]
    asr.lexicon_words = {word for line in transcripts for word in line.split()}  # for the out-of-lexicon figures
    if hparams["lexicon_correction"] or asr.test_decoder is not None:
        if hparams["lexicon_correction"]:
            from lobes.asr import LexiconCorrector

            asr.lexicon = LexiconCorrector.from_transcripts(transcripts)
        if asr.test_decoder is not None:  # lexicon and word LM from the training transcripts
            asr.test_decoder.fit(tokenizer.sp, transcripts)
    if hparams["test_beam_size"] > 1:
        from speechbrain.decoders.ctc import CTCBeamSearcher

        # word boundaries of SentencePiece pieces become spaces, so the searcher's text splits into words
        vocab = [tokenizer.sp.id_to_piece(i).replace("\u2581", " ") for i in range(tokenizer.sp.get_piece_size())]
        asr.ctc_beam = CTCBeamSearcher(
            blank_index=hparams["blank_index"], vocab_list=vocab, beam_size=hparams["test_beam_size"]
        )


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)  # no-op unless launched with torchrun
    hparams = load_hparams(hparams_file, overrides, debug=run_opts.get("debug", False), root=REPOSITORY_ROOT)
    run_opts = resolve_training_precision(hparams, run_opts)  # fp32 where the CPU only emulates bf16
    # settings that do not fit the model: refused before any data is prepared
    if hparams["ctc_weight"] < 1.0 and hparams["model"].decoder is None:
        raise ValueError("ctc_weight < 1 needs an attention decoder: pick a preset with one or set ctc_weight: 1.0")
    intermediate_ctc_layer(hparams["model"], hparams["intermediate_ctc_weight"], hparams["intermediate_ctc_layer"])
    status = spawn_workers_if_asked(__file__, argv, hparams, run_opts)  # plain `python train.py` on CPU
    if status is not None:
        sys.exit(status)
    sb.create_experiment_directory(hparams["output_folder"])
    save_hyperparams(hparams, hparams["output_folder"])

    manifests = prepare_on_main(hparams["prepare"])  # {"train", "valid", "test"}: CSV paths
    prepare_noise(hparams)

    tokenizer = build_tokenizer(hparams, manifests["train"])
    datasets = dataio_prepare(hparams, manifests, tokenizer)

    guard_checkpoints(hparams["checkpointer"])
    asr = ASR(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr.tokenizer = tokenizer
    asr.history = TrainingHistory(hparams["output_folder"], "valid_wer", "valid WER (%)")
    if asr.distributed_launch:
        logger.info("data-parallel training over %d processes", world_size())
    build_test_decoding(hparams, asr, tokenizer, manifests["train"])
    train_loader_kwargs = dict(hparams["train_dataloader_opts"])
    if hparams.get("dynamic_batching", False):
        train_loader_kwargs = length_bucketed_loader(hparams, datasets["train"], train_loader_kwargs)
        if not asr.distributed_launch:  # under DDP, speechbrain wraps it and calls set_epoch itself
            asr.train_sampler = train_loader_kwargs["batch_sampler"]  # reshuffled every epoch
    set_schedule_length(
        hparams["lr_annealing"], asr, datasets["train"], train_loader_kwargs, hparams["number_of_epochs"]
    )
    n_params = sum(p.numel() for p in hparams["model"].parameters())
    logger.info("model: %.2f M parameters", n_params / 1e6)

    asr.fit(
        asr.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=train_loader_kwargs,
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    for test_set in ("test", "test_new_words"):  # test_new_words: sentences holding words training never had
        if test_set in datasets:
            asr.test_set = test_set
            asr.evaluate(datasets[test_set], min_key="WER", test_loader_kwargs=hparams["test_dataloader_opts"])
    asr.test_set = "test"
    # streaming models: the test again per chunk size of test_chunk_ms (lobes.recipe.streaming; no-op otherwise)
    evaluate_chunk_sizes(asr, datasets["test"], hparams, hparams["test_dataloader_opts"])

    # --- Inference folder ---------------------------------------------------------------------------------
    # <output_folder>/pretrained/: hyperparams.yaml + loadables for speechbrain's EncoderASR (greedy CTC), a
    # foreign_class interface with the test decoder (lexicon + word LM), the tokenizer and a README.md.
    write_pretrained(asr, hparams["output_folder"])


if __name__ == "__main__":
    main(sys.argv[1:])
