"""Tests for smn_core.data: the dataset registry and the ImageDataset type."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from smn_core.data import (
    ImageDataset,
    available_datasets,
    load_dataset,
    register_dataset,
    select_classes,
    stratified_subsample,
    subset,
)

pytestmark = pytest.mark.unit

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_PARQUET = SHARED / "data" / "cifar10"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------------- digits


def test_registry_lists_all_sources():
    expected = {"digits", "parquet", "imagefolder", "cifar10", "cifar100", "dtd", "eurosat",
                "flowers102", "food101", "pets", "sun397"}
    assert expected <= set(available_datasets())


def test_digits_split_is_disjoint_complete_stratified_and_deterministic():
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.3 * 1797, abs=1)
    assert set(train.source_indices).isdisjoint(test.source_indices)
    assert sorted([*train.source_indices, *test.source_indices]) == list(range(1797))
    # stratified: every class's test share is close to 0.3
    full = load_digits().target
    for c in range(10):
        share = np.sum(test.targets == c) / np.sum(full == c)
        assert 0.25 < share < 0.35
    again = load_dataset("digits", "test")
    np.testing.assert_array_equal(again.source_indices, test.source_indices)
    other_seed = load_dataset("digits", "test", split_seed=1)
    assert not np.array_equal(other_seed.source_indices, test.source_indices)


def test_digits_images_and_labels_match_sklearn():
    bunch = load_digits()
    ds = load_dataset("digits", "train", image_size=8)  # no resize: exact pixel check
    img, label = ds[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 8)
    src = ds.source_indices[5]
    assert label == bunch.target[src]
    expected = np.rint(bunch.images[src] * 255 / 16).astype(np.uint8)
    arr = np.asarray(img)
    for ch in range(3):
        np.testing.assert_array_equal(arr[..., ch], expected)
    np.testing.assert_array_equal(ds.targets, bunch.target[ds.source_indices])
    assert ds.targets.dtype == np.int64
    assert ds.class_names == [str(i) for i in range(10)]
    # default size 32, and explicit sizes
    assert load_dataset("digits", "test")[0][0].size == (32, 32)
    assert load_dataset("digits", "test", image_size=20)[0][0].size == (20, 20)


def test_digits_class_subset_remaps_in_given_order():
    bunch = load_digits()
    ds = load_dataset("digits", "train", classes=[7, 3])
    assert ds.class_names == ["7", "3"]
    assert set(np.unique(ds.targets)) == {0, 1}
    original = bunch.target[ds.source_indices]
    np.testing.assert_array_equal(original, np.where(ds.targets == 0, 7, 3))
    by_name = load_dataset("digits", "train", classes=["7", "3"])
    np.testing.assert_array_equal(by_name.targets, ds.targets)
    np.testing.assert_array_equal(by_name.source_indices, ds.source_indices)
    # the subset is exactly the full split's items of those classes: train/test of the subset stay disjoint
    full_train = load_dataset("digits", "train")
    keep = np.isin(full_train.targets, [3, 7])
    np.testing.assert_array_equal(ds.source_indices, full_train.source_indices[keep])
    test = load_dataset("digits", "test", classes=[7, 3])
    assert set(ds.source_indices).isdisjoint(test.source_indices)
    assert ds[0][1] in (0, 1)


def test_max_samples_is_stratified_deterministic_and_keeps_every_class():
    ds = load_dataset("digits", "train", max_samples=50)
    assert len(ds) == 50
    counts = np.bincount(ds.targets, minlength=10)
    assert counts.min() >= 4 and counts.max() <= 6  # ~5 per class from a balanced set
    again = load_dataset("digits", "train", max_samples=50)
    np.testing.assert_array_equal(ds.source_indices, again.source_indices)
    assert np.all(np.diff(ds.source_indices) > 0)  # original order kept
    other = load_dataset("digits", "train", max_samples=50, split_seed=3)
    assert not np.array_equal(ds.source_indices, other.source_indices)
    assert len(load_dataset("digits", "train", max_samples=10)) == 10
    assert len(load_dataset("digits", "train", max_samples=10**6)) == len(load_dataset("digits", "train"))
    with pytest.raises(ValueError, match="max_samples=9"):
        load_dataset("digits", "train", max_samples=9)


def test_stratified_subsample_keeps_rare_class():
    targets = np.array([0] * 95 + [1] * 4 + [2] * 1)
    ds = ImageDataset.from_arrays(np.zeros((100, 2, 2), np.uint8), targets, ["a", "b", "c"], "toy")
    sub = stratified_subsample(ds, 10, seed=0)
    assert len(sub) == 10
    assert set(sub.targets) == {0, 1, 2}


def test_bad_arguments_raise_clear_value_errors():
    with pytest.raises(ValueError, match="'val'.*allowed"):
        load_dataset("digits", "val")
    with pytest.raises(ValueError, match="unknown class id 10"):
        load_dataset("digits", "train", classes=[1, 10])
    with pytest.raises(ValueError, match="'eleven'.*allowed names"):
        load_dataset("digits", "train", classes=["eleven"])
    with pytest.raises(ValueError, match="repeat"):
        load_dataset("digits", "train", classes=[1, "1"])
    with pytest.raises(ValueError, match="empty"):
        load_dataset("digits", "train", classes=[])
    with pytest.raises(ValueError, match="'mnist'.*allowed"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", "train", test_fraction=1.5)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", "train", image_size=0)
    with pytest.raises(ValueError, match="split_seed"):
        load_dataset("digits", "train", split_seed=-1)
    with pytest.raises(ValueError, match="max_samples"):
        load_dataset("digits", "train", max_samples=0)


def test_subset_pickle_and_indexing():
    ds = load_dataset("digits", "test")
    sub = subset(ds, [4, 2, 2])
    assert sub.class_names == ds.class_names and sub.name == ds.name
    np.testing.assert_array_equal(sub.targets, ds.targets[[4, 2, 2]])
    assert np.asarray(sub[0][0]).tolist() == np.asarray(ds[4][0]).tolist()
    assert np.asarray(sub[-1][0]).tolist() == np.asarray(ds[2][0]).tolist()
    sub_t = subset(ds, torch.tensor([1, 3]))
    np.testing.assert_array_equal(sub_t.source_indices, ds.source_indices[[1, 3]])
    with pytest.raises(ValueError, match="indices must lie in"):
        subset(ds, [len(ds)])
    with pytest.raises(IndexError):
        ds[len(ds)]
    # pickling stores raw arrays: round trip gives the same images; a small subset pickles small
    back = pickle.loads(pickle.dumps(ds))
    assert np.asarray(back[7][0]).tolist() == np.asarray(ds[7][0]).tolist()
    assert back[7][1] == ds[7][1]
    assert len(pickle.dumps(subset(ds, [0, 1]))) < len(pickle.dumps(ds)) / 50


def test_register_dataset_rejects_duplicates_and_custom_loader_works():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")

    name = "_toy_test_source"
    if name not in available_datasets():
        @register_dataset(name)
        def _toy(split, *, root, image_size, test_fraction, split_seed, download):
            n = 6 if split == "train" else 3
            return ImageDataset.from_arrays(
                np.full((n, 4, 4, 3), 9, np.uint8), np.arange(n) % 3, ["x", "y", "z"], name, image_size=image_size
            )

    ds = load_dataset(name, "train", classes=["z", "x"], image_size=8)
    assert ds.class_names == ["z", "x"]
    np.testing.assert_array_equal(ds.targets, [1, 0, 1, 0])
    assert ds[0][0].size == (8, 8)


def test_select_classes_on_dataset():
    ds = load_dataset("digits", "test")
    sel = select_classes(ds, [np.int64(9)])
    assert sel.class_names == ["9"] and set(sel.targets) == {0}
    assert len(sel) == int(np.sum(ds.targets == 9))


# --------------------------------------------------------------------------------------- parquet


def _jpeg(color: tuple[int, int, int], size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _write_parquet(path: Path, labels: list[int], classes: str | None):
    images = pa.array(
        [{"bytes": _jpeg(COLORS[lab]), "path": f"{i}.jpg"} for i, lab in enumerate(labels)],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"image": images, "label": pa.array(labels, pa.int64())})
    if classes is not None:
        table = table.replace_schema_metadata({"classes": classes})
    pq.write_table(table, path)


def test_parquet_loader_hf_layout_with_shards(tmp_path):
    _write_parquet(tmp_path / "train-00000-of-00002.parquet", [0, 1, 2, 0, 1, 2], "red,green,blue")
    _write_parquet(tmp_path / "train-00001-of-00002.parquet", [0, 1, 2, 2], "red,green,blue")
    _write_parquet(tmp_path / "test.parquet", [2, 1, 0], "red,green,blue")
    train = load_dataset("parquet", "train", root=str(tmp_path))
    test = load_dataset("parquet", "test", root=tmp_path)
    assert len(train) == 10 and len(test) == 3
    assert train.class_names == ["red", "green", "blue"]
    np.testing.assert_array_equal(train.targets, [0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    for i in range(len(test)):
        img, label = test[i]
        assert img.mode == "RGB" and img.size == (12, 10)
        mean = np.asarray(img, dtype=float).reshape(-1, 3).mean(0)
        assert int(np.argmax(mean)) == label  # the decoded colour matches its class
        assert np.abs(mean - COLORS[label]).max() < 10
    resized = load_dataset("parquet", "test", root=tmp_path, image_size=16)
    assert resized[0][0].size == (16, 16)
    sub = load_dataset("parquet", "train", root=tmp_path, classes=["blue", "red"])
    assert sub.class_names == ["blue", "red"] and len(sub) == 7
    img, label = sub[0]
    assert label == 1 and int(np.argmax(np.asarray(img, dtype=float).reshape(-1, 3).mean(0))) == 0
    back = pickle.loads(pickle.dumps(sub))
    assert np.asarray(back[3][0]).tolist() == np.asarray(sub[3][0]).tolist()


def test_parquet_without_class_metadata_and_missing_files(tmp_path):
    _write_parquet(tmp_path / "test.parquet", [0, 2, 1], None)
    ds = load_dataset("parquet", "test", root=tmp_path)
    assert ds.class_names == ["0", "1", "2"]
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("parquet", "train", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_dataset("parquet", "test")


@pytest.mark.skipif(not (CIFAR_PARQUET / "test.parquet").exists(),
                    reason=f"shared CIFAR-10 parquet not found at {CIFAR_PARQUET} (../shared is absent)")
def test_real_cifar10_parquet():
    ds = load_dataset("parquet", "test", root=CIFAR_PARQUET)
    assert len(ds) == 10000
    assert ds.class_names == CIFAR_NAMES
    np.testing.assert_array_equal(np.bincount(ds.targets), [1000] * 10)
    img, label = ds[123]
    assert img.mode == "RGB" and img.size == (32, 32) and 0 <= label < 10
    assert np.asarray(img).std() > 5  # a real photo, not a blank
    cats = load_dataset("parquet", "test", root=CIFAR_PARQUET, classes=["cat", "dog"], max_samples=20)
    assert len(cats) == 20 and cats.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(np.bincount(cats.targets), [10, 10])


# ----------------------------------------------------------------------------------- imagefolder


def _make_folder(root: Path, per_class: int, classes=("cat", "dog")):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (9, 7), COLORS[c]).save(root / name / f"{i}.png")


def test_imagefolder_stratified_split(tmp_path):
    _make_folder(tmp_path, per_class=5)
    train = load_dataset("imagefolder", "train", root=tmp_path, test_fraction=0.4)
    test = load_dataset("imagefolder", "test", root=tmp_path, test_fraction=0.4)
    assert train.class_names == ["cat", "dog"]
    assert len(train) == 6 and len(test) == 4
    np.testing.assert_array_equal(np.bincount(test.targets), [2, 2])
    assert set(train.source_indices).isdisjoint(test.source_indices)
    img, label = test[0]
    assert img.mode == "RGB" and img.size == (9, 7)
    assert int(np.argmax(np.asarray(img).reshape(-1, 3).mean(0))) == label


def test_imagefolder_with_train_test_subfolders(tmp_path):
    _make_folder(tmp_path / "train", per_class=3)
    _make_folder(tmp_path / "test", per_class=2)
    train = load_dataset("imagefolder", "train", root=tmp_path)
    test = load_dataset("imagefolder", "test", root=tmp_path, image_size=5)
    assert len(train) == 6 and len(test) == 4
    assert test[3][0].size == (5, 5) and test[3][1] == 1
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("imagefolder", "train", root=tmp_path / "missing")


# ----------------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("source", ["cifar10", "cifar100", "dtd", "eurosat", "flowers102", "food101", "pets", "sun397"])
def test_torchvision_missing_root_raises_clear_error(tmp_path, source):
    root = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        load_dataset(source, "train", root=root)
    assert str(root) in str(info.value)
    with pytest.raises(ValueError, match="root"):
        load_dataset(source, "test")


def _write_fake_cifar10(root: Path, n_per_batch: int = 2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_iter = iter(range(1000))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [next(label_iter) % 10 for _ in range(n_per_batch)]
        data = rng.integers(0, 256, size=(n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES}, f)


def test_cifar10_torchvision_wrapper_on_fake_folder(tmp_path, monkeypatch):
    # torchvision checks the md5 sums of the real CIFAR files; a tiny fake folder can't match them.
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    _write_fake_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path, classes=["automobile", "cat"])
    assert len(train) == 10 and train.class_names == CIFAR_NAMES
    np.testing.assert_array_equal(train.targets, np.arange(10))
    tv = tv_cifar.CIFAR10(str(tmp_path), train=True)
    img, label = train[4]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 4
    assert np.array_equal(np.asarray(img), tv.data[4])
    # test batch labels are 10, 11 -> classes 0, 1; selecting automobile(1) keeps one item remapped to 0
    assert test.class_names == ["automobile", "cat"] and test.targets.tolist() == [0]
    assert pickle.loads(pickle.dumps(train))[4][1] == 4


def test_eurosat_torchvision_wrapper_stratified_split(tmp_path):
    # EuroSAT is an ImageFolder under root/eurosat/2750 without checksums, so a tiny copy loads for real.
    _make_folder(tmp_path / "eurosat" / "2750", per_class=5, classes=("Forest", "River"))
    train = load_dataset("eurosat", "train", root=tmp_path, test_fraction=0.4)
    test = load_dataset("eurosat", "test", root=tmp_path, test_fraction=0.4)
    assert train.class_names == ["Forest", "River"]
    assert len(train) == 6 and len(test) == 4
    assert set(train.source_indices).isdisjoint(test.source_indices)
    img, label = test[1]
    assert img.mode == "RGB" and int(np.argmax(np.asarray(img).reshape(-1, 3).mean(0))) == label
    back = pickle.loads(pickle.dumps(subset(test, [1])))
    assert back[0][1] == label and np.asarray(back[0][0]).tolist() == np.asarray(img).tolist()
