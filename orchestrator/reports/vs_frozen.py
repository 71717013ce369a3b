"""Does adaptation beat the frozen backbone it adapts? (layout ``vs_frozen``, printed by ``smn run``)

Every adapted method (SMN, STN, supervised masking, FFT) and the BN control (``pretrained_bn``) set
beside the frozen backbone (``pretrained``) of the same backbone, dataset and evaluation (the cells' configs
without ``method``, ``train`` and the seed agree): the paper's k-NN (k = 200, T = 0.1), DINO's k-NN (k = 20,
T = 0.07) and the linear probe, each as mean ± std over seeds with its 95 % interval, and the *paired*
difference to the frozen backbone in accuracy points with its 95 % interval:

* over the same test images and seeds (:func:`orchestrator.reports.intervals.paired_bootstrap`) when both
  cells stored their per-image correctness (:mod:`orchestrator.results.per_image`);
* otherwise over seeds (:func:`orchestrator.reports.intervals.paired_seed_interval`: the t-interval of the
  per-seed differences, the seeds both have).

When the ledger holds random-mask control cells (methods ``random_mask`` and ``random_mask_magnitude``,
:mod:`smn_core.random_mask`), SMN and STN rows also get ``<metric> vs random mask``: the paired difference to
the strongest random-mask setting (method and grid values) of the same grid values (:func:`_strongest_random`),
in the same form; each control's row has there what SMN gains over that control (``smn +x [lo, hi]``).

Where both sides stored per-image correctness, each comparison also gets an exact McNemar p-value
(``<metric> vs frozen: McNemar p``, ``<metric> vs random mask: McNemar p``; on a control's row, SMN against that
control): :func:`orchestrator.reports.intervals.mcnemar` with the seeds combined, i.e. of the test images only one
side got right (summed over seeds), the two-sided binomial test that each side is that one with probability 1/2.

A difference is marked ``gain`` only when its whole interval is above 0 (``loss`` below 0); one whose interval
holds 0, or that has none (one seed), carries no mark, nor does a difference paired over seeds that is the
same for every seed (two deterministic evaluations, e.g. the BN control against the frozen backbone: the
seeds say nothing about the test images' sampling there). One row per setting (the registry splits settings,
:mod:`orchestrator.reports.settings`), with the number of collapsed cells.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from orchestrator.reports.baselines import cell_frame
from orchestrator.reports.intervals import (Interval, difference_text, mcnemar, p_text, paired_bootstrap,
                                            paired_seed_interval, stat_text)
from orchestrator.results.per_image import load_correctness, root_of
from orchestrator.reports.registry import register_table
from orchestrator.reports.settings import grid_text
from orchestrator.spec.keys import config_hash

__all__ = ["vs_frozen", "COMPARED", "paired_difference", "paired_correctness", "mcnemar_text", "MCNEMAR", "reference_key", "RANDOM", "RANDOMS", "MASKED", "vs_frozen_val", "VALIDATION"]

COMPARED = (("knn_top1", "k-NN (k=200)"), ("knn_dino_top1", "k-NN (k=20)"), ("linear_probe_top1", "linear probe"))


def reference_key(config: dict) -> str:
    """What a cell shares with its frozen reference: :func:`orchestrator.spec.keys.config_hash` of its config
    without ``method``, ``train`` and ``seed`` (backbone, pretraining, dataset and split, evaluation)."""
    return config_hash({k: v for k, v in config.items() if k not in ("method", "train", "seed")})


def paired_correctness(cells: pd.DataFrame, frozen: pd.DataFrame, metric: str,
                       results: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-image correctness of ``cells`` and ``frozen`` on ``metric``, ``(seeds, images)`` bool each, over the
    seeds both sides have a value for (rows in seed order), read under ``results``
    (:func:`orchestrator.results.per_image.load_correctness`); None when ``results`` is None, no seed is shared,
    or a cell of a shared seed stored no such file (or files of other lengths). Each frame: one row per cell with
    ``experiment``, ``cell_id``, ``seed`` and ``metric``."""
    if not results or metric not in cells or metric not in frozen:
        return None
    mine = {int(s): (e, c) for s, e, c, v in zip(cells["seed"], cells["experiment"], cells["cell_id"], cells[metric])
            if pd.notna(v)}
    ref = {int(s): (e, c) for s, e, c, v in zip(frozen["seed"], frozen["experiment"], frozen["cell_id"], frozen[metric])
           if pd.notna(v)}
    shared = sorted(set(mine) & set(ref))
    if not shared:
        return None
    a = [load_correctness(results, *mine[s], metric) for s in shared]
    b = [load_correctness(results, *ref[s], metric) for s in shared]
    if any(x is None for x in a + b) or len({x.shape for x in a + b}) != 1:
        return None
    return np.stack(a), np.stack(b)


def paired_difference(cells: pd.DataFrame, frozen: pd.DataFrame, metric: str, results: str | None) -> Interval:
    """``cells - frozen`` on ``metric`` (accuracy, 0-1): paired over images and seeds when every seed both
    sides share has stored per-image correctness under ``results`` (:func:`paired_correctness`), else paired
    over seeds. Each frame: one row per cell with ``experiment``, ``cell_id``, ``seed`` and ``metric``."""
    pair = paired_correctness(cells, frozen, metric, results)
    if pair is not None:
        return paired_bootstrap(*pair)
    mine = {int(s): v for s, v in zip(cells["seed"], cells[metric]) if pd.notna(v)}
    ref = {int(s): v for s, v in zip(frozen["seed"], frozen[metric]) if pd.notna(v)}
    return paired_seed_interval(mine, ref)


def mcnemar_text(cells: pd.DataFrame, other: pd.DataFrame, metric: str, results: str | None) -> str:
    """The exact McNemar p-value of ``cells`` against ``other`` on ``metric``, the seeds combined
    (:func:`orchestrator.reports.intervals.mcnemar`: the images only one side got right, summed over the shared
    seeds, tested against Binomial(n, 1/2)); ``""`` when a side stored no per-image correctness."""
    pair = paired_correctness(cells, other, metric, results)
    return "" if pair is None else p_text(mcnemar(*pair).p)


@register_table("vs_frozen", "Adapted vs frozen backbone: k-NN (k=200, k=20), linear probe (mean ± std [95 % "
                "interval]); vs frozen (and vs random mask, when the ledger has that control) = paired difference "
                "in points [95 % interval], marked gain / loss only when the interval excludes 0; McNemar p (where "
                "the cells stored per-image correctness) = exact two-sided McNemar test, seeds combined: of the "
                "test images only one of the two got right, are both equally likely to be the one; collapsed cells")
def vs_frozen(df: pd.DataFrame, compared: tuple[tuple[str, str], ...] = COMPARED) -> pd.DataFrame:
    """One row per (backbone, dataset, method, setting) with a ``pretrained`` reference.

    Columns: for each metric of :data:`COMPARED`, ``<name>`` (mean ± std over seeds and the 95 % t-interval)
    and ``<name> vs frozen`` (:func:`paired_difference` in accuracy points, signed, with its 95 % interval and
    ``gain`` / ``loss`` when the interval excludes 0), ``<name> vs frozen: McNemar p`` (:func:`mcnemar_text`; the
    McNemar columns only when some comparison has per-image correctness); ``paired over`` (``images x seeds`` or ``seeds``);
    ``collapsed`` (collapsed cells / cells). Empty when the ledger has no ``pretrained`` cell, or no cell has
    any of the ``compared`` metrics (``(metric, column name)``; :data:`VALIDATION` for ``vs_frozen_val``).
    """
    if df.empty or not {m for m, _ in compared} & set(df["metric"].unique()) or not (df["method"] == "pretrained").any():
        return pd.DataFrame()  # before the wide frame: most pages have no val_* metric
    cells = cell_frame(df)
    results = root_of(df.attrs)
    cells = cells.assign(grid=cells["grid_json"].map(grid_text), ref=cells["config"].map(reference_key))
    rows = []
    for (backbone, data), group in cells.groupby(["backbone", "data"], sort=False):
        frozen_all = group[group["method"] == "pretrained"]
        for ref_key, frozen in frozen_all.groupby("ref", sort=False):
            rows += _rows(backbone, data, frozen, group[(group["method"] != "pretrained") & (group["ref"] == ref_key)],
                          results, label=grid_text(frozen["grid_json"].iloc[0]), compared=compared)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    empty = [c for c in frame.columns if str(c).endswith(MCNEMAR) and not frame[c].fillna("").astype(bool).any()]
    return frame.drop(columns=empty).set_index(["Backbone", "Dataset", "Method"])


MCNEMAR = ": McNemar p"
"""Suffix of the McNemar columns (``k-NN (k=20) vs frozen: McNemar p``): shown only when some row has a value,
i.e. both sides of a comparison stored per-image correctness."""


RANDOM = "random_mask"
"""The random-mask control (issue 25): a mask of the same count per layer as an SMN cell's, drawn at random."""
RANDOMS = (RANDOM, "random_mask_magnitude")
"""Every random-mask control method (:data:`smn_core.config.CONTROLS`: ``match`` count, magnitude)."""
MASKED = ("smn", "stn")
"""Methods compared with the random-mask control (column ``<metric> vs random mask``)."""


def _strongest_random(randoms: pd.DataFrame, grid: str, metric: str) -> pd.DataFrame | None:
    """The random-mask setting to compare a masked method's row with: among the random-mask cells of the same
    grid values (else all of them), the setting (grid label) with the highest mean ``metric``: the strongest
    control, so a gain over it is a gain over every one. None when no random-mask cell has ``metric``."""
    same = randoms[randoms["grid"] == grid]
    pool = same if not same.empty else randoms
    if metric not in pool or pool[metric].dropna().empty:
        return None
    method, best = pool.groupby(["method", "grid"])[metric].mean().idxmax()
    return pool[(pool["method"] == method) & (pool["grid"] == best)]


def _vs_random(method: str, grid: str, g: pd.DataFrame, others: pd.DataFrame, randoms: pd.DataFrame, metric: str,
               results: str | None) -> tuple[str, str]:
    """The ``vs random mask`` cell of a row and its McNemar p (:func:`mcnemar_text`): an SMN / STN row against
    the strongest control (:func:`_strongest_random`); a control's row says what SMN of the same grid values gains
    over it (``smn +x [lo, hi]``, SMN minus this control); other rows nothing."""
    if method in MASKED:
        control = _strongest_random(randoms, grid, metric)
        if control is None:
            return "", ""
        return (difference_text(paired_difference(g, control, metric, results)),
                mcnemar_text(g, control, metric, results))
    if method not in RANDOMS:
        return "", ""
    smn = others[others["method"] == "smn"]
    same = smn[smn["grid"] == grid]
    smn = same if not same.empty else (smn if smn["grid"].nunique() == 1 else smn.iloc[0:0])
    if smn.empty or metric not in smn or smn[metric].dropna().empty:
        return "", ""
    return ("smn " + difference_text(paired_difference(smn, g, metric, results)),
            mcnemar_text(smn, g, metric, results))


def _rows(backbone: str, data: str, frozen: pd.DataFrame, others: pd.DataFrame, results: str | None,
          label: str, compared: tuple[tuple[str, str], ...]) -> list[dict]:
    rows = []
    randoms = others[others["method"].isin(RANDOMS)]
    row = {"Backbone": backbone, "Dataset": data, "Method": "frozen (pretrained)" + (f" ({label})" if label else "")}
    for m, name in compared:
        row[name] = stat_text(frozen[m]) if m in frozen else "-"
        row[f"{name} vs frozen"] = row[f"{name} vs frozen{MCNEMAR}"] = ""
        if not randoms.empty:
            row[f"{name} vs random mask"] = row[f"{name} vs random mask{MCNEMAR}"] = ""
    row["paired over"] = ""
    row["collapsed"] = ""
    rows.append(row)
    for (method, grid), g in others.groupby(["method", "grid"], sort=False):
        row = {"Backbone": backbone, "Dataset": data, "Method": method + (f" ({grid})" if grid else "")}
        how = set()
        for m, name in compared:
            if m not in g or m not in frozen or g[m].dropna().empty:
                row[name], row[f"{name} vs frozen"], row[f"{name} vs frozen{MCNEMAR}"] = "-", "-", ""
                if not randoms.empty:
                    row[f"{name} vs random mask"], row[f"{name} vs random mask{MCNEMAR}"] = "-", ""
                continue
            row[name] = stat_text(g[m])
            d = paired_difference(g, frozen, m, results)
            row[f"{name} vs frozen"] = difference_text(d)
            row[f"{name} vs frozen{MCNEMAR}"] = mcnemar_text(g, frozen, m, results)
            how.add("images x seeds" if d.method.startswith("paired bootstrap") else "seeds")
            if not randoms.empty:
                row[f"{name} vs random mask"], row[f"{name} vs random mask{MCNEMAR}"] = _vs_random(
                    method, grid, g, others, randoms, m, results)
        row["paired over"] = ", ".join(sorted(how))
        collapsed = g["collapsed"].fillna(0) if "collapsed" in g else pd.Series(0.0, index=g.index)
        row["collapsed"] = f"{int((collapsed > 0).sum())}/{len(g)}" if method in ("smn", "stn") else ""
        rows.append(row)
    return rows


VALIDATION = tuple((f"val_{m}", f"val {name}") for m, name in COMPARED)
"""The metrics of :data:`COMPARED` as cells with ``dataset.val_fraction`` write them (on the validation split)."""


@register_table("vs_frozen_val", "Adapted vs frozen backbone on the VALIDATION split (dataset.val_fraction: held out "
                "of train; for choosing settings, never for reporting): k-NN (k=200, k=20), linear probe (mean ± std "
                "[95 % interval]), paired differences in points [95 % interval]")
def vs_frozen_val(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`vs_frozen` on the ``val_*`` metrics (:data:`VALIDATION`): the table settings are chosen from."""
    return vs_frozen(df, VALIDATION)
