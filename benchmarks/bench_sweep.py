"""Sweep efficiency: a grid of N short trials at concurrency C, run by ``orchestrator.engine.plain.run_experiment``
(a spec with ``grid:`` runs as a Ray Tune sweep, ``orchestrator.engine.sweep``) into a fresh results folder.

Floor: the trials' own wall times (each cell's ``wall_s`` in the ledger: from the start of the cell's
work in its trial to its ledger write) summed and divided by C, i.e. a scheduler that never idles and
starts trials for free. The sweep's wall time is measured from the driver around the whole call
(spec already validated; Ray already running, or started inside when this area runs alone: then
``ray.init`` is part of the gap, and the row says so). What lies between the two is Tune's start-up,
one cold worker process per trial (``reuse_actors=False``) and scheduling gaps.

The grid: the number of SwAV prototypes over N values, self-masking a random-init CIFAR ResNet-8 on
digits 5-9 at 16 px for one epoch (real data, real cells with evaluation). On CUDA each trial gets
1 / C of the GPU.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml

from .common import Row, Settings, compared

AREA = "sweep"


def spec_text(name: str, n: int, c: int, cpus: float, gpus: float, quick: bool) -> str:
    """The sweep's spec (YAML)."""
    spec = {
        "name": name,
        "methods": ["smn"],
        "seeds": [0],
        "backbone": {"arch": "cifar_resnet8", "weights": "random"},
        "dataset": {"source": "digits", "classes": [5, 6, 7, 8, 9], "image_size": 16,
                    "max_train_samples": 96 if quick else 192, "max_test_samples": 60},
        "train": {"epochs": 1, "batch_size": 32, "bn_mode": "frozen",
                  "swav": {"queue_length": 0, "freeze_prototypes_steps": 0},
                  "multicrop": {"n_global": 2, "n_local": 2, "local_size": 8}},
        "eval": {"knn_k": 20, "batch_size": 128, "probe_max_iter": 200},
        "grid": {"train.swav.num_prototypes": [10 * (i + 1) for i in range(n)]},
        "resources": {"workers": 1, "cpus_per_worker": cpus, "gpus_per_worker": gpus, "max_concurrent_cells": c,
                      "max_retries": 0},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def run(s: Settings) -> list[Row]:
    """One sweep, timed; rows against the sum of its trials' times / C."""
    import ray

    from orchestrator.results import ledger
    from orchestrator.engine.plain import run_experiment
    from orchestrator.spec.experiment import load_spec

    n, c = (2, 2) if s.quick else (4, 2)
    cpus = max(1.0, (os.cpu_count() or 2) // c) if not s.cuda else 1.0
    gpus = 1.0 / c if s.cuda else 0.0
    folder = Path(tempfile.mkdtemp(prefix="sweep-", dir=s.work))
    (folder / "sweep.yaml").write_text(spec_text("bench_sweep", n, c, cpus, gpus, s.quick))
    spec = load_spec(folder / "sweep.yaml")
    results = str(folder / "results")
    ray_running = ray.is_initialized()
    lines: list[str] = []
    t0 = time.perf_counter()
    summary = run_experiment(spec, results, echo=lines.append)
    wall = time.perf_counter() - t0
    if summary["failed"]:
        raise RuntimeError(f"sweep trials failed: {summary['failed']}")
    df = ledger.read_ledger(results, spec.name)
    walls = df[df["metric"] == "wall_s"]["value"].astype(float)
    if len(walls) != n:
        raise RuntimeError(f"expected {n} finished trials in the ledger, found {len(walls)}")
    floor = float(walls.sum()) / c
    note = (f"{n} trials x (1 epoch, 16 px digits, CIFAR ResNet-8) at concurrency {c}, {cpus:g} CPU"
            + (f" / {gpus:g} GPU" if gpus else "") + " each; trial wall_s from the ledger: "
            + ", ".join(f"{w:.1f}" for w in walls) + " s"
            + ("" if ray_running else "; Ray was started inside this call (ray.init counted)"))
    return [
        compared(AREA, f"sweep wall time, {n} trials at concurrency {c}", wall, "s",
                 f"floor: sum of the trials' own wall_s / {c}", floor, ideal=1.0, settings=s, notes=note),
        compared(AREA, "overhead per trial (sweep wall x C - sum of trial wall_s) / N", (wall * c - walls.sum()) / n,
                 "s", "mean trial wall_s", float(walls.mean()), settings=s,
                 notes="Tune start-up, a cold worker process per trial, scheduling"),
    ]
