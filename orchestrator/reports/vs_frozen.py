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
from orchestrator.reports.intervals import Interval, paired_bootstrap, paired_seed_interval, t_interval, verdict
from orchestrator.results.per_image import load_correctness
from orchestrator.reports.registry import mean_std, register_table
from orchestrator.spec.keys import config_hash

__all__ = ["vs_frozen", "COMPARED", "paired_difference", "reference_key", "RANDOM", "RANDOMS", "MASKED", "vs_frozen_val", "VALIDATION"]

COMPARED = (("knn_top1", "k-NN (k=200)"), ("knn_dino_top1", "k-NN (k=20)"), ("linear_probe_top1", "linear probe"))


def _grid_label(grid_json: str) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(json.loads(grid_json).items()))


def reference_key(config: dict) -> str:
    """What a cell shares with its frozen reference: :func:`orchestrator.spec.keys.config_hash` of its config
    without ``method``, ``train`` and ``seed`` (backbone, pretraining, dataset and split, evaluation)."""
    return config_hash({k: v for k, v in config.items() if k not in ("method", "train", "seed")})


def paired_difference(cells: pd.DataFrame, frozen: pd.DataFrame, metric: str, results: str | None) -> Interval:
    """``cells - frozen`` on ``metric`` (accuracy, 0-1): paired over images and seeds when every seed both
    sides share has stored per-image correctness under ``results`` (:func:`load_correctness`), else paired
    over seeds. Each frame: one row per cell with ``experiment``, ``cell_id``, ``seed`` and ``metric``."""
    mine = {int(s): v for s, v in zip(cells["seed"], cells[metric]) if pd.notna(v)}
    ref = {int(s): v for s, v in zip(frozen["seed"], frozen[metric]) if pd.notna(v)}
    shared = sorted(set(mine) & set(ref))
    if results and shared:
        by_seed_a = dict(zip(cells["seed"].astype(int), zip(cells["experiment"], cells["cell_id"])))
        by_seed_b = dict(zip(frozen["seed"].astype(int), zip(frozen["experiment"], frozen["cell_id"])))
        a = [load_correctness(results, *by_seed_a[s], metric) for s in shared]
        b = [load_correctness(results, *by_seed_b[s], metric) for s in shared]
        if all(x is not None for x in a + b) and len({x.shape for x in a + b}) == 1:
            return paired_bootstrap(np.stack(a), np.stack(b))
    return paired_seed_interval(mine, ref)


def _diff_text(d: Interval) -> str:
    if not np.isfinite(d.mean):
        return "-"
    mark = {"gain": " gain", "loss": " loss"}.get(verdict(d), "")
    if not d.known:
        return f"{100 * d.mean:+.1f} (1 seed)"
    if d.lo == d.hi:  # both sides deterministic: the seeds say nothing of the test images' sampling
        return f"{100 * d.mean:+.1f} (same every seed)"
    return f"{100 * d.mean:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]{mark}"


def _stat_text(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "-"
    ci = t_interval(list(v))
    return mean_std(v.mean(), v.std(), len(v)) + (f" [{ci.lo:.3f}, {ci.hi:.3f}]" if ci.known else "")


@register_table("vs_frozen", "Adapted vs frozen backbone: k-NN (k=200, k=20), linear probe (mean ± std [95 % "
                "interval]); vs frozen (and vs random mask, when the ledger has that control) = paired difference "
                "in points [95 % interval], marked gain / loss only when the interval excludes 0; collapsed cells")
def vs_frozen(df: pd.DataFrame, compared: tuple[tuple[str, str], ...] = COMPARED) -> pd.DataFrame:
    """One row per (backbone, dataset, method, setting) with a ``pretrained`` reference.

    Columns: for each metric of :data:`COMPARED`, ``<name>`` (mean ± std over seeds and the 95 % t-interval)
    and ``<name> vs frozen`` (:func:`paired_difference` in accuracy points, signed, with its 95 % interval and
    ``gain`` / ``loss`` when the interval excludes 0); ``paired over`` (``images x seeds`` or ``seeds``);
    ``collapsed`` (collapsed cells / cells). Empty when the ledger has no ``pretrained`` cell, or no cell has
    any of the ``compared`` metrics (``(metric, column name)``; :data:`VALIDATION` for ``vs_frozen_val``).
    """
    if df.empty or not {m for m, _ in compared} & set(df["metric"].unique()) or not (df["method"] == "pretrained").any():
        return pd.DataFrame()  # before the wide frame: most pages have no val_* metric
    cells = cell_frame(df)
    results = df.attrs.get("results")
    cells = cells.assign(grid=cells["grid_json"].map(_grid_label), ref=cells["config"].map(reference_key))
    rows = []
    for (backbone, data), group in cells.groupby(["backbone", "data"], sort=False):
        frozen_all = group[group["method"] == "pretrained"]
        for ref_key, frozen in frozen_all.groupby("ref", sort=False):
            rows += _rows(backbone, data, frozen, group[(group["method"] != "pretrained") & (group["ref"] == ref_key)],
                          results, label=_grid_label(frozen["grid_json"].iloc[0]), compared=compared)
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).set_index(["Backbone", "Dataset", "Method"])


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
               results: str | None) -> str:
    """The ``vs random mask`` cell of a row: an SMN / STN row against the strongest control
    (:func:`_strongest_random`); a control's row says what SMN of the same grid values gains over it
    (``smn +x [lo, hi]``, SMN minus this control); other rows nothing."""
    if method in MASKED:
        control = _strongest_random(randoms, grid, metric)
        return "" if control is None else _diff_text(paired_difference(g, control, metric, results))
    if method not in RANDOMS:
        return ""
    smn = others[others["method"] == "smn"]
    same = smn[smn["grid"] == grid]
    smn = same if not same.empty else (smn if smn["grid"].nunique() == 1 else smn.iloc[0:0])
    if smn.empty or metric not in smn or smn[metric].dropna().empty:
        return ""
    return "smn " + _diff_text(paired_difference(smn, g, metric, results))


def _rows(backbone: str, data: str, frozen: pd.DataFrame, others: pd.DataFrame, results: str | None,
          label: str, compared: tuple[tuple[str, str], ...]) -> list[dict]:
    rows = []
    randoms = others[others["method"].isin(RANDOMS)]
    row = {"Backbone": backbone, "Dataset": data, "Method": "frozen (pretrained)" + (f" ({label})" if label else "")}
    for m, name in compared:
        row[name] = _stat_text(frozen[m]) if m in frozen else "-"
        row[f"{name} vs frozen"] = ""
        if not randoms.empty:
            row[f"{name} vs random mask"] = ""
    row["paired over"] = ""
    row["collapsed"] = ""
    rows.append(row)
    for (method, grid), g in others.groupby(["method", "grid"], sort=False):
        row = {"Backbone": backbone, "Dataset": data, "Method": method + (f" ({grid})" if grid else "")}
        how = set()
        for m, name in compared:
            if m not in g or m not in frozen or g[m].dropna().empty:
                row[name], row[f"{name} vs frozen"] = "-", "-"
                if not randoms.empty:
                    row[f"{name} vs random mask"] = "-"
                continue
            row[name] = _stat_text(g[m])
            d = paired_difference(g, frozen, m, results)
            row[f"{name} vs frozen"] = _diff_text(d)
            how.add("images x seeds" if d.method.startswith("paired bootstrap") else "seeds")
            if not randoms.empty:
                row[f"{name} vs random mask"] = _vs_random(method, grid, g, others, randoms, m, results)
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
