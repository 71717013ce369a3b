"""The paper's qualitative claims, scored against the small-scale ledgers (issue 25): ``smn report``'s scorecard
section and ``docs/results/scorecard.md``, generated from the ledger, never typed.

Each :class:`Claim` names a paper table and a comparison between groups of cells of one experiment (for
instance SMN against the frozen backbone, the threshold mask against top-k at 50 %). Each comparison is a
difference in accuracy points with its 95 % interval, paired over the seeds both groups have
(:func:`orchestrator.reports.intervals.paired_seed_interval`), or over test images and seeds where both
stored their per-image correctness (:func:`orchestrator.reports.vs_frozen.paired_difference`). A claim:

* **holds** when every comparison with an interval lies on the claimed side of 0;
* **does not** hold when some comparison's interval lies on the other side;
* is **inconclusive** otherwise: an interval holding 0, only single-seed comparisons (no interval: shown as
  evidence, without a vote), or no cells in the ledgers that test it (the evidence column says which).

Claim 8 (equivalent hyperparameters give the same masks) is judged on the share of identical mask bits the
``invariance`` layout measures from the exported masks (holds at >= 99.99 % for every equivalent pair, does
not below 99 %); it needs the results folder (``rows.attrs["results"]``), so the docs page, built from the
ledger files alone, cannot test it. The paired differences read per-image correctness under
:func:`orchestrator.results.per_image.root_of` (the docs page: ``docs/results/<experiment>/per_image/``). Only comparisons inside one experiment are made (its cells share the
data, split and evaluation).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from orchestrator.reports.ablations import frozen_label, mask_variant, setting_without
from orchestrator.reports.baselines import cell_frame, invariance
from orchestrator.reports.intervals import GAIN, LOSS, Interval, t_interval, verdict
from orchestrator.reports.settings import split_settings
from orchestrator.reports.vs_frozen import paired_difference, reference_key
from orchestrator.results.per_image import root_of

__all__ = ["Claim", "Comparison", "CLAIMS", "HOLDS", "DOES_NOT", "INCONCLUSIVE", "scorecard", "claim_verdict"]

HOLDS, DOES_NOT, INCONCLUSIVE = "holds", "does not", "inconclusive"


@dataclass(frozen=True)
class Comparison:
    """``better - worse`` on ``metric`` in one experiment: what a claim says is above 0 (``text``: its label)."""

    experiment: str
    text: str
    diff: Interval


@dataclass(frozen=True)
class Claim:
    """One qualitative claim: its text, the paper's table or figure, and ``compare(cells) -> comparisons``
    (``cells``: :func:`orchestrator.reports.baselines.cell_frame` of one experiment, settings split)."""

    text: str
    source: str
    compare: Callable[[pd.DataFrame, str | None], list[Comparison]]
    untested: str  # what cells would test it (shown when the ledgers hold none)
    judge: Callable[[list[Comparison]], str] | None = None  # None: claim_verdict
    rows: bool = False  # compare() takes the experiment's ledger rows, not its cell frame


def _diff(a: pd.DataFrame, b: pd.DataFrame, metric: str, results: str | None) -> Interval | None:
    """``a - b`` on ``metric``: paired (images or seeds) when they share seeds, else None."""
    if metric not in a or metric not in b or a[metric].dropna().empty or b[metric].dropna().empty:
        return None
    a, b = a[a[metric].notna()], b[b[metric].notna()]
    if not set(a["seed"]) & set(b["seed"]):
        return None
    return paired_difference(a.drop_duplicates("seed"), b.drop_duplicates("seed"), metric, results)


def _pairs(cells: pd.DataFrame, results: str | None, pairs, metrics=(("knn_top1", "k-NN (k=200)"),
                                                                  ("knn_dino_top1", "k-NN (k=20)"))):
    out = []
    for label, better, worse in pairs:
        for metric, name in metrics:
            d = _diff(better, worse, metric, results)
            if d is not None:
                out.append(Comparison(cells["experiment"].iloc[0], f"{label}, {name}", d))
    return out


def _smn(cells: pd.DataFrame) -> pd.DataFrame:
    return cells[cells["method"] == "smn"]


def _on_smn(compare: Callable[[pd.DataFrame, pd.DataFrame, str | None], list[Comparison]]):
    """A claim's ``compare(cells, results)`` from ``compare(cells, smn, results)``, which gets the SMN cells and
    is not called when there are none (no comparison then)."""
    @functools.wraps(compare)
    def wrapped(cells: pd.DataFrame, results: str | None) -> list[Comparison]:
        smn = _smn(cells)
        return [] if smn.empty else compare(cells, smn, results)
    return wrapped


def _one_setting(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells of ``cells``' most-seeded setting (grid_json carries the split, so it names a setting)."""
    if cells.empty:
        return cells
    counts = cells.groupby("grid_json")["seed"].nunique()
    return cells[cells["grid_json"] == counts.idxmax()]


def _frozen_of(cells: pd.DataFrame, smn: pd.DataFrame) -> pd.DataFrame:
    """The frozen cells of the same data and evaluation as ``smn``'s
    (:func:`orchestrator.reports.vs_frozen.reference_key`)."""
    frozen = cells[cells["method"] == "pretrained"]
    return frozen[frozen["config"].map(reference_key) == reference_key(smn["config"].iloc[0])]


def _beats_frozen(cells, results):
    """Each SMN setting against the frozen cells of the same data and evaluation, in the experiments whose SMN
    cells vary only the data (grid keys under ``dataset.``: a split, a target): an experiment whose SMN settings
    vary anything else is an ablation, which the claim of its own table reads; one of its arms is not "SMN"."""
    smn = _smn(cells)
    if smn.empty or (cells["method"] == "pretrained").sum() == 0:
        return []
    grids = {g: json.loads(g) for g in sorted(set(smn["grid_json"]))}
    if any(not key.startswith("dataset.") for grid in grids.values() for key in grid):
        return []
    pairs = []
    for g, grid in grids.items():
        own = smn[smn["grid_json"] == g]
        where = f" ({', '.join(f'{k}={v}' for k, v in grid.items())})" if len(grids) > 1 else ""
        pairs.append((f"SMN - frozen{where}", own, _frozen_of(cells, own)))
    return _pairs(cells, results, pairs)


def _one_setting_beats_frozen(cells, results):
    """SMN's most-seeded setting against the frozen cells of the same data and evaluation."""
    smn = _one_setting(_smn(cells))
    if smn.empty or (cells["method"] == "pretrained").sum() == 0:
        return []
    return _pairs(cells, results, [("SMN - frozen", smn, _frozen_of(cells, smn))])


def _variant_row(r: pd.Series) -> str | None:
    """:func:`orchestrator.reports.ablations.mask_variant` of a :func:`cell_frame` row (its grid parsed)."""
    row = r.copy()
    row["grid"] = json.loads(r["grid_json"])
    return mask_variant(row)


@_on_smn
def _threshold_vs_topk(cells, smn, results):
    v = smn.apply(_variant_row, axis=1)
    return _pairs(cells, results, [("threshold - top-k 50%", smn[v == "SMN (threshold)"], smn[v == "top-k 50%"])],
                  metrics=(("knn_top1", "k-NN (k=200)"), ("linear_probe_top1", "linear probe")))


def _include_bn(cells: pd.DataFrame) -> pd.Series:
    return cells["config"].map(lambda c: bool(((c.get("train") or {}).get("mask") or {}).get("include_bn")))


@_on_smn
def _bn_masking_hurts(cells, smn, results):
    """BNs kept - BNs masked, between cells whose settings differ only in ``train.mask.include_bn``."""
    bn, key = _include_bn(smn), smn["config"].map(lambda c: setting_without(c, "train.mask.include_bn"))
    return _pairs(cells, results, [("BN kept - BN masked", smn[~bn & (key == k)], smn[bn & (key == k)])
                                   for k in sorted(set(key[bn]) & set(key[~bn]))])


@_on_smn
def _frozen_layers(cells, smn, results):
    """BNs frozen - another choice of frozen layers (Table 5b's: nothing frozen, biases frozen, or the BNs masked
    too), between cells whose settings differ only in what is masked (``train.mask.selector``,
    ``train.mask.include_bn``); a selector that masks other layers (a regex naming a stage) is no such choice."""
    lab = smn.apply(frozen_label, axis=1)
    key = smn["config"].map(lambda c: setting_without(c, "train.mask.selector", "train.mask.include_bn"))
    return _pairs(cells, results, [(f"BNs frozen - {other} frozen", smn[(lab == "BNs") & (key == k)],
                                    smn[(lab == other) & (key == k)])
                                   for k in sorted(set(key[lab == "BNs"]))
                                   for other in sorted(set(lab[key == k]))
                                   if other in ("none", "biases") or other.endswith(" +BN")])


@_on_smn
def _prototypes(cells, smn, results):
    k = smn["config"].map(lambda c: c["train"]["swav"]["num_prototypes"])
    if k.nunique() < 2:
        return []
    return _pairs(cells, results, [(f"{k.max()} - {k.min()} prototypes", smn[k == k.max()], smn[k == k.min()])])


def _initialisations(cells, results):
    weights = cells["config"].map(lambda c: f"{c['backbone']['arch']} ({c['backbone']['weights']})")
    if weights.nunique() < 2:
        return []
    out = []
    for w in sorted(set(weights)):
        sub = cells[weights == w]
        out += [Comparison(c.experiment, f"{w}: {c.text}", c.diff) for c in _one_setting_beats_frozen(sub, results)]
    return out


def _cascade(cells, results):
    by = {m: cells[cells["method"] == m] for m in ("cascade_unconditional", "cascade_conditional", "smn")}
    if any(g.empty for g in by.values()):
        return []
    return _pairs(cells, results, [("unconditional - conditional", by["cascade_unconditional"],
                                    by["cascade_conditional"]),
                                   ("conditional - single SMN", by["cascade_conditional"], by["smn"])],
                  metrics=(("knn_top1", "k-NN (k=200)"),))


IDENTICAL = 0.9999
"""Claim 8 holds when every equivalent pair shares at least this fraction of mask bits (App. A: exactly the
same masks), and does not when one shares less than :data:`DIFFERENT`."""
DIFFERENT = 0.99


def _equivalent_masks(rows: pd.DataFrame, results: str | None) -> list[Comparison]:
    """The invariance layout (:func:`orchestrator.reports.baselines.invariance`, which reads the exported masks
    under ``results``): for each cell equivalent to its reference, the share of identical mask bits, as an
    interval of width 0 (a measured share, no sampling)."""
    if not results:
        return []
    rows = rows.copy()
    rows.attrs = {**rows.attrs, "results": results}
    table = invariance(rows)
    if table.empty:
        return []
    table = table.reset_index()
    out = []
    for _, r in table[table["equivalent"] == "yes"].iterrows():
        if r["identical mask bits"] == "-":
            continue
        share = float(str(r["identical mask bits"]).rstrip("%")) / 100
        out.append(Comparison(str(rows["experiment"].iloc[0]), f"identical mask bits, (S0, mu, lr) = ({r['S0']}, "
                              f"{r['mu']}, {r['lr']}) vs the reference", Interval(share, share, share, 1, "measured")))
    return out


def _judge_identical(comparisons: list[Comparison]) -> str:
    if not comparisons:
        return INCONCLUSIVE
    shares = [c.diff.mean for c in comparisons]
    if all(v >= IDENTICAL for v in shares):
        return HOLDS
    return DOES_NOT if any(v < DIFFERENT for v in shares) else INCONCLUSIVE


def _density(cells, results):
    smn = _one_setting(_smn(cells))
    if smn.empty or "density" not in smn or smn["density"].dropna().empty:
        return []
    return [Comparison(cells["experiment"].iloc[0], "SMN density - 50 %", t_interval(list(smn["density"] - 0.5)))]


def _lowshot(cells, results):
    cols = sorted(c for c in cells.columns if str(c).startswith("lowshot_top1@"))
    smn, frozen = _smn(cells), cells[cells["method"] == "pretrained"]
    if not cols or smn.empty or frozen.empty:
        return []
    return _pairs(cells, results, [("SMN - frozen", smn, frozen)],
                  metrics=[(c, f"probe with {float(c.split('@')[1]):.0%} of labels") for c in cols])


CLAIMS = (
    Claim("SMN beats the frozen backbone on k-NN", "Table 1", _beats_frozen, "smn and pretrained cells"),
    Claim("Threshold masking is at least as good as top-k at 50 %", "Table 2", _threshold_vs_topk,
          "smn cells with train.mask.mode threshold and topk (topk_density 0.5)"),
    Claim("Masking the BatchNorm parameters hurts", "Table 2 / 5b", _bn_masking_hurts,
          "smn cells with train.mask.include_bn true and false"),
    Claim("Fewer prototypes is worse", "Table 5a", _prototypes, "smn cells with several train.swav.num_prototypes"),
    Claim("Keeping the BatchNorms frozen is the best choice of frozen layers", "Table 5b", _frozen_layers,
          "smn cells with several train.mask.selector values"),
    Claim("SMN works from each pretrained initialisation", "Table 5c", _initialisations,
          "smn and pretrained cells on two or more backbone initialisations"),
    Claim("Cascade: unconditional > conditional > single model", "Table 3", _cascade,
          "cascade_unconditional, cascade_conditional and smn cells"),
    Claim("Equivalent hyperparameters give the same masks", "Sec. 3.2, App. A / Fig. 5", _equivalent_masks,
          "cells with equivalent (S0, mu, lr) and their exported masks (layout invariance)", _judge_identical,
          rows=True),
    Claim("The masks keep most weights active", "Table 8", _density, "smn cells (density)"),
    Claim("SMN helps in the low-shot regime", "Fig. 3", _lowshot,
          "smn and pretrained cells with eval.lowshot_fractions"),
)
"""The claims scored, in the issue's order."""


def claim_verdict(comparisons: list[Comparison]) -> str:
    """Over the comparisons that have an interval (one seed gives none: it is shown, it does not vote):
    :data:`HOLDS` when every one is a gain, :data:`DOES_NOT` when one is a loss, else :data:`INCONCLUSIVE`
    (also when none has an interval)."""
    kinds = [verdict(c.diff) for c in comparisons if c.diff.known]
    if not kinds:
        return INCONCLUSIVE
    if LOSS in kinds:
        return DOES_NOT
    return HOLDS if all(k == GAIN for k in kinds) else INCONCLUSIVE


def _evidence_text(c: Comparison) -> str:
    d = c.diff
    if not math.isfinite(d.mean):
        return f"{c.experiment}: {c.text}: -"
    if d.method == "measured":
        return f"{c.experiment}: {c.text}: {100 * d.mean:.4f}%"
    scale, unit = (100, " points")
    how = {"paired bootstrap over images": "images x seeds", "paired t over seeds": f"{d.n} seeds paired",
           "t over seeds": f"{d.n} seeds"}.get(d.method, d.method)
    text = f"{c.experiment}: {c.text}: {scale * d.mean:+.1f}"
    text += f" [{scale * d.lo:+.1f}, {scale * d.hi:+.1f}]{unit} ({how})" if d.known else f"{unit} (one seed: no interval)"
    return text


def scorecard(rows: pd.DataFrame) -> pd.DataFrame:
    """The scorecard of ledger rows (every experiment's; comparisons stay inside one experiment).

    Returns:
        One row per claim of :data:`CLAIMS`: ``#``, ``Claim``, ``Paper``, ``Evidence`` (each comparison:
        experiment, what minus what, the difference in points with its 95 % interval and how it was paired;
        or which cells would test the claim), ``Verdict`` (holds / does not / inconclusive).
    """
    results, paired_root = rows.attrs.get("results"), root_of(rows.attrs)
    per_exp = []
    if not rows.empty:
        rows = split_settings(rows)
        for exp, part in rows.groupby("experiment", sort=True):
            part = part.copy()
            part.attrs = dict(rows.attrs)
            per_exp.append((part, cell_frame(part)))
    out = []
    for i, claim in enumerate(CLAIMS, 1):
        comps = []
        for part, cells in per_exp:
            try:
                comps += claim.compare(part, results) if claim.rows else claim.compare(cells, paired_root)
            except (KeyError, TypeError, ValueError):  # cells whose config lacks what the claim reads
                continue
        evidence = "; ".join(_evidence_text(c) for c in comps) or f"no cells in these ledgers test it (needs {claim.untested})"
        out.append({"#": i, "Claim": claim.text, "Paper": claim.source, "Evidence": evidence,
                    "Verdict": (claim.judge or claim_verdict)(comps)})
    return pd.DataFrame(out)
