"""``smn validate SPEC`` (and the listing of ``smn run --dry-run``): check a spec, list its cells; writes nothing."""

from __future__ import annotations

import sys

from smn_core.config import METHODS

from orchestrator.cli.common import EXIT_OK, EXIT_USAGE, ResultsError, check_results_dir
from orchestrator.spec.experiment import TIMM_OR_OPEN_CLIP, Cell, ExperimentSpec, SpecError, expand_cells, load_spec

__all__ = ["validate", "load_checked", "print_cells", "model_checks_left"]


def load_checked(args, results_command: str | None = None, model_checks: bool = False) -> ExperimentSpec | None:
    """The spec of ``args.spec`` with ``args.overrides``, validated once; with ``results_command``, its
    ``--results`` checked too (:func:`orchestrator.cli.common.check_results_dir`); ``model_checks``: the checks
    that import torch as well (:func:`orchestrator.spec.experiment.check_spec`). None after printing the
    one-line reason to stderr (the caller exits 2)."""
    try:
        spec = load_spec(args.spec, args.overrides, model_checks=model_checks)
        if results_command is not None:
            check_results_dir(args.results, results_command)
    except (SpecError, ResultsError) as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return None
    return spec


def print_cells(spec: ExperimentSpec, cells: list[Cell], done: set[str] | None = None) -> None:
    """Print ``spec <name>: valid, N cells`` and one line per cell (id, label); with ``done`` (the dry run: the
    cell ids the ledger holds), the header counts done and to run, and each line says which."""
    header = f"spec {spec.name}: valid, {len(cells)} cell{'' if len(cells) == 1 else 's'}"
    if done is None:
        print(header)
    else:
        print(f"{header}: {len(done)} done, {len(cells) - len(done)} to run")
    for c in cells:
        status = "" if done is None else f"{c.label:40s} {'done' if c.cell_id in done else 'to run'}"
        print(f"  {c.cell_id}  {status or c.label}")


def validate(args) -> int:
    """``smn validate``: exit 0 and the cell list for a valid spec, 2 and one line for a bad one. Torch-free
    unless ``--check-model``: the checks that build a model are then left to ``smn run`` (before Ray starts),
    and a line says so."""
    check_model = getattr(args, "check_model", False)
    spec = load_checked(args, model_checks=check_model)
    if spec is None:
        return EXIT_USAGE
    cells = expand_cells(spec)
    print_cells(spec, cells)
    if not check_model and (left := model_checks_left(cells)):
        print(f"not checked here (they import torch): {', '.join(left)}; smn run checks them before Ray starts, "
              "smn validate --check-model now")
    return EXIT_OK


def model_checks_left(cells: list[Cell]) -> list[str]:
    """What :func:`orchestrator.spec.experiment.check_spec` checks only with ``model_checks`` for these cells:
    ``"mask selector"``, ``"checkpoint file"``, ``"timm / open_clip name"`` (each once, in that order)."""
    left = []
    if any(METHODS.get(c.config.method) and METHODS[c.config.method][1] == "mask" for c in cells):
        left.append("mask selector")
    if any(c.config.backbone.checkpoint for c in cells):
        left.append("checkpoint file")
    if any(str(c.config.backbone.arch).startswith(TIMM_OR_OPEN_CLIP) for c in cells):
        left.append("timm / open_clip name")
    return left
