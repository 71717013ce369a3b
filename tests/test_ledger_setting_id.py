"""The ledger's per-cell ``setting_id`` column (issue 27): written by ``write_cell``, kept by compaction, read by
``smn table`` instead of the kilobytes of ``config_json``; ledgers written before it (the committed ones under
``docs/results``), ledgers with it, and ledgers mixing both print the same tables, compacted or not.

The ledgers are the committed real ones; the "new" copies get the column as ``write_cell`` writes it now (the
setting id of the file's own ``config_json``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli.app import main as smn_main
from orchestrator.cli.commands import read
from orchestrator.reports import tables
from orchestrator.results import compact, ledger
from orchestrator.spec.keys import config_hash, setting_id

from .conftest import REPO

pytestmark = pytest.mark.unit

COMMITTED = REPO / "docs" / "results"
EXPERIMENTS = ("demo", "table3_small")


def _with_id(path: Path) -> None:
    """Give a cell file the setting id column, as ``write_cell`` writes it."""
    t = pq.read_table(path)
    sid = setting_id(t.column("config_json")[0].as_py())
    pq.write_table(t.add_column(ledger.FULL_SCHEMA.get_field_index(ledger.SETTING_ID), ledger.SETTING_ID,
                                pa.array([sid] * t.num_rows, pa.string())), path)


def _pooled_cell(folder: Path) -> None:
    """Add a copy of an SMN cell of ``folder`` that ran with ``train.epochs: 1`` under its own id (another
    setting in the same group: the table must split it, naming ``epochs``), without the setting id column."""
    src = next(f for f in sorted(folder.glob("*.parquet"))
               if pq.read_table(f, columns=["method"])["method"][0].as_py() == "smn")
    rows = pq.read_table(src).drop_columns([c for c in [ledger.SETTING_ID] if c in pq.read_schema(src).names])
    config = json.loads(rows.column("config_json")[0].as_py())
    config["train"]["epochs"] = 1
    cid = config_hash(config)
    for name, value in (("config_json", json.dumps(config, sort_keys=True)), ("cell_id", cid)):
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array([value] * rows.num_rows, pa.string()))
    pq.write_table(rows, folder / f"{cid}.parquet")


def _results(root: Path, schema: str) -> Path:
    """A results folder with the committed ledgers of :data:`EXPERIMENTS` and one pooled cell; ``schema``: ``old``
    (no file has the id), ``new`` (every file), ``first-new`` / ``first-old`` (every other file, the first file
    DuckDB binds to having it or not)."""
    for name in EXPERIMENTS:
        shutil.copytree(COMMITTED / name / "ledger", root / name / "ledger")
    _pooled_cell(root / "demo" / "ledger")
    for name in EXPERIMENTS:
        for i, f in enumerate(sorted((root / name / "ledger").glob("*.parquet"))):
            if schema == "new" or (schema == "first-new" and i % 2 == 0) or (schema == "first-old" and i % 2 == 1):
                _with_id(f)
    return root


def _tables(results: Path, capsys) -> list[str]:
    out = []
    for argv in (["table", str(results)], ["table", str(results), "--format", "csv"],
                 ["table", str(results), "--where", "train.epochs=1"]):
        assert smn_main(argv) == 0, argv
        out.append(capsys.readouterr().out)
    return out


def test_old_new_and_mixed_ledgers_print_the_same_tables_compacted_or_not(tmp_path, capsys):
    want = _tables(_results(tmp_path / "old", "old"), capsys)
    assert "epochs=1" in want[0] and "(no cell matches" not in want[2]  # the pooled cell is split and selectable
    for schema in ("first-new", "first-old"):  # every file with the column: the compacted ledger below
        results = _results(tmp_path / schema, schema)
        assert _tables(results, capsys) == want, schema
    compact.compact_all(str(tmp_path / "first-old"), echo=lambda line: None)  # old and new cells into one part
    part = next((tmp_path / "first-old" / "demo" / "ledger" / "_compacted").glob("part-*.parquet"))
    t = pq.read_table(part, columns=["config_json", ledger.SETTING_ID])
    assert t.column(ledger.SETTING_ID).null_count == 0
    assert t.column(ledger.SETTING_ID).to_pylist() == [setting_id(c) for c in t.column("config_json").to_pylist()]
    assert _tables(tmp_path / "first-old", capsys) == want  # one strict scan; the split reads two configs from the part


@pytest.mark.parametrize("schema", ["old", "first-new", "first-old"])
def test_the_setting_id_is_read_or_derived_for_every_row(tmp_path, schema):
    results = _results(tmp_path, schema)
    df = ledger.read_ledger(str(results), "demo", columns=["cell_id", "config_json", ledger.SETTING_ID],
                            shared=("config_json", ledger.SETTING_ID))
    assert len(df) and df[ledger.SETTING_ID].notna().all()
    assert list(df[ledger.SETTING_ID]) == [setting_id(str(c)) for c in df["config_json"]]
    no_config = ledger.read_ledger(str(results), "demo", columns=["cell_id", ledger.SETTING_ID], metrics=["knn_top1"])
    assert dict(zip(no_config["cell_id"], no_config[ledger.SETTING_ID])) == \
        dict(zip(df["cell_id"], df[ledger.SETTING_ID]))


def test_a_mistyped_setting_id_is_a_schema_problem():
    schema = ledger.FULL_SCHEMA.set(ledger.FULL_SCHEMA.get_field_index(ledger.SETTING_ID),
                                    pa.field(ledger.SETTING_ID, pa.float64()))
    assert "setting_id" in ledger.schema_problem(schema)
    assert ledger.schema_problem(ledger.LEDGER_SCHEMA) is None and ledger.schema_problem(ledger.FULL_SCHEMA) is None


def test_the_table_command_chooses_the_default_metrics_of_the_table():
    assert read.DEFAULT_METRICS == tables.DEFAULT_METRICS
