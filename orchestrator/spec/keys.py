"""Dotted keys: nested mappings as ``section.key`` paths, as spec overrides, grids and trackers name them.

Imports nothing heavy (no torch, no pydantic), so readers of the ledger (the report page, the trackers)
use it as freely as the spec loader does.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from typing import Any

__all__ = ["flatten", "config_hash", "setting_config", "setting_id"]


def flatten(d: dict, prefix: str = "", *, keep_empty: bool = False) -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"train": {"score_lr": 1}}`` -> ``{"train.score_lr": 1}``.

    Args:
        d: a (nested) mapping.
        prefix: put before every key (``"train."`` gives ``train.score_lr``).
        keep_empty: an empty mapping stays as a value (``{"a": {}}`` -> ``{"a": {}}``, as spec overrides
            need); False drops it (``{}``: nothing to show or log).
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (v or not keep_empty):
            out.update(flatten(v, key + ".", keep_empty=keep_empty))
        else:
            out[key] = v
    return out


def config_hash(payload: dict) -> str:
    """The one config hash of smn: SHA-256 (first 16 hex digits) of ``payload``'s canonical JSON (sorted keys,
    no spaces, non-JSON values as ``str``). Cell ids (:func:`orchestrator.spec.experiment.cell_id_of`), setting ids
    (:func:`orchestrator.reports.settings.setting_id`), cascade stage ids and pretraining-artifact keys all
    come from it, so the same inputs always name the same ledger file."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def setting_config(config: dict) -> dict:
    """``config`` (a resolved cell config) without its seed keys (``seed``, ``train.seed``); a copy."""
    return _without_seed(copy.deepcopy(config))


def _without_seed(config: dict) -> dict:
    config.pop("seed", None)
    if isinstance(config.get("train"), dict):
        config["train"].pop("seed", None)
    return config


@functools.lru_cache(maxsize=65536)
def setting_id(config_json: str) -> str:
    """The id of a cell's setting: :func:`config_hash` of its config without the seed (16 hex digits); cells that
    differ only in the seed share it (the report tables group by it, ``smn run --dry-run --json`` lists it).
    Cached by the JSON text: a table of 10,000 cells asks once per distinct config."""
    return config_hash(_without_seed(json.loads(config_json)))  # json.loads made a fresh dict: no copy needed
