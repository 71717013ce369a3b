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

import concurrent.futures
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import smn_core
from smn_core.checkpoint import atomic_write

from orchestrator.results.layout import ExperimentLayout, check_experiment_name, filesystem
from orchestrator.spec import keys

if TYPE_CHECKING:  # pandas and duckdb are imported where they are used: listing done cells needs neither
    import pandas as pd

__all__ = ["LEDGER_SCHEMA", "SETTING_ID", "FULL_SCHEMA", "META_COLUMNS", "cell_configs", "MANIFEST", "LedgerFiles", "write_cell", "read_ledger", "read_cell", "wide",
           "completed_cells", "list_experiments", "check_experiment", "is_plain_name", "write_failure", "read_failures",
           "cell_metric", "metric_names", "setting_stats", "SETTING_KEYS", "as_ledger_table", "ledger_files", "scan_files", "read_manifest", "schema_problem",
           "footer_problem"]

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
"""The columns every ledger file has (a file lacking one cannot be read as ledger rows)."""

SETTING_ID = "setting_id"
"""The per-cell column of the cell's setting id (:func:`orchestrator.spec.keys.setting_id` of its ``config_json``:
the resolved config without the seed), written since issue 27 so that a table can group cells by setting
without reading the configs. Older files lack it: readers derive it from ``config_json`` (same value)."""

FULL_SCHEMA = LEDGER_SCHEMA.insert(LEDGER_SCHEMA.get_field_index("grid_json") + 1, pa.field(SETTING_ID, pa.string()))
"""What :func:`write_cell` and a compaction write: :data:`LEDGER_SCHEMA` with :data:`SETTING_ID` after ``grid_json``,
so that the columns a table reads (``cell_id`` to ``value``) lie side by side in the file: one ranged read of a
cell file on an object store, not two around ``config_json``."""


def write_cell(results: str, experiment: str, *, cell_id: str, method: str, backbone: str, dataset: str, seed: int,
               grid: dict[str, Any], config: dict[str, Any], metrics: dict[str, float],
               started_at: float, finished_at: float, extra_columns: dict[str, str] | None = None) -> str:
    """Write one cell's rows atomically (:data:`FULL_SCHEMA`: the setting id too); returns the file's path.

    Args:
        metrics: ``{metric name: value}``; every value must be a finite-or-nan float.
        started_at, finished_at: UNIX times in seconds.
        extra_columns: string columns beyond :data:`FULL_SCHEMA`, the same on every row (``ray_job_id``,
            ``ray_submission_id``: docs/ledger.md); readers ignore them unless they read the file's own columns.

    Raises:
        ValueError: if ``metrics`` is empty.
    """
    if not metrics:
        raise ValueError(f"cell {cell_id} has no metrics to write")
    lay = ExperimentLayout.of(results, experiment)
    fs = lay.fs
    n = len(metrics)
    import pandas as pd  # the writer runs in a worker that has it loaded already

    ms = lambda t: pd.Timestamp(t, unit="s", tz="UTC")  # noqa: E731
    config_json = json.dumps(config, sort_keys=True, default=str)
    table = pa.table({
        "cell_id": [cell_id] * n, "experiment": [experiment] * n, "method": [method] * n,
        "backbone": [backbone] * n, "dataset": [dataset] * n, "seed": [int(seed)] * n,
        "grid_json": [json.dumps(grid, sort_keys=True, default=str)] * n,
        "metric": list(metrics), "value": [float(v) for v in metrics.values()],
        "config_json": [config_json] * n,
        "started_at": [ms(started_at)] * n, "finished_at": [ms(finished_at)] * n,
        "host": [socket.gethostname()] * n, "smn_version": [smn_core.__version__] * n,
        SETTING_ID: [keys.setting_id(config_json)] * n,  # from the very text above: a reader deriving it agrees
    }, schema=FULL_SCHEMA)
    for name, value in (extra_columns or {}).items():
        table = table.append_column(pa.field(name, pa.string()), pa.array([str(value)] * n, pa.string()))
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


MANIFEST = "manifest.json"
"""Name of the compacted ledger's index (``ledger/_compacted/manifest.json``): ``{"parts": {part file name:
[cell ids]}}``; the one commit point of :mod:`orchestrator.results.compact`."""


@dataclass(frozen=True)
class LedgerFiles:
    """The files of one experiment's ledger, as one listing (and the compacted index) saw them.

    Attributes:
        layout: the experiment's layout.
        cell_files: ``{cell id: inner path}`` of the per-cell files whose cell is not in the compacted index
            (the cell id is the file's name, ``<cell_id>.parquet``).
        parts: ``{inner path of a compacted part: cell ids}`` from the index.
        shadowed: per-cell files whose cell the index holds already (left by a compaction that stopped
            before it removed them; readers skip them, the next compaction removes them).
    """

    layout: ExperimentLayout
    cell_files: dict[str, str]
    parts: dict[str, tuple[str, ...]]
    shadowed: tuple[str, ...] = ()

    @property
    def cells(self) -> set[str]:
        """Every cell id of the ledger (file names and the compacted index; no row is read)."""
        return set(self.cell_files) | {c for ids in self.parts.values() for c in ids}

    @property
    def paths(self) -> list[str]:
        """Inner paths of every file a reader reads: the compacted parts, then the per-cell files."""
        return sorted(self.parts) + sorted(self.cell_files.values())


def read_manifest(layout: ExperimentLayout) -> dict[str, list[str]]:
    """``{part file name: cell ids}`` of the experiment's compacted ledger; ``{}`` when it was never compacted.

    Raises:
        ValueError: the index exists but is not valid JSON of that shape (names the file).
        OSError: the storage cannot be read.
    """
    path = layout.compacted(MANIFEST)
    try:
        with layout.fs.open_input_stream(path) as f:
            blob = f.read()
    except FileNotFoundError:
        return {}
    try:
        parts = json.loads(blob)["parts"]
        return {str(k): [str(c) for c in v] for k, v in parts.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"compacted ledger index {path} is not readable ({_one_line(exc)}); allowed: the JSON "
                         "that `smn ledger compact` writes (remove it and the part files to fall back to the cell "
                         "files, if they are still there)") from None


def ledger_files(layout: ExperimentLayout) -> LedgerFiles:
    """List one experiment's ledger: one listing of ``ledger/`` and, when it has a ``_compacted/`` folder, one
    read of the index (in this order, so that a compaction running meanwhile never hides a cell: a cell file
    gone from the listing is in the index read after it).

    Raises:
        OSError: the storage cannot be read.
    """
    fs = layout.fs
    files, compacted = {}, False
    for fi in fs.get_file_info(pafs.FileSelector(layout.ledger_dir, allow_not_found=True)):
        name = os.path.basename(fi.path)
        if fi.type == pafs.FileType.Directory and name == "_compacted":
            compacted = True
        elif fi.type == pafs.FileType.File and name.endswith(".parquet") and not name.startswith("."):
            files[name[: -len(".parquet")]] = fi.path
    index = read_manifest(layout) if compacted else {}
    indexed = {c for ids in index.values() for c in ids}
    return LedgerFiles(layout, {c: p for c, p in files.items() if c not in indexed},
                       {layout.compacted(name): tuple(ids) for name, ids in index.items()},
                       tuple(sorted(p for c, p in files.items() if c in indexed)))


_FAMILIES = {"string": (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view),
             "int": (pa.types.is_integer,), "float": (pa.types.is_floating, pa.types.is_integer),
             "timestamp": (pa.types.is_timestamp,)}


def _family(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_floating(t):
        return "float"
    return "int" if pa.types.is_integer(t) else "string"


def schema_problem(schema: pa.Schema) -> str | None:
    """Why a file of ``schema`` cannot be read as ledger rows (a missing column, a type that does not cast to
    :data:`LEDGER_SCHEMA`'s, e.g. text in ``value``), or None."""
    missing = [f.name for f in LEDGER_SCHEMA if f.name not in schema.names]
    if missing:
        return f"missing ledger column(s) {', '.join(missing)}"
    for f in LEDGER_SCHEMA:
        t = schema.field(f.name).type
        if not any(test(t) for test in _FAMILIES[_family(f.type)]):
            return f"column {f.name!r} of type {t} does not cast to {f.type}"
    if SETTING_ID in schema.names and not any(test(schema.field(SETTING_ID).type) for test in _FAMILIES["string"]):
        return f"column {SETTING_ID!r} of type {schema.field(SETTING_ID).type} does not cast to string"
    return None


def footer_problem(fs: pafs.FileSystem, path: str) -> str | None:
    """Why the ledger file ``path`` cannot be read, from its Parquet footer alone (no row is read): not
    Parquet (truncated, zero bytes, text), a bad schema (:func:`schema_problem`), no rows, or no metric value
    that is a number (every ``value`` NaN: the column statistics hold no min/max). None when it is fine.

    Raises:
        FileNotFoundError: the file is gone (moved by a compaction meanwhile).
    """
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable footer (ArrowInvalid, OSError) is the file's fault
        return _one_line(exc)
    problem = schema_problem(meta.schema.to_arrow_schema())
    if problem or meta.num_rows == 0:
        return problem or "no rows"
    col = meta.schema.to_arrow_schema().get_field_index("value")
    stats = [meta.row_group(i).column(col).statistics for i in range(meta.num_row_groups)]
    if all(s is not None and not s.has_min_max for s in stats):
        return "every metric value is NaN (no number in column 'value')"
    return None


def _set_aside(lay: ExperimentLayout, path: str, reason: str, quarantine: bool) -> None:
    """Report an unreadable ledger file: moved to quarantine (a run) or skipped with a warning (a read)."""
    if quarantine:
        _quarantine(lay, path, ValueError(reason))
    else:
        warnings.warn(f"skipped unreadable ledger file {path} ({reason}); left in place", RuntimeWarning,
                      stacklevel=4)


def _connect():
    """A private in-memory DuckDB connection (threads: DuckDB's default, one per core)."""
    import duckdb  # only a scan needs it (about 0.2 s to import)

    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")
    return con


def _source(con, fs: pafs.FileSystem, paths: list[str], columns: list[str], union: bool = False):
    """The DuckDB relation of the rows of ``paths`` with ``columns`` plus ``filename`` and ``file_row_number``.

    Local files are scanned by DuckDB's own Parquet reader (projection and filters pushed into it; columns
    matched by name, types cast to the first file's; ``union``: by the union of every file's columns, a column
    a file lacks read as NULL, which costs a read of every footer before the scan); files on another
    ``pyarrow.fs`` filesystem (S3) through ``pyarrow.dataset``, reading only ``columns`` (NULL where a file
    lacks one of :data:`FULL_SCHEMA`'s optional columns)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return con.read_parquet(paths, filename=True, file_row_number=True, union_by_name=union)
    import pyarrow.dataset as pads  # object stores only; its import loads pandas (about 0.5 s)

    dataset = pads.dataset(paths, filesystem=fs, format="parquet", schema=FULL_SCHEMA)
    batches, names = [], []
    for tagged in dataset.scanner(columns=columns).scan_batches():
        batches.append(tagged.record_batch)
        names += [tagged.fragment.path] * tagged.record_batch.num_rows
    table = pa.Table.from_batches(batches, pa.schema([FULL_SCHEMA.field(c) for c in columns]))
    table = table.append_column("filename", pa.array(names, pa.string()))
    table = table.append_column("file_row_number", pa.array(np.arange(table.num_rows), pa.int64()))
    return con.from_arrow(table)


_TYPES = {f.name: f.type for f in FULL_SCHEMA}


def _metric_filter(metrics: list[str] | None) -> tuple[str, dict]:
    """The ``WHERE`` clause of ``metrics`` (None: none) as a list of SQL literals (quotes doubled), which DuckDB
    pushes into the Parquet scan (a parameter list, ``IN (SELECT unnest($m))``, is a join after a full scan:
    50 % more memory at 10,000 cells)."""
    if metrics is None:
        return "", {}
    if not metrics:
        return "WHERE false", {}
    return "WHERE metric IN (" + ", ".join("'" + str(m).replace("'", "''") + "'" for m in metrics) + ")", {}


def _query_rows(con, columns: list[str], metrics: list[str] | None) -> pa.Table:
    """The rows of the view ``src`` with ``columns`` and ``filename`` (of ``metrics`` only, None: all), in the
    order of a per-file read (experiment, cell, file, row), typed as :data:`FULL_SCHEMA`."""
    select = ", ".join('CAST("value" AS DOUBLE) AS "value"' if c == "value" else f'"{c}"' for c in columns)
    where, params = _metric_filter(metrics)
    table = con.sql(f"SELECT {select}, filename FROM src {where} "
                    "ORDER BY experiment, cell_id, filename, file_row_number", params=params).to_arrow_table()
    return table.cast(pa.schema([*(pa.field(c, _TYPES[c]) for c in columns), pa.field("filename", pa.string())]))


def _query_per_cell(con, columns: list[str], metrics: list[str] | None, shared: list[str]) -> pa.Table:
    """:func:`_query_rows` with the ``shared`` columns (the same on every row of a cell, e.g. ``config_json``) read
    once per cell file: DuckDB groups the rows by (experiment, cell, file), lists ``metric`` and ``value`` in row
    order and keeps one value of each shared column (these groups are returned); the lists are flattened back into
    rows by :func:`_expand`, and
    ``config_json`` comes back dictionary-encoded (a pandas categorical), so a 3 KB config costs its bytes once
    per distinct config, not once per row, in Arrow and in pandas. Same rows, same order as :func:`_query_rows`."""
    keys_ = ["experiment", "cell_id", "filename"]
    listed = [c for c in columns if c not in shared and c not in keys_]
    value = lambda c: 'CAST("value" AS DOUBLE)' if c == "value" else f'"{c}"'  # noqa: E731
    select = ", ".join([*(f'"{k}"' for k in keys_), *(f'list({value(c)} ORDER BY file_row_number) AS "{c}"' for c in listed),
                        *(f'any_value("{c}") AS "{c}"' for c in shared)])
    where, params = _metric_filter(metrics)
    return con.sql(f"SELECT {select} FROM src {where} GROUP BY ALL ORDER BY experiment, cell_id, filename",
                   params=params).to_arrow_table()


def _expand(groups: pa.Table, columns: list[str], shared: list[str]) -> pa.Table:
    """The rows of :func:`_query_per_cell`'s groups (one per cell file): the listed columns flattened, the shared
    ones repeated (through a dictionary), typed as :data:`FULL_SCHEMA`; done after the DuckDB connection is
    closed, so that the scan's memory is given back before these copies are made."""
    listed = [c for c in columns if c not in shared and c not in ("experiment", "cell_id", "filename")]
    row_of = pc.list_parent_indices(groups.column(listed[0]))  # the group (cell file) of every row
    out = {}
    for c in [*columns, "filename"]:
        col = groups.column(c)
        if c in listed:
            out[c] = pc.list_flatten(col).cast(_TYPES[c])
        elif c == "config_json":  # kilobytes a cell: once per distinct value, as a dictionary (pandas categorical)
            enc = col.combine_chunks().cast(_TYPES[c]).dictionary_encode()
            out[c] = pa.DictionaryArray.from_arrays(pc.take(enc.indices, row_of), enc.dictionary)
        elif pa.types.is_string(_TYPES.get(c, pa.string())):  # through a dictionary: 20x faster than a string take
            enc = col.combine_chunks().cast(pa.string()).dictionary_encode()
            out[c] = pc.take(enc, row_of).cast(pa.string())
        else:
            out[c] = pc.take(col, row_of).cast(_TYPES.get(c, pa.string()))
    return pa.table(out)


def _query(fs: pafs.FileSystem, paths: list[str], columns: list[str], metrics: list[str] | None,
           shared: list[str]) -> pa.Table:
    """The rows of ``paths`` (:func:`_query_rows`, or :func:`_query_per_cell` with ``shared`` columns), with
    :data:`SETTING_ID` filled in on every row when ``columns`` has it.

    A ledger whose files all have the setting id is read in one strict scan (DuckDB binds the columns to the
    first file's). A file written before the column existed makes that scan fail on its name: when a later
    file lacks it, the ledger is read again by the union of the files' columns (a read of every footer first),
    and the files without an id get it from their ``config_json``, read from them alone; when the first file
    lacks it, the ledger is read again with ``config_json`` in place of the id (once per cell file), which gives
    every id, as before the column existed (:func:`_fill_setting_ids`). Each scan has a connection of its own,
    closed before its rows are expanded."""
    import duckdb  # for its error type (loaded by _connect anyway)

    attempts = [(columns, False)]
    while attempts:
        cols, union = attempts.pop(0)
        own = [c for c in dict.fromkeys([*shared, *(["config_json"] if SETTING_ID in shared else [])]) if c in cols]
        con = _connect()
        try:
            _source(con, fs, paths, cols, union).create_view("src", replace=True)
            table = _query_per_cell(con, cols, metrics, own) if shared else _query_rows(con, cols, metrics)
        except duckdb.Error as exc:
            head = str(exc).split("Candidate")[0]
            if SETTING_ID not in cols or f'"{SETTING_ID}"' not in head:
                raise
            no_id = list(dict.fromkeys([*(c for c in cols if c != SETTING_ID), "config_json"]))
            attempts = [(columns, True), (no_id, False)] if "schema mismatch" in head and not union else [(no_id, False)]
            continue
        finally:
            con.close()
        table = _expand(table, cols, own) if shared else table
        if SETTING_ID not in columns:
            return table
        if SETTING_ID not in cols:
            table = table.append_column(SETTING_ID, pa.nulls(table.num_rows, pa.string()))
        return _fill_setting_ids(fs, table).select([*columns, "filename"])
    raise AssertionError("unreachable: the last attempt reads no setting id")


def _fill_setting_ids(fs: pafs.FileSystem, table: pa.Table) -> pa.Table:
    """``table`` (rows with ``filename`` and :data:`SETTING_ID`) with the setting ids that are NULL (files written
    before the column) derived from each file's ``config_json`` (:func:`orchestrator.spec.keys.setting_id`): from
    the rows' own ``config_json`` when the table has it, else from one read of that column of those files."""
    sid = table.column(SETTING_ID)
    if not sid.null_count:
        return table
    files = pc.unique(pc.filter(table.column("filename"), pc.is_null(sid))).to_pylist()
    if "config_json" in table.column_names:
        first = pc.index_in(pa.array(files), table.column("filename"))
        configs = pc.take(table.column("config_json"), first).cast(pa.string()).to_pylist()
    else:
        con = _connect()
        try:
            _source(con, fs, files, ["config_json"]).create_view("configs", replace=True)
            got = dict(con.sql("SELECT filename, any_value(config_json) FROM configs GROUP BY filename").fetchall())
        finally:
            con.close()
        configs = [got[f] for f in files]
    derived = pa.array([keys.setting_id(c) for c in configs], pa.string())
    filled = pc.take(derived, pc.index_in(table.column("filename"), pa.array(files)))
    return table.set_column(table.schema.get_field_index(SETTING_ID), SETTING_ID, pc.coalesce(sid, filled))


def _suspects(table: pa.Table, cell_files: set[str]) -> set[str]:
    """Per-cell files that a footer check must clear (:func:`footer_problem`): those without a row in
    ``table``, those whose rows there hold more than one cell or only NaN values."""
    value = table.column("value")
    number = pc.fill_null(pc.invert(pc.is_nan(value)), False)
    per_file = pa.table({"f": table.column("filename"), "c": table.column("cell_id"), "n": number}).group_by("f").aggregate(
        [("c", "count_distinct"), ("n", "any")])
    fine = {f for f, c, n in zip(per_file.column("f").to_pylist(), per_file.column("c_count_distinct").to_pylist(),
                                 per_file.column("n_any").to_pylist()) if c == 1 and n}
    return {p for p in cell_files if p not in fine}


def _scan(sets: list[LedgerFiles], columns: list[str], metrics: list[str] | None,
          quarantine: bool, shared: tuple[str, ...] = ()) -> tuple[pa.Table, set[str]]:
    """Every row of the ledgers ``sets`` with ``columns`` of ``metrics``, in one query of one engine (DuckDB);
    the ``shared`` columns (per-cell values) read once per cell file, dictionary-encoded (:func:`_query_per_cell`).

    Files are checked without a second scan: a per-cell file with no row in the answer, rows of several cells
    or only NaN values gets a footer check (:func:`footer_problem`: no rows at all, every value NaN, a bad
    schema); a scan that fails (truncated, not Parquet, a mistyped column) footer-checks every per-cell file.
    A file that fails is set aside (a warning, or quarantine) and its rows are left out.

    Returns:
        ``(rows, paths of the files set aside)``.

    Raises:
        FileNotFoundError: a file vanished (a compaction swapped it): the caller lists again.
    """
    import duckdb  # for its error type (loaded by _connect anyway)

    fs = sets[0].layout.fs
    owner = {p: f.layout for f in sets for p in f.paths}
    cell_files = {p for f in sets for p in f.cell_files.values()}
    read_cols = list(dict.fromkeys([*columns, "experiment", "cell_id", "metric", "value"]))
    bad: dict[str, str] = {}
    for _ in range(3):
        active = [p for p in owner if p not in bad]
        if not active:
            break
        try:
            per_cell = [c for c in read_cols if c in shared and c not in ("experiment", "cell_id")]  # keys anyway
            table = _query(fs, active, read_cols, metrics, per_cell)
        except (duckdb.Error, pa.ArrowException, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            found = {p: r for p in active if p in cell_files for r in [footer_problem(fs, p)] if r}
            if not found:
                raise
            for path, reason in found.items():
                _set_aside(owner[path], path, reason, quarantine)
            bad.update(found)
            continue
        found = {p: r for p in _suspects(table, cell_files & set(active)) for r in [footer_problem(fs, p)] if r}
        for path, reason in found.items():
            _set_aside(owner[path], path, reason, quarantine)
        bad.update(found)
        if found:
            table = table.filter(pc.invert(pc.is_in(table.column("filename"), pa.array(sorted(found)))))
        return table.select(columns), set(bad)
    return FULL_SCHEMA.empty_table().select(columns), set(bad)


def scan_files(files: LedgerFiles) -> tuple[pa.Table, set[str]]:
    """Every row (all columns, typed as :data:`FULL_SCHEMA`: the setting id derived for files without it) of the
    files ``files`` names, unique by (cell, metric), in cell order; an unreadable file is skipped with a warning
    and left in place (what :mod:`orchestrator.results.compact` merges).

    Returns:
        ``(rows, paths of the files skipped)``.

    Raises:
        FileNotFoundError: a file vanished meanwhile.
    """
    table, bad = _scan([files], list(FULL_SCHEMA.names), None, quarantine=False)
    if table.num_rows:
        table = table.append_column("_i", pa.array(np.arange(table.num_rows), pa.int64()))
        first = table.group_by(["experiment", "cell_id", "metric"], use_threads=False).aggregate([("_i", "min")])
        rows = first.column("_i_min").combine_chunks()
        table = table.take(pc.take(rows, pc.array_sort_indices(rows))).drop_columns(["_i"])
    return table, bad


def list_experiments(results: str) -> list[str]:
    """Names of the experiments that have a ledger folder under ``results`` (a folder whose name is not a
    plain experiment name is not one).

    Raises:
        ValueError: an experiment's ``ledger`` is a file, not a folder (names it).
    """
    fs, root = filesystem(results)
    info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = [os.path.basename(f.path) for f in info if f.type == pafs.FileType.Directory]
    layouts = [ExperimentLayout.of(results, n) for n in names if is_plain_name(n)]
    kinds = {lay.experiment: fs.get_file_info(lay.ledger_dir) for lay in layouts}
    files = [info.path for info in kinds.values() if info.type == pafs.FileType.File]
    if files:
        raise ValueError(f"ledger location {files[0]} is a file; allowed: a folder of cell files "
                         "(<results>/<experiment>/ledger/<cell_id>.parquet): move the file away")
    return sorted(name for name, info in kinds.items() if info.type == pafs.FileType.Directory)


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


def read_ledger(results: str, experiment: str | None = None, *, quarantine: bool = False,
                columns: list[str] | None = None, metrics: list[str] | None = None,
                shared: tuple[str, ...] = ()) -> pd.DataFrame:
    """All rows of one experiment (or of every experiment under ``results``) as a DataFrame: compacted parts
    and per-cell files alike (:func:`ledger_files`), read by DuckDB with only ``columns`` and ``metrics``.

    Read-only by default: a file whose schema casts to :data:`LEDGER_SCHEMA` is read (extra columns,
    ``large_string``, a renamed copy); one that cannot be read (truncated, not Parquet, a missing or
    mistyped column, no rows, every metric NaN) is skipped with a warning and left where it is.
    ``quarantine=True`` moves it to ``<experiment>/quarantine/`` instead, so its cell runs again. Rows are
    unique by (experiment, cell, metric), in the order of a per-file read. ``df.attrs["results"]`` holds
    ``results``, so a report layout that reads masks or states next to the ledger can find them.

    Args:
        columns: the ledger columns to read (None: all of :data:`LEDGER_SCHEMA`, in its order); the others
            are not read. :data:`SETTING_ID` may be one: files without it get it from their ``config_json``
            (then read from those files alone), so a table can group by setting without the configs.
        metrics: only the rows of these metrics (None: all); the filter is pushed into the scan.
        shared: columns of :data:`META_COLUMNS` (or :data:`SETTING_ID`) to read once per cell file rather than once per row (a
            cell's rows share them); ``config_json`` among them comes back as a pandas categorical (the generic
            table reads so: at 10,000 cells the per-row copies of the config took most of its time and memory).

    Raises:
        ValueError: ``experiment`` is not a plain name
            (:func:`orchestrator.results.layout.check_experiment_name`), or an unknown column.
        OSError: the storage cannot be read.
    """
    names = [check_experiment_name(experiment)] if experiment else list_experiments(results)
    columns = list(columns or LEDGER_SCHEMA.names)
    unknown = [c for c in columns if c not in FULL_SCHEMA.names]
    if unknown:
        raise ValueError(f"ledger column(s) {', '.join(unknown)} not known; allowed: {', '.join(FULL_SCHEMA.names)}")
    allowed_shared = (*META_COLUMNS, SETTING_ID)
    if not set(shared) <= set(allowed_shared):
        raise ValueError(f"shared column(s) {', '.join(sorted(set(shared) - set(allowed_shared)))}; allowed: "
                         f"{', '.join(allowed_shared)}")
    table = FULL_SCHEMA.empty_table().select(columns)
    for attempt in range(3):
        sets = [ledger_files(ExperimentLayout.of(results, name)) for name in names]
        if not any(f.paths for f in sets):
            break
        try:
            table = _scan([f for f in sets if f.paths], columns, metrics, quarantine, tuple(shared))[0]
            break
        except FileNotFoundError:  # a compaction swapped files between the listing and the scan: list again
            if attempt == 2:
                raise
    df = table.to_pandas()
    keys = [c for c in ("experiment", "cell_id", "metric") if c in df.columns]
    if len(df) and len(keys) == 3:
        df = df.drop_duplicates(keys, keep="first").reset_index(drop=True)
    df.attrs["results"] = str(results)
    return df


SETTING_KEYS = ("experiment", "method", "backbone", "dataset", "grid_json", SETTING_ID)
"""The columns :func:`setting_stats` groups by (with ``metric``): a table row's setting, before any split."""


def setting_stats(results: str, experiment: str | None, metrics: list[str]) -> pa.Table | None:
    """Per-setting statistics of the ledger's metrics, aggregated inside DuckDB in one scan (issue 27): the rows
    that come back grow with the settings a table shows, not with the cells it reads.

    One row per (:data:`SETTING_KEYS`, ``metric``) of ``metrics``: ``n_rows`` (rows), ``n`` (values that are not
    NaN), ``mean``, ``std`` (sample std, NaN below two values), ``lo`` / ``hi`` (min / max), ``first_cell`` (the
    smallest cell id) and ``cells_hash`` (a fingerprint of the set of cells, to tell whether two metrics of a
    setting come from the same cells). NaN values are left out of ``n``, ``mean`` and ``std``, as pandas does.

    Only an ordinary ledger is aggregated; None asks the caller for the per-cell read (:func:`read_ledger`),
    which handles the rest: no files; files not on the local disk (an object store: the scan there goes through
    ``pyarrow.dataset`` anyway); a file without :data:`SETTING_ID` (written before it), unreadable or of another
    type (the strict scan fails); a row of another cell than the file's name (a renamed copy); a metric twice
    for one cell; a per-cell file whose rows hold no number and whose footer says it cannot be read (the per-cell
    read skips it with a warning). Not detected (neither ``write_cell`` nor a compaction writes them): cells whose
    rows disagree on their per-cell columns (each row counts in its own setting), a cell twice in a compacted part.

    The checks cost no per-cell state in DuckDB beyond two bitmaps of the files per group (``bitstring_agg``) and a
    sum of cell id hashes (:func:`_cells_are_their_files`): a set of distinct cells per setting (``count(DISTINCT
    ...)``) took 27 MB at 10,000 cells, and comparing each row's cell id with its file's name 0.2 s.

    Raises:
        ValueError: ``experiment`` is not a plain name.
        OSError: the storage cannot be listed.
    """
    import duckdb  # for its error type (loaded by _connect anyway)

    names = [check_experiment_name(experiment)] if experiment else None
    if not isinstance(filesystem(results)[0], pafs.LocalFileSystem):  # before any listing: no request spent there
        return None
    sets = [f for f in (ledger_files(ExperimentLayout.of(results, n)) for n in names or list_experiments(results))
            if f.paths]
    if not sets:
        return None
    parts = [p for f in sets for p in sorted(f.parts)]
    named = {p: c for f in sets for c, p in sorted(f.cell_files.items(), key=lambda kv: kv[1])}
    paths, first = parts + list(named), len(parts)  # a cell file is a row's file_index >= first
    where, _ = _metric_filter(metrics)
    keys_ = ", ".join(f'"{k}"' for k in SETTING_KEYS)
    bits = f"bitstring_agg(i, 0, {len(paths) - 1})"
    con = _connect()
    try:
        stats = con.sql(
            f"SELECT {keys_}, metric, count(*) AS n_rows, count(v) AS n, avg(v) AS mean, stddev_samp(v) AS std, "
            "min(v) AS lo, max(v) AS hi, min(cell_id) AS first_cell, sum(hash(cell_id)::HUGEINT)::VARCHAR AS cells_hash, "
            f"count(*) FILTER (WHERE i >= {first}) AS own_rows, {bits} FILTER (WHERE i >= {first})::VARCHAR AS own_files, "
            f"sum(hash(cell_id)::HUGEINT) FILTER (WHERE i >= {first}) % 18446744073709551616 AS own_hash, "
            f"{bits} FILTER (WHERE v IS NOT NULL)::VARCHAR AS numbered "
            f"FROM (SELECT {keys_}, metric, cell_id, file_index::BIGINT AS i, "
            'CASE WHEN isnan("value") THEN NULL ELSE CAST("value" AS DOUBLE) END AS v '
            f"FROM read_parquet($paths) {where}) GROUP BY ALL", params={"paths": paths}).to_arrow_table()
        name_hash = np.array(con.sql("SELECT list_transform($n::VARCHAR[], lambda c: hash(c))",
                                     params={"n": list(named.values())}).fetchall()[0][0] or [], np.uint64)
    except (duckdb.Error, pa.ArrowException, OSError):  # an old schema, a bad or vanished file: the per-cell read
        return None
    finally:
        con.close()
    if stats.num_rows == 0:
        return stats
    if stats.column(SETTING_ID).null_count or not _cells_are_their_files(stats, name_hash, first):
        return None
    numbered = np.zeros(len(paths), bool)
    for row in stats.column("numbered").drop_null().to_pylist():
        numbered |= np.frombuffer(row.encode(), np.uint8) == ord("1")
    fs = sets[0].layout.fs
    suspects = [p for i, p in enumerate(paths) if i >= first and not numbered[i]]
    if any(footer_problem(fs, p) for p in suspects):
        return None
    return stats.drop_columns(["own_rows", "own_files", "own_hash", "numbered"])


def _cells_are_their_files(stats: pa.Table, name_hash: np.ndarray, first: int) -> bool:
    """Whether, in every group of :func:`setting_stats`, the rows from cell files (file index >= ``first``) are one
    per file (a metric never twice in a file) and hold the cells the files are named after: the sum of the rows'
    cell id hashes equals that of the names of the files in the group's bitmap (``name_hash``: DuckDB's ``hash`` of
    each cell file's name, in file order), modulo 2**64. A renamed copy of a cell file fails it."""
    for rows, files, total in zip(stats.column("own_rows").to_pylist(), stats.column("own_files").to_pylist(),
                                  stats.column("own_hash").to_pylist()):
        if not rows:
            continue
        held = np.flatnonzero(np.frombuffer(files.encode(), np.uint8)[first:] == ord("1"))
        if len(held) != rows or int(name_hash[held].sum(dtype=np.uint64)) != int(total):
            return False
    return True


def metric_names(results: str, experiment: str | None = None) -> list[str]:
    """The metrics the ledger holds (sorted), e.g. to name the allowed ones when a table asks for another."""
    df = read_ledger(results, experiment, columns=["experiment", "cell_id", "metric"])
    return sorted(df["metric"].unique())


def cell_metric(results: str, experiment: str, metric: str) -> dict[str, float]:
    """``{cell_id: value}`` of one metric over the experiment's cells (e.g. ``density`` for top-k at
    the found density)."""
    df = read_ledger(results, experiment, columns=["cell_id", "experiment", "metric", "value"], metrics=[metric])
    return dict(zip(df["cell_id"], df["value"].astype(float)))


def cell_configs(results: str, cells: dict[str, list[str]]) -> dict[tuple[str, str], str]:
    """``{(experiment, cell_id): config_json}`` of a few cells (``cells``: ``{experiment: cell ids}``), reading
    ``config_json`` from their own files or, for compacted cells, the parts that hold them (filtered on the cell
    id in the scan); a table that groups by :data:`SETTING_ID` asks for one cell's config per setting only where
    a group holds several settings, to name the keys that differ. A cell not in the ledger is left out.

    Raises:
        OSError: the storage cannot be read.
    """
    out: dict[tuple[str, str], str] = {}
    for experiment, wanted in cells.items():
        wanted = sorted(set(wanted))
        for attempt in range(3):
            files = ledger_files(ExperimentLayout.of(results, check_experiment_name(experiment)))
            paths = sorted({files.cell_files[c] for c in wanted if c in files.cell_files}
                           | {p for p, ids in files.parts.items() if set(ids) & set(wanted)})
            if not paths:
                break
            con = _connect()
            try:
                _source(con, files.layout.fs, paths, ["cell_id", "config_json"]).create_view("src", replace=True)
                rows = con.sql("SELECT cell_id, any_value(config_json) FROM src WHERE cell_id IN "
                               "(SELECT unnest($ids::VARCHAR[])) GROUP BY cell_id", params={"ids": wanted}).fetchall()
                out.update({(experiment, c): cfg for c, cfg in rows})
                break
            except FileNotFoundError:  # a compaction swapped files meanwhile: list again
                if attempt == 2:
                    raise
            finally:
                con.close()
    return out


def completed_cells(results: str, experiment: str) -> set[str]:
    """Ids of the cells the ledger holds, from file names and the compacted index (no row is read); called
    before a run, so a per-cell file whose footer says it cannot be read (:func:`footer_problem`) is moved
    to ``<experiment>/quarantine/`` and its cell runs again.

    Raises:
        OSError: the storage cannot be read.
    """
    files = ledger_files(ExperimentLayout.of(results, check_experiment_name(experiment)))
    fs = files.layout.fs
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        problems = dict(zip(files.cell_files, pool.map(lambda p: _footer_or_gone(fs, p), files.cell_files.values())))
    for cell, reason in problems.items():
        if reason == _GONE:  # compacted meanwhile: the index has it now
            continue
        if reason:
            _quarantine(files.layout, files.cell_files[cell], ValueError(reason))
    gone = any(r == _GONE for r in problems.values())
    done = (ledger_files(files.layout).cells if gone else files.cells)
    return done - {c for c, r in problems.items() if r and r != _GONE}


_GONE = "\0gone"


def _footer_or_gone(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        return footer_problem(fs, path)
    except FileNotFoundError:
        return _GONE


def read_cell(layout: ExperimentLayout, cell_id: str) -> dict[str, float] | None:
    """One cell's ``{metric: value}``, reading its own ledger file, or its rows in the compacted part that
    holds it (:func:`read_manifest`); None when the cell has not landed.

    A file that exists but cannot be read as this cell's rows also gives None (the cell runs again and
    its rewrite replaces the file; a full :func:`read_ledger` quarantines such files).

    Raises:
        OSError: if the storage itself cannot be reached.
    """
    fs, path = layout.fs, layout.ledger_file(cell_id)
    filters = None
    if fs.get_file_info(path).type != pafs.FileType.File:
        part = next((name for name, ids in read_manifest(layout).items() if cell_id in ids), None)
        if part is None:
            return None
        path, filters = layout.compacted(part), [("cell_id", "=", cell_id)]
    try:
        t = pq.read_table(path, filesystem=fs, columns=["cell_id", "metric", "value"], filters=filters)
    except FileNotFoundError:
        return read_cell(layout, cell_id) if filters is None else None  # swapped by a compaction meanwhile
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
        return type(df)()  # an empty DataFrame, without importing pandas here
    values = df.pivot_table(index="cell_id", columns="metric", values="value", aggfunc="first")
    values.columns.name = None
    meta = df.groupby("cell_id")[[c for c in META_COLUMNS if c in df.columns]].first()
    return meta.join(values).reset_index()
