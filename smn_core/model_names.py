"""timm's model names without importing timm: a list cached once per timm version (torch-free).

Importing timm imports torch and torchvision (5-15 s on a small machine), which made ``smn run`` refuse a
``backbone.arch: timm/nosuchnet`` only after that wait. The names timm knows are fixed by its version, so
:func:`save_timm_names` writes them once (``timm.list_models()``, when anything has imported timm anyway, or
``scripts/setup.sh``) to ``<cache>/smn/timm-models-<version>.json`` (``<cache>``: ``$XDG_CACHE_HOME``, else
``~/.cache``), and :func:`check_timm_name` reads that file: the installed version is read from the package's
metadata (:mod:`importlib.metadata`), never by importing it. With no cache for the installed version, the
check says "unknown" (None) and the caller imports timm as before.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Iterable

__all__ = ["timm_version", "timm_names_file", "timm_names", "save_timm_names", "check_timm_name"]


def timm_version() -> str | None:
    """The installed timm's version from its package metadata (no import of timm), or None when absent."""
    try:
        return metadata.version("timm")
    except metadata.PackageNotFoundError:
        return None


def timm_names_file(version: str) -> Path:
    """Where the model names of timm ``version`` are cached: ``<cache>/smn/timm-models-<version>.json``."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "smn" / f"timm-models-{version}.json"


def timm_names(version: str | None = None) -> frozenset[str] | None:
    """The architecture names timm ``version`` (default: the installed one) knows, from the cache; None when
    timm is not installed or its names are not cached (or the file cannot be read)."""
    version = version or timm_version()
    if version is None:
        return None
    try:
        data = json.loads(timm_names_file(version).read_text())
    except (OSError, ValueError):
        return None
    names = data.get("models") if isinstance(data, dict) and data.get("timm") == version else None
    return frozenset(names) if isinstance(names, list) and names else None


def save_timm_names(names: Iterable[str], version: str) -> Path:
    """Cache ``names`` (``timm.list_models()``) as the model names of timm ``version``; returns the file.
    Written atomically (a temporary file, then a rename), so a reader never sees half a list."""
    path = timm_names_file(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"timm": version, "models": sorted(set(names))}))
    os.replace(tmp, path)
    return path


def check_timm_name(name: str) -> bool | None:
    """Whether timm knows the architecture of ``name`` (``resnet18``, ``resnet18.a1_in1k``: the pretrained tag
    after the first ``.`` is ignored, as ``timm.is_model`` does), from the cached names; None when there is
    no cache for the installed timm (the caller asks timm itself).

    Raises:
        ValueError: the cache says timm has no such model (one line naming it and what is allowed).
    """
    names = timm_names()
    if names is None:
        return None
    if not name or name.split(".", 1)[0] not in names:
        raise ValueError(f"backbone.arch 'timm/{name}': timm has no model {name!r}; allowed: a name from "
                         f"timm.list_models() (e.g. timm/resnet18, timm/convnext_tiny, timm/vit_small_patch16_224)")
    return True
