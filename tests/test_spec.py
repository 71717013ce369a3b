"""Spec validation and cell expansion (orchestrator.spec.experiment): bad input fails before any work."""

from __future__ import annotations

import pytest

from orchestrator.spec.experiment import SpecError, cell_id_of, expand_cells, load_spec, parse_overrides

from .conftest import REPO

pytestmark = pytest.mark.unit


def test_demo_spec_is_valid_and_has_its_three_methods_on_three_seeds():
    spec = load_spec(REPO / "experiments" / "demo.yaml")
    cells = expand_cells(spec)
    assert [c.config.method for c in cells] == ["pretrained"] * 3 + ["pretrained_bn"] * 3 + ["smn"] * 3
    assert [c.config.seed for c in cells] == [0, 1, 2] * 3
    assert spec.backbone.weights == "pipeline" and spec.pretrain is not None
    assert len({c.cell_id for c in cells}) == 9


@pytest.mark.parametrize("override, fragment", [
    ("train.epochz=3", "train.epochz: unknown key"),
    ("train.epochs=0", "train.epochs: got 0; allowed: 1 <= epochs"),
    ("train.swav.temperature=-1", "train.swav.temperature: got -1; allowed: a number > 0"),
    ("methods=[smn,foo]", "'foo'"),
    ("train.objective=clustering", "train.objective: Input should be 'swav' or 'supervised', got 'clustering'"),
    ("backbone.weights=magic", "backbone.weights 'magic' is not known"),
    ("train.mask.selector=convs", "mask selector 'convs' is not known"),
    ("seeds=[1,1]", "seeds must be unique"),
    ("grid={model.depth: [1]}", "grid key 'model.depth' must start with"),
    ("name=bad/name", "name"),
    ("train.batch_size=abc", "train.batch_size"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(SpecError) as err:
        load_spec(REPO / "experiments" / "demo.yaml", [override])
    assert fragment in str(err.value)


def test_bad_grid_value_names_grid_key(tiny_spec):
    path = tiny_spec(extra="grid: {train.swav.num_prototypes: [10, -5]}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "train.swav.num_prototypes=-5" in str(err.value)


def test_missing_file_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(bad)
    with pytest.raises(SpecError, match="KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_grid_and_seeds_expand_and_pretrained_cells_are_shared(tiny_spec):
    path = tiny_spec(extra="grid: {train.swav.num_prototypes: [10, 20, 30]}\n")
    spec = load_spec(path, ["seeds=[0,1]"])
    cells = expand_cells(spec)
    smn = [c for c in cells if c.config.method == "smn"]
    pre = [c for c in cells if c.config.method == "pretrained"]
    assert len(smn) == 6
    # the training grid does not change what a frozen backbone computes: one pretrained cell per seed
    assert len(pre) == 2
    assert {c.config.train.swav.num_prototypes for c in smn} == {10, 20, 30}
    assert all(c.config.train.seed == c.config.seed for c in cells)


def test_cell_id_is_stable_and_sensitive(tiny_spec):
    a = expand_cells(load_spec(tiny_spec()))
    b = expand_cells(load_spec(tiny_spec()))
    assert [c.cell_id for c in a] == [c.cell_id for c in b]
    c = expand_cells(load_spec(tiny_spec(), ["train.score_lr=25"]))
    assert a[0].cell_id == c[0].cell_id          # pretrained cell: training settings do not matter
    assert a[1].cell_id != c[1].cell_id          # smn cell: they do
    assert cell_id_of(a[1].config) == a[1].cell_id


def test_method_overrides_change_only_their_method_and_bad_ones_are_refused(tiny_spec):
    """Table 1 runs supervised masking and SMN side by side: each keeps its own learning rate."""
    path = tiny_spec(extra="method_overrides: {smn: {train.score_lr: 7.5, train.bn_mode: adapt}}\n")
    cells = {c.config.method: c for c in expand_cells(load_spec(path))}
    assert cells["smn"].config.train.score_lr == 7.5 and cells["smn"].config.train.bn_mode == "adapt"
    plain = {c.config.method: c for c in expand_cells(load_spec(tiny_spec(name="plain")))}
    assert cells["pretrained"].cell_id == plain["pretrained"].cell_id   # untouched method: same cell
    assert cells["smn"].cell_id != plain["smn"].cell_id
    # a command-line override reads the same as the nested YAML form, and a grid still wins over it
    cli = expand_cells(load_spec(path, ["method_overrides.smn.train.score_lr=9", "grid={train.score_lr: [3]}"]))
    assert [c.config.train.score_lr for c in cli if c.config.method == "smn"] == [3.0]
    # a known method the spec does not run is refused, unless the block is marked as shared defaults
    # (methods=[smn] on a Table 1 spec); a typo always is
    assert len(expand_cells(load_spec(path, ["method_overrides.fft.train.score_lr=1",
                                             "method_overrides.shared_defaults=true"]))) == 2
    with pytest.raises(SpecError, match="'fft', which this spec does not run"):
        load_spec(path, ["method_overrides.fft.train.score_lr=1"])
    for override, fragment in (("method_overrides.smnn.train.score_lr=1", "method 'smnn', which is not known"),
                               ("method_overrides.smn.backbone.arch=x", "must be a dotted key under train."),
                               ("method_overrides.smn.train.nope=1", "train.nope: unknown key"),
                               ("method_overrides.smn.train.score_lr=abc", "train.score_lr")):
        with pytest.raises(SpecError) as err:
            load_spec(path, [override])
        assert fragment in str(err.value), override
