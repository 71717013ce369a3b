"""The random-mask controls as dependent cells on the real local Ray (issue 25): they land after their SMN cell,
in the same run, and a rerun skips them."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.results.per_image import load_correctness

from .conftest import _smn_run_json

pytestmark = pytest.mark.ray


def test_controls_land_after_their_smn_cell_and_resume(ray_local, tiny_spec, tmp_path):
    """One run lands SMN, then (next round) both controls, like any cell (masks, per-image correctness); a
    second run runs nothing."""
    args = [str(tiny_spec()), "--results", str(tmp_path), "methods=[random_mask,random_mask_magnitude]",
            "train.score_lr=200.0"]  # the tiny spec's 3 steps then prune a few weights
    first = _smn_run_json(args)
    df = ledger.read_ledger(str(tmp_path), "tiny")
    wide = df.pivot_table(index=["method", "cell_id"], columns="metric", values="value").reset_index()
    assert sorted(wide["method"]) == ["random_mask", "random_mask_magnitude", "smn"], first
    smn = wide[wide["method"] == "smn"].iloc[0]
    assert 0 < smn["density"] < 1
    lay = ExperimentLayout.of(str(tmp_path), "tiny")
    for _, row in wide[wide["method"].str.startswith("random_mask")].iterrows():
        assert row["density"] == pytest.approx(smn["density"]) and row["overlap"] < 1
        assert pd.notna(row["knn_dino_top1"]) and pd.notna(row["linear_probe_top1"])
        assert load_correctness(str(tmp_path), "tiny", row["cell_id"], "knn_dino_top1") is not None
        assert lay.fs.get_file_info(lay.mask(row["cell_id"])).size > 0
    second = _smn_run_json(args)
    assert second["ran"] == 0 and not second["failed"], second
