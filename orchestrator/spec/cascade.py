"""The ``cascade`` section of a spec (paper Sec. 3.4, App. G): router, experts and combination settings,
validated with pydantic; every key is optional and the defaults are the paper's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from smn_core.config import COVARIANCE_TYPES, MODES, SCALINGS
from orchestrator.spec.base import Resources, SpecError, format_validation_error

__all__ = ["RouterSpec", "ExpertsSpec", "CombinationSpec", "CascadeSpec", "cascade_spec"]


class RouterSpec(BaseModel):
    """``cascade.router``: PCA + Gaussian-mixture router (paper: 20 components, 5 clusters)."""

    model_config = ConfigDict(extra="forbid")
    components: int = Field(20, ge=1, description="PCA dimensions before clustering")
    clusters: int = Field(5, ge=2, description="mixture components = number of experts")
    seed: int = Field(0, description="random_state of the Gaussian mixture (reproducible routing)")
    covariance_type: Literal[COVARIANCE_TYPES] = "full"  # type: ignore[valid-type]
    reg_covar: float = Field(1e-6, gt=0)
    n_init: int = Field(1, ge=1)


class ExpertsSpec(BaseModel):
    """``cascade.experts``: how the experts train and where they run."""

    model_config = ConfigDict(extra="forbid")
    epochs: int | None = Field(None, ge=1, description="null: round(N / D_k x dispatcher epochs), the paper's budget")
    queue_start_fraction: float = Field(0.2, ge=0, le=1, description="SwAV queue after this fraction of the epochs")
    resources: Resources | None = Field(None, description="per expert; null: the spec's resources")
    max_concurrent: int | None = Field(None, ge=1, description="experts alive at once (null: all)")
    max_restarts: int = Field(-1, ge=-1, description="actor restarts after a process or node death (-1: unlimited)")


class CombinationSpec(BaseModel):
    """``cascade.combination``: which cascades to build and how to project them back."""

    model_config = ConfigDict(extra="forbid")
    modes: list[Literal[MODES]] = Field(default_factory=lambda: list(MODES), min_length=1)  # type: ignore[valid-type]
    scaling: Literal[SCALINGS] = Field(  # type: ignore[valid-type]
        "whiten", description="whiten: divide by sqrt(eigenvalue) (default); eigenvalue: the paper's text; none")
    dim: int | None = Field(None, ge=1, description="output dimension (null: the dispatcher's)")

    @field_validator("modes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"modes must be unique, got {v}")
        return v


class CascadeSpec(BaseModel):
    """The validated ``cascade`` section of a spec (every key optional; defaults are the paper's)."""

    model_config = ConfigDict(extra="forbid")
    router: RouterSpec = Field(default_factory=RouterSpec)
    experts: ExpertsSpec = Field(default_factory=ExpertsSpec)
    combination: CombinationSpec = Field(default_factory=CombinationSpec)


def cascade_spec(spec) -> CascadeSpec:
    """Validate ``spec.cascade`` (absent: the defaults) and that the spec has a dispatcher.

    Args:
        spec: an :class:`orchestrator.spec.experiment.ExperimentSpec` (not imported here: that module imports
            this one to check its ``cascade:`` section while loading).

    Raises:
        SpecError: an unknown key, a wrong type or value in the section (each named with
            ``cascade.`` and what is allowed), or a spec without the ``smn`` method.
    """
    try:
        cs = CascadeSpec.model_validate(spec.cascade or {})
    except ValidationError as exc:
        msg = format_validation_error(exc, f"cascade section of spec {spec.name!r}", prefix="cascade.")
        msg = msg.replace("see experiments/demo.yaml for the keys",
                          "see experiments/table3_cascade_small.yaml for the cascade keys")
        raise SpecError(msg) from None
    if "smn" not in spec.methods:
        raise SpecError(f"a cascade needs the self-masking dispatcher: spec {spec.name!r} has methods "
                        f"{spec.methods}; add 'smn'")
    return cs


