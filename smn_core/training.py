"""The per-worker training loop: self-masking, supervised masking and full fine-tuning.

One loop serves every adaptation method of the paper (Sec. 3, 4.1):

* ``objective="swav"``: SwAV on multi-crop views (self-masking, SMN; with ``adaptation="full"`` the
  self-training network, STN).
* ``objective="supervised"``: cross-entropy with a new linear head (supervised masking; with
  ``adaptation="full"`` full fine-tuning, FFT, or the pipeline's own supervised pretraining).

The loop runs unchanged in-process and inside a Ray Train worker: when ``torch.distributed`` is
initialised it wraps the model in ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU), shards the
data with ``DistributedSampler`` and divides the global batch by the number of workers. Views are
augmented with a per-(seed, epoch, image) random state, so a W-worker run sees exactly the global
batches of a 1-worker run.

Optimiser (paper Sec. 4.1): SGD, momentum 0.9; scores lr 50 with no weight decay; head and
prototypes lr 0.15 (weight decay 1e-6); fine-tuned weights ``weight_lr`` with ``weight_decay``;
a per-step cosine schedule with optional linear warmup.

BatchNorm during adaptation (``bn_mode``; NOTES.md): ``"adapt"`` uses batch statistics and updates
the running statistics on the target data (the reference code's implicit behaviour; on a GPU with
several workers BN layers become ``SyncBatchNorm`` so all workers compute the same function;
SyncBatchNorm does not run on CPU, there each worker normalises with its own batch); ``"frozen"``
keeps BN in eval mode with the pretrained statistics.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .augment import MultiCropTransform, SeededViewDataset, collate_views, supervised_train_transform
from .config import SwAVConfig, TrainConfig
from .masking import mask_density, mask_modules, score_parameters, set_topk_density
from .swav import SwAV, detect_collapse

__all__ = ["TrainConfig", "TrainResult", "TrainSetup", "AdaptationModel", "CosineClassifier", "CollapseWatch",
           "train", "setup_training", "train_one_epoch", "checkpoint_state", "build_optimizer",
           "build_adaptation_model", "trainable_state", "copy_state", "lr_factor", "lr_schedule"]


@dataclass
class TrainResult:
    """What a training run returns.

    Attributes:
        history: one dict per epoch (``epoch``, ``loss``, ``lr``, ``code_entropy``, ``density``, ``seconds``).
        steps: optimisation steps taken in total (including resumed ones).
        collapse: None, or the sentence of :func:`smn_core.swav.detect_collapse` for the last epoch.
        resumed_from_epoch: the epoch the run resumed at (0 for a fresh run).
        collapse_epoch: first epoch (0-based) of the collapsed streak that made ``on_collapse`` act, or None.
        stopped_early: True when ``on_collapse="stop"`` ended the run before ``epochs``.
    """

    history: list[dict[str, float]]
    steps: int
    collapse: str | None
    resumed_from_epoch: int
    collapse_epoch: int | None = None
    stopped_early: bool = False


class CosineClassifier(nn.Module):
    """Frozen zero-shot head of CLIP: ``logits = scale * normalize(f) @ normalize(W).T``.

    Args:
        class_embeddings: ``(C, F)`` text embeddings of the class prompts (e.g. from
            :func:`smn_core.backbones.build_clip_text_head`); rows are L2-normalised here and stored as
            the buffer ``weight`` (not trained: a mask is the only thing a task stores, Table 1).
        logit_scale: multiplier of the cosine similarities (CLIP's ``logit_scale.exp()``: 100 for the
            OpenAI weights), > 0.

    ``forward(features (B, F)) -> logits (B, C)``. Source: paper Sec. 4.1 ("Supervised Transformers":
    the CLIP head, cosine similarity between image and text embeddings as logits, cross-entropy).

    Raises:
        ValueError: if ``class_embeddings`` is not 2-D with at least 2 rows, or ``logit_scale`` <= 0.
    """

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        if class_embeddings.ndim != 2 or class_embeddings.shape[0] < 2:
            raise ValueError(f"class_embeddings must have shape (C >= 2, F), got {tuple(class_embeddings.shape)}")
        if not math.isfinite(float(logit_scale)) or float(logit_scale) <= 0:
            raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
        self.register_buffer("weight", F.normalize(class_embeddings.detach().clone().float(), dim=-1))
        self.logit_scale = float(logit_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ self.weight.to(features.dtype).t()


class AdaptationModel(nn.Module):
    """Backbone plus the training head, with the whole step's forward in one ``forward``.

    One forward per step keeps ``DistributedDataParallel`` correct when the backbone runs once per
    crop resolution (multi-crop). ``forward(views: list of (B,3,s,s), labels (B,)) -> (loss, stats)``.
    The supervised head is a new ``nn.Linear(feature_dim, num_classes)`` unless ``classifier`` is
    given (e.g. a frozen :class:`CosineClassifier` for CLIP).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, objective: str, *,
                 swav: SwAVConfig | None = None, num_classes: int | None = None,
                 classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        if objective == "swav":
            self.swav = SwAV(feature_dim, swav or SwAVConfig())
        elif classifier is not None:
            self.classifier = classifier
        else:
            if not num_classes or num_classes < 2:
                raise ValueError(f"supervised objective needs num_classes >= 2, got {num_classes}")
            self.classifier = nn.Linear(feature_dim, num_classes)

    def head_parameters(self) -> list[nn.Parameter]:
        head = self.swav.head if self.objective == "swav" else self.classifier
        return list(head.parameters())

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.objective == "supervised":
            logits = self.classifier(self.backbone(views[0]))
            loss = F.cross_entropy(logits, labels)
            return loss, {"correct": (logits.argmax(1) == labels).sum().detach()}
        # group consecutive views of equal resolution into one backbone pass (SwAV multi-crop)
        feats: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            out = self.backbone(torch.cat(views[start:end]))
            feats.extend(out.chunk(end - start))
            start = end
        return self.swav(feats)


def build_adaptation_model(backbone: nn.Module, feature_dim: int, config: TrainConfig,
                           num_classes: int | None = None, *, classifier: nn.Module | None = None) -> AdaptationModel:
    """Wrap a (masked or plain) backbone with the objective's head, seeded by ``config.seed``.

    For ``adaptation="full"`` every backbone parameter is made trainable; for ``"mask"`` the
    backbone must already carry masks (``smn_core.masking.attach_masks``). ``classifier`` replaces the
    new linear head of the supervised objective (required when ``config.classifier == "clip_text"``).

    Raises:
        ValueError: if ``adaptation="mask"`` and the backbone has no masks, or ``config.classifier`` is
            ``"clip_text"`` for the supervised objective and no ``classifier`` is given.
    """
    if config.adaptation == "mask" and not mask_modules(backbone):
        raise ValueError("adaptation 'mask' needs a backbone with masks attached (smn_core.masking.attach_masks)")
    if config.objective == "supervised" and config.classifier == "clip_text" and classifier is None:
        raise ValueError("classifier 'clip_text' needs the text-embedding head (a CosineClassifier); "
                         "smn_core.pipeline.run_cell builds it from the class names")
    if config.adaptation == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AdaptationModel(backbone, feature_dim, config.objective, swav=config.swav, num_classes=num_classes,
                               classifier=classifier if config.objective == "supervised" else None)


def lr_factor(step: int, total: int, warmup: int, schedule: str, delay: int = 0) -> float:
    """Learning-rate multiplier at optimisation ``step`` (0-based) of ``total`` steps.

    0 for the first ``delay`` steps (a group held still: LP-FT's head-only start), then a linear warmup
    over ``warmup`` steps to 1, then ``schedule``: ``"cosine"`` decays to 0 at ``total``, ``"constant"``
    stays at 1. Source: paper Sec. 4.1 (linear warmup then cosine).
    """
    if step < delay:
        return 0.0
    step, total = step - delay, total - delay
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_schedule(total: int, warmup: int, schedule: str, delay: int = 0) -> np.ndarray:
    """:func:`lr_factor` at every step ``0 .. total - 1``, as a ``(total,)`` float64 array (DINO's
    precomputed per-iteration schedules; multiply by a group's base learning rate)."""
    return np.array([lr_factor(step, total, warmup, schedule, delay) for step in range(total)], dtype=np.float64)


def _set_bn_mode(model: nn.Module, bn_mode: str) -> None:
    if bn_mode == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def trainable_state(model: AdaptationModel) -> dict[str, torch.Tensor]:
    """Every trainable parameter (``param.<name>``: scores, head, prototypes, or all weights for full
    fine-tuning) and every buffer (``buffer.<name>``: BN statistics, SwAV queue) of ``model``, cloned."""
    state = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"buffer.{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def _optimizer_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        if st.get("momentum_buffer") is not None:
            out[f"optim.{idx}.momentum_buffer"] = st["momentum_buffer"].detach().clone()
    return out


def copy_state(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
               keep_buffer=None) -> None:
    """Copy a saved state's ``param.<name>`` / ``buffer.<name>`` tensors (:func:`trainable_state`'s keys) in place,
    without autograd, into ``params[name]`` / ``buffers[name]``; other keys are ignored, and so is a buffer for which
    ``keep_buffer(name)`` is False (``None``: every buffer).

    Raises:
        KeyError: a ``param.`` name not in ``params`` (or a kept ``buffer.`` name not in ``buffers``).
        RuntimeError: a tensor whose shape does not match its target.
    """
    with torch.no_grad():
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            if kind == "param":
                params[name].copy_(value)
            elif kind == "buffer" and (keep_buffer is None or keep_buffer(name)):
                buffers[name].copy_(value)


def _restore(model: AdaptationModel, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    copy_state(dict(model.named_parameters()), dict(model.named_buffers()), tensors)
    sd = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            idx = int(key.split(".")[1])
            sd["state"].setdefault(idx, {})["momentum_buffer"] = value.clone()
    opt.load_state_dict(sd)


@dataclass
class TrainSetup:
    """Everything one training run builds before its first step (:func:`setup_training`).

    Attributes:
        config: the run's hyperparameters.
        core: the model being trained (after the dtype cast and, on several GPUs with ``bn_mode="adapt"``,
            the ``SyncBatchNorm`` conversion); ``runner`` is what the loop calls: ``core`` itself, or its
            ``DistributedDataParallel`` wrapper when ``torch.distributed`` is initialised.
        optimizer: SGD over two parameter groups, ``[head, scores or backbone weights]``.
        lr_schedules: one array per parameter group, the learning rate at every optimisation step
            ``0 .. total_steps - 1`` (:func:`lr_schedule` times the group's base lr).
        views, sampler, loader: the seeded view dataset, its ``DistributedSampler`` and the ``DataLoader``.
        steps_per_epoch, total_steps: optimisation steps per epoch (capped by ``max_steps_per_epoch``) and
            in the whole run.
        queue_start_epoch: first epoch (0-based) with the SwAV queue on.
        device, dtype: where and in which float type the model and the inputs live.
        distributed, world, rank: the ``torch.distributed`` context (False, 1, 0 in-process).
        start_epoch, start_step, history: where the run starts (0, 0, [] unless resumed) and the history
            of the epochs before it.
    """

    config: TrainConfig
    core: AdaptationModel
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedules: list[np.ndarray]
    views: SeededViewDataset
    sampler: DistributedSampler
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    queue_start_epoch: int
    device: torch.device
    dtype: torch.dtype
    distributed: bool
    world: int
    rank: int
    start_epoch: int
    start_step: int
    history: list[dict[str, float]]


def _build_loader(dataset, config: TrainConfig, image_size: int, mean, std, world: int,
                  rank: int) -> tuple[SeededViewDataset, DistributedSampler, DataLoader]:
    """The augmented views of ``dataset`` (multi-crop for SwAV, one view otherwise), sharded over ``world``."""
    if config.objective == "swav":
        transform = MultiCropTransform(image_size, config.multicrop, mean, std)
    else:
        transform = _single_view(supervised_train_transform(image_size, mean, std))
    views = SeededViewDataset(dataset, transform, seed=config.seed)
    sampler = DistributedSampler(views, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=True)
    loader = DataLoader(views, batch_size=config.batch_size // world, sampler=sampler, drop_last=True,
                        num_workers=config.loader_workers, collate_fn=collate_views,
                        persistent_workers=config.loader_workers > 0)
    return views, sampler, loader


def _group_lr_schedules(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> list[np.ndarray]:
    """Per-step learning rates of the two parameter groups ``[head, scores or backbone weights]`` (Sec. 4.1)."""
    warmup_epochs = config.warmup_epochs
    if config.adaptation == "full" and config.weight_warmup_epochs is not None:
        warmup_epochs = config.weight_warmup_epochs
    head_only = min(config.head_only_steps, total_steps - 1) if config.adaptation == "mask" else 0
    head_warmup = config.head_warmup_epochs
    if head_warmup is None:
        head_warmup = 0.0 if config.objective == "swav" else warmup_epochs
    body_lr = config.score_lr if config.adaptation == "mask" else config.weight_lr
    return [config.head_lr * lr_schedule(total_steps, int(round(head_warmup * steps_per_epoch)), config.schedule),
            body_lr * lr_schedule(total_steps, int(round(warmup_epochs * steps_per_epoch)), config.schedule,
                                  head_only)]


def build_optimizer(core: AdaptationModel, config: TrainConfig) -> torch.optim.SGD:
    """The optimiser of :func:`train` (paper Sec. 4.1): SGD with momentum ``config.momentum`` over two groups,
    ``[head (head_lr, head_weight_decay), scores (score_lr, no weight decay) or, for adaptation "full",
    the trainable backbone weights (weight_lr, weight_decay)]``, at the groups' base learning rates."""
    groups = [{"params": core.head_parameters(), "lr": config.head_lr, "weight_decay": config.head_weight_decay}]
    if config.adaptation == "mask":
        groups.append({"params": list(score_parameters(core.backbone).values()), "lr": config.score_lr,
                       "weight_decay": 0.0})
    else:
        groups.append({"params": [p for p in core.backbone.parameters() if p.requires_grad],
                       "lr": config.weight_lr, "weight_decay": config.weight_decay})
    return torch.optim.SGD(groups, lr=config.head_lr, momentum=config.momentum)


def setup_training(model: AdaptationModel, dataset, config: TrainConfig, *, image_size: int,
                   mean: tuple[float, float, float], std: tuple[float, float, float],
                   device: str | torch.device = "cpu",
                   resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
                   init_state: dict[str, torch.Tensor] | None = None) -> TrainSetup:
    """Build a run's loader, per-step learning-rate schedules and optimiser, move ``model`` to ``device``
    and restore ``resume`` (or start from ``init_state``).

    Arguments as in :func:`train`. The model is cast to ``config.dtype``; on several CUDA workers with
    ``bn_mode="adapt"`` its BatchNorm layers become ``SyncBatchNorm``. Under ``torch.distributed`` the
    global batch is split over the workers and the runner is a ``DistributedDataParallel`` wrapper.

    Raises:
        ValueError: if ``config.batch_size`` is not divisible by the number of workers, or the dataset
            holds fewer samples than one global batch.
    """
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {world} workers")
    if len(dataset) < config.batch_size:
        raise ValueError(f"dataset has {len(dataset)} samples, fewer than one batch of {config.batch_size}")
    views, sampler, loader = _build_loader(dataset, config, image_size, mean, std, world, rank)
    steps_per_epoch = len(loader)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    dtype = getattr(torch, config.dtype)
    model.to(device=device, dtype=dtype)
    if distributed and device.type == "cuda" and config.bn_mode == "adapt":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[assignment]
    opt = build_optimizer(model, config)
    start_epoch, start_step, history = _start_state(model, opt, device, resume, init_state)
    runner: nn.Module = model
    if distributed:
        runner = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                     device_ids=[device.index] if device.type == "cuda" else None)
    return TrainSetup(config=config, core=model, runner=runner, optimizer=opt,
                      lr_schedules=_group_lr_schedules(config, steps_per_epoch, total_steps), views=views,
                      sampler=sampler, loader=loader, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                      queue_start_epoch=int(round(config.swav.queue_start_fraction * config.epochs)),
                      device=device, dtype=dtype, distributed=distributed, world=world, rank=rank,
                      start_epoch=start_epoch, start_step=start_step, history=history)


def _start_state(core: AdaptationModel, opt: torch.optim.Optimizer, device: torch.device,
                 resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
                 init_state: dict[str, torch.Tensor] | None) -> tuple[int, int, list[dict[str, float]]]:
    """``(start epoch, step, history)``: restored from ``resume``, else fresh (seeded by ``init_state``)."""
    if resume is not None:
        tensors, meta = resume
        _restore(core, opt, {k: v.to(device) for k, v in tensors.items()})
        return int(meta["epoch"]) + 1, int(meta["step"]), list(meta.get("history", []))
    if init_state is not None:
        _restore(core, opt, {k: v.to(device) for k, v in init_state.items()
                             if k.startswith(("param.", "buffer.")) and ".queue" not in k})
    return 0, 0, []


class _EpochTotals:
    """What one worker sums over an epoch's steps: losses, SwAV code counts and information, correct labels."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.code_counts: torch.Tensor | None = None
        self.information: list[torch.Tensor] = []
        self.n_correct = 0
        self.n_seen = 0

    def add(self, loss: torch.Tensor, stats: dict, batch_size: int) -> None:
        self.losses.append(loss.detach())
        if "code_counts" in stats:
            counts = stats["code_counts"]
            self.code_counts = counts if self.code_counts is None else self.code_counts + counts
        if "prediction_information" in stats:
            self.information.append(stats["prediction_information"])
        if "correct" in stats:
            self.n_correct += int(stats["correct"])
            self.n_seen += batch_size


def _mean_over_workers(value: torch.Tensor, setup: TrainSetup) -> torch.Tensor:
    if setup.distributed:
        dist.all_reduce(value)
        value /= setup.world
    return value


def _begin_epoch(setup: TrainSetup, epoch: int) -> None:
    """Per-epoch state: the progressive top-k density (App. E), the SwAV queue, data order, train mode."""
    config, core = setup.config, setup.core
    if config.adaptation == "mask" and config.mask.mode == "topk" and config.progressive_topk:
        final = float(config.mask.topk_density)
        frac = 1.0 if config.epochs == 1 else epoch / (config.epochs - 1)
        set_topk_density(core.backbone, 1.0 - (1.0 - final) * frac)
    if config.objective == "swav" and epoch >= setup.queue_start_epoch:
        core.swav.start_queue()
    setup.sampler.set_epoch(epoch)
    setup.views.set_epoch(epoch)
    setup.runner.train()
    _set_bn_mode(core.backbone, config.bn_mode)  # the backbone's BN only: a head's own BN always trains


def _train_step(setup: TrainSetup, batch_views: list[torch.Tensor], labels: torch.Tensor, step: int,
                totals: _EpochTotals) -> None:
    """One optimisation step at global step ``step`` (0-based): set the lrs, forward, backward, update."""
    config, core, opt = setup.config, setup.core, setup.optimizer
    for g, lrs in zip(opt.param_groups, setup.lr_schedules):
        g["lr"] = float(lrs[step])
    if config.objective == "swav":
        core.swav.head.normalize_prototypes()
    batch_views = [v.to(setup.device, dtype=setup.dtype, non_blocking=True) for v in batch_views]
    labels = labels.to(setup.device)
    loss, stats = setup.runner(batch_views, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if config.objective == "swav" and step < config.swav.freeze_prototypes_steps:
        core.swav.head.prototypes.weight.grad = None
    opt.step()
    totals.add(loss, stats, labels.shape[0])


def _epoch_metrics(setup: TrainSetup, totals: _EpochTotals, epoch: int, seconds_since: float) -> dict[str, float]:
    """The epoch's loss (mean over steps and workers), last lr, seconds and, for SwAV, the code entropy
    (normalised to [0, 1]) and prediction information, reduced over the workers."""
    epoch_loss = _mean_over_workers(torch.stack(totals.losses).mean(), setup)
    metrics: dict[str, float] = {"epoch": epoch, "loss": float(epoch_loss), "lr": setup.optimizer.param_groups[0]["lr"],
                                 "seconds": time.perf_counter() - seconds_since}
    if totals.code_counts is not None:
        if setup.distributed:
            dist.all_reduce(totals.code_counts)
        p = totals.code_counts / totals.code_counts.sum()
        metrics["code_entropy"] = float(torch.special.entr(p).sum() / math.log(len(p)))
        if totals.information:
            info = _mean_over_workers(torch.stack(totals.information).mean(), setup)
            metrics["prediction_information"] = float(info)
    return metrics


class CollapseWatch:
    """SwAV collapse detection across epochs (:func:`smn_core.swav.detect_collapse`, ``on_collapse``).

    ``streak`` counts consecutive collapsed epochs (a resumed run continues the streak of its history);
    ``collapse`` is the last epoch's verdict, ``collapse_epoch`` the first epoch of the streak that
    reached ``collapse_patience``.
    """

    def __init__(self, config: TrainConfig, history: list[dict[str, float]]) -> None:
        self.config = config
        self.collapse: str | None = None
        self.collapse_epoch: int | None = None
        self.streak = 0
        for h in history:
            self.streak = self.streak + 1 if h.get("collapsed") else 0

    def observe(self, metrics: dict[str, float]) -> None:
        """Judge one SwAV epoch (metrics with ``code_entropy``) and record ``collapsed`` in ``metrics``."""
        self.collapse = detect_collapse(metrics["loss"], self.config.swav.num_prototypes, metrics["code_entropy"],
                                        prediction_information=metrics.get("prediction_information"))
        metrics["collapsed"] = float(self.collapse is not None)
        self.streak = self.streak + 1 if self.collapse else 0

    def should_stop(self, epoch: int, say: Callable[[str], None] | None) -> bool:
        """After epoch ``epoch``: True when ``on_collapse="stop"`` ends the run here, before its last epoch."""
        if self.streak < self.config.collapse_patience or self.collapse_epoch is not None:
            return False
        self.collapse_epoch = epoch + 1 - self.streak
        stop = self.config.on_collapse == "stop" and epoch + 1 < self.config.epochs
        if stop and say is not None:
            say(f"stopping early after epoch {epoch + 1}: SwAV collapsed for {self.streak} epochs ({self.collapse})")
        return stop


def train_one_epoch(setup: TrainSetup, epoch: int, step: int, watch: CollapseWatch) -> tuple[dict[str, float], int]:
    """Run epoch ``epoch`` (0-based) from global step ``step``; returns ``(metrics, step after it)``.

    Metrics: ``epoch``, ``loss``, ``lr`` (the head group's, at the epoch's last step), ``seconds`` and,
    where they apply, ``code_entropy``, ``prediction_information``, ``collapsed`` (SwAV), ``train_top1``
    (supervised) and ``density`` (masking).
    """
    t_epoch = time.perf_counter()
    _begin_epoch(setup, epoch)
    totals = _EpochTotals()
    for batch_views, labels, _idx in itertools.islice(setup.loader, setup.steps_per_epoch):
        _train_step(setup, batch_views, labels, step, totals)
        step += 1
    metrics = _epoch_metrics(setup, totals, epoch, t_epoch)
    if "code_entropy" in metrics:
        watch.observe(metrics)
    if totals.n_seen:
        metrics["train_top1"] = totals.n_correct / totals.n_seen
    if setup.config.adaptation == "mask":
        metrics["density"] = mask_density(setup.core.backbone)[0]
    return metrics, step


def checkpoint_state(setup: TrainSetup, epoch: int, step: int,
                     history: list[dict[str, float]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` to checkpoint after epoch ``epoch``: :func:`trainable_state` plus the SGD momentum
    buffers (``optim.<i>.momentum_buffer``), and ``{"epoch", "step", "history"}``; ``train(resume=...)``
    continues from it."""
    tensors = trainable_state(setup.core)
    tensors.update(_optimizer_state(setup.optimizer))
    return tensors, {"epoch": epoch, "step": step, "history": [dict(h) for h in history]}


def _progress_line(config: TrainConfig, metrics: dict[str, float], eta: float) -> str:
    extra = f" density {metrics['density']:.3f}" if "density" in metrics else ""
    extra += " COLLAPSED" if metrics.get("collapsed") else ""
    return f"epoch {metrics['epoch'] + 1}/{config.epochs} loss {metrics['loss']:.4f}{extra} eta {eta:.0f}s"


def train(
    model: AdaptationModel,
    dataset,
    config: TrainConfig,
    *,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: str | torch.device = "cpu",
    resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    on_epoch_end: Callable[[int, dict[str, float], Callable[[], tuple[dict, dict]]], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` (labels used only for ``objective="supervised"``).

    Set-up (:func:`setup_training`), then :func:`train_one_epoch` per epoch, collapse detection and the
    ``on_epoch_end`` checkpoint hook (:func:`checkpoint_state`) after each.

    Args:
        model: from :func:`build_adaptation_model` (moved to ``device`` here).
        dataset: an ``smn_core.data.ImageDataset`` (items ``(PIL image, label)``).
        config: hyperparameters.
        image_size: input resolution in pixels (the global crop size).
        mean, std: input normalisation of the backbone.
        device: ``"cpu"`` or a CUDA device.
        resume: ``(tensors, meta)`` of a checkpoint written through ``on_epoch_end``'s state function;
            training continues at the epoch after the one saved.
        init_state: tensors of a finished run (:func:`trainable_state`, e.g. a cascade dispatcher's
            scores, head and prototypes) to start from, at epoch 0 with a fresh optimizer and an empty
            SwAV queue (paper Sec. 3.4: experts start from the dispatcher). Ignored when ``resume`` is given.
        on_epoch_end: ``f(epoch, metrics, state_fn)`` after each epoch (on every worker); ``state_fn()``
            returns ``(tensors, meta)`` to checkpoint. Ray Train reports checkpoints through it.
        progress: called with one human-readable line per epoch (epoch, loss, ETA).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: if the dataset yields fewer samples than one global batch.
    """
    setup = setup_training(model, dataset, config, image_size=image_size, mean=mean, std=std, device=device,
                           resume=resume, init_state=init_state)
    start_epoch, step, history = setup.start_epoch, setup.start_step, setup.history
    say = progress if progress is not None and setup.rank == 0 else None
    watch = CollapseWatch(config, history)
    t_start, stopped_early = time.perf_counter(), False
    for epoch in range(start_epoch, config.epochs):
        metrics, step = train_one_epoch(setup, epoch, step, watch)
        history.append(metrics)
        if say is not None:
            eta = (time.perf_counter() - t_start) / (epoch + 1 - start_epoch) * (config.epochs - epoch - 1)
            say(_progress_line(config, metrics, eta))
        stopped_early = watch.should_stop(epoch, say)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, functools.partial(checkpoint_state, setup, epoch, step, history))
        if stopped_early:
            break
    return TrainResult(history=history, steps=step, collapse=watch.collapse, resumed_from_epoch=start_epoch,
                       collapse_epoch=watch.collapse_epoch, stopped_early=stopped_early)


class _single_view:
    """Adapt a single-image transform to the list-of-views interface of the multi-crop pipeline."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.transform(image)]

