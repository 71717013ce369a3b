"""The ablation tables and figures of the paper, from the ledger alone (issue "ablation sweeps").

* ``table2``: threshold masking (SMN) vs top-k% at 50 % and at the density SMN found (Table 2), k-NN and
  linear-probe rows per dataset, and SMN's density (the paper's "sparsity level" row is the density).
* ``table5a`` / ``table5b`` / ``table5c``: number of prototypes, frozen layers (which parameter groups
  are masked), initialisation (Table 5), k-NN.
* ``appE``: progressive top-k vs top-k at the found density vs threshold (App. E, Table 9).
* ``fig8`` / ``fig9``: accuracy against the number of trainable masks per selection strategy (first N
  stages, random fraction, largest-|W| fraction; App. F).

Cells are recognised from their resolved config (``config_json``), so any experiment whose cells
vary the relevant keys feeds these layouts; with several seeds every entry is mean ± std.
"""

from __future__ import annotations

import functools
import json
import re

import pandas as pd

from orchestrator.results import ledger
from orchestrator.reports.registry import mean_std, register_figure, register_table, save_figure
from orchestrator.reports.settings import KEYS, setting_label

__all__ = ["cells_frame", "mask_variant", "frozen_label", "selection_strategy"]

EVALS = (("knn_top1", "k-NN"), ("linear_probe_top1", "linear probe"))


def cells_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: ``cell_id, experiment, method, backbone, dataset, seed, config (dict), grid (dict)``,
    ``setting`` (the keys :func:`orchestrator.reports.settings.split_settings` added to tell settings apart,
    ``k=v, ...``, else ``""``) and one column per metric."""
    if df.empty:
        return pd.DataFrame()
    keys = df.attrs.get(KEYS, ())
    out = ledger.wide(df).drop(columns=["started_at", "finished_at", "host", "smn_version"])
    out["config"] = out.pop("config_json").map(json.loads)
    out["grid"] = out.pop("grid_json").map(json.loads)
    out["setting"] = out["grid"].map(lambda g: setting_label(g, keys))
    return out


def _mask(cfg: dict) -> dict:
    return (cfg.get("train") or {}).get("mask") or {}


def mask_variant(row: pd.Series) -> str | None:
    """Table 2 / App. E row of a masking cell: ``"SMN (threshold)"``, ``"top-k found"``, ``"top-k 50%"``,
    ``"top-k progressive"``; None for cells that are not self-masking."""
    if row["method"] != "smn":
        return None
    mask = _mask(row["config"])
    if mask.get("mode", "threshold") == "threshold":
        return "SMN (threshold)" if mask.get("selective", "none") == "none" and mask.get("stages") is None else None
    found = '"found"' in json.dumps(row["grid"])
    if row["config"]["train"].get("progressive_topk"):
        return "top-k progressive" + (" (to found)" if found else f" (to {mask['topk_density']:.0%})")
    return "top-k found" if found else f"top-k {mask['topk_density']:.0%}"


def frozen_label(row: pd.Series) -> str:
    """Table 5b label: which parameter groups stay frozen (not masked)."""
    mask = _mask(row["config"])
    sel = mask.get("selector", "conv")
    if sel == "all":
        return "none"
    if sel == "all_but_bias":
        return "biases"
    if sel in ("all_but_norm", "conv", "conv+linear") and not mask.get("include_bn"):
        return "BNs"
    return sel + (" +BN" if mask.get("include_bn") else "")


def selection_strategy(row: pd.Series) -> tuple[str, str]:
    """App. F: ``(strategy, point label)``: ``("first N stages", "L1+L2")``, ``("random", "30%")``,
    ``("magnitude", "30%")``, ``("all", "all")`` (every conv) or, for a selector regex naming stages,
    ``("all", "L3 only")``."""
    mask = _mask(row["config"])
    if mask.get("stages"):
        n = int(mask["stages"])
        return "first N stages", "+".join(f"L{i}" for i in range(1, n + 1))
    if mask.get("selective", "none") != "none":
        return mask["selective"], f"{mask['selective_fraction']:.0%}"
    sel = mask.get("selector", "conv")
    if sel == "conv":
        return "all", "all"
    stages = re.findall(r"layer(\d+)", sel)  # a stage regex such as the small recipe's last stage
    return "all", ("+".join(f"L{i}" for i in stages) + " only") if stages else sel


def _pivot(frame: pd.DataFrame, row_key: str, metric: str, row_order=None) -> pd.DataFrame:
    """``row_key`` x dataset of ``metric`` (mean ± std over seeds); a row per setting: a split setting's keys
    follow its row label (``SMN (threshold) (epochs=1)``)."""
    if frame.empty or metric not in frame:
        return pd.DataFrame()
    if "setting" in frame and (frame["setting"] != "").any():
        frame = frame.assign(**{row_key: [f"{r} ({s})" if s else r for r, s in zip(frame[row_key], frame["setting"])]})
    g = frame.groupby([row_key, "dataset"])[metric].agg(["mean", "std", "count"])
    table = {}
    for (r, ds), v in g.iterrows():
        table.setdefault(r, {})[ds] = mean_std(v["mean"], v["std"], v["count"])
    out = pd.DataFrame.from_dict(table, orient="index")
    if row_order:
        out = out.reindex([r for r in row_order if r in out.index] + [r for r in out.index if r not in row_order])
    out.index.name = row_key
    return out.fillna("-")


def _eval_rows(cells: pd.DataFrame, order: list[str], extra: pd.DataFrame | None = None) -> pd.DataFrame:
    """k-NN then linear-probe rows (``"k-NN: <variant>"``) per dataset, variants in ``order``, then ``extra``."""
    parts = []
    for metric, name in EVALS:
        t = _pivot(cells, "variant", metric, order)
        if not t.empty:
            t.index = [f"{name}: {i}" for i in t.index]
            parts.append(t)
    if extra is not None and not extra.empty:
        parts.append(extra)
    out = pd.concat(parts).fillna("-") if parts else pd.DataFrame()
    out.index.name = "method"
    return out


def _smn(df: pd.DataFrame) -> pd.DataFrame:
    cells = cells_frame(df)
    if cells.empty:
        return cells
    return cells[cells["method"] == "smn"].copy()


def _smn_table(name: str, description: str, *, bare_when_empty: bool = False):
    """Decorator registering (:func:`register_table`) a table built from the smn cells of the ledger:
    the decorated ``build(cells) -> DataFrame`` sees only a non-empty frame of :func:`_smn` cells; with none,
    the table is that empty frame (``bare_when_empty``: an empty ``DataFrame()`` without columns)."""
    def wrap(build):
        @register_table(name, description)
        @functools.wraps(build)
        def table(df: pd.DataFrame) -> pd.DataFrame:
            cells = _smn(df)
            if cells.empty:
                return pd.DataFrame() if bare_when_empty else cells
            return build(cells)
        return table
    return wrap


@_smn_table("table2", "Table 2: threshold masking (SMN) vs top-k% (50 % and the density SMN found)",
            bare_when_empty=True)
def table2(cells: pd.DataFrame) -> pd.DataFrame:
    cells["variant"] = cells.apply(mask_variant, axis=1)
    cells = cells[cells["variant"].notna() & ~cells["variant"].str.contains("progressive", na=False)]
    order = sorted({v for v in cells["variant"] if v.startswith("top-k ") and v != "top-k found"}) + \
        ["top-k found", "SMN (threshold)"]
    dens = _pivot(cells[cells["variant"] == "SMN (threshold)"], "variant", "density")
    if not dens.empty:
        dens.index = [i.replace("SMN (threshold)", "density found by SMN", 1) for i in dens.index]
    return _eval_rows(cells, order, extra=dens)


@_smn_table("table5a", "Table 5a: number of prototypes (k-NN)")
def table5a(cells: pd.DataFrame) -> pd.DataFrame:
    cells["prototypes"] = cells["config"].map(lambda c: c["train"]["swav"]["num_prototypes"])
    out = _pivot(cells.sort_values("prototypes"), "prototypes", "knn_top1")
    return out.sort_index()


@_smn_table("table5b", "Table 5b: parameter groups kept frozen, i.e. not masked (k-NN)")
def table5b(cells: pd.DataFrame) -> pd.DataFrame:
    cells["frozen"] = cells.apply(frozen_label, axis=1)
    return _pivot(cells, "frozen", "knn_top1", ["none", "BNs", "biases"])


@_smn_table("table5c", "Table 5c: initialisation of the backbone (k-NN)")
def table5c(cells: pd.DataFrame) -> pd.DataFrame:
    cells["initialisation"] = cells["config"].map(
        lambda c: f"{c['backbone']['arch']} ({c['backbone']['weights']})")
    return _pivot(cells, "initialisation", "knn_top1")


@_smn_table("appE", "App. E (Table 9): progressive top-k vs top-k at the found density vs threshold")
def app_e(cells: pd.DataFrame) -> pd.DataFrame:
    cells["variant"] = cells.apply(mask_variant, axis=1)
    cells = cells[cells["variant"].notna()]
    order = [v for v in sorted(set(cells["variant"])) if "progressive" in v] + ["top-k found", "SMN (threshold)"]
    return _eval_rows(cells, order)


def _selection_points(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    cells = _smn(df)
    if cells.empty or metric not in cells or "trainable_masks" not in cells:
        return pd.DataFrame()
    cells[["strategy", "point"]] = cells.apply(lambda r: pd.Series(selection_strategy(r)), axis=1)
    return (cells.groupby(["dataset", "strategy", "point"])
            .agg(x=("trainable_masks", "mean"), y=(metric, "mean"), y_std=(metric, "std"))
            .reset_index().sort_values("x"))


def _plot_selection(df: pd.DataFrame, out: str, metric: str, strategies: tuple[str, ...], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _selection_points(df, metric)
    if pts.empty:
        raise ValueError("the ledger holds no self-masking cells with trainable_masks; run an App. F spec first")
    datasets = sorted(pts["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    markers = {"first N stages": "s", "random": "o", "magnitude": "^", "all": "*"}
    for ax, ds in zip(axes[0], datasets):
        sub = pts[pts["dataset"] == ds]
        for strat in strategies:
            s = sub[sub["strategy"] == strat]
            if s.empty:
                continue
            ax.errorbar(s["x"], s["y"], yerr=s["y_std"].fillna(0), marker=markers.get(strat, "o"),
                        linestyle="-" if strat != "all" else "none", markersize=9 if strat == "all" else 6,
                        label=strat, capsize=2)
            for _, r in s.iterrows():
                if strat == "first N stages":
                    ax.annotate(r["point"], (r["x"], r["y"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable masks (bits)")
        ax.set_ylabel({"knn_top1": "k-NN accuracy", "linear_probe_top1": "linear-probe accuracy"}.get(metric, metric))
        ax.set_title(f"{title} ({ds})")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, out)


@register_figure("fig8", "Fig. 8: k-NN accuracy against trainable masks: first N stages vs random fraction")
def fig8(df: pd.DataFrame, out: str) -> None:
    _plot_selection(df, out, "knn_top1", ("first N stages", "random", "all"), "Selective masking")


@register_figure("fig9", "Fig. 9: accuracy against trainable masks: random fraction vs largest |W|")
def fig9(df: pd.DataFrame, out: str) -> None:
    _plot_selection(df, out, "knn_top1", ("random", "magnitude", "all"), "Random vs magnitude selection")
