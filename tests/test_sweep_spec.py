"""Sweep specs: grid axes that merge mappings, top-k at the found density, Optuna search sections."""

from __future__ import annotations

import pytest

from orchestrator.spec.experiment import SpecError, expand_cells, load_spec, pending_references, search_cell

from .conftest import REPO

pytestmark = pytest.mark.unit

MASK_AXIS = """
grid:
  train.mask:
    - {mode: threshold}
    - {mode: topk, topk_density: 0.5}
    - {mode: topk, topk_density: found}
  train.swav.num_prototypes: [20, 40]
"""


def test_found_cells_wait_for_their_threshold_cells(tiny_spec):
    spec = load_spec(tiny_spec("t2", extra=MASK_AXIS), ["methods=[smn]"])
    ready = expand_cells(spec)
    assert len(ready) == 4  # 2 threshold + 2 top-k 50 %
    refs = pending_references(spec)
    thresholds = {c.cell_id: c for c in ready if c.config.train.mask.mode == "threshold"}
    assert refs == set(thresholds)
    densities = {cid: 0.9 + 0.01 * i for i, cid in enumerate(sorted(refs))}
    full = expand_cells(spec, densities)
    assert len(full) == 6 and not pending_references(spec, densities)
    for c in full:
        if c.grid_values["train.mask"].get("topk_density") == "found":
            ref = [t for t in thresholds.values()
                   if t.config.train.swav.num_prototypes == c.config.train.swav.num_prototypes][0]
            assert c.config.train.mask.topk_density == densities[ref.cell_id]
            assert c.config.train.mask.mode == "topk"


def test_found_reference_is_added_when_the_grid_lacks_it(tiny_spec):
    extra = "grid:\n  train.mask:\n    - {mode: topk, topk_density: found}\n"
    spec = load_spec(tiny_spec("t3", extra=extra), ["methods=[smn]"])
    (ref,) = expand_cells(spec)
    assert ref.config.train.mask.mode == "threshold" and pending_references(spec) == {ref.cell_id}


def test_found_needs_topk_mode(tiny_spec):
    extra = "grid:\n  train.mask:\n    - {mode: threshold, topk_density: found}\n"
    with pytest.raises(SpecError, match="needs train.mask.mode 'topk'"):
        load_spec(tiny_spec("t4", extra=extra), ["methods=[smn]"])


def test_mapping_axis_merges_and_keeps_other_keys(tiny_spec):
    extra = "grid:\n  train.swav:\n    - {num_prototypes: 7}\n"
    (cell,) = expand_cells(load_spec(tiny_spec("t5", extra=extra), ["methods=[smn]"]))
    assert cell.config.train.swav.num_prototypes == 7
    assert cell.config.train.swav.queue_length == 0  # from the spec's train.swav, not the default


SEARCH = """
search:
  metric: knn_top1
  mode: max
  num_samples: 3
  space:
    train.score_lr: {type: loguniform, low: 10, high: 400}
    train.swav.num_prototypes: {type: choice, values: [10, 20]}
"""


def test_search_section_and_search_cells(tiny_spec):
    spec = load_spec(tiny_spec("s1", extra=SEARCH), ["methods=[smn]"])
    cell = search_cell(spec, {"train.score_lr": 77.0, "train.swav.num_prototypes": 10})
    assert cell.config.train.score_lr == 77.0 and cell.config.train.swav.num_prototypes == 10
    assert cell.grid_values == {"train.score_lr": 77.0, "train.swav.num_prototypes": 10}


@pytest.mark.parametrize("edit, overrides, fragment", [
    (None, [], "exactly one trained method"),  # the tiny spec has methods [pretrained, smn]
    (("low: 10", "low: 0"), ["methods=[smn]"], "low > 0"),
    (("low: 10, high: 400", "low: 10, high: 5"), ["methods=[smn]"], "low < high"),
    (None, ["methods=[smn]", "search.metric=accuracy"], "search.metric"),
    (None, ["methods=[smn]", "grid={train.epochs: [1, 2]}"], "either a grid or a search"),
])
def test_search_errors_name_the_problem(tiny_spec, edit, overrides, fragment):
    text = SEARCH.replace(*edit) if edit else SEARCH
    with pytest.raises(SpecError, match=fragment):
        load_spec(tiny_spec("s2", extra=text), overrides)


def test_grid_param_space_resolves_every_axis_for_cells_without_it():
    """A frozen cell has no train.* grid axis: its trial resolves the axis to None (a KeyError there used to stop
    the whole Tune run of a spec with methods [pretrained, smn] and a train.* grid)."""
    from orchestrator.engine.sweep import grid_param_space

    spec = load_spec(REPO / "experiments" / "table5b_frozen_small.yaml")
    cells = expand_cells(spec)
    space = grid_param_space(cells)
    resolve = space["train.mask.selector"].func
    values = {c.cell_id: resolve({"cell_id": c.cell_id}) for c in cells}
    assert {v for c, v in values.items()} == {None, "all", "all_but_norm", "all_but_bias"}
    assert all(values[c.cell_id] is None for c in cells if c.config.method == "pretrained")


VAL = "dataset.val_fraction=0.25"
SCHEDULED = """
grid:
  train.swav.num_prototypes: [4, 64]
search: {scheduler: asha, metric: val_knn_dino_top1, grace_epochs: 2}
"""


def test_a_grid_with_a_scheduler_is_a_tune_sweep_of_its_cells(tiny_spec):
    """``search:`` beside a grid holds the scheduler only: the grid's cells are the trials, a validation split
    is part of each cell (its id), and the default is no scheduler."""
    from orchestrator.engine.prepare import uses_tune

    spec = load_spec(tiny_spec("asha", extra=SCHEDULED), ["methods=[smn]", VAL])
    assert spec.search.scheduler == "asha" and spec.search.grace_epochs == 2 and spec.search.space == {}
    assert uses_tune(spec)
    cells = expand_cells(spec)
    assert len(cells) == 2 and all(c.config.dataset.val_fraction == 0.25 for c in cells)
    plain = load_spec(tiny_spec("plain"), ["methods=[smn]"])
    assert plain.dataset.val_fraction is None
    assert "val_fraction" not in expand_cells(plain)[0].config.to_dict()["dataset"]  # old cell ids stay
    assert {c.cell_id for c in expand_cells(load_spec(tiny_spec("v"), ["methods=[smn]", "dataset.val_fraction=0.25"]))} \
        != {c.cell_id for c in expand_cells(plain)}
    assert load_spec(tiny_spec("none", extra=SCHEDULED.replace("scheduler: asha", "scheduler: none")),
                     ["methods=[smn]", VAL]).search.scheduler == "none"


@pytest.mark.parametrize("search, overrides, fragment", [
    ("{scheduler: asha, metric: knn_top1}", [], "reported after every epoch"),
    ("{scheduler: median, metric: val_knn_dino_top1}", ["dataset.val_fraction=null"], "needs dataset.val_fraction"),
    ("{scheduler: hyperband, metric: train_loss}", [], "scheduler"),
    ("{scheduler: asha, metric: train_loss, mode: min, grace_epochs: 0}", [], "grace_epochs"),
])
def test_scheduler_errors_name_the_problem(tiny_spec, search, overrides, fragment):
    text = SCHEDULED.replace("search: {scheduler: asha, metric: val_knn_dino_top1, grace_epochs: 2}", f"search: {search}")
    with pytest.raises(SpecError, match=fragment):
        load_spec(tiny_spec("bad", extra=text), ["methods=[smn]", VAL, *overrides])


def test_an_empty_search_needs_a_grid(tiny_spec):
    with pytest.raises(SpecError, match="search.space is empty"):
        load_spec(tiny_spec("empty", extra="search: {scheduler: asha, metric: train_loss, mode: min}\n"),
                  ["methods=[smn]"])
