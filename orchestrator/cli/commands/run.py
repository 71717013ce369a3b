"""``smn run SPEC``: validate the spec once (the checks that build a model included), then start (or join) Ray,
run the missing cells on the engine and print the table (:mod:`orchestrator.cli.commands.launch`). A spec with a
``cascade:`` section goes to :mod:`orchestrator.cli.commands.cascade`.

``smn run --dry-run`` stops before all that and stays light: it reads the spec, the dataset's metadata and the
ledger's file names, and imports neither torch nor Ray nor pandas (issue 27; a test checks)."""

from __future__ import annotations

import json
import os
import sys

from smn_core.checkpoint import location_exists

from orchestrator.cli.commands.validate import dry_run_cells, load_checked, print_cells, waiting_rows
from orchestrator.cli.common import EXIT_OK, EXIT_USAGE, usage_error
from orchestrator.cli.report_args import tracking_section
from orchestrator.engine.session import check_auth_env, parse_address
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout, pretrain_artifact_path
from orchestrator.spec.estimate import estimate_parts, estimate_text
from orchestrator.spec.experiment import Cell, ExperimentSpec
from orchestrator.spec.keys import setting_id

__all__ = ["run", "check_options", "cell_rows"]


def run(args) -> int:
    """``smn run``: exit 0 when every cell landed, 1 when one failed (or Ray / storage did), 2 for a bad spec
    or ``--results`` (refused before any work)."""
    # the checks that build a model (selector, checkpoint) run here, before Ray starts; a dry run stays torch-free
    spec = load_checked(args, None if args.dry_run else "run", model_checks=not args.dry_run)
    if spec is None:
        return EXIT_USAGE
    try:  # every option refused before any work, --dry-run or not
        check_options(args, spec)
    except ValueError as exc:
        return usage_error(exc)
    if args.dry_run and spec.cascade is None:
        return _dry_run(args, spec)
    from orchestrator.cli.commands.launch import launch  # reason: Ray, the engine and pandas load only for a run

    return launch(args, spec)


def _dry_run(args, spec: ExperimentSpec) -> int:
    """``smn run --dry-run [--json]``: the cells, each marked done (its file or the compacted index holds it:
    names only, no row read) or to run now, the dependent cells still waiting on another cell
    (:func:`orchestrator.cli.commands.validate.dry_run_cells`), whether the pipeline's pretraining is cached, and
    the estimate in parts (:func:`orchestrator.spec.estimate.estimate_parts`, of the ready cells). Writes nothing;
    ``--json``: one JSON object (``to_run``, ``done``, ``waiting``)."""
    landed: set[str] = set()
    if "://" in str(args.results) or os.path.isdir(args.results):
        if spec.name in ledger.list_experiments(args.results):
            landed = ledger.ledger_files(ExperimentLayout.of(args.results, spec.name)).cells
    cells, waiting = dry_run_cells(spec, landed, args.results)
    done = landed & {c.cell_id for c in cells}
    pipeline = [c for c in cells if c.config.backbone.weights == "pipeline" and c.config.pretrain is not None]
    artifacts = sorted({pretrain_artifact_path(args.results, spec.name, c.config) for c in pipeline})
    cached = bool(artifacts) and all(location_exists(a) for a in artifacts)
    parts = estimate_parts(spec, cells, done=done, pretrain_cached=cached, join=_joins(args))
    todo = [c for c in cells if c.cell_id not in done]
    if getattr(args, "json", False):
        summary = {"experiment": spec.name, "results": str(args.results), "cells": len(cells),
                   "to_run": cell_rows(todo), "done": sorted(done), "waiting": waiting_rows(waiting),
                   "pretraining": {"needed": bool(artifacts), "cached": cached, "artifacts": artifacts},
                   "estimate": parts}
        print(json.dumps(summary, indent=1, allow_nan=False, ensure_ascii=False, default=str))  # strict JSON
        return EXIT_OK
    print_cells(spec, cells, done, waiting)
    if artifacts:
        state = "not needed (every cell done)" if not todo else "cached" if cached else "to run"
        print(f"pretraining: {state} ({', '.join(artifacts)})")
    if todo:
        print(estimate_text(spec, todo))
    print(f"\nestimate: {parts['total_s']:.0f} s = Ray start-up {parts['ray_startup_s']:.0f} s + pretraining "
          f"{parts['pretraining_s']:.0f} s + training {parts['training_s']:.0f} s + evaluation "
          f"{parts['evaluation_s']:.0f} s ({parts['concurrent_cells']} cells at once; {', '.join(parts['source'])})")
    return EXIT_OK


def _joins(args) -> bool:
    """Whether the run would join a running Ray (``--address``, ``$RAY_ADDRESS``, or a Ray this process already
    started: a notebook, a test) rather than start one; Ray is not imported to find out."""
    ray = sys.modules.get("ray")
    return bool(args.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()))


def cell_rows(cells: list[Cell]) -> list[dict]:
    """Per cell of a run: its id, label, method, seed, grid values and setting id
    (:func:`orchestrator.spec.keys.setting_id`: cells of one setting differ only in the seed)."""
    rows = []
    for c in cells:
        config = c.config.to_dict()
        rows.append({"cell_id": c.cell_id, "label": c.label, "method": config.get("method"),
                     "seed": int(config.get("seed", 0)), "grid": c.grid_values,
                     "setting": setting_id(json.dumps(config, sort_keys=True, default=str))})
    return rows


def check_options(args, spec: ExperimentSpec) -> None:
    """The options of ``smn run`` that the spec does not hold: ``--track`` names known trackers and
    ``--address`` / ``$RAY_ADDRESS`` is a Ray address (:func:`orchestrator.engine.session.parse_address`), and
    ``$RAY_AUTH_MODE`` / ``$RAY_AUTH_TOKEN_PATH`` are usable (:func:`orchestrator.engine.session.check_auth_env`).

    Raises:
        ValueError: naming the option, its value and what is allowed.
    """
    tracking_section(spec, args)
    check_auth_env()
    if args.address is not None:
        parse_address(args.address)
    elif os.environ.get("RAY_ADDRESS"):
        parse_address(os.environ["RAY_ADDRESS"], what="RAY_ADDRESS")
