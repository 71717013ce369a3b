"""The Parquet ledger and tables (orchestrator.results.ledger, orchestrator.reports.tables) on real files."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from orchestrator.results import ledger
from orchestrator.reports import tables
from orchestrator.spec.keys import setting_id

pytestmark = pytest.mark.unit


def _write(results, cell_id, seed=0, method="smn", knn=0.5, experiment="exp"):
    now = time.time()
    return ledger.write_cell(str(results), experiment, cell_id=cell_id, method=method, backbone="cifar_resnet8",
                             dataset="digits", seed=seed, grid={"train.swav.num_prototypes": 50},
                             config={"seed": seed}, metrics={"knn_top1": knn, "density": 0.9},
                             started_at=now - 1, finished_at=now)


def test_write_and_read_long_format(tmp_path):
    path = _write(tmp_path, "aaaa", knn=0.7)
    t = pq.read_table(path)
    assert t.schema.equals(ledger.FULL_SCHEMA, check_metadata=False)
    assert set(t.column("setting_id").to_pylist()) == {setting_id(t.column("config_json")[0].as_py())}
    df = ledger.read_ledger(str(tmp_path), "exp")
    assert sorted(df["metric"]) == ["density", "knn_top1"]
    assert df.loc[df["metric"] == "knn_top1", "value"].item() == pytest.approx(0.7)
    assert ledger.completed_cells(str(tmp_path), "exp") == {"aaaa"}
    assert ledger.list_experiments(str(tmp_path)) == ["exp"]
    assert not list((tmp_path / "exp" / "ledger").glob(".*tmp"))  # no temporary file left behind


def test_corrupted_and_truncated_files_are_quarantined(tmp_path):
    _write(tmp_path, "good")
    bad = _write(tmp_path, "bad")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])  # truncated
    junk = tmp_path / "exp" / "ledger" / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        done = ledger.completed_cells(str(tmp_path), "exp")
    assert done == {"good"}
    quarantined = sorted(p.name.split(".")[0] for p in (tmp_path / "exp" / "quarantine").iterdir())
    assert quarantined == ["bad", "junk"]
    assert (tmp_path / "exp" / "ledger" / "good.parquet").exists()


def test_table_mean_std_over_seeds_and_formats(tmp_path):
    for seed, knn in [(0, 0.5), (1, 0.7)]:
        _write(tmp_path, f"s{seed}", seed=seed, knn=knn)
    _write(tmp_path, "p0", method="pretrained", knn=0.4)
    df = ledger.read_ledger(str(tmp_path))
    wide = tables.results_table(df)
    smn = wide.xs("smn", level="method").iloc[0]
    assert smn[("knn_top1", "mean")] == pytest.approx(0.6)
    assert smn[("knn_top1", "std")] == pytest.approx(0.1414213, rel=1e-5)
    md = tables.render(wide, "markdown")
    assert "0.600 ± 0.141" in md and "0.400" in md
    assert r"\begin{tabular}" in tables.render(wide, "latex")
    assert "knn_top1_mean" in tables.render(wide, "csv")
    with pytest.raises(ValueError, match="allowed: markdown, latex, csv"):
        tables.render(wide, "html")
    assert "no results" in tables.render(tables.results_table(ledger.read_ledger(str(tmp_path / "none"))))


def _dry_run_json(capsys, results) -> dict:
    import json

    from orchestrator.cli.app import main

    assert main(["run", "experiments/demo.yaml", "--dry-run", "--json", "--results", str(results)]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_marks_done_cells_and_cached_pretraining(tmp_path, capsys, monkeypatch):
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    fresh = _dry_run_json(capsys, tmp_path / "fresh")
    assert len(fresh["to_run"]) == 9 and fresh["done"] == [] and fresh["pretraining"]["cached"] is False
    assert len(fresh["waiting"]) == 6  # the random-mask controls: after their SMN cell
    parts = fresh["estimate"]
    assert {"ray_startup_s", "pretraining_s", "training_s", "evaluation_s"} <= set(parts)
    assert all(parts[k] > 0 for k in ("ray_startup_s", "pretraining_s", "training_s", "evaluation_s"))
    assert parts["total_s"] == pytest.approx(sum(parts[k] for k in ("ray_startup_s", "pretraining_s", "training_s",
                                                                    "evaluation_s")), abs=0.2)
    from .conftest import demo_cell_files

    shutil.copytree(repo / "docs" / "results" / "demo", tmp_path / "done" / "demo")
    finished = _dry_run_json(capsys, tmp_path / "done")
    assert len(finished["done"]) == 15 and finished["to_run"] == finished["waiting"] == []
    assert finished["estimate"]["total_s"] == 0
    # half done, pretraining cached: only the rest and no pretraining in the estimate; a control of a landed SMN
    # cell is to run now, one of an SMN cell still to run waits
    import pyarrow.parquet as pq

    ledger_dir = tmp_path / "done" / "demo" / "ledger"
    for f in set(demo_cell_files(controls=True)) - set(demo_cell_files()):
        (ledger_dir / f.name).unlink()
    for f in demo_cell_files()[:4]:
        (ledger_dir / f.name).unlink()
    smn_left = sum(pq.read_table(f, columns=["method"])["method"][0].as_py() == "smn" for f in demo_cell_files()[4:])
    artifact = Path(finished["pretraining"]["artifacts"][0])
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"cached")
    half = _dry_run_json(capsys, tmp_path / "done")
    assert len(half["to_run"]) == 4 + 2 * smn_left and len(half["done"]) == 5 and half["pretraining"]["cached"] is True
    assert len(half["waiting"]) == 2 * (3 - smn_left)
    assert half["estimate"]["pretraining_s"] == 0 and 0 < half["estimate"]["training_s"] + half["estimate"][
        "evaluation_s"] < parts["training_s"] + parts["evaluation_s"]
