"""Experiment specs: YAML -> validated :class:`ExperimentSpec` -> cells (one config hash each).

A spec names the methods, backbone, dataset, hyperparameters, seeds and an optional ``grid`` of
dotted keys (``train.swav.num_prototypes: [50, 500]``). Cells are the product
methods x grid x seeds; each cell's identity is the SHA-256 of its fully resolved JSON config
(``cell_id``), which is the ledger's key. Validation happens before any work starts: a wrong key,
type or value raises :class:`SpecError` with one message that names it and what is allowed.

Grid values that are mappings are merged into the section the key names, so one axis can change
several keys together (``train.mask: [{mode: threshold}, {mode: topk, topk_density: 0.5}]``).
``train.mask.topk_density: found`` (paper Table 2, "top-k at the density SMN found") makes a
*dependent* cell: its density is the ``density`` that the matching threshold cell (same config,
``mode: threshold``) wrote to the ledger, so it can only be built once that cell is done; the
reference cell is added to the spec's cells if the grid does not name it.

Instead of a grid, a ``search`` section runs an Optuna (TPE) search over continuous or categorical
axes for a metric with a trial budget (see :class:`SearchSpec`).
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
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from smn_core.pipeline import METHODS, BackboneSpec, CellConfig, DataSpec, EvalSpec, PretrainSpec
from smn_core.training import TrainConfig

__all__ = ["SpecError", "Resources", "SearchAxis", "SearchSpec", "ExperimentSpec", "Cell", "load_spec",
           "parse_overrides", "expand_cells", "pending_references", "search_cell", "cell_id_of", "FOUND"]

FOUND = "found"
_ROOTS = ("backbone", "dataset", "train", "eval", "pretrain")
SEARCH_METRICS = ("knn_top1", "knn_dino_top1", "linear_probe_top1", "train_loss", "density", "code_entropy")


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


class SearchAxis(BaseModel):
    """One axis of an Optuna search: ``uniform`` / ``loguniform`` (floats in [low, high]), ``int``
    (integers in [low, high]) or ``choice`` (one of ``values``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchAxis":
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' axis needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a {self.type!r} axis needs low < high, got low={self.low}, high={self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"a 'loguniform' axis needs low > 0, got {self.low}")
        return self


class SearchSpec(BaseModel):
    """An Optuna (TPE) search run as a Ray Tune sweep: ``num_samples`` trials (one cell each) over
    ``space`` (dotted keys, like grid keys), maximising or minimising ``metric``."""

    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["optuna"] = "optuna"
    metric: Literal[SEARCH_METRICS] = "knn_top1"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, description="trial budget (cells already in the ledger count)")
    seed: int = 0
    space: dict[str, SearchAxis] = Field(min_length=1)

    @field_validator("space")
    @classmethod
    def _space_keys(cls, v: dict[str, SearchAxis]) -> dict[str, SearchAxis]:
        for key in v:
            if key.split(".")[0] not in _ROOTS:
                raise ValueError(f"search key {key!r} must start with one of {', '.join(_ROOTS)}")
        return v


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
    search: SearchSpec | None = None
    cascade: dict[str, Any] | None = Field(
        None, description="cascade section (router, experts, combination); validated by orchestrator.cascade")
    tracking: dict[str, Any] | None = Field(
        None, description="experiment trackers, e.g. {mlflow: {uri: mlruns}} or {wandb: {project: p, mode: offline}}; "
        "validated by orchestrator.tracking")

    @field_validator("tracking")
    @classmethod
    def _tracking(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from .tracking import parse_tracking

        return parse_tracking(v).model_dump(exclude_none=True) if v is not None else None

    @model_validator(mode="after")
    def _search_alone(self) -> "ExperimentSpec":
        if self.search is not None:
            if self.grid:
                raise ValueError("a spec has either a grid or a search, not both")
            if len(self.methods) != 1 or len(self.seeds) != 1 or METHODS[self.methods[0]] is None:
                raise ValueError(f"a search needs exactly one trained method and one seed, got methods "
                                 f"{self.methods} and seeds {self.seeds}")
        return self

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be unique, got {v}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if key.split(".")[0] not in _ROOTS:
                raise ValueError(f"grid key {key!r} must start with one of {', '.join(_ROOTS)}")
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
        def show(k: str, v: Any) -> str:
            if isinstance(v, dict):
                return ",".join(f"{kk}={vv}" for kk, vv in v.items())
            return f"{k.split('.')[-1]}={v}"
        grid = " ".join(show(k, v) for k, v in self.grid_values.items())
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
    if isinstance(value, dict) and isinstance(cur.get(parts[-1]), dict):
        merged = copy.deepcopy(cur[parts[-1]])
        for k, v in value.items():
            _set_dotted(merged, k, v)
        cur[parts[-1]] = merged
    else:
        cur[parts[-1]] = value


def _get_dotted(d: dict, key: str) -> Any:
    cur: Any = d
    for p in key.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


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


def _base(spec: ExperimentSpec) -> dict:
    base = spec.model_dump(mode="python", include={"backbone", "dataset", "train", "eval", "pretrain"})
    return json.loads(json.dumps(base, default=lambda o: o.__dict__))


def _validate(raw: dict, where: str) -> CellConfig:
    try:
        return _CELL_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc, where)) from None


def _reference_raw(raw: dict) -> dict:
    """The threshold cell whose found density a ``topk_density: found`` cell uses."""
    ref = copy.deepcopy(raw)
    ref["train"]["mask"]["mode"] = "threshold"
    ref["train"]["mask"]["topk_density"] = None
    ref["train"]["progressive_topk"] = False
    return ref


def _iter_cells(spec: ExperimentSpec, densities: dict[str, float] | None):
    """Yield ``(Cell | None, reference cell_id | None)`` for every grid point: a ready cell, or
    (None, ref) for a dependent cell whose reference density is not known yet."""
    base = _base(spec)
    keys = list(spec.grid)
    for method in spec.methods:
        for combo in itertools.product(*(spec.grid[k] for k in keys)):
            for seed in spec.seeds:
                raw = copy.deepcopy(base)
                raw.update(method=method, seed=seed)
                for k, v in zip(keys, combo):
                    _set_dotted(raw, k, v)
                where = "cell (" + (", ".join(f"{k}={v!r}" for k, v in zip(keys, combo)) or "the spec") + ")"
                trained = METHODS[method] is not None
                grid_values = dict(zip(keys, combo)) if trained else {
                    k: v for k, v in zip(keys, combo) if not k.startswith("train.")}
                if trained and _get_dotted(raw, "train.mask.topk_density") == FOUND:
                    if raw["train"]["mask"].get("mode") != "topk":
                        raise SpecError(f"invalid {where}: train.mask.topk_density 'found' needs train.mask.mode 'topk'")
                    ref_raw = _reference_raw(raw)
                    ref_cfg = _validate(ref_raw, where + " (its threshold reference)")
                    ref_id = cell_id_of(ref_cfg)
                    ref_grid = {k: ({"mode": "threshold"} if isinstance(v, dict) and v.get("topk_density") == FOUND
                                    else v) for k, v in grid_values.items() if k != "train.mask.topk_density"
                                and k != "train.mask.mode"}
                    yield Cell(ref_id, ref_cfg, ref_grid), None
                    density = (densities or {}).get(ref_id)
                    if density is None:
                        raw["train"]["mask"]["topk_density"] = 0.5  # validate the rest now, before any work
                        _validate(raw, where)
                        yield None, ref_id
                        continue
                    raw["train"]["mask"]["topk_density"] = float(density)
                cfg = _validate(raw, where)
                yield Cell(cell_id_of(cfg), cfg, grid_values), None


def expand_cells(spec: ExperimentSpec, densities: dict[str, float] | None = None) -> list[Cell]:
    """The ready cells of a spec (methods x grid x seeds), deduplicated by cell id, in a stable order.

    Args:
        spec: a validated spec.
        densities: ``{threshold cell_id: density}`` from the ledger, which resolves the cells with
            ``train.mask.topk_density: found`` (those without a known density are left out; see
            :func:`pending_references`).

    Raises:
        SpecError: if a grid value makes an invalid cell (names the grid key and value).
    """
    cells: dict[str, Cell] = {}
    for cell, _ in _iter_cells(spec, densities):
        if cell is not None:
            cells.setdefault(cell.cell_id, cell)
    return list(cells.values())


def pending_references(spec: ExperimentSpec, densities: dict[str, float] | None = None) -> set[str]:
    """Cell ids of the threshold cells whose density some ``topk_density: found`` cell still waits for."""
    return {ref for cell, ref in _iter_cells(spec, densities) if cell is None}


def search_cell(spec: ExperimentSpec, values: dict[str, Any]) -> Cell:
    """The cell of one search trial: the spec's single method and seed with ``values`` (dotted keys) set.

    Raises:
        SpecError: if the values make an invalid cell.
    """
    raw = copy.deepcopy(_base(spec))
    raw.update(method=spec.methods[0], seed=spec.seeds[0])
    for k, v in values.items():
        _set_dotted(raw, k, v)
    cfg = _validate(raw, "search trial (" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")")
    return Cell(cell_id_of(cfg), cfg, dict(values))
