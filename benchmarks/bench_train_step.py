"""Training step: threshold masking against full fine-tuning on the same backbone, batch and input size.

One step is exactly the training loop's (``smn_core.training``): ``AdaptationModel`` forward with the
supervised objective (cross-entropy on a new linear head), ``zero_grad``, backward, SGD step (momentum
0.9), BatchNorm in training mode. Masked: ``attach_masks`` on every conv weight, only scores and head
train. Full fine-tuning: every weight trains. Inputs are one fixed random batch already on the device
(data loading is measured in ``bench_data``); the backbones have random weights (a step's cost does not
depend on the values).

Figures per backbone:

* time per step, masked, against the full fine-tuning step (interleaved, median); ideal 1.0: the
  masking arithmetic is one elementwise pass over the weights, measured alone as its own row.
* peak memory of two steps from a fresh model (parameters, scores, gradients, optimizer state,
  activations), masked against full fine-tuning. Floor: full fine-tuning plus one fp32 copy of the
  masked weights (the scores), which masking cannot avoid.
"""

from __future__ import annotations

import copy
import gc

import torch

from smn_core.backbones import Backbone, build_backbone
from smn_core.masking import attach_masks, iter_masked_tensors, mask_modules, score_parameters
from smn_core.training import TrainConfig, build_adaptation_model

from .common import MB, Row, Settings, compared, interleave, median, peak_memory_bytes, sync

AREA = "train_step"


def _cases(s: Settings) -> list[dict]:
    """(arch, input px, batch, interleaved rounds, steps per timed call) for this device and mode."""
    if s.cuda:
        return [dict(arch="cifar_resnet20", size=32, batch=256, rounds=7, steps=10),
                dict(arch="resnet50", size=224, batch=64, rounds=5, steps=5)]
    if s.quick:
        return [dict(arch="cifar_resnet20", size=32, batch=16, rounds=3, steps=1),
                dict(arch="resnet18", size=64, batch=1, rounds=2, steps=1)]
    return [dict(arch="cifar_resnet20", size=32, batch=64, rounds=5, steps=2),
            dict(arch="resnet50", size=224, batch=4, rounds=3, steps=1)]


def build_step(base: Backbone, adaptation: str, x: torch.Tensor, y: torch.Tensor, device: str):
    """A fresh copy of the backbone ``base`` with the objective's head and optimizer, and ``step()``
    running one optimisation step on ``(x, y)``. Returns ``(step, model)``."""
    backbone = copy.deepcopy(base.model)
    if adaptation == "mask":
        attach_masks(backbone)
    cfg = TrainConfig(objective="supervised", adaptation=adaptation, bn_mode="adapt")
    model = build_adaptation_model(backbone, base.feature_dim, cfg, num_classes=10).to(device).train()
    # parameter groups as in smn_core.training.train
    groups = [{"params": model.head_parameters(), "lr": cfg.head_lr, "weight_decay": cfg.head_weight_decay}]
    if adaptation == "mask":
        groups.append({"params": list(score_parameters(model.backbone).values()), "lr": cfg.score_lr,
                       "weight_decay": 0.0})
    else:
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad],
                       "lr": cfg.weight_lr, "weight_decay": cfg.weight_decay})
    opt = torch.optim.SGD(groups, lr=cfg.head_lr, momentum=cfg.momentum)

    def step() -> None:
        loss, _ = model([x], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _peak(base: Backbone, adaptation: str, x: torch.Tensor, y: torch.Tensor, device: str) -> int:
    """Peak bytes over the first two steps of a fresh model (the second step's forward still holds the
    first step's gradients, as in the training loop)."""
    _free(device)
    step, model = build_step(base, adaptation, x, y, device)

    def two_steps() -> None:
        step()
        step()

    peak = peak_memory_bytes(two_steps, device)
    del step, model
    _free(device)
    return peak


def run_case(s: Settings, arch: str, size: int, batch: int, rounds: int, steps: int) -> list[Row]:
    """Rows for one backbone / input size / batch."""
    dev = s.device
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    label = f"{arch} {size}x{size} px, batch {batch}"
    torch.manual_seed(0)
    base = build_backbone(arch, "random")
    step_mask, masked = build_step(base, "mask", x, y, dev)
    step_fft, fft_model = build_step(base, "full", x, y, dev)
    for _ in range(2 if s.cuda else 1):  # warm-up: optimizer state, allocator, kernel selection
        step_mask()
        step_fft()
    modules = mask_modules(masked.backbone)
    frozen = dict(iter_masked_tensors(masked.backbone))

    def mask_pass() -> None:
        with torch.no_grad():
            for name, m in modules.items():
                m(frozen[name])

    def times(fn):
        def run() -> None:
            for _ in range(steps):
                fn()
        return run

    t = interleave({"mask": times(step_mask), "fft": times(step_fft), "pass": times(mask_pass)}, rounds, dev)
    t_mask, t_fft, t_pass = (median(t[k]) / steps for k in ("mask", "fft", "pass"))
    n_masked = sum(w.numel() for w in frozen.values())
    score_bytes = sum(p.numel() * p.element_size() for p in score_parameters(masked.backbone).values())
    del step_mask, step_fft, masked, fft_model, modules, frozen  # free the device for the memory phase
    sync(dev)
    _free(dev)
    peak_mask = _peak(base, "mask", x, y, dev)
    peak_fft = _peak(base, "full", x, y, dev)
    reps = rounds * steps
    how = (f"median of {rounds} interleaved rounds x {steps} step(s); forward + backward + SGD step, supervised "
           f"objective, BN in train mode, random weights")
    mem = ("CUDA max_memory_allocated" if s.cuda else "torch.profiler memory timeline") + \
        ", 2 steps from a fresh model (params, scores, grads, momentum, activations)"
    return [
        compared(AREA, f"{label}: time per step, masked (threshold)", t_mask, "s",
                 "full fine-tuning step (same run)", t_fft, ideal=1.0, settings=s, repeats=reps,
                 notes=f"{how}; {n_masked:,} masked conv weights"),
        compared(AREA, f"{label}: masking arithmetic alone (W * M / alpha over every masked weight)", t_pass, "s",
                 "full fine-tuning step (same run)", t_fft, settings=s, repeats=reps,
                 notes="forward of every ScoreMask, no grad: the part of the masked step a fused kernel could not "
                       "remove"),
        compared(AREA, f"{label}: peak memory, masked", peak_mask / MB, "MB",
                 "full fine-tuning peak (same run)", peak_fft / MB, ideal=(peak_fft + score_bytes) / peak_fft,
                 settings=s, notes=f"{mem}; ideal = FFT + the fp32 scores ({score_bytes / MB:.1f} MB)"),
    ]


def run(s: Settings) -> list[Row]:
    """Masked vs full fine-tuning steps for a CIFAR ResNet-20 at 32 px and ResNet-50 at 224 px (quick mode on
    the CPU: ResNet-18 at 64 px instead of ResNet-50, smaller batches); see the module docstring."""
    rows: list[Row] = []
    for case in _cases(s):
        rows += run_case(s, **case)
    return rows
