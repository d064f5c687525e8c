#!/usr/bin/env python3
"""Train a CTC (+ attention) ASR model whose encoder is chosen by the YAML file.

    python recipes/ASR/train.py recipes/ASR/hparams/hyperconformer.yaml
    python recipes/ASR/train.py recipes/ASR/hparams/conformer.yaml --number_of_epochs=2
    torchrun --nproc_per_node=2 recipes/ASR/train.py recipes/ASR/hparams/hyperconformer.yaml

On CPU, ``cpu_processes: N`` (YAML or ``--cpu_processes=N``) makes the plain ``python`` command start N
data-parallel workers itself (DDP over gloo, the cores shared out among them), as ``torchrun`` would.

``dataset: embedded`` (default) synthesizes an offline corpus with espeak-ng (test voices unseen in
training), ``librispeech`` reads a LibriSpeech layout, ``csv`` reads any CSVs with ``ID, duration, wav,
wrd``. The test WER goes to ``<output_folder>/wer.txt`` (per-utterance details) and
``<output_folder>/test_wer.txt`` (the number); training curves to ``<output_folder>/curves.png``.
"""

import json
import logging
import math
import os
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.tokenizers.SentencePiece import SentencePiece
import speechbrain.utils.distributed
from speechbrain.utils.distributed import if_main_process, run_on_main

from lobes.checkpoints import mark_complete_on_save, remove_incomplete_checkpoints
from lobes.launch import should_spawn, spawn_cpu_workers
from lobes.data.manifest import atomic_write_text

logger = logging.getLogger(__name__)

DATASETS = ("embedded", "librispeech", "csv")


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
        return self.modules.model(wavs, wav_lens, tokens_bos, feature_augment=feature_augment)

    def compute_objectives(self, predictions, batch, stage):
        ctc_lp, enc_lens, seq_lp = predictions
        tokens, token_lens = batch.tokens
        loss = self.hparams.ctc_cost(ctc_lp, tokens, enc_lens.float() / ctc_lp.shape[1], token_lens)
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
        """Words per utterance from the best CTC path."""
        from lobes.asr import ctc_greedy_decode

        return [self.tokenizer.sp.decode_ids(h).split() for h in
                ctc_greedy_decode(ctc_lp, enc_lens, self.hparams.blank_index)]

    def search(self, ctc_lp, enc_lens):
        """Test-time words: the YAML's ``test_decoder`` (lexicon + word LM), else speechbrain's CTC beam
        search when ``test_beam_size`` > 1, else greedy."""
        if self.test_decoder is not None:
            return self.test_decoder(ctc_lp, enc_lens)
        if self.ctc_beam is not None:
            hyps = self.ctc_beam(ctc_lp, enc_lens.float() / ctc_lp.shape[1])
            return [h[0].text.split() for h in hyps]
        return self.greedy_words(ctc_lp, enc_lens)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.lr_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.extra_metrics = {"greedy": self.hparams.error_rate_computer(),
                                  "lexicon": self.hparams.error_rate_computer()}

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
            self.hparams.train_logger.log_stats({"epoch": epoch, "lr": lr}, train_stats=self.train_stats,
                                                valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta={"WER": stats["WER"], "epoch": epoch}, min_keys=["WER"],
                                                 num_to_keep=self.hparams.keep_checkpoints)
            if if_main_process():
                update_curves(self.hparams.output_folder, epoch, self.train_stats["loss"], stage_loss, stats["WER"])
        else:
            self.hparams.train_logger.log_stats({"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stats)
            if if_main_process():
                write_test_wers(self.hparams.wer_file, self.hparams.output_folder, self.wer_metric, extras)


TEST_WER_NAMES = {"greedy": "greedy", "lexicon": "lexicon-corrected"}


def write_test_wers(wer_file, output_folder, metric, extras):
    """Per-utterance details to ``wer_file`` (and ``<stem>_<name><ext>`` for the extra decodings); the test
    WER to ``test_wer.txt``: first line the YAML's decoding, then ``greedy: X`` / ``lexicon-corrected: X``."""
    with open(wer_file, "w") as f:
        metric.write_stats(f)
    summary = f"{metric.summarize('error_rate'):.2f}\n"
    stem, ext = os.path.splitext(wer_file)
    for name, extra in extras.items():
        with open(f"{stem}_{name}{ext}", "w") as f:
            extra.write_stats(f)
        summary += f"{TEST_WER_NAMES[name]}: {extra.summarize('error_rate'):.2f}\n"
    atomic_write_text(os.path.join(output_folder, "test_wer.txt"), summary)


def update_curves(output_folder, epoch, train_loss, valid_loss, valid_wer):
    """Record one epoch in ``history.json`` and redraw ``curves.png`` (loss and valid WER per epoch)."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(output_folder, "history.json")
    history = json.load(open(path)) if os.path.exists(path) else {}
    history[str(epoch)] = {"train_loss": float(train_loss), "valid_loss": float(valid_loss), "valid_wer": valid_wer}
    atomic_write_text(path, json.dumps(history, indent=1))
    epochs = sorted(int(e) for e in history)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [history[str(e)]["train_loss"] for e in epochs], marker="o", label="train")
    ax1.plot(epochs, [history[str(e)]["valid_loss"] for e in epochs], marker="o", label="valid")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(epochs, [history[str(e)]["valid_wer"] for e in epochs], marker="o", color="C2")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("valid WER (%)"), ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = os.path.join(output_folder, ".curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, os.path.join(output_folder, "curves.png"))


def prepare_manifests(hparams):
    """Return ``{"train", "valid", "test"}`` CSV paths for ``hparams["dataset"]`` (idempotent)."""
    dataset = hparams["dataset"]
    if dataset == "embedded":
        from lobes.data.speech import prepare_speech_corpus

        return prepare_speech_corpus(hparams["data_folder"], num_train=hparams["num_train"],
                                     num_valid=hparams["num_valid"], num_test=hparams["num_test"],
                                     seed=hparams["corpus_seed"])
    if dataset == "librispeech":
        from lobes.data.librispeech import prepare_librispeech

        return prepare_librispeech(hparams["data_folder"], hparams["output_folder"], hparams["train_splits"],
                                   hparams["dev_splits"], hparams["test_splits"], skip_prep=hparams["skip_prep"])
    if dataset == "csv":
        paths = {"train": hparams["train_csv"], "valid": hparams["valid_csv"], "test": hparams["test_csv"]}
        for split, path in paths.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{split}_csv not found: {path} (a CSV with columns ID, duration, wav, wrd)")
        return paths
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")


def prepare_noise(hparams):
    """Synthesize the noise clips used by AddNoise (only when the YAML asks for them)."""
    if hparams.get("noise_csv"):
        from lobes.data.noise import prepare_noise_corpus

        prepare_noise_corpus(os.path.dirname(hparams["noise_csv"]), num=hparams["num_noise"],
                             seed=hparams["corpus_seed"])


def dataio_prepare(hparams, manifests, tokenizer):
    """Datasets with the pipelines ``sig`` (16 kHz waveform) and ``tokens_bos``, ``tokens_eos``, ``tokens``."""
    from lobes.data.manifest import check_manifest

    datasets = {}
    for split in ("train", "valid", "test"):
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
        sig, sr = sb.dataio.audio_io.load(wav)
        if sr != hparams["sample_rate"]:
            raise ValueError(f"expected {hparams['sample_rate']} Hz audio, got {sr} Hz ({wav})")
        return sig if sig.dim() == 1 else sig.mean(0)

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

    sampler = DynamicBatchSampler(train_set, max_batch_length=hparams["max_batch_len"],
                                  num_buckets=hparams["num_buckets"], length_func=lambda x: float(x["duration"]),
                                  shuffle=True, batch_ordering="random", seed=hparams["seed"])
    kept = {k: v for k, v in loader_kwargs.items() if k not in ("batch_size", "shuffle", "sampler", "drop_last")}
    return {**kept, "batch_sampler": sampler}


def set_schedule_length(hparams, asr, train_set, loader_kwargs):
    """Give a schedule that needs the run's length (``total_steps: null``) its number of optimizer steps."""
    scheduler = hparams["lr_annealing"]
    if not hasattr(scheduler, "set_total_steps") or getattr(scheduler, "total_steps", None) is not None:
        return
    sampler = loader_kwargs.get("batch_sampler")
    batches = len(sampler) if sampler is not None else math.ceil(len(train_set) / loader_kwargs["batch_size"])
    if asr.distributed_launch:  # each process sees its share of the batches
        batches = math.ceil(batches / torch.distributed.get_world_size())
    steps = math.ceil(batches / asr.grad_accumulation_factor) * hparams["number_of_epochs"]
    scheduler.set_total_steps(steps)
    logger.info("learning-rate schedule: %d optimizer steps", steps)


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)  # no-op unless launched with torchrun
    with open(hparams_file) as f:
        hparams = load_hyperpyyaml(f, overrides)
    if should_spawn(hparams.get("cpu_processes", 1), run_opts):  # plain `python train.py` on CPU: DDP workers
        sys.exit(spawn_cpu_workers(os.path.abspath(__file__), argv, hparams["cpu_processes"]))
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file,
                                   overrides=overrides)

    run_on_main(prepare_manifests, kwargs={"hparams": hparams})
    run_on_main(prepare_noise, kwargs={"hparams": hparams})
    manifests = prepare_manifests(hparams)  # already built: returns the paths

    tokenizer = SentencePiece(model_dir=hparams["save_folder"], vocab_size=hparams["output_neurons"],
                              annotation_train=manifests["train"], annotation_read="wrd",
                              model_type=hparams["token_type"], character_coverage=1.0, bos_id=-1, eos_id=-1,
                              unk_id=hparams["unk_index"])
    if tokenizer.sp.get_piece_size() > hparams["output_neurons"]:
        raise ValueError(f"the tokenizer has {tokenizer.sp.get_piece_size()} tokens but output_neurons is "
                         f"{hparams['output_neurons']}; raise output_neurons")
    if hparams["ctc_weight"] < 1.0 and hparams["model"].decoder is None:
        raise ValueError("ctc_weight < 1 needs an attention decoder: pick a preset with one or set ctc_weight: 1.0")
    datasets = dataio_prepare(hparams, manifests, tokenizer)

    run_on_main(remove_incomplete_checkpoints, args=[hparams["checkpointer"].checkpoints_dir])
    mark_complete_on_save(hparams["checkpointer"])
    asr = ASR(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams, run_opts=run_opts,
              checkpointer=hparams["checkpointer"])
    asr.tokenizer = tokenizer
    if asr.distributed_launch:
        logger.info("data-parallel training over %d processes", torch.distributed.get_world_size())
    asr.lexicon, asr.test_decoder = None, None
    if hparams.get("lexicon_correction", False) or hparams.get("test_decoder") is not None:
        from lobes.data.manifest import load_manifest

        transcripts = [row["wrd"] for row in load_manifest(manifests["train"], ("wrd",))]
        if hparams.get("lexicon_correction", False):
            from lobes.asr import LexiconCorrector

            asr.lexicon = LexiconCorrector.from_transcripts(transcripts)
        if hparams.get("test_decoder") is not None:  # lexicon and word LM from the training transcripts
            asr.test_decoder = hparams["test_decoder"](tokenizer.sp, transcripts)
    asr.ctc_beam = None
    if hparams["test_beam_size"] > 1:
        from speechbrain.decoders.ctc import CTCBeamSearcher

        # word boundaries of SentencePiece pieces become spaces, so the searcher's text splits into words
        vocab = [tokenizer.sp.id_to_piece(i).replace("\u2581", " ") for i in range(tokenizer.sp.get_piece_size())]
        asr.ctc_beam = CTCBeamSearcher(blank_index=hparams["blank_index"], vocab_list=vocab,
                                       beam_size=hparams["test_beam_size"])
    train_loader_kwargs = dict(hparams["train_dataloader_opts"])
    if hparams.get("dynamic_batching", False):
        train_loader_kwargs = length_bucketed_loader(hparams, datasets["train"], train_loader_kwargs)
        if not asr.distributed_launch:  # under DDP, speechbrain wraps it and calls set_epoch itself
            asr.train_sampler = train_loader_kwargs["batch_sampler"]  # reshuffled every epoch
    set_schedule_length(hparams, asr, datasets["train"], train_loader_kwargs)
    n_params = sum(p.numel() for p in hparams["model"].parameters())
    logger.info("model: %.2f M parameters", n_params / 1e6)

    asr.fit(asr.hparams.epoch_counter, datasets["train"], datasets["valid"],
            train_loader_kwargs=train_loader_kwargs,
            valid_loader_kwargs=hparams["valid_dataloader_opts"])
    asr.evaluate(datasets["test"], min_key="WER", test_loader_kwargs=hparams["test_dataloader_opts"])


if __name__ == "__main__":
    main(sys.argv[1:])
