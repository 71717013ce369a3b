"""The ablation layouts read real ledger files: rows are recognised from the cells' resolved configs."""

from __future__ import annotations

import time

import pytest

from orchestrator.results import ledger
from orchestrator.reports import registry as reports
from orchestrator.cli.app import main
from orchestrator.spec.experiment import expand_cells, load_spec

from .conftest import REPO

pytestmark = pytest.mark.unit


def _write(results, spec, cells, metrics_of):
    for c in cells:
        ledger.write_cell(results, spec.name, cell_id=c.cell_id, method=c.config.method,
                          backbone=c.config.backbone.arch, dataset=c.config.dataset.source, seed=c.config.seed,
                          grid=c.grid_values, config=c.config.to_dict(), metrics=metrics_of(c),
                          started_at=time.time(), finished_at=time.time())


def test_table2_rows_from_a_sweep_ledger(tmp_path):
    spec = load_spec(REPO / "experiments" / "table2_masking_small.yaml")
    cells = expand_cells(spec)
    thr = next(c for c in cells if c.config.train.mask.mode == "threshold")
    cells = [c for c in expand_cells(spec, {thr.cell_id: 0.93})  # Table 2's three rows (seed 0, the recipe's selector)
             if c.config.seed == 0 and c.config.train.mask.selector != "conv"]
    assert len(cells) == 3
    acc = {"threshold": 0.8, 0.5: 0.6, 0.93: 0.7}
    _write(str(tmp_path), spec, cells, lambda c: {
        "knn_top1": acc[c.config.train.mask.topk_density or "threshold"], "linear_probe_top1": 0.9,
        "density": c.config.train.mask.topk_density or 0.93})
    table = reports.tables()["table2"].build(ledger.read_ledger(str(tmp_path)))
    assert list(table.index) == ["k-NN: top-k 50%", "k-NN: top-k found", "k-NN: SMN (threshold)",
                                 "linear probe: top-k 50%", "linear probe: top-k found",
                                 "linear probe: SMN (threshold)", "density found by SMN"]
    assert table.loc["k-NN: top-k found", "digits"] == "0.700"
    assert table.loc["density found by SMN", "digits"] == "0.930"
    latex = reports.render_frame(table, "latex")
    assert r"\toprule" in latex and "top-k 50\\%" in latex


def test_table5b_labels_and_fig8_png(tmp_path, capsys):
    spec = load_spec(REPO / "experiments" / "table5b_frozen_small.yaml")
    _write(str(tmp_path), spec, expand_cells(spec), lambda c: {"knn_top1": 0.5})
    t = reports.tables()["table5b"].build(ledger.read_ledger(str(tmp_path)))
    # the spec crosses the three choices with both BN modes: each setting is a row, named by the mode
    assert sorted(t.index) == sorted(f"{frozen} (bn_mode={mode})" for frozen in ("none", "BNs", "biases")
                                     for mode in ("adapt", "frozen"))

    spec = load_spec(REPO / "experiments" / "appF_selective_small.yaml")
    cells = expand_cells(spec)
    import pandas as pd
    from orchestrator.reports.ablations import selection_strategy
    labels = {selection_strategy(pd.Series({"config": c.config.to_dict()})) for c in cells}
    assert {("all", "L3 only"), ("all", "all"), ("first N stages", "L1"), ("random", "5%"),
            ("magnitude", "60%")} <= labels, labels
    _write(str(tmp_path), spec, cells, lambda c: {"knn_top1": 0.5, "trainable_masks": 1000.0 + len(c.label)})
    out = tmp_path / "fig8.png"
    assert main(["plot", str(tmp_path), "--figure", "fig8", "--experiment", spec.name, "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path), "--figure", "nope"]) == 2
    assert "allowed:" in capsys.readouterr().err


def test_every_registered_layout_handles_an_empty_ledger(tmp_path):
    empty = ledger.read_ledger(str(tmp_path))
    for name, layout in reports.tables().items():
        out = layout.build(empty)
        assert out is not None, name
        assert reports.render_frame(out).startswith("(no results") or not out.empty
