"""The paper's tables and figures, rebuilt from the ledger alone: a registry of named layouts.

A *table layout* turns long ledger rows (:func:`orchestrator.results.ledger.read_ledger`) into a
``pandas.DataFrame`` of display strings (index = row labels, columns = column labels), which
:func:`render_frame` writes as Markdown, LaTeX, CSV or JSON (pandas' own writers). A *figure* draws ledger rows into a PNG
with matplotlib. Each paper area registers its own, with the decorators below, in a module of its own
(:mod:`orchestrator.reports.tables`, ``ablations``, ``baselines``, ``cascade``, ``codec_costs``, ``vs_frozen``),
which :mod:`orchestrator.reports` imports by name, so any import of the package registers them all;
``smn table --layout NAME`` and ``smn plot --figure NAME`` find them here. None of these modules loads
torch at import time (``smn table`` must start quickly).

    @register_table("table2", "Table 2: threshold vs top-k masking (k-NN, linear probe, density)")
    def table2(df: pd.DataFrame) -> pd.DataFrame: ...

    @register_figure("fig8", "Fig. 8: accuracy against trainable masks, per selection strategy")
    def fig8(df: pd.DataFrame, out: str) -> None: ...
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from smn_core.checkpoint import atomic_write
from smn_core.registry import check_choice

from orchestrator.reports.settings import NOTE, split_settings

__all__ = ["TableLayout", "Figure", "register_table", "register_figure", "tables", "figures",
           "render_frame", "write_frame", "flat_frame", "figure_list", "check_figure", "draw_figure", "FORMATS", "check_format", "mean_std", "grid_values", "metric_frame", "save_figure",
           "json_records", "dumps_strict", "strict", "COUNT_COLUMNS"]


@dataclass(frozen=True)
class TableLayout:
    """A named table: ``build(ledger rows) -> DataFrame of strings``.

    ``func`` is the registered function; :meth:`build` hands it the rows through
    :func:`orchestrator.reports.settings.split_settings`, so cells of different settings never share a row,
    and puts the split's one-line note in the frame's ``attrs["note"]`` (:func:`render_frame` prints it)."""

    name: str
    description: str
    func: Callable[[pd.DataFrame], pd.DataFrame]

    def build(self, df: pd.DataFrame) -> pd.DataFrame:
        """The layout of ledger rows ``df``, one row per setting (see the class docstring)."""
        rows = split_settings(df)
        frame = self.func(rows)
        if frame is not None and rows.attrs.get(NOTE):
            frame.attrs["note"] = rows.attrs[NOTE]
        return frame


@dataclass(frozen=True)
class Figure:
    """A named figure: ``draw(ledger rows, output PNG path)``."""

    name: str
    description: str
    draw: Callable[[pd.DataFrame, str], None]


_TABLES: dict[str, TableLayout] = {}
_FIGURES: dict[str, Figure] = {}


def register_table(name: str, description: str):
    """Decorator registering a table layout under ``name`` (raises ValueError on a duplicate name)."""
    return _registrar(_TABLES, "table layout", name, lambda fn: TableLayout(name, description, fn), "func")


def register_figure(name: str, description: str):
    """Decorator registering a figure under ``name`` (raises ValueError on a duplicate name)."""
    return _registrar(_FIGURES, "figure", name, lambda fn: Figure(name, description, fn), "draw")


def _registrar(registry: dict, kind: str, name: str, record: Callable, attr: str):
    """A decorator that stores ``record(fn)`` as ``registry[name]`` and returns ``fn`` unchanged.

    Raises:
        ValueError: ``registry[name]`` already holds another function (its ``attr``), naming the ``kind``.
    """
    def wrap(fn):
        if name in registry and getattr(registry[name], attr) is not fn:
            raise ValueError(f"{kind} {name!r} is registered twice")
        registry[name] = record(fn)
        return fn
    return wrap


def tables() -> dict[str, TableLayout]:
    """Every registered table layout, by name."""
    return dict(sorted(_TABLES.items()))


def figures() -> dict[str, Figure]:
    """Every registered figure, by name."""
    return dict(sorted(_FIGURES.items()))


def figure_list() -> str:
    """``smn plot --figure list``: one line per registered figure, its name and description."""
    return "\n".join(f"{f.name:12s} {f.description}" for f in figures().values())


def check_figure(name: str) -> None:
    """Refuse a figure name that is not registered.

    Raises:
        ValueError: naming the figure and the registered ones.
    """
    known = figures()
    if name not in known:
        raise ValueError(f"figure {name!r} is not known; allowed: {', '.join(known)} (or 'list')")


def draw_figure(name: str, df: pd.DataFrame, location: str) -> str:
    """Draw the registered figure ``name`` from ledger rows ``df`` into ``location`` (a local PNG path, its
    folder created, or a ``pyarrow.fs`` URI: drawn to a temporary file, then stored whole through
    :func:`smn_core.checkpoint.atomic_write`); returns ``location``."""
    draw = figures()[name].draw
    if "://" not in location:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        draw(df, location)
        return location
    with tempfile.TemporaryDirectory(prefix="smn-plot-") as tmp:
        local = Path(tmp) / f"{name}.png"
        draw(df, str(local))
        atomic_write(location, local.read_bytes())
    return location


def grid_values(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with one column per grid axis (last dotted component, e.g. ``num_prototypes``) parsed
    from ``grid_json``; cells without that axis get None."""
    parsed = df["grid_json"].map(json.loads)
    keys = sorted({k for g in parsed for k in g})
    out = df.copy()
    for k in keys:
        out[k.split(".")[-1]] = parsed.map(lambda g, k=k: g.get(k))
    return out


def metric_frame(df: pd.DataFrame, metrics: list[str] | tuple[str, ...], by: list[str]) -> pd.DataFrame:
    """Aggregate ledger rows over seeds: index ``by`` (columns of ``df``), columns ``(metric, mean|std|n)``."""
    sub = df[df["metric"].isin(metrics)]
    if sub.empty:
        return pd.DataFrame()
    agg = sub.groupby(by + ["metric"], dropna=False)["value"].agg(["mean", "std", "count"]).rename(
        columns={"count": "n"})
    wide = agg.unstack("metric")
    wide.columns = wide.columns.swaplevel(0, 1)
    return wide.sort_index(axis=1)


def mean_std(mean: float, std: float | None = None, n: float | None = None, digits: int = 3) -> str:
    """``"0.812"`` or ``"0.812 ± 0.004"`` (std shown when n > 1); ``"-"`` for a missing value."""
    if mean is None or pd.isna(mean):
        return "-"
    s = f"{mean:.{digits}f}"
    if n is not None and not pd.isna(n) and n > 1 and std is not None and not pd.isna(std):
        s += f" ± {std:.{digits}f}"
    return s


def save_figure(fig, out: str) -> None:
    """Lay out a finished matplotlib figure, write it to ``out`` (PNG, 120 dpi) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


FORMATS = ("markdown", "latex", "csv", "json")
"""Text formats of :func:`render_frame` (``smn table --format parquet`` writes a file through :func:`write_frame`)."""


def check_format(fmt: str) -> None:
    """Check that ``fmt`` is one of :data:`FORMATS`.

    Raises:
        ValueError: on an unknown format (lists the allowed ones).
    """
    check_choice(fmt, FORMATS, "table format")


def flat_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its named index levels as ordinary columns and flattened (``a_b``) column labels."""
    if any(n is not None for n in frame.index.names):
        frame = frame.reset_index()
    if isinstance(frame.columns, pd.MultiIndex):
        frame = frame.copy()
        frame.columns = ["_".join(str(p) for p in c if str(p)) for c in frame.columns]
    else:
        frame = frame.rename(columns=str)
    return frame


def render_frame(frame: pd.DataFrame, fmt: str = "markdown", title: str | None = None) -> str:
    """Render a table with pandas: Markdown (``DataFrame.to_markdown``), LaTeX (``Styler.to_latex``,
    booktabs rules), CSV (``to_csv``) or strict JSON (one object per row, :func:`json_records`).

    Markdown and LaTeX show a missing value as ``-``; CSV keeps it empty, JSON null (with a ``note``).
    The frame's ``attrs["note"]`` (e.g. settings split into rows of their own,
    :func:`orchestrator.reports.settings.split_settings`) follows a Markdown or LaTeX table.

    Raises:
        ValueError: on an unknown format (lists the allowed ones), from :func:`check_format`.
    """
    check_format(fmt)
    if frame is None or frame.empty:
        return "(no results in the ledger for this table yet)"
    note = frame.attrs.get("note", "")
    flat = flat_frame(frame)
    if fmt == "csv":
        return flat.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return dumps_strict(json_records(flat), indent=1)
    shown = flat.astype(object).where(flat.notna(), "-")
    if fmt == "latex":
        styler = shown.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
        body = styler.to_latex(hrules=True, column_format="l" + "r" * (shown.shape[1] - 1))
        for char, tex in (("±", r"$\pm$"), ("∞", r"$\infty$"), ("β", r"$\beta$"), ("≈", r"$\approx$")):
            body = body.replace(char, tex)
        return (f"% {title}\n" if title else "") + body.rstrip("\n") + "".join(
            f"\n% Note: {line}" for line in note.splitlines())
    # display strings stay as they are ("0.900" is not re-read as 0.9); numbers right-aligned as strings
    align = ["right" if shown[c].map(_numeric_text).all() and (shown[c] != "-").any() else "left"
             for c in shown.columns]
    return (f"**{title}**\n\n" if title else "") + shown.to_markdown(index=False, disable_numparse=True,
                                                                       colalign=align) + "".join(
        f"\n\nNote: {line}" for line in note.splitlines())


COUNT_COLUMNS = re.compile(r"(?:_n$|^n$|^seeds$|^cells$|^done$|^failed$|^collapsed$|^attempts$|^seed$|_count$)")
"""Column names that hold counts: written to JSON as integers (``knn_top1_n: 3``, not ``3.0``)."""


def _plain(value):
    """A JSON-ready Python value: numpy scalars unwrapped, non-finite floats as ``(None, reason)``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None, ("infinite" if math.isinf(value) else "not measured")
    if value is pd.NaT or (not isinstance(value, (list, dict, tuple, str)) and pd.isna(value)):
        return None, "not measured"
    if isinstance(value, pd.Timestamp):
        return value.isoformat(), None
    return value, None


def json_records(frame: pd.DataFrame) -> list[dict]:
    """``frame`` (flat columns) as strict-JSON-ready records: no NaN or infinity (``None``, and the row's
    ``note`` names each such column and why: ``infinite`` or ``not measured``), counts as ``int``
    (:data:`COUNT_COLUMNS`), numpy scalars unwrapped. Parses under ``json.loads(s, parse_constant=raise)``."""
    records = []
    for row in frame.to_dict(orient="records"):
        out, why = {}, {}
        for col, value in row.items():
            value, reason = _plain(value)
            if reason is not None:
                why.setdefault(reason, []).append(str(col))
            elif isinstance(value, float) and COUNT_COLUMNS.search(str(col)) and value.is_integer():
                value = int(value)
            out[str(col)] = value
        if why:
            text = "; ".join(f"{', '.join(cols)}: {reason}" for reason, cols in sorted(why.items()))
            out["note"] = f"{out['note']}; {text}" if isinstance(out.get("note"), str) and out["note"] else text
        records.append(out)
    return records


def _strict_default(value):
    plain, reason = _plain(value)
    if reason is not None or plain is not value:
        return plain
    return str(value)


def dumps_strict(obj, **kwargs) -> str:
    """``json.dumps`` that never writes ``NaN`` / ``Infinity`` (``allow_nan=False``): numpy scalars unwrapped,
    a non-finite float inside ``obj`` must be replaced first (:func:`json_records`, :func:`strict`).

    Raises:
        ValueError: ``obj`` still holds a non-finite float.
    """
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, default=_strict_default, **kwargs)


def strict(obj):
    """``obj`` (nested dicts / lists / scalars) with every non-finite float as ``None`` and numpy scalars
    unwrapped: ready for :func:`dumps_strict`."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, (float, np.generic)):
        return _plain(obj)[0]
    return obj


def _numeric_text(v) -> bool:
    text = str(v).split(" ± ")[0].rstrip("%")
    try:
        float(text)
        return True
    except ValueError:
        return text == "-"


def write_frame(frame: pd.DataFrame, path: str, fmt: str = "parquet") -> str:
    """Write a table to ``path``: ``parquet`` (``DataFrame.to_parquet``) or any :data:`FORMATS` as text;
    returns ``path``.

    Raises:
        ValueError: on an unknown format.
    """
    if fmt == "parquet":
        flat_frame(frame).to_parquet(path, index=False)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_frame(frame, fmt) + "\n")
    return path
