"""``smn table`` and ``smn plot``: tables and figures from the ledger alone (reads only; never loads torch or ray)."""

from __future__ import annotations

import os

from orchestrator.cli.common import EXIT_OK, check_output_path, check_results_dir
from orchestrator.cli.report import write_table
from orchestrator.reports import registry, tables
from orchestrator.results import ledger
from orchestrator.results.layout import figure_location

__all__ = ["table", "plot", "table_text"]


def table_text(results: str | None, experiment: str | None, fmt: str, metrics: str | None, layout: str | None = None,
               out: str | None = None) -> str:
    """What ``smn table`` prints: the table of the ledger under ``results`` (``layout``: a registered one,
    ``'list'``: the list of them), or ``wrote FILE`` when it goes to ``out`` (always for parquet).

    Raises:
        ResultsError: a missing results folder. ValueError: an unknown layout, experiment or metric.
    """
    if layout == "list":
        return tables.layout_list()
    tables.check_layout(layout)
    results = check_results_dir(results, "table")
    if out is not None:
        check_output_path(out)
    ledger.check_experiment(results, experiment)
    frame, title = tables.table_frame(ledger.read_ledger(results, experiment), fmt, metrics, layout)
    if out is not None or fmt == "parquet":
        return write_table(frame, fmt, out)
    if frame is None or frame.empty:
        return "(no results in the ledger yet)"
    return registry.render_frame(frame, fmt, title=title)


def table(args) -> int:
    """``smn table``: print (or write) the table."""
    print(table_text(args.results, args.experiment, args.format, args.metrics, args.layout, args.out))
    return EXIT_OK


def plot(args) -> int:
    """``smn plot``: draw a registered figure from the ledger into ``--out`` (default ``DIR/figures/NAME.png``,
    also for a URI ``DIR``); ``--figure list`` lists them."""
    if args.figure == "list":
        print(registry.figure_list())
        return EXIT_OK
    registry.check_figure(args.figure)
    results = check_results_dir(args.results, "plot")
    out = args.out
    if out is not None and (os.path.isdir(out) or out.endswith(("/", os.sep))):
        raise ValueError(f"--out {out!r} is a folder; allowed: a file name such as {args.figure}.png")
    check_output_path(out if out is not None else figure_location(results, args.figure),
                      option="--out" if out is not None else "the figure (default --out)")
    ledger.check_experiment(results, args.experiment)
    df = ledger.read_ledger(results, args.experiment)
    if df.empty:
        raise ValueError(f"the ledger under {results!r} holds no results"
                         + (f" for {args.experiment!r}" if args.experiment else ""))
    print(f"wrote {registry.draw_figure(args.figure, df, out or figure_location(results, args.figure))}")
    return EXIT_OK

