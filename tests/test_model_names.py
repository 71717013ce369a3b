"""timm's model names cached per timm version (smn_core.model_names): a bad ``timm/<name>`` is refused from the
cache without importing timm; no cache: timm is asked, and its names are cached for next time."""

from __future__ import annotations

import sys

import pytest

from orchestrator.cli.app import main as smn_main
from smn_core import model_names

pytestmark = pytest.mark.unit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_names_are_cached_per_version_and_tags_are_ignored(cache):
    version = model_names.timm_version()
    assert version and model_names.check_timm_name("resnet18") is None  # nothing cached yet: ask timm
    path = model_names.save_timm_names(["resnet18", "convnext_tiny"], version)
    assert path == cache / "smn" / f"timm-models-{version}.json"
    assert model_names.check_timm_name("resnet18") and model_names.check_timm_name("resnet18.a1_in1k")
    with pytest.raises(ValueError, match="timm has no model 'nosuchnet'"):
        model_names.check_timm_name("nosuchnet")
    assert model_names.timm_names("0.0.1") is None  # another timm version: its own list
    path.write_text("{not json")
    assert model_names.check_timm_name("nosuchnet") is None  # a damaged cache: ask timm


def test_smn_run_refuses_an_unknown_timm_name_from_the_cache_without_importing_timm(cache, tiny_spec, tmp_path,
                                                                                       monkeypatch, capsys):
    model_names.save_timm_names(["resnet18"], model_names.timm_version())
    monkeypatch.setitem(sys.modules, "timm", None)  # any `import timm` would raise ImportError
    code = smn_main(["run", str(tiny_spec("nosuch")), "--results", str(tmp_path / "r"),
                     "backbone.arch=timm/nosuchnet", "backbone.weights=random"])
    err = capsys.readouterr().err
    assert code == 2 and "timm has no model 'nosuchnet'" in err, err
    assert not (tmp_path / "r").exists()


def test_check_arch_without_a_cache_asks_timm_and_caches_its_names(cache):
    from smn_core.backbones import check_arch

    with pytest.raises(ValueError, match="timm has no model 'nosuchnet'"):
        check_arch("timm/nosuchnet", "random")
    names = model_names.timm_names()
    assert names is not None and {"resnet18", "convnext_tiny", "vit_tiny_patch16_224"} <= names
    check_arch("timm/resnet18", "random")
