"""The configuration of a cell, torch-free: what a spec, ``smn validate`` and ``smn run --dry-run`` need.

Every dataclass a cell's configuration is made of lives here, with its validation (``__post_init__``), so
that checking a spec imports the standard library and numpy only, never torch or torchvision (whose import
takes seconds): :class:`CellConfig` (one resolved cell) and its parts :class:`BackboneSpec`,
:class:`DataSpec`, :class:`EvalSpec`, :class:`PretrainSpec`, :class:`TrainConfig` (with :class:`MaskConfig`,
:class:`SwAVConfig`, :class:`MultiCropConfig`), and the method table :data:`METHODS`.

The modules that use them (``smn_core.pipeline``, ``training``, ``masking``, ``swav``, ``augment``) import them
from here, so the old import paths keep working. Plain Python; never imports torch or ray (a unit test checks).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from .registry import check_choice

__all__ = [
    "METHODS",
    "CONTROLS",
    "method_training",
    "BackboneSpec",
    "DataSpec",
    "EvalSpec",
    "PretrainSpec",
    "CellConfig",
    "TrainConfig",
    "MaskConfig",
    "SwAVConfig",
    "MultiCropConfig",
    "OBJECTIVES",
    "ADAPTATIONS",
    "BN_MODES",
    "DTYPES",
    "CLASSIFIERS",
    "SCHEDULES",
    "ON_COLLAPSE",
    "SELECTORS",
    "SELECTIVE",
    "HEAD_INITS",
    "COVARIANCE_TYPES",
    "MODES",
    "SCALINGS",
    "BUILTIN_BACKBONES",
    "BUILTIN_DATASETS",
    "check_positive_int",
]


# --- SwAV multi-crop (smn_core.augment) ---

def check_positive_int(value: Any, what: str) -> int:
    """``value`` as an int, or a ValueError naming ``what`` when it is not an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _check_probability(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_scale(value: Any, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair (min, max) of floats, got {value!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{what} must satisfy 0 < min <= max <= 1 (fractions of the image area), got {value!r}")
    return lo, hi


@dataclass
class MultiCropConfig:
    """SwAV multi-crop settings (Caron et al. 2020, Sec. 3.2 / App. A; SMN paper Sec. 3.3, NOTES.md).

    Attributes:
        n_global: number of global (high-resolution) crops, >= 1 (paper: 2).
        n_local: number of local (low-resolution) crops, >= 0 (paper: 6).
        global_size: global crop side in pixels; ``None`` -> ``image_size``.
        local_size: local crop side in pixels; ``None`` -> ``round(96 / 224 * image_size)`` rounded to
            a multiple of 2, at least ``local_size_floor`` (96 for 224).
        local_size_floor: smallest default local crop side in pixels (16: a 32-px input gets 16-px
            local crops, not 14-px ones; a CIFAR ResNet's last stage then still sees 4 x 4).
        global_scale: ``RandomResizedCrop`` area fraction range of global crops (paper: (0.14, 1)).
        local_scale: area fraction range of local crops (paper: (0.05, 0.14)).
        color_jitter_strength: ``s`` of SwAV's ``get_color_distortion(s)``: brightness/contrast/
            saturation ``0.8 s``, hue ``0.2 s`` (hue capped at 0.5); 0 disables jitter (SwAV and the
            paper: s = 1.0, i.e. ColorJitter(0.8, 0.8, 0.8, 0.2); NOTES.md's "0.8" is the 0.8 s factor).
        color_jitter_p: probability of applying the colour jitter (0.8).
        grayscale_p: probability of converting to grayscale, kept 3-channel (0.2).
        blur_p: probability of a Gaussian blur (0.5).
        blur_sigma: sigma range (low, high) in pixels *at SwAV's crop sides* (224 px global, 96 px
            local): (0.1, 2.0). A crop of another side ``s`` draws sigma uniform in
            ``blur_sigma * s / 224`` (global) or ``blur_sigma * s / 96`` (local), so the blur keeps its
            size relative to the crop (SwAV: at most 2 % of a 96-px crop) instead of blotting out a
            14-px one (see :meth:`blur_sigma_for`).
        flip_p: probability of a horizontal flip (0.5).

    Raises:
        ValueError: (at construction) a count, size, scale or probability outside the ranges above.
    """

    n_global: int = 2
    n_local: int = 6
    global_size: int | None = None
    local_size: int | None = None
    global_scale: tuple[float, float] = (0.14, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.14)
    local_size_floor: int = 16
    color_jitter_strength: float = 1.0
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.n_global, bool) or not isinstance(self.n_global, numbers.Integral) or self.n_global < 1:
            raise ValueError(f"n_global must be an int >= 1, got {self.n_global!r}")
        if isinstance(self.n_local, bool) or not isinstance(self.n_local, numbers.Integral) or self.n_local < 0:
            raise ValueError(f"n_local must be an int >= 0, got {self.n_local!r}")
        for what in ("global_size", "local_size"):
            if getattr(self, what) is not None:
                check_positive_int(getattr(self, what), what)
        check_positive_int(self.local_size_floor, "local_size_floor")
        try:
            low, high = (float(v) for v in self.blur_sigma)
        except (TypeError, ValueError):
            raise ValueError(f"blur_sigma must be a pair (low, high) of pixels, got {self.blur_sigma!r}") from None
        if not (np.isfinite(low) and np.isfinite(high) and 0 < low <= high):
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high (pixels), got {self.blur_sigma!r}")
        self.blur_sigma = (low, high)
        self.global_scale = _check_scale(self.global_scale, "global_scale")
        self.local_scale = _check_scale(self.local_scale, "local_scale")
        s = self.color_jitter_strength
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not np.isfinite(s) or s < 0:
            raise ValueError(f"color_jitter_strength must be a finite float >= 0, got {s!r}")
        for what in ("color_jitter_p", "grayscale_p", "blur_p", "flip_p"):
            _check_probability(getattr(self, what), what)

    @property
    def n_views(self) -> int:
        """Total number of views, ``n_global + n_local``."""
        return self.n_global + self.n_local

    def sizes(self, image_size: int) -> tuple[int, int]:
        """``(global_size, local_size)`` in pixels for inputs of side ``image_size``, defaults resolved.

        Raises:
            ValueError: ``image_size`` not a positive int.
        """
        image_size = check_positive_int(image_size, "image_size")
        global_size = self.global_size if self.global_size is not None else image_size
        if self.local_size is not None:
            local_size = self.local_size
        else:
            local_size = max(self.local_size_floor, 2 * round(96 / 224 * image_size / 2))
            local_size = min(local_size, global_size)
        return int(global_size), int(local_size)

    def blur_sigma_for(self, crop_size: int, *, local: bool) -> tuple[float, float]:
        """Blur sigma range in pixels for a crop of side ``crop_size`` (``blur_sigma`` scaled by
        ``crop_size / 96`` for local crops, ``crop_size / 224`` for global ones; SwAV's own sizes give
        exactly (0.1, 2.0)).

        Raises:
            ValueError: ``crop_size`` not a positive int.
        """
        crop_size = check_positive_int(crop_size, "crop_size")
        ratio = crop_size / (96.0 if local else 224.0)
        return self.blur_sigma[0] * ratio, self.blur_sigma[1] * ratio


# --- masks (smn_core.masking) ---

SELECTORS = ("conv", "linear", "conv+linear", "attn_mlp", "clip_attn_mlp", "all", "all_but_norm", "all_but_bias")
SELECTIVE = ("none", "random", "magnitude")
_MASK_MODES = ("threshold", "topk")



@dataclass
class MaskConfig:
    """What to mask and how (paper Sec. 3.1-3.2, Table 5b).

    Attributes:
        selector: which parameter tensors get a mask: ``"conv"`` (weights of every ``nn.Conv*``,
            downsample convolutions included; the ResNet default), ``"linear"``, ``"conv+linear"``,
            ``"attn_mlp"`` (any transformer: every ``nn.Linear`` inside a block ``blocks.<i>`` or
            ``resblocks.<i>``, i.e. the attention projections, fused ``qkv`` included, and the MLP, plus the
            ``in_proj_weight`` of every ``nn.MultiheadAttention``; weights and biases), ``"clip_attn_mlp"``
            (the same, its historical name for the CLIP ViT), ``"all"`` (every floating-point parameter: Table 5b "none frozen"),
            ``"all_but_norm"`` (every parameter except those of normalisation layers: Table 5b "BNs
            frozen", which on a ResNet backbone is the conv default), ``"all_but_bias"`` (every
            parameter except biases: Table 5b "biases frozen"), or ``"re:<regex>"`` matched against
            full parameter names.
        include_bn: also mask the affine parameters (weight and bias) of normalisation layers
            (BatchNorm, and GroupNorm/LayerNorm where a model has them). Off by default: masking BN
            collapses accuracy (Table 5b).
        include_bias: also mask the biases of the selected modules.
        init_score: ``S0``, initial score (default 1.0).
        threshold: ``mu``, mask threshold (default 0.0). Theorem 1: only ``S0 - mu`` matters.
        alpha_grad: differentiate through ``alpha`` (reference-code behaviour); default False.
        mode: ``"threshold"`` (the method) or ``"topk"`` (Ramanujan et al. baseline).
        topk_density: kept fraction per tensor for ``mode="topk"``, in (0, 1].
        topk_init_noise: ``mode="topk"`` only: the scores start at ``S0 + U(-a, a)`` with this ``a``
            (default 0.01), drawn per tensor from a generator seeded with the cell's torch seed and the
            tensor's name. With every score equal, ``torch.topk`` breaks the ties by index and whole
            output channels die at step 0; Ramanujan et al. (2020) start from random scores, so the
            first top-k mask is random and unstructured. Must be > 0 for top-k.
        stages: selective masking (App. F, Fig. 8): mask only the parameters of the first N stages
            (see :func:`stage_of`: a ResNet's ``layer1`` .. ``layerN``, timm's ``stages.0 .. N-1``, a
            transformer's first N blocks; the stem counts with stage 1). None: every selected tensor.
        selective: selective masking within each masked tensor (App. F, Figs. 8-9): ``"none"``
            (every position has a trainable mask), ``"random"`` (a random fraction
            ``selective_fraction`` of the positions of each tensor, drawn with ``selective_seed``)
            or ``"magnitude"`` (the fraction with the largest ``|W|``). Positions without a trainable
            mask stay active (mask 1) for the whole run.
        selective_fraction: p in (0, 1] for ``selective != "none"``.
        selective_seed: seed of the random selection (combined with each tensor's name).

    Raises:
        ValueError: on an unknown selector, mode or selective strategy, a density or fraction outside
            (0, 1], or selective masking combined with top-k.
    """

    selector: str = "conv"
    include_bn: bool = False
    include_bias: bool = False
    init_score: float = 1.0
    threshold: float = 0.0
    alpha_grad: bool = False
    mode: Literal["threshold", "topk"] = "threshold"
    topk_density: float | None = None
    topk_init_noise: float = 0.01
    stages: int | None = None
    selective: Literal["none", "random", "magnitude"] = "none"
    selective_fraction: float | None = None
    selective_seed: int = 0

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS and not self.selector.startswith("re:"):
            raise ValueError(
                f"mask selector {self.selector!r} is not known; allowed: {', '.join(SELECTORS)} or 're:<regex>'"
            )
        if self.selector.startswith("re:"):
            try:
                re.compile(self.selector[3:])
            except re.error as exc:
                raise ValueError(f"mask selector regex {self.selector[3:]!r} is invalid: {exc}") from None
        if self.mode not in _MASK_MODES:
            raise ValueError(f"mask mode {self.mode!r} is not known; allowed: {', '.join(_MASK_MODES)}")
        if self.mode == "topk":
            if self.topk_density is None or not 0.0 < self.topk_density <= 1.0:
                raise ValueError(f"topk_density must be in (0, 1] for mode 'topk', got {self.topk_density!r}")
        if self.mode == "topk" and not (math.isfinite(self.topk_init_noise) and self.topk_init_noise > 0):
            raise ValueError(f"topk_init_noise must be a finite number > 0 for mode 'topk' (random tie-breaking "
                             f"of the first mask), got {self.topk_init_noise!r}")
        if self.stages is not None and self.stages < 1:
            raise ValueError(f"mask stages must be >= 1 (the first N ResNet stages) or null, got {self.stages}")
        if self.selective not in SELECTIVE:
            raise ValueError(f"selective masking {self.selective!r} is not known; allowed: {', '.join(SELECTIVE)}")
        if self.selective != "none":
            if self.selective_fraction is None or not 0.0 < self.selective_fraction <= 1.0:
                raise ValueError(f"selective_fraction must be in (0, 1] for selective {self.selective!r}, "
                                 f"got {self.selective_fraction!r}")
            if self.mode == "topk":
                raise ValueError("selective masking works with threshold masks only, not mode 'topk'")
        if not math.isfinite(self.init_score) or not math.isfinite(self.threshold):
            raise ValueError(f"init_score and threshold must be finite, got {self.init_score}, {self.threshold}")
        if self.mode == "threshold" and self.init_score <= self.threshold:
            raise ValueError(
                f"init_score ({self.init_score}) must exceed threshold ({self.threshold}) so training starts "
                "from the full pretrained network"
            )


# --- SwAV (smn_core.swav) ---

HEAD_INITS = ("random", "pca_kmeans")



@dataclass
class SwAVConfig:
    """SwAV hyperparameters (paper Sec. 3.3 and 4.1; NOTES.md).

    Attributes:
        num_prototypes: ``K`` (paper: 500; Table 5a compares 50 / 500 / 5000).
        proj_dim: code dimension (paper: 128, projection head a single Linear).
        hidden_dim: if > 0, a 2-layer MLP projection head (Linear-BN-ReLU-Linear) instead.
        input_norm: standardise the backbone features with a ``BatchNorm1d`` without affine parameters
            before the projection (batch statistics in training). A mask can shrink the features of a
            frozen backbone until ``W f + b`` is the same vector for every image: all codes alike, every
            prototype equally far, loss ``ln K``. Batch standardisation takes that constant part out, so
            this collapse is closed to the scores. Off by default (the paper's head is a single Linear).
        temperature: softmax temperature ``tau`` (0.1).
        epsilon: Sinkhorn entropic regularisation (0.05).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        queue_length: global queue length in embeddings (reference code: 512; 0 disables it).
        queue_start_fraction: fraction of the epochs after which the queue is filled and used
            (paper: epoch 30 of 150, i.e. 0.2).
        freeze_prototypes_steps: optimisation steps during which the prototypes get no update
            (reference code: 5005).
        crops_for_assign: indices of the views whose assignments are computed (the global crops).
        head_init: ``"random"`` (PyTorch's default initialisation, SwAV's) or ``"pca_kmeans"``: the
            projection starts as the PCA whitening of the frozen backbone's features on the target
            train split and the prototypes as k-means centroids of the projected codes
            (:func:`init_head_from_features`). The backbone is frozen and pretrained, so the head can
            start where SwAV's online clustering would end on the frozen features, instead of from a
            random head that the scores then follow (LP-FT's argument, Kumar et al. 2022). Needs
            ``hidden_dim == 0``.

    Raises:
        ValueError: on non-positive sizes, temperature or epsilon, or a fraction outside [0, 1].
    """

    num_prototypes: int = 500
    proj_dim: int = 128
    hidden_dim: int = 0
    input_norm: bool = False
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    queue_length: int = 512
    queue_start_fraction: float = 0.2
    freeze_prototypes_steps: int = 5005
    crops_for_assign: tuple[int, ...] = (0, 1)
    head_init: str = "random"

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        for name in ("num_prototypes", "proj_dim", "sinkhorn_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"swav.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hidden_dim", "queue_length", "freeze_prototypes_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"swav.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"swav.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.queue_start_fraction <= 1.0:
            raise ValueError(f"swav.queue_start_fraction must be in [0, 1], got {self.queue_start_fraction}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"swav.head_init {self.head_init!r} is not known; allowed: {', '.join(HEAD_INITS)}")
        if self.head_init == "pca_kmeans" and self.hidden_dim:
            raise ValueError("swav.head_init 'pca_kmeans' initialises a linear projection head; it needs "
                             f"swav.hidden_dim 0, got {self.hidden_dim}")
        self.crops_for_assign = tuple(self.crops_for_assign)
        if not self.crops_for_assign or min(self.crops_for_assign) < 0:
            raise ValueError(f"swav.crops_for_assign must be non-empty view indices, got {self.crops_for_assign}")


# --- training (smn_core.training) ---

OBJECTIVES = ("swav", "supervised")
ADAPTATIONS = ("mask", "full")
BN_MODES = ("adapt", "frozen")
DTYPES = ("float32", "float64")
CLASSIFIERS = ("linear", "clip_text")
SCHEDULES = ("cosine", "constant")
ON_COLLAPSE = ("warn", "stop")



@dataclass
class TrainConfig:
    """Hyperparameters of one adaptation run (paper Sec. 4.1; defaults are the paper's).

    Attributes:
        objective: ``"swav"`` or ``"supervised"``.
        adaptation: ``"mask"`` (learn scores; weights frozen) or ``"full"`` (train the weights: FFT / STN).
        epochs: passes over the training set (>= 1).
        batch_size: global batch size, divided by the number of workers (paper: 64).
        score_lr: learning rate of the scores (paper: 50 for CNNs, 10 for CLIP).
        head_lr: learning rate of the projection head, prototypes or linear head (0.15).
        head_weight_decay: weight decay of the head (1e-6); scores never get weight decay.
        weight_lr, weight_decay: for ``adaptation="full"`` (paper FFT: 0.001 / 5e-4 for timm ResNet-18).
        momentum: SGD momentum (0.9).
        warmup_epochs: linear warmup of the *scores'* learning rate before its cosine decay (paper
            Sec. 4.1: the mask lr warms up to epoch 40 of 150; the head's does not).
        head_warmup_epochs: linear warmup of the head's (projection, prototypes, linear head) learning
            rate, separate from the scores'. None (default) follows the paper (Sec. 4.1): 0 for the SwAV
            objective (the mask lr warms up, the head's does not), ``warmup_epochs`` for the supervised one
            (linear warmup of the whole run).
        head_only_steps: LP-FT warm start (Kumar et al. 2022): for the first N optimisation steps only
            the head trains (the scores' lr is 0), so the scores never follow the gradient of a random
            head; the scores' warmup and cosine schedule start after these steps. 0 disables it.
        on_collapse: what a SwAV run does when :func:`smn_core.swav.detect_collapse` flags
            ``collapse_patience`` consecutive epochs: ``"warn"`` (go on; the result records it) or
            ``"stop"`` (end training there and record why, so a cluster does not spend hours on a
            dead run). Checked after every epoch.
        collapse_patience: consecutive collapsed epochs before ``on_collapse`` acts (>= 1; default 2:
            a fresh SwAV head starts near ``ln K``).
        weight_warmup_epochs: warmup of full fine-tuning runs (``adaptation="full"``), replacing
            ``warmup_epochs`` for them (paper Sec. 4.1: FFT baselines use a plain cosine, masks warm up to
            epoch 40, so one spec can hold both); None: ``warmup_epochs``.
        schedule: ``"cosine"`` or ``"constant"``.
        bn_mode: ``"adapt"`` or ``"frozen"`` (see module docstring).
        topk_final_density / progressive_topk: top-k masking; progressive lowers the kept fraction
            linearly per epoch from 1.0 to the final density (App. E).
        max_steps_per_epoch: cap on steps per epoch (quick runs, benchmarks); None = full epoch.
        loader_workers: DataLoader worker processes (0 = in the training process).
        seed: seeds initialisation, data order and augmentation.
        dtype: ``"float32"`` (default) or ``"float64"``: the model, its scores and the inputs are cast to it
            for training (float64 on the CPU makes Theorems 1-2 of Sec. 3.2 hold bit for bit, App. A).
        classifier: head of the supervised objective: ``"linear"`` (a new random linear head, ResNets) or
            ``"clip_text"`` (CLIP ViT-B/32, Sec. 4.1: frozen text embeddings of ``prompt_template`` filled with
            each class name, cosine-similarity logits scaled by CLIP's logit scale; built by the pipeline and
            passed to :func:`build_adaptation_model`). Ignored by the SwAV objective.
        prompt_template: prompt with one ``{}`` for the class name (``classifier="clip_text"``).
        mask, swav, multicrop: sub-configurations.

    Raises:
        ValueError: on an unknown objective, adaptation or bn_mode, or non-positive sizes and rates.
    """

    objective: Literal["swav", "supervised"] = "swav"
    adaptation: Literal["mask", "full"] = "mask"
    epochs: int = 150
    batch_size: int = 64
    score_lr: float = 50.0
    head_lr: float = 0.15
    head_weight_decay: float = 1e-6
    weight_lr: float = 0.001
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    head_warmup_epochs: float | None = None
    head_only_steps: int = 0
    weight_warmup_epochs: float | None = None
    schedule: Literal["cosine", "constant"] = "cosine"
    bn_mode: Literal["adapt", "frozen"] = "adapt"
    on_collapse: Literal["warn", "stop"] = "warn"
    collapse_patience: int = 2
    progressive_topk: bool = False
    max_steps_per_epoch: int | None = None
    loader_workers: int = 0
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    classifier: Literal["linear", "clip_text"] = "linear"
    prompt_template: str = "a photo of a {}"
    mask: MaskConfig = field(default_factory=MaskConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        for name, allowed in (("objective", OBJECTIVES), ("adaptation", ADAPTATIONS), ("bn_mode", BN_MODES),
                              ("schedule", SCHEDULES), ("on_collapse", ON_COLLAPSE), ("dtype", DTYPES),
                              ("classifier", CLASSIFIERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not known; allowed: {', '.join(allowed)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("score_lr", "head_lr", "weight_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("head_weight_decay", "weight_decay", "momentum", "warmup_epochs", "head_only_steps",
                     "loader_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        for name in ("head_warmup_epochs", "weight_warmup_epochs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= self.epochs:
                raise ValueError(f"{name} must be in [0, epochs={self.epochs}] or null, got {getattr(self, name)}")
        if self.collapse_patience < 1:
            raise ValueError(f"collapse_patience must be >= 1 epoch, got {self.collapse_patience}")
        if not isinstance(self.prompt_template, str) or self.prompt_template.count("{}") != 1:
            raise ValueError(f"prompt_template {self.prompt_template!r} is invalid; allowed: a string with exactly "
                             "one '{}' for the class name, e.g. 'a photo of a {}'")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")
        if self.progressive_topk and self.mask.mode != "topk":
            raise ValueError("progressive_topk needs mask.mode = 'topk'")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form (used for hashing and the ledger)."""
        return asdict(self)


# --- one cell (smn_core.pipeline) ---

METHODS: dict[str, tuple[str, str] | None] = {
    "pretrained": None,
    "pretrained_bn": None,
    "smn": ("swav", "mask"),
    "supervised_mask": ("supervised", "mask"),
    "fft": ("supervised", "full"),
    "stn": ("swav", "full"),
    "random_mask": ("swav", "mask"),
    "random_mask_magnitude": ("swav", "mask"),
}

CONTROLS: dict[str, str] = {"random_mask": "count", "random_mask_magnitude": "magnitude"}
"""The random-mask controls (issue 25) and their ``match`` (:mod:`smn_core.random_mask`): not trained, they
evaluate a random mask of their SMN cell's size (same config with ``method: smn``); their ``train`` section is
the SMN cell's, so they keep it in their identity."""


def method_training(method: str) -> tuple[str, str] | None:
    """``(objective, adaptation)`` of a method, or None for the frozen ones (``pretrained``, ``pretrained_bn``).

    Raises:
        ValueError: on an unknown method (lists the allowed ones).
    """
    check_choice(method, METHODS, "method")
    return METHODS[method]


@dataclass
class BackboneSpec:
    """Which backbone and which weights (see ``smn_core.backbones``).

    ``weights``: ``"pretrained"`` (the real published weights), ``"random"``, ``"checkpoint"``
    (a local file in ``checkpoint``), or ``"pipeline"`` (weights produced by this experiment's own
    supervised pretraining stage, see :class:`PretrainSpec`).
    """

    arch: str = "cifar_resnet20"
    weights: str = "pretrained"
    checkpoint: str | None = None

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        allowed = ("pretrained", "random", "checkpoint", "pipeline")
        if self.weights not in allowed:
            raise ValueError(f"backbone.weights {self.weights!r} is not known; allowed: {', '.join(allowed)}")
        if self.weights == "checkpoint" and not self.checkpoint:
            raise ValueError("backbone.weights 'checkpoint' needs backbone.checkpoint (a file path)")


@dataclass
class DataSpec:
    """A dataset and the part of it to use (see ``smn_core.data.load_dataset``).

    ``image_size`` in pixels is the training and evaluation resolution (None: the backbone's).
    ``max_train_samples`` / ``max_test_samples`` take deterministic stratified subsets.
    ``label_fraction`` (low-shot, paper Fig. 3): the share of training labels a *supervised* objective
    may train on, drawn per class (every class keeps at least one example; seed ``split_seed``) and
    repeated to the length of the whole split, so that a training epoch has as many steps as with all
    labels (the paper does not say how long its low-shot runs trained); None means all. Unlabeled
    adaptation (SwAV) and the frozen backbone always see every training image, so
    :class:`CellConfig` resets it to None for them (their low-shot readout is ``eval.lowshot_fractions``).

    ``val_fraction`` (issue 25; None: off): carve a stratified validation split, seeded with ``split_seed``, out
    of the TRAIN split (``smn_core.data.train_val_split``). The cell then adapts on the rest of train, and its
    evaluation (k-NN bank and probe fitted on that rest) reports on the validation images under metric names
    prefixed ``val_`` (``val_knn_top1``, ``val_knn_dino_top1``, ``val_linear_probe_top1``, ...): the test split is
    not loaded, and no validation number can be read as a test one (docs/ledger.md). Left at None it is not
    part of the cell's identity (cell ids stay as they were).
    """

    source: str = "digits"
    root: str | None = None
    classes: list[int] | list[str] | None = None
    image_size: int | None = None
    test_fraction: float = 0.3
    split_seed: int = 0
    download: bool = False
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    label_fraction: float | None = None
    val_fraction: float | None = None

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.val_fraction is not None and (isinstance(self.val_fraction, bool)
                                              or not 0.0 < self.val_fraction < 1.0):
            raise ValueError(f"dataset.val_fraction must be in (0, 1) or null, got {self.val_fraction}")
        if self.label_fraction is not None and not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"dataset.label_fraction must be in (0, 1] or null, got {self.label_fraction}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"dataset.image_size must be >= 8 pixels, got {self.image_size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"dataset.test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("max_train_samples", "max_test_samples"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"dataset.{name} must be >= 2 or null, got {v}")


@dataclass
class EvalSpec:
    """Evaluation protocol (paper Sec. 4.1): weighted k-NN (DINO) and a logistic-regression probe.

    Two k-NN protocols are recorded in every cell: the paper's (``knn_k`` = 200, ``knn_temperature`` =
    0.1, metric ``knn_top1``) and DINO's recommended one (``knn_dino_k`` = 20, ``knn_dino_temperature`` =
    0.07, metric ``knn_dino_top1``). On small banks (about 125 images per class) k = 200 votes over more
    than one class's worth of neighbours; :func:`evaluate_model` warns when ``k`` exceeds the smallest
    class's bank size and records it (``knn_min_class_bank``).

    Linear probe: ``probe_standardize`` (default True) standardises the features (train mean / std)
    before an L2-regularised logistic regression with inverse strength ``probe_C`` (default 1). The
    reference code used cyanure with lambda = 0.01 / N on raw features; since sklearn's objective is
    ``C * sum(loss) + ||w||^2 / 2`` and cyanure's is ``mean(loss) + lambda / 2 ||w||^2``, that is
    ``C = 1 / (lambda N) = 100`` with ``probe_standardize: false``. ``probe_C_grid`` (e.g. ``[0.01, 0.03,
    ..., 100]``; empty by default) chooses C per feature set instead, by stratified ``probe_cv_folds``-fold
    cross-validation on the train split (see :func:`smn_core.evaluation.linear_probe`); the C fitted is
    recorded as ``linear_probe_C``. Low-shot probes keep ``probe_C``: their subsets hold 1-15 images per
    class, too few to hold out folds.

    ``lowshot_fractions`` (paper Fig. 3; NOTES.md: CIFAR 10, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625 %, given
    here as fractions 0.1 ... 0.000625) adds one linear probe per fraction, fitted on a per-class sample
    of the train labels (seed ``lowshot_seed``), reported as ``lowshot_top1@<fraction>``.
    """

    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_dino_k: int = 20
    knn_dino_temperature: float = 0.07
    probe_C: float = 1.0
    probe_standardize: bool = True
    probe_max_iter: int = 1000
    probe_C_grid: list[float] = field(default_factory=list)
    probe_cv_folds: int = 5
    batch_size: int = 256
    lowshot_fractions: list[float] = field(default_factory=list)
    lowshot_seed: int = 0

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        for name in ("knn_k", "knn_dino_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("knn_temperature", "knn_dino_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"eval.{name} must be > 0, got {getattr(self, name)}")
        if not self.probe_C > 0:
            raise ValueError(f"eval.probe_C must be > 0, got {self.probe_C}")
        if self.probe_max_iter < 1 or self.batch_size < 1:
            raise ValueError("eval.probe_max_iter and eval.batch_size must be >= 1")
        bad_c = [c for c in self.probe_C_grid if not (math.isfinite(c) and c > 0)]
        if bad_c:
            raise ValueError(f"eval.probe_C_grid must hold finite numbers > 0, got {self.probe_C_grid}")
        if self.probe_cv_folds < 2:
            raise ValueError(f"eval.probe_cv_folds must be >= 2, got {self.probe_cv_folds}")
        bad = [f for f in self.lowshot_fractions if not 0.0 < f <= 1.0]
        if bad or len(set(self.lowshot_fractions)) != len(self.lowshot_fractions):
            raise ValueError(f"eval.lowshot_fractions must be distinct fractions in (0, 1] (0.01 = 1 %), "
                             f"got {self.lowshot_fractions}")

    def probe_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`smn_core.evaluation.linear_probe` for the full-label probe of this
        protocol (``C``, ``max_iter``, ``standardize``, ``C_grid`` (None when empty: fixed ``C``), ``cv_folds``)."""
        return dict(C=self.probe_C, max_iter=self.probe_max_iter, standardize=self.probe_standardize,
                    C_grid=self.probe_C_grid or None, cv_folds=self.probe_cv_folds)


@dataclass
class PretrainSpec:
    """The pipeline's own supervised pretraining of a randomly initialised backbone (source domain).

    Used when ``backbone.weights == "pipeline"``: e.g. the demo pretrains a CIFAR ResNet on
    digits 0-4 before self-masking it on digits 5-9.
    """

    dataset: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(objective="supervised", adaptation="full",
                                                                   epochs=5, weight_lr=0.1, head_lr=0.1))

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if self.train.objective != "supervised" or self.train.adaptation != "full":
            raise ValueError("pretrain.train must have objective 'supervised' and adaptation 'full'")
        if self.dataset.val_fraction is not None:
            raise ValueError(f"pretrain.dataset.val_fraction {self.dataset.val_fraction} is not used (the pretraining "
                             "is never evaluated); allowed: null (set dataset.val_fraction for the cells)")


@dataclass
class CellConfig:
    """One fully resolved cell. Its JSON form (``to_dict``) is what the ledger hashes."""

    method: str = "smn"
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    dataset: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    pretrain: PretrainSpec | None = None
    seed: int = 0

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        training = method_training(self.method)
        if training is not None:
            objective, adaptation = training
            if self.train.objective != objective or self.train.adaptation != adaptation:
                self.train = replace(self.train, objective=objective, adaptation=adaptation)
        if self.train.seed != self.seed:
            self.train = replace(self.train, seed=self.seed)
        if self.dataset.label_fraction is not None and (training is None or training[0] != "supervised"):
            # labels are used by supervised training only: one unlabeled cell serves every fraction
            self.dataset = replace(self.dataset, label_fraction=None)
        if (training is not None and training[0] == "supervised" and self.train.classifier == "clip_text"
                and not self.backbone.arch.startswith("clip")):
            raise ValueError(f"train.classifier 'clip_text' needs a CLIP backbone, got backbone.arch "
                             f"{self.backbone.arch!r}; allowed: clip_vit_b32 (or classifier 'linear')")
        if self.backbone.weights == "pipeline" and self.pretrain is None:
            raise ValueError("backbone.weights 'pipeline' needs a 'pretrain' section")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable identity of the cell (training settings dropped for ``pretrained``)."""
        d = asdict(self)
        if METHODS[self.method] is None:
            d.pop("train")
        if self.backbone.weights != "pipeline":
            d.pop("pretrain")
        for data in (d["dataset"], (d.get("pretrain") or {}).get("dataset") or {}):
            if data.get("val_fraction", 0) is None:  # off: added later, so not in the identity (ids unchanged)
                data.pop("val_fraction")
        return d


# --- the cascade's choices (smn_core.cascade; checked by orchestrator.spec.cascade) ---
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")  # the router's Gaussian mixture
MODES = ("conditional", "unconditional")
SCALINGS = ("whiten", "eigenvalue", "none")


# --- names that smn_core's registries hold, for checks that must not import them (torch) ---
BUILTIN_BACKBONES = ("cifar_resnet8", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
                     "clip_vit_b32", "resnet18", "resnet50", "resnet50_dino", "resnet50_swav")
"""The archs :mod:`smn_core.backbones` registers (a unit test checks they equal ``available_backbones()``)."""

BUILTIN_DATASETS = ("cifar10", "cifar100", "digits", "dtd", "eurosat", "flowers102", "food101", "imagefolder",
                    "parquet", "pets", "sun397")
"""The dataset sources :mod:`smn_core.data` registers (a unit test checks they equal ``available_datasets()``)."""
