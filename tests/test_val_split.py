"""The validation split carved out of train (issue 25, ``dataset.val_fraction``): stratified, seeded, disjoint
from the test split and from the train part that remains."""

from __future__ import annotations

import numpy as np
import pytest

from smn_core.data import load_dataset, split_validation, train_val_split

pytestmark = pytest.mark.unit


def test_split_is_stratified_disjoint_and_deterministic():
    labels = np.repeat(np.arange(5), [40, 60, 80, 100, 120])
    tr, va = train_val_split(labels, 0.25, seed=3)
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(labels)))
    for c, n in zip(range(5), [40, 60, 80, 100, 120]):  # every class gives its share, up to rounding
        assert abs((labels[va] == c).sum() - 0.25 * n) <= 1
    tr2, va2 = train_val_split(labels, 0.25, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    _, va_other = train_val_split(labels, 0.25, seed=4)
    assert not np.array_equal(va, va_other)


def test_validation_of_real_digits_never_touches_test():
    train = load_dataset("digits", "train", classes=[5, 6, 7, 8, 9], split_seed=0)
    test = load_dataset("digits", "test", classes=[5, 6, 7, 8, 9], split_seed=0)
    rest, val = split_validation(train, 0.2, seed=0)
    ids = [set(d.source_indices.tolist()) for d in (rest, val, test)]
    assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]
    assert len(rest) + len(val) == len(train)
    assert set(np.unique(val.targets)) == set(np.unique(train.targets))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, True, "0.2"])
def test_bad_fraction_is_one_line_error(bad):
    with pytest.raises(ValueError, match=r"dataset.val_fraction must be in \(0, 1\)"):
        train_val_split(np.arange(10) % 2, bad, seed=0)


def test_unsplittable_class_is_named():
    with pytest.raises(ValueError, match="cannot carve a stratified validation split"):
        train_val_split(np.array([0, 0, 0, 0, 1]), 0.4, seed=0)
