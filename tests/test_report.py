"""Where users look (issue 15), on one real 3-cell Tune sweep (digits, 1 epoch): MLflow (a real file store read
back with ``mlflow.search_runs``) and W&B (offline run folders, their records read back) hold one run per cell
with params, metrics, curves and the mask file, and a rerun adds none; a tracker that is down fails nothing;
``smn run --json``, ``smn ls``, ``smn table --format json|parquet``; DuckDB and polars read the ledger;
``smn report`` renders in headless Chromium (screenshot, tables and figures present and decoded)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.results import ledger
from orchestrator.reports import tracking
from orchestrator.cli.app import main

from .conftest import last_json

@pytest.fixture(scope="module")
def sweep(landed):
    """The session's landed 3-cell grid sweep (SMN, 2 epochs) with MLflow and W&B tracking, run through
    ``smn run --json`` twice (tests/conftest.py ``landed``)."""
    return landed["grid"]


def _mlflow_runs(root: Path):
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((root / "mlruns").as_uri())
    return mlflow.search_runs(experiment_names=["sweep3"])


def _wandb_records(path: str) -> list:
    """The records of a W&B offline ``.wandb`` file (a LevelDB-style log of protobuf ``Record`` messages)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    i, buf, out = 7, b"", []
    while i + 7 <= len(data):
        left = 32768 - (i % 32768)
        if left < 7:
            i += left
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + 7])
        payload, i = data[i + 7:i + 7 + length], i + 7 + length
        if kind == 0 and length == 0:
            continue
        buf += payload
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_fills_mlflow_and_wandb_once_per_cell(sweep):
    first, second = sweep["first"], sweep["second"]
    assert first["ran"] == 3 and first["failed"] == {} and len(first["table"]) == 3
    assert first["tracking"] == {"mlflow": 3, "wandb": 3}
    assert second["ran"] == 0 and second["skipped"] == 3 and second["tracking"] == {"mlflow": 0, "wandb": 0}
    cells = set(ledger.read_ledger(sweep["results"], "sweep3")["cell_id"])

    runs = _mlflow_runs(sweep["root"])
    assert len(runs) == 4 and (runs["tags.smn.role"] == "experiment").sum() == 1  # the experiment's parent run
    runs = runs[runs["tags.smn.cell_id"].notna()]
    assert len(runs) == 3 and set(runs["tags.smn.cell_id"]) == cells
    assert sorted(runs["params.train.swav.num_prototypes"].astype(int)) == [10, 20, 30]
    assert runs["metrics.knn_top1"].between(0, 1).all() and runs["metrics.density"].between(0, 1).all()
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for run_id, cid in zip(runs["run_id"], runs["tags.smn.cell_id"]):
        steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]  # one name: the history, 2 epochs
        assert len(steps) == 2 and 0 < steps[0] < steps[1] == client.get_run(run_id).data.metrics["steps"]
        names = {a.path for a in client.list_artifacts(run_id)}
        assert f"{cid}.safetensors" in names and f"curves-{cid}.png" in names

    dirs = sorted(glob.glob(str(sweep["root"] / "wb" / "wandb" / "offline-run-*")))
    assert len(dirs) == 3
    seen = set()
    for d in dirs:
        recs = _wandb_records(glob.glob(f"{d}/*.wandb")[0])
        kinds = [r.WhichOneof("record_type") for r in recs]
        (run,) = [r.run for r in recs if r.HasField("run")]
        seen.add(run.run_id)
        assert any(u.key == "train.swav.num_prototypes" for u in run.config.update)
        assert kinds.count("history") == 2  # one per epoch: loss, density, code entropy
        summary_keys = {u.key for r in recs if r.HasField("summary") for u in r.summary.update}
        assert {"knn_top1", "density", "linear_probe_top1"} <= summary_keys
        (art,) = [r.artifact for r in recs if r.HasField("artifact")]
        assert any(m.path.endswith(".safetensors") for m in art.manifest.contents)
    assert seen == {tracking.wandb_run_id("sweep3", c) for c in cells}


@pytest.mark.ray
@pytest.mark.slow
def test_a_tracker_that_is_down_fails_nothing_and_warns_once(sweep, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        added = tracking.sync(sweep["results"], "sweep3", {"mlflow": {"uri": "http://127.0.0.1:9"}},
                              echo=lambda line: None)
    assert added == {"mlflow": 0}
    mine = [w for w in caught if "tracker mlflow is unavailable" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    # a run with a tracker that is down still exits 0 (every cell is in the ledger already)
    assert main(["run", str(sweep["spec"]), "--results", sweep["results"], "methods=[smn]", "--quiet",
                 "tracking={mlflow: {uri: 'http://127.0.0.1:9'}}"]) == 0
    out = capsys.readouterr()
    assert "knn_top1" in out.out and "cells ran" not in out.out  # --quiet: the final table only
    assert out.err.count("tracker mlflow is unavailable") == 1


@pytest.mark.ray
@pytest.mark.slow
def test_ls_table_formats_duckdb_and_polars(sweep, capsys, tmp_path):
    import duckdb
    import polars as pl

    results = sweep["results"]
    assert main(["ls", results, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["experiment"] == "sweep3" and row["done"] == 3 and row["failed"] == 0 and row["last_update"]

    assert main(["table", results, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(0 <= r["knn_top1_mean"] <= 1 for r in rows)
    out = tmp_path / "t.parquet"
    assert main(["table", results, "--format", "parquet", "--out", str(out)]) == 0
    table = pl.read_parquet(out)
    assert table.height == 3 and "knn_top1_mean" in table.columns
    assert main(["table", results, "--format", "parquet"]) == 2  # parquet needs --out

    pattern = f"{results}/*/ledger/*.parquet"
    con = duckdb.connect()
    top = con.execute(f"SELECT cell_id, value FROM '{pattern}' WHERE metric = 'knn_top1' ORDER BY value DESC").fetchall()
    df = ledger.read_ledger(results)
    expected = df[df["metric"] == "knn_top1"].sort_values("value", ascending=False)
    assert [c for c, _ in top] == list(expected["cell_id"])
    lazy = pl.scan_parquet(pattern).filter(pl.col("metric") == "density").group_by("experiment").agg(
        pl.col("value").mean().alias("density"), pl.col("cell_id").n_unique().alias("cells")).collect()
    assert lazy["cells"].to_list() == [3]
    assert lazy["density"][0] == pytest.approx(df[df["metric"] == "density"]["value"].mean())


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.ray
@pytest.mark.slow
def test_report_renders_in_headless_chromium(sweep, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("needs Chromium (apt-get install chromium; scripts/setup.sh installs it when run as root)")
    out = tmp_path / "report"
    assert main(["report", sweep["results"], "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    page = out / "report.html"
    html_text = page.read_text()
    assert "## sweep3" in md and "knn_top1" in md and "figures/sweep3-curves.png" in md
    assert "src=\"data:image/png;base64," in html_text and "http" not in html_text.split("<body>")[0]
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'chrome'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    from html.parser import HTMLParser

    class Walk(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.imgs, self.body, self.cells = 0, [], {}, 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.tables += tag == "table"
            self.cells += tag == "td"
            if tag == "img":
                self.imgs.append(a.get("data-rendered"))
            if tag == "body":
                self.body = a

    w = Walk()
    w.feed(dom)
    assert w.tables >= 3 and w.cells > 20  # summary, results table, environment
    assert w.imgs and all(r and r != "no" and int(r.split("x")[0]) > 100 for r in w.imgs), w.imgs
    assert w.body.get("data-figures-rendered") == f"{len(w.imgs)}/{len(w.imgs)}"
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 2400)
    assert len(set(img.resize((64, 120)).tobytes())) > 20  # text, table rules and plots, not a blank page
    keep = os.environ.get("SMN_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "test_report.png")


@pytest.mark.unit
def test_dry_run_prints_a_cost_estimate_from_the_benchmark_or_a_default(tmp_path, capsys, monkeypatch):
    from smn_core import __version__  # noqa: F401 - the package the estimate reads specs with

    spec = str(Path(__file__).resolve().parents[1] / "experiments" / "table1_baselines_small.yaml")
    monkeypatch.setenv("SMN_BENCHMARKS", str(tmp_path / "none.parquet"))
    assert main(["run", spec, "--dry-run", "--results", str(tmp_path / "r")]) == 0
    default = capsys.readouterr().out
    assert "cost estimate (6 cells" in default and "CPU-hours" in default and "[default]" in default
    # a train_step benchmark row for the backbone on the CPU (the harness's own row format) replaces the default
    bench = tmp_path / "benchmarks.parquet"
    pd.DataFrame([{"area": "train_step", "name": "cifar_resnet20 32x32 px, batch 64: time per step, masked (threshold)",
                   "value": 2.0, "unit": "s", "device": "cpu (2 threads)", "status": "ok"}]).to_parquet(bench)
    monkeypatch.setenv("SMN_BENCHMARKS", str(bench))
    assert main(["run", spec, "--dry-run", "--results", str(tmp_path / "r"), "resources.gpus_per_worker=0"]) == 0
    measured = capsys.readouterr().out
    assert "[benchmark (cpu)]" in measured
    smn = next(line for line in measured.splitlines() if " smn seed=0" in line and "steps x" in line)
    steps = int(smn.split()[3])
    # SwAV: 2 global 32 px views per image, against the benchmark's one 32 px image
    assert float(smn.split()[6]) > 2.0 and steps == 10 * 20  # 10 epochs x ceil(1257 / 64) steps
    assert main(["run", spec, "--dry-run", "--results", str(tmp_path / "r"), "resources.gpus_per_worker=1"]) == 0
    assert "GPU-hours" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_track_flag_logs_the_ledger_into_a_store_beside_it(sweep, capsys):
    """``smn run --track mlflow`` on a finished sweep: no cell runs, the 3 cells land in RESULTS/mlruns once."""
    import mlflow

    args = ["run", str(sweep["spec"]), "--results", sweep["results"], "methods=[smn]", "tracking=null",
            "--track", "mlflow", "--json"]
    for expected in (3, 0):
        assert main(args) == 0
        summary = last_json(capsys.readouterr().out)
        assert summary["ran"] == 0 and summary["tracking"] == {"mlflow": expected}
    mlflow.set_tracking_uri((Path(sweep["results"]) / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["sweep3"])
    runs = runs[runs["tags.smn.cell_id"].notna()]  # the cells, nested under the experiment's parent run
    assert len(runs) == 3 and runs["params.train.swav.num_prototypes"].notna().all()


@pytest.mark.unit
def test_one_pandas_renderer_for_every_format(tmp_path, capsys):
    """The generic table and a paper layout through the one renderer: display strings kept exactly in Markdown
    and LaTeX, numbers in CSV / JSON / Parquet."""
    import time

    now = time.time()
    for seed, knn in ((0, 0.9), (1, 0.9)):
        ledger.write_cell(str(tmp_path), "exp", cell_id=f"c{seed}", method="smn", backbone="cifar_resnet8",
                          dataset="digits", seed=seed, grid={}, config={}, started_at=now, finished_at=now,
                          metrics={"knn_top1": knn, "density": 0.5 + seed / 10})
    assert main(["table", str(tmp_path)]) == 0
    md = capsys.readouterr().out
    assert "0.900 ± 0.000" in md and "0.550 ± 0.071" in md and "|:---" in md
    assert main(["table", str(tmp_path), "--format", "latex", "--layout", "table10"]) == 0
    tex = capsys.readouterr().out
    assert r"\toprule" in tex and r"\bottomrule" in tex and "STD (ddof=1)" in tex
    assert main(["table", str(tmp_path), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["knn_top1_mean"] == pytest.approx(0.9) and row["density_n"] == 2 and row["grid"] == ""
    assert main(["table", str(tmp_path), "--format", "csv", "--metrics", "density"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0].endswith("density_mean,density_std,density_n,density_ci_lo,density_ci_hi") and len(csv) == 2
