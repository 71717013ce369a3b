"""``smn run SPEC`` past validation: join or start Ray and run the missing cells (or a cascade), then print the
table. Imported by :func:`orchestrator.cli.commands.run.run` only when a run starts, so ``smn run --dry-run``
never imports Ray, the engine or the report tables."""

from __future__ import annotations

import os
import sys
import time

import ray

from smn_core.checkpoint import location_join

from orchestrator.cli import report as report_cli
from orchestrator.cli.commands import cascade as cascade_cmd
from orchestrator.cli.commands.read import table_text
from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, runtime_error, usage_error
from orchestrator.engine.plain import ensure_ray, run_experiment
from orchestrator.engine.preflight import StorageUnreachable
from orchestrator.engine.session import (ClusterTooSmall, ClusterUnreachable, check_local_fits, error_cause,
                                         probe_address)
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.spec.experiment import Cell, ExperimentSpec, expand_cells

__all__ = ["launch"]


def launch(args, spec: ExperimentSpec) -> int:
    """Run a validated ``spec`` (a cascade spec: its stages; ``--dry-run`` reaches here for a cascade only):
    exit 0 when every cell landed, 1 when one failed or Ray / storage did."""
    if not args.dry_run and (args.address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized():
        try:  # a deadline on the connect, before anything is read or written
            probe_address(args.address or os.environ["RAY_ADDRESS"], args.connect_timeout,
                          what="--address" if args.address else "RAY_ADDRESS")
        except ClusterUnreachable as exc:
            return runtime_error(exc)
    if spec.cascade is not None:  # the cascade's spec (paper Sec. 3.4): the same as `smn cascade SPEC`
        return _cascade(args, spec)
    return _run_cells(args, spec, expand_cells(spec))


def _cascade(args, spec: ExperimentSpec) -> int:
    if args.dry_run:
        return cascade_cmd.run_spec(args, spec)
    with report_cli.quiet_output(args, None, spec.name):  # --json / --quiet / bars, as for cells
        code = cascade_cmd.run_spec(args, spec)
    report_cli.finish_cascade(args, spec, code)  # trackers; the JSON summary or the --quiet table
    return code


def _run_cells(args, spec: ExperimentSpec, cells: list[Cell]) -> int:
    t0 = time.time()
    try:
        if not (args.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
            check_local_fits(spec.resources.cpus_per_worker, spec.resources.workers)  # before a local Ray starts
        layout = ExperimentLayout.of(args.results, spec.name)  # every location of the run, built once
        ours = not ray.is_initialized()  # this command starts (or joins) Ray: it stops it before the summary
        # --json: progress to stderr; --quiet: no progress; a terminal: bars (orchestrator.cli.progress)
        ours = not ray.is_initialized()  # this command starts (or joins) Ray: it stops it before the summary
        with report_cli.quiet_output(args, len(cells), spec.name, spec.resources):
            if getattr(args, "dashboard", False):  # up before any work, so the address comes first
                ensure_ray(args.address, connect_timeout_s=args.connect_timeout, dashboard=True)
            summary = run_experiment(spec, layout, address=args.address, cells=cells,
                                     connect_timeout_s=args.connect_timeout)
            if ours and ray.is_initialized():  # the workers' last forwarded lines come before the summary, not after
                ray.shutdown()
    except (ClusterTooSmall, ClusterUnreachable, StorageUnreachable) as exc:
        return runtime_error(exc)
    except ValueError as exc:
        return usage_error(exc)
    except RuntimeError as exc:
        print(f"smn: {error_cause(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    text = "(no results in the ledger yet)"
    if spec.name in ledger.list_experiments(args.results):
        text = table_text(args.results, spec.name, args.format, None)
        if "pretrained" in spec.methods and len(spec.methods) > 1:  # the method against its own baseline
            text += "\n\n" + table_text(args.results, spec.name, args.format, None, "vs_frozen")
    report_cli.finish_run(args, spec, summary, t0, text)
    for cid, err in summary["failed"].items():
        record = location_join(args.results, spec.name, "failures", f"{cid}.json")  # as the user typed --results
        print(f"smn: cell {cid} failed: {error_cause(err)} (full error in {record})", file=sys.stderr)
    return EXIT_FAILED if summary["failed"] else EXIT_OK
