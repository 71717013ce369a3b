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
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from smn_core.config import (BUILTIN_BACKBONES, BUILTIN_DATASETS, CONTROLS, METHODS, BackboneSpec, CellConfig, DataSpec,
                             EvalSpec, PretrainSpec, TrainConfig)
from smn_core.model_names import check_timm_name

from orchestrator.results.layout import check_experiment_name
from orchestrator.spec.base import Resources, SpecError, format_validation_error
from orchestrator.spec.cascade import cascade_spec
from orchestrator.spec.keys import config_hash, flatten, split_assignments
from orchestrator.spec.tracking import parse_tracking

__all__ = ["SpecError", "Resources", "SearchAxis", "SearchSpec", "ExperimentSpec", "Cell", "load_spec",
           "parse_overrides", "expand_cells", "pending_references", "waiting_count", "waiting_cells", "Waiting", "cell_label", "control_reference", "search_cell",
           "cell_id_of", "config_hash", "FOUND", "EPOCH_METRICS",
           "format_validation_error", "load_yaml", "check_spec", "dataset_facts", "DataFacts", "LIMITS",
           "TORCHVISION_FACTS", "DIGITS_CLASS_COUNTS"]

FOUND = "found"
_ROOTS = ("backbone", "dataset", "train", "eval", "pretrain")
DEFAULT_MAX_CELLS = 10_000  # a spec's `max_cells` default
MAX_CELLS = 1_000_000  # the highest `max_cells` a spec may set
SHARED_DEFAULTS = "shared_defaults"  # method_overrides.shared_defaults: true keeps blocks of methods not run
SEED_RANGE = (0, 2**32 - 1)  # numpy's and torch's seedable range
SEARCH_METRICS = ("knn_top1", "knn_dino_top1", "linear_probe_top1", "train_loss", "density", "code_entropy",
                  "val_knn_dino_top1")
EPOCH_METRICS = ("val_knn_dino_top1", "train_loss")
"""The metrics a trial reports after every epoch as well as at its end: what ``search.scheduler`` acts on."""


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
    """How a Ray Tune sweep searches: an Optuna (TPE) search of ``num_samples`` trials (one cell each) over
    ``space`` (dotted keys, like grid keys), maximising or minimising ``metric``; and ``scheduler``, Tune's
    early stopping of trials on ``metric`` as each epoch reports it (``asha``: ``ASHAScheduler``, ``median``:
    ``MedianStoppingRule``, after ``grace_epochs`` epochs; ``none``: every trial runs to its end).

    Beside a ``grid``, the section holds no ``space``: the grid's cells are the trials and the scheduler stops
    the weak ones early (docs/tune.md). A scheduler needs a metric reported after every epoch
    (:data:`EPOCH_METRICS`): ``val_knn_dino_top1`` (with ``dataset.val_fraction``) or ``train_loss``.
    """

    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["optuna"] = "optuna"
    metric: Literal[SEARCH_METRICS] = "knn_top1"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, description="trial budget (cells already in the ledger count)")
    seed: int = 0
    space: dict[str, SearchAxis] = Field(default_factory=dict)
    scheduler: Literal["asha", "median", "none"] = Field(
        "none", description="Tune's trial scheduler on `metric`, reported every epoch (asha, median or none)")
    grace_epochs: int = Field(1, ge=1, description="epochs every trial runs before the scheduler may stop it")
    reduction_factor: int = Field(3, ge=2, description="asha: the share of trials kept at each rung is 1/this")

    @model_validator(mode="after")
    def _scheduler_metric(self) -> "SearchSpec":
        if self.scheduler != "none" and self.metric not in EPOCH_METRICS:
            raise ValueError(f"search.scheduler {self.scheduler!r} acts on a metric reported after every epoch; "
                             f"search.metric {self.metric!r} is not one: allowed {', '.join(EPOCH_METRICS)} "
                             "(val_knn_dino_top1 needs dataset.val_fraction)")
        return self

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
    name: str = Field(description="experiment name (results folder; orchestrator.results.layout.check_experiment_name)")
    description: str = ""
    methods: list[Literal[tuple(METHODS)]] = Field(default_factory=lambda: ["smn"], min_length=1)  # type: ignore[valid-type]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    dataset: DataSpec = Field(default_factory=DataSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    pretrain: PretrainSpec | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any] | bool] = Field(
        default_factory=dict,
        description="per-method settings on top of the shared sections, as dotted keys: "
        "{supervised_mask: {train.score_lr: 50.0}}; applied before the grid's values. A block for a method the "
        "spec does not run is refused, unless the section says `shared_defaults: true` (settings kept for "
        "whichever of its methods a run selects, e.g. methods=[smn] on a Table 1 spec)")
    max_cells: int = Field(DEFAULT_MAX_CELLS, ge=1, le=MAX_CELLS,
                           description="refuse a spec whose methods x grid x seeds exceed this many cells")
    resources: Resources = Field(default_factory=Resources)
    search: SearchSpec | None = None
    cascade: dict[str, Any] | None = Field(
        None, description="cascade section (router, experts, combination); validated by orchestrator.engine.cascade")
    tracking: dict[str, Any] | None = Field(
        None, description="experiment trackers, e.g. {mlflow: {uri: mlruns}} or {wandb: {project: p, mode: offline}}; "
        "validated by orchestrator.spec.tracking")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_experiment_name(v)

    @field_validator("tracking")
    @classmethod
    def _tracking(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return parse_tracking(v).model_dump(exclude_none=True) if v is not None else None

    @model_validator(mode="after")
    def _search_alone(self) -> "ExperimentSpec":
        if self.search is not None:
            if self.grid:
                if self.search.space:
                    raise ValueError("a spec has either a grid or a search space, not both (beside a grid, the "
                                     "search section holds a scheduler only)")
            elif not self.search.space:
                raise ValueError("search.space is empty: give a search space, or a grid for search.scheduler")
            if self.search.metric == "val_knn_dino_top1" and self.dataset.val_fraction is None:
                raise ValueError("search.metric val_knn_dino_top1 needs dataset.val_fraction (the validation "
                                 "split it is measured on), e.g. dataset.val_fraction=0.2")
            if self.grid:
                return self
            if (len(self.methods) != 1 or len(self.seeds) != 1 or METHODS[self.methods[0]] is None
                    or self.methods[0] in CONTROLS):
                raise ValueError(f"a search needs exactly one trained method and one seed, got methods "
                                 f"{self.methods} and seeds {self.seeds}")
        return self

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be unique, got {v}")
        return v

    @field_validator("method_overrides", mode="before")
    @classmethod
    def _flatten_overrides(cls, v: Any) -> Any:
        """``{smn: {train: {score_lr: 1}}}`` (a command-line override) reads as ``{smn: {train.score_lr: 1}}``."""
        if not isinstance(v, dict):
            return v
        return {m: (flatten(values, keep_empty=True) if isinstance(values, dict) else values) for m, values in v.items()}

    @model_validator(mode="after")
    def _method_overrides(self) -> "ExperimentSpec":
        shared = self.method_overrides.get(SHARED_DEFAULTS, False)
        if not isinstance(shared, bool):
            raise ValueError(f"method_overrides.{SHARED_DEFAULTS}: got {shared!r}; allowed: true or false")
        for method, values in self.method_overrides.items():
            if method == SHARED_DEFAULTS:
                continue
            if method not in METHODS:
                raise ValueError(f"method_overrides names method {method!r}, which is not known; "
                                 f"allowed: {', '.join(METHODS)}")
            if not isinstance(values, dict):
                raise ValueError(f"method_overrides.{method}: got {values!r}; allowed: a mapping of dotted keys "
                                 "(e.g. {train.score_lr: 50.0})")
            if method not in self.methods and not shared:
                raise ValueError(f"method_overrides names method {method!r}, which this spec does not run "
                                 f"(methods: {', '.join(self.methods)}); allowed: a method of `methods`, or "
                                 f"`method_overrides.{SHARED_DEFAULTS}: true` to keep it as a shared default")
            for key in values:
                if key.split(".")[0] not in ("train", "eval") or "." not in key:
                    raise ValueError(f"method_overrides.{method}: key {key!r} must be a dotted key under train. "
                                     f"or eval. (e.g. train.score_lr)")
        return self

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
        return cell_label(self.config.method, self.grid_values, self.config.seed)


def cell_label(method: str, grid_values: dict[str, Any], seed: int) -> str:
    """A cell's label: ``"smn mask=... seed=0"`` (method, grid values, seed)."""
    def show(k: str, v: Any) -> str:
        if isinstance(v, dict):
            return ",".join(f"{kk}={vv}" for kk, vv in v.items())
        return f"{k.split('.')[-1]}={v}"
    grid = " ".join(show(k, v) for k, v in grid_values.items())
    return f"{method}{(' ' + grid) if grid else ''} seed={seed}"


@dataclass(frozen=True)
class Waiting:
    """A dependent cell that cannot be expanded yet: its ``label`` (:func:`cell_label`), its ``method``, the
    ``reference`` cell id it waits for, and whether it needs that cell's ``density`` (top-k at a found density)
    or only its trained mask (a random-mask control)."""

    label: str
    method: str
    reference: str
    needs_density: bool


_CELL_ADAPTER = TypeAdapter(CellConfig)


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names one key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):  # noqa: D401 - PyYAML hook
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue
            if key in seen:
                raise SpecError(f"duplicate key {key!r} on line {key_node.start_mark.line + 1} (first on line "
                                f"{seen[key] + 1}); allowed: each key once per section")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(what)


def load_yaml(text: str) -> Any:
    """Parse YAML text with the safe loader, refusing duplicate keys.

    Raises:
        SpecError: a duplicate key. yaml.YAMLError: invalid YAML.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` command-line overrides; values are YAML scalars or lists.

    Raises:
        SpecError: on an item without ``=``, with an empty key, or whose value is not valid YAML.
    """
    out = []
    for key, value in split_assignments(overrides, "override", "train.epochs=3", SpecError):
        try:
            out.append((key, load_yaml(value)))
        except yaml.YAMLError as exc:
            raise SpecError(f"override '{key}={value}': the value is not valid YAML: {_yaml_problem(exc)}; allowed: "
                            "a YAML scalar, list or mapping, e.g. seeds=[0,1]") from None
    return out


def load_spec(path: str | Path, overrides: list[str] | None = None, model_checks: bool = True) -> ExperimentSpec:
    """Read and validate a spec file, applying ``key=value`` overrides first, then check it against what
    exists (backbones, datasets and their metadata, sizes) with :func:`check_spec` (``model_checks``: its
    checks that import torch; False for ``smn validate`` and ``--dry-run``).

    Raises:
        SpecError: missing file, bad YAML, duplicate key, unknown key, wrong type or value, or a spec that
            cannot work (one line naming each).
    """
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"spec {str(path)!r} is a folder, not a file; allowed: a YAML spec file such as "
                        "experiments/demo.yaml")
    if path.exists() and not path.is_file():
        raise SpecError(f"spec {str(path)!r} is not a regular file (a device, pipe or socket); allowed: a YAML "
                        "spec file such as experiments/demo.yaml")
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
    except UnicodeDecodeError:
        raise SpecError(f"spec file {str(path)!r} is not a text YAML file (binary content); allowed: a YAML "
                        "spec such as experiments/demo.yaml") from None
    except OSError as exc:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        raw = load_yaml(text)
    except SpecError as exc:
        raise SpecError(f"spec file {str(path)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping of keys (see experiments/demo.yaml), got "
                        f"{type(raw).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    _check_raw(raw)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, f"spec {str(path)!r}")) from None
    check_spec(spec, model_checks)
    return spec


# ------------------------------------------------------------------ checks before any work starts

LIMITS: dict[str, tuple[float, float]] = {
    "train.epochs": (1, 100_000),
    "train.batch_size": (1, 65_536),
    "train.max_steps_per_epoch": (1, 10_000_000),
    "train.loader_workers": (0, 256),
    "train.swav.num_prototypes": (1, 100_000),
    "train.swav.proj_dim": (1, 65_536),
    "train.swav.hidden_dim": (0, 65_536),
    "train.swav.queue_length": (0, 1_000_000),
    "train.swav.sinkhorn_iterations": (1, 1_000),
    "train.multicrop.n_global": (1, 16),
    "train.multicrop.n_local": (0, 64),
    "train.multicrop.global_size": (8, 4_096),
    "train.multicrop.local_size": (8, 4_096),
    "dataset.image_size": (8, 4_096),
    "dataset.max_train_samples": (1, 100_000_000),
    "dataset.max_test_samples": (1, 100_000_000),
    "eval.knn_k": (1, 100_000),
    "eval.batch_size": (1, 65_536),
    "eval.probe_max_iter": (1, 1_000_000),
    "eval.probe_cv_folds": (2, 1_000),
    "resources.workers": (1, 4_096),
    "resources.cpus_per_worker": (0, 4_096),
    "resources.gpus_per_worker": (0, 64),
    "search.num_samples": (1, 100_000),
    "seeds": SEED_RANGE,
    "max_cells": (1, MAX_CELLS),
}
"""``{dotted key: (lowest, highest)}`` of the sizes a spec may ask for (``pretrain.`` keys share the
``train.`` / ``dataset.`` limits); anything outside is refused before work starts."""

POSITIVE = ("train.score_lr", "train.head_lr", "train.weight_lr", "train.swav.temperature", "train.swav.epsilon",
            "eval.knn_temperature", "eval.probe_C")
"""Keys that must be > 0 (``pretrain.`` keys too)."""

MAX_SEEDS = 1_000


def _hints(tp: Any) -> dict[str, Any]:
    import dataclasses
    import typing

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {k: f.annotation for k, f in tp.model_fields.items()}
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp)
    return {}


def _admits(tp: Any, kind: type) -> bool:
    import typing

    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return any(isinstance(a, kind) for a in typing.get_args(tp))
    if origin is not None and origin not in (list, tuple, dict):
        return any(_admits(a, kind) for a in typing.get_args(tp))
    return tp is kind


def _inner(tp: Any, key: str | None = None) -> Any:
    """The annotation of a field (``key``) or of a list's items (``key`` None), through Optional."""
    import typing

    for cand in (typing.get_args(tp) if typing.get_origin(tp) not in (None, list, tuple, dict) else (tp,)):
        if key is None and typing.get_origin(cand) in (list, tuple):
            args = typing.get_args(cand)
            return args[0] if args else Any
        if key is not None and typing.get_origin(cand) is dict:
            return typing.get_args(cand)[1]
        hints = _hints(cand)
        if key is not None and key in hints:
            return hints[key]
    return None


def _limit_key(path: str) -> str:
    if path.startswith("method_overrides."):
        path = path.split(".", 2)[-1]
    for prefix in ("pretrain.", "cascade.experts."):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _number_of(text: str, path: str) -> Any:
    """The number a numeric string stands for (``'1e400'`` -> inf, ``'0x10'`` -> 16), or the string itself
    when it is none (pydantic then names it)."""
    word = text.strip()
    try:
        return int(word, 0) if word.lower().startswith(("0x", "0o", "0b", "-0x", "+0x")) else float(word)
    except ValueError:
        return text


def _check_value(value: Any, tp: Any, path: str) -> None:
    """Refuse, before pydantic's lax coercion, what would be accepted and then go wrong: a YAML boolean for
    a number (``epochs: yes`` would become 1), a non-finite number, a size outside :data:`LIMITS`."""
    import math

    if tp is None:
        return  # an unknown key: the model names it
    if isinstance(value, dict):
        for k, v in value.items():
            _check_value(v, _inner(tp, str(k)), f"{path}.{k}" if path else str(k))
        return
    if isinstance(value, list):
        item = _inner(tp)
        for v in value:
            _check_value(v, item, path)
        return
    if isinstance(value, bool):
        if not _admits(tp, bool):
            raise SpecError(f"{path}: expected an integer or number, got {value!r} (YAML reads yes/no/on/off/"
                            "true/false as booleans); allowed: a number")
        return
    if isinstance(value, str) and (_admits(tp, int) or _admits(tp, float)) and not _admits(tp, str):
        value = _number_of(value, path)  # pydantic would read '1e400' as inf, '1_0' as 10: check what it reads
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{path}: got {value!r}; allowed: a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and _limit_key(path) not in LIMITS \
            and abs(value) > 2**63 - 1:
        raise SpecError(f"{path}: got {value}; allowed: an integer between -2**63 and 2**63-1")
    if _limit_key(path) in POSITIVE and isinstance(value, (int, float)) and not value > 0:
        raise SpecError(f"{path}: got {value!r}; allowed: a number > 0")
    lim = LIMITS.get(_limit_key(path))
    if lim is not None and isinstance(value, (int, float)) and not lim[0] <= value <= lim[1]:
        lo, hi = (f"{x:,}" if float(x).is_integer() else str(x) for x in lim)
        raise SpecError(f"{path}: got {value!r}; allowed: {lo} <= {path.rsplit('.', 1)[-1]} <= {hi}")


_CELL_ROOTS = {"backbone": BackboneSpec, "dataset": DataSpec, "train": TrainConfig, "eval": EvalSpec,
               "pretrain": PretrainSpec}


def _dotted_type(key: str) -> Any:
    parts = key.split(".")
    tp = _CELL_ROOTS.get(parts[0])
    for p in parts[1:]:
        if tp is None:
            return None
        tp = _inner(tp, p)
    return tp


def _check_raw(raw: dict) -> None:
    """:func:`_check_value` over a raw spec, its grid values and its search axes."""
    _check_value({k: v for k, v in raw.items() if k not in ("grid", "search", "cascade", "method_overrides")},
                 ExperimentSpec, "")
    overrides = raw.get("method_overrides")
    for method, values in (overrides.items() if isinstance(overrides, dict) else ()):
        for key, value, tp in _typed_entries(flatten(values, keep_empty=True) if isinstance(values, dict) else None,
                                             object):
            _check_value(value, tp, f"method_overrides.{method}.{key}")
    for key, values, tp in _typed_entries(raw.get("grid"), list):
        for v in values:
            try:
                _check_value(v, tp, str(key))
            except SpecError as exc:
                raise SpecError(f"grid value {key}={v!r}: {exc}") from None
    search = raw.get("search")
    if isinstance(search, dict):
        _check_value({k: v for k, v in search.items() if k != "space"}, SearchSpec, "search")
        for key, axis, tp in _typed_entries(search.get("space"), dict):
            for bound in ("low", "high"):
                if bound in axis:
                    _check_value(axis[bound], tp if axis.get("type") == "int" else float,
                                 f"search.space.{key}.{bound}")
            if axis.get("type") in ("uniform", "loguniform") and not _admits(tp, float):
                raise SpecError(f"search.space.{key}: type {axis.get('type')!r} draws floats but {key} takes "
                                f"{getattr(tp, '__name__', tp)}; allowed: type int (integers) or choice")


def _typed_entries(section: Any, kind: type):
    """``(key, value, field type)`` of each entry of a raw ``grid`` or ``search.space`` mapping whose value is a
    ``kind`` and whose dotted key names a spec field (:func:`_dotted_type`); nothing when ``section`` is not a dict."""
    if not isinstance(section, dict):
        return
    for key, value in section.items():
        tp = _dotted_type(str(key))
        if isinstance(value, kind) and tp is not None:
            yield key, value, tp


@dataclass(frozen=True)
class DataFacts:
    """What a dataset's metadata says: its class names (None when unknown), its training-split size (an
    upper bound when exact counts need the data), and the number of classes."""

    class_names: list[str] | None
    num_classes: int | None
    train_size: int | None
    per_class: dict[int, int] | None = None


TORCHVISION_FACTS = {"cifar10": (10, 50_000), "cifar100": (100, 50_000), "dtd": (47, 3_760),
                     "flowers102": (102, 2_040), "food101": (101, 75_750), "pets": (37, 3_680),
                     "eurosat": (10, 27_000), "sun397": (397, 108_754)}
"""``{source: (classes, training images)}`` of the torchvision datasets (published sizes; eurosat and
sun397 are split by ``test_fraction`` from the whole)."""

DIGITS_CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
"""Images per class (0-9) of scikit-learn's bundled digits (1,797 in all), so that a spec is checked without
importing scikit-learn (a unit test compares them with ``load_digits()``)."""

TIMM_OR_OPEN_CLIP = ("timm/", "open_clip/")
"""Prefixes of the archs built by timm / open_clip, whose names are checked with ``model_checks`` only."""


def dataset_facts(data: DataSpec, where: str = "dataset") -> DataFacts:
    """Check that ``data``'s source is known and its root exists, and read its metadata only (Parquet
    schema and row counts, the bundled digits' labels, the published sizes of torchvision sets).

    Raises:
        SpecError: an unknown source, a missing root, or a Parquet folder without the split's files.
    """
    if data.source not in BUILTIN_DATASETS:  # a source registered elsewhere: ask the registry (imports torch)
        from smn_core.data import available_datasets

        sources = available_datasets()
        if data.source not in sources:
            raise SpecError(f"{where}.source {data.source!r} is not known; allowed: {', '.join(sources)}")
    keep = 1.0 - data.test_fraction
    if data.source == "digits":
        per = {c: math.ceil(n * keep) for c, n in enumerate(DIGITS_CLASS_COUNTS)}
        return DataFacts([str(c) for c in range(10)], 10, sum(per.values()), per)
    if data.root is None:
        raise SpecError(f"{where}.root is missing: source {data.source!r} needs {where}.root, a data folder")
    root = Path(data.root).expanduser()
    if not root.exists():
        if data.download and data.source in TORCHVISION_FACTS:
            return DataFacts(None, *TORCHVISION_FACTS[data.source])
        raise SpecError(f"{where}.root {str(root)!r} does not exist" + (
            f"; allowed: an existing folder, or {where}.download: true to fetch {data.source}"
            if data.source in TORCHVISION_FACTS else "; allowed: an existing data folder"))
    if data.source == "parquet":
        import pyarrow.parquet as pq

        files = [f for folder in (root, root / "data")
                 for f in sorted({*folder.glob("train.parquet"), *folder.glob("train-*.parquet")})]
        if not files:
            raise SpecError(f"{where}.root {str(root)!r} holds no train.parquet or train-*.parquet (also under data/)")
        try:
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            meta = pq.read_schema(files[0]).metadata or {}
        except Exception as exc:  # noqa: BLE001 - pyarrow's error types
            raise SpecError(f"{where}.root: {str(files[0])!r} is not a readable Parquet file ({exc})") from None
        names = [c.strip() for c in meta[b"classes"].decode().split(",")] if b"classes" in meta else None
        return DataFacts(names, len(names) if names else None, rows)
    if data.source in TORCHVISION_FACTS:
        n_classes, n_train = TORCHVISION_FACTS[data.source]
        return DataFacts(None, n_classes, n_train)
    return DataFacts(None, None, None)


def _class_ids(data: DataSpec, facts: DataFacts, where: str) -> list[int] | None:
    classes = data.classes
    if classes is None:
        return None
    if len(classes) < 2:
        raise SpecError(f"{where}.classes {list(classes)!r} names {len(classes)} class(es); allowed: at least 2 "
                        "distinct classes, or null for all")
    dup = sorted({str(c) for c in classes if list(classes).count(c) > 1})
    if dup:
        raise SpecError(f"{where}.classes {list(classes)!r} repeats {', '.join(dup)}; allowed: distinct classes")
    n = facts.num_classes
    allowed = (f"class ids 0-{n - 1}" + (f" or names {', '.join(facts.class_names[:12])}"
                                        f"{' ...' if len(facts.class_names) > 12 else ''}" if facts.class_names
                                        else "")) if n else None
    ids = []
    for c in classes:
        if isinstance(c, int) and not isinstance(c, bool):
            if c < 0 or (n is not None and c >= n):
                raise SpecError(f"{where}.classes: class {c} does not exist in {data.source}; allowed: "
                                f"{allowed or 'ids >= 0'}")
            ids.append(c)
        elif facts.class_names is not None:
            if c not in facts.class_names:
                raise SpecError(f"{where}.classes: class {c!r} does not exist in {data.source}; allowed: {allowed}")
            ids.append(facts.class_names.index(c))
    return ids


def _train_size(data: DataSpec, facts: DataFacts, ids: list[int] | None) -> int | None:
    n = facts.train_size
    if n is not None and ids is not None:
        n = sum(facts.per_class[i] for i in ids) if facts.per_class else n
    if data.max_train_samples is not None:
        n = data.max_train_samples if n is None else min(n, data.max_train_samples)
    return n


def _check_data_and_batch(data: DataSpec, train: TrainConfig, where: str, train_where: str) -> int | None:
    facts = dataset_facts(data, where)
    ids = _class_ids(data, facts, where)
    n = _train_size(data, facts, ids)
    if n is not None and train.batch_size > n:
        raise SpecError(f"{train_where}.batch_size {train.batch_size} is larger than the {n} training images of "
                        f"{where} ({data.source}); allowed: {train_where}.batch_size <= {n}")
    return n


def check_checkpoint(arch: str, checkpoint: str) -> None:
    """Open a local weight file and load it into ``arch`` (format, keys, shapes), before any work.

    Raises:
        SpecError: naming the file, the architecture and what is wrong.
    """
    from smn_core.backbones import build_backbone

    try:
        build_backbone(arch, "checkpoint", checkpoint=str(Path(checkpoint).expanduser()))
    except (ValueError, OSError) as exc:
        text = " ".join(str(exc).split())
        raise SpecError(f"backbone.checkpoint {checkpoint!r} cannot be used for {arch}: {text[:400]}") from None


def check_selector(arch: str, mask: Any) -> None:
    """The mask selector must select something in ``arch`` (built without weights: randomly initialised on
    the CPU, the caller's random state kept; PyTorch's meta device would cost seconds of lazy imports).

    Raises:
        SpecError: naming the selector, the architecture and the allowed selectors.
    """
    import torch

    from smn_core.backbones import build_backbone
    from smn_core.masking import MaskConfig, select_parameters

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        model = build_backbone(arch, "random").model
    config = mask if isinstance(mask, MaskConfig) else MaskConfig(**mask)
    try:
        select_parameters(model, config)
    except ValueError as exc:
        raise SpecError(f"train.mask.selector {config.selector!r}: {' '.join(str(exc).split())} (backbone "
                        f"{arch})") from None


def cell_count_bound(spec: ExperimentSpec) -> int:
    """methods x (product of the grid's axes) x seeds: the most cells ``spec`` can expand to, computed
    without expanding anything (a ``topk_density: found`` axis may add one threshold reference per cell,
    which is not counted)."""
    return len(spec.methods) * math.prod(len(v) for v in spec.grid.values()) * len(spec.seeds)


def check_cell_count(spec: ExperimentSpec) -> None:
    """Refuse at once a spec over its ``max_cells`` (:func:`cell_count_bound`).

    Raises:
        SpecError: naming the count, its factors and the limit.
    """
    n = cell_count_bound(spec)
    if n > spec.max_cells:
        axes = " x ".join(f"{len(v)} ({k})" for k, v in spec.grid.items())
        raise SpecError(f"the spec expands to {n:,} cells ({len(spec.methods)} methods x "
                        f"{axes + ' x ' if axes else ''}{len(spec.seeds)} seeds); allowed: <= max_cells = "
                        f"{spec.max_cells:,} (set max_cells: N in the spec, at most {MAX_CELLS:,})")


def _check_backbone(backbone: BackboneSpec, model_checks: bool) -> None:
    """The arch is known and a local checkpoint exists; with ``model_checks`` also a timm / open_clip name and
    its cached weights (:func:`smn_core.backbones.check_arch`) and the checkpoint's content
    (:func:`check_checkpoint`), which import torch. A registered arch is checked against the torch-free
    :data:`smn_core.config.BUILTIN_BACKBONES`; any other name loads the registry (torch), to name what is allowed."""
    arch, ck = backbone.arch, backbone.checkpoint
    if isinstance(arch, str) and arch.startswith("timm/"):
        try:  # torch-free: timm's names cached per version (smn_core.model_names), so a bad name costs no import
            check_timm_name(arch[len("timm/"):])
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    deferred = isinstance(arch, str) and arch.startswith(TIMM_OR_OPEN_CLIP)
    if arch not in BUILTIN_BACKBONES and (model_checks or not deferred):
        from smn_core.backbones import check_arch

        try:  # timm/<name>, open_clip/<name>:<tag>: the name exists, pretrained weights are in the local cache
            check_arch(arch, backbone.weights, ck)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    if backbone.weights == "checkpoint" and ck and "://" not in ck and not Path(ck).expanduser().is_file():
        what = ("is a folder" if Path(ck).expanduser().is_dir() else "is not a regular file (a device, pipe "
                "or socket)" if Path(ck).expanduser().exists() else "does not exist")
        raise SpecError(f"backbone.checkpoint {ck!r} {what}; allowed: a local weight file "
                        "(.safetensors or a torch file)")
    if model_checks and ck and "://" not in ck and backbone.weights in ("checkpoint", "pretrained"):
        check_checkpoint(arch, ck)


def check_spec(spec: ExperimentSpec, model_checks: bool = True) -> None:
    """Everything about ``spec`` that can be known before any work starts: every cell validates, backbones
    and dataset sources exist, dataset roots exist, classes exist and batches fit the data (read from
    metadata only, never the images), search keys exist, the cascade section is valid and fits the data,
    and the number of seeds and cells is sane.

    ``model_checks`` (default True; ``smn run`` before Ray starts) adds the checks that build or load a model
    and so import torch: the mask selector selects something (:func:`check_selector`), a checkpoint file loads
    into the arch (:func:`check_checkpoint`), and a ``timm/`` or ``open_clip/`` name exists with its weights
    cached. ``smn validate`` and ``smn run --dry-run`` pass False and stay torch-free (issue 27).

    Raises:
        SpecError: one line naming the bad key or value and what is allowed.
    """
    if len(spec.seeds) > MAX_SEEDS:
        raise SpecError(f"seeds: {len(spec.seeds)} seeds; allowed: <= {MAX_SEEDS:,}")
    check_cell_count(spec)
    cells = expand_cells(spec)  # every grid value validated, before any work starts
    sizes: dict[str, int | None] = {}
    seen: set[str] = set()
    for cell in cells:
        cfg = cell.config
        key = json.dumps([cfg.backbone.arch, cfg.backbone.weights, cfg.backbone.checkpoint], default=str)
        if key not in seen:
            seen.add(key)
            _check_backbone(cfg.backbone, model_checks)
        mask = cfg.train.mask if METHODS.get(cfg.method) and METHODS[cfg.method][1] == "mask" else None
        if mask is not None and model_checks:
            key = json.dumps([cfg.backbone.arch, mask.selector, mask.stages, mask.include_bias, mask.include_bn],
                             default=str)
            if key not in seen:
                seen.add(key)
                check_selector(cfg.backbone.arch, mask)
        key = json.dumps([cfg.dataset.__dict__, cfg.train.batch_size], default=str)
        if key not in sizes:
            sizes[key] = _check_data_and_batch(cfg.dataset, cfg.train, "dataset", "train")
            if cfg.pretrain is not None and cfg.backbone.weights == "pipeline":
                _check_data_and_batch(cfg.pretrain.dataset, cfg.pretrain.train, "pretrain.dataset", "pretrain.train")
    if spec.search is not None:
        for key, axis in spec.search.space.items():
            sample = axis.values[0] if axis.type == "choice" else (int(axis.low) if axis.type == "int" else axis.low)
            try:
                search_cell(spec, {key: sample})
            except SpecError as exc:
                raise SpecError(f"search.space.{key}: {str(exc).split(': ', 1)[-1]}") from None
    if spec.cascade is not None:
        _check_cascade(spec, min((n for n in sizes.values() if n is not None), default=None))


def _check_cascade(spec: ExperimentSpec, n_train: int | None) -> None:

    if spec.dataset.val_fraction is not None:
        raise SpecError(f"dataset.val_fraction {spec.dataset.val_fraction}: the cascade evaluates on the test split "
                        "only; allowed: null in a cascade spec")
    cs = cascade_spec(spec)
    if n_train is not None:
        for name in ("components", "clusters"):
            value = getattr(cs.router, name)
            if value > n_train:
                raise SpecError(f"cascade.router.{name} {value} is larger than the {n_train} training images; "
                                f"allowed: cascade.router.{name} <= {n_train}")
    if cs.experts.resources is not None:
        _check_value(cs.experts.resources.model_dump(), Resources, "cascade.experts.resources")


def cell_id_of(config: CellConfig) -> str:
    """A cell's id: :func:`config_hash` of its resolved config (``CellConfig.to_dict()``)."""
    return config_hash(config.to_dict())


def _base(spec: ExperimentSpec) -> dict:
    base = spec.model_dump(mode="python", include={"backbone", "dataset", "train", "eval", "pretrain"})
    return json.loads(json.dumps(base, default=lambda o: o.__dict__))


def _validate(raw: dict, where: str) -> CellConfig:
    try:
        return _CELL_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, where)) from None


def _reference_raw(raw: dict) -> dict:
    """The threshold cell whose found density a ``topk_density: found`` cell uses."""
    ref = copy.deepcopy(raw)
    ref["train"]["mask"]["mode"] = "threshold"
    ref["train"]["mask"]["topk_density"] = None
    ref["train"]["progressive_topk"] = False
    return ref


def _overrides(spec: ExperimentSpec, method: str) -> dict[str, Any]:
    """``method_overrides`` of ``method``; a random-mask control takes SMN's first (it is SMN's config)."""
    own = spec.method_overrides.get(method, {})
    return {**spec.method_overrides.get("smn", {}), **own} if method in CONTROLS else dict(own)


def control_reference(config: CellConfig) -> str:
    """The cell id of the SMN cell whose trained mask a random-mask control (``config.method`` in
    :data:`smn_core.pipeline.CONTROLS`) draws from: the same config with ``method: smn``."""
    return cell_id_of(dataclasses.replace(config, method="smn"))


def _iter_cells(spec: ExperimentSpec, densities: dict[str, float] | None):
    """Yield ``(Cell | None, Waiting | None)`` for every grid point: a ready cell, or
    (None, :class:`Waiting`) for a dependent cell whose reference has not landed yet (a top-k cell at a found density, a
    random-mask control; ``densities`` holds the landed masked cells' densities)."""
    base = _base(spec)
    keys = list(spec.grid)
    for method in spec.methods:
        for combo in itertools.product(*(spec.grid[k] for k in keys)):
            for seed in spec.seeds:
                raw = copy.deepcopy(base)
                raw.update(method=method, seed=seed)
                for k, v in _overrides(spec, method).items():
                    _set_dotted(raw, k, v)
                for k, v in zip(keys, combo):
                    _set_dotted(raw, k, v)
                where = "cell (" + (", ".join(f"{k}={v!r}" for k, v in zip(keys, combo)) or "the spec") + ")"
                if spec.method_overrides.get(method):
                    where += f" of method {method} with method_overrides.{method}"
                trained = METHODS[method] is not None
                grid_values = dict(zip(keys, combo)) if trained else {
                    k: v for k, v in zip(keys, combo) if k != "train" and not k.startswith("train.")}
                if method in CONTROLS:  # a random-mask control: after the SMN cell of the same config
                    ref_cfg = _validate({**raw, "method": "smn"}, where + " (its SMN reference)")
                    ref_id = cell_id_of(ref_cfg)
                    yield Cell(ref_id, ref_cfg, grid_values), None
                    if ref_id not in (densities or {}):
                        _validate(raw, where)  # validate it now, before any work
                        yield None, Waiting(cell_label(method, grid_values, seed), method, ref_id, False)
                        continue
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
                        yield None, Waiting(cell_label(method, grid_values, seed), method, ref_id, True)
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
    check_cell_count(spec)
    cells: dict[str, Cell] = {}
    for cell, _ in _iter_cells(spec, densities):
        if cell is not None:
            cells.setdefault(cell.cell_id, cell)
    return list(cells.values())


def pending_references(spec: ExperimentSpec, densities: dict[str, float] | None = None) -> set[str]:
    """Cell ids of the cells some dependent cell still waits for: the threshold cells whose density a
    ``topk_density: found`` cell needs, the SMN cells whose trained mask a random-mask control draws from
    (not in ``densities``, the landed masked cells' ``density``)."""
    return {w.reference for w in waiting_cells(spec, densities)}


def waiting_count(spec: ExperimentSpec, densities: dict[str, float] | None = None) -> int:
    """How many dependent cells (top-k at a found density, random-mask controls) still wait for their reference
    (:func:`pending_references`), counted before they can be expanded."""
    return len(waiting_cells(spec, densities))


def waiting_cells(spec: ExperimentSpec, densities: dict[str, float] | None = None) -> list[Waiting]:
    """The dependent cells (top-k at a found density, random-mask controls) that still wait for their reference
    (not in ``densities``), each once, in expansion order (``smn run --dry-run`` lists them)."""
    seen: dict[tuple[str, str], Waiting] = {}
    for cell, waiting in _iter_cells(spec, densities):
        if cell is None:
            seen.setdefault((waiting.label, waiting.reference), waiting)
    return list(seen.values())


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
