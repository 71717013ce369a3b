"""The ``smn`` command line: run experiments on Ray and rebuild tables from the ledger.

    smn run SPEC.yaml [--results DIR] [--address ADDR] [--dry-run] [key=value ...]
    smn table DIR [--experiment NAME] [--layout NAME] [--format markdown|latex|csv|json|parquet] [--out FILE]
    smn report DIR [--experiment NAME] [--out DIR]     # report.md + report.html with every table and figure
    smn ls DIR [--json]                                # experiments, cells done / failed / collapsed
    smn plot DIR --figure NAME [--experiment NAME] [--out FILE.png]
    smn validate SPEC.yaml [key=value ...]

Further subcommands (``smn store``, ``smn cascade``) live in the modules of :data:`CLI_PLUGINS`;
each has ``add_parser(subparsers)``, which registers its subcommand with ``set_defaults(handler=f)``
where ``f(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

__all__ = ["main", "build_parser", "CLI_PLUGINS"]

CLI_PLUGINS = ("orchestrator.store_cli", "orchestrator.cascade_cli", "orchestrator.report_cli")

_EPILOG = """\
examples:
  smn run experiments/demo.yaml                     # the embedded default, local Ray
  smn run experiments/demo.yaml train.epochs=2      # override any spec key
  smn run experiments/demo.yaml --results /nfs/smn  # ledger on shared storage (or s3://bucket/prefix)
  smn table results                                 # rebuild the tables from the ledger only
  smn report results                                # one page (HTML + Markdown) with every table and figure
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``smn`` (every subcommand documented in ``--help``)."""
    p = argparse.ArgumentParser(
        prog="smn", description="Self-Masking Networks: learn binary masks over frozen pretrained backbones, "
        "orchestrated on Ray, with every result in a Parquet ledger.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run every cell of a spec that the ledger does not hold yet",
                         description="Validate SPEC, start (or join) Ray, run the missing cells, print the table. "
                         "Running the same command again resumes: finished cells are skipped, interrupted ones "
                         "continue from their last epoch checkpoint.")
    run.add_argument("spec", help="experiment spec (YAML), e.g. experiments/demo.yaml")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override spec keys with dotted paths, e.g. train.epochs=3 seeds=[0,1]")
    run.add_argument("--results", default="results",
                     help="results folder or URI holding the ledger (default: ./results)")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join (default: $RAY_ADDRESS, else start a local Ray on 127.0.0.1)")
    run.add_argument("--dry-run", action="store_true", help="validate and list the cells; run nothing")
    run.add_argument("--format", default="markdown", choices=("markdown", "latex", "csv"),
                     help="format of the table printed at the end")
    # --- output and tracking options (orchestrator.report_cli): --json, --quiet, --track ---
    from . import report_cli

    report_cli.add_run_options(run)
    # --- end output and tracking options ---

    val = sub.add_parser("validate", help="validate a spec and list its cells (writes nothing)",
                         description="Validate SPEC (with overrides) and list its cells with their ids.")
    val.add_argument("spec")
    val.add_argument("overrides", nargs="*", metavar="key=value")

    tab = sub.add_parser("table", help="rebuild the results table from the ledger alone",
                         description="Aggregate the Parquet ledger under DIR into a table (mean ± std over seeds).")
    tab.add_argument("results", metavar="DIR", help="results folder or URI")
    tab.add_argument("--experiment", default=None, help="only this experiment (default: all)")
    tab.add_argument("--format", default="markdown", choices=("markdown", "latex", "csv", "json", "parquet"),
                     help="markdown / latex (display strings), csv / json (numbers), parquet (a file: --out)")
    tab.add_argument("--out", default=None, help="write the table to this file instead of printing it")
    tab.add_argument("--metrics", default=None,
                     help="comma-separated metrics (default: knn_top1,linear_probe_top1,density,code_entropy,collapsed,wall_s)")
    tab.add_argument("--layout", default=None,
                     help="a paper table (e.g. table2, table3, table5a); 'list' shows them all. Default: "
                     "the generic one-row-per-cell-group table")

    plot = sub.add_parser("plot", help="draw a paper figure from the ledger alone (PNG)",
                          description="Draw a registered figure (e.g. fig8, fig9, fig11) from the ledger under DIR.")
    plot.add_argument("results", metavar="DIR", help="results folder or URI")
    plot.add_argument("--figure", required=True, help="figure name; 'list' shows them all")
    plot.add_argument("--experiment", default=None, help="only this experiment (default: all)")
    plot.add_argument("--out", default=None, help="output PNG (default: DIR/figures/NAME.png, also for a URI DIR)")

    for mod in CLI_PLUGINS:
        try:
            plugin = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        plugin.add_parser(sub)
    return p


def _table_frame(results: str, experiment: str | None, fmt: str, metrics: str | None, layout: str | None):
    """``(frame, title)`` of a table: a registered layout's display strings, or the generic table (numbers
    for csv / json / parquet, display strings otherwise)."""
    from . import ledger, reports, tables

    df = ledger.read_ledger(results, experiment)
    if layout is not None:
        known = reports.tables()
        if layout not in known:
            raise ValueError(f"table layout {layout!r} is not known; allowed: {', '.join(known)} (or 'list')")
        return known[layout].build(df), known[layout].description
    chosen = tuple(metrics.split(",")) if metrics else tables.DEFAULT_METRICS
    table = tables.results_table(df, chosen)
    return (table if fmt in ("csv", "json", "parquet") or table.empty else tables.display_table(table)), None


def _table(results: str, experiment: str | None, fmt: str, metrics: str | None, layout: str | None = None,
           out: str | None = None) -> str:
    from . import reports

    if layout == "list":
        return "\n".join(f"{t.name:12s} {t.description}" for t in reports.tables().values())
    frame, title = _table_frame(results, experiment, fmt, metrics, layout)
    if out is not None or fmt == "parquet":
        from .report_cli import write_table

        return write_table(frame, fmt, out)
    if frame is None or frame.empty:
        return "(no results in the ledger yet)"
    return reports.render_frame(frame, fmt, title=title)


def _plot(results: str, figure: str, experiment: str | None, out: str | None) -> str:
    from pathlib import Path

    from . import ledger, reports

    known = reports.figures()
    if figure == "list":
        return "\n".join(f"{f.name:12s} {f.description}" for f in known.values())
    if figure not in known:
        raise ValueError(f"figure {figure!r} is not known; allowed: {', '.join(known)} (or 'list')")
    df = ledger.read_ledger(results, experiment)
    if df.empty:
        raise ValueError(f"the ledger under {results!r} holds no results" + (f" for {experiment!r}" if experiment else ""))
    if out is None and "://" in str(results):
        # URI results: draw to a local file, then store it next to the ledger through pyarrow.fs
        import tempfile

        from .layout import ExperimentLayout, atomic_write

        target = ExperimentLayout.of(results, experiment or "figures").figure(figure)
        with tempfile.TemporaryDirectory(prefix="smn-plot-") as tmp:
            local = Path(tmp) / f"{figure}.png"
            known[figure].draw(df, str(local))
            atomic_write(target, local.read_bytes())
        return f"wrote {target}"
    path = Path(out) if out else Path(results) / "figures" / f"{figure}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    known[figure].draw(df, str(path))
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smn``; returns the process exit code (0 ok, 1 failed cells, 2 bad input)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (smn run spec --results d a=b): argparse leaves those in `extra`
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from .spec import SpecError, expand_cells, load_spec

    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    if args.command in ("run", "validate"):
        try:
            spec = load_spec(args.spec, args.overrides)
        except SpecError as exc:
            print(f"smn: {exc}", file=sys.stderr)
            return 2
        if spec.cascade is not None and args.command == "run":
            # a spec with a `cascade:` section is the cascade's (paper Sec. 3.4): same as `smn cascade SPEC`
            from . import cascade_cli, report_cli

            if args.dry_run:
                return cascade_cli.main(args)
            with report_cli.quiet_output(args, None, spec.name):  # --json / --quiet / bars, as for cells
                code = cascade_cli.main(args)
            report_cli.finish_cascade(args, spec, code)  # trackers; the JSON summary or the --quiet table
            return code
        cells = expand_cells(spec)
        if args.command == "validate" or args.dry_run:
            print(f"spec {spec.name}: valid, {len(cells)} cells")
            for c in cells:
                print(f"  {c.cell_id}  {c.label}")
            # --- dry-run cost estimate (orchestrator.estimate) ---
            if args.command == "run":
                from .estimate import estimate_text

                print(estimate_text(spec, cells))
            # --- end dry-run cost estimate ---
            return 0
        from .layout import ExperimentLayout
        from . import report_cli
        from .runner import run_experiment

        t0 = time.time()
        try:
            layout = ExperimentLayout.of(args.results, spec.name)  # every location of the run, built once
            # --json: progress to stderr; --quiet: no progress; a terminal: bars (orchestrator.progress)
            with report_cli.quiet_output(args, len(cells), spec.name):
                summary = run_experiment(spec, layout, address=args.address, cells=cells)
        except (ValueError, RuntimeError) as exc:
            print(f"smn: {exc}", file=sys.stderr)
            return 2
        table_text = _table(args.results, spec.name, args.format, None)
        if "pretrained" in spec.methods and len(spec.methods) > 1:  # the method against its own baseline
            table_text += "\n\n" + _table(args.results, spec.name, args.format, None, "vs_frozen")
        report_cli.finish_run(args, spec, summary, t0, table_text)
        for cid, err in summary["failed"].items():
            print(f"  failed {cid}: {err}", file=sys.stderr)
        return 1 if summary["failed"] else 0
    try:
        if args.command == "plot":
            print(_plot(args.results, args.figure, args.experiment, args.out))
        else:
            print(_table(args.results, args.experiment, args.format, args.metrics, args.layout, args.out))
    except ValueError as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
