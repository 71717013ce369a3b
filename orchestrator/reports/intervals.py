"""95 % intervals for the tables, and paired differences between two methods (issue 25).

* :func:`t_interval`: the mean of a few runs (one per seed) and its Student-t interval,
  ``mean ± t_{n-1, 0.975} · s / sqrt(n)`` (``s`` the sample std, ddof = 1); none for a single run.
* :func:`paired_seed_interval`: the difference of two methods run with the same seeds, paired by seed
  (the t-interval of the per-seed differences): what the tables use when only per-seed accuracies are known.
* :func:`paired_bootstrap`: the difference of two methods over the same test images and seeds, from their
  per-image correctness (``seeds x images`` booleans): the images are resampled (the same resample for every
  seed, so the pairing over images and seeds is kept) and the mean difference's percentile interval read off.
* :func:`verdict`: ``gain`` only when the interval lies above 0, ``loss`` when below, otherwise
  ``no clear difference``.

Numbers only (numpy, scipy.special imported when first needed); no pandas, torch or ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["LEVEL", "Interval", "t_quantile", "t_interval", "paired_seed_interval", "paired_bootstrap", "verdict",
           "GAIN", "LOSS", "UNCLEAR"]

LEVEL = 0.95
"""Coverage of every interval here."""

GAIN, LOSS, UNCLEAR = "gain", "loss", "no clear difference"


@dataclass(frozen=True)
class Interval:
    """An estimate and its interval: ``mean`` and ``[lo, hi]`` (NaN when there is none: one run only),
    ``n`` the number of units it rests on (seeds, or seeds x images), ``method`` how it was computed
    (``t over seeds``, ``paired t over seeds``, ``paired bootstrap over images``)."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str

    @property
    def known(self) -> bool:
        """True when the interval exists (finite ends)."""
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def text(self, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
        """``"0.685 [0.671, 0.699]"`` (values times ``scale``; ``signed``: ``+1.2 [+0.3, +2.1]``);
        the mean alone without an interval; ``"-"`` without a mean."""
        if not math.isfinite(self.mean):
            return "-"
        f = (lambda v: f"{v * scale:+.{digits}f}") if signed else (lambda v: f"{v * scale:.{digits}f}")
        return f(self.mean) + (f" [{f(self.lo)}, {f(self.hi)}]" if self.known else "")


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student-t quantile ``t_{df, (1 + level) / 2}`` (12.706 for df = 1 at 95 %).

    Raises:
        ValueError: ``df < 1``.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom {df}; allowed: >= 1")
    # scipy.special's inverse of the Student-t CDF: the same number as scipy.stats.t.ppf, whose module takes
    # 0.5-0.7 s more to import (every `smn table` with intervals pays it)
    from scipy.special import stdtrit  # reason: only tables with intervals need it

    return float(stdtrit(df, 0.5 + level / 2))


def t_interval(values: Sequence[float], level: float = LEVEL, method: str = "t over seeds") -> Interval:
    """Mean of ``values`` (NaN ignored) and its Student-t interval; no interval (NaN ends) for fewer than two
    values, a zero-width one when they are all equal."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, method)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, math.nan, math.nan, 1, method)
    half = t_quantile(v.size - 1, level) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Interval(mean, mean - half, mean + half, int(v.size), method)


def paired_seed_interval(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Interval:
    """``a - b`` paired by seed: the t-interval of the per-seed differences over the seeds both have
    (``{seed: accuracy}`` each); seeds only one side has are left out. With one shared seed, the difference
    without an interval."""
    shared = sorted(set(a) & set(b))
    return t_interval([float(a[s]) - float(b[s]) for s in shared], level, "paired t over seeds")


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                     level: float = LEVEL) -> Interval:
    """Accuracy difference ``a - b`` over the same test images and seeds, with a paired percentile bootstrap.

    Args:
        correct_a, correct_b: per-image correctness, shape ``(seeds, images)`` (bool or 0/1), the same images in
            the same order and the same seeds in both (row ``i`` of each is seed ``i``'s run).
        resamples: bootstrap resamples of the images; each resample draws ``images`` indices with
            replacement and uses them for every seed (seeds are not resampled: they are few).
        seed: seed of the resampling (the interval is reproducible).

    Returns:
        The mean difference (over seeds and images) and its ``level`` percentile interval.

    Raises:
        ValueError: the two arrays differ in shape, or hold no image.
    """
    a = np.atleast_2d(np.asarray(correct_a, dtype=float))
    b = np.atleast_2d(np.asarray(correct_b, dtype=float))
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"per-image correctness of shapes {a.shape} and {b.shape}; allowed: the same "
                         "(seeds, images) shape, at least one image")
    d = (a - b).mean(axis=0)  # per image, averaged over seeds
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    boots = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(boots, [tail, 1 - tail])
    return Interval(float(d.mean()), float(lo), float(hi), int(a.size), "paired bootstrap over images")


def verdict(interval: Interval) -> str:
    """:data:`GAIN` when the whole interval is above 0, :data:`LOSS` when below, else :data:`UNCLEAR`
    (also when there is no interval: a difference without one is never called a gain)."""
    if not interval.known:
        return UNCLEAR
    if interval.lo > 0:
        return GAIN
    if interval.hi < 0:
        return LOSS
    return UNCLEAR
