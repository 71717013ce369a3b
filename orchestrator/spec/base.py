"""What every section of a spec shares: :class:`SpecError`, :class:`Resources` (the main spec's and the
cascade experts'), and :func:`format_validation_error` (one line naming every invalid key).

Imported by :mod:`orchestrator.spec.experiment` and :mod:`orchestrator.spec.cascade`, so that neither imports
the other's models at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["SpecError", "Resources", "format_validation_error"]


class SpecError(ValueError):
    """A spec file, override or grid value is invalid; the message names the key and what is allowed."""


class Resources(BaseModel):
    """Where each cell runs. ``workers > 1`` runs DDP in a Ray Train ``TorchTrainer``."""

    model_config = ConfigDict(extra="forbid")
    workers: int = Field(1, ge=1, description="DDP workers per cell (1 = a single Ray task)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_retries: int = Field(2, ge=0, description="retries of a failed cell / worker group")
    max_concurrent_cells: int | None = Field(None, ge=1)
    engine: Literal["auto", "tasks", "tune"] = Field(
        "auto", description="auto: a Ray Tune sweep when the spec has a grid or a search, plain Ray tasks otherwise")


def format_validation_error(exc: ValidationError, where: str, prefix: str = "") -> str:
    """One line naming every invalid key of a pydantic error, its value and what is allowed
    (``prefix`` is put before each key, e.g. ``"cascade."``)."""
    parts = []
    for err in exc.errors():
        loc = prefix + (".".join(str(p) for p in err["loc"]) or "(top level)")
        msg = err["msg"]
        given = err.get("input")
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key (check the spelling; see experiments/demo.yaml for the keys)"
        elif err["loc"] == ("name",) and err["type"] == "value_error":  # the name rule (check_experiment_name)
            msg = (f"must be letters, digits, '.', '_' or '-', starting with a letter or digit, without '..', at most "
                   f"128 characters, got {given!r}"[:300])
        elif err["type"] == "too_short" and isinstance(given, list):
            msg = f"needs at least 1 item, got {given!r}"
        elif not isinstance(given, dict) and repr(given) not in msg:
            msg = f"{msg}, got {given!r}"
        parts.append(f"{loc}: {msg}")
    return f"invalid {where}: " + "; ".join(parts)
