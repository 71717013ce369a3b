"""Per-test-image correctness of a cell's evaluation: what paired differences over images rest on (issue 25).

A cell that stored it has ``<results>/<experiment>/per_image/<cell_id>.parquet``
(``ExperimentLayout.inner("per_image", ...)``, :func:`location`): one row per test image, in the test split's
order, one boolean column per evaluation (``knn_top1``, ``knn_dino_top1``, ``linear_probe_top1``: was the
image's prediction right). Parquet packs booleans as bits, so a 10 000-image test split costs about 4 KB.
Like the masks and curves, its place follows from the ledger's ``cell_id`` (no new ledger metric: a cell's
metrics stay what they were); it is written before the ledger file, so a landed cell that evaluated has one.

Ledgers written before this have no such file: the tables then pair over seeds
(:mod:`orchestrator.reports.vs_frozen`). The committed ``docs/results/<experiment>/`` keeps ``per_image/`` beside
``ledger/`` (a few KB a cell), in the same place as any results folder: the pages, built from the ledger rows
alone (:func:`orchestrator.reports.docs.page_rows` drops ``attrs["results"]`` so that no layout reads masks),
still pair over images through :data:`ROOT` (:func:`root_of`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from smn_core.checkpoint import atomic_write

from orchestrator.results.layout import ExperimentLayout

__all__ = ["FOLDER", "ROOT", "root_of", "location", "write_correctness", "load_correctness"]

FOLDER = "per_image"
"""The folder of an experiment that holds the per-image files."""

ROOT = "per_image_root"
"""``DataFrame.attrs`` key of ledger rows: the results folder whose ``<experiment>/per_image/`` files the paired
differences read, when ``attrs["results"]`` is not set (the docs pages: the ledger files and these files only)."""


def root_of(attrs: Mapping) -> str | None:
    """The results folder paired differences read per-image files from: ``attrs[ROOT]``, else
    ``attrs["results"]`` (the folder :func:`orchestrator.results.ledger.read_ledger` read), else None."""
    root = attrs.get(ROOT) or attrs.get("results")
    return str(root) if root else None


def location(layout: ExperimentLayout, cell_id: str) -> str:
    """Where ``cell_id``'s per-image correctness lives: ``<experiment>/per_image/<cell_id>.parquet``."""
    return layout.inner(FOLDER, f"{cell_id}.parquet")


def write_correctness(layout: ExperimentLayout, cell_id: str, correct: Mapping[str, np.ndarray]) -> int:
    """Write ``{metric: (images,) bool}`` atomically (:func:`smn_core.checkpoint.atomic_write`); returns the
    number of images.

    Raises:
        ValueError: no metric, or arrays of different lengths (names them).
    """
    if not correct:
        raise ValueError(f"cell {cell_id}: no per-image correctness to write")
    lengths = {k: int(np.asarray(v).reshape(-1).size) for k, v in correct.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"cell {cell_id}: per-image arrays of different lengths {lengths}; allowed: one length")
    table = pa.table({k: pa.array(np.asarray(v, dtype=bool).reshape(-1)) for k, v in sorted(correct.items())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write(location(layout, cell_id), sink.getvalue().to_pybytes(), fs=layout.fs)
    return next(iter(lengths.values()))


def load_correctness(results: str, experiment: str, cell_id: str, metric: str) -> np.ndarray | None:
    """``(images,)`` bool: which test images ``cell_id`` got right on ``metric``; None when the cell stored no
    per-image file, or not that metric, or the file cannot be read."""
    lay = ExperimentLayout.of(results, experiment)
    path = location(lay, cell_id)
    try:
        if lay.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        table = pq.read_table(path, filesystem=lay.fs)
    except (OSError, pa.ArrowInvalid):
        return None
    if metric not in table.column_names:
        return None
    return np.asarray(table.column(metric).to_numpy(zero_copy_only=False), dtype=bool)
