"""``smn validate SPEC`` (and the listing of ``smn run --dry-run``): check a spec, list its cells; writes nothing.

Dependent cells (random-mask controls, top-k at the density SMN found) cannot be named before the cell they depend
on has landed: the listing shows each as ``waiting on <cell id>`` and counts them apart from the cells to run now
(:func:`dry_run_cells`: on a dry run, those whose reference the ledger already holds are ready, and listed as
done or to run like any cell).
"""

from __future__ import annotations

import math
import sys

from smn_core.config import METHODS

from orchestrator.cli.common import EXIT_OK, EXIT_USAGE, ResultsError, check_results_dir
from orchestrator.spec.experiment import (TIMM_OR_OPEN_CLIP, Cell, ExperimentSpec, SpecError, Waiting, expand_cells,
                                          load_spec, waiting_cells)

__all__ = ["validate", "load_checked", "print_cells", "model_checks_left", "dry_run_cells", "waiting_rows"]


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


def print_cells(spec: ExperimentSpec, cells: list[Cell], done: set[str] | None = None,
                waiting: list[Waiting] = ()) -> None:
    """Print ``spec <name>: valid, N cells`` and one line per cell (id, label); with ``done`` (the dry run: the
    cell ids the ledger holds), the header counts done and to run now, and each line says which. ``waiting``
    (:func:`dry_run_cells`): the dependent cells not expandable yet, counted apart (``W waiting on another
    cell``) and listed after the others as ``waiting on <cell id>`` (their own id is not known yet)."""
    header = f"spec {spec.name}: valid, {len(cells)} cell{'' if len(cells) == 1 else 's'}"
    if done is not None:
        header += f": {len(done)} done, {len(cells) - len(done)} to run now"
    if waiting:
        header += f"{',' if done is not None else ';'} {len(waiting)} waiting on another cell (random-mask " \
                  "controls and top-k at a found density run after the cell they draw from)"
    print(header)
    for c in cells:
        status = "" if done is None else f"{c.label:40s} {'done' if c.cell_id in done else 'to run now'}"
        print(f"  {c.cell_id}  {status or c.label}")
    for w in waiting:
        print(f"  {'(after)':16s}  {w.label:40s} waiting on {w.reference}")


def dry_run_cells(spec: ExperimentSpec, landed: set[str], results: str) -> tuple[list[Cell], list[Waiting]]:
    """The cells of a dry run: ``(ready cells, waiting cells)``. ``landed``: the cell ids the ledger under
    ``results`` holds. A dependent cell whose reference has landed is ready (a random-mask control needs only
    that; a top-k cell at a found density needs the reference's ``density``, then read from the ledger, the one
    row read of a dry run); the others wait (:func:`orchestrator.spec.experiment.waiting_cells`)."""
    waits = waiting_cells(spec)
    ready = {w.reference for w in waits if w.reference in landed}
    if not ready:
        return expand_cells(spec), waits
    need = {w.reference for w in waits if w.needs_density and w.reference in ready}
    densities = {ref: math.nan for ref in ready - need}  # a control needs its reference landed, not a value
    if need:
        from orchestrator.results import ledger  # reason: reads rows (pandas); only for top-k cells at a found density

        found = ledger.cell_metric(results, spec.name, "density")
        densities.update({ref: found[ref] for ref in need if ref in found})
    return expand_cells(spec, densities), waiting_cells(spec, densities)


def waiting_rows(waiting: list[Waiting]) -> list[dict]:
    """``smn run --dry-run --json``'s ``waiting``: per waiting cell its label, method and the cell id it waits on."""
    return [{"label": w.label, "method": w.method, "waiting_on": w.reference} for w in waiting]


def validate(args) -> int:
    """``smn validate``: exit 0 and the cell list for a valid spec, 2 and one line for a bad one. Torch-free
    unless ``--check-model``: the checks that build a model are then left to ``smn run`` (before Ray starts),
    and a line says so."""
    check_model = getattr(args, "check_model", False)
    spec = load_checked(args, model_checks=check_model)
    if spec is None:
        return EXIT_USAGE
    cells = expand_cells(spec)
    print_cells(spec, cells, waiting=waiting_cells(spec))
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
