"""The ``smn`` command line: run experiments on Ray and rebuild tables from the ledger.

    smn run SPEC.yaml [--results DIR] [--address ADDR] [--dry-run] [key=value ...]
    smn table [DIR] [--experiment NAME] [--layout NAME|list] [--format markdown|latex|csv|json|parquet] [--out FILE]
    smn report DIR [--experiment NAME] [--out DIR]     # report.md + report.html with every table and figure
    smn ls DIR [--json]                                # experiments, cells done / failed / collapsed
    smn plot [DIR] --figure NAME|list [--experiment NAME] [--out FILE.png]
    smn validate SPEC.yaml [key=value ...]

Further subcommands (``smn store``, ``smn cascade``) live in the modules of :data:`CLI_PLUGINS`;
each has ``add_parser(subparsers)``, which registers its subcommand with ``set_defaults(handler=f)``
where ``f(args) -> exit code``.

Exit codes (:data:`EXIT_CODES`): 0 success; 1 a runtime failure (cells failed, no GPU or too few CPUs,
storage unreachable); 2 a usage or spec error, refused before any work; 130 interrupted (Ctrl-C: running
the same command again resumes). An ordinary mistake gets one line on stderr naming the bad value and
what is allowed, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings

__all__ = ["main", "build_parser", "CLI_PLUGINS", "EXIT_CODES", "SmnArgumentParser", "HelpFormatter",
           "check_results_dir", "ResultsError"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = {EXIT_OK: "success", EXIT_FAILED: "runtime failure (cells failed, no GPU or too few CPUs, storage "
              "unreachable)", EXIT_USAGE: "usage or spec error (refused before any work)",
              EXIT_INTERRUPTED: "interrupted (Ctrl-C); run the same command again to resume"}
INTERRUPTED = "interrupted: run the same command again to resume"

CLI_PLUGINS = ("orchestrator.cli.store", "orchestrator.cli.cascade", "orchestrator.cli.report")

_EPILOG = """\
examples:
  smn run experiments/demo.yaml                     # the embedded default, local Ray
  smn run experiments/demo.yaml train.epochs=2      # override any spec key
  smn run experiments/demo.yaml --results /nfs/smn  # ledger on shared storage (or s3://bucket/prefix)
  smn table results                                 # rebuild the tables from the ledger only
  smn report results                                # one page (HTML + Markdown) with every table and figure

environment:
  RAY_ADDRESS               Ray cluster to join (as --address); unset: start a local Ray
  RAY_AUTH_MODE             unset: a local Ray uses token authentication (token: $RAY_AUTH_TOKEN,
                            $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, created mode 0600 on first use);
                            'disabled': no authentication (smn prints what is exposed)
  RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH   the token, or the file holding it (Ray's own variables)
  SMN_ALLOW_AUTOSCALE_GPUS  1: do not refuse GPU requests the cluster lacks now (GPU nodes autoscale)
  SMN_ALLOW_AUTOSCALE_CPUS  1: do not refuse CPU requests larger than the largest node (nodes autoscale)
  SMN_CIFAR_WEIGHTS_DIR     folder of the CIFAR ResNet weight files (default ../shared/weights/resnet_cifar10)
  AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
  AWS_DEFAULT_REGION, AWS_REGION, AWS_PROFILE
                            S3 access for s3:// results; passed on to the Ray workers

exit codes:
  0    success
  1    runtime failure: cells failed, no GPU or too few CPUs, storage unreachable
  2    usage or spec error: refused before any work, nothing written
  130  interrupted (Ctrl-C): run the same command again to resume
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout and appends every option's default to its help."""


class SmnArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on stderr and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class ResultsError(ValueError):
    """A results location that a read command cannot use (missing, a file, an unsupported URI)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``smn`` (every subcommand documented in ``--help``, with its defaults)."""
    import smn_core

    p = SmnArgumentParser(
        prog="smn", description="Self-Masking Networks: learn binary masks over frozen pretrained backbones, "
        "orchestrated on Ray, with every result in a Parquet ledger.",
        epilog=_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"smn {smn_core.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=SmnArgumentParser)

    run = sub.add_parser("run", help="run every cell of a spec that the ledger does not hold yet",
                         formatter_class=HelpFormatter,
                         description="Validate SPEC, start (or join) Ray, run the missing cells, print the table. "
                         "Running the same command again resumes: finished cells are skipped, interrupted ones "
                         "continue from their last epoch checkpoint.")
    run.add_argument("spec", help="experiment spec (YAML), e.g. experiments/demo.yaml")
    run.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                     help="override spec keys with dotted paths, e.g. train.epochs=3 seeds=[0,1]")
    run.add_argument("--results", default="results", help="results folder or URI (s3://bucket/prefix) of the ledger")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join; None: $RAY_ADDRESS, else start a local Ray (token authentication)")
    run.add_argument("--dry-run", action="store_true", help="validate and list the cells; run nothing")
    run.add_argument("--format", default="markdown", choices=("markdown", "latex", "csv"),
                     help="format of the table printed at the end")
    # --- output and tracking options (orchestrator.cli.report): --json, --quiet, --track ---
    from orchestrator.cli import report as report_cli

    report_cli.add_run_options(run)
    # --- end output and tracking options ---

    val = sub.add_parser("validate", help="validate a spec and list its cells (writes nothing)",
                         formatter_class=HelpFormatter,
                         description="Validate SPEC (with overrides) against what exists (backbones, datasets and "
                         "their metadata, sizes) and list its cells with their ids.")
    val.add_argument("spec", help="experiment spec (YAML)")
    val.add_argument("overrides", nargs="*", metavar="key=value", default=[], help="override spec keys")

    tab = sub.add_parser("table", help="rebuild the results table from the ledger alone (reads only)",
                         formatter_class=HelpFormatter,
                         description="Aggregate the Parquet ledger under DIR into a table (mean ± std over seeds). "
                         "Reads only: an unreadable ledger file is skipped with a warning and left in place.")
    tab.add_argument("results", metavar="DIR", nargs="?", default=None,
                     help="results folder or URI (not needed for --layout list)")
    tab.add_argument("--experiment", default=None, help="only this experiment; None: all")
    tab.add_argument("--format", default="markdown", choices=("markdown", "latex", "csv", "json", "parquet"),
                     help="markdown / latex (display strings), csv / json (numbers), parquet (a file: --out)")
    tab.add_argument("--out", default=None, help="write the table to this file instead of printing it")
    tab.add_argument("--metrics", default=None,
                     help="comma-separated metrics; None: knn_top1,linear_probe_top1,density,code_entropy,collapsed,wall_s")
    tab.add_argument("--layout", default=None,
                     help="a paper table (e.g. table2, table3, table5a); 'list' shows them all; None: the generic "
                     "one-row-per-cell-group table")

    plot = sub.add_parser("plot", help="draw a paper figure from the ledger alone (PNG)", formatter_class=HelpFormatter,
                          description="Draw a registered figure (e.g. fig8, fig9, fig11) from the ledger under DIR.")
    plot.add_argument("results", metavar="DIR", nargs="?", default=None,
                      help="results folder or URI (not needed for --figure list)")
    plot.add_argument("--figure", required=True, help="figure name; 'list' shows them all")
    plot.add_argument("--experiment", default=None, help="only this experiment; None: all")
    plot.add_argument("--out", default=None, help="output PNG file; None: DIR/figures/NAME.png (also for a URI DIR)")

    for mod in CLI_PLUGINS:
        try:
            plugin = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        plugin.add_parser(sub)
    _use_formatter(p)
    return p


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """Every (sub)parser shows its options' defaults and keeps its epilog's layout."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its subparsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for child in set(action.choices.values()):
                _use_formatter(child)


def check_results_dir(results: str | None, command: str) -> str:
    """The results location of a read command (``table``, ``plot``), checked: given, an existing folder
    (or a URI pyarrow supports). An unreachable URI is found when it is read (exit 1).

    Raises:
        ResultsError: naming the location and what is allowed.
    """
    from orchestrator.results import ledger

    if results is None:
        raise ResultsError(f"smn {command} needs the results folder DIR (e.g. smn {command} results)")
    if "://" in str(results):
        try:
            ledger.resolve(results)
        except ValueError as exc:
            raise ResultsError(f"{exc}; allowed: a folder, s3://bucket/prefix or another pyarrow.fs URI") from None
        return results
    if not os.path.exists(results):
        raise ResultsError(f"results folder {results!r} does not exist; allowed: the --results folder of a "
                           "`smn run` (default ./results) or a URI")
    if not os.path.isdir(results):
        raise ResultsError(f"results location {results!r} is a file; allowed: a results folder or a URI")
    return results


def _check_experiment(results: str, experiment: str | None) -> None:
    from orchestrator.results import ledger

    if experiment is None:
        return
    known = ledger.list_experiments(results)
    if experiment not in known:  # a path (../other/demo) is never a name listed here
        raise ValueError(f"experiment {experiment!r} is not in {results!r}; allowed: "
                         f"{', '.join(known) or '(none yet: run a spec first)'}")


def _table_frame(results: str, experiment: str | None, fmt: str, metrics: str | None, layout: str | None):
    """``(frame, title)`` of a table: a registered layout's display strings, or the generic table (numbers
    for csv / json / parquet, display strings otherwise)."""
    from orchestrator.results import ledger
    from orchestrator.reports import registry as reports
    from orchestrator.reports import tables

    df = ledger.read_ledger(results, experiment)
    if layout is not None:
        known = reports.tables()
        return known[layout].build(df), known[layout].description
    chosen = tuple(m.strip() for m in metrics.split(",")) if metrics else tables.DEFAULT_METRICS
    if metrics and not df.empty:
        have = sorted(df["metric"].unique())
        unknown = [m for m in chosen if m not in have]
        if unknown:
            raise ValueError(f"metric(s) {', '.join(map(repr, unknown))} not in the ledger; allowed: {', '.join(have)}")
    table = tables.results_table(df, chosen)
    return (table if fmt in ("csv", "json", "parquet") or table.empty else tables.display_table(table)), None


def _table(results: str | None, experiment: str | None, fmt: str, metrics: str | None, layout: str | None = None,
           out: str | None = None) -> str:
    from orchestrator.reports import registry as reports

    if layout == "list":
        return "\n".join(f"{t.name:12s} {t.description}" for t in reports.tables().values())
    known = reports.tables()
    if layout is not None and layout not in known:
        raise ValueError(f"table layout {layout!r} is not known; allowed: {', '.join(known)} (or 'list')")
    results = check_results_dir(results, "table")
    _check_experiment(results, experiment)
    frame, title = _table_frame(results, experiment, fmt, metrics, layout)
    if out is not None or fmt == "parquet":
        from orchestrator.cli.report import write_table

        return write_table(frame, fmt, out)
    if frame is None or frame.empty:
        return "(no results in the ledger yet)"
    return reports.render_frame(frame, fmt, title=title)


def _plot(results: str | None, figure: str, experiment: str | None, out: str | None) -> str:
    from pathlib import Path

    from orchestrator.results import ledger
    from orchestrator.reports import registry as reports

    known = reports.figures()
    if figure == "list":
        return "\n".join(f"{f.name:12s} {f.description}" for f in known.values())
    if figure not in known:
        raise ValueError(f"figure {figure!r} is not known; allowed: {', '.join(known)} (or 'list')")
    results = check_results_dir(results, "plot")
    if out is not None and (os.path.isdir(out) or out.endswith(("/", os.sep))):
        raise ValueError(f"--out {out!r} is a folder; allowed: a file name such as {figure}.png")
    _check_experiment(results, experiment)
    df = ledger.read_ledger(results, experiment)
    if df.empty:
        raise ValueError(f"the ledger under {results!r} holds no results" + (f" for {experiment!r}" if experiment else ""))
    if out is None and "://" in str(results):
        # URI results: draw to a local file, then store it next to the ledger through pyarrow.fs
        import tempfile

        from orchestrator.results.layout import ExperimentLayout, atomic_write

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


def _quiet_when_redirected() -> None:
    """Keep Ray's INFO lines and ANSI colour codes out of output that goes to a file or a pipe."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
        os.environ.setdefault("NO_COLOR", "1")
        os.environ.setdefault("RAY_TQDM", "0")


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 - warnings hook
        print(f"smn: warning: {' '.join(str(message).split())}", file=sys.stderr)

    warnings.showwarning = show


def _cause(error: str) -> str:
    from orchestrator.engine.session import error_cause

    return error_cause(error)


def _internal_error(exc: BaseException) -> int:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="smn-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(traceback.format_exc())
    print(f"smn: error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (full traceback in {path})",
          file=sys.stderr)
    return EXIT_FAILED


def _run(args) -> int:
    from orchestrator.engine.session import ClusterTooSmall
    from orchestrator.spec.experiment import SpecError, expand_cells, load_spec

    try:
        spec = load_spec(args.spec, args.overrides)
        if args.command == "run" and not args.dry_run:
            _check_run_results(args.results)
    except (SpecError, ResultsError) as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if spec.cascade is not None and args.command == "run":
        # a spec with a `cascade:` section is the cascade's (paper Sec. 3.4): same as `smn cascade SPEC`
        from orchestrator.cli import cascade as cascade_cli
        from orchestrator.cli import report as report_cli

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
        # --- dry-run cost estimate (orchestrator.spec.estimate) ---
        if args.command == "run":
            from orchestrator.spec.estimate import estimate_text

            print(estimate_text(spec, cells))
        # --- end dry-run cost estimate ---
        return EXIT_OK
    from orchestrator.engine import session as ray_session
    from orchestrator.cli import report as report_cli
    from orchestrator.results.layout import ExperimentLayout
    from orchestrator.engine.plain import run_experiment
    from orchestrator.engine.preflight import StorageUnreachable

    t0 = time.time()
    try:
        import ray

        if not (args.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
            res = spec.resources
            ray_session.check_local_fits(res.cpus_per_worker, res.workers)  # before a local Ray starts
        # --json: progress to stderr; --quiet: no progress; a terminal: bars (orchestrator.cli.progress)
        layout = ExperimentLayout.of(args.results, spec.name)  # every location of the run, built once
        with report_cli.quiet_output(args, len(cells), spec.name):
            summary = run_experiment(spec, layout, address=args.address, cells=cells)
    except (ClusterTooSmall, StorageUnreachable) as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"smn: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        print(f"smn: {_cause(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    from orchestrator.results import ledger

    table_text = "(no results in the ledger yet)"
    if spec.name in ledger.list_experiments(args.results):
        table_text = _table(args.results, spec.name, args.format, None)
        if "pretrained" in spec.methods and len(spec.methods) > 1:  # the method against its own baseline
            table_text += "\n\n" + _table(args.results, spec.name, args.format, None, "vs_frozen")
    report_cli.finish_run(args, spec, summary, t0, table_text)
    for cid, err in summary["failed"].items():
        print(f"smn: cell {cid} failed: {_cause(err)} (full error in {args.results}/{spec.name}/failures/{cid}.json)",
              file=sys.stderr)
    return EXIT_FAILED if summary["failed"] else EXIT_OK


def _check_run_results(results: str) -> None:
    from orchestrator.results import ledger

    if "://" in str(results):
        try:
            ledger.resolve(results)
        except ValueError as exc:
            raise ResultsError(f"{exc}; allowed: a folder, s3://bucket/prefix or another pyarrow.fs URI") from None
    elif os.path.exists(results) and not os.path.isdir(results):
        raise ResultsError(f"--results {results!r} is a file; allowed: a results folder (created if missing) or a URI")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smn``; returns the process exit code (:data:`EXIT_CODES`: 0 ok, 1 runtime failure,
    2 bad input refused before any work, 130 interrupted)."""
    _quiet_when_redirected()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return EXIT_OK
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    # overrides may follow options (smn run spec --results d a=b): argparse leaves those in `extra`
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        sub = f"smn {args.command}"
        print(f"{sub}: error: unrecognized arguments: {' '.join(stray)}; allowed: key=value overrides and the "
              f"options of {sub} (see {sub} --help)", file=sys.stderr)
        return EXIT_USAGE
    if extra:
        args.overrides = list(args.overrides) + extra
    with warnings.catch_warnings():
        _one_line_warnings()
        try:
            return _dispatch(args)
        except KeyboardInterrupt:
            _stop_ray_quietly()  # workers' forwarded log lines land before the last line, never after it
            print(f"\nsmn: {INTERRUPTED}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (ResultsError, ValueError) as exc:
            print(f"smn: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            where = getattr(args, "results", None)
            print(f"smn: cannot read {where!r}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
            return EXIT_FAILED
        except Exception as exc:  # noqa: BLE001 - one line and a log file, never a traceback
            return _internal_error(exc)


def _stop_ray_quietly() -> None:
    """Shut down this process's Ray connection, if any, so that no worker's forwarded output follows the
    CLI's last line. Ray is looked up in ``sys.modules``: a command that never imported it pays nothing."""
    ray = sys.modules.get("ray")
    if ray is None:
        return
    try:
        if ray.is_initialized():
            ray.shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C or a dead head must not hide the message
        pass


def _dispatch(args) -> int:
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    if args.command in ("run", "validate"):
        return _run(args)
    if args.command == "plot":
        print(_plot(args.results, args.figure, args.experiment, args.out))
    else:
        print(_table(args.results, args.experiment, args.format, args.metrics, args.layout, args.out))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
