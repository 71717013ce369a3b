"""Tests for the small-scale recipe of self-masking (issue "Self-masking that works"):
the top-k initial mask, separate warm-ups and the head-only start, early stop on SwAV collapse,
the BatchNorm re-estimation control, both k-NN protocols and the view-strength check.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import binom
from torch import nn

from smn_core.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropConfig, MultiCropTransform
from smn_core.data import ImageDataset
from smn_core.masking import MaskConfig, attach_masks, mask_modules, score_parameters
from smn_core.pipeline import evaluate_model, reestimate_batchnorm, run_cell
from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
from smn_core.swav import SwAVConfig
from smn_core.training import TrainConfig, build_adaptation_model, lr_factor, train
from smn_core.view_strength import view_similarity

# tiers per test: the slow ones run in the ray tier's process, so that `pytest -m unit` stays fast

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def dataset() -> ImageDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return ImageDataset.from_arrays(images, np.arange(64) % 2, ["a", "b"], "random16")


def tiny_backbone(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def swav_config(**kw) -> TrainConfig:
    base = dict(objective="swav", adaptation="mask", epochs=3, batch_size=16,
                swav=SwAVConfig(num_prototypes=10, proj_dim=8, queue_length=0, freeze_prototypes_steps=0),
                multicrop=MultiCropConfig(n_global=2, n_local=0))
    base.update(kw)
    return TrainConfig(**base)


def run(model, ds, cfg, **kw):
    return train(model, ds, cfg, image_size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)


# ---------------------------------------------------------------------------------------------
# top-k starts from a random, unstructured mask (Ramanujan et al. 2020)


@pytest.mark.unit
def test_topk_initial_mask_has_no_dead_output_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    attach_masks(conv, MaskConfig(mode="topk", topk_density=0.5))
    mask = mask_modules(conv)["weight"].hard_mask()
    per_channel = mask.flatten(1).float().sum(1)  # kept weights of each of the 32 output channels
    n = mask[0].numel()  # 144 weights per output channel
    lo, hi = binom.ppf(1e-4, n, 0.5), binom.ppf(1 - 1e-4, n, 0.5)  # binomial range at p = 1e-4 per channel
    assert per_channel.min() > 0, "a whole output channel is dead at step 0"
    assert ((per_channel >= lo) & (per_channel <= hi)).all(), per_channel.tolist()
    assert int(mask.sum()) == round(0.5 * mask.numel())  # still exactly top-k


@pytest.mark.unit
def test_topk_initial_mask_is_seeded_by_the_cell_seed_and_differs_per_tensor():
    def first_masks(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
        attach_masks(model, MaskConfig(mode="topk", topk_density=0.5))
        return [m.hard_mask() for m in mask_modules(model).values()]
    a, b, c = first_masks(1), first_masks(1), first_masks(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])


@pytest.mark.unit
def test_threshold_masks_still_start_at_s0_everywhere():
    conv = nn.Conv2d(4, 4, 3)
    attach_masks(conv, MaskConfig())
    assert torch.all(score_parameters(conv)["weight"] == 1.0)


@pytest.mark.unit
def test_topk_init_noise_must_be_positive():
    with pytest.raises(ValueError, match="topk_init_noise"):
        MaskConfig(mode="topk", topk_density=0.5, topk_init_noise=0.0)


# ---------------------------------------------------------------------------------------------
# separate warm-ups for scores and head; LP-FT head-only start


@pytest.mark.unit
def test_lr_factor_delay_then_warmup_then_cosine():
    assert [lr_factor(s, 10, 0, "cosine", delay=3) for s in range(3)] == [0.0, 0.0, 0.0]
    assert lr_factor(3, 10, 2, "cosine", delay=3) == pytest.approx(0.5)
    assert lr_factor(4, 10, 2, "cosine", delay=3) == pytest.approx(1.0)
    assert lr_factor(9, 10, 0, "constant", delay=3) == 1.0


def attach_and_return(model):
    attach_masks(model, MaskConfig())
    return model


@pytest.mark.unit
def test_scores_and_head_get_their_own_warmups(dataset, monkeypatch):
    cfg = swav_config(epochs=2, warmup_epochs=2, schedule="constant")
    model = build_adaptation_model(attach_and_return(tiny_backbone()), 8, cfg)
    seen = []
    real_step = torch.optim.SGD.step

    def recording_step(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    run(model, dataset, cfg)
    head_lrs, score_lrs = [s[0] for s in seen], [s[1] for s in seen]
    assert head_lrs == [cfg.head_lr] * len(seen)  # no head warm-up: the paper warms up the mask lr only
    assert score_lrs[0] == pytest.approx(cfg.score_lr / len(seen)) and score_lrs[-1] == pytest.approx(cfg.score_lr)
    assert all(a < b for a, b in zip(score_lrs, score_lrs[1:]))
    # unset: SwAV's head does not warm up (the paper), a supervised run's head follows the scores' warm-up
    seen.clear()
    cfg = swav_config(epochs=2, warmup_epochs=2, schedule="constant")
    run(build_adaptation_model(attach_and_return(tiny_backbone()), 8, cfg), dataset, cfg)
    assert [s[0] for s in seen] == [cfg.head_lr] * len(seen)
    seen.clear()
    cfg = swav_config(objective="supervised", epochs=2, warmup_epochs=2, schedule="constant")
    run(build_adaptation_model(attach_and_return(tiny_backbone()), 8, cfg, num_classes=2), dataset, cfg)
    assert [s[0] / cfg.head_lr for s in seen] == pytest.approx([s[1] / cfg.score_lr for s in seen])


@pytest.mark.unit
def test_head_only_steps_keep_the_scores_still_then_train_them(dataset):
    cfg = swav_config(epochs=2, head_only_steps=4)  # 4 steps per epoch: epoch 1 is head-only
    model = build_adaptation_model(attach_and_return(tiny_backbone()), 8, cfg)
    head_before = [p.detach().clone() for p in model.head_parameters()]
    snapshots = []
    run(model, dataset, cfg, on_epoch_end=lambda e, m, s: snapshots.append(
        {k: v.clone() for k, v in score_parameters(model.backbone).items()}))
    assert all(torch.all(v == 1.0) for v in snapshots[0].values()), "scores moved during the head-only steps"
    assert any(not torch.all(v == 1.0) for v in snapshots[1].values()), "scores never trained after them"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head_parameters()))


@pytest.mark.unit
@pytest.mark.parametrize("kwargs,match", [({"head_warmup_epochs": 5}, "head_warmup_epochs"),
                                          ({"head_warmup_epochs": -1}, "head_warmup_epochs"),
                                          ({"head_only_steps": -1}, "head_only_steps"),
                                          ({"on_collapse": "abort"}, "on_collapse"),
                                          ({"collapse_patience": 0}, "collapse_patience")])
def test_new_train_config_fields_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        swav_config(**kwargs)


# ---------------------------------------------------------------------------------------------
# collapse is checked after every epoch; on_collapse: stop ends a dead run early


def collapsing_config(**kw) -> TrainConfig:
    # a softmax temperature of 1000 makes every prediction uniform: the loss sits at ln K from the first
    # step, which is exactly what SwAV's collapse looks like (NOTES.md)
    return swav_config(epochs=5, swav=SwAVConfig(num_prototypes=10, proj_dim=8, queue_length=0,
                                                 freeze_prototypes_steps=0, temperature=1000.0), **kw)


@pytest.mark.unit
def test_on_collapse_stop_ends_training_early_and_says_when(dataset):
    cfg = collapsing_config(on_collapse="stop", collapse_patience=2)
    model = build_adaptation_model(attach_and_return(tiny_backbone()), 8, cfg)
    result = run(model, dataset, cfg)
    flags = [h["collapsed"] for h in result.history]
    assert result.stopped_early and len(result.history) < cfg.epochs
    assert flags == [1.0, 1.0] and result.collapse_epoch == 0  # stopped after 2 collapsed epochs of 5
    assert abs(result.history[-1]["loss"] - math.log(10)) < 0.02 * math.log(10)


@pytest.mark.unit
def test_on_collapse_warn_runs_every_epoch_and_records_it(dataset):
    cfg = collapsing_config(on_collapse="warn")
    model = build_adaptation_model(attach_and_return(tiny_backbone()), 8, cfg)
    result = run(model, dataset, cfg)
    assert len(result.history) == cfg.epochs and not result.stopped_early
    assert result.collapse_epoch is not None and result.collapse is not None
    assert all("collapsed" in h for h in result.history)


@pytest.mark.unit
def test_a_healthy_run_is_not_flagged(dataset):
    cfg = swav_config(epochs=2, on_collapse="stop")
    model = build_adaptation_model(attach_and_return(tiny_backbone()), 8, cfg)
    result = run(model, dataset, cfg)
    assert len(result.history) == 2 and not result.stopped_early and result.collapse_epoch is None


# ---------------------------------------------------------------------------------------------
# the BatchNorm control and both k-NN protocols (real digits, real CIFAR ResNet-8 architecture)


def digits_cell(method: str, **eval_kw) -> CellConfig:
    return CellConfig(method=method, backbone=BackboneSpec("cifar_resnet8", "random"),
                      dataset=DataSpec("digits", classes=[5, 6, 7, 8, 9], image_size=32),
                      eval=EvalSpec(**eval_kw), seed=0)


@pytest.mark.unit
def test_pretrained_bn_re_estimates_bn_statistics_only():
    model = tiny_backbone()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = np.random.default_rng(1)
    images = (rng.random((40, IMAGE_SIZE, IMAGE_SIZE, 3)) * 80 + 150).astype(np.uint8)  # a bright domain
    ds = ImageDataset.from_arrays(images, np.arange(40) % 2, ["a", "b"], "bright")
    assert reestimate_batchnorm(model, ds, image_size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD) == 1
    bn = model[1]
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    # the running mean is now the mean of the conv outputs over the target images
    from smn_core.augment import eval_transform
    x = torch.stack([eval_transform(IMAGE_SIZE)(ds[i][0]) for i in range(len(ds))])
    with torch.no_grad():
        expected = model[0](x).mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, atol=1e-4)
    assert bn.num_batches_tracked.item() >= 1


@pytest.mark.unit
def test_pretrained_bn_cell_differs_from_pretrained_and_records_both_knn_protocols():
    frozen = run_cell(digits_cell("pretrained"))
    control = run_cell(digits_cell("pretrained_bn"))
    for m in (frozen.metrics, control.metrics):
        assert {"knn_top1", "knn_dino_top1", "knn_min_class_bank"} <= set(m)
        assert 0.0 <= m["knn_dino_top1"] <= 1.0
    assert control.metrics["bn_layers"] == 7.0  # ResNet-8: stem + 3 blocks x 2
    assert control.metrics["knn_dino_top1"] != frozen.metrics["knn_dino_top1"]


# run_cell's metrics for two small float64 cells on real digits, computed with the unsplit run_cell at commit
# d267b6c (main); the split into _before_training / _adapt / _storage_bits changes no number and no key order
PINNED_CELLS = {
    "smn": {
        "view_cos_same": -0.006461107637733221, "view_cos_other": -0.014107322320342064,
        "view_cos_gap": 0.007646214682608843, "train_seconds": None, "steps": 6.0, "train_loss": 3.1361100536740776,
        "collapsed": 0.0, "collapse_epoch": 0.0, "stopped_early": 0.0, "resumed_from_epoch": 0.0,
        "train_loss@1": 5.564076683875968, "train_loss@2": 3.1361100536740776, "code_entropy": 0.8385418057441711,
        "prediction_information": 0.005504305940121412, "density": 0.974487594390507, "mask_bits": 74160.0,
        "trainable_masks": 74160.0, "knn_top1": 0.7708333333333334, "knn_dino_top1": 0.7708333333333334,
        "knn_min_class_bank": 32.0, "linear_probe_top1": 0.9375, "linear_probe_train_top1": 1.0,
        "linear_probe_C": 1.0, "lowshot_top1@0.1": 0.6666666666666666, "eval_seconds": None, "num_train": 96.0,
        "num_test": 48.0, "backbone_params": 74640.0, "storage_bits": 74160.0},
    "supervised_mask": {
        "num_labelled": 48.0, "train_seconds": None, "steps": 6.0, "train_loss": 1.3240563089736046,
        "collapsed": 0.0, "collapse_epoch": 0.0, "stopped_early": 0.0, "resumed_from_epoch": 0.0,
        "train_loss@1": 1.4146541520140812, "train_loss@2": 1.3240563089736046, "density": 0.9992044228694714,
        "mask_bits": 74160.0, "trainable_masks": 74160.0, "knn_top1": 0.7083333333333334,
        "knn_dino_top1": 0.7083333333333334, "knn_min_class_bank": 32.0, "linear_probe_top1": 1.0,
        "linear_probe_train_top1": 1.0, "linear_probe_C": 1.0, "classifier_top1": 0.3333333333333333,
        "eval_seconds": None, "num_train": 96.0, "num_test": 48.0, "backbone_params": 74640.0,
        "storage_bits": 74160.0},
}
PINNED_MASK_ONES = {"smn": 72268, "supervised_mask": 74101}


def pinned_cell(method: str, **kw) -> CellConfig:
    train = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=3, dtype="float64",
                        swav=SwAVConfig(num_prototypes=10, proj_dim=8, queue_length=0, freeze_prototypes_steps=0),
                        multicrop=MultiCropConfig(n_global=2, n_local=1, local_size=16))
    return CellConfig(method=method, backbone=BackboneSpec("cifar_resnet8", "random"),
                      dataset=DataSpec("digits", classes=[5, 6, 7], image_size=32, max_train_samples=96,
                                       max_test_samples=48, **kw.pop("data", {})),
                      train=train, eval=EvalSpec(knn_k=20, batch_size=64, **kw.pop("eval", {})), seed=1)


@pytest.mark.unit
@pytest.mark.parametrize("method, kw", [("smn", {"eval": {"lowshot_fractions": [0.1]}}),
                                        ("supervised_mask", {"data": {"label_fraction": 0.5}})])
def test_run_cell_reproduces_the_metrics_of_the_unsplit_function(method, kw):
    outcome = run_cell(pinned_cell(method, **kw))
    expected = PINNED_CELLS[method]
    assert list(outcome.metrics) == list(expected)  # the same metrics, in the same order (ledger columns)
    for key, value in expected.items():
        if value is not None:  # None: a duration
            assert outcome.metrics[key] == pytest.approx(value, rel=1e-6), key
    assert sum(int(m.sum()) for m in outcome.masks.values()) == PINNED_MASK_ONES[method]
    assert [h["epoch"] for h in outcome.history] == [0, 1] and outcome.train_result.steps == 6


@pytest.mark.unit
def test_knn_protocols_follow_the_spec_and_warn_when_k_exceeds_a_class_bank():
    from smn_core.pipeline import load_cell_data, prepare_backbone
    cell = digits_cell("pretrained", knn_k=200, knn_dino_k=1, knn_dino_temperature=0.07)
    backbone = prepare_backbone(cell.backbone)
    train_ds, test_ds = load_cell_data(cell.dataset)
    with pytest.warns(UserWarning, match="knn_k = 200 exceeds the smallest class"):
        out = evaluate_model(backbone.model, train_ds, test_ds, cell.eval, image_size=32, mean=backbone.mean,
                             std=backbone.std)
    counts = np.bincount(np.asarray(train_ds.targets))
    assert out["knn_min_class_bank"] == counts[counts > 0].min() < 200
    # k = 1 is plain nearest-neighbour accuracy, computed here independently
    from smn_core.augment import SeededViewDataset, eval_transform
    from smn_core.evaluation import compute_embeddings
    tf = eval_transform(32, backbone.mean, backbone.std)
    xtr, ytr = compute_embeddings(backbone.model, SeededViewDataset(train_ds, tf))
    xte, yte = compute_embeddings(backbone.model, SeededViewDataset(test_ds, tf))
    sims = torch.nn.functional.normalize(xte, dim=1) @ torch.nn.functional.normalize(xtr, dim=1).t()
    assert out["knn_dino_top1"] == pytest.approx(float((ytr[sims.argmax(1)] == yte).double().mean()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_model(backbone.model, train_ds, test_ds, EvalSpec(knn_k=20), image_size=32, mean=backbone.mean,
                       std=backbone.std)


@pytest.mark.unit
def test_probe_C_grid_chooses_C_per_backbone_and_records_it():
    from smn_core.evaluation import linear_probe
    from smn_core.pipeline import load_cell_data, prepare_backbone
    cell = digits_cell("pretrained", knn_k=20)
    backbone = prepare_backbone(cell.backbone)
    train_ds, test_ds = load_cell_data(cell.dataset)
    grid = [0.001, 1.0, 1000.0]
    out = evaluate_model(backbone.model, train_ds, test_ds, EvalSpec(knn_k=20, probe_C_grid=grid, probe_cv_folds=3),
                         image_size=32, mean=backbone.mean, std=backbone.std)
    assert out["linear_probe_C"] in grid
    from smn_core.augment import SeededViewDataset, eval_transform
    from smn_core.evaluation import compute_embeddings
    tf = eval_transform(32, backbone.mean, backbone.std)
    xtr, ytr = compute_embeddings(backbone.model, SeededViewDataset(train_ds, tf))
    xte, yte = compute_embeddings(backbone.model, SeededViewDataset(test_ds, tf))
    assert out["linear_probe_top1"] == linear_probe(xtr, ytr, xte, yte, C=out["linear_probe_C"]).top1
    fixed = evaluate_model(backbone.model, train_ds, test_ds, EvalSpec(knn_k=20), image_size=32,
                           mean=backbone.mean, std=backbone.std)
    assert fixed["linear_probe_C"] == 1.0


@pytest.mark.unit
@pytest.mark.parametrize("kw, match", [
    ({"probe_C_grid": [1.0, 0.0]}, r"eval.probe_C_grid must hold finite numbers > 0, got \[1.0, 0.0\]"),
    ({"probe_cv_folds": 1}, "eval.probe_cv_folds must be >= 2, got 1"),
])
def test_eval_spec_refuses_a_bad_probe_grid(kw, match):
    with pytest.raises(ValueError, match=match):
        EvalSpec(**kw)


@pytest.mark.unit
def test_eval_spec_probe_kwargs_give_the_linear_probe_its_protocol():
    from smn_core.evaluation import linear_probe

    fixed = EvalSpec(probe_C=3.0, probe_standardize=False, probe_max_iter=50).probe_kwargs()
    assert fixed == {"C": 3.0, "max_iter": 50, "standardize": False, "C_grid": None, "cv_folds": 5}
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 4, generator=gen) + y[:, None] * 2.0
    cv = EvalSpec(probe_C_grid=[0.01, 100.0], probe_cv_folds=4)
    assert cv.probe_kwargs()["C_grid"] == [0.01, 100.0] and cv.probe_kwargs()["cv_folds"] == 4
    assert linear_probe(x, y, x, y, **cv.probe_kwargs()).C in (0.01, 100.0)
    assert linear_probe(x, y, x, y, **fixed).C == 3.0


# ---------------------------------------------------------------------------------------------
# the view-strength check


@pytest.mark.unit
def test_view_similarity_separates_weak_from_strong_views():
    torch.manual_seed(0)
    from smn_core.data import load_dataset
    ds = load_dataset("digits", "train", classes=[5, 6, 7, 8, 9], image_size=32)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
    weak = MultiCropTransform(32, MultiCropConfig(n_local=0, global_scale=(0.9, 1.0), color_jitter_strength=0.0,
                                                  grayscale_p=0.0, blur_p=0.0, flip_p=0.0))
    strong = MultiCropTransform(32, MultiCropConfig(n_local=2, global_scale=(0.05, 0.1), local_scale=(0.02, 0.05)))
    w = view_similarity(model, ds, weak, num_images=64)
    s = view_similarity(model, ds, strong, num_images=64)
    assert w.gap > s.gap and w.same > s.same
    assert s.warning is not None and "too strong" in s.warning
    assert -1.0 <= s.other <= w.same <= 1.0


# ---------------------------------------------------------------------------------------------
# the head can start from the frozen features (PCA whitening + k-means prototypes)


@pytest.mark.unit
def test_pca_kmeans_head_init_whitens_the_features_and_puts_prototypes_on_the_clusters():
    from smn_core.swav import SwAVConfig, SwAVHead, init_head_from_features
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 5.0 + 3.0  # 4 well separated clusters, far from the origin
    labels = np.repeat(np.arange(4), 50)
    feats = torch.tensor(centres[labels] + rng.normal(size=(200, 6)) * 0.3, dtype=torch.float32)
    head = SwAVHead(6, SwAVConfig(num_prototypes=4, proj_dim=10, head_init="pca_kmeans"))
    init_head_from_features(head, feats, seed=0)
    with torch.no_grad():
        raw = head.projection(feats)
    assert torch.allclose(raw[:, :6].mean(0), torch.zeros(6), atol=1e-4)  # centred
    assert torch.allclose(raw[:, :6].var(0, unbiased=True), torch.ones(6), atol=1e-2)  # whitened
    assert torch.all(raw[:, 6:] == 0)  # outputs beyond min(N - 1, F) = 6 components start at zero
    z, scores = head(feats)
    assigned = scores.argmax(1).numpy()
    # every cluster's points go to one prototype, and different clusters to different ones
    per_cluster = [np.unique(assigned[labels == c]) for c in range(4)]
    assert all(len(p) == 1 for p in per_cluster) and len({int(p[0]) for p in per_cluster}) == 4
    assert torch.allclose(head.prototypes.weight.norm(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.unit
def test_pca_kmeans_head_init_with_input_norm_standardises_first():
    from smn_core.swav import SwAVConfig, SwAVHead, init_head_from_features
    rng = np.random.default_rng(1)
    feats = torch.tensor(rng.normal(size=(100, 5)) * np.array([100.0, 1, 1, 1, 0.1]) + 7.0, dtype=torch.float32)
    head = SwAVHead(5, SwAVConfig(num_prototypes=3, proj_dim=5, head_init="pca_kmeans", input_norm=True))
    init_head_from_features(head, feats, seed=0)
    assert torch.allclose(head.input_norm.running_mean, feats.mean(0), rtol=1e-4)
    head.train()
    with torch.no_grad():
        raw = head.projection(head.input_norm(feats))
    assert torch.allclose(raw.mean(0), torch.zeros(5), atol=1e-3)
    assert torch.allclose(raw.var(0, unbiased=True), torch.ones(5), atol=5e-2)
    # a constant shift of every feature (what a shrinking mask does) changes nothing after the norm
    z1, _ = head(feats)
    z2, _ = head(feats * 0.5 + 3.0)
    assert torch.allclose(z1, z2, atol=1e-3)


@pytest.mark.unit
def test_pca_kmeans_head_init_is_refused_for_an_mlp_head():
    from smn_core.swav import SwAVConfig
    with pytest.raises(ValueError, match="head_init 'pca_kmeans'.*hidden_dim"):
        SwAVConfig(hidden_dim=64, head_init="pca_kmeans")
    with pytest.raises(ValueError, match="head_init 'pretrained' is not known"):
        SwAVConfig(head_init="pretrained")


# ---------------------------------------------------------------------------------------------
# the recipe on real data: self-masking improves the frozen backbone it adapts


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_smn_improves_the_frozen_backbones_knn_on_real_digits(tmp_path):
    """The demo, seed 0, in-process: a CIFAR ResNet-8 pretrained on digits 0-4, self-masked on 5-9.

    The pipeline's pretraining is not bit-identical across machines (frozen k-NN (k=200) 0.669, 0.632 and
    0.662 on three of them), so the recipe was checked on four pretrainings (pretraining seeds 0-3, SMN
    seeds 0-2, 2026-12-02, 1 thread, last stage masked, mask-lr warm-up of 1 epoch). Seed 0, frozen -> SMN:
    k-NN (k=20) 0.803 -> 0.848, 0.736 -> 0.781, 0.758 -> 0.833, 0.740 -> 0.803 (+4.5 to +7.4 points; every
    one of the 12 runs gained, the least +2.2); linear probe (C by cross-validation on the train split)
    0.963 -> 0.985, 0.933 -> 0.948, 0.959 -> 0.967, 0.959 -> 0.974 (all 12 runs at or above frozen, the
    least +0.4). The same k-NN on centred features (the geometry check: when every conv was masked, a few
    pruned early weights blew single channels up 20-200x, the features turned collinear and the gain
    showed under uncentred cosine only) 0.833 -> 0.885, 0.803 -> 0.836, 0.784 -> 0.855, 0.803 -> 0.866.
    On the 2026-12-06 machine (frozen k-NN (k=200) 0.632, the pretraining docs/results/demo was made with), with
    the warm-up of 1 epoch, seed 0 gave k-NN (k=20) 0.799 -> 0.829 and the probe 0.967 -> 0.955 (exactly 3 of
    the 269 test images below). The demo now runs without the warm-up (`warmup_epochs` 0, chosen on validation,
    docs/recipe.md); seed 0 then gives k-NN (k=20) 0.799 -> 0.844 (+4.5 points; the demo's 3 seeds +4.0), the
    probe 0.967 -> 0.985, the centred k-NN 0.855 -> 0.911. Asserted: k = 20 at least 2 points up (under the
    least of the 13 runs above, +2.2), the centred k-NN at least 1 point up, the probe at most 3 of the 269 test
    images below (the least any measured run reached).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray worker, where the figures above were measured
    try:
        _check_demo_improves(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _centred_knn20(model, cfg, backbone) -> float:
    """DINO's k-NN (k = 20, T = 0.07) on features centred by the train split's mean (the geometry check)."""
    from smn_core.augment import SeededViewDataset, eval_transform
    from smn_core.evaluation import compute_embeddings, knn_top1
    from smn_core.pipeline import load_cell_data

    train_ds, test_ds = load_cell_data(cfg.dataset)
    tf = eval_transform(cfg.dataset.image_size, backbone.mean, backbone.std)
    xtr, ytr = compute_embeddings(model.eval(), SeededViewDataset(train_ds, tf), batch_size=256)
    xte, yte = compute_embeddings(model.eval(), SeededViewDataset(test_ds, tf), batch_size=256)
    mu = xtr.mean(0)
    return knn_top1(xtr - mu, ytr, xte - mu, yte, k=20, temperature=0.07, num_classes=len(train_ds.class_names))


def _check_demo_improves(tmp_path):
    from smn_core.cascade import restore_adapted_backbone
    from smn_core.checkpoint import save_tensors
    from smn_core.pipeline import prepare_backbone, pretrain_backbone
    from orchestrator.spec.experiment import expand_cells, load_spec
    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml",
                     ["methods=[pretrained,smn]", "seeds=[0]"])
    frozen_cell, smn_cell = [c.config for c in expand_cells(spec)]
    state, _ = pretrain_backbone(frozen_cell.backbone, frozen_cell.pretrain)
    weights = tmp_path / "pretrained.safetensors"
    save_tensors(weights, state)
    frozen = run_cell(frozen_cell, pipeline_weights=weights).metrics
    outcome = run_cell(smn_cell, pipeline_weights=weights)
    smn = outcome.metrics
    assert smn["collapsed"] == 0.0 and smn["density"] < 1.0
    assert smn["knn_dino_top1"] >= frozen["knn_dino_top1"] + 0.02, (smn, frozen)
    # at most 3 of the test images below (the docstring's bound, counted in images: 3 / 269 is 1.1 points)
    assert (frozen["linear_probe_top1"] - smn["linear_probe_top1"]) * smn["num_test"] <= 3 + 1e-6, (smn, frozen)
    frozen_bb = prepare_backbone(frozen_cell.backbone, pipeline_weights=weights)
    adapted, adapted_bb = restore_adapted_backbone(smn_cell, outcome.state, pipeline_weights=weights)
    centred_frozen = _centred_knn20(frozen_bb.model, frozen_cell, frozen_bb)
    centred_smn = _centred_knn20(adapted, smn_cell, adapted_bb)
    assert centred_smn >= centred_frozen + 0.01, (centred_smn, centred_frozen)
    # The random-mask controls (issue 25): the trained mask redrawn with the same count per layer (and the same
    # |W| distribution), three draws each (seeds 0-2; k-NN only: the probe's C grid is left out, it costs most).
    # Measured on the 2026-12-06 machine, the demo's recipe (`warmup_epochs` 0; SMN seed 0: 0.844 at k = 20):
    # count 0.822 / 0.810 / 0.792 (mean 0.808), magnitude 0.818 / 0.814 / 0.796 (mean 0.809); draws 3-4: 0.818 /
    # 0.814 and 0.807 / 0.810. The demo's 3 SMN seeds, paired over images x seeds: +3.0 [+0.5, +5.5] over count,
    # +3.8 [+1.2, +6.7] over magnitude (docs/results/demo.md). With the former warm-up of 1 epoch (SMN 0.829) the
    # draws were 0.825 / 0.810 / 0.792 and 0.814 / 0.803 / 0.814.
    # Asserted: SMN at least 1 point above the mean of the three draws, and above every draw.
    from dataclasses import replace

    from smn_core.random_mask import evaluate_random_mask

    knn_only = replace(smn_cell, eval=replace(smn_cell.eval, probe_C_grid=[]))
    for method, match in (("random_mask", "count"), ("random_mask_magnitude", "magnitude")):
        draws = [evaluate_random_mask(replace(knn_only, method=method, seed=s), outcome.masks, match,
                                      pipeline_weights=weights).metrics for s in range(3)]
        assert all(d["density"] == pytest.approx(smn["density"]) and d["overlap"] < 1.0 for d in draws)
        k20 = [d["knn_dino_top1"] for d in draws]
        assert smn["knn_dino_top1"] >= np.mean(k20) + 0.01 and smn["knn_dino_top1"] > max(k20), (match, smn, k20)
