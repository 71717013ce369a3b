"""The model cascade (paper Sec. 3.4, Table 3, App. G) in plain PyTorch + scikit-learn.

A self-masked model, the *dispatcher*, is complemented by K *experts*: extra masks over the same
frozen backbone, each trained on one cluster of the training set. This module holds everything of
the cascade that is not orchestration (the Ray actor graph lives in ``orchestrator.engine.cascade``):

* **Router** (:func:`fit_router`, :class:`Router`): L2-normalised dispatcher train embeddings,
  PCA to ``components`` (paper: 20), a ``clusters``-way Gaussian mixture (paper: 5), seeded with
  ``random_state=seed`` so routing is reproducible (the reference code left it unseeded). Images are
  routed to the mixture component with the highest posterior. The paper's text speaks of the
  "nearest centroid"; its experiments and the reference code used the Gaussian mixture.
* **Expert budget** (:func:`expert_epochs`): ``E_k = round(N / D_k * E)`` epochs for a cluster of
  ``D_k`` of the ``N`` training images, so every expert takes about as many steps as the dispatcher's
  ``E`` epochs (paper Sec. 4.1: about 117,188 steps for ResNet-50 on CIFAR-100).
* **Combination** (:func:`cascade_embedding`, :func:`fit_projection`, :func:`combine_cascade`):
  the unconditional embedding concatenates the dispatcher and every expert,
  ``[D(x), E_1(x), ..., E_K(x)]`` (K + 1 forward passes per image); the conditional one keeps only
  the routed expert's block and zeroes the others (2 forward passes). Both are centred with the
  train mean and projected back to the dispatcher's dimension F with the top-F principal axes of
  the train set. **Scaling** of the projected features: ``"whiten"`` (default) divides each
  component by the square root of its eigenvalue, so every component has unit variance on the train
  set (what the reference code did, and what the paper's stated aim, "all features have
  approximately equal variance", needs); ``"eigenvalue"`` divides by the eigenvalue itself, as the
  paper's text literally says (``e* = diag(1/S) V^T e``); ``"none"`` keeps the plain projection.
* **Homogeneity** (:func:`cluster_homogeneity`): the share of each cluster held by its x most
  common classes (App. G, Fig. 11). Labels are used for this analysis only, never for routing.
* **Cost** (:func:`forward_passes`, :func:`cascade_storage_bits`): forward passes per image and
  the bits of masks to store (Table 3: beta/32 for one mask, (K+1) beta/32 for the cascade).
* **Models** (:func:`restore_adapted_backbone`, :func:`embed_dataset`): rebuild a trained cell's
  backbone from its final trainable state (scores, BN statistics) and embed a dataset with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from .config import COVARIANCE_TYPES, MODES, SCALINGS

if TYPE_CHECKING:  # scikit-learn is imported where it is used: expert workers start faster without it
    from sklearn.mixture import GaussianMixture

__all__ = [
    "COVARIANCE_TYPES",
    "MODES",
    "SCALINGS",
    "Router",
    "fit_router",
    "cluster_sizes",
    "expert_epochs",
    "cascade_embedding",
    "CascadeProjection",
    "fit_projection",
    "combine_cascade",
    "cluster_homogeneity",
    "forward_passes",
    "cascade_storage_bits",
    "restore_adapted_backbone",
    "embed_dataset",
]


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _features(name: str, x, *, min_rows: int = 1) -> np.ndarray:
    """``x`` as a finite float64 ``(N, F)`` numpy array, or a ValueError naming ``name``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, num_features), got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} has {x.shape[0]} rows; at least {min_rows} are needed")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.astype(np.float64, copy=False)


def _int_vector(name: str, y, n: int | None = None) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries but the matching embeddings have {n} rows")
    return y.astype(np.int64, copy=False)


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------------------------------------
# router
# ---------------------------------------------------------------------------------------------


@dataclass
class Router:
    """A fitted router: PCA projection of L2-normalised embeddings plus a Gaussian mixture.

    Attributes:
        mean: ``(F,)`` float64, mean of the normalised train embeddings (PCA centre).
        components: ``(P, F)`` float64, the P principal axes (rows), P = ``components`` of the fit.
        gmm: the fitted ``sklearn.mixture.GaussianMixture`` over the P-dimensional projections.
        seed: the ``random_state`` the mixture was fitted with.
        explained_variance_ratio: ``(P,)`` share of the normalised embeddings' variance per axis.

    Source: paper Sec. 3.4 and 4.1 (PCA to 20 components, 5-way Gaussian mixture).
    """

    mean: np.ndarray
    components: np.ndarray
    gmm: GaussianMixture
    seed: int
    explained_variance_ratio: np.ndarray

    @property
    def clusters(self) -> int:
        """K, the number of experts this router routes to."""
        return int(self.gmm.n_components)

    def project(self, embeddings) -> np.ndarray:
        """``(N, F)`` raw embeddings -> ``(N, P)`` float64 PCA coordinates of their L2-normalised rows.

        Raises:
            ValueError: non-2-D, non-float or non-finite input, or F different from the fit's.
        """
        x = _features("embeddings", embeddings)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"embeddings have {x.shape[1]} features; the router was fitted on {self.mean.shape[0]}")
        return (_l2_normalise(x) - self.mean) @ self.components.T

    def route(self, embeddings) -> np.ndarray:
        """The expert of each image: ``(N, F)`` embeddings -> ``(N,)`` int64 in ``0..K-1``
        (the mixture component with the highest posterior probability)."""
        return self.gmm.predict(self.project(embeddings)).astype(np.int64)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Every number of the router as tensors (for ``safetensors``; restore with :meth:`from_tensors`)."""
        g = self.gmm
        arrays = {"pca.mean": self.mean, "pca.components": self.components,
                  "pca.explained_variance_ratio": self.explained_variance_ratio,
                  "gmm.weights": g.weights_, "gmm.means": g.means_, "gmm.covariances": g.covariances_,
                  "gmm.precisions_cholesky": g.precisions_cholesky_}
        return {
            **{key: torch.from_numpy(np.ascontiguousarray(a)) for key, a in arrays.items()},
            "gmm.covariance_type": torch.tensor(COVARIANCE_TYPES.index(g.covariance_type)),
            "seed": torch.tensor(int(self.seed)),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Router":
        """Rebuild a router from :meth:`to_tensors` output (no pickle involved).

        Raises:
            ValueError: if a key is missing.
        """
        need = ("pca.mean", "pca.components", "pca.explained_variance_ratio", "gmm.weights", "gmm.means",
                "gmm.covariances", "gmm.precisions_cholesky", "gmm.covariance_type", "seed")
        missing = [k for k in need if k not in tensors]
        if missing:
            raise ValueError(f"router tensors lack {', '.join(missing)}")
        from sklearn.mixture import GaussianMixture

        t = {k: tensors[k].numpy() for k in need}
        gmm = GaussianMixture(n_components=t["gmm.weights"].shape[0],
                              covariance_type=COVARIANCE_TYPES[int(t["gmm.covariance_type"])])
        gmm.weights_ = t["gmm.weights"]
        gmm.means_ = t["gmm.means"]
        gmm.covariances_ = t["gmm.covariances"]
        gmm.precisions_cholesky_ = t["gmm.precisions_cholesky"]
        gmm.n_features_in_ = t["gmm.means"].shape[1]
        gmm.converged_ = True
        return cls(mean=t["pca.mean"], components=t["pca.components"], gmm=gmm, seed=int(t["seed"]),
                   explained_variance_ratio=t["pca.explained_variance_ratio"])


def fit_router(train_embeddings, *, components: int = 20, clusters: int = 5, seed: int = 0,
               covariance_type: str = "full", reg_covar: float = 1e-6, n_init: int = 1,
               max_iter: int = 100) -> Router:
    """Fit the cascade's router on the dispatcher's train embeddings.

    Rows are L2-normalised, projected on their top ``components`` principal axes
    (``sklearn.decomposition.PCA``, exact SVD) and clustered with
    ``sklearn.mixture.GaussianMixture(clusters, random_state=seed)``; the same embeddings and seed
    always give the same router and routes.

    Args:
        train_embeddings: ``(N, F)`` float dispatcher embeddings of the train split.
        components: PCA dimensions P, 1 <= P <= min(N, F) (paper: 20).
        clusters: mixture components K = number of experts, 2 <= K <= N (paper: 5).
        seed: ``random_state`` of the mixture's initialisation.
        covariance_type, reg_covar, n_init, max_iter: passed to ``GaussianMixture``.

    Returns:
        A fitted :class:`Router`.

    Raises:
        ValueError: on non-finite or non-2-D embeddings, ``components`` outside [1, min(N, F)],
            ``clusters`` outside [2, N], an unknown ``covariance_type`` (lists the allowed ones), or
            a non-positive ``reg_covar``, ``n_init`` or ``max_iter``.

    Source: paper Sec. 3.4 and 4.1; NOTES.md (reference code: GaussianMixture, default settings, unseeded).
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x = _features("train_embeddings", train_embeddings, min_rows=2)
    n, f = x.shape
    components = _pos_int("components", components)
    clusters = _pos_int("clusters", clusters)
    if components > min(n, f):
        raise ValueError(f"components={components} exceeds min(num_samples={n}, num_features={f}); "
                         f"allowed: 1..{min(n, f)}")
    if not 2 <= clusters <= n:
        raise ValueError(f"clusters={clusters} must be in 2..{n} (the number of train embeddings)")
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type {covariance_type!r} is not known; allowed: {', '.join(COVARIANCE_TYPES)}")
    if not (isinstance(reg_covar, (int, float)) and reg_covar > 0):
        raise ValueError(f"reg_covar must be > 0, got {reg_covar!r}")
    n_init = _pos_int("n_init", n_init)
    max_iter = _pos_int("max_iter", max_iter)
    xn = _l2_normalise(x)
    pca = PCA(n_components=components, svd_solver="full").fit(xn)
    z = (xn - pca.mean_) @ pca.components_.T
    gmm = GaussianMixture(n_components=clusters, covariance_type=covariance_type, reg_covar=float(reg_covar),
                          n_init=n_init, max_iter=max_iter, random_state=int(seed)).fit(z)
    return Router(mean=pca.mean_.copy(), components=pca.components_.copy(), gmm=gmm, seed=int(seed),
                  explained_variance_ratio=pca.explained_variance_ratio_.copy())


def cluster_sizes(routes, clusters: int) -> np.ndarray:
    """``(K,)`` int64 number of images routed to each expert.

    Raises:
        ValueError: routes not 1-D integers, or a route outside ``0..clusters-1``.
    """
    r = _int_vector("routes", routes)
    clusters = _pos_int("clusters", clusters)
    if r.size and (r.min() < 0 or r.max() >= clusters):
        raise ValueError(f"routes must lie in 0..{clusters - 1}, got range {int(r.min())}..{int(r.max())}")
    return np.bincount(r, minlength=clusters).astype(np.int64)


def expert_epochs(num_train: int, cluster_size: int, dispatcher_epochs: int) -> int:
    """Epochs of an expert so its step budget matches the dispatcher's: ``round(N / D_k * E)``.

    Rounded half up (``floor(x + 0.5)``, not Python's round-half-to-even), at least 1.

    Args:
        num_train: N, images in the whole train split.
        cluster_size: D_k, images in the expert's cluster, 1 <= D_k <= N.
        dispatcher_epochs: E, the dispatcher's epochs.

    Raises:
        ValueError: non-positive arguments or ``cluster_size > num_train``.

    Source: paper Sec. 4.1 ("E = 50000 / D * 150 ... rounded to the nearest integer").
    """
    n = _pos_int("num_train", num_train)
    d = _pos_int("cluster_size", cluster_size)
    e = _pos_int("dispatcher_epochs", dispatcher_epochs)
    if d > n:
        raise ValueError(f"cluster_size={d} exceeds num_train={n}")
    return max(1, int(math.floor(n / d * e + 0.5)))


# ---------------------------------------------------------------------------------------------
# combination
# ---------------------------------------------------------------------------------------------


def cascade_embedding(dispatcher, experts: Sequence, mode: str, routes=None) -> torch.Tensor:
    """Concatenate the dispatcher's and the experts' embeddings (paper Eq. 10 and 11).

    Args:
        dispatcher: ``(N, F)`` dispatcher embeddings D(x).
        experts: K tensors ``(N, F)``, the embeddings E_k(x) of every expert (same images, same order).
        mode: ``"unconditional"``: ``[D(x), E_1(x), ..., E_K(x)]``; ``"conditional"``: the same layout
            with every expert block except the routed one set to zero.
        routes: ``(N,)`` ints in ``0..K-1``, the routed expert of each image (needed for ``conditional``).

    Returns:
        ``(N, (K + 1) * F)`` float32 tensor; block ``b`` (columns ``b*F .. (b+1)*F-1``) is the
        dispatcher for b = 0 and expert ``b - 1`` otherwise.

    Raises:
        ValueError: unknown mode (lists the allowed ones), no experts, shapes that differ, or
            missing / out-of-range routes for ``conditional``.
    """
    if mode not in MODES:
        raise ValueError(f"cascade mode {mode!r} is not known; allowed: {', '.join(MODES)}")
    d = torch.as_tensor(_features("dispatcher", dispatcher), dtype=torch.float32)
    if len(experts) < 1:
        raise ValueError("experts must hold at least one expert's embeddings")
    blocks = [d]
    for k, e in enumerate(experts):
        e = torch.as_tensor(_features(f"experts[{k}]", e), dtype=torch.float32)
        if e.shape != d.shape:
            raise ValueError(f"experts[{k}] has shape {tuple(e.shape)}; the dispatcher's is {tuple(d.shape)}")
        blocks.append(e)
    if mode == "conditional":
        if routes is None:
            raise ValueError("the conditional cascade needs routes (the routed expert of each image)")
        r = torch.as_tensor(_int_vector("routes", routes, d.shape[0]))
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= len(experts)):
            raise ValueError(f"routes must lie in 0..{len(experts) - 1}, got range {int(r.min())}..{int(r.max())}")
        for k in range(len(experts)):
            blocks[k + 1] = blocks[k + 1] * (r == k).unsqueeze(1).to(torch.float32)
    return torch.cat(blocks, dim=1)


@dataclass
class CascadeProjection:
    """Centring + PCA projection back to ``dim`` features, with a per-component scale.

    ``transform(x) = ((x - mean) @ components.T) * scale``.

    Attributes:
        mean: ``(D,)`` float64 train mean of the concatenated embedding.
        components: ``(dim, D)`` float64 top principal axes of the centred train set (rows).
        eigenvalues: ``(dim,)`` float64 variance of the train set along each axis (ddof = 1).
        scale: ``(dim,)`` float64: ``1/sqrt(eigenvalue)`` (whiten), ``1/eigenvalue`` (eigenvalue) or 1
            (none); 0 for axes whose eigenvalue is below ``1e-10 x`` the largest (no variance to scale).
        scaling: which of :data:`SCALINGS`.
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    scale: np.ndarray
    scaling: str

    def transform(self, x) -> torch.Tensor:
        """``(N, D)`` -> ``(N, dim)`` float32 tensor.

        Raises:
            ValueError: on a feature count other than D, or non-finite input.
        """
        a = _features("x", x)
        if a.shape[1] != self.mean.shape[0]:
            raise ValueError(f"x has {a.shape[1]} features; the projection was fitted on {self.mean.shape[0]}")
        return torch.from_numpy(((a - self.mean) @ self.components.T * self.scale).astype(np.float32))


def fit_projection(train, dim: int, scaling: str = "whiten") -> CascadeProjection:
    """Fit the cascade's projection back to the dispatcher's dimension on the train set.

    Args:
        train: ``(N, D)`` float concatenated train embeddings (:func:`cascade_embedding`).
        dim: output dimension F (the dispatcher's), 1 <= F <= min(N, D).
        scaling: ``"whiten"`` (divide by sqrt(eigenvalue): unit variance per component; default),
            ``"eigenvalue"`` (divide by the eigenvalue, the paper's text), or ``"none"``.

    Returns:
        A :class:`CascadeProjection` (PCA by ``sklearn.decomposition.PCA``, exact SVD).

    Raises:
        ValueError: unknown scaling (lists the allowed ones), ``dim`` outside [1, min(N, D)],
            fewer than 2 rows, non-finite values.

    Source: paper Sec. 3.4, "Dimensionality Reduction"; NOTES.md (reference code whitened).
    """
    from sklearn.decomposition import PCA

    if scaling not in SCALINGS:
        raise ValueError(f"scaling {scaling!r} is not known; allowed: {', '.join(SCALINGS)}")
    x = _features("train", train, min_rows=2)
    n, d = x.shape
    dim = _pos_int("dim", dim)
    if dim > min(n, d):
        raise ValueError(f"dim={dim} exceeds min(num_samples={n}, num_features={d}); allowed: 1..{min(n, d)}")
    pca = PCA(n_components=dim, svd_solver="full").fit(x)
    ev = pca.explained_variance_.astype(np.float64)
    alive = ev > 1e-10 * max(float(ev.max()), 1e-300)
    scale = np.zeros_like(ev)
    if scaling == "whiten":
        scale[alive] = 1.0 / np.sqrt(ev[alive])
    elif scaling == "eigenvalue":
        scale[alive] = 1.0 / ev[alive]
    else:
        scale[alive] = 1.0
    return CascadeProjection(mean=pca.mean_.copy(), components=pca.components_.copy(), eigenvalues=ev,
                             scale=scale, scaling=scaling)


def combine_cascade(dispatcher_train, experts_train: Sequence, dispatcher_test, experts_test: Sequence, *,
                    mode: str, routes_train=None, routes_test=None, scaling: str = "whiten",
                    dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, CascadeProjection]:
    """The cascade embedding of the train and test splits, projected back to the dispatcher's dimension.

    Concatenates (:func:`cascade_embedding`), fits the centring and projection on the train split
    only (:func:`fit_projection`) and applies both to train and test.

    Args:
        dispatcher_train / dispatcher_test: ``(N, F)`` / ``(Q, F)`` dispatcher embeddings.
        experts_train / experts_test: K tensors each, ``(N, F)`` / ``(Q, F)``.
        mode: ``"conditional"`` or ``"unconditional"``.
        routes_train / routes_test: ``(N,)`` / ``(Q,)`` routed experts (for ``conditional``).
        scaling: see :func:`fit_projection`.
        dim: output dimension; default F.

    Returns:
        ``(train (N, dim), test (Q, dim), projection)``, float32.

    Raises:
        ValueError: as :func:`cascade_embedding` and :func:`fit_projection`; K differing between splits.
    """
    if len(experts_train) != len(experts_test):
        raise ValueError(f"{len(experts_train)} expert train embeddings but {len(experts_test)} test embeddings")
    tr = cascade_embedding(dispatcher_train, experts_train, mode, routes_train)
    te = cascade_embedding(dispatcher_test, experts_test, mode, routes_test)
    f = int(np.asarray(dispatcher_train.shape)[1])
    proj = fit_projection(tr, f if dim is None else dim, scaling)
    return proj.transform(tr), proj.transform(te), proj


# ---------------------------------------------------------------------------------------------
# analysis and cost
# ---------------------------------------------------------------------------------------------


def cluster_homogeneity(routes, labels, clusters: int, num_classes: int | None = None) -> np.ndarray:
    """Share of each cluster held by its most common classes (paper App. G, Fig. 11).

    Args:
        routes: ``(N,)`` routed cluster per image, in ``0..clusters-1``.
        labels: ``(N,)`` class labels in ``0..C-1`` (used for this analysis only).
        clusters: K.
        num_classes: C; default ``max(labels) + 1``.

    Returns:
        ``(K, C)`` float64: entry ``[k, x - 1]`` is the fraction of cluster k's images that belong to
        its x most common classes (non-decreasing in x, 1.0 at x = C); rows of empty clusters are NaN.

    Raises:
        ValueError: non-matching lengths, routes or labels out of range.
    """
    r = _int_vector("routes", routes)
    y = _int_vector("labels", labels, r.shape[0])
    clusters = _pos_int("clusters", clusters)
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {int(y.min())}")
    c = int(y.max()) + 1 if num_classes is None and y.size else _pos_int("num_classes", num_classes or 1)
    if y.size and y.max() >= c:
        raise ValueError(f"labels must lie in 0..{c - 1}, got maximum {int(y.max())}")
    sizes = cluster_sizes(r, clusters)
    out = np.full((clusters, c), np.nan)
    for k in range(clusters):
        if sizes[k]:
            counts = np.sort(np.bincount(y[r == k], minlength=c))[::-1]
            out[k] = np.cumsum(counts) / sizes[k]
    return out


def forward_passes(mode: str, clusters: int) -> int:
    """Backbone forward passes per image: 1 (``"dispatcher"``), 2 (``"conditional"``: dispatcher plus
    the routed expert) or K + 1 (``"unconditional"``).

    Raises:
        ValueError: unknown mode (lists the allowed ones) or clusters < 1.
    """
    clusters = _pos_int("clusters", clusters)
    passes = {"dispatcher": 1, "conditional": 2, "unconditional": clusters + 1}
    if mode not in passes:
        raise ValueError(f"mode {mode!r} is not known; allowed: {', '.join(passes)}")
    return passes[mode]


def cascade_storage_bits(mask_bits: float, clusters: int, mode: str) -> float:
    """Bits of masks to store for one task on top of the shared backbone (paper Table 3 "Storage").

    ``mask_bits`` (one mask, beta/32 when every weight is masked) for ``"dispatcher"``; ``(K + 1) x
    mask_bits`` for both cascades (the conditional cascade runs 2 models per image but needs all K
    experts stored: (K+1) beta / 32, "6 beta/32" for K = 5).

    Raises:
        ValueError: negative ``mask_bits``, unknown mode or clusters < 1.
    """
    if not mask_bits >= 0:
        raise ValueError(f"mask_bits must be >= 0, got {mask_bits!r}")
    forward_passes(mode, clusters)  # validates mode and clusters
    return float(mask_bits) * (1 if mode == "dispatcher" else clusters + 1)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def restore_adapted_backbone(cfg, state: dict[str, torch.Tensor], *, pipeline_weights: str | Path | None = None,
                             device: str | torch.device = "cpu"):
    """Rebuild a trained cell's backbone from its final trainable state (dispatcher or expert).

    Builds the cell's backbone and masks exactly as :func:`smn_core.pipeline.run_cell` does, wraps
    it with the training head, and copies every ``param.*`` and ``buffer.*`` tensor of ``state``
    (:func:`smn_core.training.trainable_state`: scores, head, prototypes, BN statistics; the SwAV
    queue is skipped).

    Args:
        cfg: the cell's :class:`smn_core.pipeline.CellConfig` (a trained method).
        state: its final trainable state.
        pipeline_weights: the pretraining artifact for ``backbone.weights == "pipeline"``.
        device: where the model is put.

    Returns:
        ``(model, backbone)``: the adapted feature extractor ``(B, 3, S, S) -> (B, F)`` in eval mode,
        and the :class:`smn_core.backbones.Backbone` record (mean, std, feature_dim, input_size).

    Raises:
        ValueError: for ``method == "pretrained"``, or when ``state`` lacks a trainable parameter
            of the model or holds one the model does not have (names the first few).
    """
    from .masking import attach_masks
    from .pipeline import METHODS, prepare_backbone
    from .training import build_adaptation_model, copy_state

    if METHODS.get(cfg.method) is None:
        raise ValueError(f"method {cfg.method!r} trains nothing; a cascade needs a trained (masked) cell")
    torch.manual_seed(cfg.seed)
    backbone = prepare_backbone(cfg.backbone, pipeline_weights=pipeline_weights)
    model = backbone.model
    if cfg.train.adaptation == "mask":
        attach_masks(model, cfg.train.mask)
    num_classes = None
    if cfg.train.objective == "supervised":
        num_classes = int(state["param.classifier.weight"].shape[0]) if "param.classifier.weight" in state else 2
    adapt = build_adaptation_model(model, backbone.feature_dim, cfg.train, num_classes=num_classes)
    params = {n: p for n, p in adapt.named_parameters() if p.requires_grad}
    buffers = dict(adapt.named_buffers())
    given_params = {k[len("param."):] for k in state if k.startswith("param.")}
    missing = sorted(set(params) - given_params)
    unknown = sorted(given_params - set(params))
    if missing or unknown:
        raise ValueError(f"state does not match the cell's model: missing {missing[:3]}, unexpected {unknown[:3]}")
    copy_state(params, buffers, state, keep_buffer=lambda name: name in buffers and ".queue" not in name)
    out = adapt.backbone.to(device).eval()
    return out, backbone


def embed_dataset(model: nn.Module, dataset, *, image_size: int, mean, std, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Unaugmented embeddings of every image of ``dataset`` (the evaluation transform, in order).

    Returns:
        ``(features (N, F) float32, labels (N,) int64)`` on CPU.

    Raises:
        ValueError: as :func:`smn_core.evaluation.compute_embeddings`.
    """
    from .augment import SeededViewDataset, eval_transform
    from .evaluation import compute_embeddings

    tf = eval_transform(image_size, mean, std)
    return compute_embeddings(model, SeededViewDataset(dataset, tf), batch_size=batch_size, device=device)

