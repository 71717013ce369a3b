"""``smn report``, ``smn ls`` and the output options of ``smn run`` / ``smn table`` (issue 15).

    smn report RESULTS [--experiment NAME] [--out DIR]   # report.md + self-contained report.html + PNGs
    smn report RESULTS --docs OUT                        # docs/ result pages (orchestrator.reports.docs)
    smn ls RESULTS [--json]                              # experiments: cells done / failed / collapsed, last update
    smn ledger compact RESULTS [--experiment NAME]       # merge cell files into a few Parquet parts
    smn run SPEC --json | --quiet | --track mlflow,wandb # summary object / final table only / trackers
    smn table DIR --format json|parquet --out FILE       # machine-readable tables

:func:`add_parser` registers ``report``, ``ls`` and ``ledger`` (their handlers, :func:`report`, :func:`ls` and
:func:`orchestrator.cli.commands.read.ledger`, are named in
:data:`orchestrator.cli.app.COMMANDS`); the output helpers below serve ``smn run`` / ``smn table``
(:mod:`orchestrator.cli.commands`). Nothing here loads torch or ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import warnings
from typing import Iterator

from orchestrator import echo as echo_line
from orchestrator.cli.common import check_output_path, check_results_dir
from orchestrator.cli.progress import knn_bank_note, plural, ray_log, run_progress
from orchestrator.cli.report_args import add_parser, add_run_options, tracking_section  # noqa: F401 - re-exported
from orchestrator.reports import registry, tables
from orchestrator.reports.docs import write_docs
from orchestrator.reports.page import build_report, ls_frame
from orchestrator.reports.tracking import sync
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout

__all__ = ["add_parser", "report", "ls", "add_run_options", "quiet_output", "finish_run", "finish_cascade", "track",
           "tracking_section", "write_table"]


def report(args) -> int:
    """``smn report``: write the page; 2 when ``RESULTS`` holds no experiment (or not ``--experiment``)."""
    if args.docs:
        if args.experiment or args.out:
            print("smn: --docs writes the pages of every experiment into OUT: leave out --experiment and --out",
                  file=sys.stderr)
            return 2
    try:
        _check_report_out(args)
        if args.docs:
            done = f"wrote {len(write_docs(args.results, args.docs))} pages in {args.docs}"
        else:
            folder = build_report(args.results, args.out, args.experiment)
            done = f"wrote {folder / 'report.html'} and {folder / 'report.md'}"
    except ValueError as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return 2
    print(done)
    return 0


def _check_report_out(args) -> None:
    """The folder ``smn report`` writes (``--docs``, ``--out`` or ``RESULTS/report``) can be written, checked
    before any work (:func:`orchestrator.cli.common.check_output_path`)."""
    if args.docs:
        check_output_path(args.docs, option="--docs", folder=True)
    elif args.out:
        check_output_path(args.out, folder=True)
    elif "://" not in str(args.results or ""):
        check_output_path(os.path.join(str(args.results), "report"), option="the report folder (default --out)",
                          folder=True)


def ls(args) -> int:
    """``smn ls``: one line (or JSON object) per experiment; a results folder that does not exist (or is a
    file) is refused with exit 2, as by ``smn table``."""
    frame = ls_frame(check_results_dir(args.results, "ls"))
    if args.json:
        print(registry.dumps_strict(registry.json_records(frame), indent=1))
    elif frame.empty:
        print(f"(no experiments under {args.results})")
    else:
        print(frame.astype(object).where(frame.notna(), "-").to_string(index=False))
    return 0


@contextlib.contextmanager
def quiet_output(args, total: int | None = 0, name: str = "", resources=None) -> Iterator[None]:
    """While a run goes on: progress to stderr for ``--json`` (stdout keeps the summary object only),
    nowhere for ``--quiet``; rich bars above the lines when stdout is a terminal
    (:func:`orchestrator.cli.progress.run_progress`, ``total`` cells of experiment ``name``, None: not known;
    ``resources``: the spec's, for its "starting N workers"); plain lines otherwise. Ray's driver log goes to
    its file in every mode (:func:`orchestrator.cli.progress.ray_log`)."""
    if getattr(args, "json", False):
        with contextlib.redirect_stdout(sys.stderr), ray_log():
            yield
    elif getattr(args, "quiet", False):
        with contextlib.redirect_stdout(io.StringIO()), ray_log():
            yield
    else:
        with run_progress(total, name, resources=resources):
            yield


def track(spec, args, echo=echo_line) -> dict[str, int]:
    """Log the experiment's ledger cells to its trackers (:func:`orchestrator.reports.tracking.sync`); never raises."""
    section = tracking_section(spec, args)
    if not section:
        return {}
    try:
        with warnings.catch_warnings():  # the CLI says it once, through echo; the warning would say it again
            warnings.simplefilter("ignore", RuntimeWarning)
            return sync(args.results, spec.name, section, echo=echo)
    except Exception as exc:  # noqa: BLE001 - reading the ledger for a tracker must not fail the run
        print(f"warning: tracking skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}


def finish_run(args, spec, summary: dict, started: float, table_text: str) -> None:
    """Print the end of ``smn run``: the JSON summary object (``--json``) or the table and a summary line."""
    aside = (lambda line: print(line, file=sys.stderr)) if (args.json or args.quiet) else echo_line
    tracked = track(spec, args, echo=aside)
    rows = ledger.read_ledger(args.results, spec.name)
    if summary.get("ran") and (note := knn_bank_note(rows)):  # once per run, not once per cell from the workers
        aside(note)
    if args.json:
        table = tables.results_table(rows)
        note = table.attrs.get("note", "") if not table.empty else ""
        obj = {"experiment": spec.name, "results": str(args.results), "total": summary.get("total"),
               "ran": summary.get("ran"), "skipped": summary.get("skipped"), "failed": summary.get("failed", {}),
               "stopped": summary.get("stopped", 0),
               "wall_s": round(time.time() - started, 3), "tracking": tracked,
               "ledger": ExperimentLayout.of(args.results, spec.name).location("ledger"),
               "table": json.loads(tables.render(table, "json")) if not table.empty else [],
               "note": note or None}
        print(registry.dumps_strict(registry.strict(obj), indent=1))
        return
    if not args.quiet:  # --quiet prints the table alone
        print()
    print(table_text)
    if args.quiet:
        return
    skipped = summary["skipped"]
    stopped = f" ({summary['stopped']} stopped early by the scheduler)" if summary.get("stopped") else ""
    print(f"\n{plural(summary['ran'], 'cell')} ran{stopped}, {skipped} {'was' if skipped == 1 else 'were'} already done, "
          f"{len(summary['failed'])} failed; {time.time() - started:.0f}s")


def finish_cascade(args, spec, code: int) -> None:
    """The end of ``smn run`` for a cascade spec: trackers, then the JSON summary (``--json``) or the Table 3
    layout (``--quiet``; without it the cascade printed its table already)."""
    quiet = args.json or args.quiet
    tracked = track(spec, args, echo=(lambda line: print(line, file=sys.stderr)) if quiet else echo_line)
    rows = ledger.read_ledger(args.results, spec.name)
    if args.json:
        table = tables.results_table(rows)
        layout = registry.tables()["table3"].build(rows) if not rows.empty else None
        print(registry.dumps_strict({"experiment": spec.name, "results": str(args.results), "exit_code": code,
                          "cells": int(rows["cell_id"].nunique()) if len(rows) else 0, "tracking": tracked,
                          "ledger": ExperimentLayout.of(args.results, spec.name).location("ledger"),
                          "table": json.loads(tables.render(table, "json")) if not table.empty else [],
                          "table3": json.loads(registry.render_frame(layout, "json"))
                          if layout is not None and not layout.empty else []}, indent=1))
    elif args.quiet:
        layout = registry.tables()["table3"]
        print(registry.render_frame(layout.build(rows), args.format, title=layout.description))


def write_table(frame, fmt: str, out: str | None) -> str:
    """``smn table --format parquet|... --out FILE``: write the table to ``out``; parquet needs ``out``.

    Raises:
        ValueError: ``--format parquet`` without ``--out``.
    """
    if out is None:
        raise ValueError("--format parquet writes a file: give --out FILE.parquet")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    registry.write_frame(frame, out, fmt)
    return f"wrote {out}"
