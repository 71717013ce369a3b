"""Evaluation of frozen embeddings: weighted k-NN and linear probe (paper Sec. 4.1).

Plain PyTorch + scikit-learn (never imports ray).

* :func:`compute_embeddings` runs a model over a dataset in eval mode and collects features.
* :func:`knn_predict` / :func:`knn_top1` implement the weighted k-NN classifier of DINO
  (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021,
  ``eval_knn.py``): L2-normalised features, cosine similarity, top-k neighbours weighted by
  ``exp(sim / T)``, votes summed per class. The paper (Sec. 4.1) uses k = 200, T = 0.1; DINO
  itself recommends k = 20, T = 0.07.
* :func:`linear_probe` fits a multinomial logistic regression (scikit-learn, lbfgs) on train
  embeddings and reports test top-1 accuracy.
* :func:`per_class_sample` draws the stratified label subsets of the low-shot experiments
  (paper Fig. 3), never dropping a class (the reference code sampled uniformly, which can);
  :func:`lowshot_linear_probe` fits one linear probe per label fraction on such subsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = [
    "compute_embeddings",
    "knn_predict",
    "knn_top1",
    "knn_correct",
    "LinearProbeResult",
    "linear_probe",
    "probe_head_arrays",
    "per_class_sample",
    "lowshot_linear_probe",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _check_pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_features(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, num_features), got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_labels(name: str, y: Tensor, n: int) -> Tensor:
    if not isinstance(y, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (num_samples,), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {y.dtype}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has length {y.shape[0]} but the matching features have {n} rows")
    return y.long()


def _check_labelled(split: str, features: Tensor, labels: Tensor, empty: str) -> Tensor:
    """Check ``<split>_features`` (2-D, float, finite, at least one row: else ``empty`` says why it is needed)
    and ``<split>_labels`` (1-D integers, one per row); return the labels as int64."""
    _check_features(f"{split}_features", features)
    if features.shape[0] == 0:
        raise ValueError(f"{split}_features is empty (0 rows): {empty}")
    return _check_labels(f"{split}_labels", labels, features.shape[0])


def _to_numpy(name: str, x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------


def _collate_image_label(batch: Sequence[Sequence[Any]]) -> tuple[Tensor, Tensor]:
    """Collate ``(image, label, ...)`` items into ``(images (B,3,H,W), labels (B,) int64)``."""
    images = []
    labels = []
    for i, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(
                f"dataset items must be tuples (image, label, ...); item {i} of the batch is "
                f"{type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            )
        img, lab = item[0], item[1]
        if not isinstance(img, Tensor):
            raise ValueError(f"dataset images must be torch.Tensor, got {type(img).__name__}")
        images.append(img)
        labels.append(int(lab))
    return torch.stack(images, 0), torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def compute_embeddings(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Embed every item of ``dataset`` with ``model`` (no gradients, eval mode, fixed order).

    Args:
        model: module mapping images ``(B, 3, H, W)`` float to features ``(B, F)`` float. It is
            put in ``eval()`` mode for the pass (BatchNorm uses running statistics, dropout off)
            and its previous ``training`` flags (per submodule) are restored afterwards, also
            when the pass raises. The model is not moved: it must already live on ``device``.
        dataset: map-style dataset whose items are ``(image, label, ...)`` with ``image`` a
            ``(3, H, W)`` float tensor and ``label`` an int (or 0-d integer tensor); extra tuple
            elements are ignored. Iterated in order (no shuffling).
        batch_size: images per forward pass, >= 1.
        device: device the batches are moved to.
        num_workers: DataLoader worker processes, >= 0.
        normalize: if True, L2-normalise each feature row (``torch.nn.functional.normalize``,
            eps 1e-12).

    Returns:
        ``(features, labels)``: ``features`` ``(N, F)`` float32 on CPU, ``labels`` ``(N,)``
        int64 on CPU, ``N = len(dataset)`` (N may be 0, then features are ``(0, 0)``).

    Raises:
        ValueError: ``batch_size < 1``, ``num_workers < 0``, items that are not
            ``(image, label, ...)`` tuples, or a model output that is not a 2-D tensor with one
            row per image.

    Source: standard frozen-feature evaluation protocol (DINO, Caron et al. 2021; paper Sec. 4.1:
    unaugmented train / test splits are embedded once).
    """
    batch_size = _check_pos_int("batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    device = torch.device(device)

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=int(num_workers),
        collate_fn=_collate_image_label,
    )
    modes = {name: m.training for name, m in model.named_modules()}
    feats: list[Tensor] = []
    labs: list[Tensor] = []
    try:
        model.eval()
        for images, labels in loader:
            out = model(images.to(device, non_blocking=True))
            if not isinstance(out, Tensor):
                raise ValueError(
                    f"model output must be a torch.Tensor of shape (B, F), got {type(out).__name__}"
                )
            if out.ndim != 2 or out.shape[0] != images.shape[0]:
                raise ValueError(
                    f"model output must have shape (B, F) with B = {images.shape[0]}, "
                    f"got {tuple(out.shape)}"
                )
            out = out.float()
            if normalize:
                out = torch.nn.functional.normalize(out, dim=1)
            feats.append(out.cpu())
            labs.append(labels)
    finally:
        for name, m in model.named_modules():
            if name in modes:
                m.training = modes[name]
    if not feats:
        return torch.zeros(0, 0, dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats, 0).contiguous(), torch.cat(labs, 0)


# ---------------------------------------------------------------------------------------------
# k-NN
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted k-NN class predictions (DINO protocol).

    Both feature sets are L2-normalised inside; for each query the ``k`` train rows with the
    highest cosine similarity ``s`` are taken (``k`` clipped to ``N``), each votes for its label
    with weight ``exp(s / temperature)``, and the class with the largest summed weight wins
    (ties go to the smallest class index). Queries are processed ``chunk_size`` at a time, so
    peak extra memory is O(chunk_size * N).

    Args:
        train_features: ``(N, F)`` floating-point bank (the unaugmented train split), N >= 1.
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(Q, F)`` floating-point queries, same F and device as the bank.
            Q may be 0.
        k: neighbours per query, integer >= 1 (paper: 200; DINO: 20). Values above N use N.
        temperature: T > 0 (finite) in ``exp(sim / T)`` (paper: 0.1; DINO: 0.07).
        num_classes: number of classes C; default ``max(train_labels) + 1``.
        chunk_size: queries per chunk, integer >= 1.

    Returns:
        ``(Q,)`` int64 predicted class indices, on the device of ``test_features``. float64
        inputs are computed in float64, everything else in float32.

    Raises:
        ValueError: k < 1, temperature <= 0 or not finite, chunk_size < 1, non-2-D features,
            feature dimensions that differ, label length != N, empty bank (N = 0), non-integer
            labels, labels outside ``[0, num_classes)``, num_classes < 1, non-finite features.

    Source: Caron et al. 2021 (DINO), ``eval_knn.py::knn_classifier``; paper Sec. 4.1.
    """
    k = _check_pos_int("k", k)
    chunk_size = _check_pos_int("chunk_size", chunk_size)
    if not _is_positive_number(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    temperature = float(temperature)

    train_labels = _check_labelled("train", train_features, train_labels, "the k-NN bank needs at least one example")
    _check_features("test_features", test_features)
    n = train_features.shape[0]
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature dimensions differ: train_features has {train_features.shape[1]} columns, "
            f"test_features has {test_features.shape[1]}"
        )
    lo, hi = int(train_labels.min()), int(train_labels.max())
    if lo < 0:
        raise ValueError(f"train_labels must be >= 0, got minimum {lo}")
    if num_classes is None:
        num_classes = hi + 1
    else:
        num_classes = _check_pos_int("num_classes", num_classes)
        if hi >= num_classes:
            raise ValueError(
                f"train_labels must lie in [0, num_classes={num_classes}), got maximum {hi}"
            )

    dtype = torch.float64 if (train_features.dtype == torch.float64 and test_features.dtype == torch.float64) else torch.float32
    device = test_features.device
    bank = torch.nn.functional.normalize(train_features.to(device=device, dtype=dtype), dim=1)
    bank_t = bank.t().contiguous()  # (F, N)
    labels = train_labels.to(device)
    kk = min(k, n)

    q = test_features.shape[0]
    preds = torch.empty(q, dtype=torch.int64, device=device)
    for start in range(0, q, chunk_size):
        x = torch.nn.functional.normalize(test_features[start : start + chunk_size].to(dtype), dim=1)
        sim = x @ bank_t  # (B, N) cosine similarities
        top_sim, top_idx = sim.topk(kk, dim=1, largest=True, sorted=True)  # (B, kk)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(x.shape[0], num_classes, dtype=dtype, device=device)
        votes.scatter_add_(1, labels[top_idx], weights)
        preds[start : start + x.shape[0]] = votes.argmax(dim=1)
    return preds


def knn_correct(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    **kw: Any,
) -> np.ndarray:
    """Per-query correctness of :func:`knn_predict`: ``(Q,)`` bool, True where the prediction equals the label
    (what a paired comparison of two models over the same test images needs; its mean is :func:`knn_top1`).

    Args and Raises: as :func:`knn_top1`.
    """
    test_labels = _check_labelled("test", test_features, test_labels, "accuracy needs at least one query")
    preds = knn_predict(train_features, train_labels, test_features, **kw)
    return (preds.cpu() == test_labels.cpu()).numpy().astype(bool)


def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    **kw: Any,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on labelled queries.

    Args:
        train_features, train_labels, test_features: as in :func:`knn_predict`.
        test_labels: ``(Q,)`` integer true labels of the queries, Q >= 1.
        **kw: forwarded to :func:`knn_predict` (``k``, ``temperature``, ``num_classes``,
            ``chunk_size``).

    Returns:
        Fraction of queries whose prediction equals the label, a float in [0, 1]
        (the mean of :func:`knn_correct`).

    Raises:
        ValueError: everything :func:`knn_predict` raises, plus an empty query set or
            ``len(test_labels) != len(test_features)``.

    Source: Caron et al. 2021 (DINO) k-NN protocol; paper Sec. 4.1 (k = 200, T = 0.1).
    """
    return float(knn_correct(train_features, train_labels, test_features, test_labels, **kw).astype(np.float64).mean())


# ---------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        top1: test accuracy in [0, 1].
        train_top1: accuracy on the training embeddings in [0, 1].
        C: inverse L2-regularisation strength used (sklearn ``C``).
        n_iter: lbfgs iterations run (== max_iter when it did not converge).
        correct: ``(Q,)`` bool, per test row: the prediction equals the label (``top1`` is its mean).
        head: the fitted probe as arrays (:func:`probe_head_arrays`): ``weight`` ``(C, F)``, ``bias`` ``(C,)``,
            the standardisation ``mean`` / ``scale`` ``(F,)`` (0 / 1 without it) and ``labels`` ``(C,)``, the
            label value of each output; ``logits = ((x - mean) / scale) @ weight.T + bias``.
    """

    top1: float
    train_top1: float
    C: float
    n_iter: int
    correct: np.ndarray | None = None
    head: dict[str, np.ndarray] | None = None


def linear_probe(
    train_features: Tensor | np.ndarray,
    train_labels: Tensor | np.ndarray,
    test_features: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    standardize: bool = True,
    seed: int = 0,
    C_grid: Sequence[float] | None = None,
    cv_folds: int = 5,
) -> LinearProbeResult:
    """Multinomial logistic-regression probe on frozen embeddings.

    Fits ``sklearn.linear_model.LogisticRegression(solver="lbfgs", C=C)`` (multinomial
    softmax for 3+ classes, the equivalent binary model for 2) on the train embeddings, preceded
    by a ``StandardScaler`` fit on the train rows only when ``standardize``, both in one sklearn
    ``Pipeline``. Accuracy compares predicted label *values* with the true labels, so labels
    need not be ``0..C-1`` contiguous (e.g. low-shot subsets); a test label never seen in
    training simply counts as an error.

    With ``C_grid``, C is chosen per feature set instead of fixed: ``sklearn``'s ``GridSearchCV``
    scores each value by stratified ``min(cv_folds, smallest class)``-fold cross-validation on the
    *train* rows only (the scaler is refit inside each fold), keeps the best (ties: the first in
    grid order), and refits on every train row; the test split is never seen. Different feature sets
    want different regularisation (a self-masked backbone's features are more clustered than the
    frozen ones), so one fixed C can favour one of two compared backbones. When some class has a
    single train row no fold can hold it out, and the fixed ``C`` is used (``C`` in the result says
    which value was fitted).

    Args:
        train_features: ``(N, F)`` float, torch tensor or numpy array, N >= 2.
        train_labels: ``(N,)`` integer labels (any integer values), at least 2 distinct.
        test_features: ``(Q, F)`` float, same F, Q >= 1.
        test_labels: ``(Q,)`` integer labels.
        C: inverse regularisation strength, finite > 0 (reference code: cyanure with
            lambda = 0.01 / N, i.e. much weaker regularisation).
        max_iter: lbfgs iteration cap, >= 1 (a ``ConvergenceWarning`` is emitted when hit).
        standardize: standardise features with train mean / std before the regression.
        seed: ``random_state`` of the regression (lbfgs is deterministic) and of the fold shuffle.
        C_grid: candidate C values (each finite > 0, non-empty) to choose from by cross-validation;
            None: fit ``C``.
        cv_folds: most folds of that cross-validation, >= 2.

    Returns:
        :class:`LinearProbeResult` with test ``top1`` and ``train_top1`` in [0, 1], ``C`` (the value
        fitted: chosen from ``C_grid`` or the fixed one) and the number of iterations run.

    Raises:
        ValueError: non-2-D features, differing feature dimensions, label / feature length
            mismatch, empty train or test set, fewer than 2 train classes, non-integer labels,
            non-finite features, C <= 0, max_iter < 1, an empty ``C_grid`` or one with a value
            that is not finite > 0, cv_folds < 2.

    Source: linear evaluation of frozen features (paper Sec. 4.1; DINO, Caron et al. 2021).
    """
    max_iter, grid = _check_probe_settings(C, max_iter, C_grid, cv_folds)
    xtr, ytr, xte, yte = _probe_arrays(train_features, train_labels, test_features, test_labels)
    xtr = xtr.astype(np.float64 if xtr.dtype == np.float64 else np.float32, copy=False)
    xte = xte.astype(xtr.dtype, copy=False)
    pipe = _fit_probe(xtr, ytr, C=float(C), max_iter=max_iter, standardize=standardize, seed=seed, grid=grid,
                      cv_folds=cv_folds)
    clf = pipe[-1]
    train_top1 = float(np.mean(pipe.predict(xtr) == ytr))
    correct = np.asarray(pipe.predict(xte) == yte, dtype=bool)
    return LinearProbeResult(top1=float(np.mean(correct)), train_top1=train_top1, C=float(clf.C),
                             n_iter=int(np.max(clf.n_iter_)), correct=correct, head=probe_head_arrays(pipe))


def probe_head_arrays(pipe) -> dict[str, np.ndarray]:
    """The linear head of a fitted probe pipeline ([``StandardScaler``,] ``LogisticRegression``) as float64
    arrays: ``weight`` ``(C, F)``, ``bias`` ``(C,)``, ``mean`` and ``scale`` ``(F,)`` of the standardisation
    (zeros and ones without a scaler), ``labels`` ``(C,)`` int64 (the label value of each output).

    ``argmax(((x - mean) / scale) @ weight.T + bias)`` indexes ``labels`` with the probe's prediction; for two
    classes sklearn's one logit ``z`` becomes the pair ``(0, z)`` (the same softmax).
    """
    clf = pipe[-1]
    coef, bias = np.asarray(clf.coef_, dtype=np.float64), np.asarray(clf.intercept_, dtype=np.float64)
    if coef.shape[0] == 1 and len(clf.classes_) == 2:
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
    features = coef.shape[1]
    scaler = pipe[0] if len(pipe) > 1 else None
    mean = np.asarray(scaler.mean_, dtype=np.float64) if scaler is not None else np.zeros(features)
    scale = np.asarray(scaler.scale_, dtype=np.float64) if scaler is not None else np.ones(features)
    return {"weight": coef, "bias": bias, "mean": mean, "scale": scale,
            "labels": np.asarray(clf.classes_).astype(np.int64)}


def _is_positive_number(value: Any) -> bool:
    """True for a real number (not a bool) that is finite and > 0."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and math.isfinite(float(value)) and float(value) > 0)


def _check_probe_settings(C: Any, max_iter: Any, C_grid: Sequence[float] | None,
                          cv_folds: Any) -> tuple[int, list[float] | None]:
    """``(max_iter, C grid or None)`` of :func:`linear_probe`, checked; raises ValueError on a bad one."""
    if not _is_positive_number(C):
        raise ValueError(f"C must be a finite number > 0, got {C!r}")
    max_iter = _check_pos_int("max_iter", max_iter)
    if C_grid is None:
        return max_iter, None
    grid = list(C_grid)
    if not grid or not all(_is_positive_number(c) for c in grid):
        raise ValueError(f"C_grid must be a non-empty list of finite numbers > 0, got {C_grid!r}")
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, (int, np.integer)) or cv_folds < 2:
        raise ValueError(f"cv_folds must be an integer >= 2, got {cv_folds!r}")
    return max_iter, [float(c) for c in grid]


def feature_matrix(name: str, x: Any, *, min_rows: int = 1) -> np.ndarray:
    """``x`` (a torch.Tensor or numpy array of shape ``(num_samples, num_features)``) as a numpy array, checked:
    2-D, real-valued, at least ``min_rows`` rows, every value finite.

    Raises:
        ValueError: naming ``name`` and what it is (type, shape, dtype, row count, or non-finite values).
    """
    x = _to_numpy(name, x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, num_features), got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        said = "is empty (0 rows)" if x.shape[0] == 0 else f"has {x.shape[0]} rows"
        raise ValueError(f"{name} {said}; at least {min_rows} are needed")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _probe_arrays(train_features, train_labels, test_features,
                  test_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The probe's inputs as numpy arrays, checked: real finite non-empty 2-D features of one width, 1-D
    integer labels of matching length, at least 2 train classes. Raises ValueError naming the bad input."""
    xtr = feature_matrix("train_features", train_features)
    ytr = _to_numpy("train_labels", train_labels)
    xte = feature_matrix("test_features", test_features)
    yte = _to_numpy("test_labels", test_labels)
    for name, y, x in (("train_labels", ytr, xtr), ("test_labels", yte, xte)):
        if y.ndim != 1:
            raise ValueError(f"{name} must be 1-D (num_samples,), got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must have an integer dtype, got {y.dtype}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{name} has length {y.shape[0]} but the matching features have {x.shape[0]} rows")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(
            f"feature dimensions differ: train_features has {xtr.shape[1]} columns, "
            f"test_features has {xte.shape[1]}"
        )
    n_cls = np.unique(ytr).size
    if n_cls < 2:
        raise ValueError(f"train_labels must contain at least 2 distinct classes, got {n_cls}")
    return xtr, ytr, xte, yte


def _fit_probe(xtr: np.ndarray, ytr: np.ndarray, *, C: float, max_iter: int, standardize: bool, seed: int,
               grid: list[float] | None, cv_folds: int):
    """The fitted sklearn ``Pipeline`` ([scaler,] logistic regression): C fixed, or chosen from ``grid`` by
    stratified cross-validation on the train rows when every class has at least 2 of them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    pipe = make_pipeline(StandardScaler(), clf) if standardize else make_pipeline(clf)
    smallest = int(np.unique(ytr, return_counts=True)[1].min())
    if grid is None or smallest < 2:
        return pipe.fit(xtr, ytr)
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    folds = StratifiedKFold(n_splits=min(int(cv_folds), smallest), shuffle=True, random_state=seed)
    search = GridSearchCV(pipe, {"logisticregression__C": grid}, cv=folds, scoring="accuracy", refit=True)
    search.fit(xtr, ytr)
    return search.best_estimator_


# ---------------------------------------------------------------------------------------------
# low-shot subsets
# ---------------------------------------------------------------------------------------------


def per_class_sample(labels: np.ndarray | Tensor, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Indices of a per-class stratified subsample (low-shot linear probe, paper Fig. 3).

    For each class c with ``n_c`` examples, ``max(1, round(fraction * n_c))`` indices are drawn
    without replacement (Python ``round``: halves go to the even integer), using one
    ``np.random.default_rng(seed)`` generator visited in increasing class order. No class is
    ever dropped (the reference code sampled uniformly, so rare classes could vanish).

    Args:
        labels: ``(N,)`` integer labels (numpy array or torch tensor), N >= 1; any integer
            values, not necessarily contiguous.
        fraction: share of each class to keep, in (0, 1] (e.g. 0.01 for 1 %).
        seed: seed of ``np.random.default_rng``; same seed and labels give the same indices.

    Returns:
        Sorted ``(M,)`` int64 numpy array of indices into ``labels``, no duplicates.

    Raises:
        ValueError: fraction outside (0, 1] or not finite, labels not 1-D, empty, or of a
            non-integer dtype.

    Source: paper Sec. 4.1 / Fig. 3 (low-shot fractions); per-class sampling per NOTES.md.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not (math.isfinite(float(fraction)) and 0.0 < float(fraction) <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    y = _to_numpy("labels", labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (num_samples,), got shape {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("labels is empty (0 entries): nothing to sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {y.dtype}")

    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        m = min(idx.size, max(1, int(round(float(fraction) * idx.size))))
        chosen.append(rng.choice(idx, size=m, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def lowshot_linear_probe(
    train_features: Tensor | np.ndarray,
    train_labels: Tensor | np.ndarray,
    test_features: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    fractions: Sequence[float],
    *,
    seed: int = 0,
    **probe_kw: Any,
) -> dict[float, LinearProbeResult]:
    """Low-shot linear probes: one :func:`linear_probe` per label fraction (paper Fig. 3).

    The embeddings of *all* training images come from a model adapted without labels; only the
    labels of a per-class sample (:func:`per_class_sample`, same ``seed`` for every fraction) are
    used to fit each probe, which is scored on the whole test split.

    Args:
        train_features: ``(N, F)`` float train embeddings; train_labels: ``(N,)`` integer labels.
        test_features: ``(Q, F)``; test_labels: ``(Q,)``.
        fractions: label fractions, each in (0, 1] (e.g. ``[0.1, 0.01]`` for 10 % and 1 %), no duplicates.
        seed: seed of the per-class sampling.
        **probe_kw: forwarded to :func:`linear_probe` (``C``, ``max_iter``, ``standardize``).

    Returns:
        ``{fraction: LinearProbeResult}`` in the order given.

    Raises:
        ValueError: an empty ``fractions``, a duplicate or a fraction outside (0, 1], a training set
            with fewer than 2 classes, and everything :func:`linear_probe` raises.

    Source: paper Sec. 4.3 "Low-shot transfer", Fig. 3; per-class sampling per NOTES.md.
    """
    fractions = list(fractions)
    if not fractions:
        raise ValueError("fractions is empty: give at least one label fraction in (0, 1]")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"fractions must not repeat, got {fractions}")
    for f in fractions:  # validate all before fitting any
        if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)) or not (
                math.isfinite(float(f)) and 0.0 < float(f) <= 1.0):
            raise ValueError(f"every label fraction must be in (0, 1], got {f!r}")
    ytr = _to_numpy("train_labels", train_labels)
    xtr = _to_numpy("train_features", train_features)
    if ytr.ndim != 1 or xtr.ndim != 2 or ytr.shape[0] != xtr.shape[0]:
        raise ValueError(f"train_features (N, F) and train_labels (N,) must match, "
                         f"got shapes {xtr.shape} and {ytr.shape}")
    out: dict[float, LinearProbeResult] = {}
    for f in fractions:
        idx = per_class_sample(ytr, float(f), seed=seed)
        out[f] = linear_probe(xtr[idx], ytr[idx], test_features, test_labels, **probe_kw)
    return out
