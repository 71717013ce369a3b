"""Are the SwAV views of a target dataset learnable for a frozen backbone? (paper Sec. 3.3; NOTES.md)

SwAV asks the network to predict the code of one view of an image from another view of the same
image. If the frozen backbone's features cannot tell two views of one image from views of two
different images, the head settles on the uniform solution (loss exactly ``ln K``) and the scores'
gradients vanish: the run collapses before a mask bit flips. At 32 px with SwAV's 224/96-px view
settings this is what happens (same-image centred cosine 0.19 against 0.11 for other images).

:func:`view_similarity` measures it before training: the centred cosine similarity of the frozen
features of view 0 with every other view of the same image (``same``) and of other images
(``other``). A small gap means the views are too strong (or the crops too small) for this backbone
at this resolution; a ``same`` close to 1 means they are too weak to teach anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import SeededViewDataset, collate_views

__all__ = ["ViewSimilarity", "view_similarity", "MIN_VIEW_GAP", "MAX_VIEW_SAME"]

MIN_VIEW_GAP = 0.15
"""Warn below this gap (same - other): the backbone can hardly tell the views of one image apart."""
MAX_VIEW_SAME = 0.95
"""Warn above this same-image similarity: the views are nearly identical and teach nothing."""


@dataclass(frozen=True)
class ViewSimilarity:
    """Result of :func:`view_similarity` (cosines in [-1, 1]).

    Attributes:
        same: mean centred cosine between view 0 and each other view of the same image.
        other: mean centred cosine between view 0 of one image and the other views of other images.
        gap: ``same - other``.
        warning: a sentence when the views look too strong (``gap < MIN_VIEW_GAP``) or too weak
            (``same > MAX_VIEW_SAME``), else None.
    """

    same: float
    other: float
    gap: float
    warning: str | None


@torch.no_grad()
def view_similarity(model: torch.nn.Module, dataset, transform, *, num_images: int = 128, seed: int = 0,
                    batch_size: int = 64, device: str | torch.device = "cpu") -> ViewSimilarity:
    """Same-image vs other-image similarity of a frozen backbone's features on multi-crop views.

    Args:
        model: images ``(B, 3, s, s)`` -> features ``(B, F)``; run in eval mode (restored afterwards).
        dataset: items ``(PIL image, label)`` (e.g. an ``ImageDataset``).
        transform: ``PIL image -> list of V >= 2 view tensors`` (a ``MultiCropTransform``).
        num_images: images sampled (without replacement, seeded) from ``dataset``, >= 2.
        seed: seeds the sample and the views.
        batch_size: images per forward pass.
        device: where ``model`` lives.

    Returns:
        A :class:`ViewSimilarity`. Features are centred by their mean over every view of every sampled
        image, then L2-normalised.

    Raises:
        ValueError: fewer than 2 images or a transform that gives fewer than 2 views.
    """
    n = min(int(num_images), len(dataset))
    if n < 2:
        raise ValueError(f"view_similarity needs at least 2 images, got {n}")
    idx = np.random.default_rng(seed).choice(len(dataset), size=n, replace=False)
    views_ds = SeededViewDataset(torch.utils.data.Subset(dataset, idx.tolist()), transform, seed=seed)
    loader = torch.utils.data.DataLoader(views_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_views)
    was_training = model.training
    model.eval()
    try:
        per_view: list[list[torch.Tensor]] = []
        for views, _, _ in loader:
            if len(views) < 2:
                raise ValueError(f"view_similarity needs a transform with >= 2 views, got {len(views)}")
            feats = [model(v.to(device)).float().cpu() for v in views]
            per_view = feats if not per_view else [torch.cat([a, b]) for a, b in zip(per_view, feats)]
    finally:
        model.train(was_training)
    stacked = torch.stack(per_view)  # (V, N, F)
    stacked = F.normalize(stacked - stacked.mean(dim=(0, 1), keepdim=True), dim=-1)
    anchor = stacked[0]
    sims = torch.einsum("nf,vmf->vnm", anchor, stacked[1:])  # (V-1, N, N)
    eye = torch.eye(n, dtype=torch.bool)
    same = float(sims[:, eye].mean())
    other = float(sims[:, ~eye].mean())
    gap = same - other
    warning = None
    if gap < MIN_VIEW_GAP:
        warning = (f"the frozen backbone barely tells two views of one image from views of two images "
                   f"(centred cosine {same:.3f} vs {other:.3f}, gap {gap:.3f} < {MIN_VIEW_GAP}): the views are "
                   f"too strong for this input size; SwAV will likely collapse (larger crops, milder colour "
                   f"jitter, train.head_only_steps)")
    elif same > MAX_VIEW_SAME:
        warning = (f"two views of one image are nearly identical for the frozen backbone (centred cosine "
                   f"{same:.3f} > {MAX_VIEW_SAME}): the views are too weak to teach anything")
    return ViewSimilarity(same=same, other=other, gap=gap, warning=warning)
