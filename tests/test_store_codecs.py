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
