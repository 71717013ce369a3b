"""The Parquet ledger: one file per finished cell, one row per (cell, metric) (DESIGN.md).

Layout: ``<results>/<experiment>/ledger/<cell_id>.parquet``. Each file is written to a temporary
name and renamed, so readers (which glob the folder) never see a partial cell. ``results`` is a
local path or any URI that ``pyarrow.fs`` understands (``s3://...``; NFS is a local path).

The experiment's other files (``masks/``, ``states/``, ``checkpoints/``, ``artifacts/``, ``cascade/``,
``ray_train/``, ``tune/``) live next to the ledger, on the same filesystem: build their locations with
:func:`artifact_location` (a local path for local results, a URI for URI results), which
``smn_core.checkpoint``, Ray Train and Ray Tune all accept; :func:`experiment_dir` is the path *inside*
the filesystem, without a URI's scheme, for use with :func:`resolve`'s filesystem only.

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
import uuid
import warnings
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import smn_core

__all__ = ["LEDGER_SCHEMA", "resolve", "write_cell", "read_ledger", "completed_cells", "experiment_dir",
           "artifact_location", "list_experiments", "write_failure", "read_failures", "cell_metric",
           "as_ledger_table", "check_experiment_name"]

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


def resolve(results: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a pyarrow URI (``s3://bucket/prefix``, ``file:///...``).

    Raises:
        ValueError: if the URI's filesystem is not supported by pyarrow.
    """
    if "://" in str(results):
        try:
            return pafs.FileSystem.from_uri(str(results))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"results location {results!r} is not supported: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.fspath(results))


def experiment_dir(results: str, experiment: str) -> str:
    """Path (inside the results filesystem, without a URI's scheme) of an experiment's folder."""
    return f"{resolve(results)[1].rstrip('/')}/{experiment}"


def artifact_location(results: str, experiment: str, *parts: str) -> str:
    """Where an experiment's artifact lives: ``<results>/<experiment>/<parts...>``.

    For local results (a path, NFS included) this is an absolute local path; for URI results it is a URI
    on the same filesystem that keeps the results URI's query, e.g. ``artifact_location("s3://b/r?scheme=http",
    "exp", "masks", "c1.safetensors") == "s3://b/r/exp/masks/c1.safetensors?scheme=http"``, which
    ``smn_core.checkpoint``, Ray Train and Ray Tune all accept. (Do not build these with ``pathlib``:
    ``Path("s3://b/x")`` collapses the ``//``.)

    Raises:
        ValueError: if ``experiment`` or a part is empty, ``.`` or ``..``, or holds ``?`` or ``#``.
    """
    for name in (experiment, *parts):
        if not name or name in (".", "..") or any(c in name for c in "?#"):
            raise ValueError(f"artifact path part {name!r} (experiment {experiment!r}) is not a plain name")
    if "://" in str(results):
        from urllib.parse import urlsplit, urlunsplit

        split = urlsplit(str(results))
        return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), experiment, *parts])))
    return "/".join([experiment_dir(results, experiment), *parts])


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
    fs, root = resolve(results)
    folder = f"{root.rstrip('/')}/{experiment}/ledger"
    fs.create_dir(folder, recursive=True)
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
    final = f"{folder}/{cell_id}.parquet"
    tmp = f"{folder}/.{cell_id}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as out:
        pq.write_table(table, out)
    fs.move(tmp, final)
    failure = f"{root.rstrip('/')}/{experiment}/failures/{cell_id}.json"
    if fs.get_file_info(failure).type == pafs.FileType.File:
        fs.delete_file(failure)
    return final


def write_failure(results: str, experiment: str, *, cell_id: str, label: str, error: str, attempts: int) -> str:
    """Record that a cell failed after ``attempts`` tries with ``error``; returns the record's path."""
    fs, root = resolve(results)
    folder = f"{root.rstrip('/')}/{experiment}/failures"
    fs.create_dir(folder, recursive=True)
    path = f"{folder}/{cell_id}.json"
    blob = json.dumps({"cell_id": cell_id, "label": label, "error": error, "attempts": attempts,
                       "failed_at": time.time(), "host": socket.gethostname()}, indent=1).encode()
    tmp = f"{folder}/.{cell_id}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(blob)
    fs.move(tmp, path)
    return path


def read_failures(results: str, experiment: str) -> dict[str, dict]:
    """``{cell_id: failure record}`` of the cells that failed and have not landed since."""
    fs, root = resolve(results)
    folder = f"{root.rstrip('/')}/{experiment}/failures"
    out = {}
    for fi in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        name = os.path.basename(fi.path)
        if fi.type == pafs.FileType.File and name.endswith(".json") and not name.startswith("."):
            with fs.open_input_stream(fi.path) as f:
                out[name[:-5]] = json.loads(f.read())
    return out


def _quarantine(fs: pafs.FileSystem, exp_folder: str, path: str, exc: Exception) -> None:
    qdir = f"{exp_folder}/quarantine"
    fs.create_dir(qdir, recursive=True)
    dest = f"{qdir}/{os.path.basename(path)}.{int(time.time())}"
    fs.move(path, dest)
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


def _read_experiment(fs: pafs.FileSystem, exp_folder: str, quarantine: bool = False) -> list[pa.Table]:
    folder = f"{exp_folder}/ledger"
    info = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
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
                _quarantine(fs, exp_folder, fi.path, exc)
            else:
                warnings.warn(f"skipped unreadable ledger file {fi.path} ({_one_line(exc)}); left in place",
                              RuntimeWarning, stacklevel=3)
            continue
        tables.append(t)
    return tables


def check_experiment_name(experiment: str) -> str:
    """``experiment`` if it is a plain folder name (letters, digits, ``.``, ``_``, ``-``; no ``/``, no
    ``..``), so that nothing a reader or quarantine does can reach outside the results folder.

    Raises:
        ValueError: naming the value and what is allowed.
    """
    import re

    if not isinstance(experiment, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", experiment) \
            or ".." in experiment:
        raise ValueError(f"experiment {experiment!r} is not a plain name; allowed: letters, digits, '.', '_', '-' "
                         "(an experiment folder directly under the results folder)")
    return experiment


def list_experiments(results: str) -> list[str]:
    """Names of the experiments that have a ledger folder under ``results``."""
    fs, root = resolve(results)
    info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(os.path.basename(f.path) for f in info
                  if f.type == pafs.FileType.Directory
                  and fs.get_file_info(f"{f.path}/ledger").type == pafs.FileType.Directory)


def read_ledger(results: str, experiment: str | None = None, *, quarantine: bool = False) -> pd.DataFrame:
    """All rows of one experiment (or of every experiment under ``results``) as a DataFrame.

    Read-only by default: a file whose schema casts to :data:`LEDGER_SCHEMA` is read (extra columns,
    ``large_string``, a renamed copy); one that cannot be read is skipped with a warning and left where it
    is. ``quarantine=True`` (``smn run`` only, through :func:`completed_cells`) moves it to
    ``<experiment>/quarantine/`` instead, so its cell runs again. Rows are unique by (cell, metric).
    ``df.attrs["results"]`` holds ``results``, so a report layout that reads masks or states next to the
    ledger can find them.

    Raises:
        ValueError: ``experiment`` is not a plain name (:func:`check_experiment_name`).
    """
    fs, root = resolve(results)
    names = [check_experiment_name(experiment)] if experiment else list_experiments(results)
    tables = []
    for name in names:
        tables += _read_experiment(fs, f"{root.rstrip('/')}/{name}", quarantine=quarantine)
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
