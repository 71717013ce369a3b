"""A row is a setting, and every JSON output is strict JSON (issue 25).

The pooling scenario of the issue, built cheaply: the committed demo ledger (``docs/results/demo/``, 3 seeds of
the frozen backbone, the BN control and SMN at ``train.epochs: 8``) plus a copy of SMN's seed-0 cell whose
config says ``train.epochs: 1`` under its own cell id, as ``smn run experiments/demo.yaml train.epochs=1
'seeds=[0]'`` into the same results folder would land it (the frozen cells have no ``train`` section, so that
run skips them). Every reader must then show two SMN rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli.app import main
from orchestrator.reports import registry, settings, tables
from orchestrator.results import ledger
from orchestrator.spec.keys import config_hash

from .conftest import REPO, demo_cell_files

pytestmark = pytest.mark.unit

DEMO = REPO / "docs" / "results" / "demo" / "ledger"
EPOCHS1_KNN = 0.5  # the extra cell's k-NN: far from the 8-epoch mean, so pooling would show


def _raise(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str):
    """``json.loads`` that refuses NaN / Infinity, as JavaScript's JSON.parse does."""
    return json.loads(text, parse_constant=_raise)


def _pooled_results(root: Path) -> Path:
    """The scenario's results folder (see the module docstring); returns it."""
    dst = root / "demo" / "ledger"
    dst.mkdir(parents=True)
    for f in demo_cell_files():  # the 9 cells of frozen, BN control and SMN
        shutil.copyfile(f, dst / f.name)
    for f in demo_cell_files():
        rows = pq.read_table(f).to_pandas()
        if rows["method"].iloc[0] != "smn" or int(rows["seed"].iloc[0]) != 0:
            continue
        config = json.loads(rows["config_json"].iloc[0])
        config["train"]["epochs"] = 1
        cid = config_hash(config)
        rows["config_json"], rows["cell_id"] = json.dumps(config, sort_keys=True), cid
        rows.loc[rows["metric"] == "knn_top1", "value"] = EPOCHS1_KNN
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), dst / f"{cid}.parquet")
    return root


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> Path:
    return _pooled_results(tmp_path_factory.mktemp("pooled"))


def _smn_rows(records: list[dict]) -> list[dict]:
    return [r for r in records if r["method"] == "smn"]


def test_setting_id_ignores_the_seed_only():
    rows = ledger.read_ledger(str(DEMO.parents[1]), "demo")
    cells = rows.drop_duplicates("cell_id")
    ids = {m: {settings.setting_id(c) for c in g["config_json"]} for m, g in cells.groupby("method")}
    assert all(len(v) == 1 for v in ids.values()), ids  # 3 seeds, one setting per method
    assert len(set().union(*ids.values())) == len(ids)  # and one per method
    config = json.loads(cells[cells["method"] == "smn"]["config_json"].iloc[0])
    stripped = json.loads(json.dumps(config))
    del stripped["seed"], stripped["train"]["seed"]
    assert settings.setting_id(json.dumps(config)) == config_hash(stripped)
    config["train"]["epochs"] = 1
    assert settings.setting_id(json.dumps(config)) not in ids["smn"]


def test_the_pooling_scenario_gives_two_rows_in_the_table(pooled, capsys):
    assert main(["table", str(pooled), "--format", "json"]) == 0
    smn = _smn_rows(strict_loads(capsys.readouterr().out))
    assert sorted((r["setting"], r["knn_top1_n"]) for r in smn) == [("epochs=1", 1), ("epochs=8", 3)]
    assert all(isinstance(r["knn_top1_n"], int) for r in smn)
    one = next(r for r in smn if r["setting"] == "epochs=1")
    assert one["knn_top1_mean"] == pytest.approx(EPOCHS1_KNN) and one["knn_top1_ci_lo"] is None
    eight = next(r for r in smn if r["setting"] == "epochs=8")
    assert eight["knn_top1_ci_lo"] < eight["knn_top1_mean"] < eight["knn_top1_ci_hi"]
    assert main(["table", str(pooled)]) == 0
    md = capsys.readouterr().out
    assert md.count("| smn ") == 2 and "they differ in train.epochs" in md and "seeds 6" not in md


def test_every_layout_keeps_the_settings_apart(pooled):
    rows = ledger.read_ledger(str(pooled), "demo")
    known = registry.tables()
    for name in ("table1", "table2", "table5a", "vs_frozen", "results"):
        text = registry.render_frame(known[name].build(rows), "markdown")
        assert "epochs=1" in text and "epochs=8" in text, name
        assert "Note: smn (demo" in text, name
    vs = known["vs_frozen"].build(rows).reset_index()
    assert sorted(m for m in vs["Method"] if m.startswith("smn")) == ["smn (epochs=1)", "smn (epochs=8)"]


def test_where_selects_cells_by_their_config(pooled, capsys):
    assert main(["table", str(pooled), "--format", "json", "--where", "train.epochs=8"]) == 0
    (row,) = strict_loads(capsys.readouterr().out)  # the frozen cells have no train.epochs
    assert row["method"] == "smn" and row["knn_top1_n"] == 3 and "setting" not in row
    assert main(["table", str(pooled), "--format", "json", "--where", "method=pretrained", "--where", "seed=1"]) == 0
    (row,) = strict_loads(capsys.readouterr().out)
    assert row["method"] == "pretrained" and row["knn_top1_n"] == 1
    assert main(["table", str(pooled), "--where", "train.epochs=3"]) == 0
    assert "no cell matches --where train.epochs=3" in capsys.readouterr().out
    for bad, said in (("train.epoch=8", "'train.epoch' is in no cell's config"), ("epochs", "is not KEY=VALUE")):
        assert main(["table", str(pooled), "--where", bad]) == 2
        assert said in capsys.readouterr().err


def test_the_report_shows_both_settings_what_ran_and_each_seed(pooled, tmp_path):
    assert main(["report", str(pooled), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    results = md.split("### All results")[1].split("###")[0]
    assert results.count("| smn ") == 2
    what_ran = md.split("### What ran")[1].split("###")[0]
    assert "train.epochs=1" in what_ran and "train.epochs=8" in what_ran and "train.score_lr=10.0" in what_ran
    per_seed = md.split("### Each setting's mean")[1].split("###")[0]
    assert per_seed.count("| mean of 3 ") == 3 and per_seed.count("| mean of 1 ") == 1
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "epochs=1" in page and 'id="scorecard"' in page
    assert "## Scorecard: the paper's claims" in md and "| SMN beats the frozen backbone on k-NN " in md


def test_smn_run_json_summary_is_strict_and_per_setting(pooled, capsys):
    from orchestrator.cli.report import finish_run

    args = SimpleNamespace(json=True, quiet=False, track=None, results=str(pooled))
    finish_run(args, SimpleNamespace(name="demo", tracking=None), {"total": 10, "ran": 1, "skipped": 9, "failed": {}},
               0.0, "")
    obj = strict_loads(capsys.readouterr().out)
    assert len(_smn_rows(obj["table"])) == 2 and "train.epochs" in obj["note"]
    frozen = next(r for r in obj["table"] if r["method"] == "pretrained")
    assert frozen["x_smaller_than_fft_mean"] is None and "x_smaller_than_fft_mean: infinite" in frozen["note"]
    assert frozen["knn_top1_n"] == 3 and isinstance(frozen["knn_top1_n"], int)


def test_every_json_output_parses_strictly(pooled, capsys):
    for name in registry.tables():
        main(["table", str(pooled), "--format", "json", "--layout", name])
        out = capsys.readouterr().out
        if out.startswith("("):  # a layout these cells do not support
            continue
        assert isinstance(strict_loads(out), list), name
    assert main(["ls", str(pooled), "--json"]) == 0
    (exp,) = strict_loads(capsys.readouterr().out)
    assert exp["done"] == 10 and isinstance(exp["done"], int)
    assert main(["run", str(REPO / "experiments" / "demo.yaml"), "--dry-run", "--json", "--results",
                 str(pooled.parent / "fresh")]) == 0
    plan = strict_loads(capsys.readouterr().out)
    smn = [c for c in plan["to_run"] if c["method"] == "smn"]
    assert len(smn) == 3 and len({c["setting"] for c in smn}) == 1 and len({c["cell_id"] for c in smn}) == 3


def test_json_records_write_no_nan_or_infinity():
    frame = pd.DataFrame({"m_mean": [float("inf"), float("nan"), 0.5], "m_n": [3.0, None, 2.0], "name": ["a", "b", "c"]})
    text = registry.render_frame(frame, "json")
    rows = strict_loads(text)
    assert rows[0] == {"m_mean": None, "m_n": 3, "name": "a", "note": "m_mean: infinite"}
    assert rows[1]["note"] == "m_mean, m_n: not measured" and rows[2]["m_n"] == 2
    with pytest.raises(ValueError):
        registry.dumps_strict({"x": float("nan")})


def test_cell_defaults_file_matches_the_cell_config():
    from smn_core.config import CellConfig

    expected = settings.setting_config(CellConfig(method="smn").to_dict())
    expected.pop("method")
    assert settings.cell_defaults() == json.loads(json.dumps(expected)), (
        "orchestrator/reports/cell_defaults.json is stale: regenerate it from CellConfig(method='smn').to_dict()")


def test_split_settings_labels_many_differing_keys_with_a_short_id(pooled):
    rows = ledger.read_ledger(str(pooled), "demo")
    cells = rows.drop_duplicates("cell_id")
    extra = rows[rows["cell_id"] == cells[cells["method"] == "smn"]["cell_id"].iloc[0]].copy()
    config = json.loads(extra["config_json"].iloc[0])
    for key in ("epochs", "score_lr", "batch_size", "weight_decay"):
        config["train"][key] = 7
    extra["config_json"], extra["cell_id"] = json.dumps(config), "other"
    split = settings.split_settings(pd.concat([rows, extra], ignore_index=True))
    grids = {json.dumps(json.loads(g)) for g in split[split["method"] == "smn"]["grid_json"]}
    assert len(grids) == 3 and all('"setting"' in g for g in grids)
    assert "train.batch_size, train.epochs, train.score_lr, train.weight_decay" in split.attrs[settings.NOTE]
    assert settings.split_settings(split)["grid_json"].equals(split["grid_json"])  # idempotent
    table = tables.results_table(split)
    assert len(table.xs("smn", level="method")) == 3
