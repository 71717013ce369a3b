"""The benchmark harness (benchmarks/run_all.py) in its quickest mode: it writes the Parquet file and the
Markdown report, with a section for every area and a figure beside its floor or comparison.

The test runs the areas without Ray (seconds of work each) and the sweep area (a local Ray and a Tune grid) in one
harness run; the other Ray areas (cold worker processes, two TorchTrainers, a cascade) take minutes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.common import AREAS

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
KEYS = [k for k, _, _ in AREAS]


def run_harness(tmp_path: Path, only: list[str], timeout: int) -> tuple[Path, str]:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--out", str(out), "--quick", "--threads", "1",
                           "--only", ",".join(only)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def check_outputs(out: Path, ran: list[str]) -> None:
    table = pq.read_table(out / "benchmarks.parquet")
    meta = json.loads(table.schema.metadata[b"smn_bench"])
    assert meta["mode"] == "quick" and len(meta["loadavg_start"]) == 3 and len(meta["loadavg_end"]) == 3
    df = table.to_pandas()
    assert set(df["area"]) == set(KEYS)
    for key in KEYS:
        rows = df[df["area"] == key]
        if key not in ran:
            assert list(rows["status"]) == ["not run"], rows
            continue
        # "skipped" says why (e.g. Ray gave no task to an already used worker, or a second GPU is missing)
        assert rows["status"].isin(["ok", "skipped"]).all(), rows[["name", "status", "notes"]].to_string()
        assert (rows[rows["status"] == "skipped"]["notes"] != "").all()
        ok = rows[rows["status"] == "ok"]
        assert len(ok) and ok["value"].map(math.isfinite).all()
        # every area sets at least one figure against a floor or a side-by-side comparison
        assert ok["ratio"].map(math.isfinite).any(), ok[["name", "ratio"]].to_string()
        assert (ok["compare_to"] != "").all()
    report = (out / "REPORT.md").read_text()
    for _, _, title in AREAS:
        assert f"## {title}" in report
    assert "## Largest gaps to the floor" in report and "load average" in report


@pytest.mark.slow
def test_quick_harness_writes_parquet_and_report_with_every_section(tmp_path):
    # the areas without Ray and one Ray area (a local Ray and a Tune grid), in one harness run (one interpreter and
    # one report, as a user runs it); `ray`, `cascade` and `engine` take minutes more and run with the harness
    # itself (python -m benchmarks.run_all)
    ran = ["train_step", "eval", "storage", "data", "sweep"]
    out, _ = run_harness(tmp_path, ran, timeout=1200)
    check_outputs(out, ran)
