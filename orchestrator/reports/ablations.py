"""The ablation tables and figures of the paper, from the ledger alone (issue "ablation sweeps").

* ``table2``: threshold masking (SMN) vs top-k% at 50 % and at the density SMN found (Table 2), k-NN and
  linear-probe rows per dataset, and SMN's density (the paper's "sparsity level" row is the density).
* ``table5a`` / ``table5b`` / ``table5c``: number of prototypes, frozen layers (which parameter groups
  are masked), initialisation (Table 5), k-NN.
* ``appE``: progressive top-k vs top-k at the found density vs threshold (App. E, Table 9).
* ``fig8`` / ``fig9``: accuracy against the number of trainable masks per selection strategy (first N
  stages, random fraction, largest-|W| fraction; App. F).

Cells are recognised from their resolved config (``config_json``), so any experiment whose cells
vary the relevant keys feeds these layouts. Every entry is mean ± std over seeds with the 95 % t-interval of the
mean (:func:`orchestrator.reports.intervals.stat_text`); cells of different settings that a layout would give the
same row label (three threshold-mask settings in Table 2) get rows of their own, named by the config keys that
differ (:func:`row_labels`). The tables that compare with a reference (Table 2: the threshold mask; 5a: the most
prototypes; 5b: BNs frozen, the paper's choice; 5c: the frozen backbone of the same initialisation) add, per
dataset, ``<dataset> vs <reference>``: the paired difference in points (row minus reference) with its 95 %
interval (:func:`orchestrator.reports.vs_frozen.paired_difference`: over test images and seeds where the cells
stored per-image correctness, else over seeds), against the reference cells whose settings differ from the
row's only in what the table varies (:func:`setting_without`), marked ``gain`` / ``loss`` only when the interval
excludes 0.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from orchestrator.results import ledger
from orchestrator.results.per_image import root_of
from orchestrator.reports.intervals import difference_text, stat_text
from orchestrator.reports.registry import register_figure, register_table, save_figure
from orchestrator.reports.settings import KEYS, MAX_KEYS, SEED_KEYS, setting_label
from orchestrator.reports.vs_frozen import paired_difference
from orchestrator.spec.keys import flatten, setting_id

__all__ = ["cells_frame", "mask_variant", "frozen_label", "selection_strategy", "setting_without", "row_labels",
           "Reference"]

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


def _flat_setting(config: dict) -> dict:
    """``config`` as dotted keys without its seed keys (:data:`orchestrator.reports.settings.SEED_KEYS`)."""
    return {k: v for k, v in flatten(config).items() if k not in SEED_KEYS}


def setting_without(config: dict, *keys: str) -> str:
    """``config``'s setting (without its seeds, :data:`orchestrator.reports.settings.SEED_KEYS`) minus the dotted
    ``keys`` (a key drops its whole sub-tree: ``"train"``), as canonical JSON: cells that differ only in those
    keys (and the seed) share it, so a comparison is of like with like."""
    kept = {k: v for k, v in _flat_setting(config).items()
            if not any(k == key or k.startswith(key + ".") for key in keys)}
    return json.dumps(kept, sort_keys=True, default=str)


def _value_text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def row_labels(frame: pd.DataFrame, row_key: str) -> pd.Series:
    """The row label of each cell: ``frame[row_key]``, followed, when the cells of one label and dataset ran
    with several settings, by the config keys that differ between those settings (``SMN (threshold)
    (include_bn=true, selector=conv)``; more than :data:`orchestrator.reports.settings.MAX_KEYS` keys: a short
    setting id), so that no row pools settings. ``frame``: :func:`cells_frame` rows (``experiment``, ``config``,
    ``grid``, ``dataset``)."""
    labels = frame[row_key].astype(str).copy()
    grids = frame["experiment"] + "|" + frame["grid"].map(lambda g: json.dumps(g, sort_keys=True, default=str))
    for _, g in frame.groupby([row_key, "dataset"], sort=False):
        if grids[g.index].nunique() < 2:  # one experiment and grid: one setting (split_settings saw to that)
            continue
        flats = {i: _flat_setting(c) for i, c in g["config"].items()}
        texts = {i: {k: json.dumps(v, sort_keys=True, default=str) for k, v in f.items()} for i, f in flats.items()}
        keys = sorted({k for f in texts.values() for k in f})
        differ = [k for k in keys if len({f.get(k) for f in texts.values()}) > 1]
        for i, flat in flats.items() if differ else ():
            if len(differ) > MAX_KEYS:
                suffix = f"setting={setting_id(json.dumps(g.at[i, 'config'], sort_keys=True, default=str))[:8]}"
            else:
                suffix = ", ".join(f"{k.split('.')[-1]}={_value_text(flat.get(k, '-'))}" for k in differ)
            labels.at[i] = f"{labels.at[i]} ({suffix})"
    return labels


@dataclass(frozen=True)
class Reference:
    """What a table compares its rows with: ``name`` (the column reads ``<dataset> vs <name>``), ``pick(frame) ->
    bool Series`` (which cells are reference cells; the frame has a ``ref_key`` column, the cell's
    :func:`setting_without` ``varies``), and ``varies``, the config keys a row may differ from its reference in."""

    name: str
    pick: Callable[[pd.DataFrame], pd.Series]
    varies: tuple[str, ...]


def _difference(g: pd.DataFrame, frame: pd.DataFrame, ds: str, metric: str, results: str | None) -> str:
    """The ``vs <reference>`` entry of row cells ``g`` (dataset ``ds``): ``reference`` for the reference's own
    row, the paired difference in points to the reference cells of the same ``ref_key``, else ``-``."""
    if g["is_ref"].all():
        return "reference"
    ref = frame[frame["is_ref"] & (frame["dataset"] == ds) & frame["ref_key"].isin(set(g["ref_key"]))]
    if ref.empty or ref[metric].dropna().empty:
        return "-"
    return difference_text(paired_difference(g, ref, metric, results))


def _pivot(frame: pd.DataFrame, row_key: str, metric: str, row_order=None, *, reference: Reference | None = None,
           results: str | None = None, text: Callable = stat_text) -> pd.DataFrame:
    """``row_key`` x dataset of ``metric`` (``text``: mean ± std [95 % interval] over seeds); a row per setting
    (:func:`row_labels`); with ``reference``, a ``<dataset> vs <reference name>`` column after each dataset's
    (:func:`_difference`; per-image correctness read under ``results``)."""
    if frame.empty or metric not in frame:
        return pd.DataFrame()
    frame = frame[frame[metric].notna()]
    if frame.empty:
        return pd.DataFrame()
    frame = frame.assign(row=row_labels(frame, row_key))
    if reference is not None:
        frame = frame.assign(ref_key=frame["config"].map(lambda c: setting_without(c, *reference.varies)))
        frame = frame.assign(is_ref=reference.pick(frame).astype(bool))
    datasets = list(dict.fromkeys(frame["dataset"]))
    table = {}
    for (r, ds), g in frame.groupby(["row", "dataset"], sort=False):
        table.setdefault(r, {})[ds] = text(list(g[metric]))
        if reference is not None:
            table[r][f"{ds} vs {reference.name}"] = _difference(g, frame, ds, metric, results)
    columns = [c for ds in datasets for c in ([ds] + ([f"{ds} vs {reference.name}"] if reference else []))]
    out = pd.DataFrame.from_dict(table, orient="index").reindex(columns=columns)
    if row_order:
        base = frame.drop_duplicates("row").set_index("row")[row_key].astype(str)
        rank = {v: i for i, v in enumerate(row_order)}
        out = out.loc[sorted(out.index, key=lambda r: (rank.get(base[r], len(rank)), list(out.index).index(r)))]
    out.index.name = row_key
    return out.fillna("-")


def _eval_rows(cells: pd.DataFrame, order: list[str], extra: pd.DataFrame | None = None, *,
               reference: Reference | None = None, results: str | None = None) -> pd.DataFrame:
    """k-NN then linear-probe rows (``"k-NN: <variant>"``) per dataset, variants in ``order``, then ``extra``."""
    parts = []
    for metric, name in EVALS:
        t = _pivot(cells, "variant", metric, order, reference=reference, results=results)
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
    the decorated ``build(cells, results) -> DataFrame`` sees only a non-empty frame of :func:`_smn` cells and
    the folder of their per-image correctness (:func:`orchestrator.results.per_image.root_of`, or None); with
    none, the table is that empty frame (``bare_when_empty``: an empty ``DataFrame()`` without columns)."""
    def wrap(build):
        @register_table(name, description)
        @functools.wraps(build)
        def table(df: pd.DataFrame) -> pd.DataFrame:
            cells = _smn(df)
            if cells.empty:
                return pd.DataFrame() if bare_when_empty else cells
            return build(cells, root_of(df.attrs))
        return table
    return wrap


_DIFF = "paired difference in points, row minus reference [95 % interval], a gain / loss only when it excludes 0"

_THRESHOLD = "SMN (threshold)"
_MASK_MODE = ("train.mask.mode", "train.mask.topk_density", "train.progressive_topk")


@_smn_table("table2", "Table 2: threshold masking (SMN) vs top-k% (50 % and the density SMN found); mean ± std "
            f"[95 % interval]; vs SMN (threshold): {_DIFF}", bare_when_empty=True)
def table2(cells: pd.DataFrame, results: str | None) -> pd.DataFrame:
    cells["variant"] = cells.apply(mask_variant, axis=1)
    cells = cells[cells["variant"].notna() & ~cells["variant"].str.contains("progressive", na=False)]
    order = sorted({v for v in cells["variant"] if v.startswith("top-k ") and v != "top-k found"}) + \
        ["top-k found", _THRESHOLD]
    ref = Reference(_THRESHOLD, lambda f: f["variant"] == _THRESHOLD, _MASK_MODE)
    dens = _pivot(cells[cells["variant"] == _THRESHOLD], "variant", "density")
    if not dens.empty:
        dens.index = [i.replace(_THRESHOLD, "density found by SMN", 1) for i in dens.index]
    return _eval_rows(cells, order, extra=dens, reference=ref, results=results)


_PROTOTYPES = "train.swav.num_prototypes"


@_smn_table("table5a", f"Table 5a: number of prototypes (k-NN); mean ± std [95 % interval]; vs most: {_DIFF} "
            "(the reference: the most prototypes of the same setting)")
def table5a(cells: pd.DataFrame, results: str | None) -> pd.DataFrame:
    cells["prototypes"] = cells["config"].map(lambda c: c["train"]["swav"]["num_prototypes"])
    ref = Reference("most", lambda f: f["prototypes"] == f.groupby("ref_key")["prototypes"].transform("max"),
                    (_PROTOTYPES,))
    out = _pivot(cells.sort_values("prototypes"), "prototypes", "knn_top1", reference=ref, results=results)
    return out.loc[sorted(out.index, key=lambda r: (int(str(r).split(" ")[0]), str(r)))] if not out.empty else out


@_smn_table("table5b", f"Table 5b: parameter groups kept frozen, i.e. not masked (k-NN); mean ± std [95 % interval]; "
            f"vs BNs: {_DIFF} (the reference: BNs frozen, the paper's choice, of the same setting)")
def table5b(cells: pd.DataFrame, results: str | None) -> pd.DataFrame:
    cells["frozen"] = cells.apply(frozen_label, axis=1)
    ref = Reference("BNs", lambda f: f["frozen"] == "BNs",
                    ("train.mask.selector", "train.mask.include_bn", "train.mask.include_bias"))
    return _pivot(cells, "frozen", "knn_top1", ["none", "BNs", "biases"], reference=ref, results=results)


@register_table("table5c", f"Table 5c: initialisation of the backbone (k-NN): SMN and the frozen backbone; mean ± std "
                f"[95 % interval]; vs frozen: {_DIFF} (the reference: the frozen backbone of the same initialisation)")
def table5c(df: pd.DataFrame) -> pd.DataFrame:
    """Table 5c: k-NN of SMN per backbone initialisation (``arch (weights)``), beside the frozen backbone of that
    initialisation (``pretrained`` cells, rows ``... , frozen``), and SMN's paired difference from it. Empty
    without SMN cells."""
    cells = cells_frame(df)
    if cells.empty or not (cells["method"] == "smn").any():
        return pd.DataFrame()
    cells = cells[cells["method"].isin(["smn", "pretrained"])].copy()
    init = cells["config"].map(lambda c: f"{c['backbone']['arch']} ({c['backbone']['weights']})")
    cells["initialisation"] = [i + (", frozen" if m == "pretrained" else "") for i, m in zip(init, cells["method"])]
    ref = Reference("frozen", lambda f: f["method"] == "pretrained", ("method", "train"))
    out = _pivot(cells, "initialisation", "knn_top1", reference=ref, results=root_of(df.attrs))
    return out.loc[sorted(out.index, key=lambda r: (r.replace(", frozen", "", 1), ", frozen" not in r))]


@_smn_table("appE", "App. E (Table 9): progressive top-k vs top-k at the found density vs threshold; mean ± std "
            "[95 % interval]")
def app_e(cells: pd.DataFrame, results: str | None) -> pd.DataFrame:
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
