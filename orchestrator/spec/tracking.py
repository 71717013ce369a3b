"""The ``tracking:`` section of a spec (MLflow, Weights & Biases) and what ``smn run --track`` means.

The trackers themselves (logging the ledger's cells) live in :mod:`orchestrator.reports.tracking`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["MlflowTarget", "WandbTarget", "TrackingSpec", "parse_tracking", "track_flag"]


class MlflowTarget(BaseModel):
    """``tracking.mlflow``: where runs go. ``uri``: a folder (MLflow's file store), or any tracking URI."""

    model_config = ConfigDict(extra="forbid")
    uri: str = "mlruns"
    experiment: str | None = None  # default: the spec's name


class WandbTarget(BaseModel):
    """``tracking.wandb``: project, mode (``offline`` writes local run folders; ``online`` needs a login)."""

    model_config = ConfigDict(extra="forbid")
    project: str = "smn"
    mode: Literal["offline", "online", "disabled"] = "offline"
    entity: str | None = None
    dir: str | None = None  # default: the results folder (local results) or the working directory


class TrackingSpec(BaseModel):
    """The ``tracking:`` section of a spec: any of ``mlflow`` and ``wandb``."""

    model_config = ConfigDict(extra="forbid")
    mlflow: MlflowTarget | None = None
    wandb: WandbTarget | None = None


def parse_tracking(section: dict[str, Any] | None) -> TrackingSpec:
    """Validate a ``tracking:`` section (None: no tracker).

    Raises:
        pydantic.ValidationError (a ValueError): on an unknown tracker or key.
    """
    return TrackingSpec.model_validate(section or {})


def track_flag(names: list[str] | str, results: str) -> dict[str, Any]:
    """The ``tracking:`` section ``smn run --track mlflow,wandb`` means: an MLflow file store in
    ``<results>/mlruns`` and / or W&B offline under ``<results>`` (the working directory for URI results).

    Raises:
        ValueError: on a name other than ``mlflow`` and ``wandb``.
    """
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    local = "://" not in str(results)
    out: dict[str, Any] = {}
    for n in names:
        if n == "mlflow":
            out["mlflow"] = {"uri": str(Path(results) / "mlruns") if local else "mlruns"}
        elif n == "wandb":
            out["wandb"] = {"project": "smn", "mode": "offline", "dir": str(results) if local else None}
        else:
            raise ValueError(f"--track {n!r} is not known; allowed: mlflow, wandb")
    return out
