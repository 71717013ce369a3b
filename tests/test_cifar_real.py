"""The real CIFAR-10 ResNet-20 (../shared/weights) on real CIFAR-10 (../shared/data): accuracy, then masks."""

from __future__ import annotations

import copy

import pytest
import torch

from smn_core.augment import MultiCropConfig, SeededViewDataset, eval_transform
from smn_core.backbones import build_backbone
from smn_core.data import load_dataset
from smn_core.masking import apply_masks, export_masks, mask_density, score_parameters
from smn_core.training import TrainConfig, build_adaptation_model, train
from smn_core.masking import attach_masks
from smn_core.swav import SwAVConfig

from .conftest import shared_path

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # slow and in-process: runs in the ray tier's process


def _accuracy(model, classifier, dataset, backbone) -> float:
    loader = torch.utils.data.DataLoader(SeededViewDataset(dataset, eval_transform(32, backbone.mean, backbone.std)),
                                         batch_size=250)
    correct = 0
    with torch.no_grad():
        for x, y, _ in loader:
            correct += int((classifier(model(x)).argmax(1) == y).sum())
    return correct / len(dataset)


def test_resnet20_accuracy_then_self_masking_on_real_cifar10():
    shared_path("weights", "resnet_cifar10")
    root = shared_path("data", "cifar10")
    backbone = build_backbone("cifar_resnet20", "pretrained")
    model = backbone.model.eval()
    test = load_dataset("parquet", "test", root=str(root), max_samples=1000)  # stratified: 100 per class
    assert len(test) == 1000 and sorted(set(test.targets.tolist())) == list(range(10))
    acc = _accuracy(model, backbone.classifier, test, backbone)
    assert 0.76 <= acc <= 0.87, f"ResNet-20 top-1 on 1,000 real CIFAR-10 test images: {acc:.3f} (expected about 0.81)"

    fresh = copy.deepcopy(model)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    attach_masks(model)
    cfg = TrainConfig(objective="swav", adaptation="mask", epochs=1, batch_size=32, score_lr=500.0, bn_mode="frozen",
                      swav=SwAVConfig(num_prototypes=30, queue_length=0, freeze_prototypes_steps=0),
                      multicrop=MultiCropConfig(n_global=2, n_local=2))
    train_ds = load_dataset("parquet", "train", root=str(root), max_samples=256)
    adapt = build_adaptation_model(model, backbone.feature_dim, cfg)
    result = train(adapt, train_ds, cfg, image_size=32, mean=backbone.mean, std=backbone.std)
    assert result.steps == 256 // 32
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    density, _ = mask_density(model)
    assert density < 1.0, "scores never crossed the threshold: no mask was learned"
    assert any((s != 1.0).any() for s in score_parameters(model).values())
    # pretrained weights untouched: the masked model's originals equal the checkpoint's tensors
    for name, tensor in model.state_dict().items():
        plain = name.replace("parametrizations.", "").replace(".original", "")
        if plain in originals and name.endswith(("original", "running_mean", "running_var")):
            assert torch.equal(tensor, originals[plain]), name
    # exported masks on a fresh copy compute the same function on real images
    apply_masks(fresh, export_masks(model))
    x = torch.stack([eval_transform(32, backbone.mean, backbone.std)(test[i][0]) for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)
    masked_acc = _accuracy(model, backbone.classifier, test, backbone)
    assert 0.0 < masked_acc <= 1.0
