#!/usr/bin/env python3
"""Audio classification with a BEATs encoder, pooling over valid tokens and a linear head.

One script for every model file in ``hparams/`` (each extends ``hparams/_base.yaml``, read by
``lobes.recipe.load_hparams``):

- ``beats_tiny.yaml``: a small BEATs-architecture encoder trained from scratch (runs offline on the
  sound-event corpus synthesized on the spot);
- ``beats_frozen.yaml``: a Microsoft BEATs checkpoint, frozen, with a trained pooling + linear head;
- ``beats_finetune.yaml``: the same checkpoint fine-tuned with layer-wise learning-rate decay.

Run::

    python recipes/AudioClassification/train.py recipes/AudioClassification/hparams/beats_tiny.yaml
    cd recipes/AudioClassification && python train.py hparams/beats_tiny.yaml --debug
    python recipes/AudioClassification/train.py recipes/AudioClassification/hparams/beats_frozen.yaml \\
        --ckpt_path BEATs_iter3.pt --data_folder /data/ESC-50-master --prepare "!name:lobes.data.esc50.prepare_esc50 \\
        {data_folder: !ref <data_folder>, save_folder: !ref <save_folder>, test_fold: 1, valid_fold: null}"
    torchrun --nproc_per_node=2 recipes/AudioClassification/train.py \\
        recipes/AudioClassification/hparams/beats_tiny.yaml --distributed_backend gloo

Relative paths in the YAML are written from ``<root>``, the repository root (the folder holding
``recipes/``), so the command runs the same from any working directory; a relative path given on the
command line is taken from the current directory. The data come from the YAML's ``prepare`` (ESC-50 and CSV
alternatives are in ``_base.yaml``). ``--debug`` runs a few steps on a few clips per class synthesized in a
folder of their own (``<data_folder>_debug``) and writes under ``results/debug/``.

Outputs in ``output_folder``: ``test_results.json`` (accuracy, per-class accuracy, confusion matrix),
``confusion.png``, ``curves.png`` and ``history.json`` (train / valid loss and valid accuracy per epoch),
``hyperparams.yaml`` (the resolved settings), ``train_log.txt`` and the checkpoints in ``save/`` (an
interrupted run resumes from the last one).
"""

import json
import logging
import os
import sys
from pathlib import Path

import speechbrain as sb
import speechbrain.utils.distributed
import torch
from speechbrain.utils.distributed import if_main_process, run_on_main

from lobes.beats import token_padding_mask
from lobes.io import atomic_write_text, load_audio
from lobes.recipe import (
    TrainingHistory,
    guard_checkpoints,
    load_hparams,
    prepare_on_main,
    resolve_training_precision,
    save_figure,
    save_hyperparams,
    set_schedule_length,
    spawn_workers_if_asked,
    unwrap_ddp,
    world_size,
    write_pretrained,
)

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
"""``<root>`` of the YAML files: the folder holding ``recipes/``."""


class AudioClassifier(sb.Brain):
    """BEATs encoder -> pooling over the valid tokens -> linear head, trained with cross-entropy."""

    def compute_forward(self, batch, stage):
        """Returns class logits ``(B, n_classes)`` for a batch of waveforms."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig  # (B, T), relative lengths (B,)
        if stage == sb.Stage.TRAIN and self.hparams.augment is not None:
            wavs, wav_lens = self.hparams.augment(wavs, wav_lens)
        feats = self.modules.encoder(wavs, wav_lens)[0]  # (B, N, C) or (L + 1, B, N, C)
        if feats.dim() == 4:
            feats = self.modules.layer_mix(feats)  # (B, N, C)
        padding = token_padding_mask(wavs, wav_lens)  # (B, N), True = padded token
        pool = self.modules.pooling if "pooling" in self.modules else self.hparams.pooling
        return self.modules.classifier(pool(feats, padding))  # (B, n_classes)

    def compute_objectives(self, predictions, batch, stage):
        """Cross-entropy; accumulates accuracy and the confusion matrix outside training."""
        labels = batch.label_encoded.data.to(self.device).squeeze(-1)  # (B,)
        if stage == sb.Stage.TRAIN and self.hparams.augment is not None:
            labels = self.hparams.augment.replicate_labels(labels)
        loss = torch.nn.functional.cross_entropy(
            predictions.float(), labels, label_smoothing=self.hparams.label_smoothing
        )
        if stage != sb.Stage.TRAIN:
            pred = predictions.argmax(dim=-1)
            for t, p in zip(labels.tolist(), pred.tolist()):
                self.confusion[t][p] += 1
        return loss

    def on_stage_start(self, stage, epoch=None):
        """Resets the confusion matrix."""
        n = len(self.hparams.label_encoder)
        self.confusion = [[0] * n for _ in range(n)]

    def on_fit_batch_start(self, batch, should_step):
        """Keeps a frozen encoder in eval mode and sets this step's learning rates (each group's own)."""
        if self.hparams.freeze_encoder:
            self.modules.encoder.eval()
        self.hparams.lr_schedule(self.optimizer, self.optimizer_step)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs the epoch, keeps the best checkpoint, writes the curves and the test results."""
        stats = {"loss": stage_loss}
        if stage != sb.Stage.TRAIN:
            stats.update(confusion_stats(self.confusion))
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
        elif stage == sb.Stage.VALID:
            lr = max(g["lr"] for g in self.optimizer.param_groups)
            self.hparams.train_logger.log_stats(
                {"epoch": epoch, "lr": lr},
                train_stats=self.train_stats,
                valid_stats={"loss": stage_loss, "acc": stats["acc"]},
            )
            self.checkpointer.save_and_keep_only(meta={"acc": stats["acc"]}, max_keys=["acc"], num_to_keep=1)
            self.history.record(
                epoch, train_loss=self.train_stats["loss"], valid_loss=stage_loss, valid_acc=100 * stats["acc"]
            )
        else:
            self.hparams.train_logger.log_stats(  # on every process: it synchronises them
                {"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats={"loss": stage_loss, "acc": stats["acc"]},
            )
            if if_main_process():
                write_results(stats, self.hparams.label_encoder, Path(self.hparams.output_folder))

    def init_optimizers(self):
        """One parameter group per encoder depth (layer-wise decay) plus the head at its own rate."""
        groups = param_groups(
            self.modules,
            self.hparams.lr_head,
            self.hparams.lr_encoder,
            self.hparams.layer_decay,
            self.hparams.freeze_encoder,
        )
        self.optimizer = self.opt_class(groups)
        self.optimizers_dict = {"opt_class": self.optimizer}
        self.checkpointer.add_recoverable("optimizer", self.optimizer)


def param_groups(modules, lr_head, lr_encoder, layer_decay, freeze_encoder):
    """Head parameters at ``lr_head``; encoder parameters at ``lr_encoder * layer_decay ** (L - depth)``.

    Depth 0 holds everything below the first transformer layer (patch embedding, positional
    convolution), depth ``i + 1`` holds ``layers.i``; the top layer gets ``lr_encoder`` itself.
    """
    head = [p for name, m in modules.items() if name != "encoder" for p in m.parameters() if p.requires_grad]
    groups = [{"params": head, "base_lr": lr_head, "lr": lr_head, "name": "head"}]
    if freeze_encoder:
        return groups
    encoder = unwrap_ddp(modules["encoder"])
    by_depth = {}
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        depth = int(parts[parts.index("layers") + 1]) + 1 if "layers" in parts else 0
        by_depth.setdefault(depth, []).append(p)
    top = max(by_depth)
    for depth, params in sorted(by_depth.items()):
        lr = lr_encoder * layer_decay ** (top - depth)
        groups.append({"params": params, "base_lr": lr, "lr": lr, "name": f"encoder.depth{depth}"})
    return groups


def confusion_stats(confusion):
    """Accuracy, per-class accuracy and the matrix itself (rows = true class)."""
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(confusion)))
    per_class = [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]
    return {"acc": correct / max(total, 1), "per_class_acc": per_class, "confusion": confusion, "count": total}


def write_results(stats, label_encoder, folder: Path):
    """``test_results.json`` + ``confusion.png`` with class names."""
    names = [label_encoder.ind2lab[i] for i in range(len(label_encoder))]
    payload = {
        "accuracy": stats["acc"],
        "num_test": stats["count"],
        "test_loss": stats["loss"],
        "per_class_accuracy": dict(zip(names, stats["per_class_acc"])),
        "classes": names,
        "confusion": stats["confusion"],
    }
    atomic_write_text(folder / "test_results.json", json.dumps(payload, indent=2))
    logger.info("test accuracy %.4f on %d clips", stats["acc"], stats["count"])
    plot_confusion(stats["confusion"], names, folder / "confusion.png")


def plot_confusion(confusion, names, path: Path):
    """Row-normalised confusion matrix with class names on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat = torch.tensor(confusion, dtype=torch.float)
    mat = mat / mat.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(mat.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    if len(names) <= 25:
        for i in range(len(names)):
            for j in range(len(names)):
                if confusion[i][j]:
                    ax.text(
                        j,
                        i,
                        confusion[i][j],
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if mat[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion (counts; colour = row fraction)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def dataio_prepare(hparams, csvs):
    """Datasets yielding ``sig`` (16 kHz mono) and ``label_encoded``; fills the label encoder.

    ``$data_root`` in a manifest's wav paths is replaced by ``data_folder``."""
    from lobes.data.manifest import check_manifest

    for path in csvs.values():
        check_manifest(path, ("ID", "wav", "label"))
    datasets = {
        split: sb.dataio.dataset.DynamicItemDataset.from_csv(
            csvs[split], replacements={"data_root": hparams["data_folder"]}
        )
        for split in ("train", "valid", "test")
    }
    label_encoder = hparams["label_encoder"]

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        sig = load_audio(wav, hparams["sample_rate"])
        max_samples = int(hparams["max_seconds"] * hparams["sample_rate"])
        return sig[:max_samples] if max_samples > 0 else sig

    @sb.utils.data_pipeline.takes("label")
    @sb.utils.data_pipeline.provides("label", "label_encoded")
    def label_pipeline(label):
        yield label
        yield label_encoder.encode_label_torch(label)

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), label_pipeline)
    encoder_file = os.path.join(hparams["save_folder"], "label_encoder.txt")
    run_on_main(
        label_encoder.load_or_create,
        kwargs={"path": encoder_file, "from_didatasets": [datasets["train"]], "output_key": "label"},
    )
    label_encoder.load_or_create(path=encoder_file)
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "sig", "label_encoded"])
    return datasets


def check_hparams(hparams):
    """Fails fast on settings that cannot work, before anything is written."""
    encoder_dim = hparams["encoder"].cfg.encoder_embed_dim
    if encoder_dim != hparams["emb_dim"]:
        raise ValueError(
            f"emb_dim: {hparams['emb_dim']}, but the encoder's encoder_embed_dim is "
            f"{encoder_dim}; pass --emb_dim {encoder_dim}"
        )


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)  # no-op unless launched with torchrun
    hparams = load_hparams(hparams_file, overrides, debug=run_opts.get("debug", False), root=REPOSITORY_ROOT)
    run_opts = resolve_training_precision(hparams, run_opts)  # fp32 where the CPU only emulates bf16
    check_hparams(hparams)
    status = spawn_workers_if_asked(__file__, argv, hparams, run_opts)  # plain `python train.py` on CPU
    if status is not None:
        sys.exit(status)
    sb.create_experiment_directory(hparams["output_folder"])
    save_hyperparams(hparams, hparams["output_folder"])

    datasets = dataio_prepare(hparams, prepare_on_main(hparams["prepare"]))
    modules, checkpointer = hparams["modules"], hparams["checkpointer"]
    modules["classifier"] = hparams["classifier"](hparams["emb_dim"], len(hparams["label_encoder"]))
    checkpointer.add_recoverable("classifier", modules["classifier"])
    if isinstance(hparams["pooling"], torch.nn.Module):  # attentive pooling has weights to train
        modules["pooling"] = hparams["pooling"]
        checkpointer.add_recoverable("pooling", hparams["pooling"])
    if hparams["freeze_encoder"]:
        modules["encoder"].requires_grad_(False)  # not saved either: it is the checkpoint at ckpt_path
    else:
        checkpointer.add_recoverable("encoder", modules["encoder"])

    guard_checkpoints(checkpointer)
    brain = AudioClassifier(
        modules=modules, opt_class=hparams["opt_class"], hparams=hparams, run_opts=run_opts, checkpointer=checkpointer
    )
    brain.history = TrainingHistory(hparams["output_folder"], "valid_acc", "valid accuracy (%)")
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
    brain.evaluate(datasets["test"], max_key="acc", test_loader_kwargs=hparams["valid_dataloader_opts"])

    # --- Inference folder ---------------------------------------------------------------------------------
    # <output_folder>/pretrained/: hyperparams.yaml + loadables for speechbrain's EncoderClassifier, the label
    # encoder and a README.md.
    write_pretrained(brain, hparams["output_folder"])


if __name__ == "__main__":
    main(sys.argv[1:])
