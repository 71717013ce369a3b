"""The random-mask control (issue 25): the mask drawing (unit) and the dependent ``random_mask`` cells (spec)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smn_core.random_mask import MAGNITUDE_BINS, draw_random_mask, draw_random_masks

pytestmark = pytest.mark.unit


def _trained(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weights and a 'trained' mask that prunes mostly the smallest |W| (as SMN does), two layers."""
    g = torch.Generator().manual_seed(seed)
    weights = {"layer3.0.conv1.weight": torch.randn(16, 8, 3, 3, generator=g),
               "layer3.0.conv2.weight": torch.randn(16, 16, 3, 3, generator=g)}
    masks = {}
    for name, w in weights.items():
        p_drop = torch.sigmoid(-4 * w.abs() + 1)  # small |W|: likely pruned
        masks[name] = torch.rand(w.shape, generator=g) > p_drop
    return weights, masks


@pytest.mark.parametrize("match", ["count", "magnitude"])
def test_same_count_per_layer_and_never_the_trained_mask(match):
    weights, trained = _trained()
    drawn = draw_random_masks(trained, match=match, weights=weights, seed=0)
    for name, m in trained.items():
        assert drawn[name].dtype == torch.bool and drawn[name].shape == m.shape
        assert int(drawn[name].sum()) == int(m.sum())
        assert not torch.equal(drawn[name], m)
    again = draw_random_masks(trained, match=match, weights=weights, seed=0)
    other = draw_random_masks(trained, match=match, weights=weights, seed=1)
    assert all(torch.equal(again[n], drawn[n]) for n in trained)  # seeded
    assert any(not torch.equal(other[n], drawn[n]) for n in trained)


def test_nearly_full_mask_still_differs():
    """A mask that keeps all weights but one: the draw may land on it; the set is made to differ anyway."""
    for seed in range(20):
        trained = {"w": torch.ones(3, 3, dtype=torch.bool)}
        trained["w"][1, 1] = False
        drawn = draw_random_masks(trained, match="count", seed=seed)
        assert int(drawn["w"].sum()) == 8 and not torch.equal(drawn["w"], trained["w"])


def test_full_mask_has_no_control():
    with pytest.raises(ValueError, match="keeps every weight"):
        draw_random_masks({"w": torch.ones(4, 4, dtype=torch.bool)}, seed=0)


def _kept_magnitude_hist(w: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    edges = np.quantile(w.abs().numpy(), np.linspace(0, 1, 11))
    hist, _ = np.histogram(w.abs()[m].numpy(), bins=edges)
    return hist / hist.sum()


def test_magnitude_match_keeps_the_kept_weights_magnitude_distribution():
    weights, trained = _trained(3)
    mag = draw_random_masks(trained, match="magnitude", weights=weights, seed=0)
    cnt = draw_random_masks(trained, match="count", weights=weights, seed=0)
    for name, w in weights.items():
        ref = _kept_magnitude_hist(w, trained[name])
        # total-variation distance of the kept |W| deciles: magnitude-matched is close, uniform is not
        tv_mag = 0.5 * np.abs(_kept_magnitude_hist(w, mag[name]) - ref).sum()
        tv_cnt = 0.5 * np.abs(_kept_magnitude_hist(w, cnt[name]) - ref).sum()
        assert tv_mag < 0.03 < tv_cnt, (name, tv_mag, tv_cnt)
        # exactly the trained count in each of the MAGNITUDE_BINS quantile bins
        order = torch.argsort(w.abs().flatten().double(), stable=True)
        for chunk in torch.tensor_split(order, MAGNITUDE_BINS):
            assert int(mag[name].flatten()[chunk].sum()) == int(trained[name].flatten()[chunk].sum())


def test_bad_match_and_missing_weights_are_refused():
    weights, trained = _trained()
    with pytest.raises(ValueError, match="match 'uniform' is not known; allowed: count, magnitude"):
        draw_random_mask(trained["layer3.0.conv1.weight"], match="uniform")
    with pytest.raises(ValueError, match="needs the weights of every masked tensor"):
        draw_random_masks(trained, match="magnitude", weights={}, seed=0)


# ------------------------------------------------------------------------------------ the dependent cells

def test_controls_are_dependent_cells_of_their_smn_cell(tiny_spec):
    from orchestrator.spec.experiment import control_reference, expand_cells, load_spec, pending_references

    spec = load_spec(tiny_spec(), ["methods=[random_mask,random_mask_magnitude]", "seeds=[0,1]"])
    (ref0, ref1) = expand_cells(spec)  # only the SMN references are ready: added although the spec omits smn
    assert [c.config.method for c in (ref0, ref1)] == ["smn", "smn"]
    assert pending_references(spec) == {ref0.cell_id, ref1.cell_id}
    cells = expand_cells(spec, {ref0.cell_id: 0.97})  # seed 0's SMN cell landed: its two controls are ready
    controls = [c for c in cells if c.config.method != "smn"]
    assert sorted(c.config.method for c in controls) == ["random_mask", "random_mask_magnitude"]
    assert {control_reference(c.config) for c in controls} == {ref0.cell_id}
    assert all(c.config.train == ref0.config.train for c in controls)  # the SMN cell's settings: same selector
    assert pending_references(spec, {ref0.cell_id: 0.97}) == {ref1.cell_id}


def test_control_without_its_smn_mask_fails_with_a_clear_error(tiny_spec, tmp_path):
    from orchestrator.engine.prepare import cell_jobs
    from orchestrator.results.layout import ExperimentLayout
    from orchestrator.spec.experiment import expand_cells, load_spec

    spec = load_spec(tiny_spec(), ["methods=[random_mask]"])
    (ref,) = expand_cells(spec)
    (control,) = [c for c in expand_cells(spec, {ref.cell_id: 0.9}) if c.config.method == "random_mask"]
    (job,) = cell_jobs([control], ExperimentLayout.of(str(tmp_path), spec.name), {})
    with pytest.raises(FileNotFoundError, match=f"needs the masks of its SMN cell {ref.cell_id}"):
        job.stage.run(job, "cpu")
