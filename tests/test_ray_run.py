"""Experiments on a real local Ray: the ledger, DDP equivalence (resume after a killed driver: test_kill_resume.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from orchestrator.results import ledger
from orchestrator.engine.plain import run_experiment
from orchestrator.spec.experiment import expand_cells, load_spec
from smn_core.checkpoint import load_tensors
from smn_core.pipeline import run_cell
from smn_core.config import CellConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_run_writes_ledger_and_rerun_runs_nothing(landed):
    plain = landed["plain"]  # the tiny spec, run once this session (tests/conftest.py)
    spec, results = load_spec(plain["spec"]), plain["results"]
    first = plain["first"]
    assert first["ran"] == 2 and not first["failed"]
    df = ledger.read_ledger(results, "tiny")
    assert set(df["method"]) == {"pretrained", "smn"}
    smn = df[df["method"] == "smn"].set_index("metric")["value"]
    for metric in ("knn_top1", "linear_probe_top1", "density", "mask_bits", "wall_s", "train_loss"):
        assert metric in smn.index
    assert 0.0 < smn["density"] <= 1.0 and 0.0 <= smn["knn_top1"] <= 1.0
    masks = list((Path(results) / "tiny" / "masks").glob("*.safetensors"))
    assert len(masks) == 1 and all(t.dtype == torch.bool for t in load_tensors(masks[0]).values())
    second = run_experiment(spec, results, echo=lambda s: None)
    assert second["ran"] == 0 and second["skipped"] == 2
    assert len(ledger.read_ledger(results, "tiny")) == len(df)


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
