"""Selective masking (App. F) and the frozen-layer selectors (Table 5b) on real CIFAR ResNets."""

from __future__ import annotations

import pytest
import torch

from smn_core.backbones import build_backbone
from smn_core.data import load_dataset
from smn_core.masking import (MaskConfig, attach_masks, export_masks, mask_modules, select_parameters, stage_of,
                              trainable_mask_count)
from smn_core.training import TrainConfig, build_adaptation_model, train

pytestmark = pytest.mark.unit


def _resnet():
    torch.manual_seed(0)
    return build_backbone("cifar_resnet20", "random").model


@pytest.mark.parametrize("strategy", ["random", "magnitude"])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_selective_trains_exactly_the_asked_fraction_per_tensor(strategy, p):
    model = _resnet()
    weights = {n: t.detach().clone() for n, t in model.named_parameters()}
    attach_masks(model, MaskConfig(selective=strategy, selective_fraction=p, selective_seed=3))
    total = 0
    for name, m in mask_modules(model).items():
        n = m.scores.numel()
        assert m.num_trainable() == max(1, round(p * n))
        total += m.num_trainable()
        if strategy == "magnitude":  # the trainable positions hold the largest |W| of the tensor
            w = weights[name].abs()
            assert w[m.trainable].min() >= w[~m.trainable].max() if (~m.trainable).any() else True
    assert trainable_mask_count(model) == total


def test_random_selection_is_seeded_and_differs_between_tensors_and_seeds():
    a, b, c = _resnet(), _resnet(), _resnet()
    attach_masks(a, MaskConfig(selective="random", selective_fraction=0.3, selective_seed=1))
    attach_masks(b, MaskConfig(selective="random", selective_fraction=0.3, selective_seed=1))
    attach_masks(c, MaskConfig(selective="random", selective_fraction=0.3, selective_seed=2))
    ma, mb, mc = mask_modules(a), mask_modules(b), mask_modules(c)
    name = "layer2.0.conv1.weight"
    assert torch.equal(ma[name].trainable, mb[name].trainable)
    assert not torch.equal(ma[name].trainable, mc[name].trainable)


def test_selective_masking_never_changes_untrained_positions():
    """Train with a huge score lr so that many trainable bits flip; every untrained position stays 1."""
    torch.manual_seed(0)
    bb = build_backbone("cifar_resnet8", "random")
    attach_masks(bb.model, MaskConfig(selective="random", selective_fraction=0.3))
    cfg = TrainConfig(objective="supervised", adaptation="mask", epochs=2, batch_size=32, score_lr=2000.0,
                      head_lr=0.1, bn_mode="frozen")
    ds = load_dataset("digits", "train", image_size=16, max_samples=128)
    adapt = build_adaptation_model(bb.model, bb.feature_dim, cfg, num_classes=10)
    train(adapt, ds, cfg, image_size=16, mean=bb.mean, std=bb.std)
    masks = export_masks(bb.model)
    flipped_trainable = 0
    for name, m in mask_modules(bb.model).items():
        assert masks[name][~m.trainable].all(), f"an untrained position of {name} changed"
        flipped_trainable += int((~masks[name][m.trainable]).sum())
    assert flipped_trainable > 50, "the run must flip trainable bits for the test to mean anything"


def test_first_n_stages_masks_only_those_stages():
    model = _resnet()
    names = select_parameters(model, MaskConfig(stages=1))
    assert names and all(stage_of(n) <= 1 for n in names)
    assert "conv1.weight" in names and "layer1.0.conv1.weight" in names
    assert not any(n.startswith(("layer2", "layer3")) for n in names)
    all_names = select_parameters(_resnet(), MaskConfig())
    two = select_parameters(_resnet(), MaskConfig(stages=2))
    assert len(names) < len(two) < len(all_names)


def test_stages_on_a_model_without_stages_is_refused():
    with pytest.raises(ValueError, match="layer1..layerN"):
        select_parameters(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), MaskConfig(stages=1))


def test_frozen_layer_selectors_table_5b():
    model = _resnet()
    none_frozen = set(select_parameters(model, MaskConfig(selector="all")))
    bn_frozen = set(select_parameters(model, MaskConfig(selector="all_but_norm")))
    bias_frozen = set(select_parameters(model, MaskConfig(selector="all_but_bias")))
    assert "bn1.weight" in none_frozen and "bn1.bias" in none_frozen
    assert not any(".bn" in n or n.startswith("bn") for n in bn_frozen)
    assert bn_frozen == set(select_parameters(model, MaskConfig(selector="conv")))  # ResNet convs have no bias
    assert "bn1.weight" in bias_frozen and not any(n.endswith("bias") for n in bias_frozen)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(selective="random"), "selective_fraction"),
    (dict(selective="random", selective_fraction=1.5), "selective_fraction"),
    (dict(selective="rnd", selective_fraction=0.5), "allowed: none, random, magnitude"),
    (dict(stages=0), "stages"),
    (dict(mode="topk", topk_density=0.5, selective="random", selective_fraction=0.5), "threshold masks only"),
])
def test_selective_config_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        MaskConfig(**kwargs)
