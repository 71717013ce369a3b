"""Baselines (paper Table 1, Fig. 3, Tables 8 and 10): full fine-tuning changes the pretrained weights
while masking never does (real CIFAR-10 ResNet-20 on real CIFAR-10 images), the storage each method
costs, and the paper's tables and figures rebuilt from a ledger of real (tiny) cells on the digits."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.reports.baselines import fig3, fig7, lowshot, sparsity_blocks, table1, table8, table10
from orchestrator.reports.intervals import t_interval
from orchestrator.reports.registry import figures, mean_std, tables
from orchestrator.spec.experiment import cell_id_of
from smn_core.analysis import grouped_density
from smn_core.augment import MultiCropConfig
from smn_core.backbones import build_backbone
from smn_core.checkpoint import save_tensors
from smn_core.data import load_dataset
from smn_core.masking import MaskConfig, attach_masks, iter_masked_tensors, score_parameters
from smn_core.pipeline import run_cell
from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
from smn_core.swav import SwAVConfig
from smn_core.training import TrainConfig, build_adaptation_model, train

from .conftest import shared_path

# tiers per test: the slow ones run in the ray tier's process, so that `pytest -m unit` stays fast


def _train(model, backbone, ds, cfg):
    adapt = build_adaptation_model(model, backbone.feature_dim, cfg, num_classes=len(ds.class_names))
    train(adapt, ds, cfg, image_size=32, mean=backbone.mean, std=backbone.std)
    return adapt


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_fft_changes_the_weights_while_masking_never_does():
    shared_path("weights", "resnet_cifar10")
    root = shared_path("data", "cifar10")
    ds = load_dataset("parquet", "train", root=str(root), max_samples=64)
    common = dict(epochs=1, batch_size=32, seed=0)
    # masking: scores move, every pretrained parameter stays bit for bit what it was
    bb = build_backbone("cifar_resnet20", "pretrained")
    before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    attach_masks(bb.model, MaskConfig())
    _train(bb.model, bb, ds, TrainConfig(objective="supervised", adaptation="mask", score_lr=50.0, **common))
    assert any(not torch.all(s == 1.0) for s in score_parameters(bb.model).values())
    masked = dict(iter_masked_tensors(bb.model))
    assert len(masked) == 19  # stem + 18 block convolutions (option-A shortcuts have no weights)
    for name, w in masked.items():
        assert torch.equal(w, before[name]), name
    for name, p in bb.model.named_parameters():
        if not name.endswith(".scores") and ".parametrizations." not in name:  # BatchNorm affine etc.
            assert torch.equal(p, before[name]), name
    # full fine-tuning: the same weights move
    bb2 = build_backbone("cifar_resnet20", "pretrained")
    _train(bb2.model, bb2, ds, TrainConfig(objective="supervised", adaptation="full", weight_lr=0.01, **common))
    after = dict(bb2.model.named_parameters())
    changed = [n for n in masked if not torch.equal(after[n], before[n])]
    assert len(changed) == len(masked)


@pytest.mark.unit
def test_fft_uses_its_own_warmup():
    cfg = TrainConfig(epochs=10, warmup_epochs=4, weight_warmup_epochs=0)
    assert cfg.weight_warmup_epochs == 0
    with pytest.raises(ValueError, match="weight_warmup_epochs"):
        TrainConfig(epochs=10, weight_warmup_epochs=11)


# ---------------------------------------------------------------------------------------------
# tables and figures from a ledger of real tiny cells

DATA = dict(source="digits", image_size=16, max_train_samples=120, max_test_samples=60)
FRACTIONS = [0.2, 0.05]


def _cells() -> list[tuple[CellConfig, dict]]:
    bb = BackboneSpec(arch="cifar_resnet8", weights="random")
    ev = EvalSpec(knn_k=20, lowshot_fractions=FRACTIONS)
    tr = TrainConfig(epochs=1, batch_size=32, score_lr=200.0, weight_lr=0.05, warmup_epochs=0,
                     swav=SwAVConfig(num_prototypes=10, queue_length=0, freeze_prototypes_steps=0),
                     multicrop=MultiCropConfig(n_global=2, n_local=2, local_size=8))
    out = [(CellConfig(method="pretrained", backbone=bb, dataset=DataSpec(**DATA), eval=ev), {})]
    for method in ("fft", "supervised_mask"):
        for seed in (0, 1):
            out.append((CellConfig(method=method, backbone=bb, dataset=DataSpec(**DATA), train=tr, eval=ev,
                                   seed=seed), {}))
        out.append((CellConfig(method=method, backbone=bb, dataset=DataSpec(**DATA, label_fraction=0.05), train=tr,
                               eval=ev), {"dataset.label_fraction": 0.05}))
    out.append((CellConfig(method="smn", backbone=bb, dataset=DataSpec(**DATA), train=tr, eval=ev), {}))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("results"))
    outcomes = {}
    for cfg, grid in _cells():
        out = run_cell(cfg)
        cid = cell_id_of(cfg)
        if out.masks is not None:
            save_tensors(ExperimentLayout.of(results, 'base').mask(cid), out.masks)
        ledger.write_cell(results, "base", cell_id=cid, method=cfg.method, backbone=cfg.backbone.arch,
                          dataset=cfg.dataset.source, seed=cfg.seed, grid=grid, config=cfg.to_dict(),
                          metrics=out.metrics, started_at=0.0, finished_at=1.0)
        outcomes[cid] = (cfg, out)
    return results, outcomes


def _ledger(results: str) -> pd.DataFrame:
    df = ledger.read_ledger(results)
    assert df.attrs["results"] == results  # where layouts that read masks find them
    return df


def _metric(outcomes, method, metric, label_fraction=None):
    return [o.metrics[metric] for c, o in outcomes.values()
            if c.method == method and c.dataset.label_fraction == label_fraction]


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_storage_and_head_metrics_per_method(results):
    _, outcomes = results
    for cfg, out in outcomes.values():
        m = out.metrics
        if cfg.method == "pretrained":
            assert m["storage_bits"] == 0.0 and "classifier_top1" not in m
        elif cfg.method == "fft":
            assert m["storage_bits"] == 32.0 * m["backbone_params"]
        else:
            assert m["storage_bits"] == m["mask_bits"] == sum(x.numel() for x in out.masks.values())
        if cfg.method in ("fft", "supervised_mask"):
            assert 0.0 <= m["classifier_top1"] <= 1.0
        if cfg.method != "pretrained":
            assert [m[f"train_loss@{e + 1}"] for e in range(len(out.history))] == [h["loss"] for h in out.history]


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_table1_rows_sizes_and_values(results):
    path, outcomes = results
    t = table1(_ledger(path))
    assert set(t.index.get_level_values("Method")) == {"k-NN", "k-NN (k=20)", "Linear probe", "FFT",
                                                      "Mask (supervised)", "SMN k-NN", "SMN k-NN (k=20)",
                                                      "SMN linear probe"}  # low-shot cells left out
    row = lambda m: t.loc[("cifar_resnet8", m)]  # noqa: E731
    assert row("k-NN")["Size (Mbit)"] == "n/a"
    params = next(o.metrics["backbone_params"] for _, o in outcomes.values())
    assert row("FFT")["Size (Mbit)"] == f"{32 * params / 1e6:.2f}"
    bits = _metric(outcomes, "supervised_mask", "mask_bits")[0]
    assert row("Mask (supervised)")["Size (Mbit)"] == f"{bits / 1e6:.2f}"
    fft = pd.Series(_metric(outcomes, "fft", "classifier_top1"))
    ci = t_interval(list(fft))  # two seeds: mean ± std and the 95 % interval of the mean
    assert row("FFT")["digits"] == mean_std(fft.mean(), fft.std(), 2) + f" [{ci.lo:.3f}, {ci.hi:.3f}]"
    assert row("k-NN")["digits"] == mean_std(_metric(outcomes, "pretrained", "knn_top1")[0])
    assert row("k-NN (k=20)")["digits"] == mean_std(_metric(outcomes, "pretrained", "knn_dino_top1")[0])
    assert "table1" in tables() and "fig3" in figures()


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_lowshot_table_and_fig3(results, tmp_path):
    path, outcomes = results
    t = lowshot(_ledger(path))
    assert list(t.columns) == ["100%", "100% vs frozen", "20%", "20% vs frozen", "5%", "5% vs frozen"]
    methods = list(t.index.get_level_values("Method"))
    assert methods == ["Linear probe (frozen)", "SMN + linear probe", "Mask (supervised)", "FFT"]
    frozen = t.loc[("cifar_resnet8", "digits", "Linear probe (frozen)")]
    assert frozen["5%"] == mean_std(_metric(outcomes, "pretrained", "lowshot_top1@0.05")[0])
    assert frozen["5% vs frozen"] == "reference"
    smn = t.loc[("cifar_resnet8", "digits", "SMN + linear probe")]  # one seed each: the difference, no interval
    gain = _metric(outcomes, "smn", "lowshot_top1@0.05")[0] - _metric(outcomes, "pretrained", "lowshot_top1@0.05")[0]
    assert smn["5% vs frozen"] == f"{100 * gain:+.1f} (1 seed)"
    fft = t.loc[("cifar_resnet8", "digits", "FFT")]
    assert fft["5%"] == mean_std(_metric(outcomes, "fft", "classifier_top1", 0.05)[0])
    assert fft["20%"] == fft["20% vs frozen"] == "-"  # supervised methods only where they were trained on that share
    out = tmp_path / "fig3.png"
    fig3(_ledger(path), str(out))
    assert out.stat().st_size > 10_000


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_table10_runs_mean_and_std(results):
    path, outcomes = results
    t = table10(_ledger(path)).reset_index()
    fft_knn = t[(t["Method"].str.startswith("fft")) & (t["Metric"] == "k-NN")].iloc[0]
    runs = [o.metrics["knn_top1"] for c, o in sorted(outcomes.values(), key=lambda x: x[0].seed)
            if c.method == "fft" and c.dataset.label_fraction is None]
    assert [fft_knn["R1"], fft_knn["R2"]] == [f"{v:.3f}" for v in runs]
    s = pd.Series(runs)
    assert fft_knn["Mean"] == f"{s.mean():.3f}"
    assert fft_knn["STD (ddof=1)"] == f"{s.std(ddof=1):.3f}" and fft_knn["STD (ddof=0)"] == f"{s.std(ddof=0):.3f}"
    assert set(t["Method"].str.split(" ").str[0]) == {"fft", "supervised_mask"}  # the only cells with 2 seeds


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_sparsity_tables_and_fig7_from_masks(results, tmp_path):
    path, outcomes = results
    t8 = table8(_ledger(path))
    assert set(t8.index.get_level_values("Method")) == {"supervised_mask", "supervised_mask (label_fraction=0.05)",
                                                       "smn"}
    dens = pd.Series(_metric(outcomes, "supervised_mask", "density"))
    ci = t_interval(list(dens))  # mean ± std [95 % interval] over the seeds, in %
    assert t8.loc[("cifar_resnet8", "supervised_mask"), "digits"] == (
        f"{100 * dens.mean():.1f}% ± {100 * dens.std():.1f} [{100 * ci.lo:.1f}, {100 * ci.hi:.1f}]")
    with pytest.raises(ValueError, match="results folder"):
        bare = ledger.read_ledger(path)
        bare.attrs.clear()  # rows that do not say where they came from: the masks cannot be found
        sparsity_blocks(bare)
    blocks = sparsity_blocks(_ledger(path)).reset_index()
    assert list(blocks.loc[blocks["Method"] == "smn", "Stage"]) == ["stem", "layer1", "layer2", "layer3"]
    smn = next(o for c, o in outcomes.values() if c.method == "smn")
    want = grouped_density(smn.masks, "block")
    got = blocks[blocks["Method"] == "smn"].set_index("Block")["digits"]
    assert {k: f"{100 * v:.1f}%" for k, v in want.items()} == got.to_dict()
    out = tmp_path / "fig7.png"
    fig7(_ledger(path), str(out))
    assert out.stat().st_size > 10_000
    cfgs = [json.loads(c) for c in ledger.read_ledger(path)["config_json"].unique()]
    assert any(c["dataset"].get("label_fraction") == 0.05 for c in cfgs)
