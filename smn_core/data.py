"""Dataset registry: one uniform, cheap-to-pickle image dataset type for every data source.

Every loader returns an :class:`ImageDataset`: ``ds[i] -> (PIL.Image.Image in RGB mode, int label)``
with ``ds.targets`` (``numpy.int64``, shape ``(N,)``, labels already remapped to ``0..C-1``),
``ds.class_names`` (``list[str]`` in label order) and ``ds.name``. Images are stored raw (a uint8
array, encoded JPEG/PNG bytes, file paths, or a torchvision dataset holding file paths) and decoded
lazily in ``__getitem__``, so a dataset pickles cheaply and can be shipped to Ray workers.

Sources (see :func:`available_datasets`):

* ``"digits"`` - scikit-learn's 1,797 real 8x8 hand-written digits (no download needed).
* ``"parquet"`` - a folder in the Hugging Face ``datasets`` Parquet layout (``/work/shared/README.md``).
* ``"cifar10"``, ``"cifar100"``, ``"dtd"``, ``"eurosat"``, ``"flowers102"``, ``"food101"``,
  ``"pets"``, ``"sun397"`` - the torchvision datasets used in the paper (``paper/NOTES.md``,
  "Datasets and backbones used in the paper"), with torchvision's own download code.
* ``"imagefolder"`` - any ``root/<class>/<image>`` folder (torchvision ``ImageFolder``).

Sources without an official train/test split (digits, EuroSAT, SUN397, an un-split image folder)
get a deterministic stratified split (scikit-learn ``train_test_split``) computed on the FULL
dataset before any class selection, so the train and test parts of any class subset are disjoint
and stable across calls.
"""

from __future__ import annotations

import io
import json
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from .registry import Registry, check_choice

__all__ = [
    "ImageDataset",
    "available_datasets",
    "load_dataset",
    "register_dataset",
    "select_classes",
    "stratified_subsample",
    "subset",
    "train_val_split",
    "split_validation",
]

SPLITS = ("train", "test")

# --------------------------------------------------------------------------------------------
# Image storage back-ends (private): each holds raw data, decodes one image lazily, and can
# take an index subset (copying only what the subset needs, so a subset pickles small).
# --------------------------------------------------------------------------------------------


class _ArrayStorage:
    """uint8 pixel array, shape (N, H, W) greyscale or (N, H, W, 3) RGB."""

    def __init__(self, array: np.ndarray):
        array = np.asarray(array)
        if array.dtype != np.uint8:
            raise ValueError(f"image array must have dtype uint8, got {array.dtype}")
        if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] != 3):
            raise ValueError(f"image array must have shape (N, H, W) or (N, H, W, 3), got {array.shape}")
        self.array = np.ascontiguousarray(array)

    def __len__(self) -> int:
        return len(self.array)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[i]).convert("RGB")

    def take(self, indices: np.ndarray) -> _ArrayStorage:
        return _ArrayStorage(self.array[indices])


class _ListStorage:
    """One source per image (``items``), opened with PIL by the subclass's ``_open`` on access."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        with self._open(self.items[i]) as img:
            return img.convert("RGB")

    def take(self, indices: np.ndarray) -> _ListStorage:
        return type(self)([self.items[j] for j in indices])


class _EncodedStorage(_ListStorage):
    """Encoded image file bytes (JPEG, PNG, ...), one ``bytes`` object per image."""

    @staticmethod
    def _open(blob: bytes) -> Image.Image:
        return Image.open(io.BytesIO(blob))


class _FileStorage(_ListStorage):
    """Image file paths (str), opened with PIL on access."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        super().__init__([str(p) for p in paths])

    @staticmethod
    def _open(path: str) -> Image.Image:
        return Image.open(path)


class _TorchvisionStorage:
    """One or more torchvision datasets (which hold only file paths) plus an index map.

    ``pairs[k] = (which dataset, index inside it)``; images come from ``datasets[d][j][0]``.
    """

    def __init__(self, datasets: Sequence[Any], pairs: np.ndarray):
        self.datasets = list(datasets)
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> Image.Image:
        d, j = self.pairs[i]
        image = self.datasets[int(d)][int(j)][0]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return image.convert("RGB")

    def take(self, indices: np.ndarray) -> _TorchvisionStorage:
        return _TorchvisionStorage(self.datasets, self.pairs[indices])


_Storage = _ArrayStorage | _EncodedStorage | _FileStorage | _TorchvisionStorage


# --------------------------------------------------------------------------------------------
# The dataset type
# --------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """A labelled image dataset with lazily decoded images; the one type every loader returns.

    ``ds[i] -> (image, label)``: ``image`` is a ``PIL.Image.Image`` in mode ``"RGB"`` (resized
    to ``image_size x image_size`` with bilinear interpolation when ``image_size`` is set and the
    stored image has another size), ``label`` a Python ``int`` in ``0..C-1``.

    Attributes:
        targets: ``numpy.ndarray`` of ``int64``, shape ``(N,)``: the (remapped) label of each item.
        class_names: ``list[str]`` of length ``C``, in label order.
        name: short dataset name, e.g. ``"digits"`` or ``"digits[3,7]"`` after class selection.
        source_indices: ``numpy.ndarray`` of ``int64``, shape ``(N,)``: the index of each item
            in the full, unfiltered collection its loader read (e.g. the row of the parquet table,
            or the index into ``sklearn.datasets.load_digits()``); kept through class selection,
            sub-sampling and :func:`subset`, for provenance and disjointness checks.
        image_size: side length the images are resized to in ``__getitem__``, or ``None``.

    Build one with :meth:`from_arrays`, :meth:`from_encoded` or :meth:`from_files` (or let
    :func:`load_dataset` do it). Pickling copies only the raw storage (uint8 pixels, encoded
    bytes or paths), never decoded images.

    Raises:
        ValueError: if ``targets`` is not 1-D integer of the storage's length, a label is
            outside ``0..len(class_names)-1``, or ``image_size`` is not a positive int.
    """

    def __init__(
        self,
        storage: _Storage,
        targets: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        name: str,
        *,
        image_size: int | None = None,
        source_indices: Sequence[int] | np.ndarray | None = None,
    ):
        targets = np.asarray(targets)
        if targets.ndim != 1 or (targets.size and not np.issubdtype(targets.dtype, np.integer)):
            raise ValueError(f"targets must be a 1-D integer array, got shape {targets.shape} dtype {targets.dtype}")
        if len(targets) != len(storage):
            raise ValueError(f"got {len(targets)} targets for {len(storage)} images; they must match")
        class_names = [str(c) for c in class_names]
        if len(class_names) == 0:
            raise ValueError("class_names must not be empty")
        if targets.size and (targets.min() < 0 or targets.max() >= len(class_names)):
            raise ValueError(
                f"labels must lie in 0..{len(class_names) - 1} (one per class name), "
                f"got range {int(targets.min())}..{int(targets.max())}"
            )
        if source_indices is None:
            source_indices = np.arange(len(targets))
        source_indices = np.asarray(source_indices, dtype=np.int64)
        if source_indices.shape != targets.shape:
            raise ValueError(f"source_indices shape {source_indices.shape} must match targets shape {targets.shape}")
        self._storage = storage
        self.targets = targets.astype(np.int64)
        self.class_names = class_names
        self.name = str(name)
        self.image_size = _check_image_size(image_size)
        self.source_indices = source_indices

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, images: np.ndarray, targets, class_names, name: str, **kwargs) -> ImageDataset:
        """Dataset over a uint8 pixel array ``images`` of shape ``(N, H, W)`` or ``(N, H, W, 3)``.

        Raises:
            ValueError: wrong dtype/shape (see :class:`ImageDataset` for the other checks).
        """
        return cls(_ArrayStorage(images), targets, class_names, name, **kwargs)

    @classmethod
    def from_encoded(cls, blobs: Sequence[bytes], targets, class_names, name: str, **kwargs) -> ImageDataset:
        """Dataset over encoded image files (``bytes`` of JPEG/PNG/...), decoded with PIL on access."""
        return cls(_EncodedStorage(blobs), targets, class_names, name, **kwargs)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], targets, class_names, name: str, **kwargs) -> ImageDataset:
        """Dataset over image file paths, opened with PIL on access."""
        return cls(_FileStorage(paths), targets, class_names, name, **kwargs)

    # -- Dataset protocol -------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes ``C`` (``len(class_names)``)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not isinstance(index, numbers.Integral) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of length {n}")
        index = int(index) % n
        image = self._storage.load(index)
        s = self.image_size
        if s is not None and image.size != (s, s):
            image = image.resize((s, s), Image.Resampling.BILINEAR)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, classes={self.num_classes}, "
            f"storage={type(self._storage).__name__.strip('_')}, image_size={self.image_size})"
        )


def _check_image_size(image_size: int | None) -> int | None:
    if image_size is None:
        return None
    if not isinstance(image_size, numbers.Integral) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    return int(image_size)


def _as_index_array(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D sequence of ints, got shape {idx.shape} dtype {idx.dtype}")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must lie in 0..{n - 1}, got range {int(idx.min())}..{int(idx.max())}")
    return idx.astype(np.int64)


def subset(ds: ImageDataset, indices) -> ImageDataset:
    """The items ``indices`` of ``ds`` as a new :class:`ImageDataset` (for the cascade's clusters).

    Args:
        ds: the dataset.
        indices: 1-D ints (list, ``numpy`` array or ``torch`` tensor) in ``0..len(ds)-1``; order and
            repeats are kept.

    Returns:
        An ``ImageDataset`` with the same ``class_names``, ``name`` and ``image_size``, whose
        ``targets``/``source_indices`` are those of ``ds`` at ``indices``. Only the selected raw
        images are copied, so the subset pickles small.

    Raises:
        ValueError: ``indices`` not 1-D integers or out of range.
    """
    idx = _as_index_array(indices, len(ds))
    return ImageDataset(
        ds._storage.take(idx),
        ds.targets[idx],
        ds.class_names,
        ds.name,
        image_size=ds.image_size,
        source_indices=ds.source_indices[idx],
    )


def select_classes(ds: ImageDataset, classes: Sequence[int | str]) -> ImageDataset:
    """Keep only the items of ``classes`` and remap their labels to ``0..len(classes)-1``.

    Args:
        ds: the dataset.
        classes: class ids (``int``, current label) or class names (``str``, from
            ``ds.class_names``), may be mixed; the new label of ``classes[k]`` is ``k`` and the new
            ``class_names`` follow this order.

    Returns:
        A new ``ImageDataset``; its ``name`` is ``f"{ds.name}[c1,c2,...]"`` (``"[K classes]"``
        when more than 8 are kept).

    Raises:
        ValueError: empty ``classes``, an unknown id or name (the message lists the allowed ones),
            or a class given twice.
    """
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence | np.ndarray):
        raise ValueError(f"classes must be a list of class ids or names, got {classes!r}")
    if len(classes) == 0:
        raise ValueError("classes must not be empty")
    ids: list[int] = []
    for c in classes:
        if isinstance(c, str):
            if c not in ds.class_names:
                raise ValueError(
                    f"unknown class name {c!r} for dataset {ds.name!r}; allowed names: {ds.class_names}"
                )
            ids.append(ds.class_names.index(c))
        elif isinstance(c, numbers.Integral) and not isinstance(c, bool):
            if not 0 <= c < ds.num_classes:
                raise ValueError(
                    f"unknown class id {c!r} for dataset {ds.name!r}; allowed ids: 0..{ds.num_classes - 1} "
                    f"(names: {ds.class_names})"
                )
            ids.append(int(c))
        else:
            raise ValueError(f"a class must be an int id or a str name, got {c!r} ({type(c).__name__})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"classes must not repeat a class, got {list(classes)}")
    remap = np.full(ds.num_classes, -1, dtype=np.int64)
    remap[ids] = np.arange(len(ids))
    keep = np.flatnonzero(remap[ds.targets] >= 0)
    sub = subset(ds, keep)
    return ImageDataset(
        sub._storage,
        remap[sub.targets],
        [ds.class_names[i] for i in ids],
        f"{ds.name}[{','.join(str(c) for c in classes)}]" if len(ids) <= 8 else f"{ds.name}[{len(ids)} classes]",
        image_size=ds.image_size,
        source_indices=sub.source_indices,
    )


def stratified_subsample(ds: ImageDataset, max_samples: int, seed: int = 0) -> ImageDataset:
    """A deterministic, class-stratified subsample of at most ``max_samples`` items that keeps every class.

    Each class ``c`` of ``n_c`` items gets ``max(1, k_c)`` items, ``k_c`` being its share of
    ``max_samples`` by the largest-remainder method; the items of a class are drawn without
    replacement with ``numpy.random.default_rng(seed)``, and the result keeps the original item
    order. (scikit-learn's stratified splitting is not used here because it may give a rare
    class zero items, and this function guarantees every class stays.)

    Args:
        ds: the dataset.
        max_samples: the size of the result; if ``>= len(ds)`` the dataset is returned unchanged.
        seed: the random seed.

    Raises:
        ValueError: ``max_samples`` not a positive int, or smaller than the number of classes
            present in ``ds`` (then not every class can be kept).
    """
    if not isinstance(max_samples, numbers.Integral) or isinstance(max_samples, bool) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    n = len(ds)
    if max_samples >= n:
        return ds
    present, counts = np.unique(ds.targets, return_counts=True)
    if max_samples < len(present):
        raise ValueError(
            f"max_samples={max_samples} is smaller than the {len(present)} classes present in {ds.name!r}; "
            f"pass at least {len(present)} so every class keeps one image"
        )
    quota = np.ones(len(present), dtype=np.int64)
    remaining = max_samples - len(present)
    share = (counts - 1) * remaining / (n - len(present))
    extra = np.floor(share).astype(np.int64)
    leftover = remaining - int(extra.sum())
    if leftover > 0:
        order = np.lexsort((np.arange(len(present)), -(share - extra)))
        extra[order[:leftover]] += 1
    quota += np.minimum(extra, counts - 1)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(ds.targets == c), size=int(k), replace=False) for c, k in zip(present, quota)
    ]
    return subset(ds, np.sort(np.concatenate(chosen)))


def _split_indices(targets: np.ndarray, split: str, test_fraction: float, seed: int, what: str) -> np.ndarray:
    """Indices (sorted) of ``split`` in a deterministic stratified train/test split of ``targets``."""
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn's import takes seconds

    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)), test_size=test_fraction, random_state=seed, stratify=targets
        )
    except ValueError as err:  # e.g. a class with a single image, or test set smaller than #classes
        raise ValueError(
            f"cannot make a stratified train/test split of {what} ({len(targets)} images, "
            f"{len(np.unique(targets))} classes) with test_fraction={test_fraction}: {err}"
        ) from err
    return np.sort(train_idx if split == "train" else test_idx)


def train_val_split(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded validation split carved out of a TRAIN split (``dataset.val_fraction``).

    Recipe and hyperparameter choices are scored on the validation part; the test split is never touched
    (it is a different set of images, split off before this one, see :func:`load_dataset`).

    Args:
        labels: the train split's labels, shape ``(N,)`` (any integer or string labels).
        val_fraction: share of each class that goes to validation, in (0, 1) (scikit-learn's
            ``train_test_split`` with ``stratify``: the per-class shares are kept up to rounding).
        seed: the split's seed (the cell's ``dataset.split_seed``): the same labels, fraction and seed give the
            same split on every call and machine.

    Returns:
        ``(train_idx, val_idx)``: sorted ``int64`` index arrays into ``labels``, disjoint, together
        ``arange(N)``; every class of ``labels`` is in both when it has at least two images and the
        fraction allows it.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), or a split that cannot be stratified (a class with one
            image, fewer validation images than classes), one line naming the values.
    """
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn's import takes seconds

    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"dataset.val_fraction must be in (0, 1) or null, got {val_fraction!r}")
    labels = np.asarray(labels)
    try:
        train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=float(val_fraction),
                                              random_state=int(seed), stratify=labels)
    except ValueError as err:  # a class with a single image, or fewer validation images than classes
        raise ValueError(f"cannot carve a stratified validation split (dataset.val_fraction={val_fraction}) out "
                         f"of {len(labels)} train images of {len(np.unique(labels))} classes: {err}") from None
    return np.sort(train_idx).astype(np.int64), np.sort(val_idx).astype(np.int64)


def split_validation(ds: ImageDataset, val_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """``(remaining train, validation)`` subsets of a train split ``ds`` (:func:`train_val_split` on
    ``ds.targets``)."""
    train_idx, val_idx = train_val_split(ds.targets, val_fraction, seed)
    return subset(ds, train_idx), subset(ds, val_idx)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# A loader: (split, *, root, image_size, test_fraction, split_seed, download) -> ImageDataset,
# returning the FULL split with the source's own labels (class selection and sub-sampling are
# applied afterwards by load_dataset).
LoaderFn = Callable[..., ImageDataset]
_DATASETS: Registry[LoaderFn] = Registry("dataset")


def register_dataset(name: str) -> Callable[[LoaderFn], LoaderFn]:
    """Decorator registering a dataset loader under ``name`` (for :func:`load_dataset`).

    The decorated function is called as ``fn(split, *, root, image_size, test_fraction,
    split_seed, download)`` with already-validated arguments and must return the FULL split
    (all classes) as an :class:`ImageDataset`; :func:`load_dataset` then applies ``classes`` and
    ``max_samples``. Sources without an official split must split the full dataset
    deterministically from ``test_fraction`` and ``split_seed``.

    Raises:
        ValueError: ``name`` is not a non-empty str or is already registered.
    """
    return _DATASETS.register(name)


def available_datasets() -> list[str]:
    """Sorted names of the registered dataset sources."""
    return sorted(_DATASETS)


def load_dataset(
    source: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    classes: Sequence[int] | Sequence[str] | None = None,
    image_size: int | None = None,
    test_fraction: float = 0.3,
    split_seed: int = 0,
    download: bool = False,
    max_samples: int | None = None,
) -> ImageDataset:
    """Load one split of a registered dataset source as an :class:`ImageDataset`.

    Args:
        source: a name from :func:`available_datasets`.
        split: ``"train"`` or ``"test"`` (mapped to each source's own split names).
        root: data folder; required by every source except ``"digits"``.
        classes: optional class subset, by original label id or class name; labels are remapped to
            ``0..len(classes)-1`` in the given order and ``class_names`` follows.
        image_size: side length (pixels) of the square images ``ds[i]`` returns; ``None`` keeps the
            stored size (``"digits"``: ``None`` means 32).
        test_fraction: test share, in (0, 1), for sources without an official split (digits,
            eurosat, sun397, an un-split imagefolder); ignored otherwise.
        split_seed: seed (int >= 0) of that split and of the ``max_samples`` subsample.
        download: let torchvision download the data into ``root`` if it is missing.
        max_samples: optional size of a deterministic stratified subsample (every class kept),
            taken after class selection; for quick runs.

    Returns:
        The dataset; the split is computed on the full dataset before class selection, so the
        train and test parts of a class subset are disjoint and stable across calls.

    Raises:
        ValueError: unknown ``source`` or ``split``, an unknown class, a bad ``image_size``,
            ``test_fraction``, ``split_seed`` or ``max_samples``, or ``root`` missing where needed.
        FileNotFoundError: the data is not under ``root`` (and ``download`` is False).
    """
    check_choice(source, available_datasets(), "dataset source")
    check_choice(split, SPLITS, "split")
    image_size = _check_image_size(image_size)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral) or split_seed < 0:
        raise ValueError(f"split_seed must be an int >= 0, got {split_seed!r}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    ds = _DATASETS[source](
        split,
        root=root,
        image_size=image_size,
        test_fraction=float(test_fraction),
        split_seed=int(split_seed),
        download=bool(download),
    )
    if classes is not None:
        ds = select_classes(ds, classes)
    if max_samples is not None:
        ds = stratified_subsample(ds, int(max_samples), seed=int(split_seed))
    return ds


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@register_dataset("digits")
def _load_digits(split, *, root, image_size, test_fraction, split_seed, download) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16) -> uint8 0..255, bilinear resize, RGB."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    size = 32 if image_size is None else image_size
    idx = _split_indices(bunch.target, split, test_fraction, split_seed, "digits")
    grey = np.rint(bunch.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (n, 8, 8)
    if size != grey.shape[1]:
        grey = np.stack(
            [np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR)) for g in grey]
        )
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return ImageDataset.from_arrays(
        rgb, bunch.target[idx], [str(c) for c in bunch.target_names], "digits", source_indices=idx
    )


def _require_root(root, source: str) -> Path:
    if root is None:
        raise ValueError(f"dataset source {source!r} needs root=<data folder>, got root=None")
    return Path(root).expanduser()


def _parquet_files(root: Path, split: str) -> list[Path]:
    """``root/{split}.parquet`` plus shards ``root/{split}-*.parquet``; else the same under ``root/data``."""
    for folder in (root, root / "data"):
        files = sorted({*folder.glob(f"{split}.parquet"), *folder.glob(f"{split}-*.parquet")})
        if files:
            return files
    return []


def _parquet_class_names(metadata: dict[bytes, bytes] | None) -> list[str] | None:
    """Class names from schema metadata: key ``classes`` (comma-separated), else HF ClassLabel names."""
    metadata = metadata or {}
    if b"classes" in metadata:
        return [c.strip() for c in metadata[b"classes"].decode("utf-8").split(",")]
    if b"huggingface" in metadata:  # HF datasets writes {"info": {"features": {"label": ClassLabel}}}
        try:
            features = json.loads(metadata[b"huggingface"])["info"]["features"]
            names = features["label"]["names"]
            if isinstance(names, list) and names:
                return [str(n) for n in names]
        except (KeyError, TypeError, ValueError):
            pass
    return None


@register_dataset("parquet")
def _load_parquet(split, *, root, image_size, test_fraction, split_seed, download) -> ImageDataset:
    """Hugging Face ``datasets`` Parquet layout: ``root/{split}.parquet`` or ``root/{split}-*.parquet``.

    Columns: ``image`` struct{bytes: binary, path: string}, ``label`` int64; schema metadata
    ``classes`` = comma-separated names in label order (fallback: HF ClassLabel metadata, then
    ``"0".."C-1"``). Read with pyarrow; image bytes are decoded with PIL on access.
    """
    root = _require_root(root, "parquet")
    files = _parquet_files(root, split)
    if not files:
        raise FileNotFoundError(
            f"no parquet files for split {split!r} under {str(root)!r} "
            f"(looked for {split}.parquet and {split}-*.parquet, also under data/)"
        )
    tables, names = [], None
    for f in files:
        if not {"image", "label"} <= set(pq.read_schema(f).names):
            raise ValueError(f"{str(f)!r} must have columns 'image' (struct{{bytes, path}}) and 'label' (int64)")
        table = pq.read_table(f, columns=["image", "label"])
        file_names = _parquet_class_names(table.schema.metadata)
        if names is not None and file_names is not None and file_names != names:
            raise ValueError(f"class names in {str(f)!r} ({file_names}) differ from the other shards ({names})")
        names = names or file_names
        tables.append(table.replace_schema_metadata(None))
    table = pa.concat_tables(tables)
    image_col = table.column("image").combine_chunks()
    if not pa.types.is_struct(image_col.type) or image_col.type.get_field_index("bytes") < 0:
        raise ValueError(f"column 'image' must be a struct with a 'bytes' field, got type {image_col.type}")
    blobs = image_col.field("bytes").to_pylist()
    missing = [i for i, b in enumerate(blobs) if b is None]
    if missing:
        raise ValueError(
            f"{len(missing)} rows of {[str(f) for f in files]} have no image bytes (first row {missing[0]}); "
            "only embedded image bytes are supported"
        )
    labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    if names is None:
        names = [str(c) for c in range(int(labels.max()) + 1 if labels.size else 1)]
    return ImageDataset.from_encoded(blobs, labels, names, f"parquet:{root.name}", image_size=image_size)


@register_dataset("imagefolder")
def _load_imagefolder(split, *, root, image_size, test_fraction, split_seed, download) -> ImageDataset:
    """torchvision ``ImageFolder``: ``root/train`` + ``root/test`` if both exist, else a stratified split of ``root``."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import find_classes

    root = _require_root(root, "imagefolder")
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder root {str(root)!r} is not a directory")
    pre_split = (root / "train").is_dir() and (root / "test").is_dir()
    try:
        folder = ImageFolder(str(root / split) if pre_split else str(root))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no images found under {str(root)!r}: {err}") from err
    if pre_split:
        train_classes = find_classes(str(root / "train"))[0]
        if folder.classes != train_classes:
            raise ValueError(
                f"class folders of {str(root / split)!r} ({folder.classes}) differ from "
                f"{str(root / 'train')!r} ({train_classes})"
            )
    paths = np.array([p for p, _ in folder.samples], dtype=object)
    targets = np.asarray(folder.targets, dtype=np.int64)
    idx = np.arange(len(targets))
    if not pre_split:
        idx = _split_indices(targets, split, test_fraction, split_seed, f"imagefolder {str(root)!r}")
    return ImageDataset.from_files(
        list(paths[idx]), targets[idx], folder.classes, f"imagefolder:{root.name}",
        image_size=image_size, source_indices=idx,
    )


# -- torchvision datasets ------------------------------------------------------------------


def _tv_construct(factory: Callable[[], Any], source: str, root: Path, download: bool):
    try:
        return factory()
    except RuntimeError as err:
        if "download=True" in str(err) or "not found" in str(err).lower():
            hint = "" if download else " Pass download=True to download it."
            raise FileNotFoundError(f"dataset {source!r} not found (or corrupted) under root {str(root)!r}.{hint}") from err
        raise


def _tv_labels(tv_ds) -> np.ndarray:
    for attr in ("targets", "_labels"):
        if hasattr(tv_ds, attr):
            return np.asarray(getattr(tv_ds, attr), dtype=np.int64)
    return np.asarray([tv_ds[i][1] for i in range(len(tv_ds))], dtype=np.int64)


def _from_torchvision(
    parts: Sequence[Any], source: str, image_size: int | None, select: np.ndarray | None = None
) -> ImageDataset:
    """Wrap one or more torchvision datasets (concatenated) as an ImageDataset, optionally only ``select``."""
    labels = np.concatenate([_tv_labels(p) for p in parts])
    pairs = np.concatenate(
        [np.stack([np.full(len(p), d), np.arange(len(p))], axis=1) for d, p in enumerate(parts)]
    ).astype(np.int64)
    idx = np.arange(len(labels)) if select is None else select
    class_names = [str(c) for c in parts[0].classes]
    for part in parts[1:]:
        if [str(c) for c in part.classes] != class_names:
            raise ValueError(f"the splits of {source!r} list different classes; cannot concatenate them")
    first = parts[0]
    if len(parts) == 1 and isinstance(getattr(first, "data", None), np.ndarray):  # CIFAR: pixels in memory
        storage: _Storage = _ArrayStorage(first.data[idx])
    else:
        storage = _TorchvisionStorage(parts, pairs[idx])
    return ImageDataset(storage, labels[idx], class_names, source, image_size=image_size, source_indices=idx)


def _register_torchvision(source: str, build: Callable[[str, Path, bool], list[Any]], official_split: bool):
    @register_dataset(source)
    def _loader(split, *, root, image_size, test_fraction, split_seed, download) -> ImageDataset:
        root_path = _require_root(root, source)
        parts = _tv_construct(lambda: build(split, root_path, download), source, root_path, download)
        if official_split:
            return _from_torchvision(parts, source, image_size)
        labels = np.concatenate([_tv_labels(p) for p in parts])
        idx = _split_indices(labels, split, test_fraction, split_seed, source)
        return _from_torchvision(parts, source, image_size, select=idx)

    _loader.__doc__ = f"torchvision {source!r} loader (split mapping in smn_core.data)."
    return _loader


def _tv(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, name)


# Split mappings. "train" = the official training data; where a separate validation split exists
# (DTD, Flowers102) "train" = train + val, the usual linear-probe protocol.
_register_torchvision("cifar10", lambda s, r, d: [_tv("CIFAR10")(r, train=s == "train", download=d)], True)
_register_torchvision("cifar100", lambda s, r, d: [_tv("CIFAR100")(r, train=s == "train", download=d)], True)
_register_torchvision(
    "dtd",
    lambda s, r, d: [_tv("DTD")(r, split=p, download=d) for p in (("train", "val") if s == "train" else ("test",))],
    True,
)
_register_torchvision(
    "flowers102",
    lambda s, r, d: [
        _tv("Flowers102")(r, split=p, download=d) for p in (("train", "val") if s == "train" else ("test",))
    ],
    True,
)
_register_torchvision("food101", lambda s, r, d: [_tv("Food101")(r, split=s, download=d)], True)
_register_torchvision(
    "pets",
    lambda s, r, d: [_tv("OxfordIIITPet")(r, split="trainval" if s == "train" else "test", download=d)],
    True,
)
_register_torchvision("eurosat", lambda s, r, d: [_tv("EuroSAT")(r, download=d)], False)
_register_torchvision("sun397", lambda s, r, d: [_tv("SUN397")(r, download=d)], False)
