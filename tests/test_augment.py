"""Tests for smn_core.augment: eval / supervised transforms, SwAV multi-crop, seeded views, collation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from smn_core.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropConfig,
    MultiCropTransform,
    PILGaussianBlur,
    SeededViewDataset,
    collate_views,
    eval_transform,
    supervised_train_transform,
)
from smn_core.data import ImageDataset

pytestmark = pytest.mark.unit


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _toy_dataset(n: int = 6, size: int = 40) -> ImageDataset:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageDataset.from_arrays(images, np.arange(n) % 2, ["a", "b"], "toy")


# ------------------------------------------------------------------------------ eval / supervised


def test_eval_transform_small_resizes_and_normalises():
    mean_pixel = tuple(int(round(m * 255)) for m in IMAGENET_MEAN)
    out = eval_transform(32)(Image.new("RGB", (50, 40), mean_pixel))
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 32, 32)
    assert out.abs().max() < 0.02  # the mean colour normalises to ~0
    white = eval_transform(32)(Image.new("RGB", (10, 10), (255, 255, 255)))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(white[:, 0, 0], expected)


def test_eval_transform_large_resizes_then_centre_crops():
    # left half black, right half white, 512 x 256: resize shorter side to 256 then centre-crop 224
    arr = np.zeros((256, 512, 3), np.uint8)
    arr[:, 256:] = 255
    out = eval_transform(224, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(arr))
    assert out.shape == (3, 224, 224)
    # the crop is the centre 224 columns of 512: half black, half white (not the whole squashed image)
    assert out[:, :, :100].max() < 0.05 and out[:, :, 124:].min() > 0.95
    assert eval_transform(224)(_noise_image(300, 400)).shape == (3, 224, 224)


def test_eval_transform_is_deterministic_and_validates():
    img = _noise_image(64, 48)
    t = eval_transform(32)
    torch.testing.assert_close(t(img), t(img))
    with pytest.raises(ValueError, match="image_size"):
        eval_transform(0)
    with pytest.raises(ValueError, match="std"):
        eval_transform(32, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="3 values"):
        eval_transform(32, mean=(0.5, 0.5))


def test_supervised_train_transform_shapes_and_randomness():
    img = _noise_image(48, 48)
    t = supervised_train_transform(32)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    c = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)  # randomness comes only from torch's generator
    assert not torch.equal(a, c)
    assert supervised_train_transform(224)(img).shape == (3, 224, 224)


# ------------------------------------------------------------------------------------- multi-crop


@pytest.mark.parametrize("image_size,local", [(32, 16), (224, 96)])
def test_multicrop_output_shapes(image_size, local):
    t = MultiCropTransform(image_size, MultiCropConfig())
    assert t.sizes == [image_size] * 2 + [local] * 6
    views = t(_noise_image(image_size + 16, image_size + 8))
    assert len(views) == 8
    for v, s in zip(views, t.sizes):
        assert type(v) is torch.Tensor and v.dtype == torch.float32 and v.shape == (3, s, s)
    assert not torch.equal(views[0], views[1])  # independent random global crops


def test_multicrop_config_sizes_and_custom_counts():
    cfg = MultiCropConfig(n_global=1, n_local=0)
    t = MultiCropTransform(64, cfg)
    assert t.sizes == [64] and len(t(_noise_image(80, 80))) == 1
    assert MultiCropConfig().sizes(16) == (16, 16)  # the floor, never larger than the global crop
    assert MultiCropConfig().sizes(32) == (32, 16)  # 96/224*32 = 13.7 -> floor 16
    assert MultiCropConfig(local_size_floor=8).sizes(32) == (32, 14)
    assert MultiCropConfig().sizes(100) == (100, 42)  # 96/224*100 = 42.9 -> nearest even 42
    assert MultiCropConfig(global_size=48, local_size=20).sizes(224) == (48, 20)


def test_blur_sigma_scales_with_the_crop():
    cfg = MultiCropConfig()
    # SwAV's own crops keep SwAV's sigma range (0.1, 2.0) px
    assert cfg.blur_sigma_for(224, local=False) == pytest.approx((0.1, 2.0))
    assert cfg.blur_sigma_for(96, local=True) == pytest.approx((0.1, 2.0))
    # a 32-px global crop and a 16-px local crop: the same fraction of the crop side
    lo, hi = cfg.blur_sigma_for(32, local=False)
    assert hi == pytest.approx(2.0 * 32 / 224) and hi / 32 == pytest.approx(2.0 / 224)
    lo, hi = cfg.blur_sigma_for(16, local=True)
    assert hi / 16 == pytest.approx(2.0 / 96) and hi / 16 < 0.03  # SwAV: at most 2 % of a local crop, not 14 %
    # the transform's blur uses the scaled range
    t = MultiCropTransform(32, MultiCropConfig(n_local=2))
    blurs = [op for tr in t._transforms for op in tr.transforms if isinstance(op, v2.RandomApply)
             and isinstance(op.transforms[0], PILGaussianBlur)]
    sigmas = sorted({b.transforms[0].sigma for b in blurs})
    assert sigmas == sorted({cfg.blur_sigma_for(32, local=False), cfg.blur_sigma_for(16, local=True)})
    with pytest.raises(ValueError, match="blur_sigma"):
        MultiCropConfig(blur_sigma=(2.0, 0.1))


def test_colour_distortion_is_swavs_default():
    t = MultiCropTransform(32, MultiCropConfig(n_local=0))
    jitters = [op.transforms[0] for op in t._transforms[0].transforms
               if isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], v2.ColorJitter)]
    assert len(jitters) == 1
    j = jitters[0]  # get_color_distortion(s=1.0): ColorJitter(0.8, 0.8, 0.8, 0.2)
    assert j.brightness == pytest.approx((0.2, 1.8)) and j.contrast == pytest.approx((0.2, 1.8))
    assert j.saturation == pytest.approx((0.2, 1.8)) and j.hue == pytest.approx((-0.2, 0.2))


def test_multicrop_grayscale_only_config_gives_grey_views():
    cfg = MultiCropConfig(color_jitter_strength=0.0, grayscale_p=1.0, blur_p=0.0)
    views = MultiCropTransform(32, cfg, mean=(0, 0, 0), std=(1, 1, 1))(_noise_image(40, 40))
    for v in views:
        torch.testing.assert_close(v[0], v[1], atol=1e-6, rtol=0)
        torch.testing.assert_close(v[1], v[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_global": 0}, "n_global"),
        ({"n_local": -1}, "n_local"),
        ({"global_size": 0}, "global_size"),
        ({"local_size": -4}, "local_size"),
        ({"global_scale": (0.5, 0.2)}, "global_scale"),
        ({"local_scale": (0.0, 0.1)}, "local_scale"),
        ({"local_scale": (0.1, 1.5)}, "local_scale"),
        ({"global_scale": 0.5}, "global_scale"),
        ({"color_jitter_strength": -0.1}, "color_jitter_strength"),
        ({"blur_p": 1.2}, "blur_p"),
    ],
)
def test_multicrop_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCropConfig(**kwargs)


def test_multicrop_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="config"):
        MultiCropTransform(32, {"n_global": 2})
    with pytest.raises(ValueError, match="image_size"):
        MultiCropTransform(-1)


# ---------------------------------------------------------------------------------- seeded views


def _views_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_seeded_views_depend_only_on_seed_epoch_index():
    ds = _toy_dataset()
    transform = MultiCropTransform(32)
    one = SeededViewDataset(ds, transform, seed=7)
    two = SeededViewDataset(ds, transform, seed=7)
    torch.manual_seed(123)
    random.seed(123)
    v3, label, idx = one[3]
    assert (label, idx) == (1, 3)
    _ = two[0], two[5]  # different access order and global RNG state
    torch.manual_seed(999)
    assert _views_equal(two[3][0], v3)
    assert _views_equal(one[3][0], v3)  # repeated access in the same epoch
    one.set_epoch(1)
    assert not _views_equal(one[3][0], v3)
    one.set_epoch(0)
    assert _views_equal(one[3][0], v3)
    assert not _views_equal(SeededViewDataset(ds, transform, seed=8)[3][0], v3)


def test_seeded_views_differ_between_indices_of_the_same_image():
    images = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 40, 40, 3), dtype=np.uint8), 2, axis=0)
    ds = SeededViewDataset(ImageDataset.from_arrays(images, [0, 0], ["a"], "same"), MultiCropTransform(32))
    assert not _views_equal(ds[0][0], ds[1][0])


def test_seeded_views_leave_global_rng_untouched():
    ds = SeededViewDataset(_toy_dataset(), MultiCropTransform(32), seed=1)
    torch.manual_seed(5)
    random.seed(5)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(5)
    random.seed(5)
    ds[2]
    torch.testing.assert_close(torch.rand(3), expected_torch)
    assert random.random() == expected_py


def test_seeded_views_same_with_worker_processes_and_batching():
    ds = SeededViewDataset(_toy_dataset(), MultiCropTransform(32, MultiCropConfig(n_local=2)), seed=3)
    ds.set_epoch(2)
    serial = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_views, num_workers=0)
    parallel = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_views, num_workers=2)
    a = [torch.cat(x) for x in zip(*[views for views, _, _ in serial])]
    b = [torch.cat(x) for x in zip(*[views for views, _, _ in parallel])]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_seeded_view_dataset_validation():
    with pytest.raises(ValueError, match="seed"):
        SeededViewDataset(_toy_dataset(), MultiCropTransform(32), seed=-1)
    with pytest.raises(ValueError, match="transform"):
        SeededViewDataset(_toy_dataset(), transform="crop")
    ds = SeededViewDataset(_toy_dataset(), MultiCropTransform(32))
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-2)


# --------------------------------------------------------------------------------------- collate


def test_collate_views_shapes_for_multicrop_and_single_view():
    ds = SeededViewDataset(_toy_dataset(), MultiCropTransform(32))
    views, labels, indices = collate_views([ds[i] for i in (4, 1, 2)])
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 6
    assert labels.dtype == torch.long and labels.tolist() == [0, 1, 0]
    assert indices.dtype == torch.long and indices.tolist() == [4, 1, 2]
    assert torch.equal(views[2][1], ds[1][0][2])

    single = SeededViewDataset(_toy_dataset(), eval_transform(24))
    views, labels, indices = collate_views([single[0], single[1]])
    assert len(views) == 1 and views[0].shape == (2, 3, 24, 24)


def test_collate_views_rejects_inconsistent_batches():
    with pytest.raises(ValueError, match="empty"):
        collate_views([])
    a = ([torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)], 0, 0)
    b = ([torch.zeros(3, 8, 8)], 1, 1)
    with pytest.raises(ValueError, match="same number of views"):
        collate_views([a, b])
    c = ([torch.zeros(3, 8, 8), torch.zeros(3, 6, 6)], 1, 1)
    with pytest.raises(ValueError, match="view 1"):
        collate_views([a, c])
