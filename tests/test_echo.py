"""One flushing echo: every progress function's default output reaches a pipe when it is said."""

from __future__ import annotations

import inspect
import io
import sys

import pytest

import orchestrator

pytestmark = pytest.mark.unit


def test_echo_flushes_each_line(monkeypatch):
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", line_buffering=False, write_through=False)  # a pipe's buffering
    monkeypatch.setattr(sys, "stdout", out)
    orchestrator.echo("[1/9 cells done, 4s] abc")
    assert raw.getvalue() == b"[1/9 cells done, 4s] abc\n"  # no flush of ours: echo's own


def test_every_progress_function_defaults_to_it():
    from orchestrator.cli import report
    from orchestrator.engine import cascade, plain, prepare, sweep
    from orchestrator.reports import tracking
    from orchestrator.results import compact

    functions = [plain.run_experiment, plain.ensure_ray, sweep.run_sweep, cascade.run_cascade,
                 prepare.prepare_pipeline_weights, compact.compact_all, tracking.sync, report.track]
    for fn in functions:
        assert inspect.signature(fn).parameters["echo"].default is orchestrator.echo, fn.__qualname__


def test_a_cells_rows_carry_its_ray_job(tmp_path):
    """``ray_job_id`` / ``ray_submission_id`` are extra string columns of a cell's file; the ledger's readers
    (and compaction) read the rows as before."""
    import pyarrow.parquet as pq

    from orchestrator.results import ledger

    path = ledger.write_cell(str(tmp_path), "e", cell_id="0" * 16, method="smn", backbone="b", dataset="digits",
                             seed=0, grid={}, config={}, metrics={"knn_top1": 0.5, "wall_s": 1.0}, started_at=0.0,
                             finished_at=1.0, extra_columns={"ray_job_id": "02000000", "ray_submission_id": "smn-1"})
    table = pq.read_table(path)
    assert set(table.column("ray_job_id").to_pylist()) == {"02000000"}
    assert set(table.column("ray_submission_id").to_pylist()) == {"smn-1"}
    assert ledger.read_cell(ledger.ExperimentLayout.of(str(tmp_path), "e"), "0" * 16) == {"knn_top1": 0.5, "wall_s": 1.0}
