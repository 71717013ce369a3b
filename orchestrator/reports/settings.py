"""A row is a setting: cells that ran with different settings never share a table row (issue 25).

A *setting* is a cell's resolved config (``config_json`` of the ledger) without its seed (``seed`` and
``train.seed``, which follows it): cells that differ only in the seed are the same setting, whose mean over
seeds a table shows. Its id, :func:`setting_id`, is :func:`orchestrator.spec.keys.config_hash` of that config,
the function the cell id (:func:`orchestrator.spec.experiment.cell_id_of`) comes from.

Tables group cells by experiment, method, backbone, dataset and grid values (``grid_json``). Two runs of one
spec into the same results folder with another override (``smn run demo.yaml train.epochs=1``) give cells
that share all of these but not the setting. :func:`split_settings` tells them apart before any layout sees
the rows: it adds the config keys that differ between the settings of such a group to each cell's
``grid_json`` (``{"train.epochs": 1}``), so every layout that groups or labels by grid values puts each
setting in a row of its own and names it; when more than :data:`MAX_KEYS` keys differ, one key
``setting`` with a short id stands for them and the note lists the keys. The rows' ``attrs`` carry the
one-line note (:data:`NOTE`) and the added keys (:data:`KEYS`).

:func:`select` is ``smn table --where KEY=VALUE``: the cells whose resolved config holds that value.

The setting id is the ledger's ``setting_id`` column when the rows have it (written since issue 27; derived
from ``config_json`` by the reader for older files), else it is derived from ``config_json`` here. Rows read
without ``config_json`` (``smn table``: the configs are kilobytes a cell) get the configs of one cell per setting
from the ledger, and only for the groups that hold several settings (:func:`orchestrator.results.ledger.cell_configs`).

Reads the ledger's columns only; imports neither torch nor ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from orchestrator.results import ledger
from orchestrator.spec.keys import flatten, setting_config, setting_id, split_assignments

__all__ = ["SEED_KEYS", "MAX_KEYS", "NOTE", "KEYS", "setting_config", "setting_id", "split_settings", "select",
           "parse_where", "diff_from", "setting_label", "DEFAULTS_FILE", "cell_defaults", "method_settings"]

SEED_KEYS = ("seed", "train.seed")
"""Config keys that hold the seed (``train.seed`` is set from ``seed``, smn_core.pipeline.CellConfig)."""

MAX_KEYS = 3
"""At most this many differing keys are shown by name; more become one ``setting`` key (a short id)."""

NOTE = "settings_note"
KEYS = "setting_keys"
"""``DataFrame.attrs`` entries :func:`split_settings` sets: the one-line note and the grid keys it added."""

_GROUP = ["experiment", "method", "backbone", "dataset", "grid_json"]


def _flat(config_json: str) -> dict[str, str]:
    """A cell's setting as ``{dotted key: canonical JSON of the value}``."""
    flat = flatten(setting_config(json.loads(config_json)))
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flat.items()}


_MISSING = "(absent)"


def _differing(flats: list[dict[str, str]]) -> list[str]:
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({f.get(k, _MISSING) for f in flats}) > 1]


def setting_label(grid: dict[str, Any], keys: Iterable[str]) -> str:
    """The ``k=v, ...`` label of the ``keys`` of ``grid`` (last dotted component of each key), ``""`` for none."""
    return ", ".join(f"{k.split('.')[-1]}={grid[k]}" for k in sorted(keys) if k in grid)


def _ids(cells: pd.DataFrame) -> list[str]:
    """The setting id of each row of ``cells``: its ``setting_id`` where set, else from its ``config_json``."""
    stored = cells["setting_id"] if ledger.SETTING_ID in cells else [None] * len(cells)
    configs = cells["config_json"] if "config_json" in cells else [None] * len(cells)
    return [s if isinstance(s, str) and s else setting_id(c) for s, c in zip(stored, configs)]


def _configs(df: pd.DataFrame, firsts: pd.DataFrame) -> list[str]:
    """``config_json`` of each cell of ``firsts`` (rows with ``experiment`` and ``cell_id``): from ``df`` when it has
    the column, else read from the ledger under ``df.attrs["results"]`` (:func:`ledger.cell_configs`).

    Raises:
        ValueError: neither is there (rows built by hand without configs).
    """
    if "config_json" in firsts:
        return [str(c) for c in firsts["config_json"]]
    if "results" not in df.attrs:
        raise ValueError("ledger rows without config_json and without attrs['results']: cannot name the keys "
                         "that differ between settings; allowed: rows from ledger.read_ledger")
    wanted: dict[str, list[str]] = {}
    for exp, cid in zip(firsts["experiment"], firsts["cell_id"]):
        wanted.setdefault(exp, []).append(cid)
    got = ledger.cell_configs(df.attrs["results"], wanted)
    return [got[(exp, cid)] for exp, cid in zip(firsts["experiment"], firsts["cell_id"])]


def split_settings(df: pd.DataFrame) -> pd.DataFrame:
    """Ledger rows (long or one row per cell, with ``grid_json`` and ``setting_id`` or ``config_json``) in which
    cells of different settings never share (experiment, method, backbone, dataset, ``grid_json``).

    Within each such group holding more than one setting (:func:`setting_id`), every cell's ``grid_json``
    gains the config keys whose values differ between the group's settings (their values in that cell; a key
    a cell lacks is ``None``), or, with more than :data:`MAX_KEYS` of them, ``{"setting": <8-digit id>}``.
    ``attrs[NOTE]`` says, in one line per group, which settings were split and on which keys; ``attrs[KEYS]``
    lists the keys added. Rows are otherwise unchanged; a frame without a split comes back as it was (its
    attrs kept), so calling this twice is the same as once.
    """
    if df.empty or "grid_json" not in df or ("config_json" not in df and ledger.SETTING_ID not in df):
        return df
    cells = df.drop_duplicates(["experiment", "cell_id"])[["cell_id", *_GROUP, *(c for c in ("config_json", ledger.SETTING_ID) if c in df)]]
    cells = cells.assign(setting=_ids(cells))
    new_grid: dict[tuple[str, str], str] = {}  # by (experiment, cell id): two experiments may hold one cell id
    notes, added = list(df.attrs.get(NOTE, "").split("\n")) if df.attrs.get(NOTE) else [], set(df.attrs.get(KEYS, ()))
    for key, g in cells.groupby(_GROUP, sort=True):
        settings = g.drop_duplicates("setting")
        if len(settings) < 2:
            continue
        flats = {s: _flat(c) for s, c in zip(settings["setting"], _configs(df, settings))}
        keys = _differing(list(flats.values()))
        for cid, grid_json, setting in zip(zip(g["experiment"], g["cell_id"]), g["grid_json"], g["setting"]):
            grid = json.loads(grid_json)
            if len(keys) <= MAX_KEYS:
                grid.update({k: (json.loads(flats[setting][k]) if k in flats[setting] else None) for k in keys})
            else:
                grid["setting"] = setting[:8]
            new_grid[cid] = json.dumps(grid, sort_keys=True)
        shown = keys if len(keys) <= MAX_KEYS else ["setting"]
        added.update(shown)
        where = key[1] + (f" ({key[0]}, {key[2]}, {key[3]}" + (f", {grid_text(key[4])}" if key[4] != "{}" else "")
                          + ")")
        notes.append(f"{where}: {len(settings)} settings share method, backbone, dataset and grid; they differ in "
                     + ", ".join(keys) + ", so each is a row of its own"
                     + ("" if len(keys) <= MAX_KEYS else " (labelled setting=<id>)") + ".")
    if not new_grid:
        return df
    out = df.copy()
    out["grid_json"] = [new_grid.get(c, g) for c, g in zip(zip(out["experiment"], out["cell_id"]), out["grid_json"])]
    out.attrs = {**df.attrs, NOTE: "\n".join(notes), KEYS: tuple(sorted(added))}
    return out


def grid_text(grid_json: str, drop: Iterable[str] = ()) -> str:
    """The :func:`setting_label` of a cell's grid values (its ``grid_json``) but the keys in ``drop``: ``k=v, ...``
    in key order, ``""`` for an empty grid."""
    grid = json.loads(grid_json)
    return setting_label(grid, [k for k in grid if k not in drop])


def parse_where(conditions: Iterable[str]) -> list[tuple[str, Any]]:
    """``["train.epochs=8", "method=smn"]`` -> ``[("train.epochs", 8), ("method", "smn")]`` (values as YAML,
    as spec overrides read them).

    Raises:
        ValueError: a condition that is not ``KEY=VALUE`` (names it).
    """
    out = []
    for key, text in split_assignments(conditions, "--where", "--where train.epochs=8"):
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out.append((key, value))
    return out


def _matches(stored: Any, wanted: Any) -> bool:
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return stored is wanted or (str(stored).lower() == str(wanted).lower())
    if isinstance(stored, (int, float)) and isinstance(wanted, (int, float)):
        return float(stored) == float(wanted)
    if isinstance(stored, (list, tuple)) and isinstance(wanted, (list, tuple)):
        return len(stored) == len(wanted) and all(_matches(a, b) for a, b in zip(stored, wanted))
    return stored == wanted or (stored is not None and str(stored) == str(wanted))


def select(df: pd.DataFrame, conditions: Iterable[str]) -> pd.DataFrame:
    """The ledger rows of the cells whose resolved config holds every ``KEY=VALUE`` of ``conditions``
    (``smn table --where``; several conditions all hold). ``KEY`` is a dotted key of the config
    (``train.epochs``, ``dataset.split_seed``, ``method``, ``seed``); a cell without that key (the frozen
    backbone has no ``train`` section) does not match.

    Raises:
        ValueError: a condition that is not ``KEY=VALUE``, or a key that no cell's config holds (names the
            key and a few that exist).
    """
    parsed = parse_where(conditions)
    if not parsed or df.empty:
        return df
    cells = df.drop_duplicates("cell_id")[["cell_id", "config_json"]]
    flats = {c: flatten(json.loads(cfg)) for c, cfg in zip(cells["cell_id"], cells["config_json"])}
    known = sorted({k for f in flats.values() for k in f})
    for key, _ in parsed:
        if key not in known:
            near = [k for k in known if k.split(".")[-1] == key.split(".")[-1]] or known[:8]
            raise ValueError(f"--where key {key!r} is in no cell's config; allowed: a dotted config key such as "
                             + ", ".join(near))
    keep = {c for c, f in flats.items() if all(k in f and _matches(f[k], v) for k, v in parsed)}
    return df[df["cell_id"].isin(keep)]


def diff_from(config: dict, defaults: dict) -> dict[str, Any]:
    """The dotted keys where ``config`` differs from ``defaults`` (both nested; seeds left out), with
    ``config``'s values: what a method's cells ran with beyond the defaults."""
    mine, base = flatten(setting_config(config)), flatten(setting_config(defaults))
    return {k: v for k, v in sorted(mine.items())
            if json.dumps(base.get(k, _MISSING), default=str) != json.dumps(v, default=str)}


DEFAULTS_FILE = Path(__file__).with_name("cell_defaults.json")
"""The resolved config of a cell that sets nothing (``smn_core.pipeline.CellConfig(method="smn").to_dict()``,
without method and seed), stored as JSON so that the report need not import torch to read it;
``tests/test_settings.py`` checks it against ``CellConfig``."""


def cell_defaults() -> dict:
    """The defaults a method's settings are shown against (:data:`DEFAULTS_FILE`)."""
    return json.loads(DEFAULTS_FILE.read_text(encoding="utf-8"))


def method_settings(df: pd.DataFrame) -> pd.DataFrame:
    """What ran: one row per setting of ledger rows ``df`` (after :func:`split_settings`): ``method``,
    ``setting`` (the split label, ``""`` when the method has one setting), ``seeds``, ``cells`` and
    ``differs from defaults`` (``key: value`` lines: the setting's config where it differs from
    :func:`cell_defaults`, a ``pretrain`` section against the defaults of its dataset and training; a method
    without training has no ``train`` keys)."""
    if df.empty:
        return pd.DataFrame(columns=["method", "setting", "seeds", "cells", "differs from defaults"])
    rows = split_settings(df)
    keys = rows.attrs.get(KEYS, ())
    cells = rows.drop_duplicates("cell_id")
    defaults = cell_defaults()
    defaults["pretrain"] = {"dataset": defaults["dataset"], "train": defaults["train"]}  # PretrainSpec's parts
    out = []
    for (method, grid_json), g in cells.groupby(["method", "grid_json"], sort=True):
        config = json.loads(g["config_json"].iloc[0])
        config.pop("method", None)
        diff = diff_from(config, defaults)
        if config.get("train") is None:
            diff = {k: v for k, v in diff.items() if not k.startswith("train.")}
        out.append({"method": method, "setting": setting_label(json.loads(grid_json), keys),
                    "seeds": ", ".join(str(int(s)) for s in sorted(g["seed"].unique())), "cells": int(len(g)),
                    "differs from defaults": "; ".join(f"{k}={json.dumps(v, default=str)}" for k, v in diff.items())
                    or "(defaults)"})
    return pd.DataFrame(out)
