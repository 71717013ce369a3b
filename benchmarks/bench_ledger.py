"""The ledger's figures (issue 27), side by side in one run, each command in a fresh interpreter:

* ``smn table`` on N cells (default 10,000) against DuckDB's own query over the same files (a group-by of two
  metrics: ``knn_top1`` and ``density`` by method): wall time and peak resident memory;
* ``smn table --format csv`` on the N cells (CSV keeps the per-cell read; the Markdown table aggregates in DuckDB),
  and ``smn table`` on the same cells written before the ``setting_id`` column (the per-cell read too);
* ``smn table`` and ``smn ls`` on 100 cells;
* ``smn table`` on the N cells after ``smn ledger compact`` (and the interpreter's start alone, ``python -c
  pass``, for reference);
* GET requests (object reads and listings) that ``smn table`` sends to S3 (moto's server on 127.0.0.1), on
  ``--s3-cells`` cells, before and after compaction;
* the import floor of a read command, ``import pandas, pyarrow.parquet, duckdb`` in a fresh interpreter;
* ``smn validate experiments/demo.yaml`` and ``smn run experiments/demo.yaml --dry-run`` on a finished demo (the
  committed ledger of ``docs/results/demo``).

The synthetic ledgers are the demo's real cell files (``docs/results/demo/ledger``) cloned under new cell
ids, round robin, with the ``setting_id`` column that ``write_cell`` writes since issue 27 (the committed files
predate it); ``smn table`` on the same N cells without that column (as written before) is measured too. Run: ``python -m benchmarks.bench_ledger [--cells 10000] [--s3-cells 10000] [--out FILE.json]``;
it prints a Markdown table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.s3_server import moto_s3

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "docs" / "results" / "demo" / "ledger"

_MEASURE = r"""
import json, sys, time
t0 = time.time()
kind, arg = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0]] + json.loads(arg) if kind == "smn" else sys.argv
code = 0
if kind == "smn":
    from orchestrator.cli.app import main
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(json.loads(arg))
else:
    exec(arg)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"code": code, "inner_s": time.time() - t0, "peak_mb": hwm / 1024}), file=sys.stderr)
"""


def clone_ledger(results: Path, n: int, experiment: str = "bench", setting_ids: bool = True) -> Path:
    """``results/<experiment>/ledger`` with ``n`` cells: the demo's cell files, round robin, under new ids;
    ``setting_ids``: with the ``setting_id`` column, as ``write_cell`` writes it (False: as the files are)."""
    from orchestrator.results.ledger import FULL_SCHEMA, SETTING_ID
    from orchestrator.spec.keys import setting_id

    src = [pq.read_table(p) for p in sorted(DEMO.glob("*.parquet"))]
    if setting_ids:
        src = [t if SETTING_ID in t.column_names else t.add_column(
            FULL_SCHEMA.get_field_index(SETTING_ID), SETTING_ID,
            pa.array([setting_id(t.column("config_json")[0].as_py())] * t.num_rows, pa.string())) for t in src]
    out = results / experiment / "ledger"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = src[i % len(src)]
        cid = hashlib.sha256(f"{experiment}/{i}".encode()).hexdigest()[:16]
        for col, value in (("cell_id", cid), ("experiment", experiment)):
            t = t.set_column(t.schema.get_field_index(col), col, pa.array([value] * t.num_rows, pa.string()))
        pq.write_table(t, out / f"{cid}.parquet")
    return results


PYCACHE = Path(tempfile.gettempdir()) / "smn-bench-ledger-pycache"
"""A private bytecode cache for the measured interpreters (``PYTHONPYCACHEPREFIX``): a pip install compiles the
packages' bytecode once, while an environment with ``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__`` in
site-packages (this machine's) compiles pandas, scipy and duckdb from source in every process (about 2 s)."""


def measure(kind: str, arg, env: dict | None = None, bytecode: bool = True) -> dict:
    """Wall time (s, from the parent, interpreter start included) and peak RSS (MB) of one fresh interpreter
    running ``smn ARGV`` (kind ``smn``, ``arg`` a list) or Python code (kind ``py``); ``bytecode``: with the
    warmed cache :data:`PYCACHE` (False: as the environment is, which may compile every module)."""
    payload = json.dumps(arg) if kind == "smn" else arg
    base = {k: v for k, v in os.environ.items() if not (bytecode and k == "PYTHONDONTWRITEBYTECODE")}
    if bytecode:
        base["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, kind, payload], cwd=REPO, capture_output=True, text=True,
                          env={**base, "PYTHONPATH": str(REPO), **(env or {})}, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {arg}: exit {proc.returncode}: {proc.stderr[-1500:]}")
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "peak_mb": round(stats["peak_mb"]), "code": stats["code"]}


def duckdb_query(folder: Path) -> str:
    """DuckDB's own query over a ledger folder: mean and count of two metrics per method."""
    return ("import duckdb\nduckdb.sql(\"SELECT method, metric, avg(value), count(*) FROM "
            f"read_parquet('{folder}/*.parquet') WHERE metric IN ('knn_top1', 'density') GROUP BY ALL\").fetchall()")


def s3_gets(n: int) -> dict:
    """GET requests of ``smn table`` (in this process) on ``n`` cells in moto's S3, before / after compaction."""
    from orchestrator.cli.commands.read import table_text
    from orchestrator.results import compact

    with moto_s3("bench") as s3:
        fs, requests = s3.fs, s3.requests
        with tempfile.TemporaryDirectory() as tmp:
            local = clone_ledger(Path(tmp), n) / "bench" / "ledger"
            def upload(p: Path) -> None:
                with fs.open_output_stream(f"bench/r/bench/ledger/{p.name}") as out:
                    out.write(p.read_bytes())

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(upload, local.iterdir()))
        uri = s3.uri("r")
        out = {}
        for when in ("before", "after"):
            if when == "after":
                compact.compact(uri, "bench")
            requests.lines.clear()
            t0 = time.perf_counter()
            text = table_text(uri, None, "markdown", None)
            out[f"gets_{when}"] = requests.count("GET")
            out[f"table_s_{when}"] = round(time.perf_counter() - t0, 2)
            out[f"table_{when}"] = text
        assert out["table_before"] == out["table_after"], "compaction changed the table"
        return {k: v for k, v in out.items() if not k.startswith("table_") or k.startswith("table_s")}


class _Figures(dict):
    """The figures so far; each one printed (a Markdown row) and saved (``path``) as soon as it is measured."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path
        print("| figure | wall s | peak MB | other |\n| --- | --- | --- | --- |", flush=True)

    def __setitem__(self, name, f):
        super().__setitem__(name, f)
        other = ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("wall_s", "peak_mb", "code"))
        print(f"| {name} | {f.get('wall_s', '-')} | {f.get('peak_mb', '-')} | {other} |", flush=True)
        if self.path:
            Path(self.path).write_text(json.dumps(self, indent=1))


def _median(runs: list[dict]) -> dict:
    """The run of median wall time among ``runs`` (figures of :func:`measure`)."""
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def run(cells: int, s3_cells: int, out_path: str | None = None, repeat: int = 3) -> dict:
    """Every figure of the module docstring; ``{name: {...}}``, printed as they come. ``repeat``: pairs of
    (``smn table``, DuckDB's query) on the N cells, measured one pair after another; the figures are the
    median run of each, with every run's time beside them."""
    from orchestrator.results import compact

    out = _Figures(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big, small = clone_ledger(tmp / "big", cells), clone_ledger(tmp / "small", 100)
        old = clone_ledger(tmp / "old", cells, setting_ids=False)
        out["uptime (load before)"] = {"load_1min": round(os.getloadavg()[0], 2), "cores": os.cpu_count()}
        measure("smn", ["table", str(small)])  # fills the bytecode cache (not a figure)
        out["python -c pass"] = measure("py", "pass")
        out["smn table, 100 cells, no bytecode cache"] = measure("smn", ["table", str(small)], bytecode=False)
        out["import floor: pandas, pyarrow.parquet, duckdb"] = measure("py", "import pandas, pyarrow.parquet, duckdb")
        pairs = [(measure("smn", ["table", str(big)]), measure("py", duckdb_query(big / "bench" / "ledger")))
                 for _ in range(repeat)]  # side by side, one pair after another: the load moves both alike
        mine, duck = _median([p[0] for p in pairs]), _median([p[1] for p in pairs])
        out[f"smn table, {cells} cells"] = {**mine, "runs_s": [p[0]["wall_s"] for p in pairs]}
        out[f"DuckDB group-by, {cells} cells"] = {**duck, "runs_s": [p[1]["wall_s"] for p in pairs]}
        out[f"ratio smn table / DuckDB, {cells} cells"] = {
            "time_x": round(mine["wall_s"] / duck["wall_s"], 2), "memory_x": round(mine["peak_mb"] / duck["peak_mb"], 2),
            "time_x_per_pair": [round(a["wall_s"] / b["wall_s"], 2) for a, b in pairs]}
        out[f"smn table, {cells} cells written before setting_id"] = measure("smn", ["table", str(old)])
        out[f"smn table --format csv, {cells} cells (the per-cell read)"] = measure(
            "smn", ["table", str(big), "--format", "csv"])
        out[f"smn ls, {cells} cells"] = measure("smn", ["ls", str(big)])
        out["smn table, 100 cells"] = measure("smn", ["table", str(small)])
        out["smn ls, 100 cells"] = measure("smn", ["ls", str(small)])
        t0 = time.perf_counter()
        compact.compact(str(big), "bench")
        out[f"smn ledger compact, {cells} cells (in process)"] = {"wall_s": round(time.perf_counter() - t0, 2)}
        out[f"smn table, {cells} compacted cells"] = measure("smn", ["table", str(big)])
        out[f"DuckDB group-by, {cells} compacted cells"] = measure(
            "py", duckdb_query(big / "bench" / "ledger" / "_compacted"))
        out[f"smn ls, {cells} compacted cells"] = measure("smn", ["ls", str(big)])
        demo = tmp / "demo_results"
        shutil.copytree(DEMO.parent, demo / "demo")
        out["smn validate experiments/demo.yaml"] = measure("smn", ["validate", "experiments/demo.yaml"])
        out["smn run --dry-run, finished demo"] = measure(
            "smn", ["run", "experiments/demo.yaml", "--dry-run", "--results", str(demo)])
        out["uptime (load after)"] = {"load_1min": round(os.getloadavg()[0], 2), "cores": os.cpu_count()}
    if s3_cells:
        out[f"S3 (moto) smn table, {s3_cells} cells"] = s3_gets(s3_cells)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_ledger``: run, print a Markdown table, write JSON (``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--s3-cells", type=int, default=10_000, help="0: skip the S3 figure")
    p.add_argument("--out", default=None, help="JSON file of the figures")
    p.add_argument("--repeat", type=int, default=3, help="pairs of smn table and DuckDB on the N cells (median)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat} is not allowed; allowed: 1 or more")
    run(args.cells, args.s3_cells, args.out, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
