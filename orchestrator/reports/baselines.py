"""The paper's baselines and analyses as tables and figures: Table 1, Fig. 3, Fig. 5, Table 8 with
Figs. 6-7, Table 10.

Registered with :mod:`orchestrator.reports.registry` (``smn table DIR --layout NAME``, ``smn plot DIR --figure NAME``):

==================  ===========================================================================================
name                what (source of the numbers)
==================  ===========================================================================================
``table1``          Table 1: k-NN / linear probe of the frozen backbone, FFT, supervised masking (and SMN,
                    STN when present) per dataset, with the storage a task costs ("Size", Mbit) (ledger)
``lowshot``         Fig. 3 as numbers: top-1 against the share of labels (ledger)
``invariance``      Sec. 3.2 / App. A: runs with different (S0, mu, lr) against the reference (1, 0, 50):
                    share of identical mask bits, largest loss difference (ledger + exported masks)
``table8``          Table 8: share of weights kept (density) per backbone, method and dataset (ledger)
``sparsity_blocks`` density per ResNet stage / block or ViT block (exported masks)
``table10``         Table 10: one cell over several seeds, each run, mean and std (ledger)
``fig3``            Fig. 3: low-shot curves (ledger)
``fig5``            Fig. 5: loss curves of equivalent and of one-at-a-time hyperparameters (ledger)
``fig6``            Fig. 6: sparsity per ViT block and projection, weights and biases (exported masks)
``fig7``            Fig. 7: sparsity per ResNet layer, SMN against supervised masking, mean ± std over
                    datasets (exported masks)
==================  ===========================================================================================

Layouts that read masks need the results folder: ``df.attrs["results"]`` (the folder or URI the
ledger was read from); masks are ``<results>/<experiment>/masks/<cell_id>.safetensors``.

Put each table's experiments in a results folder of their own (``smn run SPEC --results
results/table1``): a layout uses every cell of the ledger it is given.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import PurePath

import numpy as np
import pandas as pd
from safetensors.numpy import load as load_arrays

from smn_core.analysis import mask_agreement, tensor_densities
from smn_core.checkpoint import location_exists

from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout, filesystem
from orchestrator.reports.intervals import difference_text, paired_seed_interval, stat_text, t_interval
from orchestrator.reports.registry import mean_std, register_figure, register_table, save_figure
from orchestrator.reports.settings import KEYS, grid_text, setting_label

__all__ = ["cell_frame", "load_cell_masks", "table1", "lowshot", "invariance", "table8", "sparsity_blocks",
           "table10", "fig3", "fig5", "fig6", "fig7"]

_META = ["experiment", "method", "backbone", "dataset", "seed", "grid_json", "config_json"]
_LOWSHOT = re.compile(r"^lowshot_top1@(.+)$")
_EPOCH_LOSS = re.compile(r"^train_loss@(\d+)$")
_REFERENCE = (1.0, 0.0, 50.0)  # (S0, mu, lr) of the paper (Sec. 4.1)


# ---------------------------------------------------------------------------------------------
# ledger helpers


def _ranges(values: list) -> str:
    """``[5, 6, 7, 9]`` -> ``"5-7,9"`` (ints); other values joined by commas."""
    if not all(isinstance(v, int) for v in values):
        return ",".join(map(str, values))
    out, start, prev = [], None, None
    for v in sorted(values):
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = v
    out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out)


def _dataset_label(config: dict) -> str:
    """Short dataset name of a cell: the source (or the folder of a parquet / image folder), with the
    class subset: ``digits[5-9]``, ``cifar10``."""
    d = config.get("dataset", {})
    src = d.get("source", "?")
    name = PurePath(d["root"]).name if src in ("parquet", "imagefolder") and d.get("root") else src
    if d.get("classes"):
        name += f"[{_ranges(list(d['classes']))}]"
    return name


_DATASET_KEYS = ("dataset", "dataset.source", "dataset.root", "dataset.classes", "dataset.download")


def _setting(grid_json: str, drop: tuple[str, ...] = _DATASET_KEYS) -> str:
    """The grid values of a cell except the keys in ``drop`` (by default those naming the dataset,
    which tables show as columns), as ``k=v, ...``."""
    return grid_text(grid_json, drop)


def cell_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: ``cell_id``, the ledger's meta columns, one column per metric, ``config``
    (the parsed config), ``data`` (short dataset label) and ``setting`` (the keys that
    :func:`orchestrator.reports.settings.split_settings` added to tell settings apart, ``k=v, ...``; ``""``
    for most cells). Empty for an empty ledger."""
    if df.empty:
        return pd.DataFrame()
    keys = df.attrs.get(KEYS, ())
    cells = ledger.wide(df)
    cells = cells[["cell_id", *_META, *(c for c in cells.columns if c not in ledger.META_COLUMNS and c != "cell_id")]]
    cells["config"] = cells["config_json"].map(json.loads)
    cells["data"] = cells["config"].map(_dataset_label)
    cells["setting"] = cells["grid_json"].map(lambda g: setting_label(json.loads(g), keys))
    return cells


def _results(df: pd.DataFrame, what: str) -> str:
    root = df.attrs.get("results")
    if not root:
        raise ValueError(f"{what} reads the cells' exported masks, so it needs the results folder: set "
                         "df.attrs['results'] to the folder (or URI) the ledger was read from")
    return str(root)


def load_cell_masks(results: str, experiment: str, cell_id: str) -> dict | None:
    """The exported masks of a finished cell (``{name: bool numpy array}``), or None if the cell wrote none.

    Reads :meth:`ExperimentLayout.mask` (``<results>/<experiment>/masks/<cell_id>.safetensors``; local path
    or pyarrow URI; no pickle) with ``safetensors.numpy``, so that a report never loads torch
    (:mod:`smn_core.analysis` counts numpy arrays).

    Raises:
        ValueError: if the file exists but is not a readable safetensors file.
    """
    location = ExperimentLayout.of(results, experiment).mask(cell_id)
    if not location_exists(location):
        return None
    fs, inner = filesystem(location)
    with fs.open_input_stream(inner) as f:
        blob = f.read()
    try:
        return load_arrays(blob)
    except Exception as exc:  # safetensors raises SafetensorError on bad bytes
        raise ValueError(f"{location} is not a readable safetensors file: {exc}") from exc


def _stat(values: pd.Series, fmt=None) -> str:
    v = values.dropna()
    if v.empty:
        return "-"
    if fmt is not None:
        return fmt(v)
    return mean_std(v.mean(), v.std(), len(v))


def _with_interval(v: pd.Series) -> str:
    """``mean ± std`` over seeds and, with two seeds or more, the 95 % t-interval of the mean (``[lo, hi]``)."""
    return stat_text(list(v))


def _pct(v: pd.Series) -> str:
    """A share in %: ``97.5% ± 0.6 [96.0, 99.0]`` (mean ± std [95 % interval] over seeds)."""
    return stat_text(list(v), digits=1, scale=100.0, unit="%")


def _mbit(bits: float) -> str:
    mb = bits / 1e6
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.1f}" if mb >= 10 else f"{mb:.2f}"


def _get(cells: pd.DataFrame, metric: str) -> pd.Series:
    return cells[metric] if metric in cells else pd.Series(np.nan, index=cells.index)


# ---------------------------------------------------------------------------------------------
# Table 1


_TABLE1_ROWS = {
    "pretrained": (("k-NN", "knn_top1"), ("k-NN (k=20)", "knn_dino_top1"), ("Linear probe", "linear_probe_top1")),
    "pretrained_bn": (("BN re-estimated k-NN", "knn_top1"), ("BN re-estimated k-NN (k=20)", "knn_dino_top1"),
                      ("BN re-estimated linear probe", "linear_probe_top1")),
    "fft": (("FFT", "classifier_top1"),),
    "supervised_mask": (("Mask (supervised)", "classifier_top1"),),
    "smn": (("SMN k-NN", "knn_top1"), ("SMN k-NN (k=20)", "knn_dino_top1"), ("SMN linear probe", "linear_probe_top1")),
    "stn": (("STN k-NN", "knn_top1"), ("STN k-NN (k=20)", "knn_dino_top1"), ("STN linear probe", "linear_probe_top1")),
    "random_mask": (("Random mask k-NN", "knn_top1"), ("Random mask k-NN (k=20)", "knn_dino_top1"),
                    ("Random mask linear probe", "linear_probe_top1")),
    "random_mask_magnitude": (("Random mask, |W|-matched k-NN", "knn_top1"),
                              ("Random mask, |W|-matched k-NN (k=20)", "knn_dino_top1"),
                              ("Random mask, |W|-matched linear probe", "linear_probe_top1")),
}


_FROZEN = ("pretrained", "pretrained_bn")


@register_table("table1", "Table 1: frozen k-NN / linear probe, FFT and supervised masking, with the storage a "
                "task costs (Size, Mbit); mean ± std [95 % interval] over seeds (differences with intervals, "
                "a gain only when the interval excludes 0: the vs_frozen layout)")
def table1(df: pd.DataFrame) -> pd.DataFrame:
    """Table 1 from ledger rows: index (Backbone, Method), columns ``Size (Mbit)`` and one per dataset.

    Rows: ``k-NN`` (the paper's k=200 and DINO's k=20) and ``Linear probe`` of the frozen backbone
    (``pretrained``; size n/a, as in the paper), the same for the BN-re-estimated control
    (``pretrained_bn``), ``FFT`` and ``Mask (supervised)`` (the trained head's test top-1, ``classifier_top1``),
    and, when present, SMN / STN and the random-mask controls of SMN (``random_mask``, ``random_mask_magnitude``:
    not in the paper) by k-NN and linear probe. Size = ``storage_bits`` / 1e6 (mask bits for
    masking, 32 x parameters for FFT). Cells trained on part of the labels (``dataset.label_fraction``)
    are left out; other grid values are appended to the method's name. Mean ± std over seeds.
    """
    cells = cell_frame(df)
    if cells.empty:
        return pd.DataFrame()
    cells = cells[cells["config"].map(lambda c: c["dataset"].get("label_fraction") is None)]
    records = []
    for _, c in cells.iterrows():
        setting = _setting(c["grid_json"])
        for k, (label, metric) in enumerate(_TABLE1_ROWS.get(c["method"], ())):
            if metric not in c or pd.isna(c[metric]):
                continue
            records.append({"Backbone": c["backbone"], "Method": label + (f" ({setting})" if setting else ""),
                            "order": 10 * list(_TABLE1_ROWS).index(c["method"]) + k, "data": c["data"],
                            "value": c[metric],
                            "bits": np.nan if c["method"] in _FROZEN else c.get("storage_bits", np.nan)})
    if not records:
        return pd.DataFrame()
    rec = pd.DataFrame(records)
    datasets = sorted(rec["data"].unique())
    out = []
    for (backbone, method), g in rec.groupby(["Backbone", "Method"], sort=False):
        row = {"Backbone": backbone, "Method": method, "order": g["order"].iloc[0],
               "Size (Mbit)": "n/a" if g["bits"].isna().all() else _mbit(g["bits"].mean())}
        for ds in datasets:
            row[ds] = _stat(g.loc[g["data"] == ds, "value"], _with_interval)
        out.append(row)
    frame = pd.DataFrame(out).sort_values(["Backbone", "order", "Method"], kind="stable").drop(columns="order")
    return frame.set_index(["Backbone", "Method"])


# ---------------------------------------------------------------------------------------------
# Fig. 3: low-shot


_UNLABELED = {"pretrained": "Linear probe (frozen)", "smn": "SMN + linear probe", "stn": "STN + linear probe"}
_LABELED = {"supervised_mask": "Mask (supervised)", "fft": "FFT"}


def _lowshot_points(cells: pd.DataFrame) -> pd.DataFrame:
    """Long frame (backbone, data, series, fraction, seed, value) of the low-shot comparison."""
    rows = []
    for _, c in cells.iterrows():
        base = {"backbone": c["backbone"], "data": c["data"], "seed": c["seed"]}
        suffix = f" ({c['setting']})" if c.get("setting") else ""
        if c["method"] in _UNLABELED:
            series = _UNLABELED[c["method"]] + suffix
            for col in cells.columns:
                m = _LOWSHOT.match(str(col))
                if m and not pd.isna(c[col]):
                    rows.append({**base, "series": series, "fraction": float(m.group(1)), "value": c[col]})
            if not pd.isna(c.get("linear_probe_top1", np.nan)):
                rows.append({**base, "series": series, "fraction": 1.0, "value": c["linear_probe_top1"]})
        elif c["method"] in _LABELED and not pd.isna(c.get("classifier_top1", np.nan)):
            frac = c["config"]["dataset"].get("label_fraction") or 1.0
            rows.append({**base, "series": _LABELED[c["method"]] + suffix, "fraction": float(frac),
                         "value": c["classifier_top1"]})
    return pd.DataFrame(rows)


def _lowshot_frame(df: pd.DataFrame) -> pd.DataFrame:
    pts = _lowshot_points(cell_frame(df))  # no cells: no points
    if pts.empty or not (pts["fraction"] < 1.0).any():
        return pd.DataFrame()
    return pts


@register_table("lowshot", "Fig. 3 as a table: top-1 against the share of training labels (low-shot); mean ± std "
                "[95 % interval]; vs frozen: paired difference in points from the frozen backbone's probe at the same "
                "share, over seeds [95 % interval], a gain / loss only when it excludes 0")
def lowshot(df: pd.DataFrame) -> pd.DataFrame:
    """Low-shot numbers (Fig. 3): index (Backbone, Dataset, Method), per label share a column (mean ± std
    [95 % interval] over seeds) and ``<share> vs frozen``: the difference from ``Linear probe (frozen)`` of the
    same backbone and data at that share, paired by seed (:func:`orchestrator.reports.intervals.paired_seed_interval`).

    Unlabeled adaptation (frozen backbone, SMN, STN) is read out by a linear probe on a per-class
    sample of the labels (``lowshot_top1@<fraction>``; 100 % is the full probe); supervised masking and
    FFT train on that share of labels (``dataset.label_fraction``) and report their head's top-1.
    Empty when the ledger has no low-shot cell.
    """
    pts = _lowshot_frame(df)
    if pts.empty:
        return pd.DataFrame()
    fracs = sorted(pts["fraction"].unique(), reverse=True)
    order = list(_UNLABELED.values()) + list(_LABELED.values())
    frozen_name = _UNLABELED["pretrained"]
    out = []
    for (backbone, data, series), g in pts.groupby(["backbone", "data", "series"]):
        row = {"Backbone": backbone, "Dataset": data, "Method": series,
               "order": order.index(series) if series in order else len(order)}
        frozen = pts[(pts["backbone"] == backbone) & (pts["data"] == data) & (pts["series"] == frozen_name)]
        for f in fracs:
            mine = g[g["fraction"] == f]
            row[f"{100 * f:g}%"] = _stat(mine["value"], _with_interval)
            ref = frozen[frozen["fraction"] == f]
            row[f"{100 * f:g}% vs frozen"] = (
                "reference" if series == frozen_name else "-" if ref.empty or mine.empty else
                difference_text(paired_seed_interval(dict(zip(mine["seed"], mine["value"])),
                                                     dict(zip(ref["seed"], ref["value"])))))
        out.append(row)
    frame = pd.DataFrame(out).sort_values(["Backbone", "Dataset", "order"]).drop(columns="order")
    return frame.set_index(["Backbone", "Dataset", "Method"])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nonempty(frame: pd.DataFrame, missing: str) -> pd.DataFrame:
    """``frame``, the points of a figure, when it has any.

    Raises:
        ValueError: ``missing`` (what the ledger lacks and the spec that makes it) when ``frame`` is empty.
    """
    if frame.empty:
        raise ValueError(missing)
    return frame


@register_figure("fig3", "Fig. 3: low-shot top-1 against the share of labels, per method")
def fig3(df: pd.DataFrame, out: str) -> None:
    """Fig. 3: one panel per (backbone, dataset); x = share of training labels (log scale, %), y = test
    top-1, one line per method (mean over seeds, error bars = the 95 % t-interval of the mean; none for one seed).

    Raises:
        ValueError: if the ledger has no low-shot cell (``eval.lowshot_fractions`` / ``dataset.label_fraction``).
    """
    pts = _nonempty(_lowshot_frame(df), "the ledger holds no low-shot results (cells with "
                    "eval.lowshot_fractions or dataset.label_fraction); run experiments/fig3_lowshot_small.yaml")
    plt = _plt()
    panels = list(pts.groupby(["backbone", "data"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, ((backbone, data), g) in zip(axes[0], panels):
        for series, s in g.groupby("series", sort=False):
            cis = {f: t_interval(list(v)) for f, v in s.groupby("fraction")["value"]}
            fracs = sorted(cis)
            half = [cis[f].hi - cis[f].mean if cis[f].known else 0.0 for f in fracs]
            ax.errorbar(100 * np.asarray(fracs), [cis[f].mean for f in fracs], yerr=half, marker="o", markersize=4,
                        capsize=2, label=series)
        ax.set_xscale("log")
        ax.set_xlabel("labels used (% of the training set)")
        ax.set_ylabel("test top-1 (bars: 95 % interval over seeds)")
        ax.set_title(f"{backbone} on {data}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(fig, out)


# ---------------------------------------------------------------------------------------------
# Sec. 3.2 / App. A / Fig. 5: hyperparameter invariance


def _hyper(config: dict) -> tuple[float, float, float]:
    t = config["train"]
    return float(t["mask"]["init_score"]), float(t["mask"]["threshold"]), float(t["score_lr"])


def _group_key(row) -> str:
    """Everything that defines a cell except (S0, mu, lr): runs that differ only there are compared."""
    cfg = json.loads(json.dumps(row["config"]))
    cfg["train"]["mask"].pop("init_score", None)
    cfg["train"]["mask"].pop("threshold", None)
    cfg["train"].pop("score_lr", None)
    return row["experiment"] + "|" + json.dumps(cfg, sort_keys=True)


def _invariance_cells(df: pd.DataFrame) -> pd.DataFrame:
    cells = cell_frame(df)
    if cells.empty:
        return pd.DataFrame()
    cells = cells[cells["config"].map(lambda c: (c.get("train") or {}).get("adaptation") == "mask"
                                      and c["train"]["mask"].get("mode", "threshold") == "threshold")].copy()
    if cells.empty:
        return cells
    hyper = cells["config"].map(_hyper)
    cells["S0"], cells["mu"], cells["lr"] = zip(*hyper)
    cells["group"] = cells.apply(_group_key, axis=1)
    # only groups where (S0, mu, lr) actually vary
    varied = cells.groupby("group")[["S0", "mu", "lr"]].nunique().sum(axis=1) > 3
    return cells[cells["group"].map(varied)]


def _reference(g: pd.DataFrame) -> pd.Series:
    hit = g[(g["S0"] == _REFERENCE[0]) & (g["mu"] == _REFERENCE[1]) & (g["lr"] == _REFERENCE[2])]
    return hit.iloc[0] if not hit.empty else g.sort_values(["lr", "S0", "mu"]).iloc[0]


def _loss_curve(row: pd.Series) -> dict[int, float]:
    return {int(m.group(1)): float(row[col]) for col in row.index
            if (m := _EPOCH_LOSS.match(str(col))) and not pd.isna(row[col])}


def _group_label(g: pd.DataFrame) -> str:
    t = g["config"].iloc[0]["train"]
    return (f"{g['backbone'].iloc[0]} on {g['data'].iloc[0]}, {t.get('dtype', 'float32')}, momentum {t['momentum']}, "
            f"seed {g['seed'].iloc[0]}")


@register_table("invariance",
                "Sec. 3.2 / App. A: (S0, mu, lr) against (1, 0, 50): identical mask bits, loss difference")
def invariance(df: pd.DataFrame) -> pd.DataFrame:
    """Hyperparameter invariance (Theorems 1-2, App. A): in each group of cells that differ only in
    ``(S0, mu, lr)`` (same data order, seed, dtype, momentum), every cell against the reference
    ``(1, 0, 50)`` (else the lowest lr): ``(S0 - mu) / lr`` (equal ratios = equivalent by the
    theorems), the share of identical mask bits at the end (from the exported masks), the largest
    per-epoch loss difference, final loss, density and k-NN top-1. ``same-ratio identical bits``
    compares each cell with the first cell (lowest lr, then S0) of its own ``(S0 - mu) / lr`` class,
    e.g. (1, 0.5, 50) with (1, 0, 100).

    Raises:
        ValueError: if ``df.attrs["results"]`` is missing (the masks cannot be found).
    """
    cells = _invariance_cells(df)
    if cells.empty:
        return pd.DataFrame()
    results = _results(df, "the invariance table")
    out = []
    for _, g in cells.groupby("group", sort=False):
        ref = _reference(g)
        ref_masks = load_cell_masks(results, ref["experiment"], ref["cell_id"])
        ref_curve = _loss_curve(ref)
        ratio_ref = (ref["S0"] - ref["mu"]) / ref["lr"]
        ordered = g.sort_values(["lr", "S0", "mu"])
        masks_of = {c["cell_id"]: load_cell_masks(results, c["experiment"], c["cell_id"])
                    for _, c in ordered.iterrows()}
        first_of: dict[float, str] = {}
        for _, c in ordered.iterrows():
            first_of.setdefault(round((c["S0"] - c["mu"]) / c["lr"], 12), c["cell_id"])
        for _, c in ordered.iterrows():
            masks = masks_of[c["cell_id"]]
            agree = mask_agreement(ref_masks, masks) if masks is not None and ref_masks is not None else None
            first = first_of[round((c["S0"] - c["mu"]) / c["lr"], 12)]
            same = (None if first == c["cell_id"] or masks is None or masks_of[first] is None
                    else mask_agreement(masks_of[first], masks))
            curve = _loss_curve(c)
            common = sorted(set(curve) & set(ref_curve))
            dloss = max((abs(curve[e] - ref_curve[e]) for e in common), default=float("nan"))
            ratio = (c["S0"] - c["mu"]) / c["lr"]
            out.append({
                "Setting": _group_label(g), "S0": f"{c['S0']:g}", "mu": f"{c['mu']:g}", "lr": f"{c['lr']:g}",
                "(S0-mu)/lr": f"{ratio:.4g}",
                "equivalent": "reference" if c["cell_id"] == ref["cell_id"] else
                ("yes" if math.isclose(ratio, ratio_ref, rel_tol=1e-12) else "no"),
                "identical mask bits": "-" if agree is None else f"{100 * agree.identical_fraction:.4f}%",
                "differing bits": "-" if agree is None else f"{agree.differing_bits} / {agree.total_bits}",
                "max |Δ loss|": "-" if math.isnan(dloss) else f"{dloss:.3g}",
                "same-ratio identical bits": "-" if same is None else f"{100 * same.identical_fraction:.4f}%",
                "final loss": _stat(pd.Series([c.get("train_loss", np.nan)]), lambda v: f"{v.iloc[0]:.4f}"),
                "density": _stat(pd.Series([c.get("density", np.nan)]), lambda v: f"{v.iloc[0]:.4f}"),
                "k-NN": _stat(pd.Series([c.get("knn_top1", np.nan)])),
            })
    return pd.DataFrame(out).set_index(["Setting", "S0", "mu", "lr"])


@register_figure("fig5", "Fig. 5: loss curves for equivalent (S0, mu, lr) and for one-at-a-time changes")
def fig5(df: pd.DataFrame, out: str) -> None:
    """Fig. 5 (App. A): per group of cells that differ only in ``(S0, mu, lr)``, left the reference
    ``(1, 0, 50)`` with every equivalent setting (same ``(S0 - mu) / lr``), right the reference with
    the settings that change one of S0, mu, lr; x = epoch, y = training loss (``train_loss@<epoch>``).
    At most four groups are drawn.

    Raises:
        ValueError: if the ledger holds no such group.
    """
    cells = _nonempty(_invariance_cells(df), "the ledger holds no masking cells that differ only in "
                      "(S0, mu, lr); run experiments/fig5_invariance_small.yaml")
    plt = _plt()
    groups = list(cells.groupby("group", sort=False))[:4]
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.8 * len(groups)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for row, (_, g) in zip(axes, groups):
        ref = _reference(g)
        ratio_ref = (ref["S0"] - ref["mu"]) / ref["lr"]
        ref_h = (ref["S0"], ref["mu"], ref["lr"])
        for ax, title, pick in (
            (row[0], "equivalent settings", lambda c: math.isclose((c["S0"] - c["mu"]) / c["lr"], ratio_ref,
                                                                    rel_tol=1e-12)),
            (row[1], "one hyperparameter changed",
             lambda c: sum(a != b for a, b in zip((c["S0"], c["mu"], c["lr"]), ref_h)) == 1),
        ):
            chosen = [ref] + [c for _, c in g.iterrows() if c["cell_id"] != ref["cell_id"] and pick(c)]
            for i, c in enumerate(chosen):
                curve = _loss_curve(c)
                xs = sorted(curve)
                ax.plot(xs, [curve[x] for x in xs], linestyle=styles[i % len(styles)], marker="o", markersize=3,
                        linewidth=2.5 if i == 0 else 1.5,
                        label=f"λ={c['lr']:g}, S0={c['S0']:g}, μ={c['mu']:g}" + (" (reference)" if i == 0 else ""))
            ax.set_xlabel("epoch")
            ax.set_ylabel("training loss")
            ax.set_title(f"{title}\n{_group_label(g)}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, out)


# ---------------------------------------------------------------------------------------------
# Table 8, Figs. 6-7: sparsity


def _masked_cells(df: pd.DataFrame) -> pd.DataFrame:
    cells = cell_frame(df)
    if cells.empty or "density" not in cells:
        return pd.DataFrame()
    return cells[cells["density"].notna()]


@register_table("table8", "Table 8: share of weights kept by the masks (density), per backbone, method and dataset; "
                "mean ± std [95 % interval] over seeds")
def table8(df: pd.DataFrame) -> pd.DataFrame:
    """Table 8 from the ledger's ``density``: index (Backbone, Method), one column per dataset, in %
    (mean ± std [95 % t-interval] over seeds). Other grid values are appended to the method's name."""
    cells = _masked_cells(df)
    if cells.empty:
        return pd.DataFrame()
    cells = cells.assign(label=[m + (f" ({s})" if (s := _setting(gj)) else "")
                                for m, gj in zip(cells["method"], cells["grid_json"])])
    datasets = sorted(cells["data"].unique())
    out = []
    for (backbone, label), g in cells.groupby(["backbone", "label"]):
        row = {"Backbone": backbone, "Method": label}
        for ds in datasets:
            row[ds] = _stat(g.loc[g["data"] == ds, "density"], _pct)
        out.append(row)
    return pd.DataFrame(out).set_index(["Backbone", "Method"])


def _densities(df: pd.DataFrame, what: str, vit: bool | None = None) -> pd.DataFrame:
    """Long frame of per-tensor densities from the exported masks of every masked cell:
    backbone, method, data, seed, cell_id, plus the :class:`smn_core.analysis.TensorDensity` fields."""
    cells = _masked_cells(df)
    if cells.empty:
        return pd.DataFrame()
    results = _results(df, what)
    rows = []
    for _, c in cells.iterrows():
        masks = load_cell_masks(results, c["experiment"], c["cell_id"])
        if masks is None:
            continue
        is_vit = any(".resblocks." in f".{n}" for n in masks)
        if vit is not None and is_vit != vit:
            continue
        for i, t in enumerate(tensor_densities(masks)):
            rows.append({"backbone": c["backbone"], "method": c["method"], "data": c["data"], "seed": c["seed"],
                         "cell_id": c["cell_id"], "index": i, "name": t.name, "stage": t.stage, "block": t.block,
                         "component": t.component, "kind": t.kind, "kept": t.kept, "total": t.total,
                         "density": t.density})
    return pd.DataFrame(rows)


_MASKS_FROM = {True: ("CLIP ViT", "experiments/clip_vit_b32.yaml"),
               False: ("ResNet", "experiments/table8_sparsity_small.yaml")}


def _figure_densities(df: pd.DataFrame, figure: str, vit: bool):
    """``(densities, pyplot)`` for a sparsity figure: :func:`_densities` of the ViT (``vit``) or ResNet cells.

    Raises:
        ValueError: when no such masks are found (names the spec that makes them), or
            ``df.attrs["results"]`` is missing.
    """
    family, spec = _MASKS_FROM[vit]
    return _nonempty(_densities(df, figure, vit=vit), f"no {family} masks in this ledger (run {spec})"), _plt()


@register_table("sparsity_blocks", "Density per ResNet stage / block or ViT block, from the exported masks")
def sparsity_blocks(df: pd.DataFrame) -> pd.DataFrame:
    """Density (%) per stage and block (size-weighted within each cell; mean ± std over cells of the
    same backbone, method and dataset): index (Backbone, Method, Stage, Block), one column per dataset.

    Raises:
        ValueError: if ``df.attrs["results"]`` is missing.
    """
    dens = _densities(df, "the sparsity_blocks table")
    if dens.empty:
        return pd.DataFrame()
    per_cell = (dens.groupby(["backbone", "method", "data", "cell_id", "stage", "block"], sort=False)
                [["kept", "total"]].sum().reset_index())
    per_cell["density"] = per_cell["kept"] / per_cell["total"]
    datasets = sorted(per_cell["data"].unique())
    out = []
    for (backbone, method, stage, block), g in per_cell.groupby(["backbone", "method", "stage", "block"], sort=False):
        row = {"Backbone": backbone, "Method": method, "Stage": stage, "Block": block}
        for ds in datasets:
            row[ds] = _stat(g.loc[g["data"] == ds, "density"], _pct)
        out.append(row)
    return pd.DataFrame(out).set_index(["Backbone", "Method", "Stage", "Block"])


def _sparsity_axes(ax, title: str, **grid) -> None:
    """Label a sparsity panel: y label, ``title`` (small), a light grid (``grid``: e.g. ``axis="y"``), legend."""
    ax.set_ylabel("sparsity (% of weights masked)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, **grid)
    ax.legend(fontsize=8)


@register_figure("fig6",
                 "Fig. 6: sparsity per CLIP ViT block and projection (q, k, v, out, fc1, fc2), weights and biases")
def fig6(df: pd.DataFrame, out: str) -> None:
    """Fig. 6 (App. D.1): from the exported masks of CLIP ViT cells, sparsity (1 - density, %) per block
    for each projection (open_clip's fused q/k/v split in thirds), weights left and biases right,
    averaged over the cells (datasets, seeds).

    Raises:
        ValueError: if no ViT masks are found, or ``df.attrs["results"]`` is missing.
    """
    dens, plt = _figure_densities(df, "fig6", vit=True)
    dens["block_index"] = dens["block"].str.replace("block", "").astype(int)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    for ax, kind in zip(axes[0], ("weight", "bias")):
        sub = dens[dens["kind"] == kind]
        for comp in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
            s = sub[sub["component"] == comp].groupby("block_index")["density"].mean().sort_index()
            if not s.empty:
                ax.plot(s.index, 100 * (1 - s.values), marker="o", markersize=3, label=comp)
        ax.set_xlabel("block")
        _sparsity_axes(ax, f"{kind}s ({', '.join(sorted(dens['data'].unique()))})")
    save_figure(fig, out)


def _short(name: str) -> str:
    s = name.replace(".weight", "").replace(".bias", "(b)").replace("layer", "L").replace("downsample.0", "ds")
    return s.replace("downsample", "ds").replace("conv", "c")


@register_figure("fig7", "Fig. 7: sparsity per ResNet layer, SMN against supervised masking (mean ± std over datasets)")
def fig7(df: pd.DataFrame, out: str) -> None:
    """Fig. 7 (App. D.2): from the exported masks of ResNet cells, sparsity (1 - density, %) of every
    masked tensor in network order, one series per method (mean ± std over datasets and seeds), one
    panel per backbone.

    Raises:
        ValueError: if no ResNet masks are found, or ``df.attrs["results"]`` is missing.
    """
    dens, plt = _figure_densities(df, "fig7", vit=False)
    backbones = sorted(dens["backbone"].unique())
    fig, axes = plt.subplots(len(backbones), 1, figsize=(max(8, 0.3 * dens["index"].max() + 4), 4 * len(backbones)),
                             squeeze=False)
    for ax, backbone in zip(axes[:, 0], backbones):
        sub = dens[dens["backbone"] == backbone]
        names = sub.drop_duplicates("name").sort_values("index")["name"].tolist()
        x = np.arange(len(names))
        methods = sorted(sub["method"].unique())
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            agg = sub[sub["method"] == method].groupby("name")["density"].agg(["mean", "std", "count"]).reindex(names)
            ax.bar(x + (k - (len(methods) - 1) / 2) * width, 100 * (1 - agg["mean"]), width,
                   yerr=100 * agg["std"].fillna(0), capsize=2,
                   label=f"{method} (n={int(agg['count'].max())})")
        ax.set_xticks(x)
        ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
        _sparsity_axes(ax, f"{backbone}: {', '.join(sorted(sub['data'].unique()))}", axis="y")
    save_figure(fig, out)


# ---------------------------------------------------------------------------------------------
# Table 10: variance over seeds


def _without_seed(config: dict) -> str:
    """A cell's config as JSON with its seeds removed: cells that differ only in the seed share it."""
    cfg = json.loads(json.dumps(config))
    cfg.pop("seed", None)
    if isinstance(cfg.get("train"), dict):
        cfg["train"].pop("seed", None)
    return json.dumps(cfg, sort_keys=True)


@register_table("table10", "Table 10: the same cell over several seeds: each run, mean, the 95 % t-interval of the "
                "mean and std")
def table10(df: pd.DataFrame) -> pd.DataFrame:
    """Table 10 (App. H): for every group of cells that differ only in the seed (two seeds or more),
    one row per metric (k-NN, linear probe, and the head's top-1 for supervised runs) with each run
    (R1.. in seed order), the mean, its 95 % Student-t interval, the sample std (ddof = 1, as every other table here) and the
    population std (ddof = 0, which is what the paper's Table 10 reports: its DTD row 0.005 is the
    ddof = 0 std of its five runs)."""
    cells = cell_frame(df)
    if cells.empty:
        return pd.DataFrame()
    cells = cells.assign(label=[m + (f" ({s})" if (s := _setting(gj, drop=())) else "")
                                for m, gj in zip(cells["method"], cells["grid_json"])],
                         same=[exp + "|" + _without_seed(c) for exp, c in zip(cells["experiment"], cells["config"])])
    out = []
    for _, g in cells.groupby("same", sort=False):
        if g["seed"].nunique() < 2:
            continue
        g = g.sort_values("seed")
        data, label, backbone = g["data"].iloc[0], g["label"].iloc[0], g["backbone"].iloc[0]
        for metric, name in (("knn_top1", "k-NN"), ("linear_probe_top1", "linear probe"),
                             ("classifier_top1", "head top-1")):
            v = _get(g, metric).dropna()
            if v.empty:
                continue
            row = {"Dataset": data, "Method": f"{label} [{backbone}]", "Metric": name,
                   "seeds": ",".join(map(str, g["seed"]))}
            for i, x in enumerate(v.tolist(), 1):
                row[f"R{i}"] = f"{x:.3f}"
            row["Mean"] = f"{v.mean():.3f}"
            ci = t_interval(list(v))
            row["95 % interval"] = f"[{ci.lo:.3f}, {ci.hi:.3f}]"
            row["STD (ddof=1)"] = f"{v.std(ddof=1):.3f}"
            row["STD (ddof=0)"] = f"{v.std(ddof=0):.3f}"
            out.append(row)
    if not out:
        return pd.DataFrame()
    frame = pd.DataFrame(out)
    runs = sorted([c for c in frame.columns if re.fullmatch(r"R\d+", c)], key=lambda c: int(c[1:]))
    frame = frame[["Dataset", "Method", "Metric", "seeds"] + runs + ["Mean", "95 % interval", "STD (ddof=1)",
                                                                   "STD (ddof=0)"]]
    return frame.set_index(["Dataset", "Method", "Metric"])
