"""Pickle-free checkpoints: tensors in safetensors, metadata in JSON, written atomically.

A checkpoint is a folder with ``tensors.safetensors`` and ``meta.json``. Both are written to
temporary names and renamed, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "has_checkpoint", "save_tensors", "load_tensors"]

_TENSORS = "tensors.safetensors"
_META = "meta.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: tensor}`` to a ``.safetensors`` file atomically (tensors made contiguous, on CPU)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(clean, str(p), metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file (no pickle).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if the file is not a valid safetensors file (truncated, corrupted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save a checkpoint folder (tensors + JSON-serialisable ``meta``); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / _TENSORS, tensors)
    _atomic_write(folder / _META, lambda p: p.write_text(json.dumps(meta, sort_keys=True)))
    return folder


def has_checkpoint(folder: str | os.PathLike | None) -> bool:
    """True if ``folder`` holds a complete checkpoint."""
    return folder is not None and (Path(folder) / _TENSORS).is_file() and (Path(folder) / _META).is_file()


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint folder written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: if the folder is incomplete.
        ValueError: if a file is corrupted.
    """
    folder = Path(folder)
    if not has_checkpoint(folder):
        raise FileNotFoundError(f"no complete checkpoint in {folder} (need {_TENSORS} and {_META})")
    try:
        meta = json.loads((folder / _META).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / _META} is corrupted: {exc}") from exc
    return load_tensors(folder / _TENSORS), meta
