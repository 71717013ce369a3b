"""``smn validate SPEC`` (and the listing of ``smn run --dry-run``): check a spec, list its cells; writes nothing."""

from __future__ import annotations

import sys

from orchestrator.cli.common import EXIT_OK, EXIT_USAGE, ResultsError, check_results_dir
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
    """``smn validate``: exit 0 and the cell list for a valid spec, 2 and one line for a bad one."""
    spec = load_checked(args)
    if spec is None:
        return EXIT_USAGE
    print_cells(spec, expand_cells(spec))
    return EXIT_OK
