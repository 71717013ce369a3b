"""Experiments on a real local Ray: the ledger, resume after a killed driver, DDP equivalence."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from orchestrator.results import ledger
from orchestrator.engine.plain import run_experiment
from orchestrator.spec.experiment import expand_cells, load_spec
from smn_core.checkpoint import load_tensors
from smn_core.pipeline import CellConfig, run_cell

from .conftest import REPO, kill_driver_tree

pytestmark = pytest.mark.slow


def test_run_writes_ledger_and_rerun_runs_nothing(ray_local, tiny_spec, tmp_path):
    spec = load_spec(tiny_spec("ledger"))
    results = str(tmp_path / "results")
    first = run_experiment(spec, results, echo=lambda s: None)
    assert first["ran"] == 2 and not first["failed"]
    df = ledger.read_ledger(results, "ledger")
    assert set(df["method"]) == {"pretrained", "smn"}
    smn = df[df["method"] == "smn"].set_index("metric")["value"]
    for metric in ("knn_top1", "linear_probe_top1", "density", "mask_bits", "wall_s", "train_loss"):
        assert metric in smn.index
    assert 0.0 < smn["density"] <= 1.0 and 0.0 <= smn["knn_top1"] <= 1.0
    masks = list((tmp_path / "results" / "ledger" / "masks").glob("*.safetensors"))
    assert len(masks) == 1 and all(t.dtype == torch.bool for t in load_tensors(masks[0]).values())
    second = run_experiment(spec, results, echo=lambda s: None)
    assert second["ran"] == 0 and second["skipped"] == 2
    assert len(ledger.read_ledger(results, "ledger")) == len(df)


def test_killed_driver_resumes_only_missing_work(tiny_spec, tmp_path):
    """Kill `smn run` (the whole process group) once a cell has checkpointed an epoch; the same command
    then skips the finished cells, resumes the interrupted one from its checkpoint, and duplicates nothing."""
    spec_path = tiny_spec("resume", epochs=4, extra="")
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "orchestrator", "run", str(spec_path), "--results", str(results),
           "seeds=[0,1]", "resources.max_concurrent_cells=1", "dataset.max_train_samples=192"]
    ray_tmp = tempfile.mkdtemp(prefix="smnk", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    ckpt_root = results / "resume" / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = list((results / "resume" / "ledger").glob("*.parquet")) if (results / "resume").exists() else []
            ckpts = list(ckpt_root.glob("*/meta.json")) if ckpt_root.exists() else []
            if done and ckpts:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("no cell finished and checkpointed in time")
    finally:
        kill_driver_tree(proc, ray_tmp)
    before = ledger.completed_cells(str(results), "resume")
    assert 1 <= len(before) < 4
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert f"{len(before)} already in the ledger, {4 - len(before)} to run" in text
    assert "resuming after epoch" in text
    df = ledger.read_ledger(str(results), "resume")
    assert df["cell_id"].nunique() == 4
    assert not df.duplicated(["cell_id", "metric"]).any()
    assert {c.cell_id for c in expand_cells(load_spec(spec_path, ["seeds=[0,1]", "dataset.max_train_samples=192"]))} \
        == set(df["cell_id"])


def test_two_worker_ddp_matches_one_worker(ray_local, tiny_spec, tmp_path):
    """A 2-worker TorchTrainer cell (gloo, DistributedSampler, global batch 32 = 2 x 16) learns the same
    masks as a 1-worker run with batch 32: same data order, same augmentations, Sinkhorn over the global
    batch, BatchNorm frozen (SyncBatchNorm needs a GPU)."""
    spec = load_spec(tiny_spec("ddp", epochs=2, workers=2),
                     ["methods=[smn]", "train.score_lr=200", "train.swav.queue_length=64",
                      "train.swav.queue_start_fraction=0.5"])
    results = str(tmp_path / "results")
    summary = run_experiment(spec, results, echo=print)
    assert summary["ran"] == 1, summary
    (cell,) = expand_cells(spec)
    ddp_masks = load_tensors(Path(results) / "ddp" / "masks" / f"{cell.cell_id}.safetensors")

    torch.manual_seed(0)
    single = run_cell(TypeAdapter(CellConfig).validate_python(TypeAdapter(CellConfig).dump_python(cell.config)),
                      evaluate=False)
    assert single.metrics["steps"] == 2 * (96 // 32)
    agree = sum(int((ddp_masks[k] == single.masks[k]).sum()) for k in ddp_masks)
    total = sum(m.numel() for m in ddp_masks.values())
    flipped = sum(int((~single.masks[k]).sum()) for k in single.masks)
    assert flipped > 100, "the scores must have moved enough to flip mask bits for the test to mean anything"
    assert agree / total > 0.999, f"only {agree}/{total} mask bits agree"
