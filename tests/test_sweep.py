"""Ray Tune sweeps on a real local Ray: grid cells land once, failures are recorded, top-k at the found
density runs after its threshold cell, an Optuna search lands its trials (an interrupted sweep: test_kill_resume.py)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from orchestrator.results import ledger
from orchestrator.engine.plain import run_experiment
from orchestrator.spec.experiment import load_spec


pytestmark = [pytest.mark.ray, pytest.mark.slow]

def grid(bad_checkpoint=None) -> str:
    """Mask modes x backbones; a backbone whose checkpoint file exists but does not load fails at run time
    (validation checks only that the file exists)."""
    backbones = "[{weights: random}" + (f", {{weights: checkpoint, checkpoint: '{bad_checkpoint}'}}"
                                        if bad_checkpoint else "") + "]"
    return ("\ngrid:\n  train.mask:\n    - {mode: threshold}\n    - {mode: topk, topk_density: found}\n"
            f"  backbone: {backbones}\n")


def test_grid_sweep_lands_each_cell_once_records_failures_and_orders_found_cells(ray_local, tiny_spec, tmp_path):
    """A backbone checkpoint that does not load (it changed after the spec was checked) fails at run time: it is retried, recorded with its error, and
    the sweep goes on; the top-k cell at the found density runs after its threshold cell, with the ledger's
    density."""
    import torch

    from smn_core.backbones import build_backbone

    junk = tmp_path / "junk.pth"  # a valid ResNet-8 file when the spec is checked, junk when the cell opens it
    torch.save(build_backbone("cifar_resnet8", "random").model.state_dict(), junk)
    spec = load_spec(tiny_spec("grid", extra=grid(junk)),
                     ["methods=[smn]", "train.score_lr=300", "resources.max_retries=1"])
    junk.write_bytes(b"not a checkpoint" * 8)
    results = str(tmp_path / "results")
    lines: list[str] = []
    summary = run_experiment(spec, results, echo=lines.append)
    text = "\n".join(lines)
    df = ledger.read_ledger(results, "grid")
    assert df["cell_id"].nunique() == 2 and not df.duplicated(["cell_id", "metric"]).any()
    failures = ledger.read_failures(results, "grid")
    assert len(failures) == 1
    (rec,) = failures.values()
    assert "junk.pth" in rec["error"] and "cannot be loaded" in rec["error"] and rec["attempts"] == 2
    tune_errors = list((tmp_path / "results" / "grid").rglob("error.txt"))  # Tune's record of the failed trial
    assert tune_errors and not [p for p in tune_errors if "\x1b[" in p.read_text()]  # no colour codes (issue 26)
    assert "retrying" in text and "1 failed" in text and "best knn_top1" in text
    assert len(summary["failed"]) == 2  # the failed threshold cell, and its top-k cell that could not run

    cfg = {cid: json.loads(rows["config_json"].iloc[0]) for cid, rows in df.groupby("cell_id")}
    by_mode = {c["train"]["mask"]["mode"]: cid for cid, c in cfg.items()}
    thr, topk = by_mode["threshold"], by_mode["topk"]
    density = df[(df["cell_id"] == thr) & (df["metric"] == "density")]["value"].item()
    assert density < 1.0, "the threshold run must have flipped bits for the test to mean anything"
    assert cfg[topk]["train"]["mask"]["topk_density"] == pytest.approx(density)
    topk_density = df[(df["cell_id"] == topk) & (df["metric"] == "density")]["value"].item()
    assert topk_density == pytest.approx(density, abs=0.01)  # per-tensor rounding of round(k * n)
    started = df.groupby("cell_id")["started_at"].first()
    finished = df.groupby("cell_id")["finished_at"].first()
    assert started[topk] >= finished[thr]

    # the same sweep without the failing axis value: everything is in the ledger, nothing runs
    again = run_experiment(load_spec(tiny_spec("grid", extra=grid()),
                                     ["methods=[smn]", "train.score_lr=300"]), results, echo=lines.append)
    assert again["ran"] == 0 and again["skipped"] == 2 and not again["failed"]


SEARCH = """
search:
  metric: knn_top1
  mode: max
  num_samples: 2
  seed: 0
  space:
    train.score_lr: {type: loguniform, low: 20, high: 400}
    train.swav.num_prototypes: {type: choice, values: [10, 20]}
"""


def test_optuna_search_lands_its_trials_and_a_bigger_budget_runs_only_the_rest(ray_local, tiny_spec, tmp_path):
    path = tiny_spec("optuna", extra=SEARCH)
    results = str(tmp_path / "results")
    lines: list[str] = []
    first = run_experiment(load_spec(path, ["methods=[smn]"]), results, echo=lines.append)
    assert first["ran"] == 2 and not first["failed"], "\n".join(lines)
    df = ledger.read_ledger(results, "optuna")
    assert df["cell_id"].nunique() == 2
    grids = [json.loads(g) for g in df.groupby("cell_id")["grid_json"].first()]
    for g in grids:
        assert set(g) == {"train.score_lr", "train.swav.num_prototypes"}
        assert 20 <= g["train.score_lr"] <= 400 and g["train.swav.num_prototypes"] in (10, 20)
    second = run_experiment(load_spec(path, ["methods=[smn]", "search.num_samples=3"]), results, echo=lines.append)
    assert second["skipped"] == 2 and second["ran"] == 1
    assert ledger.read_ledger(results, "optuna")["cell_id"].nunique() == 3


def test_tune_sees_the_grid_axes_by_name(landed):
    """The session's landed 3-cell grid (``train.swav.num_prototypes``: 10, 20, 30): Tune's own ResultGrid, read
    back from the sweep's Tune storage, has one column per axis (method, seed and the grid key under its dotted
    name) and the cell id as the identity, each row the settings of the cell the ledger holds under that id."""
    from pathlib import Path

    from ray.tune import ExperimentAnalysis, ResultGrid

    from orchestrator.results.layout import ExperimentLayout

    sweep = landed["grid"]
    runs = sorted(Path(ExperimentLayout.of(sweep["results"], "sweep3").tune).glob("sweep-*"))
    assert len(runs) == 1, runs  # the second run had nothing to do: no Tune run
    df = ResultGrid(ExperimentAnalysis(str(runs[0]))).get_dataframe()
    axes = {c for c in df.columns if c.startswith("config/")}
    assert axes == {"config/cell_id", "config/method", "config/seed", "config/train.swav.num_prototypes"}
    assert sorted(df["config/train.swav.num_prototypes"]) == [10, 20, 30]
    assert set(df["config/method"]) == {"smn"} and set(df["config/seed"]) == {0}
    rows = ledger.read_ledger(sweep["results"], "sweep3").groupby("cell_id")["grid_json"].first()
    assert set(df["config/cell_id"]) == set(rows.index)
    for cid, protos in zip(df["config/cell_id"], df["config/train.swav.num_prototypes"]):
        assert json.loads(rows[cid]) == {"train.swav.num_prototypes": protos}
    assert df["knn_top1"].notna().all()  # the trials' reported metrics, beside their settings


ASHA = """
grid:
  train.swav.num_prototypes: [4, 64]
search: {scheduler: asha, metric: train_loss, mode: min, grace_epochs: 1, reduction_factor: 2}
"""


def test_asha_stops_a_weak_trial_after_its_first_epoch_and_a_rerun_keeps_it(ray_local, tiny_spec, tmp_path):
    """Trials report every epoch (``tune.report`` with the epoch checkpoint); ASHA on ``train_loss`` stops the
    second trial (64 prototypes: a SwAV loss well above the 4-prototype trial's, about log 64 against log 4) at its
    first rung. The stopped cell lands with its last epoch's metrics (validation included), ``stopped_early``; a
    rerun runs nothing."""
    from pathlib import Path

    from ray.tune import ExperimentAnalysis, ResultGrid

    from orchestrator.results.curves import read_curves
    from orchestrator.results.layout import ExperimentLayout

    overrides = ["methods=[smn]", "dataset.val_fraction=0.25", "resources.max_concurrent_cells=1"]
    spec = load_spec(tiny_spec("asha", epochs=3, extra=ASHA), overrides)
    results = str(tmp_path / "results")
    lines: list[str] = []
    summary = run_experiment(spec, results, echo=lines.append)
    text = "\n".join(lines)
    assert summary["ran"] == 2 and summary.get("stopped") == 1 and not summary["failed"], text
    assert "stopped by asha after epoch 1" in text and "stopped early" in text
    wide = ledger.wide(ledger.read_ledger(results, "asha"))
    wide = wide.set_index(wide["grid_json"].map(lambda g: json.loads(g)["train.swav.num_prototypes"]))
    full, stopped = wide.loc[4], wide.loc[64]
    assert stopped["stopped_early"] == 1 and stopped["scheduler_stopped"] == 1 and stopped["epochs_done"] == 1
    assert 0 <= stopped["val_knn_dino_top1"] <= 1 and stopped["train_loss"] > full["train_loss"]
    # the final evaluation (on the validation split: val_* metrics) ran for the full cell only
    assert pd.isna(stopped.get("val_knn_top1")) and not pd.isna(full["val_knn_top1"]) and "knn_top1" not in wide
    assert full["stopped_early"] == 0 and 0 <= full["val_knn_dino_top1"] <= 1
    curves = read_curves(ExperimentLayout.of(results, "asha"), full["cell_id"])
    assert len(curves) == 3 and curves["val_knn_dino_top1"].between(0, 1).all()  # validated after every epoch
    (run,) = Path(ExperimentLayout.of(results, "asha").tune).glob("sweep-*")
    df = ResultGrid(ExperimentAnalysis(str(run))).get_dataframe().set_index("config/train.swav.num_prototypes")
    assert df.loc[4, "training_iteration"] == 4 and df.loc[64, "training_iteration"] == 1  # 3 epochs + the end; 1
    assert sorted(Path(run).glob("*/checkpoint_*"))  # each epoch's report carried its checkpoint
    import pyarrow.parquet as pq

    for cid in wide["cell_id"]:  # the rows name the Ray job the cell ran in (a trial worker and the driver alike)
        file = Path(ExperimentLayout.of(results, "asha").ledger_file(cid))
        job = pq.read_table(file, columns=["ray_job_id"]).column(0).to_pylist()
        assert set(job) == {ray_local.get_runtime_context().get_job_id()}
    again = run_experiment(load_spec(tiny_spec("asha", epochs=3, extra=ASHA), overrides), results, echo=lines.append)
    assert again["ran"] == 0 and again["skipped"] == 2
