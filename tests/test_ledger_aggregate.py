"""``smn table`` from per-setting statistics aggregated inside DuckDB (issue 27: the memory of a read grows with the
rows a table shows, not with the files it reads): the aggregated path prints the same Markdown and LaTeX tables as
the per-cell read for every committed ledger, and falls back to that read where it cannot (ledgers written before
the ``setting_id`` column, a renamed copy of a cell file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli.commands import read
from orchestrator.results import ledger
from orchestrator.spec.keys import setting_id

from .conftest import REPO

pytestmark = pytest.mark.unit

COMMITTED = REPO / "docs" / "results"


@pytest.fixture(scope="module")
def new_schema(tmp_path_factory) -> Path:
    """Every committed ledger, each file given the setting id as ``write_cell`` writes it now."""
    root = tmp_path_factory.mktemp("new")
    for name in ledger.list_experiments(str(COMMITTED)):
        shutil.copytree(COMMITTED / name / "ledger", root / name / "ledger")
    for f in root.glob("*/ledger/*.parquet"):
        t = pq.read_table(f)
        sid = setting_id(t.column("config_json")[0].as_py())
        pq.write_table(t.add_column(ledger.FULL_SCHEMA.get_field_index(ledger.SETTING_ID), ledger.SETTING_ID,
                                    pa.array([sid] * t.num_rows, pa.string())), f)
    return root


def _per_cell(monkeypatch, *args) -> str:
    with monkeypatch.context() as m:
        m.setattr(read, "_aggregated", lambda *a, **k: None)
        return read.table_text(*args)


@pytest.mark.parametrize("experiment, fmt, metrics", [(None, "markdown", None),
                                                      (None, "latex", "knn_top1,density,collapsed,wall_s")])
def test_the_aggregated_table_is_the_per_cell_table(new_schema, monkeypatch, experiment, fmt, metrics):
    """Every committed experiment at once: splits of several settings, the frozen backbone's infinite storage
    ratio, one seed and three, NaN metrics, a cell id held by two experiments (one experiment alone: below)."""
    results = str(new_schema)
    assert read._aggregated(results, experiment, metrics) is not None  # the aggregated path, no fallback
    chosen = ["knn_top1", "storage_bits", "backbone_params"]
    stats = ledger.setting_stats(results, experiment, chosen)
    rows = ledger.read_ledger(results, experiment, columns=["cell_id", "experiment", "metric", "value"], metrics=chosen)
    assert sum(stats.column("n_rows").to_pylist()) == len(rows)  # every row counted once, one row per setting back
    assert set(stats.column("metric").to_pylist()) == set(rows["metric"])
    got = read.table_text(results, experiment, fmt, metrics)
    assert got == _per_cell(monkeypatch, results, experiment, fmt, metrics)
    assert metrics or experiment or "∞ (no storage)" in got or "infty" in got  # the frozen backbone stores nothing


def test_old_schema_and_odd_files_fall_back_to_the_per_cell_read(new_schema, monkeypatch, tmp_path):
    old = str(COMMITTED)  # the committed ledgers: written before setting_id
    assert ledger.setting_stats(old, "demo", ["knn_top1"]) is None
    assert read.table_text(old, "demo", "markdown", None) == read.table_text(str(new_schema), "demo", "markdown", None)
    copy = tmp_path / "copy"
    shutil.copytree(new_schema / "demo", copy / "demo")
    first = sorted((copy / "demo" / "ledger").glob("*.parquet"))[0]
    shutil.copy2(first, first.with_name("0" * 16 + ".parquet"))  # a renamed copy: its rows name another cell
    assert ledger.setting_stats(str(copy), "demo", ["knn_top1"]) is None
    assert read.table_text(str(copy), "demo", "markdown", None) == _per_cell(monkeypatch, str(copy), "demo",
                                                                             "markdown", None)
    first.with_name("0" * 16 + ".parquet").unlink()
    assert ledger.setting_stats(str(copy), "demo", ["knn_top1"]) is not None
    t = pq.read_table(first)  # every value NaN: the footer check finds it, the per-cell read skips it and says so
    pq.write_table(t.set_column(t.schema.get_field_index("value"), "value", pa.array([float("nan")] * t.num_rows)), first)
    assert ledger.setting_stats(str(copy), "demo", ["knn_top1"]) is None
    with pytest.warns(RuntimeWarning, match="unreadable"):
        got = read.table_text(str(copy), "demo", "markdown", None)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert got == _per_cell(monkeypatch, str(copy), "demo", "markdown", None)
