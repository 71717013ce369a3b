"""The parsers of ``smn report``, ``smn ls`` and ``smn ledger``, and the output and tracking options of ``smn run``.

Apart from :mod:`orchestrator.cli.report` (whose handlers read the ledger with pandas), so that building the
``smn`` parser imports argparse only: ``smn validate`` and ``smn run --dry-run`` stay fast (issue 27).
"""

from __future__ import annotations

from typing import Any

from orchestrator.spec.tracking import track_flag

__all__ = ["add_parser", "add_run_options", "tracking_section"]


def add_parser(sub) -> None:
    """Register ``smn report``, ``smn ls`` and ``smn ledger compact``."""
    rep = sub.add_parser("report", help="write a results page (Markdown + self-contained HTML + PNGs) from the ledger",
                         description="Every experiment under RESULTS with the tables and figures its cells support, "
                         "seeds and mean ± std, failed and collapsed cells, and the environment: report.md and "
                         "report.html (open it in a browser, send it to a co-author) in DIR.")
    rep.add_argument("results", metavar="RESULTS", help="results folder or URI")
    rep.add_argument("--experiment", default=None, help="only this experiment (default: all)")
    rep.add_argument("--out", default=None, help="output folder (default: RESULTS/report, ./report for a URI)")
    rep.add_argument("--docs", default=None, metavar="OUT", help="instead of the page: write the deterministic "
                     "result pages of docs/ (OUT/<experiment>.md per experiment and OUT/README.md, no durations)")

    ls = sub.add_parser("ls", help="list the experiments of a results folder (cells done / failed / collapsed)",
                        description="One line per experiment under RESULTS: cells done, failed, collapsed, last update.")
    ls.add_argument("results", metavar="RESULTS", help="results folder or URI")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    led = sub.add_parser("ledger", help="maintain the ledger: merge cell files into a few Parquet parts",
                         description="smn ledger compact RESULTS [--experiment NAME]: merge every finished cell file "
                         "of an experiment into one Parquet part with an index of its cells (docs/ledger.md). Safe "
                         "while a run lands cells; stopped, it is run again; readers see the same rows before and "
                         "after.")
    led_sub = led.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    comp = led_sub.add_parser("compact", help="merge finished cell files into a few Parquet parts per experiment")
    comp.add_argument("results", metavar="RESULTS", help="results folder or URI")
    comp.add_argument("--experiment", default=None, help="only this experiment (default: all)")


def add_run_options(run) -> None:
    """``smn run`` options: ``--json``, ``--quiet``, ``--track``."""
    out = run.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print one JSON summary object at the end (progress goes to stderr)")
    out.add_argument("--quiet", action="store_true", help="print the final table only (no progress)")
    run.add_argument("--track", default=None, metavar="mlflow,wandb",
                     help="log every cell to MLflow (file store in RESULTS/mlruns) and / or W&B (offline); "
                     "same as a spec's tracking: section")


def tracking_section(spec, args) -> dict[str, Any] | None:
    """The trackers of a run: the spec's ``tracking:`` section, with ``--track`` added.

    Raises:
        ValueError: ``--track`` names a tracker that is not known (:func:`orchestrator.spec.tracking.track_flag`).
    """
    section = dict(getattr(spec, "tracking", None) or {})
    if getattr(args, "track", None):
        section.update({k: v for k, v in track_flag(args.track, args.results).items() if k not in section})
    return section or None
