#!/usr/bin/env python3
"""BEATs self-supervised pre-training: masked acoustic-token prediction and tokenizer iterations.

One script for every stage in ``hparams/`` (each extends ``hparams/_base.yaml``, read by
``lobes.recipe.load_hparams``); the YAML's ``task`` (built with ``!new:``, see :mod:`lobes.beats.pretraining`)
says what is trained:

- ``iter1.yaml``: a BEATs encoder pre-trained by masked token prediction on the frozen random-projection
  tokenizer; writes ``beats_iter1.pt`` (and ``tokenizer_iter1.pt``);
- ``tokenizer_iter2.yaml``: a new tokenizer distilled from ``beats_iter1.pt`` (the teacher); writes
  ``tokenizer_iter2.pt``;
- ``iter2.yaml``: a new encoder pre-trained on the ids of ``tokenizer_iter2.pt``; writes ``beats_iter2.pt``.

Run::

    python recipes/BEATsPretrain/train.py recipes/BEATsPretrain/hparams/iter1.yaml
    python recipes/BEATsPretrain/train.py recipes/BEATsPretrain/hparams/tokenizer_iter2.yaml
    python recipes/BEATsPretrain/train.py recipes/BEATsPretrain/hparams/iter2.yaml
    cd recipes/BEATsPretrain && python train.py hparams/iter1.yaml --debug
    torchrun --nproc_per_node=2 recipes/BEATsPretrain/train.py recipes/BEATsPretrain/hparams/iter1.yaml \\
        --distributed_backend gloo

The checkpoints are Microsoft's format (``{"cfg", "model"}``): the models load into ``lobes.beats.BEATs``,
speechbrain's ``BEATs`` and the classification recipe (``--ckpt_path``), the tokenizers into
``lobes.beats.BEATsTokenizer`` / ``lobes.beats.load_tokenizer`` and ``python -m lobes.extract --tokens``. Also in
``output_folder``: ``history.json`` + ``curves.png`` (train / valid loss and masked-token accuracy, or feature
cosine similarity, per epoch), ``code_usage.json`` (perplexity and share of codes used, per epoch),
``hyperparams.yaml``, ``train_log.txt`` and ``save/`` (checkpoints, intra-epoch too: a killed run resumes
where it stopped).
"""

import json
import logging
import random
import sys
from pathlib import Path

import speechbrain as sb
import speechbrain.utils.distributed
from speechbrain.utils.distributed import if_main_process, run_on_main

from lobes.beats.pretraining import CodeUsage, num_codes
from lobes.io import atomic_write_text, load_audio
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
)

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
"""``<root>`` of the YAML files: the folder holding ``recipes/``."""


def _task(brain):
    """The pre-training module, unwrapped from DDP."""
    return unwrap_ddp(brain.modules.task)


class Pretrainer(sb.Brain):
    """Runs the YAML's ``task`` (a module whose forward returns loss, score and the code ids of a batch)."""

    def compute_forward(self, batch, stage):
        """One :class:`lobes.beats.pretraining.PretrainingStep` for a batch of waveforms."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig  # (B, N), relative lengths (B,)
        return self.modules.task(wavs, wav_lens)

    def compute_objectives(self, step, batch, stage):
        """The task's loss; accumulates its score and the code usage of the stage."""
        n = int(step.ids.numel())
        self.score_sum += float(step.score) * n
        self.score_count += n
        self.usage.update(step.ids)
        return step.loss

    def on_stage_start(self, stage, epoch=None):
        """Resets the score and code counts."""
        self.score_sum, self.score_count = 0.0, 0
        self.usage = CodeUsage(self.num_codes)

    def on_fit_batch_start(self, batch, should_step):
        """Sets this step's learning rate."""
        self.hparams.lr_schedule(self.optimizer, self.optimizer_step)

    def _stage_stats(self, loss):
        score = self.score_sum / max(self.score_count, 1)
        usage = self.usage.summary()
        return {"loss": loss, self.score_name: score, "perplexity": usage["perplexity"], "used": usage["used_share"]}

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs the epoch, checkpoints, and writes the Microsoft-format checkpoint, curves and code usage."""
        stats = self._stage_stats(stage_loss)
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        lr = max(g["lr"] for g in self.optimizer.param_groups)
        self.hparams.train_logger.log_stats({"epoch": epoch, "lr": lr}, train_stats=self.train_stats, valid_stats=stats)
        self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, num_to_keep=1)
        self.history.record(
            epoch,
            train_loss=self.train_stats["loss"],
            valid_loss=stage_loss,
            **{f"valid_{self.score_name}": 100 * stats[self.score_name]},
        )
        if if_main_process():
            self.usage_log[str(epoch)] = {"train": self.train_stats, "valid": stats}
            folder = Path(self.hparams.output_folder)
            atomic_write_text(folder / "code_usage.json", json.dumps(self.usage_log, indent=1))
            export(self)

    def init_optimizers(self):
        """AdamW over the trainable parameters, at ``lr`` scaled by the schedule."""
        params = [p for p in self.modules.parameters() if p.requires_grad]
        self.optimizer = self.opt_class([{"params": params, "base_lr": self.hparams.lr, "lr": self.hparams.lr}])
        self.optimizers_dict = {"opt_class": self.optimizer}
        self.checkpointer.add_recoverable("optimizer", self.optimizer)


def export(brain):
    """Write the task's Microsoft-format checkpoint (and a random-projection tokenizer's own file)."""
    task = _task(brain)
    path = task.export(brain.hparams.export_path)
    tokenizer_path = getattr(brain.hparams, "tokenizer_export_path", None)
    if tokenizer_path:
        task.tokenizer.save_checkpoint(tokenizer_path)
    logger.info("wrote %s", path)


def dataio_prepare(hparams, csvs):
    """Train / valid datasets yielding ``sig`` (16 kHz mono, training clips cropped to ``max_seconds``).

    ``$data_root`` in a manifest's wav paths is replaced by ``data_folder``."""
    from lobes.data.manifest import check_manifest

    for split in ("train", "valid"):
        if split not in csvs:
            raise ValueError(f"prepare returned {sorted(csvs)}; expected at least train and valid manifests")
        check_manifest(csvs[split], ("ID", "wav"))
    max_samples = int(hparams["max_seconds"] * hparams["sample_rate"])

    def pipeline(crop):
        @sb.utils.data_pipeline.takes("wav")
        @sb.utils.data_pipeline.provides("sig")
        def audio_pipeline(wav):
            sig = load_audio(wav, hparams["sample_rate"])
            if 0 < max_samples < len(sig):
                start = random.randint(0, len(sig) - max_samples) if crop else 0
                sig = sig[start : start + max_samples]
            return sig

        return audio_pipeline

    datasets = {}
    for split in ("train", "valid"):
        data = sb.dataio.dataset.DynamicItemDataset.from_csv(
            csvs[split], replacements={"data_root": hparams["data_folder"]}
        )
        sb.dataio.dataset.add_dynamic_item([data], pipeline(crop=split == "train"))
        sb.dataio.dataset.set_output_keys([data], ["id", "sig"])
        datasets[split] = data
    return datasets


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)  # no-op unless launched with torchrun
    hparams = load_hparams(hparams_file, overrides, debug=run_opts.get("debug", False), root=REPOSITORY_ROOT)
    run_opts = resolve_training_precision(hparams, run_opts)  # fp32 where the CPU only emulates bf16
    status = spawn_workers_if_asked(__file__, argv, hparams, run_opts)  # plain `python train.py` on CPU
    if status is not None:
        sys.exit(status)
    sb.create_experiment_directory(hparams["output_folder"])
    save_hyperparams(hparams, hparams["output_folder"])

    datasets = dataio_prepare(hparams, prepare_on_main(hparams["prepare"]))
    task = hparams["task"]
    checkpointer = sb.utils.checkpoints.Checkpointer(
        hparams["save_folder"], recoverables={"task": task, "counter": hparams["epoch_counter"]}
    )
    guard_checkpoints(checkpointer)
    brain = Pretrainer(
        modules={"task": task},
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=checkpointer,
    )
    brain.num_codes = num_codes(task.tokenizer)
    brain.score_name = "acc" if hasattr(task, "predictor") else "cos"
    brain.usage_log = {}
    usage_file = Path(hparams["output_folder"]) / "code_usage.json"
    if usage_file.exists():  # a resumed run keeps the epochs already logged
        brain.usage_log = json.loads(usage_file.read_text())
    label = "masked-token accuracy (%)" if brain.score_name == "acc" else "feature cosine similarity (%)"
    brain.history = TrainingHistory(hparams["output_folder"], f"valid_{brain.score_name}", label)
    if brain.distributed_launch:
        logger.info("data-parallel training over %d processes", world_size())
    set_schedule_length(
        hparams["lr_schedule"], brain, datasets["train"], hparams["train_dataloader_opts"], hparams["number_of_epochs"]
    )
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    run_on_main(export, args=[brain])


if __name__ == "__main__":
    main(sys.argv[1:])
