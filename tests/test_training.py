"""Tests for smn_core.training on a tiny CNN and 64 random 16 px images (a few seconds each):
self-masking with SwAV, resume from an epoch checkpoint, supervised masking vs full fine-tuning,
BatchNorm modes, progressive top-k and config validation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from smn_core.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropConfig
from smn_core.checkpoint import load_checkpoint, save_checkpoint
from smn_core.data import ImageDataset
from smn_core.masking import MaskConfig, attach_masks, iter_masked_tensors, mask_density, score_parameters
from smn_core.swav import SwAVConfig
from smn_core.training import TrainConfig, build_adaptation_model, train

pytestmark = pytest.mark.unit

FEATURE_DIM = 8
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def dataset() -> ImageDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    targets = np.arange(64) % 2
    return ImageDataset.from_arrays(images, targets, ["a", "b"], "random16")


def backbone(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, FEATURE_DIM, 3, padding=1),
        nn.BatchNorm2d(FEATURE_DIM),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def masked_backbone(mask: MaskConfig | None = None, seed: int = 0) -> nn.Sequential:
    model = backbone(seed)
    attach_masks(model, mask or MaskConfig())
    return model


def config(**kw) -> TrainConfig:
    base = dict(
        objective="swav",
        adaptation="mask",
        epochs=2,
        batch_size=16,
        swav=SwAVConfig(num_prototypes=10, proj_dim=8, queue_length=0, freeze_prototypes_steps=0),
        multicrop=MultiCropConfig(n_global=2, n_local=2, local_size=8),
    )
    base.update(kw)
    return TrainConfig(**base)


def run(model, ds, cfg, **kw):
    return train(model, ds, cfg, image_size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n or "num_batches" in n}


# ---------------------------------------------------------------------------------------------
# self-masking with SwAV


def test_swav_mask_training_learns_scores_and_keeps_weights(dataset):
    net = masked_backbone()
    originals = {n: w.clone() for n, w in iter_masked_tensors(net)}
    bn_affine = {n: p.clone() for n, p in net.named_parameters() if n.startswith("1.")}
    cfg = config(score_lr=500.0)
    model = build_adaptation_model(net, FEATURE_DIM, cfg)
    head_before = {n: p.clone() for n, p in model.swav.head.named_parameters()}
    lines = []
    result = run(model, dataset, cfg, progress=lines.append)

    assert result.steps == 2 * (64 // 16)
    assert result.resumed_from_epoch == 0
    assert [h["epoch"] for h in result.history] == [0, 1]
    for h in result.history:
        assert math.isfinite(h["loss"]) and h["loss"] > 0
        assert 0.0 <= h["code_entropy"] <= 1.0
    assert len(lines) == 2 and "density" in lines[-1]

    scores = score_parameters(net)["0.weight"]
    assert not torch.all(scores == cfg.mask.init_score)
    density = mask_density(net)[0]
    assert density < 1.0
    assert result.history[-1]["density"] == pytest.approx(density)
    for n, w in iter_masked_tensors(net):
        assert not w.requires_grad
        assert torch.equal(w, originals[n]), n
    for n, p in net.named_parameters():
        if n in bn_affine:
            assert torch.equal(p, bn_affine[n]), n
    # the head trains (prototypes too: freeze_prototypes_steps = 0)
    for n, p in model.swav.head.named_parameters():
        assert not torch.equal(p, head_before[n]), n


def test_prototypes_frozen_for_the_first_steps(dataset):
    cfg = config(epochs=1, max_steps_per_epoch=2,
                 swav=SwAVConfig(num_prototypes=10, proj_dim=8, queue_length=0, freeze_prototypes_steps=2))
    model = build_adaptation_model(masked_backbone(), FEATURE_DIM, cfg)
    before = model.swav.head.prototypes.weight.detach().clone()
    proj_before = model.swav.head.projection.weight.detach().clone()
    run(model, dataset, cfg)
    # prototypes are only re-normalised (already unit norm), never updated
    torch.testing.assert_close(model.swav.head.prototypes.weight, before, rtol=0, atol=1e-6)
    assert not torch.equal(model.swav.head.projection.weight, proj_before)


def test_queue_starts_at_the_configured_fraction(dataset):
    swav = SwAVConfig(num_prototypes=10, proj_dim=8, queue_length=16, queue_start_fraction=0.5,
                      freeze_prototypes_steps=0)
    cfg = config(epochs=2, max_steps_per_epoch=2, swav=swav)
    model = build_adaptation_model(masked_backbone(), FEATURE_DIM, cfg)
    filled = []
    run(model, dataset, cfg, on_epoch_end=lambda e, m, s: filled.append(int(model.swav.queue_filled)))
    assert filled == [0, 2 * 16]  # epoch 0: not active; epoch 1: 2 steps of 16 codes


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(dataset, tmp_path):
    cfg = config()
    full_model = build_adaptation_model(masked_backbone(), FEATURE_DIM, cfg)
    ckpt = tmp_path / "ckpt"

    def on_epoch_end(epoch, metrics, state_fn):
        if epoch == 0:
            tensors, meta = state_fn()
            assert meta["epoch"] == 0 and meta["step"] == 4
            assert any(k.startswith("optim.") for k in tensors)
            save_checkpoint(ckpt, tensors, meta)

    full = run(full_model, dataset, cfg, on_epoch_end=on_epoch_end)

    resumed_model = build_adaptation_model(masked_backbone(), FEATURE_DIM, cfg)
    resumed = run(resumed_model, dataset, cfg, resume=load_checkpoint(ckpt))

    assert resumed.resumed_from_epoch == 1
    assert resumed.steps == full.steps == 8
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[0]["loss"] == full.history[0]["loss"]
    assert resumed.history[1]["loss"] == pytest.approx(full.history[1]["loss"], rel=1e-5)
    s_full = score_parameters(full_model.backbone)
    s_res = score_parameters(resumed_model.backbone)
    # the second epoch really moved the scores (resuming is not a no-op)
    ck_tensors, _ = load_checkpoint(ckpt)
    assert not torch.allclose(ck_tensors["param.backbone.0.parametrizations.weight.0.scores"], s_full["0.weight"])
    for name in s_full:
        torch.testing.assert_close(s_res[name], s_full[name], rtol=0, atol=1e-6)
    full_head, res_head = full_model.swav.head.state_dict(), resumed_model.swav.head.state_dict()
    for name in full_head:
        torch.testing.assert_close(res_head[name], full_head[name], rtol=0, atol=1e-6)
    for name, buf in full_model.backbone.named_buffers():
        torch.testing.assert_close(dict(resumed_model.backbone.named_buffers())[name], buf, rtol=0, atol=1e-6)


def test_state_fn_returns_a_snapshot(dataset):
    cfg = config(max_steps_per_epoch=1)
    model = build_adaptation_model(masked_backbone(), FEATURE_DIM, cfg)
    captured = {}

    def on_epoch_end(epoch, metrics, state_fn):
        if epoch == 0:
            tensors, _ = state_fn()
            captured["live"] = tensors
            captured["copy"] = {k: v.clone() for k, v in tensors.items()}

    run(model, dataset, cfg, on_epoch_end=on_epoch_end)
    for k, v in captured["copy"].items():
        assert torch.equal(captured["live"][k], v), k


# ---------------------------------------------------------------------------------------------
# supervised masking vs full fine-tuning


def test_supervised_full_finetuning_changes_backbone_weights(dataset):
    cfg = config(objective="supervised", adaptation="full", epochs=1, max_steps_per_epoch=2, weight_lr=0.1)
    net = backbone()
    before = clone_state(net)
    model = build_adaptation_model(net, FEATURE_DIM, cfg, num_classes=2)
    assert all(p.requires_grad for p in net.parameters())
    result = run(model, dataset, cfg)
    assert 0.0 <= result.history[0]["train_top1"] <= 1.0
    assert "density" not in result.history[0]
    assert not torch.equal(net[0].weight, before["0.weight"])
    assert not torch.equal(net[1].weight, before["1.weight"])


def test_supervised_masking_never_changes_backbone_weights(dataset):
    cfg = config(objective="supervised", adaptation="mask", epochs=1, max_steps_per_epoch=2, score_lr=500.0)
    net = masked_backbone()
    originals = {n: w.clone() for n, w in iter_masked_tensors(net)}
    frozen = {n: p.clone() for n, p in net.named_parameters() if not n.endswith("scores")}
    model = build_adaptation_model(net, FEATURE_DIM, cfg, num_classes=2)
    cls_before = model.classifier.weight.detach().clone()
    run(model, dataset, cfg)
    for n, w in iter_masked_tensors(net):
        assert torch.equal(w, originals[n]), n
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.all(score_parameters(net)["0.weight"] == 1.0)
    assert not torch.equal(model.classifier.weight, cls_before)


# ---------------------------------------------------------------------------------------------
# BatchNorm modes


def test_bn_mode_frozen_keeps_running_stats_and_adapt_changes_them(dataset):
    stats = {}
    for mode in ("frozen", "adapt"):
        net = masked_backbone()
        before = bn_buffers(net)
        cfg = config(epochs=1, max_steps_per_epoch=1, bn_mode=mode)
        run(build_adaptation_model(net, FEATURE_DIM, cfg), dataset, cfg)
        after = bn_buffers(net)
        stats[mode] = {n: torch.equal(before[n], after[n]) for n in before}
    assert set(stats["frozen"]) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert all(stats["frozen"].values())
    assert not any(stats["adapt"].values())


# ---------------------------------------------------------------------------------------------
# top-k


def _expected_density(d: float, n: int) -> float:
    return max(1, round(d * n)) / n


def test_progressive_topk_lowers_density_each_epoch(dataset):
    final = 0.25
    cfg = config(epochs=3, max_steps_per_epoch=1, progressive_topk=True,
                 mask=MaskConfig(mode="topk", topk_density=final))
    net = masked_backbone(cfg.mask)
    n = net[0].weight.numel()
    result = run(build_adaptation_model(net, FEATURE_DIM, cfg), dataset, cfg)
    densities = [h["density"] for h in result.history]
    kept = [1.0 - (1.0 - final) * e / (cfg.epochs - 1) for e in range(cfg.epochs)]
    assert densities == pytest.approx([_expected_density(k, n) for k in kept])
    assert densities[0] == 1.0 and densities[-1] == pytest.approx(final, abs=1 / n)
    assert all(a > b for a, b in zip(densities, densities[1:]))


def test_progressive_topk_single_epoch_reaches_final_density(dataset):
    cfg = config(epochs=1, max_steps_per_epoch=1, progressive_topk=True,
                 mask=MaskConfig(mode="topk", topk_density=0.25))
    net = masked_backbone(cfg.mask)
    result = run(build_adaptation_model(net, FEATURE_DIM, cfg), dataset, cfg)
    assert result.history[-1]["density"] == pytest.approx(0.25, abs=1 / net[0].weight.numel())


def test_fixed_topk_keeps_the_final_density_from_the_start(dataset):
    cfg = config(epochs=2, max_steps_per_epoch=1, mask=MaskConfig(mode="topk", topk_density=0.4))
    net = masked_backbone(cfg.mask)
    result = run(build_adaptation_model(net, FEATURE_DIM, cfg), dataset, cfg)
    n = net[0].weight.numel()
    assert [h["density"] for h in result.history] == pytest.approx([_expected_density(0.4, n)] * 2)


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("kwargs", [
    dict(epochs=0),
    dict(batch_size=0),
    dict(objective="simclr"),
    dict(adaptation="lora"),
    dict(bn_mode="sync"),
    dict(schedule="step"),
    dict(epochs=2, warmup_epochs=3),
    dict(warmup_epochs=-1),
    dict(score_lr=0.0),
    dict(head_lr=-1.0),
    dict(momentum=-0.1),
    dict(max_steps_per_epoch=0),
    dict(progressive_topk=True),  # needs mask.mode = "topk"
])
def test_train_config_validation(kwargs):
    with pytest.raises(ValueError):
        config(**kwargs)


def test_train_config_to_dict_round_trips_the_fields():
    cfg = config()
    d = cfg.to_dict()
    assert d["epochs"] == 2 and d["swav"]["num_prototypes"] == 10 and d["mask"]["selector"] == "conv"
    assert d["multicrop"]["n_local"] == 2


def test_build_and_train_errors(dataset):
    cfg = config()
    with pytest.raises(ValueError, match="masks attached"):
        build_adaptation_model(backbone(), FEATURE_DIM, cfg)
    sup = config(objective="supervised")
    with pytest.raises(ValueError, match="num_classes"):
        build_adaptation_model(masked_backbone(), FEATURE_DIM, sup)
    small = ImageDataset.from_arrays(np.zeros((8, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), np.zeros(8, int), ["a"], "tiny")
    with pytest.raises(ValueError, match="fewer than one batch"):
        run(build_adaptation_model(masked_backbone(), FEATURE_DIM, cfg), small, cfg)


def test_head_initialisation_is_seeded_and_leaves_global_rng_alone():
    cfg = config(seed=3)
    nets = [masked_backbone(), masked_backbone()]
    torch.manual_seed(99)
    expected_next = torch.rand(1)
    torch.manual_seed(99)
    a = build_adaptation_model(nets[0], FEATURE_DIM, cfg)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    torch.manual_seed(12345)
    b = build_adaptation_model(nets[1], FEATURE_DIM, cfg)
    for (n, pa), (_, pb) in zip(a.swav.head.named_parameters(), b.swav.head.named_parameters()):
        assert torch.equal(pa, pb), n
    c = build_adaptation_model(masked_backbone(), FEATURE_DIM, config(seed=4))
    assert not torch.equal(c.swav.head.projection.weight, a.swav.head.projection.weight)


# ---------------------------------------------------------------------------------------------
# the split of train() into set-up, train_one_epoch and checkpoint_state changes no number

# Per-epoch values of two short seeded float64 runs, computed with smn_core.training.train at commit
# d267b6c (main, before train() was split into setup_training / train_one_epoch / checkpoint_state).
PINNED_SWAV_MASK = [  # epoch, loss, lr, code_entropy, prediction_information, density
    (0, 4.870096011278854, 0.12803300858899105, 0.9708837866783142, 0.0600784495472908, 1.0),
    (1, 3.3489716182961553, 0.055588571617310935, 0.8362222909927368, 0.034589529037475586, 0.75),
    (2, 3.061605097740113, 0.002555563028319885, 0.6894691586494446, 0.009686813689768314, 0.5),
]
PINNED_SUPERVISED_FULL = [  # epoch, loss, lr, train_top1
    (0, 0.6928090527449419, 0.1, 0.5),
    (1, 0.6960702232691887, 0.014644660940672627, 0.40625),
]


def pinned_swav_config() -> TrainConfig:
    # every schedule knob at once: score warm-up, LP-FT head-only steps, progressive top-k, the queue
    # switched on mid-run, prototypes frozen for the first steps, multi-crop with local views
    return config(epochs=3, dtype="float64", warmup_epochs=1.0, head_only_steps=2, progressive_topk=True, score_lr=5.0,
                  mask=MaskConfig(mode="topk", topk_density=0.5),
                  swav=SwAVConfig(num_prototypes=10, proj_dim=8, queue_length=16, queue_start_fraction=0.34,
                                  freeze_prototypes_steps=3))


def test_seeded_runs_reproduce_the_numbers_of_the_unsplit_train(dataset):
    cfg = pinned_swav_config()
    net = masked_backbone(cfg.mask)
    result = run(build_adaptation_model(net, FEATURE_DIM, cfg), dataset, cfg)
    assert result.steps == 12 and result.collapse is None and not result.stopped_early
    got = [(h["epoch"], h["loss"], h["lr"], h["code_entropy"], h["prediction_information"], h["density"])
           for h in result.history]
    assert got == [pytest.approx(row, rel=1e-6) for row in PINNED_SWAV_MASK]
    assert float(score_parameters(net)["0.weight"].detach().sum()) == pytest.approx(216.47629145084153, rel=1e-6)

    cfg = config(objective="supervised", adaptation="full", dtype="float64", warmup_epochs=1.0, bn_mode="frozen",
                 weight_lr=0.05, head_lr=0.1)
    net = backbone()
    result = run(build_adaptation_model(net, FEATURE_DIM, cfg, num_classes=2), dataset, cfg)
    assert result.steps == 8
    got = [(h["epoch"], h["loss"], h["lr"], h["train_top1"]) for h in result.history]
    assert got == [pytest.approx(row, rel=1e-6) for row in PINNED_SUPERVISED_FULL]
    assert float(net[0].weight.detach().sum()) == pytest.approx(-2.0174263415504767, rel=1e-6)


def test_train_is_setup_then_train_one_epoch_then_checkpoint_state(dataset):
    from smn_core.training import (CollapseWatch, checkpoint_state, lr_factor, lr_schedule, setup_training,
                                   train_one_epoch)

    cfg = pinned_swav_config()
    by_train = build_adaptation_model(masked_backbone(cfg.mask), FEATURE_DIM, cfg)
    states = []
    result = run(by_train, dataset, cfg, on_epoch_end=lambda e, m, state_fn: states.append(state_fn()))

    by_hand = build_adaptation_model(masked_backbone(cfg.mask), FEATURE_DIM, cfg)
    setup = setup_training(by_hand, dataset, cfg, image_size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert (setup.start_epoch, setup.start_step, setup.history, setup.total_steps) == (0, 0, [], 12)
    # the precomputed per-step schedule is lr_factor at each step, times the group's base lr
    assert setup.lr_schedules[1].tolist() == [cfg.score_lr * lr_factor(s, 12, 4, "cosine", 2) for s in range(12)]
    assert lr_schedule(12, 4, "cosine", 2).shape == (12,)
    watch, step, history = CollapseWatch(cfg, []), 0, []
    for epoch in range(cfg.epochs):
        metrics, step = train_one_epoch(setup, epoch, step, watch)
        history.append(metrics)
        tensors, meta = checkpoint_state(setup, epoch, step, history)
        assert meta["step"] == step == states[epoch][1]["step"]
        for k, v in states[epoch][0].items() if epoch == cfg.epochs - 1 else ():
            assert torch.equal(tensors[k], v), k
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(history) == drop(result.history)
