"""Binary weight masks learned through scores (paper Sec. 3.1-3.2).

Each masked parameter tensor ``W`` (frozen, pretrained) gets a score tensor ``S`` of the same
shape, initialised to ``S0`` (default 1). The forward pass uses ``W * M / alpha`` with the mask
``M = 1[S > mu]`` (threshold ``mu``, default 0) and ``alpha = sqrt(mean(M))`` per tensor, which keeps
the variance of the weights (Ramanujan et al. 2020). Scores learn through the straight-through
("pass-through") gradient ``dL/dS := dL/dM`` (paper Eq. 2).

Decisions (see NOTES.md, "Masking"):

* ``alpha`` is **not differentiated** by default (``alpha_grad=False``): the score gradient is
  exactly the paper's pass-through gradient ``dL/dM``. The reference code let the gradient flow
  through ``alpha`` as well; ``alpha_grad=True`` reproduces that.
* The all-zero mask is guarded: ``alpha`` is computed from ``max(mean(M), 1/N)``, so a tensor whose
  mask is empty yields zeros, never ``inf``/``nan``.
* Masks are attached with :mod:`torch.nn.utils.parametrize`, so they work on any ``nn.Module``; the
  pretrained tensors stay frozen (``requires_grad=False``) and are never modified.

Besides threshold masking, :class:`ScoreMask` implements the top-k% baseline of Ramanujan et al.
(keep the fraction ``k`` of largest scores per tensor; paper Table 2).
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .config import SELECTIVE, SELECTORS, MaskConfig

__all__ = [
    "MaskConfig",
    "ScoreMask",
    "attach_masks",
    "select_parameters",
    "masked_parameter_names",
    "mask_modules",
    "score_parameters",
    "export_masks",
    "apply_masks",
    "mask_density",
    "set_topk_density",
    "trainable_mask_count",
    "stage_of",
    "SELECTORS",
    "SELECTIVE",
]


_ATTN_MLP = ("attn_mlp", "clip_attn_mlp")
# a stage: ResNet "layer<k>" (k from 1); timm "stages.<i>" (ConvNeXt, RegNet, EfficientNet-style, i from 0); a
# transformer's "blocks.<i>" / "resblocks.<i>" (timm ViT, open_clip; i from 0). The first that matches wins.
_STAGE_PATTERNS = (
    (re.compile(r"(?:^|\.)layer(\d+)\."), 0),
    (re.compile(r"(?:^|\.)stages\.(\d+)\."), 1),
    (re.compile(r"(?:^|\.)(?:res)?blocks\.(\d+)\."), 1),
)
# a transformer block's container: a Linear under it is an attention or MLP projection
_BLOCK = re.compile(r"(?:^|\.)(?:res)?blocks\.\d+\.")


class _StraightThrough(torch.autograd.Function):
    """Binarise in the forward pass, pass the gradient through unchanged (paper Eq. 2)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return hard

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


class ScoreMask(nn.Module):
    """Parametrization ``W -> W * M / alpha`` with a learned score tensor (paper Eq. 1-2).

    Args:
        shape: shape of the masked tensor ``W``; ``scores`` has the same shape.
        config: a :class:`MaskConfig`.
        dtype: dtype of the scores (float32 by default; float64 for exactness tests).
        trainable: optional bool tensor of ``shape`` (selective masking, App. F): positions where it
            is False keep mask 1 whatever their score; stored as the buffer ``trainable``.
        generator: for ``mode="topk"``, the ``torch.Generator`` of the initial score noise
            (``MaskConfig.topk_init_noise``); None: a generator seeded with 0.

    The forward takes the frozen tensor ``W`` (any shape) and returns a tensor of the same shape
    and dtype. ``scores`` is the only trainable parameter.
    """

    def __init__(self, shape: torch.Size, config: MaskConfig, dtype: torch.dtype = torch.float32,
                 trainable: torch.Tensor | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        scores = torch.full(tuple(shape), float(config.init_score), dtype=dtype)
        if config.mode == "topk":  # random, unstructured first mask (Ramanujan et al. 2020)
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            noise = torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * 2.0 - 1.0
            scores += (float(config.topk_init_noise) * noise).to(dtype)
        self.scores = nn.Parameter(scores)
        self.topk_density = config.topk_density
        if trainable is not None:
            if tuple(trainable.shape) != tuple(shape) or trainable.dtype != torch.bool:
                raise ValueError(f"trainable must be a bool tensor of shape {tuple(shape)}, "
                                 f"got {trainable.dtype} {tuple(trainable.shape)}")
            self.register_buffer("trainable", trainable.clone())
        else:
            self.trainable = None

    def num_trainable(self) -> int:
        """Number of positions with a trainable mask (all of them unless selective masking)."""
        return self.scores.numel() if self.trainable is None else int(self.trainable.sum())

    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor:
        """The current binary mask ``M`` as a bool tensor of the scores' shape."""
        if self.config.mode == "topk":
            n = self.scores.numel()
            keep = max(1, int(round(float(self.topk_density) * n)))
            if keep >= n:
                return torch.ones_like(self.scores, dtype=torch.bool)
            flat = self.scores.detach().flatten()
            idx = torch.topk(flat, keep, sorted=False).indices
            mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
            mask[idx] = True
            return mask.view_as(self.scores)
        mask = self.scores.detach() > self.config.threshold
        if self.trainable is not None:
            mask = mask | ~self.trainable
        return mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        hard = self.hard_mask().to(weight.dtype)
        mask = _StraightThrough.apply(self.scores, hard).to(weight.dtype)
        n = mask.numel()
        density = mask.mean() if self.config.alpha_grad else hard.mean()
        alpha = torch.sqrt(torch.clamp(density, min=1.0 / n))
        return weight * mask / alpha


def _norm_layers() -> tuple[type, ...]:
    return (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def select_parameters(model: nn.Module, config: MaskConfig) -> list[str]:
    """Full names (``"layer1.0.conv1.weight"``) of the parameters that ``config`` selects for masking.

    Only parameters that are not yet parametrized are considered. Order follows
    ``model.named_modules()``.

    Raises:
        ValueError: if nothing is selected (names the selector and the model's class).
    """
    names: list[str] = []
    seen: set[str] = set()

    def add(module_name: str, pname: str, module: nn.Module) -> None:
        p = getattr(module, pname, None)
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            return
        if parametrize.is_parametrized(module, pname):
            return
        full = f"{module_name}.{pname}" if module_name else pname
        if full not in seen:
            seen.add(full)
            names.append(full)

    sel = config.selector
    regex = re.compile(sel[3:]) if sel.startswith("re:") else None
    for mname, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            own += [n for n in module.parametrizations.keys() if n not in own]
        if regex is not None:
            for pname in own:
                if regex.search(f"{mname}.{pname}" if mname else pname):
                    add(mname, pname, module)
        elif sel == "all":
            for pname in own:
                add(mname, pname, module)
        elif sel == "all_but_norm":
            if not isinstance(module, _norm_layers()):
                for pname in own:
                    add(mname, pname, module)
        elif sel == "all_but_bias":
            for pname in own:
                if not pname.endswith("bias"):
                    add(mname, pname, module)
        else:
            is_conv = isinstance(module, nn.modules.conv._ConvNd)
            is_linear = isinstance(module, nn.Linear)
            pick = (
                (sel in ("conv", "conv+linear") and is_conv)
                or (sel in ("linear", "conv+linear") and is_linear)
                or (sel in _ATTN_MLP and is_linear and _BLOCK.search(f"{mname}.") is not None)
            )
            if pick:
                add(mname, "weight", module)
                if config.include_bias or sel in _ATTN_MLP:
                    add(mname, "bias", module)
            if sel in _ATTN_MLP and isinstance(module, nn.MultiheadAttention):
                add(mname, "in_proj_weight", module)
                add(mname, "in_proj_bias", module)
        if config.include_bn and isinstance(module, _norm_layers()) and not regex:
            add(mname, "weight", module)
            add(mname, "bias", module)
    if config.stages is not None:
        if not any(stage_of(n) for n in names):
            raise ValueError(f"mask stages={config.stages} needs staged parameters (under layer1..layerN, stages.<i> "
                             f"or blocks.<i>); {type(model).__name__} has none")
        names = [n for n in names if stage_of(n) <= config.stages]
    if not names:
        raise ValueError(
            f"mask selector {sel!r} selects no parameter of {type(model).__name__}; "
            f"allowed selectors: {', '.join(SELECTORS)} or 're:<regex>'"
        )
    return names


def stage_of(name: str) -> int:
    """Stage of a parameter name, counted from 1; 0 for the stem and the rest (head, final norm).

    ``k`` under a ResNet's ``layer<k>``; ``i + 1`` under timm's ``stages.<i>`` (ConvNeXt, RegNet, ...) or a
    transformer's ``blocks.<i>`` / ``resblocks.<i>`` (timm ViT, open_clip), whichever comes first in that order.
    """
    for pattern, offset in _STAGE_PATTERNS:
        m = pattern.search(name)
        if m:
            return int(m.group(1)) + offset
    return 0


def _trainable_positions(name: str, weight: torch.Tensor, config: MaskConfig) -> torch.Tensor | None:
    """Bool tensor of the positions with a trainable mask (selective masking, App. F), or None (all)."""
    if config.selective == "none":
        return None
    n = weight.numel()
    k = max(1, int(round(float(config.selective_fraction) * n)))
    if config.selective == "random":
        gen = torch.Generator().manual_seed(int(config.selective_seed) * 1_000_003 + zlib.crc32(name.encode()))
        idx = torch.randperm(n, generator=gen)[:k]
    else:
        idx = torch.topk(weight.detach().abs().flatten().float().cpu(), k, sorted=False).indices
    out = torch.zeros(n, dtype=torch.bool)
    out[idx] = True
    return out.view(weight.shape).to(weight.device)


def _resolve(model: nn.Module, full_name: str) -> tuple[nn.Module, str]:
    module_name, _, pname = full_name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), pname


def attach_masks(model: nn.Module, config: MaskConfig | None = None, *, dtype: torch.dtype | None = None) -> list[str]:
    """Attach a :class:`ScoreMask` to every selected parameter of ``model`` and freeze the model.

    Every pre-existing parameter of ``model`` gets ``requires_grad=False`` (the pretrained weights
    are never trained nor modified); the only trainable tensors afterwards are the scores.

    Args:
        model: any ``nn.Module`` (modified in place).
        config: what to mask; default ``MaskConfig()`` (conv weights, S0 = 1, mu = 0).
        dtype: dtype of the scores; default: the dtype of each masked tensor.

    Top-k scores start with seeded noise (``MaskConfig.topk_init_noise``): the generator of each tensor
    is seeded with ``torch.initial_seed()`` (the cell's ``torch.manual_seed``) and the tensor's name, so
    the first mask is random, unstructured and reproducible.

    Returns:
        The full names of the masked parameters (e.g. ``"layer1.0.conv1.weight"``).

    Raises:
        ValueError: if the model already has masks, or the selector selects nothing.
    """
    config = config or MaskConfig()
    if mask_modules(model):
        raise ValueError(f"{type(model).__name__} already has masks attached; attach them to a fresh copy")
    names = select_parameters(model, config)
    base_seed = torch.initial_seed() % (2**31)
    for p in model.parameters():
        p.requires_grad_(False)
    for full in names:
        module, pname = _resolve(model, full)
        tensor = getattr(module, pname)
        parametrize.register_parametrization(
            module, pname, ScoreMask(tensor.shape, config, dtype=dtype or tensor.dtype,
                                     trainable=_trainable_positions(full, tensor, config),
                                     generator=torch.Generator().manual_seed(base_seed * 1_000_003
                                                                             + zlib.crc32(full.encode())),
                                     ).to(tensor.device),
            unsafe=True,
        )
        getattr(module.parametrizations, pname).original.requires_grad_(False)
    return names


def mask_modules(model: nn.Module) -> dict[str, ScoreMask]:
    """``{full parameter name: ScoreMask}`` for every masked tensor of ``model`` (empty if none)."""
    out: dict[str, ScoreMask] = {}
    for mname, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for pname, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, ScoreMask):
                    out[f"{mname}.{pname}" if mname else pname] = p
    return out


def masked_parameter_names(model: nn.Module) -> list[str]:
    """Full names of the masked parameters of ``model``."""
    return list(mask_modules(model))


def score_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{full parameter name: scores}``: the trainable score tensors, for the optimizer and checkpoints."""
    return {name: m.scores for name, m in mask_modules(model).items()}


def trainable_mask_count(model: nn.Module) -> int:
    """Number of trainable mask positions of ``model`` (App. F: what a selective mask costs to store)."""
    return sum(m.num_trainable() for m in mask_modules(model).values())


def set_topk_density(model: nn.Module, density: float) -> None:
    """Set the kept fraction of every top-k mask (progressive top-k, App. E).

    Raises:
        ValueError: if ``density`` is outside (0, 1].
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"top-k density must be in (0, 1], got {density}")
    for m in mask_modules(model).values():
        m.topk_density = density


@torch.no_grad()
def export_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned binary masks: ``{full parameter name: bool tensor (same shape as the weight)}``, on CPU."""
    return {name: m.hard_mask().cpu().clone() for name, m in mask_modules(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], *, rescale: bool = True) -> nn.Module:
    """Bake exported masks into a fresh (unmasked) copy of the backbone: ``W <- W * M / alpha`` in place.

    The resulting plain model computes exactly what the masked model computed (up to float
    rounding of the same arithmetic), with no parametrization left.

    Args:
        model: the backbone without masks (modified in place and returned).
        masks: ``{full parameter name: bool tensor}`` as from :func:`export_masks`.
        rescale: divide by ``alpha = sqrt(mean(M))`` (guarded as in :class:`ScoreMask`).

    Raises:
        ValueError: if a name is missing from the model, the model is already masked, or a shape differs.
    """
    if mask_modules(model):
        raise ValueError("apply_masks expects a backbone without attached masks")
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask for {name!r} has no parameter in {type(model).__name__}")
        p = params[name]
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(p.shape)}")
        m = mask.to(device=p.device, dtype=p.dtype)
        if rescale:
            alpha = torch.sqrt(torch.clamp(m.mean(), min=1.0 / m.numel()))
            p.copy_(p * m / alpha)
        else:
            p.mul_(m)
    return model


def mask_density(masks: dict[str, torch.Tensor] | nn.Module) -> tuple[float, dict[str, float]]:
    """Density (kept fraction of weights) overall and per tensor.

    Args:
        masks: exported masks, or a model with attached masks.

    Returns:
        ``(overall density weighted by tensor size, {name: density})``; sparsity is ``1 - density``.

    Raises:
        ValueError: if there is no mask.
    """
    if isinstance(masks, nn.Module):
        masks = export_masks(masks)
    if not masks:
        raise ValueError("no masks to measure")
    per = {n: float(m.float().mean()) for n, m in masks.items()}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept / total, per


def iter_masked_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, frozen pretrained tensor)`` for every masked parameter (the ``original`` tensors)."""
    for mname, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for pname, plist in module.parametrizations.items():
                yield (f"{mname}.{pname}" if mname else pname), plist.original
