"""Mask codecs (paper App. C): lossless round trips on real learned masks, sizes against the entropy
bound, fp32 weights, and clear refusals of bad payloads and bad names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smn_core.mask_codecs import (
    LIBRARY_CODECS,
    CodecError,
    available_codecs,
    binary_entropy,
    get_codec,
    measure_byte_codec,
    measure_mask_codec,
    order0_entropy_bits,
    pack_bits,
    unpack_bits,
)
from tests.conftest import shared_path

# tiers per test: the slow ones run in the ray tier's process, so that `pytest -m unit` stays fast

CIFAR_CKPT = ("weights", "resnet_cifar10", "resnet20-12fca82f.th")


@pytest.fixture(scope="module")
def learned():
    """Real learned masks: one supervised-masking step of the real CIFAR-10 ResNet-20 on 64 real CIFAR-10
    images (score lr 2000 so bits flip), plus the frozen backbone weights of the masked tensors."""
    from smn_core.backbones import build_backbone
    from smn_core.pipeline import run_cell
    from smn_core.config import BackboneSpec, CellConfig, DataSpec
    from smn_core.training import TrainConfig

    ckpt = shared_path(*CIFAR_CKPT)
    data = shared_path("data", "cifar10")
    cfg = CellConfig(method="supervised_mask", backbone=BackboneSpec("cifar_resnet20", "checkpoint", str(ckpt)),
                     dataset=DataSpec(source="parquet", root=str(data), max_train_samples=64, max_test_samples=10),
                     train=TrainConfig(epochs=1, batch_size=64, score_lr=2000.0, schedule="constant", bn_mode="frozen"))
    out = run_cell(cfg, evaluate=False)
    weights = dict(build_backbone("cifar_resnet20", "checkpoint", checkpoint=str(ckpt)).model.named_parameters())
    names = list(out.masks)
    masks = [out.masks[n].numpy() for n in names]
    return masks, [weights[n].detach().numpy() for n in names]


@pytest.mark.unit
def test_pack_bits_round_trip_odd_sizes():
    rng = np.random.default_rng(0)
    masks = [rng.random(s) < 0.7 for s in [(3, 5), (7,), (2, 3, 3, 3), (1,)]]
    data = pack_bits(masks)
    assert len(data) == (15 + 7 + 54 + 1 + 7) // 8
    back = unpack_bits(data, [m.shape for m in masks])
    assert all(np.array_equal(a, b) for a, b in zip(masks, back))
    with pytest.raises(CodecError, match="77 weights need 10 bytes, got 9"):
        unpack_bits(data[:-1], [m.shape for m in masks])
    with pytest.raises(ValueError, match="only 0/1"):
        pack_bits([np.array([0, 2, 1])])


@pytest.mark.unit
def test_binary_entropy_and_order0_bound():
    assert binary_entropy(0.5) == pytest.approx(1.0)
    assert binary_entropy(0.0) == 0.0 and binary_entropy(1.0) == 0.0
    assert binary_entropy(0.1) == pytest.approx(binary_entropy(0.9))
    assert binary_entropy(0.1) == pytest.approx(0.4689955935892812)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        binary_entropy(1.5)
    masks = [np.array([1, 1, 1, 0], bool), np.array([1, 1, 1, 1], bool)]
    assert order0_entropy_bits(masks) == pytest.approx(8 * binary_entropy(7 / 8))
    assert order0_entropy_bits(masks, per_tensor=True) == pytest.approx(4 * binary_entropy(0.75))
    with pytest.raises(ValueError, match="no mask weights"):
        order0_entropy_bits([np.zeros(0, bool)])


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_every_codec_round_trips_real_learned_masks(learned):
    masks, weights = learned
    n = sum(m.size for m in masks)
    density = sum(int(m.sum()) for m in masks) / n
    assert 0.5 < density < 1.0, "the training step must have flipped bits"
    sizes = {}
    for name in available_codecs():
        m = measure_mask_codec(name, masks, weights if name == "smn-ctx" else None, repeats=1)  # checks round trip
        sizes[name] = m.compressed_bytes
    assert sizes["none"] == (n + 7) // 8
    for name in LIBRARY_CODECS:
        assert sizes[name] < sizes["none"], f"{name} should shrink masks at density {density:.3f}"
    # our codec codes under the order-0 bound H(density_t) per tensor (it models kernels and the weights)
    bound_bytes = order0_entropy_bits(masks, per_tensor=True) / 8
    assert sizes["smn-ctx"] < bound_bytes, (sizes, bound_bytes)
    assert sizes["smn-ctx"] < min(sizes[c] for c in LIBRARY_CODECS)
    # without the weights it still round-trips and still beats bit packing
    m = measure_mask_codec("smn-ctx", masks, None, repeats=1)
    assert m.compressed_bytes < sizes["none"]


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_smn_ctx_needs_the_weights_it_was_coded_with(learned):
    masks, weights = learned
    codec = get_codec("smn-ctx")
    payload = codec.encode(masks, weights)
    assert codec.uses_weights(payload)
    with pytest.raises(ValueError, match="pass the backbone's weights"):
        codec.decode(payload, [m.shape for m in masks], None)
    with pytest.raises(ValueError, match="shape"):
        codec.decode(payload, [m.shape for m in masks], [w.reshape(-1) for w in weights])


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_truncated_payloads_are_refused(learned):
    masks, weights = learned
    shapes = [m.shape for m in masks]
    for name in available_codecs():
        codec = get_codec(name)
        ctx = weights if name == "smn-ctx" else None
        payload = codec.encode(masks, ctx)
        with pytest.raises(CodecError):
            codec.decode(payload[: len(payload) // 2], shapes, ctx)
    with pytest.raises(CodecError, match="holds 20 masks|holds"):
        get_codec("smn-ctx").decode(get_codec("smn-ctx").encode(masks, weights), shapes[:-1], weights[:-1])


@pytest.mark.unit
def test_fp32_weights_barely_compress_and_masks_codec_is_refused():
    from smn_core.backbones import load_checkpoint_state_dict

    state = load_checkpoint_state_dict(shared_path(*CIFAR_CKPT))
    weights = [v.numpy() for k, v in state.items() if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    n = sum(w.size for w in weights)
    for name in ("none", "gzip", "lz4", "zstd"):
        m = measure_byte_codec(name, weights, repeats=1)
        assert m.raw_bytes == 4 * n
        assert m.reduction_pct < 20.0, f"{name}: real fp32 weights are close to incompressible"
    assert measure_byte_codec("none", weights, repeats=1).reduction_pct == 0.0
    with pytest.raises(ValueError, match="codes masks only"):
        measure_byte_codec("smn-ctx", weights)


@pytest.mark.unit
def test_codecs_are_registered_by_decorator_in_the_documented_order():
    from smn_core.mask_codecs import ContextMaskCodec, register_codec

    assert available_codecs() == ["none", *LIBRARY_CODECS, "smn-ctx"]
    assert get_codec("gzip") is get_codec("gzip")  # built once, on first use
    assert type(get_codec("smn-ctx")) is ContextMaskCodec
    with pytest.raises(ValueError, match="codec 'gzip' is already registered"):
        register_codec("gzip")


@pytest.mark.unit
def test_unknown_codec_names_the_allowed_ones():
    with pytest.raises(ValueError, match="codec 'brotli' is not known; allowed: none, gzip, bz2, lzma, lz4, snappy, zstd, smn-ctx"):
        get_codec("brotli")


@pytest.mark.unit
def test_masks_must_be_binary():
    with pytest.raises(ValueError, match="only 0/1"):
        get_codec("gzip").encode([torch.tensor([0.0, 0.5]).numpy()])
