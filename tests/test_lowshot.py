"""Low-shot (paper Fig. 3): per-class label sampling never drops a class, low-shot probes on real
digits, the labelled subset of supervised low-shot training, and the config rules around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from smn_core.data import load_dataset
from smn_core.evaluation import lowshot_linear_probe, per_class_sample
from smn_core.pipeline import labelled_subset, lowshot_metric, run_cell
from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
from smn_core.training import TrainConfig

# tiers per test: the slow ones run in the ray tier's process, so that `pytest -m unit` stays fast

# NOTES.md: CIFAR 10, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625 %; SUN397 10, 8, 6, 4 %
PAPER_FRACTIONS = [0.1, 0.08, 0.06, 0.04, 0.02, 0.01, 0.005, 0.0025, 0.00125, 0.000625]


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def imbalanced_labels() -> np.ndarray:
    """A long-tailed label set: class c has 2**c examples (1, 2, 4, ..., 512), shuffled."""
    y = np.concatenate([np.full(2 ** c, c) for c in range(10)])
    return np.random.default_rng(0).permutation(y)


@pytest.mark.unit
@pytest.mark.parametrize("fraction", PAPER_FRACTIONS)
def test_per_class_sampling_never_drops_a_class(digits, fraction):
    for labels in (digits[1], imbalanced_labels()):
        idx = per_class_sample(labels, fraction, seed=3)
        assert len(np.unique(idx)) == len(idx)
        kept = labels[idx]
        assert set(kept) == set(labels)  # every class keeps at least one example
        for c in np.unique(labels):
            n_c = int((labels == c).sum())
            assert int((kept == c).sum()) == min(n_c, max(1, round(fraction * n_c)))


@pytest.mark.unit
def test_uniform_sampling_would_drop_rare_classes():
    """Why the sampling is per class: a uniform 1 % sample of the long-tailed labels loses classes."""
    labels = imbalanced_labels()
    uniform = np.random.default_rng(42).choice(len(labels), size=round(0.01 * len(labels)), replace=False)
    assert len(set(labels[uniform])) < 10
    assert len(set(labels[per_class_sample(labels, 0.01, seed=42)])) == 10


@pytest.mark.unit
def test_lowshot_probe_uses_only_the_sampled_labels(digits):
    x, y = digits
    order = np.random.default_rng(0).permutation(len(y))
    tr, te = order[:1200], order[1200:]
    res = lowshot_linear_probe(x[tr], y[tr], x[te], y[te], [0.1, 0.01, 0.000625], seed=0, max_iter=500)
    assert list(res) == [0.1, 0.01, 0.000625]
    # 0.0625 % keeps one image per class: still far above chance, far below 10 % of the labels
    assert res[0.000625].top1 > 0.3
    assert res[0.1].top1 > res[0.000625].top1 + 0.1
    assert res[0.1].top1 > 0.85
    # the probe at a fraction equals a probe fitted on exactly that per-class sample
    from smn_core.evaluation import linear_probe

    idx = per_class_sample(y[tr], 0.01, seed=0)
    direct = linear_probe(x[tr][idx], y[tr][idx], x[te], y[te], max_iter=500)
    assert res[0.01].top1 == direct.top1
    with pytest.raises(ValueError, match="must not repeat"):
        lowshot_linear_probe(x[tr], y[tr], x[te], y[te], [0.1, 0.1])
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        lowshot_linear_probe(x[tr], y[tr], x[te], y[te], [0.1, 1.5])


@pytest.mark.unit
def test_labelled_subset_repeats_a_small_sample_to_one_batch():
    ds = load_dataset("digits", "train", image_size=16)
    sub = labelled_subset(ds, 0.01, seed=0, min_size=64)
    unique = np.unique(sub.source_indices)
    assert len(unique) == sum(max(1, round(0.01 * int((ds.targets == c).sum()))) for c in range(10)) == 10
    assert set(sub.targets.tolist()) == set(range(10))
    assert len(sub) >= 64 and len(sub) % len(unique) == 0
    big = labelled_subset(ds, 0.5, seed=0, min_size=64)
    assert len(big) == len(np.unique(big.source_indices))  # large enough: no repetition
    with pytest.raises(ValueError, match="min_size"):
        labelled_subset(ds, 0.5, min_size=0)


@pytest.mark.unit
def test_label_fraction_only_matters_for_supervised_training():
    data = DataSpec(source="digits", label_fraction=0.05)
    assert CellConfig(method="supervised_mask", dataset=data).dataset.label_fraction == 0.05
    assert CellConfig(method="fft", dataset=data).dataset.label_fraction == 0.05
    for method in ("pretrained", "smn", "stn"):  # unlabeled adaptation: one cell serves every fraction
        assert CellConfig(method=method, dataset=data).dataset.label_fraction is None
    with pytest.raises(ValueError, match="label_fraction must be in"):
        DataSpec(label_fraction=0.0)
    with pytest.raises(ValueError, match="lowshot_fractions"):
        EvalSpec(lowshot_fractions=[0.1, 2.0])
    with pytest.raises(ValueError, match="lowshot_fractions"):
        EvalSpec(lowshot_fractions=[0.1, 0.1])


@pytest.mark.ray  # slow and in-process: runs in the ray tier's process
@pytest.mark.slow
def test_run_cell_reports_lowshot_probes_and_trains_on_the_labelled_share():
    data = dict(source="digits", image_size=16, max_train_samples=300, max_test_samples=120)
    ev = EvalSpec(knn_k=20, lowshot_fractions=[0.2, 0.02])
    frozen = run_cell(CellConfig(method="pretrained", backbone=BackboneSpec(arch="cifar_resnet8", weights="random"),
                                 dataset=DataSpec(**data), eval=ev))
    for f in (0.2, 0.02):
        assert 0.0 <= frozen.metrics[lowshot_metric(f)] <= 1.0
    assert lowshot_metric(0.02) == "lowshot_top1@0.02"
    torch.manual_seed(0)
    sup = run_cell(CellConfig(
        method="fft", backbone=BackboneSpec(arch="cifar_resnet8", weights="random"),
        dataset=DataSpec(**data, label_fraction=0.02), eval=ev,
        train=TrainConfig(epochs=1, batch_size=32, weight_lr=0.05)))
    assert sup.metrics["num_labelled"] == 10  # 2 % of ~30 per class rounds to one image per class
    assert sup.metrics["steps"] == 300 // 32  # the 10 labelled images, repeated to the split's 300
    assert 0.0 <= sup.metrics["classifier_top1"] <= 1.0
