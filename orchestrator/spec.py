"""Experiment specs: YAML -> validated :class:`ExperimentSpec` -> cells (one config hash each).

A spec names the methods, backbone, dataset, hyperparameters, seeds and an optional ``grid`` of
dotted keys (``train.swav.num_prototypes: [50, 500]``). Cells are the product
methods x grid x seeds; each cell's identity is the SHA-256 of its fully resolved JSON config
(``cell_id``), which is the ledger's key. Validation happens before any work starts: a wrong key,
type or value raises :class:`SpecError` with one message that names it and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from smn_core.pipeline import METHODS, BackboneSpec, CellConfig, DataSpec, EvalSpec, PretrainSpec
from smn_core.training import TrainConfig

__all__ = ["SpecError", "Resources", "ExperimentSpec", "Cell", "load_spec", "parse_overrides", "expand_cells",
           "cell_id_of"]


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


class ExperimentSpec(BaseModel):
    """A validated experiment spec (see ``experiments/demo.yaml`` for an annotated example)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="experiment name (results folder)")
    description: str = ""
    methods: list[Literal[tuple(METHODS)]] = Field(default_factory=lambda: ["smn"], min_length=1)  # type: ignore[valid-type]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    dataset: DataSpec = Field(default_factory=DataSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    pretrain: PretrainSpec | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be unique, got {v}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        roots = ("backbone", "dataset", "train", "eval", "pretrain")
        for key, values in v.items():
            if key.split(".")[0] not in roots:
                raise ValueError(f"grid key {key!r} must start with one of {', '.join(roots)}")
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return v


@dataclass(frozen=True)
class Cell:
    """One cell: its id (config hash), the resolved config, and the grid values that made it."""

    cell_id: str
    config: CellConfig
    grid_values: dict[str, Any]

    @property
    def label(self) -> str:
        grid = " ".join(f"{k.split('.')[-1]}={v}" for k, v in self.grid_values.items())
        return f"{self.config.method}{(' ' + grid) if grid else ''} seed={self.config.seed}"


_CELL_ADAPTER = TypeAdapter(CellConfig)


def _format_validation_error(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key (check the spelling; see experiments/demo.yaml for the keys)"
        elif err["type"] == "literal_error":
            msg = f"{msg}, got {err.get('input')!r}"
        lines.append(f"{loc}: {msg}")
    return f"invalid {where}:\n  " + "\n  ".join(lines)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise SpecError(f"key {key!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` command-line overrides; values are YAML scalars or lists.

    Raises:
        SpecError: on an item without ``=`` or with an empty key.
    """
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        out.append((key.strip(), yaml.safe_load(value)))
    return out


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read and validate a spec file, applying ``key=value`` overrides first.

    Raises:
        SpecError: missing file, bad YAML, unknown key, wrong type or value (one message naming each).
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping of keys, got {type(raw).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc, f"spec {str(path)!r}")) from None
    expand_cells(spec)  # grid values are validated here too, before any work starts
    return spec


def cell_id_of(config: CellConfig) -> str:
    """SHA-256 (first 16 hex digits) of the cell's canonical JSON identity."""
    blob = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand_cells(spec: ExperimentSpec) -> list[Cell]:
    """All cells of a spec (methods x grid x seeds), deduplicated by cell id, in a stable order.

    Raises:
        SpecError: if a grid value makes an invalid cell (names the grid key and value).
    """
    base = spec.model_dump(mode="python", include={"backbone", "dataset", "train", "eval", "pretrain"})
    base = json.loads(json.dumps(base, default=lambda o: o.__dict__))
    keys = list(spec.grid)
    cells: dict[str, Cell] = {}
    for method in spec.methods:
        for combo in itertools.product(*(spec.grid[k] for k in keys)):
            for seed in spec.seeds:
                raw = copy.deepcopy(base)
                raw.update(method=method, seed=seed)
                for k, v in zip(keys, combo):
                    _set_dotted(raw, k, v)
                try:
                    cfg = _CELL_ADAPTER.validate_python(raw)
                except ValidationError as exc:
                    where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo)) or "the spec"
                    raise SpecError(_format_validation_error(exc, f"cell ({where})")) from None
                cid = cell_id_of(cfg)
                grid_values = dict(zip(keys, combo)) if METHODS[method] is not None else {
                    k: v for k, v in zip(keys, combo) if not k.startswith("train.")}
                cells.setdefault(cid, Cell(cid, cfg, grid_values))
    return list(cells.values())
