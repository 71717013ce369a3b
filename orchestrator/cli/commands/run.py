"""``smn run SPEC``: validate the spec once, start (or join) Ray, run the missing cells on the engine, print
the table. A spec with a ``cascade:`` section goes to :mod:`orchestrator.cli.commands.cascade`."""

from __future__ import annotations

import json
import os
import sys
import time

import ray

from smn_core.checkpoint import location_exists, location_join

from orchestrator.cli import report as report_cli
from orchestrator.cli.commands import cascade as cascade_cmd
from orchestrator.cli.commands.read import table_text
from orchestrator.cli.commands.validate import load_checked, print_cells
from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, usage_error
from orchestrator.engine.plain import run_experiment
from orchestrator.engine.prepare import pretrain_artifact_path
from orchestrator.engine.preflight import StorageUnreachable
from orchestrator.engine.session import (ClusterTooSmall, ClusterUnreachable, check_auth_env, check_local_fits,
                                         error_cause, parse_address, probe_address)
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.spec.estimate import estimate_parts, estimate_text
from orchestrator.spec.experiment import Cell, ExperimentSpec, expand_cells

__all__ = ["run"]


def run(args) -> int:
    """``smn run``: exit 0 when every cell landed, 1 when one failed (or Ray / storage did), 2 for a bad spec
    or ``--results`` (refused before any work)."""
    spec = load_checked(args, None if args.dry_run else "run")
    if spec is None:
        return EXIT_USAGE
    try:  # every option refused before any work, --dry-run or not
        check_options(args, spec)
    except ValueError as exc:
        return usage_error(exc)
    if not args.dry_run and (args.address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized():
        try:  # a deadline on the connect, before anything is read or written
            probe_address(args.address or os.environ["RAY_ADDRESS"], args.connect_timeout,
                          what="--address" if args.address else "RAY_ADDRESS")
        except ClusterUnreachable as exc:
            print(f"smn: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if spec.cascade is not None:  # the cascade's spec (paper Sec. 3.4): the same as `smn cascade SPEC`
        return _cascade(args, spec)
    cells = expand_cells(spec)
    if args.dry_run:
        return _dry_run(args, spec, cells)
    return _run_cells(args, spec, cells)


def _dry_run(args, spec: ExperimentSpec, cells: list[Cell]) -> int:
    """``smn run --dry-run [--json]``: the cells, each marked done (its file or the compacted index holds it:
    names only, no row read) or to run, whether the pipeline's pretraining is cached, and the estimate in parts
    (:func:`orchestrator.spec.estimate.estimate_parts`). Writes nothing; ``--json``: one JSON object."""
    done: set[str] = set()
    if "://" in str(args.results) or os.path.isdir(args.results):
        if spec.name in ledger.list_experiments(args.results):
            done = ledger.ledger_files(ExperimentLayout.of(args.results, spec.name)).cells & {c.cell_id for c in cells}
    pipeline = [c for c in cells if c.config.backbone.weights == "pipeline" and c.config.pretrain is not None]
    artifacts = sorted({pretrain_artifact_path(args.results, spec.name, c.config) for c in pipeline})
    cached = bool(artifacts) and all(location_exists(a) for a in artifacts)
    parts = estimate_parts(spec, cells, done=done, pretrain_cached=cached,
                           join=bool(args.address or os.environ.get("RAY_ADDRESS")))
    todo = [c for c in cells if c.cell_id not in done]
    if getattr(args, "json", False):
        print(report_cli.dry_run_json({"experiment": spec.name, "results": str(args.results), "cells": len(cells),
                                       "to_run": report_cli.cell_rows(todo), "done": sorted(done),
                                       "pretraining": {"needed": bool(artifacts), "cached": cached,
                                                       "artifacts": artifacts},
                                       "estimate": parts}))
        return EXIT_OK
    print_cells(spec, cells, done)
    if artifacts:
        state = "not needed (every cell done)" if not todo else "cached" if cached else "to run"
        print(f"pretraining: {state} ({', '.join(artifacts)})")
    if todo:
        print(estimate_text(spec, todo))
    print(f"\nestimate: {parts['total_s']:.0f} s = Ray start-up {parts['ray_startup_s']:.0f} s + pretraining "
          f"{parts['pretraining_s']:.0f} s + training {parts['training_s']:.0f} s + evaluation "
          f"{parts['evaluation_s']:.0f} s ({parts['concurrent_cells']} cells at once; {', '.join(parts['source'])})")
    return EXIT_OK


def check_options(args, spec: ExperimentSpec) -> None:
    """The options of ``smn run`` that the spec does not hold: ``--track`` names known trackers and
    ``--address`` / ``$RAY_ADDRESS`` is a Ray address (:func:`orchestrator.engine.session.parse_address`), and
    ``$RAY_AUTH_MODE`` / ``$RAY_AUTH_TOKEN_PATH`` are usable (:func:`orchestrator.engine.session.check_auth_env`).

    Raises:
        ValueError: naming the option, its value and what is allowed.
    """
    report_cli.tracking_section(spec, args)
    check_auth_env()
    if args.address is not None:
        parse_address(args.address)
    elif os.environ.get("RAY_ADDRESS"):
        parse_address(os.environ["RAY_ADDRESS"], what="RAY_ADDRESS")


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
        # --json: progress to stderr; --quiet: no progress; a terminal: bars (orchestrator.cli.progress)
        with report_cli.quiet_output(args, len(cells), spec.name, spec.resources):
            summary = run_experiment(spec, layout, address=args.address, cells=cells,
                                     connect_timeout_s=args.connect_timeout)
    except (ClusterTooSmall, ClusterUnreachable, StorageUnreachable) as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return EXIT_FAILED
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
