"""The codecs a serving store decodes on a cold task switch (issue 29): ``smn-ctx``'s cached weight contexts
never stand in for other weights, and ``zstd`` (the fast one) round-trips masks at a learned mask's density."""

from __future__ import annotations

import numpy as np
import pytest

from smn_core import mask_codecs
from smn_core.mask_codecs import CodecError, get_codec

pytestmark = pytest.mark.unit

SHAPES = [(16, 8, 3, 3), (32, 16, 3, 3), (10, 64), (13,)]


def _masks_and_weights(seed: int, density: float = 0.97):
    """Masks whose zeros sit on small |W| (as learned masks' do), so the weight context carries information."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    masks = [np.abs(w) + 0.3 * rng.random(s) > np.quantile(np.abs(w), 1 - density) for w, s in zip(weights, SHAPES)]
    return masks, weights


def test_cached_weight_contexts_equal_fresh_ones_and_never_serve_other_weights():
    codec = get_codec("smn-ctx")
    masks, w_a = _masks_and_weights(0)
    _, w_b = _masks_and_weights(1)  # other weights, the same shapes
    payload = codec.encode(masks, w_a)
    mask_codecs._CONTEXT_CACHE.clear()
    first = codec.decode(payload, SHAPES, w_a)  # contexts computed
    again = codec.decode(payload, SHAPES, [w.copy() for w in w_a])  # equal bytes elsewhere in memory: cached
    assert all(np.array_equal(m, x) and np.array_equal(m, y) for m, x, y in zip(masks, first, again))
    w = np.asarray(w_a[1], dtype=np.float32)
    mag = np.abs(w.reshape(-1, 9))
    fresh = np.searchsorted(np.quantile(mag, np.linspace(0, 1, 9)[1:-1]), mag) * 2 + (w.reshape(-1, 9) > 0)
    assert np.array_equal(mask_codecs._weight_context(w_a[1], 512, 9).astype(np.int64), fresh)
    try:  # B's contexts are computed for B, not taken from A's cache entry of the same shape
        wrong = codec.decode(payload, SHAPES, w_b)
    except CodecError:
        wrong = None
    assert wrong is None or not all(np.array_equal(m, x) for m, x in zip(masks, wrong))
    assert all(np.array_equal(m, x) for m, x in zip(masks, codec.decode(payload, SHAPES, w_a)))


def test_zstd_round_trips_dense_masks_far_below_one_bit_per_weight():
    masks, _ = _masks_and_weights(2, density=0.98)
    codec = get_codec("zstd")
    payload = codec.encode(masks)
    assert all(np.array_equal(m, x) for m, x in zip(masks, codec.decode(payload, SHAPES)))
    n = sum(m.size for m in masks)
    assert 8 * len(payload) / n < 0.35  # H(0.02) = 0.14 bits; 1 bit/weight uncompressed
    with pytest.raises(CodecError, match="zstd"):
        codec.decode(payload[:-3], SHAPES)


@pytest.mark.parametrize("codec", ["zstd", "none", "smn-ctx"])
def test_decode_packed_gives_each_mask_packed_alone_on_and_off_byte_boundaries(codec):
    masks, weights = _masks_and_weights(3, density=0.9)
    c = get_codec(codec)
    for order in (range(len(SHAPES)), [3, 0, 1, 2]):  # (13,) last: byte-aligned views; in front: the repacking path
        ms, ws, shapes = [masks[i] for i in order], [weights[i] for i in order], [SHAPES[i] for i in order]
        payload = c.encode(ms, ws if codec == "smn-ctx" else None)
        packed = c.decode_packed(payload, shapes, ws if codec == "smn-ctx" else None)
        assert [p.dtype for p in packed] == [np.uint8] * len(ms)
        assert all(np.array_equal(p, np.packbits(m.reshape(-1))) for p, m in zip(packed, ms))
    with pytest.raises(CodecError, match="need"):
        mask_codecs.split_packed(mask_codecs.pack_bits(masks)[:-1], SHAPES)


def test_mask_alpha_is_bit_for_bit_the_alpha_of_the_applied_mask():
    """alpha from the file's counts (no unpacking) equals ``sqrt(clamp(mean(M), 1/n))`` computed on the mask, as
    ``apply_task_mask`` does, for empty, full and every kind of mask in between."""
    import torch

    from smn_core.mask_file import mask_alpha, mask_alphas

    rng = np.random.default_rng(0)
    cases = []
    for n in (1, 7, 432, 2304, 36864, 147456):
        for ones in {0, 1, n // 3, n - 1, n, *rng.integers(0, n + 1, 6).tolist()}:
            m = torch.zeros(n, dtype=torch.float32)
            m[:ones] = 1.0
            want = torch.sqrt(torch.clamp(m.mean(), min=1.0 / n))
            got = mask_alpha(int(ones), n)
            assert got.dtype == torch.float32 and got.view(torch.int32) == want.view(torch.int32), (n, ones)
            cases.append((int(ones), n))
    alphas = mask_alphas([k for k, _ in cases], [n for _, n in cases])  # the vectorised form a replica uses
    assert alphas.view(torch.int32).tolist() == [mask_alpha(k, n).view(torch.int32).item() for k, n in cases]
    with pytest.raises(ValueError, match="cannot keep 5"):
        mask_alpha(5, 4)


def test_checksum_text_is_the_json_of_name_dtype_shape():
    """The checksum builds ``json.dumps([name, dtype, shape])`` by hand (speed): equal for odd names, 0-d arrays."""
    import hashlib
    import json

    from smn_core.mask_file import _checksum

    tensors = {'buffer.a"b\\c': np.arange(3, dtype=np.float32), "head.é": np.zeros((2, 0, 4), dtype=np.int64),
               "payload": np.frombuffer(b"\x01\x02", dtype=np.uint8), "s": np.array(2.5)}
    meta = {"format": "smn-mask/1", "checksum": "x"}
    h = hashlib.sha256(json.dumps({"format": "smn-mask/1"}, sort_keys=True).encode())
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    assert _checksum(meta, tensors) == h.hexdigest()
