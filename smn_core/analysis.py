"""Analyses of learned masks: where the weights are switched off, and how alike two mask sets are.

Never imports torch or ray: masks are ``{parameter name: bool array}``, either torch tensors (as
:func:`smn_core.masking.export_masks` returns them) or numpy arrays (as ``safetensors.numpy`` reads
``<results>/<experiment>/masks/<cell_id>.safetensors``, which is how ``smn report`` / ``smn plot`` read them
without loading torch); every count is done in numpy.

* :func:`tensor_densities` -- density (kept fraction) per masked tensor, with each tensor placed in its
  network *stage* and *block* and named by *component* (paper Table 8, Figs. 6 and 7). open_clip fuses
  the query, key and value projections of a ViT block into one ``attn.in_proj_weight`` (3d x d) and
  ``attn.in_proj_bias`` (3d); they are split back into thirds (``q_proj``, ``k_proj``, ``v_proj``) so the
  per-projection densities of Fig. 6 can be read off.
* :func:`grouped_density` -- size-weighted density per stage or per block.
* :func:`mask_agreement` -- the share of identical mask bits between two mask sets (the
  hyperparameter-invariance check of Sec. 3.2 / App. A, Fig. 5).

Naming rules (the ResNets of timm / torchvision / the CIFAR ResNets, and open_clip's ViT):

=====================================================  =========  ===============  ==============
parameter                                              stage      block            component
=====================================================  =========  ===============  ==============
``conv1.weight`` (ResNet stem)                         ``stem``   ``stem``         ``conv1``
``layer2.1.conv3.weight``                              ``layer2`` ``layer2.1``     ``conv3``
``layer3.0.downsample.0.weight``                       ``layer3`` ``layer3.0``     ``downsample``
``transformer.resblocks.7.attn.in_proj_weight``        ``block7`` ``block7``       ``q_proj`` /
                                                                                   ``k_proj`` /
                                                                                   ``v_proj``
``transformer.resblocks.7.attn.out_proj.bias``         ``block7`` ``block7``       ``out_proj``
``transformer.resblocks.7.mlp.c_fc.weight``            ``block7`` ``block7``       ``fc1``
``transformer.resblocks.7.mlp.c_proj.weight``          ``block7`` ``block7``       ``fc2``
anything else                                          ``other``  ``other``        the module path
=====================================================  =========  ===============  ==============
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np

__all__ = ["TensorDensity", "MaskAgreement", "tensor_densities", "grouped_density", "mask_agreement",
           "network_order"]

_RESNET = re.compile(r"^(?:.*\.)?layer(\d+)\.(\d+)\.(.+)\.(weight|bias)$")
_VIT = re.compile(r"^(?:.*\.)?resblocks\.(\d+)\.(.+?)\.?(weight|bias|in_proj_weight|in_proj_bias)$")
_VIT_COMPONENTS = {"attn.out_proj": "out_proj", "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"}


@dataclass(frozen=True)
class TensorDensity:
    """Density of one masked tensor (or one third of a fused q/k/v projection).

    Attributes:
        name: the parameter name; ``<name>[q]`` / ``[k]`` / ``[v]`` for a third of ``in_proj_*``.
        stage: ``stem``, ``layer<k>`` (ResNet stage), ``block<i>`` (ViT block) or ``other``.
        block: ``stem``, ``layer<k>.<j>`` (ResNet block), ``block<i>`` (ViT) or ``other``.
        component: ``conv1``, ``conv2``, ``conv3``, ``downsample`` (ResNet); ``q_proj``, ``k_proj``,
            ``v_proj``, ``out_proj``, ``fc1``, ``fc2`` (ViT); else the module path.
        kind: ``weight`` or ``bias``.
        kept: number of mask bits that are 1 (weights kept).
        total: number of mask bits.
    """

    name: str
    stage: str
    block: str
    component: str
    kind: str
    kept: int
    total: int

    @property
    def density(self) -> float:
        """Kept fraction ``kept / total`` in [0, 1] (sparsity is ``1 - density``)."""
        return self.kept / self.total


@dataclass(frozen=True)
class MaskAgreement:
    """How alike two mask sets are.

    Attributes:
        identical_fraction: share of mask bits (over every tensor, each bit counted once) that are equal, in [0, 1].
        differing_bits: number of bits that differ.
        total_bits: number of bits compared.
        per_tensor: ``{name: share of identical bits}``.
    """

    identical_fraction: float
    differing_bits: int
    total_bits: int
    per_tensor: dict[str, float]


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def network_order(names) -> list[str]:
    """Parameter names in network order (natural sort: ``resblocks.2`` before ``resblocks.10``)."""
    return sorted(names, key=_natural_key)


def _as_array(m: Any) -> np.ndarray | None:
    """``m`` as a numpy array without importing torch (a CPU view of a torch tensor), or None if it is neither."""
    if isinstance(m, np.ndarray):
        return m
    if type(m).__module__.split(".")[0] == "torch" and hasattr(m, "numpy"):
        return m.detach().cpu().numpy()
    return None


def _check_masks(masks: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """``masks`` as ``{name: bool numpy array}``; ValueError names the first bad entry."""
    if not isinstance(masks, Mapping) or not masks:
        got = "an empty mapping" if isinstance(masks, Mapping) else type(masks).__name__
        raise ValueError(f"{what} must be a non-empty mapping {{parameter name: bool tensor}}, got {got}")
    out = {}
    for name, m in masks.items():
        a = _as_array(m)
        if a is None:
            raise ValueError(f"{what}[{name!r}] must be a torch.Tensor or numpy array, got {type(m).__name__}")
        if a.dtype != np.bool_:
            raise ValueError(f"{what}[{name!r}] must be a bool mask tensor, got dtype {m.dtype}")
        if a.size == 0:
            raise ValueError(f"{what}[{name!r}] is empty")
        out[name] = a
    return out


def _place(name: str) -> tuple[str, str, str, str]:
    """``(stage, block, component, kind)`` of a parameter name (module docstring table)."""
    m = _VIT.match(name)
    if m:
        block, path, leaf = m.group(1), m.group(2), m.group(3)
        kind = "bias" if leaf.endswith("bias") else "weight"
        comp = "in_proj" if leaf.startswith("in_proj") else _VIT_COMPONENTS.get(path, path)
        return f"block{block}", f"block{block}", comp, kind
    m = _RESNET.match(name)
    if m:
        stage, idx, path, kind = m.groups()
        comp = "downsample" if path.startswith("downsample") else path
        return f"layer{stage}", f"layer{stage}.{idx}", comp, kind
    module, _, leaf = name.rpartition(".")
    kind = "bias" if leaf.endswith("bias") else "weight"
    if module == "conv1":
        return "stem", "stem", "conv1", kind
    return "other", "other", module or leaf, kind


def tensor_densities(masks: Mapping[str, Any], *, split_qkv: bool = True) -> list[TensorDensity]:
    """Density of every masked tensor, placed in its stage and block (Table 8, Figs. 6-7).

    Args:
        masks: ``{parameter name: bool tensor}`` (exported masks).
        split_qkv: split open_clip's fused ``in_proj_weight`` ``(3d, d)`` / ``in_proj_bias`` ``(3d,)``
            into the query, key and value thirds (rows ``[0, d)``, ``[d, 2d)``, ``[2d, 3d)``).

    Returns:
        One :class:`TensorDensity` per tensor (three per fused projection), in network order.

    Raises:
        ValueError: empty ``masks``, a value that is not a non-empty bool tensor, or a fused
            projection whose first dimension is not divisible by 3.
    """
    masks = _check_masks(masks, "masks")
    out: list[TensorDensity] = []
    for name in network_order(masks):
        m = masks[name]
        stage, block, comp, kind = _place(name)
        if comp == "in_proj" and split_qkv:
            if m.shape[0] % 3:
                raise ValueError(f"fused projection {name!r} has first dimension {m.shape[0]}, not divisible by 3")
            for part, chunk in zip(("q", "k", "v"), np.split(m, 3, axis=0)):
                out.append(TensorDensity(f"{name}[{part}]", stage, block, f"{part}_proj", kind,
                                         int(np.count_nonzero(chunk)), int(chunk.size)))
            continue
        out.append(TensorDensity(name, stage, block, comp, kind, int(np.count_nonzero(m)), int(m.size)))
    return out


def grouped_density(masks: Mapping[str, Any], level: Literal["stage", "block", "component"] = "stage"
                    ) -> dict[str, float]:
    """Size-weighted density per stage, block or component (kept bits / bits of the group).

    Args:
        masks: ``{parameter name: bool tensor}``.
        level: ``"stage"`` (``stem``, ``layer1`` ...; ViT blocks), ``"block"`` (``layer1.0`` ...) or
            ``"component"`` (``conv1``, ``downsample``, ``q_proj`` ...).

    Returns:
        ``{group: density}`` in network order of each group's first tensor.

    Raises:
        ValueError: on an unknown ``level`` (lists the allowed ones) or bad ``masks``.
    """
    allowed = ("stage", "block", "component")
    if level not in allowed:
        raise ValueError(f"level {level!r} is not known; allowed: {', '.join(allowed)}")
    kept: dict[str, int] = {}
    total: dict[str, int] = {}
    for t in tensor_densities(masks):
        key = getattr(t, level)
        kept[key] = kept.get(key, 0) + t.kept
        total[key] = total.get(key, 0) + t.total
    return {k: kept[k] / total[k] for k in kept}


def mask_agreement(a: Mapping[str, Any], b: Mapping[str, Any]) -> MaskAgreement:
    """Share of identical mask bits between two mask sets over the same tensors.

    Used for the hyperparameter invariance of Sec. 3.2 (Theorems 1-2; App. A, Fig. 5): runs with
    equivalent ``(S0, mu, lr)`` and identical data order should give the same masks.

    Args:
        a, b: ``{parameter name: bool tensor}`` with the same names and shapes.

    Returns:
        A :class:`MaskAgreement`.

    Raises:
        ValueError: bad masks, names that differ (lists a few), or shapes that differ.
    """
    a, b = _check_masks(a, "a"), _check_masks(b, "b")
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise ValueError(f"the mask sets cover different tensors: only in a {only_a}, only in b {only_b}")
    per: dict[str, float] = {}
    same = total = 0
    for name in network_order(a):
        if a[name].shape != b[name].shape:
            raise ValueError(f"mask {name!r} has shape {tuple(a[name].shape)} in a and {tuple(b[name].shape)} in b")
        eq = int(np.count_nonzero(a[name] == b[name]))
        per[name] = eq / a[name].size
        same += eq
        total += a[name].size
    return MaskAgreement(identical_fraction=same / total, differing_bits=total - same, total_bits=total,
                         per_tensor=per)
