"""The cell engine's figures (issue 16), side by side in one run:

* ``import smn_core.pipeline`` in a fresh interpreter (median of 3), against ``import torch`` alone (the floor:
  the pipeline cannot import faster than torch);
* ``smn --help`` in a fresh interpreter (median of 3);
* fixed cost per cell on a warm worker: the same small real cell (``bench_ray.cell_config``) run three times
  on one :class:`orchestrator.engine.cell.WarmPool` worker; fixed cost = wall time seen by the driver minus the
  cell's epochs, for the 2nd and 3rd run (the worker is warm), against the same split of an in-process run;
* sweep efficiency: a grid of 8 one-CPU cells (2 epochs each) at concurrency 2 through ``run_experiment``
  (Ray Tune, trial actors reused); from the ledger, sum(cell ``wall_s``) / 2 over the span from the first
  cell's ``started_at`` to the last cell's ``finished_at`` (1.0: the two slots never idle);
* the cascade's expert stage, five 1-CPU experts: parallel (as many warm workers as the cores hold) against
  serial (``max_concurrent: 1``), both from the same dispatcher state, through ``run_cascade``; the figure
  is serial / parallel ``expert_stage_s``, set against its ceiling: five equal experts on ``min(5, cores)``
  slots run in rounds (2, 2, 1 on 2 cores: 5 / 3 = 1.67x); the workers' warm-up (``expert_warmup_s``) is
  reported beside it. Five 0.4-CPU experts time-sliced on 2 cores measured no better (table3 small: 49 s
  against 48 s at two at once, 72 s serial).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .common import Row, Settings, compared, median, note_row

AREA = "engine"
REPO = Path(__file__).resolve().parents[1]


def _fresh(code: list[str], repeats: int = 3) -> float:
    """Median wall seconds of a fresh interpreter running ``code`` (argv after the interpreter)."""
    times = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *code], cwd=REPO, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _imports(s: Settings) -> list[Row]:
    torch_s = _fresh(["-c", "import torch"])
    pipe_s = _fresh(["-c", "import smn_core.pipeline"])
    help_s = _fresh(["-m", "orchestrator", "--help"])
    bare_s = _fresh(["-c", "pass"])
    return [
        compared(AREA, "import smn_core.pipeline (fresh interpreter)", pipe_s, "s", "import torch alone", torch_s,
                 ideal=1.0, settings=s, repeats=3, notes="target <= 3 s; torch itself is the floor"),
        compared(AREA, "smn --help (fresh interpreter)", help_s, "s", "python -c pass", bare_s, settings=s, repeats=3,
                 notes="target <= 1.5 s"),
    ]


def _warm_cell(s: Settings) -> list[Row]:
    import ray

    from orchestrator.engine.pool import WarmPool
    from orchestrator.engine.plain import ensure_ray

    from .bench_ray import _split, cell_config, run_timed_cell

    cell = cell_config(s.quick)
    ensure_ray()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        timed = run_timed_cell(cell, "cpu")
        base = _split(time.perf_counter() - t0, timed)
    finally:
        torch.set_num_threads(threads)
    pool = WarmPool(1, num_cpus=1)
    try:
        t0 = time.perf_counter()
        pool.wait_warm()
        warm_up = time.perf_counter() - t0
        fixed = []
        for _ in range(3):
            t0 = time.perf_counter()
            timed = ray.get(pool.submit(0, run_timed_cell, cell, "cpu"))
            fixed.append(_split(time.perf_counter() - t0, timed)[0])
    finally:
        pool.shutdown()
    return [compared(AREA, "fixed cost per cell on a warm worker (wall seen by the driver - epochs)", median(fixed[1:]),
                     "s", "the same cell in-process (wall - epochs)", base[0], ideal=1.0, settings=s, repeats=2,
                     notes=f"target <= 1 s; runs: {', '.join(f'{f:.2f}' for f in fixed)} s (first on a just-warmed "
                           f"worker); worker start + imports {warm_up:.1f} s, paid once per worker")]


def _sweep(s: Settings) -> list[Row]:
    from orchestrator.results import ledger
    from orchestrator.engine.plain import run_experiment
    from orchestrator.spec.experiment import load_spec

    from .bench_sweep import spec_text

    n, c = (4, 2) if s.quick else (8, 2)
    spec = yaml.safe_load(spec_text("bench_engine_sweep", n, c, 1.0, 0.0, s.quick))
    spec["train"]["epochs"] = 2
    folder = Path(tempfile.mkdtemp(prefix="engine-sweep-", dir=s.work))
    (folder / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    results = str(folder / "results")
    t0 = time.perf_counter()
    summary = run_experiment(load_spec(folder / "sweep.yaml"), results, echo=lambda line: None)
    wall = time.perf_counter() - t0
    if summary["failed"] or summary["ran"] != n:
        raise RuntimeError(f"sweep did not land {n} cells: {summary}")
    cells = ledger.wide(ledger.read_ledger(results, "bench_engine_sweep"))
    span = (cells["finished_at"].max() - cells["started_at"].min()).total_seconds()
    busy = float(cells["wall_s"].sum()) / c
    return [compared(AREA, f"sweep of {n} one-CPU cells at concurrency {c}: sum(wall_s) / {c} / span", busy / span, "x",
                     "1.0 (slots never idle)", 1.0, ideal=1.0, better="higher", settings=s,
                     notes=f"target >= 0.9; span {span:.1f} s from the ledger, cells' wall_s "
                           f"{', '.join(f'{w:.1f}' for w in cells['wall_s'])} s; whole call {wall:.1f} s "
                           "(Ray start, Tune start-up, first imports included)")]


def _cascade(s: Settings) -> list[Row]:
    from orchestrator.spec.cascade import cascade_spec
    from orchestrator.engine.cascade import run_cascade
    from orchestrator.engine.plain import run_experiment
    from orchestrator.spec.experiment import load_spec

    from .bench_cascade import EXPERTS, spec_text

    spec_d = yaml.safe_load(spec_text("bench_engine_cascade", s))
    spec_d["cascade"]["experts"]["resources"]["cpus_per_worker"] = 1.0
    folder = Path(tempfile.mkdtemp(prefix="engine-cascade-", dir=s.work))
    (folder / "cascade.yaml").write_text(yaml.safe_dump(spec_d, sort_keys=False))
    spec = load_spec(folder / "cascade.yaml")
    cs = cascade_spec(spec)
    first = folder / "dispatcher"
    if run_experiment(spec, str(first), echo=lambda line: None)["failed"]:
        raise RuntimeError("the dispatcher failed")
    serial_cs = cs.model_copy(update={"experts": cs.experts.model_copy(update={"max_concurrent": 1})})
    stage: dict[str, list[float]] = {"parallel": [], "serial": []}
    warm: dict[str, list[float]] = {"parallel": [], "serial": []}
    order = ["parallel", "serial"] + ([] if s.quick else ["parallel"])
    for i, mode in enumerate(order):
        results = folder / f"run{i}-{mode}"
        shutil.copytree(first, results)
        summary = run_cascade(spec, str(results), echo=lambda line: None, cascade=serial_cs if mode == "serial" else cs)
        if summary["failed"] or summary["experts"]["ran"] != EXPERTS:
            raise RuntimeError(f"cascade run {mode} did not train {EXPERTS} experts: {summary}")
        stage[mode].append(summary["expert_stage_s"])
        warm[mode].append(summary["expert_warmup_s"])
    par, ser = median(stage["parallel"]), median(stage["serial"])
    cores = os.cpu_count() or 1
    slots = min(EXPERTS, cores)
    ceiling = EXPERTS / math.ceil(EXPERTS / slots)  # equal experts in rounds of `slots`: 5 on 2 cores -> 5 / 3
    return [compared(AREA, f"cascade expert stage, {EXPERTS} one-CPU experts: serial / parallel", ser / par, "x",
                     f"ceiling {EXPERTS} / ceil({EXPERTS} / {slots} slots)", ceiling, ideal=1.0, better="higher",
                     settings=s, repeats=len(stage["parallel"]),
                     notes=f"target >= 1.7x; stage parallel {par:.1f} s, serial {ser:.1f} s; workers' start + imports "
                           f"before the stage: parallel {median(warm['parallel']):.1f} s, serial "
                           f"{median(warm['serial']):.1f} s; runs in order {', '.join(order)}")]


def run(s: Settings) -> list[Row]:
    """Every engine figure (see the module docstring); a part that fails becomes an ``error`` row."""
    rows: list[Row] = []
    for name, part in (("imports", _imports), ("warm cell", _warm_cell), ("sweep", _sweep), ("cascade", _cascade)):
        try:
            rows += part(s)
        except Exception as exc:  # noqa: BLE001 - the other parts still run
            rows.append(note_row(AREA, name, "error", f"{type(exc).__name__}: {exc}", s))
    return rows
