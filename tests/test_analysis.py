"""Tests for smn_core.analysis: densities per tensor / stage / block and mask agreement, on the masks
of real architectures (the CIFAR ResNet-20 of the project and a small open_clip VisionTransformer)."""

from __future__ import annotations

import pytest
import torch

from smn_core.analysis import grouped_density, mask_agreement, network_order, tensor_densities
from smn_core.backbones import build_backbone
from smn_core.masking import MaskConfig, attach_masks, export_masks, mask_density, mask_modules

pytestmark = pytest.mark.unit


def resnet20_masks(seed: int = 0, drop: float = 0.3) -> dict[str, torch.Tensor]:
    """Masks of a CIFAR ResNet-20 whose scores were pushed below the threshold at random positions."""
    torch.manual_seed(seed)
    model = build_backbone("cifar_resnet20", "random").model
    attach_masks(model, MaskConfig())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mask_modules(model).values():
            m.scores[torch.rand(m.scores.shape, generator=gen) < drop] = -1.0
    return export_masks(model)


def small_vit():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=48, layers=3, heads=4, mlp_ratio=2.0, output_dim=16)


def test_resnet_tensors_are_placed_in_stage_and_block():
    masks = resnet20_masks()
    dens = tensor_densities(masks)
    assert [t.name for t in dens] == network_order(masks)
    by_name = {t.name: t for t in dens}
    stem = by_name["conv1.weight"]
    assert (stem.stage, stem.block, stem.component, stem.kind) == ("stem", "stem", "conv1", "weight")
    t = by_name["layer2.1.conv2.weight"]
    assert (t.stage, t.block, t.component) == ("layer2", "layer2.1", "conv2")
    for t in dens:
        assert t.kept == int(masks[t.name].sum()) and t.total == masks[t.name].numel()
        assert 0.6 < t.density < 0.8  # 30 % of the bits were dropped at random
    assert {t.stage for t in dens} == {"stem", "layer1", "layer2", "layer3"}


def test_grouped_density_is_size_weighted_and_matches_overall():
    masks = resnet20_masks(seed=1)
    stages = grouped_density(masks, "stage")
    assert list(stages) == ["stem", "layer1", "layer2", "layer3"]
    layer3 = [n for n in masks if n.startswith("layer3.")]
    expected = sum(int(masks[n].sum()) for n in layer3) / sum(masks[n].numel() for n in layer3)
    assert stages["layer3"] == pytest.approx(expected, abs=1e-12)
    blocks = grouped_density(masks, "block")
    assert len(blocks) == 1 + 9  # stem + 3 stages x 3 blocks
    overall, _ = mask_density(masks)
    sizes = {}
    for t in tensor_densities(masks):
        sizes[t.stage] = sizes.get(t.stage, 0) + t.total
    weighted = sum(stages[s] * sizes[s] for s in stages) / sum(sizes.values())
    assert weighted == pytest.approx(overall, abs=1e-12)
    with pytest.raises(ValueError, match="level 'layer' is not known"):
        grouped_density(masks, "layer")


def test_vit_fused_qkv_is_split_into_thirds():
    vit = small_vit()
    attach_masks(vit, MaskConfig(selector="clip_attn_mlp"))
    masks = export_masks(vit)
    width = 48
    name = "transformer.resblocks.1.attn.in_proj_weight"
    assert masks[name].shape == (3 * width, width)
    masks[name][width:2 * width, : width // 2] = False  # switch off half of the key projection
    masks["transformer.resblocks.2.attn.in_proj_bias"][2 * width:] = False  # the whole value bias
    dens = {t.name: t for t in tensor_densities(masks)}
    assert dens[name + "[q]"].density == 1.0 and dens[name + "[v]"].density == 1.0
    assert dens[name + "[k]"].density == pytest.approx(0.5)
    vb = dens["transformer.resblocks.2.attn.in_proj_bias[v]"]
    assert (vb.component, vb.kind, vb.block, vb.density) == ("v_proj", "bias", "block2", 0.0)
    comps = {(t.block, t.component, t.kind) for t in dens.values()}
    for block in ("block0", "block1", "block2"):
        for comp in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
            assert (block, comp, "weight") in comps and (block, comp, "bias") in comps
    assert len(dens) == 3 * 12  # 3 blocks x 6 projections x (weight, bias)
    # no split: one entry per tensor, and the totals are the same
    whole = tensor_densities(masks, split_qkv=False)
    assert len(whole) == 3 * 8
    assert sum(t.kept for t in whole) == sum(t.kept for t in dens.values())


def test_network_order_is_natural():
    names = ["transformer.resblocks.10.mlp.c_fc.weight", "transformer.resblocks.2.mlp.c_fc.weight",
             "transformer.resblocks.1.mlp.c_fc.weight"]
    assert network_order(names) == [names[2], names[1], names[0]]


def test_mask_agreement_counts_differing_bits():
    a = resnet20_masks(seed=2)
    b = {k: v.clone() for k, v in a.items()}
    same = mask_agreement(a, b)
    assert same.identical_fraction == 1.0 and same.differing_bits == 0
    assert same.total_bits == sum(v.numel() for v in a.values())
    b["layer1.0.conv1.weight"].view(-1)[:7] ^= True
    b["layer3.2.conv2.weight"].view(-1)[-5:] ^= True
    diff = mask_agreement(a, b)
    assert diff.differing_bits == 12
    assert diff.identical_fraction == pytest.approx(1 - 12 / diff.total_bits)
    assert diff.per_tensor["layer1.0.conv1.weight"] == pytest.approx(1 - 7 / a["layer1.0.conv1.weight"].numel())
    assert diff.per_tensor["layer2.0.conv1.weight"] == 1.0
    # two independent random mask sets agree on about p^2 + (1-p)^2 of the bits
    c = resnet20_masks(seed=3)
    assert 0.5 < mask_agreement(a, c).identical_fraction < 0.65


def test_bad_masks_are_rejected_with_the_reason():
    a = resnet20_masks()
    with pytest.raises(ValueError, match="different tensors"):
        mask_agreement(a, {k: v for k, v in a.items() if k != "conv1.weight"})
    b = dict(a)
    b["conv1.weight"] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        mask_agreement(a, b)
    with pytest.raises(ValueError, match="bool mask tensor"):
        tensor_densities({"conv1.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="non-empty mapping"):
        tensor_densities({})
    with pytest.raises(ValueError, match="not divisible by 3"):
        tensor_densities({"transformer.resblocks.0.attn.in_proj_bias": torch.ones(4, dtype=torch.bool)})
