"""Image transforms: evaluation, supervised training, and SwAV multi-crop (torchvision transforms v2).

* :func:`eval_transform` - deterministic resize (+ centre crop) for embeddings, k-NN and probes.
* :func:`supervised_train_transform` - random-resized-crop + flip, for the supervised baselines.
* :class:`MultiCropConfig` / :class:`MultiCropTransform` - SwAV's multi-crop (Caron et al. 2020,
  "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", Sec. 3.2 and
  App. A): 2 global crops of 224 px, scale (0.14, 1), and 6 local crops of 96 px, scale
  (0.05, 0.14), each with SwAV's colour distortion ``get_color_distortion(s=1.0)`` (jitter 0.8 s,
  0.8 s, 0.8 s, 0.2 s with p 0.8), grayscale p 0.2, Gaussian blur p 0.5 and horizontal flip; the
  paper's settings (Sec. 3.3, ``paper/NOTES.md``). Blur sigma and the local crop side scale with
  the crop, so small inputs (32 px) get views of the same relative strength as SwAV's 224/96 px.
* :class:`SeededViewDataset` / :func:`collate_views` - per-item seeded views so the augmentation
  of an image depends only on (seed, epoch, index), never on the worker or batch that loads it.

Every transform maps a ``PIL.Image.Image`` to plain ``torch.Tensor`` s of dtype ``float32``,
shape ``(3, H, W)``, normalised with ``mean``/``std`` (ImageNet statistics by default).
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from .config import MultiCropConfig, check_positive_int

if TYPE_CHECKING:  # torchvision is imported where the transforms are built (its import takes seconds)
    from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropConfig",
    "MultiCropTransform",
    "PILGaussianBlur",
    "SeededViewDataset",
    "collate_views",
    "eval_transform",
    "supervised_train_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Inputs with image_size at or below this are treated as "small" (CIFAR-like, 32 px): no resize
# + centre-crop at eval, a milder random-resized-crop scale for supervised training.
SMALL_IMAGE_MAX = 64


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    mean, std = list(mean), list(std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (RGB), got mean={mean}, std={std}")
    if any(not np.isfinite(m) for m in mean) or any(not (s > 0 and np.isfinite(s)) for s in std):
        raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean}, std={std}")
    return [float(m) for m in mean], [float(s) for s in std]


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    """PIL -> float32 tensor in [0, 1] -> (x - mean) / std, as a plain ``torch.Tensor``."""
    from torchvision.transforms import v2  # lazy: torchvision's import reaches torch._dynamo (seconds)

    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic evaluation transform: ``PIL.Image -> Tensor (3, image_size, image_size) float32``.

    ``image_size <= 64``: ``Resize((image_size, image_size))`` only (small images such as CIFAR's
    32 px must not lose their borders); larger: ``Resize(round(image_size * 256 / 224))`` of the
    shorter side then ``CenterCrop(image_size)`` (the standard ImageNet protocol, 256 -> 224).
    Then scale to [0, 1] and normalise with ``mean``/``std`` (per RGB channel, in [0, 1] units).

    Raises:
        ValueError: ``image_size`` not a positive int, or ``mean``/``std`` not 3 finite values
            (``std`` > 0).
    """
    from torchvision.transforms import v2

    image_size = check_positive_int(image_size, "image_size")
    mean, std = _check_stats(mean, std)
    if image_size <= SMALL_IMAGE_MAX:
        geometry = [v2.Resize((image_size, image_size), antialias=True)]
    else:
        geometry = [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, *_to_normalised_tensor(mean, std)])


def supervised_train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Random training transform for supervised baselines: ``PIL.Image -> Tensor (3, S, S) float32``.

    ``RandomResizedCrop(image_size, scale=(0.35, 1))`` for small inputs (``image_size <= 64``) or
    ``scale=(0.08, 1)`` (the Inception/ImageNet default) for larger ones, horizontal flip p 0.5,
    then scale to [0, 1] and normalise. Randomness comes from ``torch``'s global generator.

    Raises:
        ValueError: as :func:`eval_transform`.
    """
    from torchvision.transforms import v2

    image_size = check_positive_int(image_size, "image_size")
    mean, std = _check_stats(mean, std)
    scale = (0.35, 1.0) if image_size <= SMALL_IMAGE_MAX else (0.08, 1.0)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            *_to_normalised_tensor(mean, std),
        ]
    )


class MultiCropTransform:
    """SwAV multi-crop: ``PIL.Image -> list[Tensor]`` of ``n_global`` tensors ``(3, gs, gs)`` then
    ``n_local`` tensors ``(3, ls, ls)``, all float32 and normalised (Caron et al. 2020, Sec. 3.2).

    Each view is an independent ``RandomResizedCrop`` (bilinear, antialiased) at its scale range,
    horizontal flip, colour jitter (``RandomApply``), random grayscale, Gaussian blur
    (``RandomApply``), then scale to [0, 1] and normalise - the order of SwAV's reference code.
    Randomness comes from ``torch``'s global generator (see :class:`SeededViewDataset`).

    Args:
        image_size: side (px) of the model's input, used to resolve ``None`` sizes of ``config``.
        config: the settings; ``None`` -> ``MultiCropConfig()`` (the paper's).
        mean, std: normalisation statistics per RGB channel, in [0, 1] units.

    Attributes:
        sizes: ``list[int]``, the side of each view in output order.

    Raises:
        ValueError: bad ``image_size``, ``config`` (not a ``MultiCropConfig``), ``mean`` or ``std``.
    """

    def __init__(
        self,
        image_size: int,
        config: MultiCropConfig | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        config = MultiCropConfig() if config is None else config
        if not isinstance(config, MultiCropConfig):
            raise ValueError(f"config must be a MultiCropConfig, got {type(config).__name__}")
        mean, std = _check_stats(mean, std)
        self.config = config
        self.image_size = check_positive_int(image_size, "image_size")
        global_size, local_size = config.sizes(self.image_size)
        self.sizes = [global_size] * config.n_global + [local_size] * config.n_local
        global_t = self._view_transform(global_size, config.global_scale, mean, std,
                                        config.blur_sigma_for(global_size, local=False))
        local_t = self._view_transform(local_size, config.local_scale, mean, std,
                                       config.blur_sigma_for(local_size, local=True))
        self._transforms = [global_t] * config.n_global + [local_t] * config.n_local

    def _view_transform(self, size: int, scale: tuple[float, float], mean, std,
                        blur_sigma: tuple[float, float]) -> v2.Compose:
        from torchvision.transforms import v2

        c = self.config
        s = float(c.color_jitter_strength)
        ops: list[Callable] = [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(p=c.flip_p),
        ]
        if s > 0:
            jitter = v2.ColorJitter(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=min(0.2 * s, 0.5))
            ops.append(v2.RandomApply([jitter], p=c.color_jitter_p))
        ops.append(v2.RandomGrayscale(p=c.grayscale_p))
        ops.append(v2.RandomApply([PILGaussianBlur(sigma=blur_sigma)], p=c.blur_p))
        return v2.Compose([*ops, *_to_normalised_tensor(mean, std)])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [t(image) for t in self._transforms]

    def __repr__(self) -> str:
        return f"MultiCropTransform(image_size={self.image_size}, sizes={self.sizes}, config={self.config})"


class PILGaussianBlur:
    """Gaussian blur with PIL (``ImageFilter.GaussianBlur``), sigma ~ U(sigma) in pixels, as SwAV's code.

    torchvision's tensor blur runs a convolution per image, which costs tens of milliseconds on a
    small CPU; PIL's separable box approximation is two orders of magnitude cheaper. The sigma is
    drawn from torch's RNG so :class:`SeededViewDataset` makes it reproducible.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur sigma range must satisfy 0 < low <= high, got {sigma}")
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        low, high = self.sigma
        radius = low + (high - low) * float(torch.rand(()))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"PILGaussianBlur(sigma={self.sigma})"


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from (seed, epoch, index) with numpy's SeedSequence (no collisions like a+b)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class SeededViewDataset(torch.utils.data.Dataset):
    """Wraps a dataset with a random transform whose randomness depends only on (seed, epoch, index).

    ``ds[i] -> (transform(image), label, i)``, where ``(image, label) = dataset[i]``. The transform
    of item ``i`` in epoch ``e`` runs inside ``torch.random.fork_rng`` with ``torch.manual_seed``
    and a saved/restored Python ``random`` state, both seeded from ``(seed, e, i)``; so the views of
    an image do not depend on which DataLoader worker, rank or batch loads it (needed for the
    DDP-equivalence tests), and the caller's global RNG states are left untouched.

    ``set_epoch(e)`` changes the epoch. It acts on this object only: a DataLoader with
    ``persistent_workers=True`` keeps worker copies, so build the loader per epoch (or use
    non-persistent workers) after calling it.

    Args:
        dataset: any map-style dataset returning ``(PIL image, int label)``, e.g. an ``ImageDataset``.
        transform: callable on the image, e.g. a :class:`MultiCropTransform` (returns a list of
            tensors) or :func:`eval_transform` (returns one tensor).
        seed: base seed, int >= 0.
        epoch: starting epoch, int >= 0.

    Raises:
        ValueError: ``seed`` or ``epoch`` not an int >= 0, or ``transform`` not callable.
    """

    def __init__(self, dataset, transform: Callable, seed: int = 0, epoch: int = 0):
        if not callable(transform):
            raise ValueError(f"transform must be callable, got {type(transform).__name__}")
        self.dataset = dataset
        self.transform = transform
        self.seed = self._check_nonneg(seed, "seed")
        self.epoch = self._check_nonneg(epoch, "epoch")

    @staticmethod
    def _check_nonneg(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{what} must be an int >= 0, got {value!r}")
        return int(value)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used in the per-item seed (int >= 0; ValueError otherwise)."""
        self.epoch = self._check_nonneg(epoch, "epoch")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        index = int(index)
        image, label = self.dataset[index]
        item_seed = _item_seed(self.seed, self.epoch, index)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                views = self.transform(image)
        finally:
            random.setstate(py_state)
        return views, int(label), index


def collate_views(
    batch: Sequence[tuple[Any, int, int]],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Collate :class:`SeededViewDataset` items into per-view batches.

    Args:
        batch: ``B`` items ``(views, label, index)``; ``views`` is a list of ``V`` tensors
            ``(3, s_v, s_v)`` (multi-crop) or a single tensor ``(3, s, s)`` (treated as ``V = 1``).

    Returns:
        ``(views, labels, indices)``: ``views`` a list of ``V`` float tensors ``(B, 3, s_v, s_v)``, one
        per view position; ``labels`` and ``indices`` ``LongTensor`` s of shape ``(B,)``.

    Raises:
        ValueError: empty batch, items with different numbers of views, or a view position whose
            tensors differ in shape.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    per_item = [list(v) if isinstance(v, (list, tuple)) else [v] for v, _, _ in batch]
    n_views = {len(v) for v in per_item}
    if len(n_views) != 1:
        raise ValueError(f"every item must have the same number of views, got counts {sorted(n_views)}")
    views = []
    for k in range(len(per_item[0])):
        shapes = {tuple(item[k].shape) for item in per_item}
        if len(shapes) != 1:
            raise ValueError(f"view {k} has different shapes across the batch: {sorted(shapes)}")
        views.append(torch.stack([item[k] for item in per_item]))
    labels = torch.tensor([int(label) for _, label, _ in batch], dtype=torch.long)
    indices = torch.tensor([int(i) for _, _, i in batch], dtype=torch.long)
    return views, labels, indices
