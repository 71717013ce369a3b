"""The cell configuration (``smn_core.config``) is torch-free, so ``smn validate`` and ``smn run --dry-run`` can
check a spec without importing torch (issue 27), and the old import paths still give the same classes."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or "").split(".")[0])
    return names


def test_config_module_imports_only_stdlib_numpy_and_the_registry():
    imported = _imported_modules(REPO / "smn_core" / "config.py")
    allowed = set(sys.stdlib_module_names) | {"numpy", ".registry"}
    assert imported - allowed == set(), imported - allowed
    # the one sibling it uses is torch-free as well
    assert _imported_modules(REPO / "smn_core" / "registry.py") <= set(sys.stdlib_module_names)


def test_old_import_paths_give_the_same_classes():
    from smn_core import augment, config, masking, pipeline, swav, training

    assert pipeline.CellConfig is config.CellConfig and pipeline.METHODS is config.METHODS
    assert training.TrainConfig is config.TrainConfig and masking.MaskConfig is config.MaskConfig
    assert swav.SwAVConfig is config.SwAVConfig and augment.MultiCropConfig is config.MultiCropConfig


def test_validation_still_runs_in_the_moved_dataclasses():
    from smn_core.config import CellConfig, MaskConfig, TrainConfig

    with pytest.raises(ValueError, match="mask selector 'nope' is not known"):
        MaskConfig(selector="nope")
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
    cell = CellConfig(method="fft", seed=3)
    assert (cell.train.objective, cell.train.adaptation, cell.train.seed) == ("supervised", "full", 3)


def test_torch_free_name_lists_match_the_registries():
    """``smn validate`` checks arch and dataset names against these lists, not the torch-importing registries."""
    import numpy as np
    from sklearn.datasets import load_digits

    from orchestrator.spec.experiment import DIGITS_CLASS_COUNTS
    from smn_core.backbones import available_backbones
    from smn_core.config import BUILTIN_BACKBONES, BUILTIN_DATASETS
    from smn_core.data import available_datasets

    assert sorted(BUILTIN_BACKBONES) == available_backbones()
    assert sorted(BUILTIN_DATASETS) == available_datasets()
    assert list(DIGITS_CLASS_COUNTS) == np.bincount(load_digits().target).tolist()
