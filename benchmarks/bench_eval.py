"""Evaluation: the weighted k-NN and the linear probe of ``smn_core.evaluation``.

k-NN (k = 200, T = 0.1, chunks of 1,024 queries, as the pipeline runs it) on a bank of N x F features
with Q queries, against its floor: the bare matrix product of the same shapes (``queries @ bank.T``
in the same chunks, nothing else), interleaved, median. Peak memory against the floor of what the
algorithm must hold: the bank, the queries and one chunk of similarities.

The issue's shape is N = 50,000, F = 2,048, Q = 10,000; on CUDA (or with ``--knn-full``) it runs at
that shape. On the CPU by default it runs at N = 10,000, Q = 2,000 (F = 2,048, a ResNet-50's width):
the full shape is 2 TFLOP per pass, minutes on two cores; the floor is measured at the same
(smaller) shape, so the ratio stands. Features are synthetic: 100 Gaussian classes (unit-variance
noise around class means 3 standard deviations apart), which is all k-NN's cost depends on.

Linear probe (scikit-learn lbfgs logistic regression, the pipeline's probe) on N x F synthetic
features of 10 classes: fit time against a floor of its iterations, each of which needs at least the
loss and gradient, i.e. two matrix products (``X @ W`` and ``X.T @ G``) of the same shapes.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch

from smn_core.evaluation import knn_predict, linear_probe

from .common import MB, Row, Settings, compared, interleave, median, peak_memory_bytes

AREA = "eval"
K, TEMPERATURE, CHUNK = 200, 0.1, 1024


def _shapes(s: Settings) -> dict:
    if s.cuda or s.knn_full:
        knn = dict(n=50_000, f=2_048, q=10_000, rounds=3)
    elif s.quick:
        knn = dict(n=4_000, f=2_048, q=500, rounds=2)
    else:
        knn = dict(n=10_000, f=2_048, q=2_000, rounds=3)
    probe = dict(n=2_000, f=256) if s.quick else dict(n=10_000, f=2_048)
    return {"knn": knn, "probe": probe}


def _features(n: int, f: int, classes: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` features of width ``f``: unit Gaussian noise around one of ``classes`` fixed class means (the
    means depend on ``classes`` and ``f`` only, so every ``seed`` draws from the same classes)."""
    # class means ~3 noise standard deviations apart: neither separable at once nor hopeless
    means = torch.randn(classes, f, generator=torch.Generator().manual_seed(classes)) * (3.0 / (2 * f) ** 0.5)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = means[labels] + torch.randn(n, f, generator=g)
    return x.to(device), labels.to(device)


def bench_knn(s: Settings, n: int, f: int, q: int, rounds: int) -> list[Row]:
    dev = s.device
    bank, labels = _features(n, f, 100, 0, dev)
    queries, _ = _features(q, f, 100, 1, dev)

    def knn() -> None:
        knn_predict(bank, labels, queries, k=K, temperature=TEMPERATURE, num_classes=100, chunk_size=CHUNK)

    bank_t = bank.t().contiguous()  # the layout knn_predict multiplies with (its making is k-NN's cost)

    def matmul() -> None:
        for start in range(0, q, CHUNK):
            queries[start:start + CHUNK] @ bank_t

    knn()  # warm-up
    matmul()
    t = interleave({"knn": knn, "matmul": matmul}, rounds, dev)
    t_knn, t_mm = median(t["knn"]), median(t["matmul"])
    peak = peak_memory_bytes(knn, dev)
    elt = bank.element_size()
    floor_bytes = (n * f + q * f + min(CHUNK, q) * n) * elt
    shape = f"bank {n:,} x {f:,}, {q:,} queries"
    full = n == 50_000 and q == 10_000
    which = "the issue's full shape" if full else "sized down for the CPU (the issue's 50,000 x 2,048 / 10,000 with --knn-full)"
    del bank, bank_t, labels, queries
    gc.collect()
    return [
        compared(AREA, f"k-NN (k={K}) time, {shape}", t_knn, "s",
                 "floor: bare matmul queries @ bank.T (contiguous F x N), same shapes and chunks (same run)", t_mm, ideal=1.0,
                 settings=s, repeats=rounds,
                 notes=f"{which}; median of {rounds} interleaved rounds; cosine, top-k, exp(sim/T) votes, "
                       f"chunks of {CHUNK} queries"),
        compared(AREA, f"k-NN (k={K}) peak memory, {shape}", peak / MB, "MB",
                 "floor: bank + queries + one chunk of similarities", floor_bytes / MB, ideal=1.0, settings=s,
                 notes=("CUDA max_memory_allocated" if s.cuda else "torch.profiler memory timeline")
                 + "; the inputs are counted in both"),
    ]


def _probe_iteration_floor(x: np.ndarray, classes: int, repeats: int = 5) -> float:
    """Median seconds of ``X @ W`` plus ``X.T @ G`` (one loss-and-gradient evaluation's matrix work)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((x.shape[1], classes)).astype(x.dtype)
    g = rng.standard_normal((x.shape[0], classes)).astype(x.dtype)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x @ w
        x.T @ g
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def bench_probe(s: Settings, n: int, f: int) -> list[Row]:
    xtr, ytr = _features(n, f, 10, 2)
    xte, yte = _features(max(n // 5, 100), f, 10, 3)
    xtr_np = xtr.numpy()
    linear_probe(xtr[:50], ytr[:50], xte[:10], yte[:10], max_iter=5)  # warm-up: scikit-learn's imports
    before = _probe_iteration_floor(xtr_np, 10)
    t0 = time.perf_counter()
    res = linear_probe(xtr, ytr, xte, yte)
    t_fit = time.perf_counter() - t0
    after = _probe_iteration_floor(xtr_np, 10)
    floor = res.n_iter * median([before, after])
    return [compared(AREA, f"linear probe fit, {n:,} x {f:,} features, 10 classes", t_fit, "s",
                     f"floor: {res.n_iter} lbfgs iterations x (X @ W + X.T @ G), measured before and after", floor,
                     ideal=1.0, settings=s,
                     notes=f"scikit-learn lbfgs, standardised, float32 inputs; test top-1 {res.top1:.3f}; on the "
                           "CPU whatever the device")]


def run(s: Settings) -> list[Row]:
    """k-NN and linear-probe rows (see the module docstring)."""
    shapes = _shapes(s)
    return bench_knn(s, **shapes["knn"]) + bench_probe(s, **shapes["probe"])
