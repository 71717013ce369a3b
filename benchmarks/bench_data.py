"""Data loading: the SwAV multi-crop pipeline's images per second against what the training step eats.

Supply: ``SeededViewDataset(MultiCropTransform)`` + ``collate_views``, exactly what the training loop's
DataLoader runs per item, in one process (a DataLoader worker is one such process). Demand: the
masked SwAV training step (``smn_core.training``'s loop body: prototypes normalised, forward over every
view, backward, SGD) on the very batch the pipeline just produced, images per second = batch / step
time. The two alternate batch by batch (interleaved), medians. The ratio supply / demand is what one
loader process covers; ``gap`` = demand / supply = loader processes each training process needs.

Two settings, the paper's multi-crop (2 global + 6 local crops, colour jitter, grayscale, blur, flip):

* 32 px (2 x 32 + 6 x 14 px), CIFAR ResNet-20: scikit-learn digits resized to 32 x 32 (in memory, no
  decoding: like CIFAR arrays).
* 224 px (2 x 224 + 6 x 96 px), ResNet-50: JPEG files decoded on access (the costly part of an
  ImageNet-style pipeline): digits upscaled to 320 x 256 with pixel noise (so the JPEG is not trivially
  smooth), quality 90, held in memory. (Quick mode on the CPU: ResNet-18's step, batch 1.)
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image

from smn_core.augment import MultiCropConfig, MultiCropTransform, SeededViewDataset, collate_views
from smn_core.backbones import build_backbone
from smn_core.data import ImageDataset, load_dataset
from smn_core.masking import attach_masks, score_parameters
from smn_core.swav import SwAVConfig
from smn_core.training import TrainConfig, build_adaptation_model

from .common import Row, Settings, compared, median, sync

AREA = "data"


def _cases(s: Settings) -> list[dict]:
    if s.cuda:
        return [dict(arch="cifar_resnet20", size=32, batch=256, rounds=5),
                dict(arch="resnet50", size=224, batch=64, rounds=3)]
    if s.quick:
        return [dict(arch="cifar_resnet20", size=32, batch=16, rounds=2),
                dict(arch="resnet18", size=224, batch=1, rounds=2)]
    return [dict(arch="cifar_resnet20", size=32, batch=64, rounds=4),
            dict(arch="resnet50", size=224, batch=4, rounds=3)]


def _images(size: int, n: int) -> tuple[ImageDataset, str]:
    """``n`` images for inputs of ``size`` px and a description of them."""
    digits = load_dataset("digits", "train", image_size=32)
    if size <= 64:
        idx = np.arange(n) % len(digits)
        return (ImageDataset.from_arrays(np.stack([np.asarray(digits[int(i)][0]) for i in idx]),
                                         digits.targets[idx], digits.class_names, "digits32"),
                "digits at 32 x 32, uint8 arrays in memory")
    rng = np.random.default_rng(0)
    blobs, targets = [], []
    for i in range(n):
        img, label = digits[i % len(digits)]
        big = np.asarray(img.resize((320, 256), Image.Resampling.BILINEAR), dtype=np.float32)
        big = np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        targets.append(label)
    mean_kb = np.mean([len(b) for b in blobs]) / 1e3
    return (ImageDataset.from_encoded(blobs, targets, digits.class_names, "jpeg320x256"),
            f"320 x 256 JPEG (q 90, {mean_kb:.0f} kB each) decoded on access")


def _swav_step(arch: str, batch: int, device: str):
    """The masked SwAV step of the training loop, as ``step(views)``; also returns the backbone facts."""
    torch.manual_seed(0)
    bb = build_backbone(arch, "random")
    attach_masks(bb.model)
    cfg = TrainConfig(objective="swav", adaptation="mask", bn_mode="adapt",
                      swav=SwAVConfig(queue_length=0, freeze_prototypes_steps=0))
    model = build_adaptation_model(bb.model, bb.feature_dim, cfg).to(device).train()
    opt = torch.optim.SGD([{"params": model.head_parameters(), "lr": cfg.head_lr},
                           {"params": list(score_parameters(model.backbone).values()), "lr": cfg.score_lr}],
                          lr=cfg.head_lr, momentum=cfg.momentum)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step(views: list[torch.Tensor]) -> None:
        model.swav.head.normalize_prototypes()
        views = [v.to(device, non_blocking=True) for v in views]
        loss, _ = model(views, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, bb


def run_case(s: Settings, arch: str, size: int, batch: int, rounds: int) -> list[Row]:
    dev = s.device
    step, bb = _swav_step(arch, batch, dev)
    mc = MultiCropConfig()
    transform = MultiCropTransform(size, mc, bb.mean, bb.std)
    images, what = _images(size, batch * (rounds + 1))
    views_ds = SeededViewDataset(images, transform, seed=0)

    def load(r: int) -> list[torch.Tensor]:
        views, _, _ = collate_views([views_ds[i] for i in range(r * batch, (r + 1) * batch)])
        return views

    step(load(rounds))  # warm-up: optimizer state, kernels (the last batch, not timed)
    t_load, t_step = [], []
    for r in range(rounds):  # interleaved: produce a batch, then train on it
        t0 = time.perf_counter()
        views = load(r)
        t_load.append(time.perf_counter() - t0)
        sync(dev)
        t0 = time.perf_counter()
        step(views)
        sync(dev)
        t_step.append(time.perf_counter() - t0)
    supply = batch / median(t_load)
    demand = batch / median(t_step)
    g, l = mc.sizes(size)
    crops = f"{mc.n_global} x {g} + {mc.n_local} x {l} px"
    return [compared(AREA, f"multi-crop {crops}: images/s of one loader process ({arch} step, batch {batch})",
                     supply, "images/s", f"demand: masked SwAV step of {arch} on the same batches (same run)",
                     demand, ideal=1.0, better="higher", settings=s, repeats=rounds,
                     notes=f"{what}; medians of {rounds} interleaved batches; gap = loader processes needed per "
                           f"training process ({s.threads} torch thread(s) in the loader here)")]


def run(s: Settings) -> list[Row]:
    """Pipeline supply vs step demand at 32 px and 224 px (see the module docstring)."""
    rows: list[Row] = []
    for case in _cases(s):
        rows += run_case(s, **case)
    return rows
