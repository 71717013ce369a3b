"""The generic results table, rebuilt from the ledger alone: one layout (``results``) of the report
registry (:mod:`orchestrator.reports.registry`), rendered by pandas (Markdown, LaTeX, CSV, JSON, Parquet).

One row per (experiment, method, backbone, dataset, grid values); one column per metric. With
several seeds a cell shows ``mean +- std`` (sample std, ddof=1) and the number of seeds.

Every table has a storage column pair (paper Table 1 "Size", App. C), derived from the cells'
``storage_bits`` and ``backbone_params``: ``bits_per_weight`` (bits one task costs per backbone
weight: 1 for a full mask, less for a selective one, 32 for a fine-tuned fp32 copy, 0 for the frozen
backbone) and ``x_smaller_than_fft`` (32 / bits_per_weight: how many times smaller than a fine-tuned
copy, uncompressed).
"""

from __future__ import annotations

import json

import pandas as pd

from orchestrator.reports.registry import check_format, mean_std, metric_frame, register_table, render_frame
from orchestrator.reports.registry import tables as registered_tables

__all__ = ["DEFAULT_METRICS", "results_table", "display_table", "results_layout", "render", "table_frame",
           "check_layout", "layout_list"]

DEFAULT_METRICS = ("knn_top1", "knn_dino_top1", "linear_probe_top1", "density", "bits_per_weight", "x_smaller_than_fft",
                   "code_entropy", "collapsed", "wall_s")


def results_table(df: pd.DataFrame, metrics: tuple[str, ...] = DEFAULT_METRICS) -> pd.DataFrame:
    """Aggregate long ledger rows into a wide table of ``mean``/``std``/``n`` per metric.

    Args:
        df: rows from :func:`orchestrator.results.ledger.read_ledger`.
        metrics: metric names to show (those absent from the ledger are dropped).

    Returns:
        A DataFrame indexed by (experiment, method, backbone, dataset, grid) with columns
        ``(metric, stat)`` for stat in mean, std, n.
    """
    if df.empty:
        return pd.DataFrame()
    df = pd.concat([df, _storage_rows(df)], ignore_index=True)
    df = df[df["metric"].isin(metrics)].copy()
    df["grid"] = df["grid_json"].map(lambda g: ", ".join(f"{k.split('.')[-1]}={v}" for k, v in json.loads(g).items()))
    wide = metric_frame(df, metrics, ["experiment", "method", "backbone", "dataset", "grid"])
    order = [m for m in metrics if m in wide.columns.get_level_values(0)]
    return wide.reindex(columns=pd.MultiIndex.from_product([order, ["mean", "std", "n"]]))


def _storage_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Derived ledger rows ``bits_per_weight`` and ``x_smaller_than_fft`` per cell (see module docstring)."""
    wide = df[df["metric"].isin(("storage_bits", "backbone_params"))].pivot_table(
        index="cell_id", columns="metric", values="value", aggfunc="first")
    if wide.empty or not {"storage_bits", "backbone_params"} <= set(wide.columns):
        return df.iloc[0:0]
    bpw = wide["storage_bits"] / wide["backbone_params"]
    ratio = (32.0 / bpw).where(bpw > 0, float("inf"))
    first = df.drop_duplicates("cell_id").set_index("cell_id")
    rows = []
    for name, series in (("bits_per_weight", bpw), ("x_smaller_than_fft", ratio)):
        part = first.loc[series.index].copy()
        part["metric"] = name
        part["value"] = series.values
        rows.append(part.reset_index())
    return pd.concat(rows, ignore_index=True)[df.columns]


def _cell_text(mean: float, std: float, n: float, metric: str) -> str:
    if not pd.isna(mean) and mean == float("inf"):
        return "∞ (no storage)"
    return mean_std(mean, std, n, digits=1 if metric in ("wall_s", "x_smaller_than_fft") else 3)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`results_table` as display strings: one column per metric (``mean ± std``), a ``seeds`` column."""
    if table.empty:
        return pd.DataFrame()
    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    out = pd.DataFrame(index=table.index)
    out["seeds"] = table[[(m, "n") for m in metrics]].max(axis=1).astype(int).astype(str)
    for m in metrics:
        out[m] = [_cell_text(mean, std, n, m) for mean, std, n in
                  zip(table[(m, "mean")], table[(m, "std")], table[(m, "n")])]
    out = out.reset_index()
    out["grid"] = out["grid"].replace("", "-")
    return out


@register_table("results", "All results: one row per experiment, method, backbone, dataset and grid values "
                "(mean ± std over seeds)")
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
                layout: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """``(frame, title)`` of ``smn table``: a registered layout's display strings (title: its description), or
    the generic table, numbers for csv / json / parquet and display strings otherwise (no title).

    Args:
        df: ledger rows (:func:`orchestrator.results.ledger.read_ledger`).
        metrics: comma-separated metrics of the generic table; None: :data:`DEFAULT_METRICS`.
        layout: a registered layout name (:func:`check_layout`), or None.

    Raises:
        ValueError: a metric that the ledger does not hold (names the ones it does).
    """
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
