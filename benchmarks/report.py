"""Write a harness run: every row to one Parquet file (pyarrow), and a Markdown report.

Parquet (``benchmarks.parquet``): one row per figure with the columns of :class:`benchmarks.common.Row`
plus ``gap``; the run's facts (device, threads, load average, versions, wall times) are JSON in the
schema metadata under ``smn_bench``. Markdown (``REPORT.md``): the facts, one section per area (every
area of :data:`benchmarks.common.AREAS`, also those not run, which say why), each figure beside its
floor or comparison, then the largest gaps to the floor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .common import AREAS, Row

__all__ = ["SCHEMA", "write_parquet", "render_markdown", "fmt"]

SCHEMA = pa.schema([
    ("area", pa.string()), ("name", pa.string()), ("value", pa.float64()), ("unit", pa.string()),
    ("compare_to", pa.string()), ("compare_value", pa.float64()), ("ratio", pa.float64()),
    ("ideal", pa.float64()), ("better", pa.string()), ("gap", pa.float64()), ("notes", pa.string()),
    ("device", pa.string()), ("repeats", pa.int64()), ("status", pa.string()),
])


def write_parquet(rows: list[Row], meta: dict, path: str | Path) -> None:
    """Write ``rows`` with ``meta`` (JSON in the schema metadata) to ``path``."""
    table = pa.Table.from_pylist([r.to_dict() for r in rows], schema=SCHEMA)
    table = table.replace_schema_metadata({"smn_bench": json.dumps(meta, default=str)})
    pq.write_table(table, str(path))


def fmt(value: float) -> str:
    """A figure with 3 significant digits, no exponent for everyday magnitudes; ``-`` for NaN."""
    if value is None or not math.isfinite(value):
        return "-"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1 or a == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Row]) -> list[str]:
    out = ["| figure | value | set against | reference | ratio | ideal | gap | notes |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r.status != "ok":
            out.append(f"| {_cell(r.name)} | {r.status} | | | | | | {_cell(r.notes)} |")
            continue
        unit = f" {r.unit}" if r.unit else ""
        ref = f"{fmt(r.compare_value)}{unit}" if math.isfinite(r.compare_value) else "-"
        ratio = f"{fmt(r.ratio)}x" if math.isfinite(r.ratio) else "-"
        ideal = f"{fmt(r.ideal)}x" if math.isfinite(r.ideal) else "-"
        gap = f"{fmt(r.gap)}" if math.isfinite(r.gap) else "-"
        out.append(f"| {_cell(r.name)} | {fmt(r.value)}{unit} | {_cell(r.compare_to)} | {ref} | {ratio} | {ideal} | "
                   f"{gap} | {_cell(r.notes)} |")
    return out


def render_markdown(rows: list[Row], meta: dict, top: int = 5) -> str:
    """The Markdown report of a run (see the module docstring)."""
    la0, la1 = meta.get("loadavg_start", []), meta.get("loadavg_end", [])
    lines = [
        "# smn benchmarks",
        "",
        f"- command: `{meta.get('command', '')}`",
        f"- mode: {meta.get('mode')}; device: {meta.get('device')}; torch threads (and BLAS/OpenMP pools): "
        f"{meta.get('threads')} ({meta.get('threads_reason', '')})",
        f"- host: {meta.get('host')}, {meta.get('cpu_count')} CPU cores; python {meta.get('python')}, "
        f"torch {meta.get('torch')}, ray {meta.get('ray')}",
        f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in la0)}; "
        f"at end: {', '.join(f'{x:.2f}' for x in la1)} (on {meta.get('cpu_count')} cores: other work shares the "
        "machine; every ratio below compares variants measured side by side in this run)",
        f"- started {meta.get('started')}, total wall {fmt(meta.get('total_s', math.nan))} s; per area: "
        + ", ".join(f"{k} {fmt(v)} s" for k, v in meta.get("area_s", {}).items()),
        "",
        "Columns: *set against* is the floor (what a perfect implementation would cost at the same shapes, "
        "measured in this run) or a variant measured side by side; *ratio* = value / reference; *ideal* = the "
        "ratio a perfect implementation reaches; *gap* = how many times worse than ideal (ratio / ideal, or "
        "ideal / ratio where higher is better; below 1 is better than the ideal).",
        "",
    ]
    for key, _, title in AREAS:
        lines += [f"## {title}", ""]
        area_rows = [r for r in rows if r.area == key]
        lines += _table(area_rows) if area_rows else ["(no rows)"]
        lines.append("")
    ranked = sorted((r for r in rows if r.status == "ok" and math.isfinite(r.gap)), key=lambda r: -r.gap)
    lines += ["## Largest gaps to the floor", ""]
    if ranked:
        lines += ["| area | figure | ratio | ideal | gap |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r.area} | {_cell(r.name)} | {fmt(r.ratio)}x | {fmt(r.ideal)}x | {fmt(r.gap)} |"
                  for r in ranked[:top]]
    else:
        lines.append("(no figure with a floor in this run)")
    lines.append("")
    return "\n".join(lines)
