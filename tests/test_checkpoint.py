"""Tests for smn_core.checkpoint: safetensors + JSON checkpoints, atomic writes, error reporting."""

from __future__ import annotations

import pytest
import torch

from smn_core.checkpoint import has_checkpoint, load_checkpoint, load_tensors, save_checkpoint, save_tensors

pytestmark = pytest.mark.unit


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "param.backbone.0.scores": torch.randn(4, 3, 3, 3, generator=g),
        "buffer.queue_filled": torch.tensor(17, dtype=torch.long),
        "mask": torch.rand(5, 7, generator=g) > 0.5,
        "double": torch.randn(3, generator=g, dtype=torch.float64),
        "transposed": torch.randn(3, 4, generator=g).t(),  # non-contiguous input
    }


def test_checkpoint_round_trip(tmp_path):
    tensors = _tensors()
    meta = {"epoch": 3, "step": 120, "history": [{"epoch": 0, "loss": 1.5}], "name": "cifar10[0,1]"}
    folder = save_checkpoint(tmp_path / "ckpt" / "nested", tensors, meta)
    assert folder == tmp_path / "ckpt" / "nested"
    assert has_checkpoint(folder)
    loaded, loaded_meta = load_checkpoint(folder)
    assert loaded_meta == meta
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    # no temporary files are left behind
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "tensors.safetensors"]


def test_checkpoint_overwrite_replaces_content(tmp_path):
    save_checkpoint(tmp_path, {"a": torch.zeros(2)}, {"epoch": 0})
    save_checkpoint(tmp_path, {"b": torch.ones(3)}, {"epoch": 1})
    tensors, meta = load_checkpoint(tmp_path)
    assert meta == {"epoch": 1}
    assert list(tensors) == ["b"] and torch.equal(tensors["b"], torch.ones(3))


def test_save_load_tensors_with_metadata(tmp_path):
    path = tmp_path / "sub" / "masks.safetensors"
    tensors = _tensors()
    save_tensors(path, tensors, metadata={"format": "smn"})
    loaded = load_tensors(path)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())


def test_truncated_tensor_file_raises_value_error_with_path(tmp_path):
    save_checkpoint(tmp_path, _tensors(), {"epoch": 0})
    path = tmp_path / "tensors.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        load_checkpoint(tmp_path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError) as info:
        load_tensors(path)
    assert str(path) in str(info.value)


def test_garbage_tensor_file_raises_value_error(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="x.safetensors"):
        load_tensors(path)


def test_missing_meta_raises_file_not_found(tmp_path):
    save_checkpoint(tmp_path, _tensors(), {"epoch": 0})
    (tmp_path / "meta.json").unlink()
    assert not has_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_checkpoint(tmp_path)


def test_missing_tensors_or_folder_raises_file_not_found(tmp_path):
    save_checkpoint(tmp_path, _tensors(), {"epoch": 0})
    (tmp_path / "tensors.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "none.safetensors")
    assert not has_checkpoint(None)


def test_corrupted_meta_raises_value_error(tmp_path):
    save_checkpoint(tmp_path, _tensors(), {"epoch": 0})
    (tmp_path / "meta.json").write_text('{"epoch": ')
    with pytest.raises(ValueError, match="meta.json"):
        load_checkpoint(tmp_path)


def test_meta_must_be_json_serialisable(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, {"a": torch.zeros(1)}, {"bad": object()})
    # the failed write leaves no meta (and no temporary file) behind: not a complete checkpoint
    assert not has_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensors.safetensors"]


def test_checkpoint_round_trip_on_a_file_uri(tmp_path):
    """A ``file://`` URI goes through pyarrow.fs (temporary name + move), with the same results."""
    from smn_core.checkpoint import delete_checkpoint, location_exists

    folder = f"file://{tmp_path}/uri/ckpt"
    tensors = _tensors()
    assert not has_checkpoint(folder)
    assert save_checkpoint(folder, tensors, {"epoch": 2}) == folder
    assert has_checkpoint(folder) and location_exists(f"{folder}/tensors.safetensors")
    loaded, meta = load_checkpoint(folder)
    assert meta == {"epoch": 2} and all(torch.equal(loaded[k], t) for k, t in tensors.items())
    assert sorted(p.name for p in (tmp_path / "uri" / "ckpt").iterdir()) == ["meta.json", "tensors.safetensors"]
    (tmp_path / "uri" / "ckpt" / "meta.json").unlink()  # tensors without meta.json: half-written
    assert not has_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(folder)
    delete_checkpoint(folder)
    assert not (tmp_path / "uri" / "ckpt").exists()
    with pytest.raises(ValueError, match="not a URI that pyarrow.fs supports"):
        save_tensors("ftp://host/x.safetensors", tensors)
