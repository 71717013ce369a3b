"""Mask storage: bits per weight, size against fp32 and encode / decode speed of every mask codec.

Codecs and measurement are ``smn_core.mask_codecs`` (``available_codecs``, ``measure_mask_codec``:
round trip checked, best of ``repeats``). Floor of the size: the order-0 entropy ``H(density)`` bits per
weight (a coder that models structure, like ``smn-ctx`` with the backbone weights as context, can go
below it). Speed is MB of bit-packed mask per second, set against bit packing alone (the ``none``
codec), which every library codec does first.

Mask sets, said in each row:

* ``learned``: real learned masks. The CIFAR-10 ResNet-20 self-masking / supervised-masking runs that
  ``benchmarks/mask_store.py codecs --train`` leaves in ``results/bench_masks/`` when they are there (with
  the checkpoint of ``../shared`` as the weights context); otherwise a short real self-masking run made
  here (CIFAR ResNet-8, random init, digits 5-9 at 16 px, a few epochs, seconds).
* ``resnet50-sized`` (full mode): i.i.d. Bernoulli masks at the learned set's density on every conv
  weight of a random-init ResNet-50 (23.5 M weights): synthetic, for the speed at a real model's size
  (i.i.d. bits have no structure to find, so every codec lands near ``H(density)`` at best).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from smn_core.mask_codecs import available_codecs, measure_mask_codec, order0_entropy_bits

from .common import Row, Settings, compared

AREA = "storage"
REPO = Path(__file__).resolve().parents[1]
LEARNED = REPO / "results" / "bench_masks"
CIFAR_CKPT = REPO.parent / "shared" / "weights" / "resnet_cifar10" / "resnet20-12fca82f.th"


def learned_masks(s: Settings) -> list[tuple[str, str, list[np.ndarray], list[np.ndarray]]]:
    """``[(tag, description, masks, weights)]``: the learned mask sets (see the module docstring)."""
    files = ["smn_lr2000"] if s.quick else ["smn_lr2000", "supmask_lr200"]
    if CIFAR_CKPT.is_file() and all((LEARNED / f"{f}.safetensors").is_file() for f in files):
        from safetensors.torch import load_file

        from smn_core.backbones import load_checkpoint_state_dict

        weights = load_checkpoint_state_dict(CIFAR_CKPT)
        out = []
        for f in files:
            masks = load_file(str(LEARNED / f"{f}.safetensors"))
            names = list(masks)
            out.append((f"ResNet-20 {f}", f"learned: CIFAR-10 ResNet-20 run {f} (results/bench_masks)",
                        [masks[k].numpy() for k in names],
                        [weights[k].numpy() for k in names]))
        return out
    return [_short_run(s)]


def _short_run(s: Settings) -> tuple[str, str, list[np.ndarray], list[np.ndarray]]:
    """A short real self-masking run on digits; returns its masks and the backbone weights."""
    from smn_core.augment import MultiCropConfig
    from smn_core.backbones import build_backbone
    from smn_core.pipeline import run_cell
    from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
    from smn_core.swav import SwAVConfig
    from smn_core.training import TrainConfig

    epochs = 1 if s.quick else 3
    cfg = CellConfig(method="smn", backbone=BackboneSpec("cifar_resnet8", "random"),
                     dataset=DataSpec(source="digits", classes=[5, 6, 7, 8, 9], image_size=16,
                                      max_train_samples=256, max_test_samples=20),
                     train=TrainConfig(epochs=epochs, batch_size=32, score_lr=2000.0, head_lr=0.6, bn_mode="frozen",
                                       swav=SwAVConfig(num_prototypes=20, queue_length=0, freeze_prototypes_steps=0),
                                       multicrop=MultiCropConfig(n_global=2, n_local=2, local_size=8,
                                                                 global_scale=(0.5, 1.0), local_scale=(0.2, 0.5))),
                     eval=EvalSpec(knn_k=20))
    outcome = run_cell(cfg, evaluate=False)
    torch.manual_seed(cfg.seed)  # run_cell seeds the same way before building the backbone
    params = dict(build_backbone("cifar_resnet8", "random").model.named_parameters())
    names = list(outcome.masks)
    return ("ResNet-8 digits", f"learned: short self-masking run here (CIFAR ResNet-8, random init, digits 5-9 at 16 px, {epochs} "
            "epoch(s), score lr 2000)", [outcome.masks[k].numpy() for k in names],
            [params[k].detach().numpy() for k in names])


def resnet50_sized(density: float) -> tuple[str, str, list[np.ndarray], list[np.ndarray]]:
    """Bernoulli(density) masks on every conv weight of a random-init ResNet-50, with its weights."""
    from smn_core.backbones import build_backbone
    from smn_core.masking import MaskConfig, select_parameters

    torch.manual_seed(0)
    model = build_backbone("resnet50", "random").model
    params = dict(model.named_parameters())
    names = select_parameters(model, MaskConfig())
    rng = np.random.default_rng(0)
    weights = [params[k].detach().numpy() for k in names]
    masks = [rng.random(w.shape) < density for w in weights]
    return "ResNet-50 Bernoulli", f"resnet50-sized: i.i.d. Bernoulli masks at density {density:.3f} (synthetic)", masks, weights


def codec_rows(s: Settings, tag: str, label: str, masks: list[np.ndarray], weights: list[np.ndarray], repeats: int) -> list[Row]:
    """Size and speed rows of every codec on one mask set."""
    n = sum(m.size for m in masks)
    density = sum(int(m.sum()) for m in masks) / n
    h0 = order0_entropy_bits(masks) / n
    results = {c: measure_mask_codec(c, masks, weights if c == "smn-ctx" else None, repeats=repeats)
               for c in available_codecs()}
    packing = results["none"]
    rows = []
    where = f"{label}; {n:,} weights, density {density:.4f}"
    for c, r in results.items():
        ctx = " (backbone weights as context)" if c == "smn-ctx" else ""
        rows.append(compared(AREA, f"{c}{ctx}: bits per weight [{tag}]", r.bits_per_weight,
                             "bits/weight", f"floor: order-0 entropy H(density) = {h0:.4f}", h0, ideal=1.0,
                             settings=s, notes=f"{r.ratio_vs_fp32:,.1f}x smaller than fp32 (32 bits/weight); {where}"))
    for c, r in results.items():
        if c == "none":
            continue
        for what, value, ref in (("encode", r.encode_mb_s, packing.encode_mb_s),
                                 ("decode", r.decode_mb_s, packing.decode_mb_s)):
            rows.append(compared(AREA, f"{c}: {what} speed [{tag}]", value, "MB/s",
                                 f"bit packing alone ('none' codec {what}), same masks", ref, better="higher",
                                 settings=s, repeats=repeats,
                                 notes=f"MB of bit-packed mask per second, best of {repeats}; {where}"))
    return rows


def run(s: Settings) -> list[Row]:
    """Codec rows for the learned mask sets, and (full mode) for ResNet-50-sized masks."""
    rows: list[Row] = []
    sets = learned_masks(s)
    for tag, label, masks, weights in sets:
        rows += codec_rows(s, tag, label, masks, weights, repeats=2 if s.quick else 3)
    if not s.quick:
        masks = sets[0][2]
        density = sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)
        rows += codec_rows(s, *resnet50_sized(density), repeats=1)
    return rows
