"""Hyperparameter invariance of threshold masking (paper Sec. 3.2, Theorems 1-2; App. A, Fig. 5).

Supervised masking of a CIFAR ResNet-8 on real digits in float64 on the CPU, SGD with momentum 0.9,
identical data order: (S0, mu, lr) = (1, 0, 50) and (2.5, 0.5, 100) must give the same masks bit for
bit, and so must the one-at-a-time pair (1, 0, 100) / (1, 0.5, 50) (both halve (S0 - mu) / lr);
doubling S0 alone must not. Then the invariance table and Fig. 5 are built from a real ledger.
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.reports.baselines import fig5, invariance
from orchestrator.spec.experiment import cell_id_of
from smn_core.analysis import mask_agreement
from smn_core.checkpoint import save_tensors
from smn_core.masking import MaskConfig
from smn_core.pipeline import run_cell
from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
from smn_core.training import TrainConfig

# tiers per test: the slow ones run in the ray tier's process, so that `pytest -m unit` stays fast

SETTINGS = [(1.0, 0.0, 50.0), (2.5, 0.5, 100.0), (1.0, 0.0, 100.0), (1.0, 0.5, 50.0), (2.0, 0.0, 50.0)]


def cell(s0: float, mu: float, lr: float) -> CellConfig:
    return CellConfig(
        method="supervised_mask", backbone=BackboneSpec(arch="cifar_resnet8", weights="random"),
        dataset=DataSpec(source="digits", image_size=16, max_train_samples=96, max_test_samples=60),
        train=TrainConfig(epochs=2, batch_size=32, score_lr=lr, momentum=0.9, dtype="float64",
                          mask=MaskConfig(init_score=s0, threshold=mu)),
        eval=EvalSpec(knn_k=20))


@pytest.fixture(scope="module")
def runs():
    return {h: (cell(*h), run_cell(cell(*h), evaluate=h == SETTINGS[0])) for h in SETTINGS}


def scores(outcome) -> dict[str, torch.Tensor]:
    return {k: v for k, v in outcome.state.items() if k.endswith(".scores")}


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_equivalent_settings_give_identical_masks_in_float64(runs):
    ref = runs[(1.0, 0.0, 50.0)][1]
    assert ref.metrics["density"] < 1.0  # bits did flip: the comparison is not trivial
    assert all(v.dtype == torch.float64 for v in scores(ref).values())
    assert "conv1.weight" in ref.masks and "layer3.0.conv2.weight" in ref.masks  # the backbone's own names
    assert 0.0 <= ref.metrics["knn_top1"] <= 1.0  # evaluated in float64 too
    for a, b in (((1.0, 0.0, 50.0), (2.5, 0.5, 100.0)), ((1.0, 0.0, 100.0), (1.0, 0.5, 50.0))):
        oa, ob = runs[a][1], runs[b][1]
        agree = mask_agreement(oa.masks, ob.masks)
        assert agree.differing_bits == 0 and agree.identical_fraction == 1.0, (a, b)
        assert [h["loss"] for h in oa.history] == [h["loss"] for h in ob.history]  # the same forward passes
        # Theorems 1-2: S_b - mu_b = (lr_b / lr_a) (S_a - mu_a), up to float64 rounding
        k = b[2] / a[2]
        sa, sb = scores(oa), scores(ob)
        for name in sa:
            torch.testing.assert_close(sb[name] - b[1], k * (sa[name] - a[1]), rtol=1e-12, atol=1e-12)


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_non_equivalent_settings_differ(runs):
    ref = runs[(1.0, 0.0, 50.0)][1]
    for h in ((2.0, 0.0, 50.0), (1.0, 0.0, 100.0)):
        assert mask_agreement(ref.masks, runs[h][1].masks).differing_bits > 0, h
    # doubling lr and shifting mu by 0.5 both move further than doubling S0 moves back
    density = {h: out.metrics["density"] for h, (_, out) in runs.items()}
    assert density[(1.0, 0.0, 100.0)] < density[(1.0, 0.0, 50.0)] < density[(2.0, 0.0, 50.0)]


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_invariance_table_and_fig5_from_the_ledger(runs, tmp_path):
    results = str(tmp_path / "results")
    for (s0, mu, lr), (cfg, out) in runs.items():
        cid = cell_id_of(cfg)
        save_tensors(ExperimentLayout.of(results, 'inv').mask(cid), out.masks)
        ledger.write_cell(results, "inv", cell_id=cid, method=cfg.method, backbone=cfg.backbone.arch,
                          dataset=cfg.dataset.source, seed=cfg.seed,
                          grid={"train.mask.init_score": s0, "train.mask.threshold": mu, "train.score_lr": lr},
                          config=cfg.to_dict(), metrics=out.metrics, started_at=0.0, finished_at=1.0)
    df = ledger.read_ledger(results, "inv")
    with pytest.raises(ValueError, match="results folder"):
        bare = df.copy()
        bare.attrs.clear()
        invariance(bare)  # without the results folder the masks cannot be found
    table = invariance(df).reset_index()
    assert len(table) == len(SETTINGS)
    by = {(float(r["S0"]), float(r["mu"]), float(r["lr"])): r for r in table.to_dict("records")}
    assert by[(1.0, 0.0, 50.0)]["equivalent"] == "reference"
    assert by[(2.5, 0.5, 100.0)]["equivalent"] == "yes"
    assert by[(2.5, 0.5, 100.0)]["identical mask bits"] == "100.0000%"
    assert by[(2.5, 0.5, 100.0)]["max |Δ loss|"] == "0"
    assert by[(1.0, 0.0, 100.0)]["same-ratio identical bits"] == "100.0000%"  # against (1, 0.5, 50)
    assert by[(2.0, 0.0, 50.0)]["equivalent"] == "no"
    assert by[(2.0, 0.0, 50.0)]["identical mask bits"] != "100.0000%"
    assert "float64, momentum 0.9" in by[(1.0, 0.0, 50.0)]["Setting"]
    out = tmp_path / "fig5.png"
    fig5(df, str(out))
    assert out.stat().st_size > 10_000
