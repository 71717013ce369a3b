"""Per-epoch training curves of a cell (loss, density, code entropy, lr, seconds per epoch).

The ledger holds one row per (cell, final metric); the per-epoch history of the training loop
(:attr:`smn_core.pipeline.CellOutcome.history`) is stored beside it, one small Parquet file per cell at
:meth:`orchestrator.results.layout.ExperimentLayout.curves` (``<results>/<experiment>/curves/<cell_id>.parquet``,
columns ``epoch`` and one per recorded quantity), written through :func:`smn_core.checkpoint.atomic_write`,
so local folders, NFS and ``s3://`` results all work. Trackers (:mod:`orchestrator.reports.tracking`) and
reports read it back.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from smn_core.checkpoint import atomic_write

from orchestrator.results.layout import ExperimentLayout

__all__ = ["write_curves", "read_curves", "CURVE_COLUMNS"]

CURVE_COLUMNS = ("loss", "density", "code_entropy", "lr", "train_top1", "seconds", "val_knn_dino_top1")
"""Per-epoch quantities kept (whichever the training loop recorded)."""


def write_curves(layout: ExperimentLayout, cell_id: str, history: list[dict[str, float]]) -> str | None:
    """Store a cell's per-epoch history; returns the file's path (inside the results filesystem), or None
    when the history is empty (a ``pretrained`` cell trains nothing)."""
    if not history:
        return None
    rows = [{"epoch": int(h.get("epoch", i)), **{k: float(h[k]) for k in CURVE_COLUMNS if k in h}}
            for i, h in enumerate(history)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return atomic_write(layout.curves(cell_id), sink.getvalue().to_pybytes(), fs=layout.fs)


def read_curves(layout: ExperimentLayout, cell_id: str) -> pd.DataFrame | None:
    """A cell's per-epoch curves (one row per epoch), or None when none were stored."""
    fs, path = layout.fs, layout.curves(cell_id)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return pq.read_table(path, filesystem=fs).to_pandas()
