"""One experiment cell, end to end, in plain PyTorch: backbone -> adaptation -> evaluation.

A *cell* is one fully resolved configuration (method x backbone x dataset x hyperparameters x
seed). This module runs it in the current process (or in one distributed worker); the Ray layer
(``orchestrator``) decides where and when. Methods (paper Sec. 4, Table 1-2):

=================== ============ ============ ==================================================
method              objective    adaptation   meaning
=================== ============ ============ ==================================================
``pretrained``      --           --           frozen pretrained backbone: k-NN and linear probe
``pretrained_bn``   --           --           the frozen backbone with its BatchNorm statistics
                                              re-estimated on the target's unaugmented train split
                                              (a control: what BN adaptation does without a mask)
``smn``             swav         mask         self-masking network (the paper's method)
``supervised_mask`` supervised   mask         supervised masking with a new linear head
``fft``             supervised   full         full fine-tuning
``stn``             swav         full         self-training network (self-supervised FFT)
``random_mask``     (swav)       (mask)       control: the SMN cell's trained mask redrawn at random, the
                                              same count per tensor (``_magnitude``: also the same |W|
                                              quantiles); evaluated, not trained (smn_core.random_mask)
=================== ============ ============ ==================================================
"""

from __future__ import annotations

import functools
import itertools
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .augment import MultiCropTransform, SeededViewDataset, eval_transform
from .backbones import Backbone, build_backbone, build_clip_text_head
from .checkpoint import local_copy
from .config import CONTROLS, METHODS, BackboneSpec, CellConfig, DataSpec, EvalSpec, PretrainSpec, method_training
from .data import ImageDataset, load_dataset, split_validation, subset
from .evaluation import compute_embeddings, knn_correct, linear_probe, lowshot_linear_probe, per_class_sample
from .masking import attach_masks, export_masks, mask_density, mask_modules, trainable_mask_count
from .training import CosineClassifier, TrainResult, build_adaptation_model, train, trainable_state
from .swav import init_head_from_features
from .view_strength import view_similarity

__all__ = [
    "SmallKnnBankWarning",
    "CellOutcome",
    "load_cell_data",
    "eval_split_names",
    "prepare_backbone",
    "pretrain_backbone",
    "evaluate_model",
    "lowshot_metric",
    "labelled_subset",
    "clip_text_classifier",
    "reestimate_batchnorm",
    "run_cell",
    "VAL_METRIC",
    "validation_top1",
]

VAL_METRIC = "val_knn_dino_top1"
"""The validation metric of a cell with ``dataset.val_fraction``: DINO's k-NN top-1 (``eval.knn_dino_k`` /
``eval.knn_dino_temperature``) of the validation images against the remaining train images, after every
epoch (in the epoch's metrics, its curve and ``on_epoch_end``) and at the end (a ledger metric)."""


@dataclass
class CellOutcome:
    """Result of :func:`run_cell`: ``metrics`` (name -> float), the exported ``masks`` (or None),
    the per-epoch ``history``, the training result, and ``state``: the final trainable state
    (:func:`smn_core.training.trainable_state`: scores, head, prototypes, BN buffers; None for
    ``pretrained``), from which a cascade expert starts; ``probe_head``: the evaluation's fitted linear probe
    (:func:`smn_core.evaluation.probe_head_arrays` plus ``classes``, the class names in label order), or None."""

    metrics: dict[str, float]
    masks: dict[str, torch.Tensor] | None
    history: list[dict[str, float]]
    train_result: TrainResult | None
    state: dict[str, torch.Tensor] | None = None
    per_image: dict[str, np.ndarray] | None = None  # test images' correctness per evaluation (evaluate_model)
    probe_head: dict[str, Any] | None = None


def _image_size(spec: DataSpec, backbone: Backbone) -> int:
    return spec.image_size or backbone.input_size


def load_cell_data(spec: DataSpec) -> tuple[ImageDataset, ImageDataset]:
    """``(train split, test split)`` of a :class:`DataSpec`; with ``val_fraction`` set, ``(train without the
    validation images, validation images)`` (:func:`smn_core.data.split_validation`, seed ``split_seed``) and
    the test split is not loaded."""
    common = dict(root=spec.root, classes=spec.classes, image_size=spec.image_size,
                  test_fraction=spec.test_fraction, split_seed=spec.split_seed, download=spec.download)
    train_ds = load_dataset(spec.source, "train", max_samples=spec.max_train_samples, **common)
    if spec.val_fraction is not None:
        return split_validation(train_ds, spec.val_fraction, spec.split_seed)
    test_ds = load_dataset(spec.source, "test", max_samples=spec.max_test_samples, **common)
    return train_ds, test_ds


def eval_split_names(spec: DataSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` (or per-image arrays) of an evaluation under the names of the split it ran on: unchanged for
    the test split, prefixed ``val_`` when ``spec.val_fraction`` made it a validation split (docs/ledger.md)."""
    return dict(metrics) if spec.val_fraction is None else {f"val_{k}": v for k, v in metrics.items()}


def prepare_backbone(spec: BackboneSpec, *, pipeline_weights: str | Path | None = None) -> Backbone:
    """Build the backbone with its weights.

    Args:
        spec: the backbone spec.
        pipeline_weights: the safetensors file of the pipeline's pretraining, for ``weights="pipeline"``: a
            local path or a ``pyarrow.fs`` URI (``s3://...``), which is fetched to a temporary file first.

    Raises:
        ValueError: if ``weights="pipeline"`` and no ``pipeline_weights`` file is given.
        FileNotFoundError: if the ``pipeline_weights`` file does not exist.
    """
    if spec.weights == "pipeline":
        if pipeline_weights is None:
            raise ValueError("backbone.weights 'pipeline' needs the pretraining artifact (pipeline_weights)")
        with local_copy(str(pipeline_weights)) as local:
            return build_backbone(spec.arch, "checkpoint", checkpoint=local)
    return build_backbone(spec.arch, spec.weights, checkpoint=spec.checkpoint)


def pretrain_backbone(backbone_spec: BackboneSpec, pretrain: PretrainSpec, *, seed: int = 0,
                      device: str | torch.device = "cpu",
                      progress: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Supervised pretraining of a randomly initialised backbone on the source domain.

    Returns:
        ``(backbone state_dict, metrics)`` where metrics hold the source-domain test accuracy of the
        trained classifier (``source_test_top1``) and the final training loss.
    """
    torch.manual_seed(seed)
    backbone = build_backbone(backbone_spec.arch, "random")
    train_ds, test_ds = load_cell_data(pretrain.dataset)
    size = _image_size(pretrain.dataset, backbone)
    cfg = replace(pretrain.train, seed=seed)
    torch.manual_seed(seed)
    model = build_adaptation_model(backbone.model, backbone.feature_dim, cfg, num_classes=len(train_ds.class_names))
    result = train(model, train_ds, cfg, image_size=size, mean=backbone.mean, std=backbone.std, device=device,
                   progress=progress)
    model.eval()
    loader = torch.utils.data.DataLoader(SeededViewDataset(test_ds, eval_transform(size, backbone.mean, backbone.std)),
                                         batch_size=256)
    correct = 0
    with torch.no_grad():
        for x, y, _ in loader:
            correct += int((model.classifier(model.backbone(x.to(device))).argmax(1).cpu() == y).sum())
    state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    return state, {"source_test_top1": correct / len(test_ds), "pretrain_final_loss": result.history[-1]["loss"]}


def lowshot_metric(fraction: float) -> str:
    """Ledger name of the low-shot probe accuracy at a label fraction: ``lowshot_top1@0.01`` for 1 %."""
    return f"lowshot_top1@{fraction:g}"


class _CastInput(torch.nn.Module):
    """Feed a model trained in another dtype (``train.dtype: float64``) with float32 image batches."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


class SmallKnnBankWarning(UserWarning):
    """A k-NN ``k`` larger than the smallest class's bank of train images (:func:`evaluate_model`).

    :func:`run_cell` does not raise it (it records ``knn_min_class_bank``); ``smn run`` says it once per run.
    """


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, train_ds: ImageDataset, test_ds: ImageDataset, spec: EvalSpec, *,
                   image_size: int, mean, std, device: str | torch.device = "cpu",
                   classifier: torch.nn.Module | None = None,
                   per_image: dict[str, np.ndarray] | None = None,
                   probe_head: dict[str, Any] | None = None) -> dict[str, float]:
    """k-NN (train split as bank, test split as queries) and linear probe on unaugmented embeddings.

    Args:
        model: images ``(B, 3, s, s)`` -> features ``(B, F)``.
        classifier: the trained head of a supervised run (features -> logits ``(B, C)``); when given,
            its test accuracy is reported as ``classifier_top1`` (Table 1's "FFT" and "Mask" rows).
        per_image: when given, filled with each test image's correctness, ``{"knn_top1", "knn_dino_top1",
            "linear_probe_top1"[, "classifier_top1"]: (Q,) bool}`` in the test split's order (paired
            comparisons over images, issue 25).
        probe_head: when given, filled with the full probe's head (:func:`smn_core.evaluation.probe_head_arrays`)
            and ``classes`` (the train split's class names), so a caller can keep it.

    Returns ``{"knn_top1", "knn_dino_top1", "knn_min_class_bank", "linear_probe_top1",
    "linear_probe_train_top1", "linear_probe_C", "eval_seconds"}`` (``knn_top1``: the paper's k-NN, ``spec.knn_k`` /
    ``spec.knn_temperature``; ``knn_dino_top1``: DINO's, ``spec.knn_dino_k`` / ``spec.knn_dino_temperature``;
    ``knn_min_class_bank``: the smallest class's number of bank images; a :class:`SmallKnnBankWarning` names a k that
    exceeds it), plus
    ``classifier_top1`` and ``lowshot_top1@<fraction>`` for each ``spec.lowshot_fractions`` (see
    :func:`lowshot_metric`); accuracies in [0, 1]. k-NN and the full probe always use every train label.
    """
    t0 = time.perf_counter()
    tf = eval_transform(image_size, mean, std)
    xtr, ytr = compute_embeddings(model, SeededViewDataset(train_ds, tf), batch_size=spec.batch_size, device=device)
    xte, yte = compute_embeddings(model, SeededViewDataset(test_ds, tf), batch_size=spec.batch_size, device=device)
    num_classes = len(train_ds.class_names)
    smallest = int(np.bincount(ytr.numpy(), minlength=num_classes)[np.unique(ytr.numpy())].min())
    for name, k in (("knn_k", spec.knn_k), ("knn_dino_k", spec.knn_dino_k)):
        if k > smallest:
            warnings.warn(SmallKnnBankWarning(
                f"eval.{name} = {k} exceeds the smallest class's bank of {smallest} train images: "
                f"its k-NN votes reach into other classes (DINO's k = 20 suits small banks)"), stacklevel=2)
    correct = {"knn_top1": knn_correct(xtr, ytr, xte, yte, k=spec.knn_k, temperature=spec.knn_temperature,
                                       num_classes=num_classes),
               "knn_dino_top1": knn_correct(xtr, ytr, xte, yte, k=spec.knn_dino_k,
                                            temperature=spec.knn_dino_temperature, num_classes=num_classes)}
    probe = linear_probe(xtr, ytr, xte, yte, **spec.probe_kwargs())
    correct["linear_probe_top1"] = probe.correct
    if probe_head is not None and probe.head is not None:
        probe_head.update(probe.head, classes=list(train_ds.class_names))
    out = {"knn_top1": float(correct["knn_top1"].astype(np.float64).mean()),
           "knn_dino_top1": float(correct["knn_dino_top1"].astype(np.float64).mean()),
           "knn_min_class_bank": float(smallest),
           "linear_probe_top1": probe.top1, "linear_probe_train_top1": probe.train_top1,
           "linear_probe_C": probe.C}
    if spec.lowshot_fractions:
        lowshot = lowshot_linear_probe(xtr, ytr, xte, yte, spec.lowshot_fractions, seed=spec.lowshot_seed,
                                       C=spec.probe_C, max_iter=spec.probe_max_iter)
        out.update({lowshot_metric(f): r.top1 for f, r in lowshot.items()})
    if classifier is not None:
        was_training = classifier.training
        classifier.eval()
        ref = next(itertools.chain(classifier.parameters(), classifier.buffers()), None)
        feats = xte.to(device) if ref is None else xte.to(device=ref.device, dtype=ref.dtype)
        pred = classifier(feats).argmax(1).cpu()
        classifier.train(was_training)
        out["classifier_top1"] = float((pred == yte).double().mean())
        correct["classifier_top1"] = (pred == yte).numpy().astype(bool)
    if per_image is not None:
        per_image.update(correct)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def validation_top1(model: torch.nn.Module, bank_ds: ImageDataset, val_ds: ImageDataset, spec: EvalSpec, *,
                    image_size: int, mean, std, device: str | torch.device = "cpu") -> float:
    """:data:`VAL_METRIC`: DINO's weighted k-NN top-1 (``spec.knn_dino_k``, ``spec.knn_dino_temperature``) of the
    images of ``val_ds`` against the bank ``bank_ds`` (the train images the cell trains on), in [0, 1].

    ``model`` maps images ``(B, 3, image_size, image_size)`` to features ``(B, F)``; it is embedded in eval mode
    and its modes are restored (:func:`smn_core.evaluation.compute_embeddings`). Torch's CPU random state is
    restored afterwards, so a training run that validates after every epoch draws the same augmentations as
    one that does not.
    """
    tf = eval_transform(image_size, mean, std)
    with torch.random.fork_rng(devices=[]):
        xb, yb = compute_embeddings(model, SeededViewDataset(bank_ds, tf), batch_size=spec.batch_size, device=device)
        xv, yv = compute_embeddings(model, SeededViewDataset(val_ds, tf), batch_size=spec.batch_size, device=device)
    correct = knn_correct(xb, yb, xv, yv, k=min(spec.knn_dino_k, len(bank_ds)), temperature=spec.knn_dino_temperature,
                          num_classes=len(bank_ds.class_names))
    return float(np.asarray(correct, dtype=np.float64).mean())


def _with_validation(hook: Callable | None, check: Callable[[], float]) -> Callable:
    """An ``on_epoch_end`` that adds :data:`VAL_METRIC` (``check()``) to the epoch's metrics (in place: the
    history and the curves keep it) before it calls ``hook``."""
    def on_epoch_end(epoch: int, metrics: dict, state_fn) -> None:
        metrics[VAL_METRIC] = check()
        if hook is not None:
            hook(epoch, metrics, state_fn)
    return on_epoch_end


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, dataset: ImageDataset, *, image_size: int, mean, std,
                         batch_size: int = 256, device: str | torch.device = "cpu") -> int:
    """Re-estimate every BatchNorm's running statistics on ``dataset``'s unaugmented images, in place.

    The ``pretrained_bn`` control (what BN adaptation alone does to the frozen backbone, without one mask
    bit flipped): the running mean and variance are reset and replaced by the cumulative average over
    one pass of the eval transform (:func:`torch.optim.swa_utils.update_bn`); weights, biases and the
    affine BN parameters are untouched. Images ``(B, 3, image_size, image_size)``.

    Returns:
        The number of BatchNorm layers re-estimated (0: the model has none and is unchanged).
    """
    from torch.optim.swa_utils import update_bn

    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n_bn:
        loader = torch.utils.data.DataLoader(SeededViewDataset(dataset, eval_transform(image_size, mean, std)),
                                             batch_size=batch_size, shuffle=False)
        was_training = model.training
        update_bn(loader, model, device=torch.device(device))
        model.train(was_training)
    return n_bn


def clip_text_classifier(backbone: Backbone, class_names: Sequence[str], template: str) -> CosineClassifier:
    """CLIP's zero-shot head for ``class_names`` (paper Sec. 4.1, "Supervised Transformers").

    Encodes ``template.format(name)`` for each class with the backbone's CLIP text tower
    (:func:`smn_core.backbones.build_clip_text_head`) and wraps the ``(C, 512)`` embeddings in a frozen
    :class:`smn_core.training.CosineClassifier` whose logit scale is CLIP's own ``exp(logit_scale)``
    (100 for the OpenAI weights).

    Raises:
        ValueError: if ``backbone`` is not a CLIP backbone (names its arch), or a bad template / class name.
    """
    if "clip_model" not in backbone.extras:
        raise ValueError(f"classifier 'clip_text' needs a CLIP backbone, got {backbone.arch!r}; allowed: clip_vit_b32")
    emb = build_clip_text_head(list(class_names), template, backbone=backbone)
    scale = float(backbone.extras["clip_model"].logit_scale.detach().exp())
    return CosineClassifier(emb.cpu(), scale)


def labelled_subset(ds: ImageDataset, fraction: float, *, seed: int = 0, min_size: int = 1) -> ImageDataset:
    """The labelled part of a low-shot training set (paper Fig. 3): a per-class sample of ``ds``.

    ``fraction`` of each class, at least one example per class (:func:`smn_core.evaluation.per_class_sample`);
    when that is fewer than ``min_size`` examples (one batch), the sample is repeated (each copy gets its
    own augmentation) until an epoch holds ``min_size`` items, so a training epoch is never empty.

    Raises:
        ValueError: ``fraction`` outside (0, 1] or ``min_size`` < 1.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    keep = per_class_sample(ds.targets, fraction, seed=seed)
    reps = -(-min_size // len(keep))
    return subset(ds, np.tile(keep, reps))


def _before_training(cfg: CellConfig, backbone: Backbone, model: torch.nn.Module, train_ds: ImageDataset, size: int, *,
                     fresh: bool, seeded: bool, train_subset: Sequence[int] | None, device: str | torch.device,
                     progress: Callable[[str], None] | None) -> tuple[dict[str, float], torch.Tensor | None]:
    """What a cell measures on the frozen backbone before any training: ``(metrics, head features)``.

    ``pretrained_bn`` re-estimates BN statistics (``bn_layers``); a SwAV run that is not seeded from another
    state records the view-strength check (``view_cos_*``, measured on the frozen backbone with its own
    seeded sample and views, so a run resumed from an epoch checkpoint records the same values as an
    uninterrupted one); a fresh one (not resumed, not seeded) with ``swav.head_init: pca_kmeans`` returns the
    ``(N, F)`` embeddings of its training images to initialise the head from (else None).
    """
    metrics: dict[str, float] = {}
    training = METHODS[cfg.method]
    if cfg.method == "pretrained_bn":
        metrics["bn_layers"] = float(reestimate_batchnorm(model, train_ds, image_size=size, mean=backbone.mean,
                                                          std=backbone.std, batch_size=cfg.eval.batch_size,
                                                          device=device))
    swav = training is not None and cfg.train.objective == "swav"
    swav_fresh = swav and fresh
    if swav and not seeded:  # also when resumed: a resumed cell writes every metric an uninterrupted one does
        views = view_similarity(model, train_ds, MultiCropTransform(size, cfg.train.multicrop, backbone.mean,
                                                                    backbone.std), seed=cfg.seed, device=device)
        metrics.update(view_cos_same=views.same, view_cos_other=views.other, view_cos_gap=views.gap)
        if views.warning and progress is not None:
            progress(f"warning: {views.warning}")
    if not (swav_fresh and cfg.train.swav.head_init == "pca_kmeans"):
        return metrics, None
    head_ds = train_ds if train_subset is None else subset(train_ds, train_subset)
    head_features, _ = compute_embeddings(model, SeededViewDataset(head_ds, eval_transform(size, backbone.mean,
                                                                                             backbone.std)),
                                          batch_size=cfg.eval.batch_size, device=device)
    return metrics, head_features


def _training_data(cfg: CellConfig, train_ds: ImageDataset, train_subset: Sequence[int] | None,
                   metrics: dict[str, float]) -> ImageDataset:
    """The images a cell adapts on: its subset of the train split, cut to the labelled share (Fig. 3)."""
    adapt_ds = train_ds if train_subset is None else subset(train_ds, train_subset)
    if cfg.dataset.label_fraction is not None:  # low-shot supervised training (Fig. 3)
        # the labelled share is repeated to the length of the whole split: a low-shot run takes as many
        # steps as a full-label (or unlabeled SMN) run of the same epochs
        adapt_ds = labelled_subset(adapt_ds, cfg.dataset.label_fraction, seed=cfg.dataset.split_seed,
                                   min_size=max(len(adapt_ds), cfg.train.batch_size))
        metrics["num_labelled"] = float(np.unique(adapt_ds.source_indices).size)
    return adapt_ds


def _training_metrics(result: TrainResult, seconds: float) -> dict[str, float]:
    """A training run's ledger metrics: time, steps, final loss, collapse, resume, per-epoch losses (Fig. 5)."""
    metrics = dict(train_seconds=seconds, steps=float(result.steps), train_loss=result.history[-1]["loss"],
                   collapsed=float(result.collapse is not None or result.collapse_epoch is not None),
                   collapse_epoch=float(0 if result.collapse_epoch is None else result.collapse_epoch + 1),
                   stopped_early=float(result.stopped_early), resumed_from_epoch=float(result.resumed_from_epoch))
    metrics.update({f"train_loss@{int(h['epoch']) + 1}": float(h["loss"]) for h in result.history})  # Fig. 5
    for key in ("code_entropy", "prediction_information"):
        if key in result.history[-1]:
            metrics[key] = result.history[-1][key]
    return metrics


@dataclass
class _Adapted:
    result: TrainResult
    state: dict[str, torch.Tensor]
    classifier: torch.nn.Module | None
    masks: dict[str, torch.Tensor] | None


def _adapt(cfg: CellConfig, backbone: Backbone, model: torch.nn.Module, train_ds: ImageDataset, size: int, *,
           train_subset: Sequence[int] | None, head: torch.nn.Module | None, head_features: torch.Tensor | None,
           metrics: dict[str, float], device: str | torch.device, train_kw: dict[str, Any]) -> _Adapted:
    """Attach masks (masking methods), build the head, train on the cell's training images
    (:func:`_training_data`), and add the training and mask metrics to ``metrics``."""
    if cfg.train.adaptation == "mask":
        attach_masks(model, cfg.train.mask)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    adapt = build_adaptation_model(model, backbone.feature_dim, cfg.train, num_classes=len(train_ds.class_names),
                                   classifier=head)
    if head_features is not None:
        init_head_from_features(adapt.swav.head, head_features, seed=cfg.seed)
    adapt_ds = _training_data(cfg, train_ds, train_subset, metrics)
    result = train(adapt, adapt_ds, cfg.train, image_size=size, mean=backbone.mean, std=backbone.std, device=device,
                   **train_kw)
    state = {k: v.cpu() for k, v in trainable_state(adapt).items()}
    metrics.update(_training_metrics(result, time.perf_counter() - t0))
    masks = None
    if mask_modules(model):
        masks = export_masks(model)
        density, _ = mask_density(masks)
        metrics.update(density=density, mask_bits=float(sum(m.numel() for m in masks.values())),
                       trainable_masks=float(trainable_mask_count(model)))
    return _Adapted(result=result, state=state, masks=masks,
                    classifier=adapt.classifier if cfg.train.objective == "supervised" else None)


def _storage_bits(cfg: CellConfig, metrics: dict[str, float], backbone_params: int) -> float:
    """Bits one task costs on top of the shared backbone (paper Table 1 "Size")."""
    if METHODS[cfg.method] is None:
        return 0.0
    if cfg.train.adaptation == "mask":
        return metrics.get("trainable_masks", 0.0)
    return 32.0 * backbone_params


def run_cell(
    cfg: CellConfig,
    *,
    pipeline_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    on_epoch_end: Callable | None = None,
    progress: Callable[[str], None] | None = None,
    evaluate: bool = True,
    train_subset: Sequence[int] | None = None,
) -> CellOutcome:
    """Run one cell in this process (or this distributed worker; then every worker calls it).

    Args:
        cfg: the cell.
        pipeline_weights: pretraining artifact for ``backbone.weights == "pipeline"``.
        device: torch device.
        resume / init_state / on_epoch_end / progress: passed to :func:`smn_core.training.train`.
        evaluate: run the evaluation (distributed runs evaluate on rank 0 only).
        train_subset: indices into the train split to adapt on (a cascade expert's cluster, paper
            Sec. 3.4); None adapts on the whole split. Evaluation always uses the whole split.

    Returns:
        A :class:`CellOutcome`. Metrics: ``knn_top1``, ``linear_probe_top1``, and for adapted models
        ``density``, ``mask_bits`` (number of masked weights = bits of one uncompressed mask),
        ``trainable_masks`` (positions with a trainable mask: fewer than ``mask_bits`` under selective
        masking, App. F), ``train_loss``, ``train_seconds``, ``steps``, ``collapsed`` (1.0 if SwAV
        collapse was detected in the last epoch or made ``train.on_collapse`` act), ``collapse_epoch``
        (1-based first epoch of that collapse, 0 if none), ``stopped_early`` (1.0 if
        ``on_collapse: stop`` ended the run), and for SwAV the view-strength check
        (:func:`smn_core.view_strength.view_similarity`: ``view_cos_same``, ``view_cos_other``,
        ``view_cos_gap`` of the frozen backbone, before training). ``pretrained_bn`` reports ``bn_layers``.
        Always: ``backbone_params`` (parameters of the backbone) and ``storage_bits``, the bits one
        task costs on top of the shared backbone (paper Table 1 "Size"): ``trainable_masks`` for masking,
        32 x backbone parameters for full fine-tuning (an fp32 copy), 0 for the frozen backbone.
        Trained cells also report ``resumed_from_epoch`` (0 for an uninterrupted run),
        ``train_loss@<epoch>`` (1-based; the loss curves of Fig. 5) and, for
        supervised objectives, ``classifier_top1`` (the trained head's test accuracy: Table 1's FFT and
        Mask rows) and, with ``dataset.label_fraction``, ``num_labelled``. ``eval.lowshot_fractions`` adds
        ``lowshot_top1@<fraction>`` (Fig. 3). With ``train.dtype: float64`` the evaluation runs in float64.
        With ``train.classifier: clip_text`` the supervised head is CLIP's frozen text-embedding head
        (:func:`clip_text_classifier`).
    """
    if cfg.method in CONTROLS:
        raise ValueError(f"method {cfg.method!r} is a random-mask control: it is evaluated from its SMN cell's mask "
                         "(smn_core.random_mask.evaluate_random_mask), not run by run_cell")
    torch.manual_seed(cfg.seed)  # random initialisations (backbone, heads) depend on the cell's seed only
    backbone = prepare_backbone(cfg.backbone, pipeline_weights=pipeline_weights)
    train_ds, test_ds = load_cell_data(cfg.dataset)
    val_ds = test_ds if cfg.dataset.val_fraction is not None else None  # load_cell_data held it out of train
    size = _image_size(cfg.dataset, backbone)
    training = METHODS[cfg.method]
    head = None
    if training is not None and training[0] == "supervised" and cfg.train.classifier == "clip_text":
        head = clip_text_classifier(backbone, train_ds.class_names, cfg.train.prompt_template)  # on the CPU
    model = backbone.model.to(device)
    backbone_params = sum(p.numel() for p in model.parameters())
    metrics, head_features = _before_training(cfg, backbone, model, train_ds, size, fresh=resume is None and init_state
                                              is None, seeded=init_state is not None, train_subset=train_subset,
                                              device=device, progress=progress)
    trained_dtype = getattr(torch, cfg.train.dtype) if training is not None else torch.float32
    as_trained = model if trained_dtype == torch.float32 else _CastInput(model, trained_dtype)
    check = None
    if val_ds is not None:
        check = functools.partial(validation_top1, as_trained, train_ds, val_ds, cfg.eval, image_size=size,
                                  mean=backbone.mean, std=backbone.std, device=device)
    adapted = None
    if training is not None:
        if check is not None:
            on_epoch_end = _with_validation(on_epoch_end, check)
        adapted = _adapt(cfg, backbone, model, train_ds, size, train_subset=train_subset, head=head,
                         head_features=head_features, metrics=metrics, device=device,
                         train_kw=dict(resume=resume, init_state=init_state, on_epoch_end=on_epoch_end,
                                       progress=progress))
    per_image: dict[str, np.ndarray] | None = None
    probe_head: dict[str, Any] = {}
    if check is not None and not evaluate:  # the evaluation below reports val_knn_dino_top1 itself
        metrics[VAL_METRIC] = check()
    if evaluate:
        eval_model = as_trained
        per_image = {}
        with warnings.catch_warnings():  # recorded as knn_min_class_bank; the orchestrator's driver says it once
            warnings.simplefilter("ignore", SmallKnnBankWarning)
            metrics.update(eval_split_names(cfg.dataset, evaluate_model(
                eval_model, train_ds, test_ds, cfg.eval, image_size=size, mean=backbone.mean, std=backbone.std,
                device=device, classifier=adapted.classifier if adapted else None, per_image=per_image,
                probe_head=probe_head)))
        per_image = eval_split_names(cfg.dataset, per_image)
    metrics["num_train"] = float(len(train_ds))  # the ledger's column order: num_train, then num_test
    metrics.update(eval_split_names(cfg.dataset, {"num_test": float(len(test_ds))}))
    metrics["backbone_params"] = float(backbone_params)
    metrics["storage_bits"] = _storage_bits(cfg, metrics, backbone_params)
    if adapted is None:
        return CellOutcome(metrics=metrics, masks=None, history=[], train_result=None, state=None,
                           per_image=per_image or None)
    return CellOutcome(metrics=metrics, masks=adapted.masks, history=adapted.result.history,
                       train_result=adapted.result, state=adapted.state, per_image=per_image or None,
                       probe_head=probe_head or None)
