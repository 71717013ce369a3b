"""The ``smn`` command line: run experiments on Ray and rebuild tables from the ledger.

    smn run SPEC.yaml [--results DIR] [--address ADDR] [--dry-run] [key=value ...]
    smn table [DIR] [--experiment NAME] [--layout NAME|list] [--format markdown|latex|csv|json|parquet] [--out FILE]
    smn report DIR [--experiment NAME] [--out DIR]     # report.md + report.html with every table and figure
    smn ls DIR [--json]                                # experiments, cells done / failed / collapsed
    smn plot [DIR] --figure NAME|list [--experiment NAME] [--out FILE.png]
    smn validate SPEC.yaml [key=value ...]
    smn serve STORE [--replicas N] [--max-tasks-per-replica M] [--host H --port P] [--api-key-file F]
    smn ledger compact DIR [--experiment NAME]        # merge cell files into a few Parquet parts

This module parses and dispatches, nothing else. The parsers of ``smn store``, ``smn cascade``, ``smn report``
and ``smn ls`` are in :mod:`orchestrator.cli.store`, :mod:`orchestrator.cli.cascade` and
:mod:`orchestrator.cli.report` (``add_parser(subparsers)``); :data:`COMMANDS` names the function that does
each subcommand's work (``f(args) -> exit code``, in :mod:`orchestrator.cli.commands` or
:mod:`orchestrator.cli.report`), imported only when that subcommand runs.

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
import tempfile
import traceback
import warnings

import smn_core

from orchestrator.cli.cascade import add_parser as add_cascade_parser
from orchestrator.cli.common import (EXIT_CODES, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, INTERRUPTED,
                                     ResultsError, add_spec_arguments, usage_error)
from orchestrator.cli.report_args import add_parser as add_report_parser
from orchestrator.cli.report_args import add_run_options
from orchestrator.cli.serve import add_parser as add_serve_parser
from orchestrator.cli.store import add_parser as add_store_parser

__all__ = ["main", "build_parser", "COMMANDS", "EXIT_CODES", "SmnArgumentParser", "HelpFormatter"]

# Every subcommand and the function that does its work, as "module:function". The one place where the CLI
# reaches the rest of orchestrator: `_handler` imports the module with importlib when that subcommand runs, so
# `smn table` / `ls` / `report` / `plot` never import the engine (ray) or the mask store (torch), and the
# handler modules import what they need at their top.
COMMANDS = {
    "run": "orchestrator.cli.commands.run:run",
    "validate": "orchestrator.cli.commands.validate:validate",
    "cascade": "orchestrator.cli.commands.cascade:cascade",
    "table": "orchestrator.cli.commands.read:table",
    "plot": "orchestrator.cli.commands.read:plot",
    "report": "orchestrator.cli.report:report",
    "ls": "orchestrator.cli.report:ls",
    "ledger": "orchestrator.cli.commands.read:ledger_command",
    "store": "orchestrator.cli.commands.store:handle",
    "serve": "orchestrator.cli.commands.serve:serve",
}

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``smn`` (every subcommand documented in ``--help``, with its defaults; every
    subparser gets :class:`HelpFormatter` from :func:`_use_formatter`)."""
    p = SmnArgumentParser(
        prog="smn", description="Self-Masking Networks: learn binary masks over frozen pretrained backbones, "
        "orchestrated on Ray, with every result in a Parquet ledger.",
        epilog=_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"smn {smn_core.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=SmnArgumentParser)

    run = sub.add_parser("run", help="run every cell of a spec that the ledger does not hold yet",
                         description="Validate SPEC, start (or join) Ray, run the missing cells, print the table. "
                         "Running the same command again resumes: finished cells are skipped, interrupted ones "
                         "continue from their last epoch checkpoint.")
    add_spec_arguments(run, spec="experiment spec (YAML), e.g. experiments/demo.yaml",
                       overrides="override spec keys with dotted paths, e.g. train.epochs=3 seeds=[0,1]",
                       overrides_default=[], results="results folder or URI (s3://bucket/prefix) of the ledger",
                       address="Ray cluster to join; None: $RAY_ADDRESS, else start a local Ray (token authentication)",
                       dry_run="validate and list the cells; run nothing",
                       table_format="format of the table printed at the end")
    run.add_argument("--dashboard", action="store_true",
                     help="start Ray's dashboard with a local Ray (on 127.0.0.1, under the run's token) and print "
                          "its address; joining a cluster, print the address of its dashboard")
    # --- output and tracking options (orchestrator.cli.report_args): --json, --quiet, --track ---
    add_run_options(run)
    # --- end output and tracking options ---

    val = sub.add_parser("validate", help="validate a spec and list its cells (writes nothing)",
                         description="Validate SPEC (with overrides) against what exists (backbones, datasets and "
                         "their metadata, sizes) and list its cells with their ids.")
    val.add_argument("spec", help="experiment spec (YAML)")
    val.add_argument("overrides", nargs="*", metavar="key=value", default=[], help="override spec keys")
    val.add_argument("--check-model", action="store_true",
                     help="also build each backbone on the CPU to check that the mask selector selects something "
                     "and that checkpoint files load, and check timm/ and open_clip/ names (imports torch: seconds; "
                     "smn run does these checks before Ray starts)")

    tab = sub.add_parser("table", help="rebuild the results table from the ledger alone (reads only)",
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
                     "one-row-per-setting table")
    tab.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                     help="only the cells whose resolved config holds this value, e.g. train.epochs=8 "
                     "(repeatable: all must hold)")

    plot = sub.add_parser("plot", help="draw a paper figure from the ledger alone (PNG)",
                          description="Draw a registered figure (e.g. fig8, fig9, fig11) from the ledger under DIR.")
    plot.add_argument("results", metavar="DIR", nargs="?", default=None,
                      help="results folder or URI (not needed for --figure list)")
    plot.add_argument("--figure", required=True, help="figure name; 'list' shows them all")
    plot.add_argument("--experiment", default=None, help="only this experiment; None: all")
    plot.add_argument("--out", default=None, help="output PNG file; None: DIR/figures/NAME.png (also for a URI DIR)")

    for add_parser in (add_store_parser, add_serve_parser, add_cascade_parser, add_report_parser):
        add_parser(sub)
    _use_formatter(p)
    return p


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """Every (sub)parser shows its options' defaults and keeps its epilog's layout."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its subparsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for child in set(action.choices.values()):
                _use_formatter(child)


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


def _internal_error(exc: BaseException) -> int:
    fd, path = tempfile.mkstemp(prefix="smn-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(traceback.format_exc())
    print(f"smn: error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (full traceback in {path})",
          file=sys.stderr)
    return EXIT_FAILED


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
            return usage_error(exc)
        except OSError as exc:  # name the file that failed when the error knows it, else the results location
            if exc.filename is not None:
                print(f"smn: cannot access {str(exc.filename)!r}: {exc.strerror or type(exc).__name__}",
                      file=sys.stderr)
            else:
                where = getattr(args, "results", None) or getattr(args, "spec", None) or args.command
                print(f"smn: cannot read {str(where)!r}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
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


def _handler(command: str):
    """The function of :data:`COMMANDS` that does ``command`` (its module imported now, not before)."""
    module, function = COMMANDS[command].split(":")
    return getattr(importlib.import_module(module), function)


def _dispatch(args) -> int:
    return _handler(args.command)(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
