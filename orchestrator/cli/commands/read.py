"""``smn table`` and ``smn plot``: tables and figures from the ledger alone (reads only; never loads torch or ray).

The report modules (pandas, every layout) load on first use (:func:`_reports`): the generic table scans the ledger
first, so that its peak memory is the scan's or the frame's, not both (issue 27)."""

from __future__ import annotations

import os

from types import SimpleNamespace

from orchestrator.cli.common import EXIT_OK, check_output_path, check_results_dir
from orchestrator.results import compact, ledger
from orchestrator.results.layout import figure_location

__all__ = ["table", "plot", "table_text", "ledger_command"]

DEFAULT_METRICS = ("knn_top1", "knn_dino_top1", "linear_probe_top1", "density", "bits_per_weight", "x_smaller_than_fft",
                   "code_entropy", "collapsed", "wall_s")
"""The generic table's default metrics (:data:`orchestrator.reports.tables.DEFAULT_METRICS`, which a unit test
compares with this copy: the scan is chosen before the report modules load)."""


def _reports() -> SimpleNamespace:
    """The report modules and the table writer, imported on first use (module docstring)."""
    from orchestrator.cli.report import write_table  # reason: it loads pandas and every layout; a table scans first
    from orchestrator.reports import registry, settings, tables  # reason: pandas and every layout, after the scan

    return SimpleNamespace(registry=registry, settings=settings, tables=tables, write_table=write_table)


def table_text(results: str | None, experiment: str | None, fmt: str, metrics: str | None, layout: str | None = None,
               out: str | None = None, where: list[str] | None = None) -> str:
    """What ``smn table`` prints: the table of the ledger under ``results`` (``layout``: a registered one,
    ``'list'``: the list of them), or ``wrote FILE`` when it goes to ``out`` (always for parquet). ``where``:
    ``KEY=VALUE`` conditions on the cells' configs (``--where``, :func:`orchestrator.reports.settings.select`).

    Raises:
        ResultsError: a missing results folder. ValueError: an unknown layout, experiment or metric.
    """
    if layout is not None or where:  # checked before any work; the generic table loads them after its scan
        rep = _reports()
        if layout == "list":
            return rep.tables.layout_list()
        rep.tables.check_layout(layout)
        rep.settings.parse_where(where or [])
    results = check_results_dir(results, "table")
    if out is not None:
        check_output_path(out)
    ledger.check_experiment(results, experiment)
    aggregated = layout is None and not where and out is None and fmt in AGGREGATED_FORMATS
    frame, title = (_aggregated(results, experiment, metrics), None) if aggregated else (None, None)
    rep = None
    if frame is None:
        rows = _rows(results, experiment, metrics, layout, bool(where))
        rep = _reports()
        frame, title = rep.tables.table_frame(rows, fmt, metrics, layout, where)
    rep = rep or _reports()
    if out is not None or fmt == "parquet":
        return rep.write_table(frame, fmt, out)
    if frame is None or frame.empty:
        return f"(no cell matches --where {' '.join(where)})" if where else "(no results in the ledger yet)"
    return rep.registry.render_frame(frame, fmt, title=title)


TABLE_COLUMNS = ("cell_id", "experiment", "method", "backbone", "dataset", "seed", "grid_json", "setting_id", "metric",
                 "value")
"""The ledger columns the generic table reads (a registered layout reads them all): ``setting_id`` gives each
cell's setting (:mod:`orchestrator.reports.settings`; derived from ``config_json`` for files without it), and
``config_json`` (kilobytes a cell) is read as well only for ``--where``."""

STORAGE_METRICS = ("storage_bits", "backbone_params")
"""The metrics behind the generic table's storage columns (:mod:`orchestrator.reports.tables`)."""


def _rows(results: str, experiment: str | None, metrics: str | None, layout: str | None, where: bool = False):
    """The ledger rows a table needs: every column for a registered layout; for the generic table only
    :data:`TABLE_COLUMNS` (and ``config_json`` when ``where``) of the chosen metrics (and
    :data:`STORAGE_METRICS`), filtered in the scan.

    Raises:
        ValueError: a chosen metric that the ledger does not hold (names the ones it does).
    """
    if layout is not None:
        return ledger.read_ledger(results, experiment)
    if metrics is not None and not [m for m in metrics.split(",") if m.strip()]:
        raise ValueError(f"--metrics {metrics!r} names no metric; allowed: comma-separated metric names such as "
                         "knn_top1,density (or leave --metrics out for the default ones)")
    chosen = [m.strip() for m in metrics.split(",")] if metrics else list(DEFAULT_METRICS)
    columns = [*TABLE_COLUMNS, *(["config_json"] if where else [])]
    df = ledger.read_ledger(results, experiment, columns=columns,
                            metrics=list(dict.fromkeys(chosen + list(STORAGE_METRICS))),
                            shared=tuple(c for c in columns if c in (*ledger.META_COLUMNS, ledger.SETTING_ID)))
    if metrics:
        unknown = [m for m in chosen if m not in set(df["metric"])]
        have = ledger.metric_names(results, experiment) if unknown else []
        if unknown and have:
            raise ValueError(f"metric(s) {', '.join(map(repr, unknown))} not in the ledger; allowed: {', '.join(have)}")
    return df


AGGREGATED_FORMATS = ("markdown", "latex")
"""Formats whose generic table comes from per-setting statistics aggregated inside DuckDB (:func:`_aggregated`): they
round every number to 1 or 3 decimals, so DuckDB's summation order (the last bits of a float) could show only in a
mean within those bits of a rounding boundary (``tests/test_ledger_aggregate.py`` compares both reads on every
committed ledger); csv, json and parquet print the numbers whole and keep the per-cell read. A ledger that the
aggregation turns down after its scan (a bad file) is scanned twice."""


def _aggregated(results: str, experiment: str | None, metrics: str | None):
    """The generic table's display frame from per-setting statistics (:func:`orchestrator.results.ledger.setting_stats`,
    :func:`orchestrator.reports.tables.stats_table`): only those rows come back from the scan, so the memory grows
    with the table, not with the cells (issue 27). None where they cannot give it exactly: the caller reads the rows
    (:func:`_rows`), which also says what is wrong with a bad ``--metrics`` or a bad file."""
    if metrics is not None and not [m for m in metrics.split(",") if m.strip()]:
        return None
    chosen = [m.strip() for m in metrics.split(",")] if metrics else list(DEFAULT_METRICS)
    stats = ledger.setting_stats(results, experiment, list(dict.fromkeys(chosen + list(STORAGE_METRICS))))
    if stats is None or (metrics and not set(chosen) <= set(stats.column("metric").to_pylist())):
        return None
    tables = _reports().tables
    table = tables.stats_table(stats, tuple(chosen), results)
    return None if table is None else (table if table.empty else tables.display_table(table))


def table(args) -> int:
    """``smn table``: print (or write) the table."""
    print(table_text(args.results, args.experiment, args.format, args.metrics, args.layout, args.out,
                     getattr(args, "where", None)))
    return EXIT_OK


def plot(args) -> int:
    """``smn plot``: draw a registered figure from the ledger into ``--out`` (default ``DIR/figures/NAME.png``,
    also for a URI ``DIR``); ``--figure list`` lists them."""
    registry = _reports().registry
    if args.figure == "list":
        print(registry.figure_list())
        return EXIT_OK
    registry.check_figure(args.figure)
    results = check_results_dir(args.results, "plot")
    out = args.out
    if out is not None and (os.path.isdir(out) or out.endswith(("/", os.sep))):
        raise ValueError(f"--out {out!r} is a folder; allowed: a file name such as {args.figure}.png")
    if out is not None and not out.lower().endswith(".png"):
        raise ValueError(f"--out {out!r} is not a .png file; allowed: a file name such as {args.figure}.png")
    check_output_path(out if out is not None else figure_location(results, args.figure),
                      option="--out" if out is not None else "the figure (default --out)")
    ledger.check_experiment(results, args.experiment)
    df = ledger.read_ledger(results, args.experiment)
    if df.empty:
        raise ValueError(f"the ledger under {results!r} holds no results"
                         + (f" for {args.experiment!r}" if args.experiment else ""))
    print(f"wrote {registry.draw_figure(args.figure, df, out or figure_location(results, args.figure))}")
    return EXIT_OK



def ledger_command(args) -> int:
    """``smn ledger compact RESULTS [--experiment NAME]``: compact every experiment's ledger (or one), a line
    each (:func:`orchestrator.results.compact.compact_all`); 2 for a missing folder or unknown experiment."""
    results = check_results_dir(args.results, "ledger compact")
    compact.compact_all(results, args.experiment)
    return EXIT_OK
