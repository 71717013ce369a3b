"""The validation split carved out of train (issue 25, ``dataset.val_fraction``): stratified, seeded, disjoint
from the test split and from the train part that remains."""

from __future__ import annotations

import numpy as np
import pytest

from smn_core.data import load_dataset, split_validation, train_val_split

pytestmark = pytest.mark.unit


def test_split_is_stratified_disjoint_and_deterministic():
    labels = np.repeat(np.arange(5), [40, 60, 80, 100, 120])
    tr, va = train_val_split(labels, 0.25, seed=3)
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(labels)))
    for c, n in zip(range(5), [40, 60, 80, 100, 120]):  # every class gives its share, up to rounding
        assert abs((labels[va] == c).sum() - 0.25 * n) <= 1
    tr2, va2 = train_val_split(labels, 0.25, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    _, va_other = train_val_split(labels, 0.25, seed=4)
    assert not np.array_equal(va, va_other)


def test_validation_of_real_digits_never_touches_test():
    train = load_dataset("digits", "train", classes=[5, 6, 7, 8, 9], split_seed=0)
    test = load_dataset("digits", "test", classes=[5, 6, 7, 8, 9], split_seed=0)
    rest, val = split_validation(train, 0.2, seed=0)
    ids = [set(d.source_indices.tolist()) for d in (rest, val, test)]
    assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]
    assert len(rest) + len(val) == len(train)
    assert set(np.unique(val.targets)) == set(np.unique(train.targets))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, True, "0.2"])
def test_bad_fraction_is_one_line_error(bad):
    with pytest.raises(ValueError, match=r"dataset.val_fraction must be in \(0, 1\)"):
        train_val_split(np.arange(10) % 2, bad, seed=0)


def test_unsplittable_class_is_named():
    with pytest.raises(ValueError, match="cannot carve a stratified validation split"):
        train_val_split(np.array([0, 0, 0, 0, 1]), 0.4, seed=0)


def test_val_fraction_off_keeps_cell_ids_and_on_makes_a_new_setting():
    from orchestrator.spec.experiment import SpecError, expand_cells, load_spec

    from .conftest import REPO

    demo = REPO / "experiments" / "demo.yaml"
    before = {c.config.method: c.cell_id for c in expand_cells(load_spec(demo, ["seeds=[0]"]))}
    # the committed demo ledger holds that SMN seed-0 cell: a field left unset keeps the ids it was written with
    assert (REPO / "docs" / "results" / "demo" / "ledger" / f"{before['smn']}.parquet").exists(), before
    val = {c.config.method: c for c in expand_cells(load_spec(demo, ["seeds=[0]", "dataset.val_fraction=0.2"]))}
    assert val["smn"].cell_id != before["smn"] and val["smn"].config.to_dict()["dataset"]["val_fraction"] == 0.2
    with pytest.raises(SpecError, match=r"val_fraction must be in \(0, 1\) or null, got 1.0"):
        load_spec(demo, ["dataset.val_fraction=1.0"])


def test_cell_on_validation_reports_val_metrics_only():
    """A frozen cell with val_fraction: its evaluation is named val_*, on the validation images of train."""
    from smn_core.config import BackboneSpec, CellConfig, DataSpec, EvalSpec
    from smn_core.pipeline import load_cell_data, run_cell

    data = DataSpec(source="digits", classes=[5, 6, 7], image_size=16, max_train_samples=90, val_fraction=0.3)
    cfg = CellConfig(method="pretrained", backbone=BackboneSpec(arch="cifar_resnet8", weights="random"),
                     dataset=data, eval=EvalSpec(knn_k=10, knn_dino_k=5))
    train, val = load_cell_data(data)
    assert (len(train), len(val)) == (63, 27)
    out = run_cell(cfg)
    assert {"val_knn_top1", "val_knn_dino_top1", "val_linear_probe_top1", "val_num_test"} <= set(out.metrics)
    assert not {"knn_top1", "linear_probe_top1", "num_test"} & set(out.metrics)
    assert out.metrics["val_num_test"] == 27 and out.metrics["num_train"] == 63
    assert set(out.per_image) == {"val_knn_top1", "val_knn_dino_top1", "val_linear_probe_top1"}


def test_validation_metrics_have_their_own_table_and_never_the_test_one(tmp_path):
    """The committed demo ledger with its metrics renamed as a val_fraction run writes them: vs_frozen_val
    builds from them, vs_frozen (test split) does not."""
    import pandas as pd

    from orchestrator.reports import registry
    from orchestrator.reports.vs_frozen import VALIDATION
    from orchestrator.results import ledger

    from .conftest import REPO

    import shutil

    # the ledger alone: its per-image files pair the test metrics over images, the renamed ones have none
    shutil.copytree(REPO / "docs" / "results" / "demo" / "ledger", tmp_path / "demo" / "ledger")
    rows = ledger.read_ledger(str(tmp_path), "demo")
    names = {m[len("val_"):] for m, _ in VALIDATION}
    val = rows.assign(metric=rows["metric"].map(lambda m: f"val_{m}" if m in names else m))
    assert registry.tables()["vs_frozen"].build(val).empty
    vs = registry.tables()["vs_frozen_val"].build(val).reset_index()
    test = registry.tables()["vs_frozen"].build(rows).reset_index()
    smn_val, smn_test = (t[t["Method"] == "smn"].iloc[0] for t in (vs, test))
    assert smn_val["val k-NN (k=20) vs frozen"] == smn_test["k-NN (k=20) vs frozen"] != ""
    assert isinstance(vs, pd.DataFrame) and "k-NN (k=20)" not in vs
