"""``smn run --dry-run``'s estimate against a measured run (issue 27): the tiny spec, estimated and then run
through the CLI in this process (the session's Ray: the estimate's "join" case), lands within 2x of the
estimate, and so does its start-up (the wall time before the last cell's own clock)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from orchestrator.cli.app import main
from orchestrator.results import ledger
from tests.conftest import last_json

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cli(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0, buf.getvalue()[-2000:]
    return buf.getvalue()


def test_dry_run_estimate_is_within_2x_of_a_measured_run(tiny_spec, tmp_path):
    spec, results = str(tiny_spec("estimate")), str(tmp_path / "results")
    est = json.loads(_cli(["run", spec, "--dry-run", "--json", "--results", results]))["estimate"]
    assert est["ray_startup_s"] > 0 and est["pretraining_s"] == 0  # random weights: no pretraining
    measured = last_json(_cli(["run", spec, "--json", "--results", results]))
    assert measured["ran"] == 2 and not measured["failed"]
    # the cells' own clocks: what the estimate calls training and evaluation (set-up included), per cell
    rows = ledger.read_ledger(results, "estimate", metrics=["train_seconds", "wall_s"])
    cells = rows.pivot_table(index="cell_id", columns="metric", values="value", aggfunc="first")
    train = cells["train_seconds"].fillna(0).sum() / est["concurrent_cells"]
    rest = (cells["wall_s"] - cells["train_seconds"].fillna(0)).sum() / est["concurrent_cells"]
    detail = (f"measured {measured['wall_s']:.1f} s (training {train:.1f} s, evaluation {rest:.1f} s per slot) vs "
              f"estimate {est}")
    # the estimate scales its CPU parts by the load per core when it is made (load_factor); in the two-lane suite
    # the other lane's load slows this run less than that, so the measured run must lie within 2x of the band
    # between the idle estimate (total / load_factor) and the loaded one
    idle = est["total_s"] / est["load_factor"]
    assert 0.5 * idle <= measured["wall_s"] <= 2.0 * est["total_s"], detail
    # the rest of the wall time is start-up (workers importing torch), which the estimate counts as Ray's; the
    # cells' own 1-2 s are too short here to hold their parts to 2x (the demo's 82-108 s run: docs/commands.md)
    startup = measured["wall_s"] - max(cells["wall_s"])
    assert 0.5 * est["ray_startup_s"] / est["load_factor"] <= startup <= 2.0 * est["ray_startup_s"], detail
    assert train + rest < measured["wall_s"] and est["training_s"] > 0 and est["evaluation_s"] > 0, detail
