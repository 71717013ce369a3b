"""Tests for smn_core.evaluation (k-NN, linear probe, embeddings, low-shot sampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from smn_core.evaluation import (
    LinearProbeResult,
    compute_embeddings,
    knn_predict,
    knn_top1,
    linear_probe,
    per_class_sample,
)

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------
# independent reference: brute-force weighted k-NN in numpy (loop over queries, full sort)
# ---------------------------------------------------------------------------------------------


def knn_reference(train_x, train_y, test_x, k, T, num_classes):
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    out = []
    for q in test_x:
        q = q / np.linalg.norm(q)
        sims = np.array([float(np.dot(q, b)) for b in train_x])
        order = np.argsort(-sims, kind="stable")[: min(k, len(train_x))]
        scores = np.zeros(num_classes)
        for j in order:
            scores[train_y[j]] += np.exp(sims[j] / T)
        out.append(int(np.argmax(scores)))
    return np.array(out)


@pytest.mark.parametrize(
    "k,T,chunk",
    [(1, 0.1, 1024), (5, 0.07, 7), (20, 0.1, 3), (200, 0.1, 16), (10, 1.0, 1), (1000, 0.5, 64)],
)
def test_knn_matches_bruteforce(k, T, chunk):
    g = torch.Generator().manual_seed(k * 31 + chunk)
    N, Q, F, C = 120, 37, 16, 6
    train_x = torch.randn(N, F, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, C, (N,), generator=g)
    test_x = torch.randn(Q, F, generator=g, dtype=torch.float64)
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=T, num_classes=C, chunk_size=chunk)
    assert pred.dtype == torch.int64 and pred.shape == (Q,)
    ref = knn_reference(train_x.numpy(), train_y.numpy(), test_x.numpy(), k, T, C)
    np.testing.assert_array_equal(pred.numpy(), ref)


def test_knn_float32_matches_bruteforce_and_chunking_invariant():
    g = torch.Generator().manual_seed(0)
    N, Q, F, C = 300, 50, 32, 10
    train_x = torch.randn(N, F, generator=g)
    train_y = torch.randint(0, C, (N,), generator=g)
    test_x = torch.randn(Q, F, generator=g)
    full = knn_predict(train_x, train_y, test_x, k=20, temperature=0.07, num_classes=C, chunk_size=1024)
    for chunk in (1, 7, 49, 50, 51):
        part = knn_predict(train_x, train_y, test_x, k=20, temperature=0.07, num_classes=C, chunk_size=chunk)
        assert torch.equal(full, part)
    ref = knn_reference(train_x.numpy(), train_y.numpy(), test_x.numpy(), 20, 0.07, C)
    assert (full.numpy() == ref).mean() >= 0.98  # float32 vs float64 may flip a near-tie at most


def test_knn_k_larger_than_bank_uses_all_weighted():
    # with k >= N every train point votes; weights make the nearer class win even if outnumbered
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    train_y = torch.tensor([0, 1, 1])
    test_x = torch.tensor([[1.0, 0.05]])
    # T small: exp(~1/T) for class 0 dominates 2 * exp(~0.05/T)
    assert knn_predict(train_x, train_y, test_x, k=50, temperature=0.1).tolist() == [0]
    # T large: weights nearly equal, majority (class 1) wins
    assert knn_predict(train_x, train_y, test_x, k=50, temperature=100.0).tolist() == [1]


def test_knn_scale_invariance_and_num_classes_default():
    g = torch.Generator().manual_seed(1)
    train_x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, 4, (60,), generator=g)
    test_x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    a = knn_predict(train_x, train_y, test_x, k=7)
    b = knn_predict(train_x * 13.0, train_y, test_x * 0.01, k=7, num_classes=9)
    assert torch.equal(a, b)


def test_knn_clear_cut_accuracy_one():
    g = torch.Generator().manual_seed(2)
    C, F = 5, 32
    centres = torch.randn(C, F, generator=g) * 10
    train_y = torch.arange(C).repeat_interleave(40)
    test_y = torch.arange(C).repeat_interleave(15)
    train_x = centres[train_y] + 0.1 * torch.randn(len(train_y), F, generator=g)
    test_x = centres[test_y] + 0.1 * torch.randn(len(test_y), F, generator=g)
    acc = knn_top1(train_x, train_y, test_x, test_y, k=200, temperature=0.1, chunk_size=8)
    assert acc == 1.0
    # shuffling the test labels must destroy accuracy (the metric really compares labels)
    perm = torch.randperm(len(test_y), generator=g)
    acc_bad = knn_top1(train_x, train_y, test_x, (test_y[perm] + 1) % C, k=20)
    assert acc_bad < 0.5


def test_knn_empty_queries():
    pred = knn_predict(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.zeros(0, 3))
    assert pred.shape == (0,) and pred.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be"),
        (dict(k=-3), "k must be"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(num_classes=2), r"num_classes=2"),
    ],
)
def test_knn_bad_params(kwargs, match):
    x = torch.randn(10, 4)
    y = torch.arange(10) % 3
    with pytest.raises(ValueError, match=match):
        knn_predict(x, y, torch.randn(2, 4), **kwargs)


def test_knn_bad_shapes():
    x = torch.randn(10, 4)
    y = torch.arange(10) % 3
    with pytest.raises(ValueError, match="feature dimensions differ"):
        knn_predict(x, y, torch.randn(2, 5))
    with pytest.raises(ValueError, match="length 9"):
        knn_predict(x, y[:9], torch.randn(2, 4))
    with pytest.raises(ValueError, match="empty"):
        knn_predict(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.randn(2, 4))
    with pytest.raises(ValueError, match=">= 0"):
        knn_predict(x, y - 1, torch.randn(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        knn_predict(x[0], y, torch.randn(2, 4))
    with pytest.raises(ValueError, match="integer dtype"):
        knn_predict(x, y.float(), torch.randn(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        knn_predict(x, y, torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="test_labels has length 3"):
        knn_top1(x, y, torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        knn_top1(x, y, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split(X.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)


def test_linear_probe_digits(digits_split):
    xtr, xte, ytr, yte = digits_split
    res = linear_probe(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                       torch.from_numpy(yte))
    assert isinstance(res, LinearProbeResult)
    assert res.top1 > 0.9
    assert 0.0 <= res.top1 <= 1.0 and 0.0 <= res.train_top1 <= 1.0
    assert res.train_top1 >= res.top1 - 0.05
    assert res.C == 1.0 and 1 <= res.n_iter <= 1000
    # numpy input gives the same result; independent sklearn reference agrees
    res_np = linear_probe(xtr, ytr, xte, yte)
    assert res_np.top1 == res.top1
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(sc.transform(xtr), ytr)
    assert abs(res.top1 - float((ref.predict(sc.transform(xte)) == yte).mean())) < 1e-9


def test_linear_probe_without_standardize(digits_split):
    xtr, xte, ytr, yte = digits_split
    res = linear_probe(xtr, ytr, xte, yte, standardize=False, C=0.5, max_iter=2000)
    assert res.top1 > 0.9 and res.C == 0.5


def test_linear_probe_non_contiguous_labels(digits_split):
    xtr, xte, ytr, yte = digits_split
    base = linear_probe(xtr, ytr, xte, yte)
    # remap 0..9 to sparse, non-contiguous ids: accuracy must be unchanged
    ids = np.array([3, 17, 42, 100, 101, 7, 999, 55, 2, 64])
    res = linear_probe(xtr, ids[ytr], xte, ids[yte])
    assert abs(res.top1 - base.top1) < 1e-9
    # subset of classes missing from the train set (low-shot situation): labels {2, 5, 9} only
    keep_tr = np.isin(ytr, [2, 5, 9])
    keep_te = np.isin(yte, [2, 5, 9])
    sub = linear_probe(xtr[keep_tr], ytr[keep_tr], xte[keep_te], yte[keep_te])
    assert sub.top1 > 0.95  # would be ~0 if predicted column indices (0..2) were compared to labels
    # test labels unseen in training count as errors, not crashes
    mixed = linear_probe(xtr[keep_tr], ytr[keep_tr], xte, yte)
    assert mixed.top1 <= keep_te.mean() + 1e-9


def test_linear_probe_errors(digits_split):
    xtr, xte, ytr, yte = digits_split
    with pytest.raises(ValueError, match="C must be"):
        linear_probe(xtr, ytr, xte, yte, C=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        linear_probe(xtr, ytr, xte, yte, max_iter=0)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        linear_probe(xtr, ytr, xte[:, :10], yte)
    with pytest.raises(ValueError, match="train_labels has length"):
        linear_probe(xtr, ytr[:-1], xte, yte)
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        linear_probe(xtr, np.zeros_like(ytr), xte, yte)
    with pytest.raises(ValueError, match="integer dtype"):
        linear_probe(xtr, ytr.astype(float), xte, yte)
    with pytest.raises(ValueError, match="empty"):
        linear_probe(xtr, ytr, xte[:0], yte[:0])
    with pytest.raises(ValueError, match="torch.Tensor or numpy.ndarray"):
        linear_probe(xtr.tolist(), ytr, xte, yte)


def test_linear_probe_cross_validates_C_on_the_train_split_only(digits_split):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte, ytr, yte = digits_split
    xtr, ytr = xtr[:400], ytr[:400]
    grid = [0.001, 0.01, 1.0, 100.0]
    res = linear_probe(xtr, ytr, xte, yte, C_grid=grid, cv_folds=3, seed=1)
    # independent reference: sklearn's own cross-validation with the same folds, scaler inside each fold
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=1)
    means = [cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)),
                             xtr, ytr, cv=folds).mean() for c in grid]
    assert res.C == grid[int(np.argmax(means))]
    assert res.C != 0.001  # C = 0.001 underfits 64 standardised pixel features (about 0.8 in CV)
    fixed = linear_probe(xtr, ytr, xte, yte, C=res.C)
    assert res.top1 == fixed.top1  # refit on every train row with the chosen C
    # the test split plays no part in the choice: scrambled test labels leave C unchanged
    scrambled = linear_probe(xtr, ytr, xte, np.random.default_rng(0).permutation(yte), C_grid=grid,
                             cv_folds=3, seed=1)
    assert scrambled.C == res.C


def test_linear_probe_C_grid_falls_back_to_C_when_a_class_has_one_row(digits_split):
    xtr, xte, ytr, yte = digits_split
    keep = np.concatenate([np.flatnonzero(ytr == 0)[:1], np.flatnonzero(ytr == 1)[:20], np.flatnonzero(ytr == 2)[:20]])
    res = linear_probe(xtr[keep], ytr[keep], xte, yte, C=0.7, C_grid=[0.01, 100.0])
    assert res.C == 0.7


@pytest.mark.parametrize("kw, match", [
    ({"C_grid": []}, "C_grid must be a non-empty list"),
    ({"C_grid": [1.0, -1.0]}, r"C_grid must be .*-1\.0"),
    ({"C_grid": [1.0, float("nan")]}, "C_grid must be"),
    ({"C_grid": [1.0], "cv_folds": 1}, "cv_folds must be an integer >= 2, got 1"),
])
def test_linear_probe_C_grid_errors(digits_split, kw, match):
    xtr, xte, ytr, yte = digits_split
    with pytest.raises(ValueError, match=match):
        linear_probe(xtr, ytr, xte, yte, **kw)



def test_linear_probe_reproduces_the_results_of_the_unsplit_function():
    # linear_probe was split into checks, array conversion and the fit; these results were computed with
    # the single function at commit d267b6c (main) on the same seeded features
    g = np.random.default_rng(3)
    xtr, ytr = g.normal(size=(60, 5)), np.arange(60) % 3
    xte, yte = g.normal(size=(30, 5)), np.arange(30) % 3
    xtr[:, 0] += ytr
    xte[:, 0] += yte
    one_row = ytr.copy()
    one_row[0] = 7  # a class with a single train row: no fold can hold it out, the fixed C is fitted
    cases = {  # kwargs -> (top1, train_top1, C, n_iter)
        "fixed": ({}, ytr, (0.4666666666666667, 0.6666666666666666, 1.0, 7)),
        "grid": ({"C_grid": [0.01, 0.1, 1.0, 10.0], "cv_folds": 3}, ytr,
                 (0.4666666666666667, 0.6833333333333333, 10.0, 10)),
        "raw": ({"standardize": False, "C": 100.0}, ytr, (0.4666666666666667, 0.6833333333333333, 100.0, 13)),
        "grid, a class of one": ({"C_grid": [0.5, 2.0]}, one_row, (0.4666666666666667, 0.7, 1.0, 14)),
    }
    for name, (kw, labels, expected) in cases.items():
        res = linear_probe(xtr, labels, xte, yte, **kw)
        assert (res.top1, res.train_top1, res.C) == pytest.approx(expected[:3]), name
        assert abs(res.n_iter - expected[3]) <= 2, name  # lbfgs iteration counts may shift with the BLAS

# ---------------------------------------------------------------------------------------------
# per-class sampling
# ---------------------------------------------------------------------------------------------


def test_per_class_sample_keeps_every_class():
    rng = np.random.default_rng(0)
    # imbalanced: class 7 has 3 examples, class 0 has 1000
    labels = np.concatenate([np.full(1000, 0), np.full(3, 7), np.full(250, 2), np.full(40, 11)])
    rng.shuffle(labels)
    for frac in (0.000625, 0.01, 0.1, 0.5):
        idx = per_class_sample(labels, frac, seed=42)
        assert idx.dtype == np.int64
        assert np.array_equal(idx, np.unique(idx))  # sorted, no duplicates
        assert set(labels[idx]) == {0, 2, 7, 11}
        for c in (0, 2, 7, 11):
            n_c = int((labels == c).sum())
            assert int((labels[idx] == c).sum()) == max(1, round(frac * n_c))


def test_per_class_sample_full_and_deterministic():
    labels = torch.arange(100) % 5
    assert np.array_equal(per_class_sample(labels, 1.0), np.arange(100))
    a = per_class_sample(labels, 0.3, seed=3)
    b = per_class_sample(labels.numpy(), 0.3, seed=3)
    assert np.array_equal(a, b) and len(a) == 30
    seeds = {tuple(per_class_sample(labels, 0.3, seed=s)) for s in range(5)}
    assert len(seeds) > 1  # different seeds give different subsets


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.5, float("nan")])
def test_per_class_sample_bad_fraction(frac):
    with pytest.raises(ValueError, match="fraction"):
        per_class_sample(np.arange(10) % 2, frac)


def test_per_class_sample_bad_labels():
    with pytest.raises(ValueError, match="empty"):
        per_class_sample(np.zeros(0, dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        per_class_sample(np.zeros((3, 2), dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match="integer dtype"):
        per_class_sample(np.zeros(4), 0.5)


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------


class _TinyDataset(Dataset):
    def __init__(self, n=23, extra=True):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 4, 4, generator=g) * 3 + 1
        self.y = torch.arange(n) % 4
        self.extra = extra

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.extra:
            return self.x[i], int(self.y[i]), f"path_{i}.png", None
        return self.x[i], self.y[i]


def _tiny_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 6))
    # give BatchNorm non-trivial running statistics so train/eval outputs differ
    m.train()
    with torch.no_grad():
        for _ in range(5):
            m(torch.randn(32, 3, 4, 4) * 2 + 3)
    return m


@pytest.mark.parametrize("start_training", [True, False])
def test_compute_embeddings_eval_mode_and_restore(start_training):
    model = _tiny_model()
    model.train(start_training)
    model[4].eval()  # a mixed per-submodule state must be restored exactly
    before = {n: m.training for n, m in model.named_modules()}
    ds = _TinyDataset()
    running_mean = model[2].running_mean.clone()
    feats, labels = compute_embeddings(model, ds, batch_size=5)
    assert {n: m.training for n, m in model.named_modules()} == before
    assert torch.equal(model[2].running_mean, running_mean)  # BN stats untouched
    assert feats.shape == (23, 6) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert labels.shape == (23,) and labels.dtype == torch.int64
    assert torch.equal(labels, ds.y)
    model.eval()
    with torch.no_grad():
        expected = model(ds.x)
    torch.testing.assert_close(feats, expected)
    model.train()
    with torch.no_grad():
        train_out = model(ds.x)
    assert not torch.allclose(feats, train_out)  # eval mode genuinely mattered


def test_compute_embeddings_normalize_and_plain_items():
    model = _tiny_model()
    ds = _TinyDataset(n=9, extra=False)
    feats, labels = compute_embeddings(model, ds, batch_size=4, normalize=True)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(9))
    raw, _ = compute_embeddings(model, ds, batch_size=256)
    torch.testing.assert_close(feats, raw / raw.norm(dim=1, keepdim=True))
    assert labels.tolist() == ds.y.tolist()


def test_compute_embeddings_restores_mode_on_error():
    class Bad(nn.Module):
        def forward(self, x):
            return x  # 4-D output is not (B, F)

    m = Bad().train()
    with pytest.raises(ValueError, match=r"shape \(B, F\)"):
        compute_embeddings(m, _TinyDataset(n=3), batch_size=2)
    assert m.training


def test_compute_embeddings_bad_args():
    with pytest.raises(ValueError, match="batch_size"):
        compute_embeddings(_tiny_model(), _TinyDataset(), batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        compute_embeddings(_tiny_model(), _TinyDataset(), num_workers=-1)


def test_embeddings_feed_knn_end_to_end():
    model = _tiny_model()
    ds = _TinyDataset(n=40)
    feats, labels = compute_embeddings(model, ds, batch_size=16)
    # a query identical to a bank item with k=1 must recover that item's label
    pred = knn_predict(feats, labels, feats, k=1)
    assert torch.equal(pred, labels)


def test_compute_embeddings_with_worker_processes():
    model = _tiny_model()
    ds = _TinyDataset(n=11)
    a, la = compute_embeddings(model, ds, batch_size=4, num_workers=1)
    b, lb = compute_embeddings(model, ds, batch_size=4, num_workers=0)
    assert torch.equal(a, b) and torch.equal(la, lb)
