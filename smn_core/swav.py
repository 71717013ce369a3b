"""SwAV self-supervised loss for self-masking (paper Sec. 3.3; Caron et al. 2020).

Multi-crop views of each image are embedded by the (masked) backbone, projected to a
``proj_dim``-d L2-normalised code space, and scored against ``K`` L2-normalised prototypes.
Sinkhorn-Knopp turns the global crops' prototype scores into balanced soft assignments ``q``;
every other view predicts them through a softmax with temperature ``tau`` (paper Eq. 9).

Distributed data parallel: Sinkhorn's normalisations are summed over all workers with
``torch.distributed.all_reduce`` (as in SwAV's ``distributed_sinkhorn``), so ``W`` workers with a
per-worker batch ``B/W`` compute the same assignments as one worker with batch ``B``. The queue
holds ``queue_length / W`` embeddings per worker, so the union over workers equals the
single-worker queue.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import HEAD_INITS, SwAVConfig

__all__ = ["SwAVConfig", "SwAVHead", "SwAV", "sinkhorn_knopp", "detect_collapse", "init_head_from_features",
           "HEAD_INITS"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


class SwAVHead(nn.Module):
    """Projection head and prototypes.

    ``forward(features (B, F)) -> (z (B, proj_dim) L2-normalised, scores (B, K) = z @ C^T)``; with
    ``input_norm`` the features are batch-standardised first (``BatchNorm1d(F, affine=False)``).
    The prototypes ``C`` (``K x proj_dim``) are re-normalised by :meth:`normalize_prototypes`
    before every step, as in SwAV.
    """

    def __init__(self, feature_dim: int, config: SwAVConfig) -> None:
        super().__init__()
        self.input_norm: nn.Module = nn.BatchNorm1d(feature_dim, affine=False) if config.input_norm else nn.Identity()
        if config.hidden_dim > 0:
            self.projection: nn.Module = nn.Sequential(
                nn.Linear(feature_dim, config.hidden_dim),
                nn.BatchNorm1d(config.hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(config.hidden_dim, config.proj_dim),
            )
        else:
            self.projection = nn.Linear(feature_dim, config.proj_dim)
        self.prototypes = nn.Linear(config.proj_dim, config.num_prototypes, bias=False)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise every prototype (row of ``prototypes.weight``) in place."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.projection(self.input_norm(features)), dim=1)
        return z, self.prototypes(z)


@torch.no_grad()
def init_head_from_features(head: SwAVHead, features: torch.Tensor, *, seed: int = 0) -> None:
    """Initialise a linear SwAV head from frozen features (``SwAVConfig.head_init = "pca_kmeans"``).

    The projection becomes the PCA whitening of ``features`` (``z = (f - mean) @ V / sqrt(lambda)``,
    one output per principal component; outputs beyond ``min(N, F)`` components start at zero) and the
    prototypes the L2-normalised k-means centroids (seeded, scikit-learn) of the normalised codes ``z``;
    prototypes beyond the number of distinct codes are random unit vectors. Both stay trainable.

    Args:
        head: a :class:`SwAVHead` with a linear projection (``hidden_dim == 0``), modified in place.
        features: ``(N, F)`` frozen backbone features of the unaugmented target train split, N >= 2.
        seed: seeds k-means and the spare prototypes.

    Raises:
        ValueError: an MLP head, fewer than 2 rows, or a feature dimension that differs from the head's.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    proj = head.projection
    if not isinstance(proj, nn.Linear):
        raise ValueError("init_head_from_features needs a linear projection head (swav.hidden_dim 0)")
    x = features.double().cpu().numpy()
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] != proj.in_features:
        raise ValueError(f"features must be (N >= 2, {proj.in_features}), got {tuple(features.shape)}")
    if isinstance(head.input_norm, nn.BatchNorm1d):  # the projection sees standardised features
        bn = head.input_norm
        mean, var = x.mean(0), x.var(0)
        bn.running_mean.copy_(torch.as_tensor(mean, dtype=bn.running_mean.dtype))
        bn.running_var.copy_(torch.as_tensor(var, dtype=bn.running_var.dtype))
        x = (x - mean) / np.sqrt(var + bn.eps)
    n_comp = min(proj.out_features, x.shape[0] - 1, x.shape[1])
    pca = PCA(n_components=n_comp, whiten=True, random_state=seed).fit(x)
    scale = 1.0 / np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
    weight = np.zeros((proj.out_features, proj.in_features))
    weight[:n_comp] = pca.components_ * scale[:, None]
    bias = -weight @ pca.mean_
    proj.weight.copy_(torch.as_tensor(weight, dtype=proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_(torch.as_tensor(bias, dtype=proj.bias.dtype))
    z = x @ weight.T + bias
    z /= np.linalg.norm(z, axis=1, keepdims=True).clip(min=1e-12)
    protos = head.prototypes.weight
    k = protos.shape[0]
    n_clusters = min(k, len(np.unique(z.round(6), axis=0)))
    centroids = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit(z).cluster_centers_
    gen = torch.Generator().manual_seed(int(seed))
    init = torch.randn(k, protos.shape[1], generator=gen, dtype=torch.float64)
    init[:n_clusters] = torch.as_tensor(centroids)
    protos.copy_(F.normalize(init, dim=1).to(protos.dtype))


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments of samples to prototypes (Cuturi 2013; SwAV Alg. 1).

    Args:
        scores: prototype scores ``(B, K)`` (cosine similarities), this worker's share of the batch.
        epsilon: entropic regularisation; the kernel is ``exp(scores / epsilon)``.
        iterations: Sinkhorn-Knopp iterations.

    Returns:
        ``Q`` of shape ``(B, K)``: each row sums to 1; over the global batch (all workers), each
        prototype column sums to ``B_global / K`` after the final row step only approximately
        (exactly so in the limit of iterations) -- the last step normalises rows, as in SwAV.

    Raises:
        ValueError: on a non-2-D input or non-positive ``epsilon``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    logits = scores.double() / epsilon
    shift = logits.max().clone()
    _all_reduce(shift, dist.ReduceOp.MAX if _world_size() > 1 else None)
    q = torch.exp(logits - shift).t()  # (K, B)
    batch = torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    _all_reduce(batch)
    k = q.shape[0]
    total = q.sum()
    _all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        _all_reduce(rows)
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t().to(scores.dtype)


def detect_collapse(loss: float, num_prototypes: int, code_entropy: float, *, loss_tol: float = 0.02,
                    entropy_floor: float = 0.1, prediction_information: float | None = None,
                    information_floor: float = 0.1) -> str | None:
    """Report SwAV collapse (NOTES.md: the loss stuck near ``ln K``).

    A collapsed network maps every image to the same prediction, so the SwAV loss against
    equipartitioned codes sits at ``ln K``. A loss near ``ln K`` alone is not proof: a model whose
    predictions differ from image to image but match the codes poorly (a cascade expert on one
    homogeneous cluster) can land there too. When ``prediction_information`` is given, the loss symptom
    counts only if the predictions also carry (almost) no information about the image.

    Args:
        loss: mean SwAV loss of an epoch (nats).
        num_prototypes: ``K``.
        code_entropy: normalised entropy in [0, 1] of the histogram of hard assignments
            (``argmax q``) over an epoch; 1 = uniform over prototypes, 0 = one prototype takes all.
        loss_tol: relative closeness to ``ln K`` that counts as collapse.
        entropy_floor: normalised assignment entropy under which the codes count as collapsed.
        prediction_information: mean over batches of the mutual information between image and
            prediction, ``H(mean_i p_i) - mean_i H(p_i)``, over ``ln K`` (in [0, 1]; 0: every image gets
            the same prediction), with ``p_i = softmax(scores_i / T)``. None: not measured.
        information_floor: ``prediction_information`` under which the loss symptom counts.

    Returns:
        ``None`` if healthy, else a sentence saying which symptom was seen.
    """
    ln_k = math.log(num_prototypes)
    if abs(loss - ln_k) <= loss_tol * ln_k and (prediction_information is None
                                                 or prediction_information < information_floor):
        info = "" if prediction_information is None else \
            f", predictions carry {prediction_information:.3f} of ln K about the image"
        return f"SwAV loss {loss:.4f} is within {loss_tol:.0%} of ln K = {ln_k:.4f} (uniform predictions{info})"
    if code_entropy < entropy_floor:
        return f"assignment entropy {code_entropy:.3f} < {entropy_floor} (codes collapsed onto few prototypes)"
    return None


class SwAV(nn.Module):
    """The SwAV loss with its head, prototypes and queue (paper Eq. 9).

    ``forward(features: list of (B, F) tensors, one per view, global views first)``
    returns ``(loss scalar, stats)`` where ``stats`` holds ``code_counts`` (``(K,)`` histogram of
    hard assignments of this batch) and ``prediction_information`` (scalar: the mutual information
    between image and prediction over this batch's crops, over ``ln K``), both for collapse detection.
    """

    def __init__(self, feature_dim: int, config: SwAVConfig) -> None:
        super().__init__()
        self.config = config
        self.head = SwAVHead(feature_dim, config)
        world = _world_size()
        local = config.queue_length // world if config.queue_length else 0
        if config.queue_length and config.queue_length % world:
            raise ValueError(f"swav.queue_length {config.queue_length} is not divisible by {world} workers")
        self.register_buffer("queue", torch.zeros(len(config.crops_for_assign), local, config.proj_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.queue_active = False

    def start_queue(self) -> None:
        """Start filling the queue (called by the training loop at ``queue_start_fraction``)."""
        self.queue_active = self.queue.shape[1] > 0

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        n_views = len(features)
        if n_views < 2:
            raise ValueError(f"SwAV needs at least 2 views, got {n_views}")
        if max(cfg.crops_for_assign) >= n_views:
            raise ValueError(f"crops_for_assign {cfg.crops_for_assign} refers to views beyond the {n_views} given")
        bs = features[0].shape[0]
        z, out = self.head(torch.cat(features))
        z = z.detach()
        total = out.new_zeros(())
        counts = torch.zeros(cfg.num_prototypes, device=out.device)
        with torch.no_grad():  # how much the predictions depend on the image (collapse detection)
            probs = F.softmax(out.detach().float() / cfg.temperature, dim=1)
            h_mean = torch.special.entr(probs.mean(dim=0)).sum()
            h_each = torch.special.entr(probs).sum(dim=1).mean()
            information = (h_mean - h_each) / math.log(cfg.num_prototypes)
        for slot, i in enumerate(cfg.crops_for_assign):
            with torch.no_grad():
                scores_i = out[bs * i: bs * (i + 1)].detach()
                use_queue = self.queue_active and int(self.queue_filled) >= self.queue.shape[1]
                if use_queue:
                    scores_i = torch.cat([self.queue[slot] @ self.head.prototypes.weight.t(), scores_i])
                q = sinkhorn_knopp(scores_i, cfg.epsilon, cfg.sinkhorn_iterations)[-bs:]
                counts += torch.bincount(q.argmax(dim=1), minlength=cfg.num_prototypes).float()
                if self.queue_active and self.training:  # never fill the queue outside training (NOTES.md)
                    self.queue[slot, bs:] = self.queue[slot, :-bs].clone()
                    self.queue[slot, :bs] = z[bs * i: bs * (i + 1)][: self.queue.shape[1]]
            sub = out.new_zeros(())
            for v in range(n_views):
                if v == i:
                    continue
                logp = F.log_softmax(out[bs * v: bs * (v + 1)] / cfg.temperature, dim=1)
                sub = sub - (q * logp).sum(dim=1).mean()
            total = total + sub / (n_views - 1)
        if self.queue_active and self.training:
            self.queue_filled += bs
        return total / len(cfg.crops_for_assign), {"code_counts": counts, "prediction_information": information}
