"""The Parquet ledger: one file per finished cell, one row per (cell, metric) (DESIGN.md).

Where things are: ``<results>/<experiment>/ledger/<cell_id>.parquet``, and every other file of an
experiment, come from :class:`orchestrator.results.layout.ExperimentLayout` (the table is in that module).
``results`` is a local path or any URI that ``pyarrow.fs`` understands (``s3://...``; NFS is a local path).

Writing: a cell's worker calls :func:`write_cell` once, after its masks and final state; the file goes
through :func:`smn_core.checkpoint.atomic_write` (a temporary name, then a move; in place on object
stores, where an upload appears whole), so readers (which glob the folder) never see a partial cell, and
the same cell landing twice (a replayed task) leaves one file with one set of rows.

Reading, from cheapest to widest:

* :func:`read_cell` ``(layout, cell_id)``: one cell's ``{metric: value}``, reading one file (a Tune trial
  that checks whether another driver finished its cell meanwhile uses this).
* :func:`completed_cells`, :func:`cell_metric`: the set of finished cells / one metric per cell.
* :func:`read_ledger`: every row (long format), one experiment or all.
* :func:`wide`: long rows to one row per cell, the ledger's meta columns plus one column per metric; the
  paper tables (``paper_*`` modules) build on it.

Readers accept any file whose schema casts to the ledger's (a copy saved back by pandas, an extra
column, a renamed copy). A file that cannot be read (truncated, corrupted) is skipped with a warning by
read-only commands (``smn table``, ``smn plot``); only a run (:func:`completed_cells`) moves it aside to
``<experiment>/quarantine/``, inside the results folder, and its cell runs again.

A cell that failed after all its retries gets a failure record
``<experiment>/failures/<cell_id>.json`` (its label and error); it is not a ledger row, so the cell
runs again next time, and the record is removed when the cell finally lands.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import smn_core
from smn_core.checkpoint import atomic_write

from orchestrator.results.layout import ExperimentLayout, check_experiment_name, filesystem

__all__ = ["LEDGER_SCHEMA", "META_COLUMNS", "write_cell", "read_ledger", "read_cell", "wide",
           "completed_cells", "list_experiments", "check_experiment", "is_plain_name", "write_failure", "read_failures", "cell_metric", "as_ledger_table"]

LEDGER_SCHEMA = pa.schema([
    ("cell_id", pa.string()),
    ("experiment", pa.string()),
    ("method", pa.string()),
    ("backbone", pa.string()),
    ("dataset", pa.string()),
    ("seed", pa.int64()),
    ("grid_json", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("config_json", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("host", pa.string()),
    ("smn_version", pa.string()),
])


def write_cell(results: str, experiment: str, *, cell_id: str, method: str, backbone: str, dataset: str, seed: int,
               grid: dict[str, Any], config: dict[str, Any], metrics: dict[str, float],
               started_at: float, finished_at: float) -> str:
    """Write one cell's rows atomically; returns the file's path.

    Args:
        metrics: ``{metric name: value}``; every value must be a finite-or-nan float.
        started_at, finished_at: UNIX times in seconds.

    Raises:
        ValueError: if ``metrics`` is empty.
    """
    if not metrics:
        raise ValueError(f"cell {cell_id} has no metrics to write")
    lay = ExperimentLayout.of(results, experiment)
    fs = lay.fs
    n = len(metrics)
    ms = lambda t: pd.Timestamp(t, unit="s", tz="UTC")  # noqa: E731
    table = pa.table({
        "cell_id": [cell_id] * n, "experiment": [experiment] * n, "method": [method] * n,
        "backbone": [backbone] * n, "dataset": [dataset] * n, "seed": [int(seed)] * n,
        "grid_json": [json.dumps(grid, sort_keys=True, default=str)] * n,
        "metric": list(metrics), "value": [float(v) for v in metrics.values()],
        "config_json": [json.dumps(config, sort_keys=True, default=str)] * n,
        "started_at": [ms(started_at)] * n, "finished_at": [ms(finished_at)] * n,
        "host": [socket.gethostname()] * n, "smn_version": [smn_core.__version__] * n,
    }, schema=LEDGER_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    final = atomic_write(lay.ledger_file(cell_id), sink.getvalue().to_pybytes(), fs=fs)
    failure = lay.failure(cell_id)
    if fs.get_file_info(failure).type == pafs.FileType.File:
        fs.delete_file(failure)
    return final


def write_failure(results: str, experiment: str, *, cell_id: str, label: str, error: str, attempts: int) -> str:
    """Record that a cell failed after ``attempts`` tries with ``error``; returns the record's path."""
    lay = ExperimentLayout.of(results, experiment)
    blob = json.dumps({"cell_id": cell_id, "label": label, "error": error, "attempts": attempts,
                       "failed_at": time.time(), "host": socket.gethostname()}, indent=1).encode()
    return atomic_write(lay.failure(cell_id), blob, fs=lay.fs)


def read_failures(results: str, experiment: str) -> dict[str, dict]:
    """``{cell_id: failure record}`` of the cells that failed and have not landed since."""
    lay = ExperimentLayout.of(results, experiment)
    fs, folder = lay.fs, lay.failures_dir
    out = {}
    for fi in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        name = os.path.basename(fi.path)
        if fi.type == pafs.FileType.File and name.endswith(".json") and not name.startswith("."):
            with fs.open_input_stream(fi.path) as f:
                out[name[:-5]] = json.loads(f.read())
    return out


def _quarantine(lay: ExperimentLayout, path: str, exc: Exception) -> None:
    lay.fs.create_dir(lay.quarantine_dir, recursive=True)
    dest = lay.inner("quarantine", f"{os.path.basename(path)}.{int(time.time())}")
    lay.fs.move(path, dest)
    warnings.warn(f"ledger file {path} is unreadable ({exc}); moved to {dest}; its cell will run again",
                  RuntimeWarning, stacklevel=3)


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + (" ..." if len(text) > 200 else "")


def as_ledger_table(table: pa.Table) -> pa.Table:
    """``table`` cast to :data:`LEDGER_SCHEMA`: extra columns are dropped, types that cast safely
    (``large_string`` from pandas, ``int32``, other timestamp units) are cast.

    Raises:
        ValueError: a ledger column is missing or does not cast (names it).
    """
    missing = [f.name for f in LEDGER_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"missing ledger column(s) {', '.join(missing)}")
    cols = []
    for f in LEDGER_SCHEMA:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise ValueError(f"column {f.name!r} of type {col.type} does not cast to {f.type}: "
                                 f"{_one_line(exc)}") from None
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=LEDGER_SCHEMA)


def _read_experiment(lay: ExperimentLayout, quarantine: bool = False) -> list[pa.Table]:
    fs = lay.fs
    info = fs.get_file_info(pafs.FileSelector(lay.ledger_dir, allow_not_found=True))
    tables = []
    for fi in sorted(info, key=lambda f: f.path):
        name = os.path.basename(fi.path)
        if fi.type != pafs.FileType.File or not name.endswith(".parquet") or name.startswith("."):
            continue
        try:
            t = as_ledger_table(pq.read_table(fi.path, filesystem=fs))
            if t.num_rows == 0:
                raise ValueError("no rows")
            if len(set(t.column("cell_id").to_pylist())) != 1:
                raise ValueError("rows of more than one cell")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is set aside (run) or skipped (read)
            if quarantine:
                _quarantine(lay, fi.path, exc)
            else:
                warnings.warn(f"skipped unreadable ledger file {fi.path} ({_one_line(exc)}); left in place",
                              RuntimeWarning, stacklevel=3)
            continue
        tables.append(t)
    return tables


def list_experiments(results: str) -> list[str]:
    """Names of the experiments that have a ledger folder under ``results`` (a folder whose name is not a
    plain experiment name is not one)."""
    fs, root = filesystem(results)
    info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = [os.path.basename(f.path) for f in info if f.type == pafs.FileType.Directory]
    layouts = [ExperimentLayout.of(results, n) for n in names if is_plain_name(n)]
    return sorted(lay.experiment for lay in layouts
                  if fs.get_file_info(lay.ledger_dir).type == pafs.FileType.Directory)


def check_experiment(results: str, experiment: str | None) -> None:
    """Refuse an experiment (None: all, always fine) that has no ledger folder under ``results``.

    Raises:
        ValueError: naming the experiment and the ones there are (a path such as ``../other/demo`` is never
            one of them).
    """
    if experiment is None:
        return
    known = list_experiments(results)
    if experiment not in known:
        raise ValueError(f"experiment {experiment!r} is not in {results!r}; allowed: "
                         f"{', '.join(known) or '(none yet: run a spec first)'}")


def is_plain_name(name: str) -> bool:
    """True when ``name`` passes :func:`check_experiment_name` (a folder that can be an experiment)."""
    try:
        check_experiment_name(name)
    except ValueError:
        return False
    return True


def read_ledger(results: str, experiment: str | None = None, *, quarantine: bool = False) -> pd.DataFrame:
    """All rows of one experiment (or of every experiment under ``results``) as a DataFrame.

    Read-only by default: a file whose schema casts to :data:`LEDGER_SCHEMA` is read (extra columns,
    ``large_string``, a renamed copy); one that cannot be read is skipped with a warning and left where it
    is. ``quarantine=True`` (``smn run`` only, through :func:`completed_cells`) moves it to
    ``<experiment>/quarantine/`` instead, so its cell runs again. Rows are unique by (cell, metric).
    ``df.attrs["results"]`` holds ``results``, so a report layout that reads masks or states next to the
    ledger can find them.

    Raises:
        ValueError: ``experiment`` is not a plain name
            (:func:`orchestrator.results.layout.check_experiment_name`).
    """
    names = [check_experiment_name(experiment)] if experiment else list_experiments(results)
    tables = []
    for name in names:
        tables += _read_experiment(ExperimentLayout.of(results, name), quarantine=quarantine)
    df = (pa.concat_tables(tables) if tables else LEDGER_SCHEMA.empty_table()).to_pandas()
    if tables:
        df = df.drop_duplicates(["experiment", "cell_id", "metric"], keep="first").reset_index(drop=True)
    df.attrs["results"] = str(results)
    return df


def cell_metric(results: str, experiment: str, metric: str) -> dict[str, float]:
    """``{cell_id: value}`` of one metric over the experiment's cells (e.g. ``density`` for top-k at
    the found density)."""
    df = read_ledger(results, experiment)
    df = df[df["metric"] == metric]
    return dict(zip(df["cell_id"], df["value"].astype(float)))


def completed_cells(results: str, experiment: str) -> set[str]:
    """Ids of the cells whose rows are in the ledger; called before a run, so unreadable files are
    quarantined (moved to ``<experiment>/quarantine/``) and their cells run again."""
    df = read_ledger(results, experiment, quarantine=True)
    return set(df["cell_id"].unique())


def read_cell(layout: ExperimentLayout, cell_id: str) -> dict[str, float] | None:
    """One cell's ``{metric: value}``, reading its own ledger file only; None when the cell has not landed.

    A file that exists but cannot be read as this cell's rows also gives None (the cell runs again and
    its rewrite replaces the file; a full :func:`read_ledger` quarantines such files).

    Raises:
        OSError: if the storage itself cannot be reached.
    """
    fs, path = layout.fs, layout.ledger_file(cell_id)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        t = pq.read_table(path, filesystem=fs, columns=["cell_id", "metric", "value"])
    except (pa.ArrowInvalid, OSError, ValueError):
        return None
    if t.num_rows == 0 or set(t.column("cell_id").to_pylist()) != {cell_id}:
        return None
    return dict(zip(t.column("metric").to_pylist(), (float(v) for v in t.column("value").to_pylist())))


META_COLUMNS = ("experiment", "method", "backbone", "dataset", "seed", "grid_json", "config_json", "started_at",
                "finished_at", "host", "smn_version")
"""The per-cell columns of the ledger (the same on every row of a cell); :func:`wide` keeps them."""


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """The per-cell (wide) view of ledger rows: one row per ``cell_id``, the :data:`META_COLUMNS` of the
    cell's first row, then one column per metric (NaN where a cell lacks that metric).

    Args:
        df: ledger rows (long format, :func:`read_ledger`), possibly filtered.

    Returns:
        A DataFrame with a ``cell_id`` column, sorted by ``cell_id``; empty (no columns) for no rows.
    """
    if df.empty:
        return pd.DataFrame()
    values = df.pivot_table(index="cell_id", columns="metric", values="value", aggfunc="first")
    values.columns.name = None
    meta = df.groupby("cell_id")[[c for c in META_COLUMNS if c in df.columns]].first()
    return meta.join(values).reset_index()
