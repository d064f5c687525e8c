"""Audio classification with a pretrained folder: :class:`AudioClassifier` gives top-k labels and embeddings.

A folder written by :func:`package_classification_run` (a trained ``recipes/AudioClassification`` run) or
:func:`package_beats_checkpoint` (a Microsoft BEATs checkpoint; both in :mod:`lobes.inference.classify_package`)
loads with ``speechbrain.inference.classifiers.EncoderClassifier.from_hparams(source=OUT, savedir=...)``
(``classify_batch`` / ``classify_file`` return log-probabilities and label names) and with
:meth:`AudioClassifier.from_pretrained`, which takes files, tensors or arrays at any rate and returns the top-k
labels with probabilities (softmax for a trained classifier, independent sigmoids for AudioSet tags).

What the folder's ``hyperparams.yaml`` builds (:class:`Passthrough`, :class:`BEATsEmbedding`,
:class:`ClassifierHead`, :class:`ClassLabels`) lives in :mod:`lobes.inference.classify_modules`; folders name
it ``lobes.inference.classify.X``, so it is exported here too, with the two packaging functions.

Example
-------
>>> import tempfile, torch
>>> from lobes.beats import BEATs, BEATsConfig
>>> cfg = BEATsConfig.released(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64, embed_dim=32,
...                            encoder_attention_heads=4, conv_pos=16, conv_pos_groups=2, finetuned_model=True,
...                            predictor_class=3)
>>> beats = BEATs(cfg=cfg); beats.label_dict = {0: "/m/dog", 1: "/m/cat", 2: "/m/owl"}
>>> folder = tempfile.mkdtemp()
>>> ckpt = beats.save_checkpoint(f"{folder}/as2m.pt")
>>> out = package_beats_checkpoint(ckpt, f"{folder}/pretrained")
>>> model = AudioClassifier.from_pretrained(out)
>>> tags = model.classify(torch.randn(8000) * 0.1, sample_rate=8000, top_k=2)
>>> len(tags), sorted(model.labels)
(2, ['/m/cat', '/m/dog', '/m/owl'])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lobes.beats import min_num_samples, top_k_labels
from lobes.inference.classify_modules import KIND, BEATsEmbedding, ClassifierHead, ClassLabels, Passthrough
from lobes.inference.classify_package import package_beats_checkpoint, package_classification_run
from lobes.inference.precision import autocast, resolve_precision
from lobes.inference.pretrained import HPARAMS_FILE, PretrainedError, load_pretrained
from lobes.inference.sources import audio_sources, batches_by_length, pad_batch
from lobes.inputs import resolve_device

__all__ = [
    "DEFAULT_BATCH_SECONDS",
    "AudioClassifier",
    "BEATsEmbedding",
    "ClassLabels",
    "ClassifierHead",
    "Passthrough",
    "package_beats_checkpoint",
    "package_classification_run",
]

DEFAULT_BATCH_SECONDS = 60.0
"""Padded audio per batch (seconds) when :class:`AudioClassifier` groups inputs of similar length."""


def _check_loaded(hparams: dict, folder: Path) -> None:
    """Refuse a folder whose modules would keep random weights or whose labels do not fit the classifier."""
    modules = hparams.get("modules") or {}
    missing = [m for m in ("compute_features", "mean_var_norm", "embedding_model") if m not in modules]
    if missing:
        raise PretrainedError(
            f"{folder / HPARAMS_FILE}: 'modules' lacks {missing}; expected compute_features, "
            "mean_var_norm, embedding_model (and classifier)"
        )
    loadables = hparams["pretrainer"].loadables
    loaded = {id(obj) for obj in loadables.values()}
    for name, module in modules.items():
        if any(True for _ in module.parameters()) and id(module) not in loaded:
            raise PretrainedError(
                f"{folder / HPARAMS_FILE}: module {name!r} has weights but is not a loadable of "
                "the pretrainer: it would keep random values"
            )
    classifier = modules.get("classifier")
    if classifier is None:
        return
    if not isinstance(classifier, ClassifierHead):
        raise PretrainedError(
            f"{folder / HPARAMS_FILE}: 'classifier' must be a lobes.inference.classify."
            f"ClassifierHead, got {type(classifier).__name__}"
        )
    labels = hparams.get("label_encoder")
    if labels is None or id(labels) not in loaded:
        raise PretrainedError(
            f"{folder / HPARAMS_FILE}: a classifier needs a 'label_encoder' loadable "
            "(label_encoder.ckpt) to name its outputs"
        )
    if len(labels) != classifier.n_classes:
        raise PretrainedError(
            f"{folder}: label_encoder.ckpt holds {len(labels)} labels, but the classifier has "
            f"{classifier.n_classes} outputs"
        )


class AudioClassifier:
    """A pretrained audio classifier (or BEATs embedding model) that takes files, tensors or arrays.

    Build it with :meth:`from_pretrained`. Inputs are batched by length internally; a clip gives the same
    result alone or in a batch (the model sees only its valid tokens).

    Arguments
    ---------
    hparams : dict
        A built and loaded pretrained folder (see :func:`lobes.inference.pretrained.load_pretrained`).
    device : str or torch.device
        ``auto`` (GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``.
    precision : str
        ``fp32`` or ``bf16`` (autocast; the filterbank stays float32).

    Example
    -------
    See the module docstring.
    """

    def __init__(self, hparams: dict, device: str | torch.device = "auto", precision: str = "fp32") -> None:
        resolve_precision(precision)
        self.device = resolve_device(device)
        self.precision = precision
        modules = hparams["modules"]
        self.compute_features = modules["compute_features"]
        self.mean_var_norm = modules["mean_var_norm"]
        self.embedding_model = modules["embedding_model"]
        self.classifier: ClassifierHead | None = modules.get("classifier")
        self.label_encoder = hparams.get("label_encoder") if self.classifier is not None else None
        self.sample_rate = int(hparams["sample_rate"])
        for module in modules.values():
            module.to(self.device).eval()
            module.requires_grad_(False)
        encoder = getattr(self.embedding_model, "encoder", None)
        patch = getattr(getattr(encoder, "cfg", None), "input_patch_size", 16)
        self.min_samples = -(-min_num_samples(patch) * self.sample_rate // 16000)  # ceil, at the model's rate

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, device: str | torch.device = "auto", precision: str = "fp32"
    ) -> "AudioClassifier":
        """Load a folder written by :func:`package_classification_run` / :func:`package_beats_checkpoint`.

        Raises
        ------
        lobes.inference.pretrained.PretrainedError
            No such folder, no ``hyperparams.yaml`` / ``package.json``, a missing ``<name>.ckpt``, a module
            with weights that the pretrainer does not load, weights or labels that do not fit the model.
        """
        hparams, _ = load_pretrained(source, kind=KIND)
        _check_loaded(hparams, Path(source))
        return cls(hparams, device=device, precision=precision)

    @property
    def labels(self) -> list[str] | None:
        """Class names in output order (None for an embedding model)."""
        if self.label_encoder is None:
            return None
        return [str(self.label_encoder.ind2lab[i]) for i in range(len(self.label_encoder))]

    @property
    def multi_label(self) -> bool:
        """True when scores are independent sigmoids (tags), False for a softmax over classes."""
        return bool(self.classifier is not None and self.classifier.multi_label)

    @property
    def embedding_size(self) -> int:
        """Size of :meth:`embed`'s vectors."""
        return int(self.embedding_model.encoder.cfg.encoder_embed_dim)

    # ------------------------------------------------------------------------------------------ batches
    def require_length(self, name: str, samples: int) -> None:
        """Raise a ``ValueError`` naming ``name`` when ``samples`` (at the model's rate) are too few for the model."""
        if samples < self.min_samples:
            raise ValueError(
                f"{name}: {samples / self.sample_rate:.3f} s is too short; the model needs at "
                f"least {self.min_samples / self.sample_rate:.3f} s ({self.min_samples} samples at "
                f"{self.sample_rate} Hz)"
            )

    def _forward(self, waves: list[Tensor], with_scores: bool) -> tuple[Tensor, Tensor | None]:
        """Embeddings ``(B, C)`` and class probabilities ``(B, n_classes)`` of mono waveforms at the model rate."""
        wavs, rel = pad_batch(waves)
        wavs, rel = wavs.to(self.device), rel.to(self.device)  # (B, N), (B,)
        with torch.no_grad(), autocast(self.device, self.precision):
            feats = self.mean_var_norm(self.compute_features(wavs), rel)  # the waveform itself for BEATs
            emb = self.embedding_model(feats, rel)  # (B, 1, C)
            log_probs = self.classifier(emb).squeeze(1) if with_scores else None  # (B, n_classes)
        probs = log_probs.float().exp().cpu() if log_probs is not None else None
        return emb.squeeze(1).float().cpu(), probs

    def _run(
        self, inputs: Any, sample_rate: int | None, batch_seconds: float, with_scores: bool
    ) -> tuple[list[tuple[Tensor, Tensor | None]], bool]:
        if with_scores and self.classifier is None:
            raise ValueError(
                "this folder holds an embedding model only (a pre-trained BEATs without a label predictor): use embed()"
            )
        if not batch_seconds > 0:
            raise ValueError(f"batch_seconds must be positive, got {batch_seconds}")
        single = not isinstance(inputs, (list, tuple))
        sources = audio_sources(inputs, sample_rate=sample_rate, target_rate=self.sample_rate)
        results: list = [None] * len(sources)
        for batch in batches_by_length(sources, batch_seconds):
            waves = []
            for i in batch:
                wav = sources[i].load()
                self.require_length(sources[i].name, wav.numel())
                waves.append(wav)
            emb, probs = self._forward(waves, with_scores)
            for row, i in enumerate(batch):
                results[i] = (emb[row], probs[row] if probs is not None else None)
        return results, single

    # ------------------------------------------------------------------------------------------ public
    def classify(
        self, inputs: Any, sample_rate: int | None = None, top_k: int = 5, batch_seconds: float = DEFAULT_BATCH_SECONDS
    ) -> list:
        """The ``top_k`` labels of each input with their probabilities.

        Arguments
        ---------
        inputs : path, tensor, array, or a list of them
            Audio files (any rate / channels), or waveforms ``(samples,)`` / ``(channels, samples)`` with
            ``sample_rate`` (see :func:`lobes.inference.sources.audio_sources`).
        sample_rate : int, optional
            Rate of the waveforms (required for tensors and arrays; they are resampled to the model's).
        top_k : int
            Labels per input.
        batch_seconds : float
            Padded audio per batch.

        Returns
        -------
        list
            For one input, ``[(label, probability), ...]`` by decreasing probability; for a list, one such
            list per input, in order.
        """
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        results, single = self._run(inputs, sample_rate, batch_seconds, with_scores=True)
        probs = torch.stack([p for _, p in results])  # (N, n_classes)
        tags = top_k_labels(probs, self.labels, top_k)
        return tags[0] if single else tags

    def probabilities(
        self, inputs: Any, sample_rate: int | None = None, batch_seconds: float = DEFAULT_BATCH_SECONDS
    ) -> Tensor | list[Tensor]:
        """Class probabilities ``(n_classes,)`` per input (softmax, or sigmoids for a multi-label model)."""
        results, single = self._run(inputs, sample_rate, batch_seconds, with_scores=True)
        probs = [p for _, p in results]
        return probs[0] if single else probs

    def embed(
        self, inputs: Any, sample_rate: int | None = None, batch_seconds: float = DEFAULT_BATCH_SECONDS
    ) -> Tensor | list[Tensor]:
        """The pooled embedding ``(embedding_size,)`` of each input (what the classifier reads).

        Arguments and inputs as in :meth:`classify`; one tensor for one input, a list for a list.
        """
        results, single = self._run(inputs, sample_rate, batch_seconds, with_scores=False)
        embs = [e for e, _ in results]
        return embs[0] if single else embs
