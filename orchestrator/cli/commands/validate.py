"""``smn validate SPEC`` (and the listing of ``smn run --dry-run``): check a spec, list its cells; writes nothing."""

from __future__ import annotations

import sys

from orchestrator.cli.common import EXIT_OK, EXIT_USAGE, ResultsError, check_results_dir
from orchestrator.spec.estimate import estimate_text
from orchestrator.spec.experiment import Cell, ExperimentSpec, SpecError, expand_cells, load_spec

__all__ = ["validate", "load_checked", "print_cells"]


def load_checked(args, results_command: str | None = None) -> ExperimentSpec | None:
    """The spec of ``args.spec`` with ``args.overrides``, validated once; with ``results_command``, its
    ``--results`` checked too (:func:`orchestrator.cli.common.check_results_dir`). None after printing the
    one-line reason to stderr (the caller exits 2)."""
    try:
        spec = load_spec(args.spec, args.overrides)
        if results_command is not None:
            check_results_dir(args.results, results_command)
    except (SpecError, ResultsError) as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return None
    return spec


def print_cells(spec: ExperimentSpec, cells: list[Cell], estimate: bool = False) -> None:
    """Print ``spec <name>: valid, N cells`` and one line per cell (id, label); with ``estimate``, the dry-run
    cost estimate (:func:`orchestrator.spec.estimate.estimate_text`)."""
    print(f"spec {spec.name}: valid, {len(cells)} cell{'' if len(cells) == 1 else 's'}")
    for c in cells:
        print(f"  {c.cell_id}  {c.label}")
    if estimate:
        print(estimate_text(spec, cells))


def validate(args) -> int:
    """``smn validate``: exit 0 and the cell list for a valid spec, 2 and one line for a bad one."""
    spec = load_checked(args)
    if spec is None:
        return EXIT_USAGE
    print_cells(spec, expand_cells(spec))
    return EXIT_OK
