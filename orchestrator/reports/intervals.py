"""95 % intervals for the tables, and paired differences between two methods (issue 25).

* :func:`t_interval`: the mean of a few runs (one per seed) and its Student-t interval,
  ``mean ± t_{n-1, 0.975} · s / sqrt(n)`` (``s`` the sample std, ddof = 1); none for a single run.
* :func:`paired_seed_interval`: the difference of two methods run with the same seeds, paired by seed
  (the t-interval of the per-seed differences): what the tables use when only per-seed accuracies are known.
* :func:`paired_bootstrap`: the difference of two methods over the same test images and seeds, from their
  per-image correctness (``seeds x images`` booleans): the images are resampled (the same resample for every
  seed, so the pairing over images and seeds is kept) and the mean difference's percentile interval read off.
* :func:`mcnemar`: exact McNemar tests of the same comparison, per seed and the seeds combined (discordant
  images summed over seeds).
* :func:`verdict`: ``gain`` only when the interval lies above 0, ``loss`` when below, otherwise
  ``no clear difference``.
* :func:`stat_text` / :func:`difference_text`: how every table writes a mean over seeds
  (``mean ± std [lo, hi]``) and a paired difference (``+4.1 [+1.0, +7.2] gain``, in points).

Numbers only (numpy; scipy.special only for a level other than 95 %); no pandas, torch or ray.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["LEVEL", "Interval", "t_quantile", "t_interval", "paired_seed_interval", "paired_bootstrap", "verdict",
           "McNemar", "mcnemar", "stat_text", "difference_text", "p_text",
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
    if level == LEVEL:  # every table's level: no scipy import (0.2-0.6 s, each `smn table` paid it)
        if df <= len(_T95):
            return _T95[df - 1]
        return _t_cornish_fisher(df, _Z975)
    from scipy.special import stdtrit  # reason: other levels only; scipy.stats.t.ppf gives the same, slower

    return float(stdtrit(df, 0.5 + level / 2))


_T95 = (
    12.706204736174694, 4.302652729749462, 3.1824463052837078, 2.7764451051977934, 2.5705818356363146,
    2.4469118511449786, 2.364624251592784, 2.306004135204166, 2.262157162798205, 2.228138851986274,
    2.200985160091639, 2.1788128296672284, 2.1603686564627913, 2.144786687917804, 2.131449545559776,
    2.1199052992212546, 2.1098155778333156, 2.1009220402410382, 2.0930240544083087, 2.085963447265864,
    2.0796138447276795, 2.0738730679040254, 2.0686576104190486, 2.0638985616280245, 2.0595385527532972,
    2.0555294386428735, 2.0518305164802846, 2.0484071417952454, 2.045229642132703, 2.0422724563012378,
    2.039513446396408, 2.0369333434601016, 2.0345152974493383, 2.0322445093177186, 2.030107928250343,
    2.0280940009804502, 2.0261924630291093, 2.0243941639119694, 2.022690920036761, 2.021075390306273,
    2.019540970441376, 2.0180817028184443, 2.016692199227824, 2.0153675744437636, 2.014103388880846,
    2.012895598919429, 2.0117405137297655, 2.010634757624232, 2.0095752371292392, 2.008559112100761,
    2.007583770315836, 2.006646805061688, 2.0057459953178687, 2.0048792881880564, 2.0040447832891455,
    2.003240718847872, 2.002465459291007, 2.0017174841452356, 2.000995378088267, 2.0002978220142604,
    1.999623584994939, 1.9989715170333788, 1.998340542520741, 1.997729654317693, 1.9971379083920038,
    1.9965644189523117, 1.996008354025296, 1.9954689314298435, 1.9949454151072374, 1.994437111771186,
    1.9939433678456255, 1.9934635666618719, 1.992997125889855, 1.992543495180932, 1.9921021540022417,
    1.9916726096446642, 1.9912543953883846, 1.9908470688116906, 1.9904502102301285, 1.990063421254446,
    1.9896863234569029, 1.989318557136572, 1.9889597801751624, 1.9886096669757083, 1.9882679074772216,
    1.98793420623902, 1.9876082815890708, 1.9872898648311692, 1.986978699506281, 1.9866745407037683,
    1.9863771544186177, 1.98608631695113, 1.9858018143458227, 1.985523441866604, 1.9852510035054978,
    1.984984311522457, 1.9847231860139845, 1.9844674545084815, 1.9842169515864174,
)
"""``scipy.special.stdtrit(df, 0.975)`` for df = 1..99 (the two-sided 95 % Student-t quantiles), stored so that a
table need not import scipy; ``tests/test_intervals.py`` compares them, and :func:`_t_cornish_fisher` beyond,
with scipy."""

_Z975 = statistics.NormalDist().inv_cdf(0.975)


def _t_cornish_fisher(df: int, z: float) -> float:
    """The Student-t quantile at the normal quantile ``z`` by its Cornish-Fisher expansion in ``1 / df`` to the
    fourth order (Abramowitz & Stegun 26.7.5): within 1e-10 of scipy's for df >= 100."""
    terms = (z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96, \
        (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384, \
        (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + sum(t / df ** (i + 1) for i, t in enumerate(terms))


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


def _correctness_pair(correct_a, correct_b, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Two per-image correctness arrays as ``(seeds, images)`` arrays of ``dtype``.

    Raises:
        ValueError: the arrays differ in shape, or hold no image.
    """
    a = np.atleast_2d(np.asarray(correct_a, dtype=dtype))
    b = np.atleast_2d(np.asarray(correct_b, dtype=dtype))
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"per-image correctness of shapes {a.shape} and {b.shape}; allowed: the same "
                         "(seeds, images) shape, at least one image")
    return a, b


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
    a, b = _correctness_pair(correct_a, correct_b, float)
    d = (a - b).mean(axis=0)  # per image, averaged over seeds
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    boots = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(boots, [tail, 1 - tail])
    return Interval(float(d.mean()), float(lo), float(hi), int(a.size), "paired bootstrap over images")


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar tests of two methods on the same test images: ``per_seed`` two-sided p-values (one per
    seed), and ``p`` of the seeds combined; ``only_a`` / ``only_b`` the discordant images summed over seeds (images
    only ``a`` / only ``b`` got right)."""

    p: float
    per_seed: tuple[float, ...]
    only_a: int
    only_b: int


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact McNemar test per seed, and the seeds combined, for ``a`` against ``b`` on the same images.

    Per seed: of the discordant images (right for one method only), ``only_a`` under H0 is Binomial(discordant,
    1/2); the two-sided exact p is ``scipy.stats.binomtest``'s. Combined: the seeds are strata of the same design,
    so their discordant counts are summed and tested the same way (the exact conditional test of a common
    odds ratio of 1 across strata, the Mantel-Haenszel setting with one discordant-pair table per seed).

    Args:
        correct_a, correct_b: per-image correctness, shape ``(seeds, images)`` (bool or 0/1).

    Raises:
        ValueError: the arrays differ in shape or hold no image.
    """
    from scipy.stats import binomtest  # lazy: scipy.stats takes a second to import

    a, b = _correctness_pair(correct_a, correct_b, bool)
    only_a = (a & ~b).sum(axis=1)
    only_b = (~a & b).sum(axis=1)

    def p_of(x: int, y: int) -> float:
        return 1.0 if x + y == 0 else float(binomtest(int(x), int(x + y), 0.5).pvalue)

    return McNemar(p_of(only_a.sum(), only_b.sum()), tuple(p_of(x, y) for x, y in zip(only_a, only_b)),
                   int(only_a.sum()), int(only_b.sum()))


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


def stat_text(values: Sequence[float], digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """A mean over seeds as every table writes it: ``"0.685 ± 0.012 [0.655, 0.715]"`` (mean, sample std and the
    95 % t-interval of the mean, :func:`t_interval`; values times ``scale``, ``unit`` after the mean:
    ``"97.5% ± 0.6 [96.0, 99.0]"``); the mean alone for one value; ``"-"`` for none (NaN and None ignored)."""
    ci = t_interval(values)
    if not math.isfinite(ci.mean):
        return "-"
    text = f"{ci.mean * scale:.{digits}f}{unit}"
    if not ci.known:
        return text
    v = np.asarray([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    return text + f" ± {float(v.std(ddof=1)) * scale:.{digits}f} [{ci.lo * scale:.{digits}f}, {ci.hi * scale:.{digits}f}]"


def difference_text(d: Interval, scale: float = 100.0) -> str:
    """A paired difference in points (``scale`` 100: accuracies 0-1): ``"+4.1 [+1.0, +7.2] gain"``, marked
    ``gain`` / ``loss`` only when the interval excludes 0 (:func:`verdict`); ``"+1.2 (1 seed)"`` without an
    interval; ``"+0.3 (same every seed)"`` when every seed gave the same difference (two deterministic
    evaluations: the seeds say nothing of the test images' sampling); ``"-"`` without a value."""
    if not math.isfinite(d.mean):
        return "-"
    if not d.known:
        return f"{scale * d.mean:+.1f} (1 seed)"
    if d.lo == d.hi:
        return f"{scale * d.mean:+.1f} (same every seed)"
    mark = {GAIN: " gain", LOSS: " loss"}.get(verdict(d), "")
    return f"{scale * d.mean:+.1f} [{scale * d.lo:+.1f}, {scale * d.hi:+.1f}]{mark}"


def p_text(p: float) -> str:
    """A p-value for a table: ``"0.013"``, ``"<0.001"``, ``"-"`` for NaN."""
    if not math.isfinite(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
