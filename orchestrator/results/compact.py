"""Compaction of the ledger: many small per-cell files merged into a few Parquet parts, with an index.

A run lands one file per cell (``ledger/<cell_id>.parquet``): right for atomic landing and resume, costly to
read by the thousand (one open, or one GET on an object store, per cell). :func:`compact` merges the
finished cell files of an experiment into one part ``ledger/_compacted/part-<id>.parquet`` (rows sorted by
cell, :data:`orchestrator.results.ledger.FULL_SCHEMA`: the setting id too, derived from ``config_json`` for cell
files and parts written before it existed, so that a table reads the compacted ledger without the configs) and records which cells each part holds in the index
``ledger/_compacted/manifest.json`` (``{"parts": {part name: [cell ids]}}``). When the index would list more
than ``max_parts`` parts, every part is merged into the new one, so an experiment keeps a few files.

The steps, each safe to stop after (a test stops it at every one and runs it again):

1. list ``ledger/`` and read the index (:func:`orchestrator.results.ledger.ledger_files`);
2. clean what a stopped compaction left: per-cell files whose cell the index holds, parts the index does
   not name, temporary files;
3. read the new cells' files (one DuckDB query; an unreadable file is left in place with a warning);
4. write the new part (:func:`smn_core.checkpoint.atomic_write`; not yet named by the index: readers do
   not see it);
5. swap: write the new index atomically; from here on readers take those cells from the part, and skip
   their cell files;
6. remove the merged cell files and the parts merged into the new one.

Readers (:func:`orchestrator.results.ledger.read_ledger`, ``completed_cells``, ``read_cell``) see one
ledger at every point: a cell is either in a part named by the index or in its own file, and a file that a
reader listed but that step 6 removed meanwhile makes it list again. Cells that land while compaction runs
keep their own files until the next compaction. One compaction at a time per experiment (step 2 removes
parts the index does not name, which a second compaction could be writing).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from smn_core.checkpoint import atomic_write

from orchestrator import echo as echo_line
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout

__all__ = ["compact", "compact_all", "CompactSummary", "STEPS", "MAX_PARTS"]

MAX_PARTS = 8
"""Parts an index may name before a compaction merges them all into its new part."""

STEPS = ("listed", "cleaned", "read", "part_written", "swapped", "removed")
"""The steps of :func:`compact`, in order; ``on_step`` is called after each one (and after every single
removal of step 6, with ``"removing"``)."""


@dataclass
class CompactSummary:
    """What one :func:`compact` did.

    Attributes:
        experiment: the experiment.
        cells_merged: cells moved from their own files into the new part.
        files_removed: per-cell files removed (merged now, or left by a stopped compaction).
        parts: the parts the index names after it.
        cells: every cell of the compacted ledger (the index).
        part: the new part's file name, or None when there was nothing to merge.
    """

    experiment: str
    cells_merged: int = 0
    files_removed: int = 0
    parts: list[str] = field(default_factory=list)
    cells: int = 0
    part: str | None = None


def _delete(fs: pafs.FileSystem, path: str) -> bool:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        return False
    return True


def _clean(lay: ExperimentLayout, files: ledger.LedgerFiles, index: dict[str, list[str]]) -> int:
    """Step 2: remove cell files whose cell the index holds, and files of ``_compacted/`` it does not name."""
    fs = lay.fs
    removed = sum(_delete(fs, p) for p in files.shadowed)
    keep = set(index) | {ledger.MANIFEST}
    for fi in fs.get_file_info(pafs.FileSelector(lay.compacted_dir, allow_not_found=True)):
        if fi.type == pafs.FileType.File and os.path.basename(fi.path) not in keep:
            _delete(fs, fi.path)
    return removed


def _part_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=64 * 1024)
    return sink.getvalue().to_pybytes()


def compact(results: str, experiment: str, *, max_parts: int = MAX_PARTS,
            on_step: Callable[[str], None] | None = None) -> CompactSummary:
    """Merge the finished cell files of ``experiment`` into one part and the index (module docstring).

    Args:
        results: the results folder or URI.
        experiment: the experiment's name.
        max_parts: merge every part into the new one when the index would name more than this.
        on_step: called with each name of :data:`STEPS` once that step is done (tests stop it there).

    Returns:
        A :class:`CompactSummary`.

    Raises:
        ValueError: ``experiment`` has no ledger under ``results``, or ``max_parts`` < 1.
        OSError: the storage cannot be read or written (nothing is lost: run it again).
    """
    if max_parts < 1:
        raise ValueError(f"max_parts {max_parts} is not allowed; allowed: 1 or more")
    ledger.check_experiment(results, experiment)
    step = on_step or (lambda name: None)
    lay = ExperimentLayout.of(results, experiment)
    fs = lay.fs
    files = ledger.ledger_files(lay)
    index = {os.path.basename(p): list(ids) for p, ids in files.parts.items()}
    step("listed")
    summary = CompactSummary(experiment, files_removed=_clean(lay, files, index))
    step("cleaned")
    merge_all = len(index) + 1 > max_parts
    retired = sorted(index) if merge_all else []
    new_files = ledger.LedgerFiles(lay, files.cell_files, files.parts if merge_all else {})
    table, bad = ledger.scan_files(new_files) if new_files.paths else (ledger.FULL_SCHEMA.empty_table(), set())
    known = {c for name, ids in index.items() if name not in retired for c in ids}
    if known and table.num_rows:  # a renamed copy of a cell that a part holds already
        table = table.filter(pc.invert(pc.is_in(table.column("cell_id"), pa.array(sorted(known)))))
    consumed = [p for p in files.cell_files.values() if p not in bad]  # readable: their rows are in a part now
    step("read")
    cells = list(dict.fromkeys(table.column("cell_id").to_pylist()))
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    if cells:
        atomic_write(lay.compacted(name), _part_bytes(table), fs=fs)
    step("part_written")
    new_index = {k: v for k, v in index.items() if k not in retired}
    if cells:
        new_index[name] = cells
    if cells or retired:
        atomic_write(lay.compacted(ledger.MANIFEST), json.dumps({"parts": new_index}, indent=0).encode(), fs=fs)
    step("swapped")
    for path in consumed:
        summary.files_removed += _delete(fs, path)
        step("removing")
    for part in retired:
        _delete(fs, lay.compacted(part))
        step("removing")
    step("removed")
    summary.cells_merged = len(files.cell_files) - len(bad)
    summary.parts, summary.part = sorted(new_index), name if cells else None
    summary.cells = sum(len(v) for v in new_index.values())
    return summary


def compact_all(results: str, experiment: str | None = None, *, max_parts: int = MAX_PARTS,
                echo: Callable[[str], None] = echo_line) -> list[CompactSummary]:
    """:func:`compact` every experiment under ``results`` (or only ``experiment``); one line each to ``echo``.

    Raises:
        ValueError: ``experiment`` has no ledger under ``results`` (names the ones there are).
    """
    ledger.check_experiment(results, experiment)
    out = []
    for name in [experiment] if experiment else ledger.list_experiments(results):
        s = compact(results, name, max_parts=max_parts)
        echo(f"{name}: {s.cells_merged} cells merged, {s.files_removed} cell files removed; "
             f"{s.cells} cells in {len(s.parts)} part(s)")
        out.append(s)
    return out
