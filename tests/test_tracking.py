"""Trackers the way their users read them: MLflow runs nested under one parent run per experiment, each spanning its
cell's training and evaluation, tagged with the git commit, smn version and host, with the dataset as an input and
one name per metric (per-epoch histories at the optimizer step); W&B offline runs grouped by experiment, job type
= method, the same fields. The ledger here is written as the engine writes it (real Parquet, real curves files),
the stores are read back with the commands docs/commands.md gives (``mlflow.search_runs`` with
``MLFLOW_ALLOW_FILE_STORE=true``; the W&B offline folder)."""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import pytest

from orchestrator.reports import tracking
from orchestrator.results import ledger
from orchestrator.results.curves import write_curves
from orchestrator.results.layout import ExperimentLayout

# the tracker tests import MLflow and start W&B's service process (as test_report's do): the ray tier's process

DATASET = {"source": "digits", "classes": [5, 6, 7], "image_size": 16}
# cell id -> (method, train_seconds, eval_seconds, setup seconds before training, epochs)
CELLS = {"a" * 16: ("smn", 30.0, 6.0, 9.0, 3), "b" * 16: ("pretrained", 0.0, 4.0, 2.0, 0)}


def _landed(results: Path) -> float:
    t0 = time.time() - 3600
    lay = ExperimentLayout.of(str(results), "trk")
    for i, (cid, (method, train_s, eval_s, setup_s, epochs)) in enumerate(CELLS.items()):
        start = t0 + 100 * i
        metrics = {"knn_top1": 0.5 + i / 10, "eval_seconds": eval_s, "num_train": 90.0, "num_test": 60.0}
        if epochs:
            metrics.update(train_seconds=train_s, steps=12.0, train_loss=4.0, density=0.9,
                           **{f"train_loss@{e + 1}": 6.0 - e for e in range(epochs)})
            write_curves(lay, cid, [{"epoch": e, "loss": 6.0 - e, "density": 1.0 - 0.05 * e, "seconds": train_s / epochs}
                                    for e in range(epochs)])
        ledger.write_cell(str(results), "trk", cell_id=cid, method=method, backbone="cifar_resnet8", dataset="digits",
                          seed=0, grid={}, config={"method": method, "dataset": DATASET, "eval": {"knn_k": 20}},
                          metrics=metrics, started_at=start, finished_at=start + setup_s + train_s + eval_s + 0.5)
    return t0


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_runs_nest_under_the_experiment_and_span_training(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    _landed(tmp_path / "results")
    section = {"mlflow": {"uri": str(tmp_path / "mlruns")}}
    assert tracking.sync(str(tmp_path / "results"), "trk", section, echo=lambda line: None) == {"mlflow": 2}
    assert tracking.sync(str(tmp_path / "results"), "trk", section, echo=lambda line: None) == {"mlflow": 0}

    # what docs/commands.md says to run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["trk"])
    assert len(runs) == 3
    (parent,) = runs[runs["tags.smn.role"] == "experiment"]["run_id"]
    cells = runs[runs["tags.smn.cell_id"].notna()]
    assert set(cells["tags.mlflow.parentRunId"]) == {parent}
    commit = tracking.git_commit()
    assert commit and set(runs["tags.mlflow.source.git.commit"]) == {commit}
    assert set(cells["tags.smn.version"]) == {__import__("smn_core").__version__}
    assert set(cells["tags.smn.host"]) == {__import__("socket").gethostname()}
    client = MlflowClient()
    for _, row in cells.iterrows():
        method, train_s, eval_s, setup_s, epochs = CELLS[row["tags.smn.cell_id"]]
        run = client.get_run(row["run_id"])
        duration = (run.info.end_time - run.info.start_time) / 1000
        assert duration == pytest.approx(train_s + eval_s, rel=0.1)  # training and evaluation, not logging time
        (inp,) = run.inputs.dataset_inputs
        assert inp.dataset.name == "digits" and len(inp.dataset.digest) == 16 and '"num_train": 90' in inp.dataset.profile
        keys = set(run.data.metrics)
        assert not any(k.startswith("train_loss_") or k.startswith("epoch_") and k != "epoch_seconds" for k in keys)
        if epochs:
            hist = client.get_metric_history(row["run_id"], "train_loss")
            assert [(m.step, m.value) for m in hist] == [(4, 6.0), (8, 5.0), (12, 4.0)]  # 12 steps over 3 epochs
            times = [m.timestamp / 1000 for m in hist]
            assert times == sorted(times) and times[-1] <= run.info.end_time / 1000
            assert [m.step for m in client.get_metric_history(row["run_id"], "knn_top1")] == [12]
    prun = client.get_run(parent)
    assert prun.info.start_time == min(client.get_run(r).info.start_time for r in cells["run_id"])
    assert prun.info.end_time == max(client.get_run(r).info.end_time for r in cells["run_id"])


@pytest.mark.ray
@pytest.mark.slow
def test_wandb_offline_runs_carry_group_job_type_time_and_commit(tmp_path):
    from tests.test_report import _wandb_records

    _landed(tmp_path / "results")
    section = {"wandb": {"project": "p", "mode": "offline", "dir": str(tmp_path / "wb")}}
    assert tracking.sync(str(tmp_path / "results"), "trk", section, echo=lambda line: None) == {"wandb": 2}
    dirs = sorted(glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*")))  # the documented folder
    assert len(dirs) == 2
    commit = tracking.git_commit()
    seen = set()
    for d in dirs:
        recs = _wandb_records(glob.glob(f"{d}/*.wandb")[0])
        (run,) = [r.run for r in recs if r.HasField("run")]
        cid = run.run_id.rsplit("-", 1)[-1]
        method, train_s, eval_s, _, epochs = CELLS[cid]
        seen.add(cid)
        assert run.run_group == "trk" and run.job_type == method
        assert run.git.commit == commit and run.host == __import__("socket").gethostname()
        config = {_key(u): u.value_json for u in run.config.update}
        assert {"smn.dataset", "smn.version", "smn.git_commit", "smn.started_at"} <= set(config)
        assert float(config["smn.seconds"]) == pytest.approx(train_s + eval_s, rel=0.1)
        rows = [{_key(i): float(i.value_json) for i in r.history.item} for r in recs if r.HasField("history")]
        rec = _record(tmp_path, cid)
        points = tracking.curve_points(rec)
        assert [r["_step"] for r in rows] == [step for step, _, _ in points]  # the optimizer steps, 12 over 3 epochs
        assert [r["_timestamp"] for r in rows] == pytest.approx([when for _, when, _ in points], abs=1e-3)
        assert [r["train_loss"] for r in rows] == [6.0 - e for e in range(epochs)]
        summary = {_key(u) for r in recs if r.HasField("summary") for u in r.summary.update}
        assert "knn_top1" in summary and not any(k.startswith(("train_loss@", "train_loss_", "epoch_loss")) for k in summary)
    assert seen == set(CELLS)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _record(tmp_path: Path, cid: str) -> tracking.CellRecord:
    (rec,) = [r for r in tracking.cell_records(str(tmp_path / "results"), "trk", str(tmp_path)) if r.cell_id == cid]
    return rec


@pytest.mark.unit
def test_git_commit_reads_a_worktree_without_git(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    commit = tracking.git_commit(repo)
    assert commit is not None and len(commit) == 40
    assert tracking.git_commit(tmp_path) is None
    assert os.path.exists(repo / ".git")
