"""The random-mask control (issue 25): does the trained mask beat a random mask of the same size?

An SMN cell learns a binary mask over the selected weights of a frozen backbone. Its control keeps the same
number of weights in every masked tensor, but picks them at random:

* ``match="count"``: uniformly among the tensor's weights (the same count per tensor);
* ``match="magnitude"``: so that the kept weights' ``|W|`` distribution is the trained mask's. Each tensor's
  weights are ranked by ``|W|`` and cut into :data:`MAGNITUDE_BINS` equal-size quantile bins; in each bin the
  random mask keeps as many weights as the trained mask keeps there, drawn uniformly within the bin. (SMN
  mostly prunes weights of one magnitude range; a control that ignores that would be too weak.)

Every draw is seeded (the cell's seed and the tensor's name, so tensors draw independently and the same
call gives the same masks on every machine) and never returns the trained mask itself
(:func:`draw_random_masks`). :func:`evaluate_random_mask` puts the drawn mask on the frozen backbone and
evaluates it exactly as :func:`smn_core.pipeline.run_cell` evaluates a trained cell (k-NN k = 200 and k = 20,
the linear probe, per-test-image correctness), with nothing trained.

Plain PyTorch; never imports ray.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch

from .masking import apply_masks, mask_density
from .pipeline import (CellOutcome, SmallKnnBankWarning, eval_split_names, evaluate_model, load_cell_data,
                       prepare_backbone)

__all__ = ["MATCHES", "MAGNITUDE_BINS", "draw_random_mask", "draw_random_masks", "evaluate_random_mask"]

MATCHES = ("count", "magnitude")
"""How a random mask matches the trained one: the count per tensor, or also the kept weights' ``|W|`` quantiles."""

MAGNITUDE_BINS = 32
"""Quantile bins of ``|W|`` per tensor for ``match="magnitude"`` (fewer when a tensor has fewer weights)."""


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _pick(pool: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct entries of the 1-D index tensor ``pool``, uniformly at random."""
    return pool[torch.randperm(pool.numel(), generator=gen)[:k]]


def _bins(weight: torch.Tensor, bins: int) -> list[torch.Tensor]:
    """Flat indices of ``weight`` in ``bins`` equal-size groups by rank of ``|W|`` (ties broken by index)."""
    order = torch.argsort(weight.detach().abs().flatten().double().cpu(), stable=True)
    return [chunk for chunk in torch.tensor_split(order, min(bins, order.numel())) if chunk.numel()]


def draw_random_mask(trained: torch.Tensor, *, match: Literal["count", "magnitude"] = "count",
                     weight: torch.Tensor | None = None, seed: int = 0, name: str = "",
                     bins: int = MAGNITUDE_BINS) -> torch.Tensor:
    """One tensor's random mask with the trained mask's count of kept weights.

    Args:
        trained: the trained binary mask, any shape ``S`` (bool or 0/1).
        match: ``"count"`` (uniform over the tensor) or ``"magnitude"`` (the same count kept in every
            ``|W|`` quantile bin of ``weight``).
        weight: the frozen weight tensor the mask applies to, shape ``S`` (needed for ``"magnitude"``).
        seed, name: seed the draw (with the tensor's name, so tensors draw independently).
        bins: quantile bins of ``|W|`` for ``"magnitude"``.

    Returns:
        A bool tensor of shape ``S`` with ``trained.sum()`` ones (and, for ``"magnitude"``, in each bin as many
        as ``trained``). It may equal ``trained`` (a tensor kept whole or empty has no other mask of its count);
        :func:`draw_random_masks` makes the whole set differ.

    Raises:
        ValueError: an unknown ``match``, ``"magnitude"`` without a ``weight`` of shape ``S``, or ``bins`` < 1.
    """
    if match not in MATCHES:
        raise ValueError(f"random_mask match {match!r} is not known; allowed: {', '.join(MATCHES)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    flat = trained.detach().flatten().bool().cpu()
    gen = _generator(seed, name)
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    if match == "count":
        out[_pick(torch.arange(flat.numel()), int(flat.sum()), gen)] = True
        return out.view(trained.shape)
    if weight is None or tuple(weight.shape) != tuple(trained.shape):
        raise ValueError(f"match 'magnitude' needs the weight tensor of {name or 'the mask'} with shape "
                         f"{tuple(trained.shape)}, got {None if weight is None else tuple(weight.shape)}")
    for chunk in _bins(weight, bins):
        out[_pick(chunk, int(flat[chunk].sum()), gen)] = True
    return out.view(trained.shape)


def _differ(drawn: dict[str, torch.Tensor], trained: Mapping[str, torch.Tensor], weights, match: str,
            bins: int) -> None:
    """Make ``drawn`` differ from ``trained`` when every tensor came out equal: swap one kept and one dropped
    weight, in the same ``|W|`` bin for ``"magnitude"`` when a bin has both (keeps every count)."""
    for name, mask in drawn.items():
        flat = mask.flatten()
        groups = _bins(weights[name], bins) if match == "magnitude" else [torch.arange(flat.numel())]
        for chunk in groups:
            on, off = chunk[flat[chunk]], chunk[~flat[chunk]]
            if on.numel() and off.numel():
                flat[on[0]], flat[off[0]] = False, True
                drawn[name] = flat.view(mask.shape)
                return
    for name, mask in drawn.items():  # no bin has both: the count per tensor still holds across bins
        flat = mask.flatten()
        if 0 < int(flat.sum()) < flat.numel():
            on, off = torch.nonzero(flat).flatten(), torch.nonzero(~flat).flatten()
            flat[on[0]], flat[off[0]] = False, True
            drawn[name] = flat.view(mask.shape)
            return
    raise ValueError("the trained mask keeps every weight (or none) of every masked tensor: no random mask with "
                     "the same count per tensor differs from it")


def draw_random_masks(trained: Mapping[str, torch.Tensor], *, match: Literal["count", "magnitude"] = "count",
                      weights: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                      bins: int = MAGNITUDE_BINS) -> dict[str, torch.Tensor]:
    """Random masks with the trained masks' count of kept weights per tensor (see :func:`draw_random_mask`).

    Args:
        trained: ``{parameter name: bool mask}`` as :func:`smn_core.masking.export_masks` gives (shapes ``S_i``).
        match: ``"count"`` or ``"magnitude"``.
        weights: ``{parameter name: frozen weight}`` of shapes ``S_i`` (needed for ``"magnitude"``).
        seed: the draw's seed (the control cell's seed).

    Returns:
        ``{parameter name: bool tensor of shape S_i}``, never equal to ``trained`` as a whole: when every tensor
        came out equal (masks that keep almost everything), one kept and one dropped weight are swapped.

    Raises:
        ValueError: no masks, a bad ``match`` or missing weights, or a trained mask that keeps every weight
            (or none) of every tensor, for which no other mask of the same counts exists.
    """
    if not trained:
        raise ValueError("no trained masks to draw a random control for")
    if match == "magnitude":
        missing = sorted(set(trained) - set(weights or {}))
        if missing:
            raise ValueError(f"match 'magnitude' needs the weights of every masked tensor; missing: {missing[:3]}")
    drawn = {name: draw_random_mask(m, match=match, weight=(weights or {}).get(name), seed=seed, name=name,
                                    bins=bins) for name, m in trained.items()}
    if all(torch.equal(drawn[n], trained[n].bool().cpu()) for n in trained):
        _differ(drawn, trained, weights or {}, match, bins)
    return drawn


def evaluate_random_mask(cfg, trained: Mapping[str, torch.Tensor], match: Literal["count", "magnitude"], *,
                         pipeline_weights: str | Path | None = None, device: str | torch.device = "cpu",
                         progress: Callable[[str], None] | None = None):
    """The random-mask control of one trained mask, evaluated like a trained cell; nothing is trained.

    The cell's frozen backbone (``cfg.backbone``, BN statistics as pretrained: the SMN recipe's
    ``train.bn_mode: frozen``) gets :func:`draw_random_masks` of ``trained`` (seed ``cfg.seed``), baked in with
    the same ``alpha = sqrt(density)`` rescaling as a trained mask (:func:`smn_core.masking.apply_masks`), and
    :func:`smn_core.pipeline.evaluate_model` evaluates it on ``cfg.dataset`` with ``cfg.eval``.

    Args:
        cfg: the control's ``CellConfig`` (its ``train`` section is the SMN cell's: the same selector).
        trained: the SMN cell's exported masks (``{name: bool tensor}``).
        match: ``"count"`` or ``"magnitude"``.

    Returns:
        A :class:`smn_core.pipeline.CellOutcome`: the evaluation's metrics (``knn_top1``, ``knn_dino_top1``,
        ``linear_probe_top1``, ...) plus ``density`` and ``mask_bits`` (equal to the trained mask's),
        ``ref_density``, ``overlap`` (share of the trained mask's kept weights the random mask keeps too),
        ``storage_bits``, ``num_train``, ``num_test``, ``backbone_params``; the drawn ``masks``, per-image
        correctness and the probe head; no history or state. With ``dataset.val_fraction`` the evaluation's
        names are prefixed ``val_`` (:func:`smn_core.pipeline.eval_split_names`).

    Raises:
        ValueError: a trained mask whose names or shapes do not fit the backbone, or the errors of
            :func:`draw_random_masks`.
    """
    torch.manual_seed(cfg.seed)
    backbone = prepare_backbone(cfg.backbone, pipeline_weights=pipeline_weights)
    params = dict(backbone.model.named_parameters())
    bad = sorted(n for n, m in trained.items() if n not in params or tuple(params[n].shape) != tuple(m.shape))
    if bad:
        raise ValueError(f"trained masks do not fit backbone {cfg.backbone.arch!r}: {bad[:3]}")
    masks = draw_random_masks(trained, match=match, weights={n: params[n] for n in trained}, seed=cfg.seed)
    train_ds, test_ds = load_cell_data(cfg.dataset)
    size = cfg.dataset.image_size or backbone.input_size
    model = apply_masks(backbone.model, masks).to(device)
    if progress is not None:
        progress(f"random mask ({match}) drawn; evaluating")
    per_image: dict[str, np.ndarray] = {}
    probe_head: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallKnnBankWarning)
        metrics = eval_split_names(cfg.dataset, evaluate_model(
            model, train_ds, test_ds, cfg.eval, image_size=size, mean=backbone.mean, std=backbone.std, device=device,
            per_image=per_image, probe_head=probe_head))
    per_image = eval_split_names(cfg.dataset, per_image)
    density, _ = mask_density(masks)
    kept = sum(int(m.sum()) for m in trained.values())
    both = sum(int((masks[n] & trained[n].bool().cpu()).sum()) for n in trained)
    bits = float(sum(m.numel() for m in masks.values()))
    metrics.update(density=density, ref_density=mask_density(dict(trained))[0], overlap=both / max(kept, 1),
                   mask_bits=bits, storage_bits=bits, num_train=float(len(train_ds)),
                   backbone_params=float(sum(p.numel() for p in params.values())),
                   **eval_split_names(cfg.dataset, {"num_test": float(len(test_ds))}))
    return CellOutcome(metrics=metrics, masks=masks, history=[], train_result=None, state=None,
                       per_image=per_image or None, probe_head=probe_head or None)
