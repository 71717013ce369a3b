"""The generic results table, rebuilt from the ledger alone: one layout (``results``) of the report
registry (:mod:`orchestrator.reports.registry`), rendered by pandas (Markdown, LaTeX, CSV, JSON, Parquet).

One row per setting: (experiment, method, backbone, dataset, grid values), and, where cells sharing those
ran with another config, the keys that differ (:mod:`orchestrator.reports.settings`); one column per metric.
With several seeds a cell shows ``mean +- std`` (sample std, ddof=1), the accuracies also their 95 %
t-interval over seeds, and the number of seeds.

Every table has a storage column pair (paper Table 1 "Size", App. C), derived from the cells'
``storage_bits`` and ``backbone_params``: ``bits_per_weight`` (bits one task costs per backbone
weight: 1 for a full mask, less for a selective one, 32 for a fine-tuned fp32 copy, 0 for the frozen
backbone) and ``x_smaller_than_fft`` (32 / bits_per_weight: how many times smaller than a fine-tuned
copy, uncompressed).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from orchestrator.reports.intervals import t_interval, t_quantile
from orchestrator.reports.settings import KEYS, NOTE, grid_text, select, setting_label, split_settings
from orchestrator.reports.registry import check_format, mean_std, metric_frame, register_table, render_frame
from orchestrator.reports.registry import tables as registered_tables
from orchestrator.results.ledger import SETTING_KEYS

__all__ = ["DEFAULT_METRICS", "results_table", "stats_table", "display_table", "results_layout", "render", "table_frame",
           "check_layout", "layout_list", "per_seed_frame", "PER_SEED_METRICS", "INTERVAL_METRICS"]

DEFAULT_METRICS = ("knn_top1", "knn_dino_top1", "linear_probe_top1", "density", "bits_per_weight", "x_smaller_than_fft",
                   "code_entropy", "collapsed", "wall_s")


def results_table(df: pd.DataFrame, metrics: tuple[str, ...] = DEFAULT_METRICS) -> pd.DataFrame:
    """Aggregate long ledger rows into a wide table of ``mean``/``std``/``n``/``ci_lo``/``ci_hi`` per metric.

    One row per setting (:func:`orchestrator.reports.settings.split_settings`): cells that share experiment,
    method, backbone, dataset and grid values but ran with another config (``train.epochs=1``) get a row of
    their own, with a ``setting`` index level naming the keys that differ (present only when some row needs
    it); ``attrs["note"]`` says so in one line. ``ci_lo`` / ``ci_hi``: the 95 % Student-t interval of the mean
    over seeds (:func:`orchestrator.reports.intervals.t_interval`; NaN with one seed).

    Args:
        df: rows from :func:`orchestrator.results.ledger.read_ledger`.
        metrics: metric names to show (those absent from the ledger are dropped).

    Returns:
        A DataFrame indexed by (experiment, method, backbone, dataset, grid[, setting]) with columns
        ``(metric, stat)`` for stat in mean, std, n, ci_lo, ci_hi.
    """
    if df.empty:
        return pd.DataFrame()
    df = split_settings(df)
    added, note = set(df.attrs.get(KEYS, ())), df.attrs.get(NOTE, "")
    df = pd.concat([df, _storage_rows(df)], ignore_index=True)
    df = df[df["metric"].isin(metrics)].copy()
    df["grid"] = df["grid_json"].map({text: grid_text(text, added) for text in df["grid_json"].unique()})  # few grids
    by = ["experiment", "method", "backbone", "dataset", "grid"]
    if added:
        df["setting"] = df["grid_json"].map({text: setting_label(json.loads(text), added)
                                             for text in df["grid_json"].unique()})
        by.append("setting")
    return _with_intervals(metric_frame(df, metrics, by), metrics, note)


def _with_intervals(wide: pd.DataFrame, metrics: tuple[str, ...], note: str) -> pd.DataFrame:
    """:func:`results_table`'s frame from ``(metric, mean|std|n)`` columns (:func:`metric_frame`): the 95 % interval
    added, the metrics in the order of ``metrics``."""
    if wide.empty:
        return wide
    order = [m for m in metrics if m in wide.columns.get_level_values(0)]
    for m in order:
        half = [t_quantile(int(n) - 1) * s / math.sqrt(n) if n >= 2 and pd.notna(s) else np.nan
                for s, n in zip(wide[(m, "std")], wide[(m, "n")].fillna(0))]
        wide[(m, "ci_lo")] = wide[(m, "mean")] - half
        wide[(m, "ci_hi")] = wide[(m, "mean")] + half
    out = wide.reindex(columns=pd.MultiIndex.from_product([order, ["mean", "std", "n", "ci_lo", "ci_hi"]]))
    out.attrs["note"] = note
    return out


def stats_table(stats, metrics: tuple[str, ...], results: str) -> pd.DataFrame | None:
    """:func:`results_table` of the ledger under ``results`` from its per-setting statistics
    (:func:`orchestrator.results.ledger.setting_stats`, aggregated inside DuckDB) instead of its rows: the same rows,
    columns, note and numbers up to the last bits of a float (DuckDB sums in another order than pandas), which the
    Markdown and LaTeX tables round away; ``smn table`` uses it for those formats.

    The settings are split as :func:`orchestrator.reports.settings.split_settings` splits cells (one cell's config
    per setting, read only where a group holds several settings); the storage columns come from each setting's
    ``storage_bits`` and ``backbone_params``, which must then be one value each over the same cells.

    Returns:
        The table, or None where these statistics cannot give the per-cell table exactly (a setting whose cells
        differ in storage, or whose storage metrics are NaN or miss on some cells; two settings that would share
        a table row; an empty setting column): the caller reads the rows then.
    """
    stats = stats.to_pandas() if not isinstance(stats, pd.DataFrame) else stats
    if stats.empty:
        return pd.DataFrame()
    keys = list(SETTING_KEYS)
    if stats[keys].isna().any(axis=None):  # a file with an empty setting column: the per-cell read says what it does
        return None
    settings = stats.groupby(keys, sort=False)["first_cell"].min().reset_index().rename(columns={"first_cell": "cell_id"})
    settings.attrs["results"] = str(results)
    split = split_settings(settings)
    added, note = set(split.attrs.get(KEYS, ())), split.attrs.get(NOTE, "")
    grid_of = dict(zip(map(tuple, settings[keys].to_numpy().tolist()), split["grid_json"]))
    stats = stats.assign(grid_json=[grid_of[k] for k in map(tuple, stats[keys].to_numpy().tolist())])
    derived = _storage_stats(stats, keys, metrics)
    if derived is None:
        return None
    stats = stats[stats["metric"].isin(metrics)]
    if stats.empty and derived.empty:
        return pd.DataFrame()
    grids = {text: json.loads(text) for text in set(stats["grid_json"]) | set(derived.get("grid_json", ()))}
    by = ["experiment", "method", "backbone", "dataset", "grid"]
    labels = {text: grid_text(text, added) for text in grids}
    settings_of = {t: setting_label(g, added) for t, g in grids.items()}
    stats, derived = [frame.assign(grid=frame["grid_json"].map(labels),
                                   **({"setting": frame["grid_json"].map(settings_of)} if added else {}))
                      if len(frame) else frame for frame in (stats, derived)]
    if added:
        by.append("setting")
    agg = stats.set_index(by + ["metric"])[["mean", "std", "n"]].astype({"n": "int64"})
    if len(derived):
        agg = pd.concat([agg, derived.groupby(by + ["metric"], dropna=False)["value"].agg(["mean", "std", "count"])
                         .rename(columns={"count": "n"})])
    if agg.index.has_duplicates:  # two settings in one table row: the per-cell read pools their values
        return None
    wide = agg.sort_index().unstack("metric")
    wide.columns = wide.columns.swaplevel(0, 1)
    return _with_intervals(wide.sort_index(axis=1), metrics, note)


def _storage_stats(stats: pd.DataFrame, keys: list[str], metrics: tuple[str, ...]) -> pd.DataFrame | None:
    """The rows of ``bits_per_weight`` and ``x_smaller_than_fft`` (those of ``metrics``), one per cell, of each setting
    of ``stats`` (:func:`stats_table`) that holds ``storage_bits`` and ``backbone_params``: one value each, on every
    cell (as :func:`_storage_rows` derives them per cell); None where a setting's storage is not that."""
    store = stats[stats["metric"].isin(("storage_bits", "backbone_params"))]
    wanted = [m for m in ("bits_per_weight", "x_smaller_than_fft") if m in metrics]
    if store.empty:
        return pd.DataFrame()
    rows = []
    for key, g in store.groupby(keys, sort=False):
        by_metric = {m: r for m, r in zip(g["metric"], g.itertuples(index=False))}
        sb, bp = by_metric.get("storage_bits"), by_metric.get("backbone_params")
        if sb is None or bp is None or not all(r.n == r.n_rows and r.lo == r.hi for r in (sb, bp)) \
                or sb.n != bp.n or sb.cells_hash != bp.cells_hash:
            return None
        bpw = pd.Series([sb.lo / bp.lo])
        ratio = (32.0 / bpw).where(bpw > 0, float("inf"))
        for name, value in (("bits_per_weight", bpw.iloc[0]), ("x_smaller_than_fft", ratio.iloc[0])):
            if name in wanted:
                rows.append((*key, name, value, sb.n))
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows, columns=[*keys, "metric", "value", "count"])
    return frame.loc[frame.index.repeat(frame.pop("count"))].reset_index(drop=True)


def _storage_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Derived ledger rows ``bits_per_weight`` and ``x_smaller_than_fft`` per cell (see module docstring)."""
    cell = ["experiment", "cell_id"]  # a cell id is a config's hash: two experiments may hold the same one
    wide = df[df["metric"].isin(("storage_bits", "backbone_params"))].pivot_table(
        index=cell, columns="metric", values="value", aggfunc="first")
    if wide.empty or not {"storage_bits", "backbone_params"} <= set(wide.columns):
        return df.iloc[0:0]
    bpw = wide["storage_bits"] / wide["backbone_params"]
    ratio = (32.0 / bpw).where(bpw > 0, float("inf"))
    first = df.drop_duplicates(cell).set_index(cell)
    rows = []
    for name, series in (("bits_per_weight", bpw), ("x_smaller_than_fft", ratio)):
        part = first.loc[series.index].copy()
        part["metric"] = name
        part["value"] = series.values
        rows.append(part.reset_index())
    return pd.concat(rows, ignore_index=True)[df.columns]


INTERVAL_METRICS = ("knn_top1", "knn_dino_top1", "linear_probe_top1")
"""Metrics whose display cell carries the 95 % interval after mean ± std: ``0.685 ± 0.012 [0.655, 0.715]``."""


def _cell_text(mean: float, std: float, n: float, metric: str, lo: float = np.nan, hi: float = np.nan) -> str:
    if not pd.isna(mean) and mean == float("inf"):
        return "∞ (no storage)"
    digits = 1 if metric in ("wall_s", "x_smaller_than_fft") else 3
    text = mean_std(mean, std, n, digits=digits)
    if metric in INTERVAL_METRICS and pd.notna(lo) and pd.notna(hi):
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`results_table` as display strings: one column per metric (``mean ± std``), a ``seeds`` column."""
    if table.empty:
        return pd.DataFrame()
    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    out = pd.DataFrame(index=table.index)
    out["seeds"] = table[[(m, "n") for m in metrics]].max(axis=1).astype(int).astype(str)
    for m in metrics:
        stats = [table[(m, s)] if (m, s) in table else pd.Series(np.nan, index=table.index)
                 for s in ("mean", "std", "n", "ci_lo", "ci_hi")]
        out[m] = [_cell_text(mean, std, n, m, lo, hi) for mean, std, n, lo, hi in zip(*stats)]
    out = out.reset_index()
    out["grid"] = out["grid"].replace("", "-")
    out.attrs["note"] = table.attrs.get("note", "")
    return out


@register_table("results", "All results: one row per setting (experiment, method, backbone, dataset, grid "
                "values and any other config key that differs), mean ± std over seeds [95 % t-interval]")
def results_layout(df: pd.DataFrame) -> pd.DataFrame:
    """The generic table as a report layout (:func:`display_table` of :func:`results_table`)."""
    return display_table(results_table(df))


def render(table: pd.DataFrame, fmt: str = "markdown") -> str:
    """Render :func:`results_table` output: Markdown or LaTeX as display strings (:func:`display_table`),
    CSV or JSON with the numbers (columns ``<metric>_mean|std|n``), all through
    :func:`orchestrator.reports.registry.render_frame`.

    Raises:
        ValueError: on an unknown format (lists the allowed ones), from
            :func:`orchestrator.reports.registry.check_format`.
    """
    check_format(fmt)
    if table.empty:
        return "(no results in the ledger yet)"
    return render_frame(table if fmt in ("csv", "json") else display_table(table), fmt)


def layout_list() -> str:
    """``smn table --layout list``: one line per registered layout, its name and description."""
    return "\n".join(f"{t.name:12s} {t.description}" for t in registered_tables().values())


def check_layout(layout: str | None) -> None:
    """Refuse a ``--layout`` that is not registered (None: the generic table).

    Raises:
        ValueError: naming the layout and the registered ones.
    """
    known = registered_tables()
    if layout is not None and layout not in known:
        raise ValueError(f"table layout {layout!r} is not known; allowed: {', '.join(known)} (or 'list')")


def table_frame(df: pd.DataFrame, fmt: str, metrics: str | None = None,
                layout: str | None = None, where: list[str] | None = None) -> tuple[pd.DataFrame, str | None]:
    """``(frame, title)`` of ``smn table``: a registered layout's display strings (title: its description), or
    the generic table, numbers for csv / json / parquet and display strings otherwise (no title).

    Args:
        df: ledger rows (:func:`orchestrator.results.ledger.read_ledger`).
        metrics: comma-separated metrics of the generic table; None: :data:`DEFAULT_METRICS`.
        layout: a registered layout name (:func:`check_layout`), or None.
        where: ``KEY=VALUE`` conditions (``smn table --where``): only the cells whose config holds them all
            (:func:`orchestrator.reports.settings.select`).

    Raises:
        ValueError: a metric that the ledger does not hold (names the ones it does); a bad ``where``.
    """
    df = select(df, where or [])
    if layout is not None:
        known = registered_tables()
        return known[layout].build(df), known[layout].description
    chosen = tuple(m.strip() for m in metrics.split(",")) if metrics else DEFAULT_METRICS
    if metrics and not df.empty:
        have = sorted(df["metric"].unique())
        unknown = [m for m in chosen if m not in have]
        if unknown:
            raise ValueError(f"metric(s) {', '.join(map(repr, unknown))} not in the ledger; allowed: {', '.join(have)}")
    table = results_table(df, chosen)
    return (table if fmt in ("csv", "json", "parquet") or table.empty else display_table(table)), None


PER_SEED_METRICS = ("knn_top1", "knn_dino_top1", "linear_probe_top1", "density", "collapsed")


def per_seed_frame(df: pd.DataFrame, metrics: tuple[str, ...] = PER_SEED_METRICS) -> pd.DataFrame:
    """Each setting's mean and, under it, one row per seed (``smn report``): columns ``experiment``, ``method``,
    ``setting`` (grid values and split keys, :mod:`orchestrator.reports.settings`), ``seed`` (``mean of N`` on
    the setting's row, the seed on the rows under it) and one per metric of ``metrics`` the ledger holds (the
    mean row as ``mean ± std [95 % interval]``, seed rows as the value). Empty for no rows."""
    if df.empty:
        return pd.DataFrame()
    rows = split_settings(df)
    cells = rows[rows["metric"].isin(metrics)]
    if cells.empty:
        return pd.DataFrame()
    wide = cells.pivot_table(index="cell_id", columns="metric", values="value", aggfunc="first")
    meta = rows.drop_duplicates("cell_id").set_index("cell_id")[["experiment", "method", "grid_json", "seed"]]
    wide = meta.join(wide, how="inner")
    shown = [m for m in metrics if m in wide.columns]
    out = []
    for (exp, method, grid_json), g in wide.groupby(["experiment", "method", "grid_json"], sort=True):
        label = grid_text(grid_json) or "-"
        head = {"experiment": exp, "method": method, "setting": label, "seed": f"mean of {len(g)}"}
        for m in shown:
            v = g[m].dropna()
            ci = t_interval(list(v))
            head[m] = _cell_text(v.mean(), v.std(), len(v), m if m in INTERVAL_METRICS else "", ci.lo, ci.hi) \
                if len(v) else "-"
        out.append(head)
        for _, c in g.sort_values("seed").iterrows():
            out.append({"experiment": exp, "method": method, "setting": label, "seed": str(int(c["seed"])),
                        **{m: "-" if pd.isna(c[m]) else f"{c[m]:.3f}" for m in shown}})
    frame = pd.DataFrame(out)
    frame.attrs["note"] = rows.attrs.get(NOTE, "")
    return frame
