"""Ray overhead: the same real cell in-process, as a Ray task, and in a 1- and a 2-worker ``TorchTrainer``.

The cell is small and real (``smn`` self-masking of a random-init CIFAR ResNet-8 on digits 5-9 at 16 px,
then k-NN and linear probe), run through ``smn_core.pipeline.run_cell`` each time, timed from the driver.
Four task calls (three before the trainers, one after) are sorted by the worker process that ran them:
``cold`` (that process's first cell: process start, imports) or ``warm`` (it ran the cell before); Ray
gives a task to any idle worker, so the split is what Ray did, not what was asked. The training loop
reports each epoch's seconds; so every run splits into

* per-epoch cost: the median of the epochs after the first (the first pays warm-up);
* fixed start-up: wall time minus the epochs (worker process start, imports, Ray Train's controller and
  worker group, process-group setup, data loading, evaluation).

Both are set against the in-process run (measured first and last; the median of the two). The
in-process run uses one torch thread, as a Ray worker with ``num_cpus=1`` does (Ray sets
``OMP_NUM_THREADS`` from it). Ideal: a Ray task adds no fixed cost (1.0x) nor per-epoch cost (1.0x); two
DDP workers halve the per-epoch time where two cores (or GPUs) are free. ``ray.init`` is reported against
the in-process cell; it is paid once per driver.

A GPU node runs the cell on CUDA (a task with ``num_gpus=1``; trainers with ``use_gpu``); the 2-worker
trainer needs 2 GPUs there and is skipped with the reason otherwise (NCCL refuses two ranks on one GPU).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from .common import Row, Settings, compared, median, note_row

AREA = "ray"


def cell_config(quick: bool) -> dict:
    """The benchmark cell as plain JSON (``smn_core.pipeline.CellConfig`` fields)."""
    return {
        "method": "smn",
        "backbone": {"arch": "cifar_resnet8", "weights": "random"},
        "dataset": {"source": "digits", "classes": [5, 6, 7, 8, 9], "image_size": 16,
                    "max_train_samples": 128 if quick else 256, "max_test_samples": 64},
        "train": {"epochs": 2 if quick else 3, "batch_size": 32, "bn_mode": "frozen",
                  "swav": {"num_prototypes": 20, "queue_length": 0, "freeze_prototypes_steps": 0},
                  "multicrop": {"n_global": 2, "n_local": 2, "local_size": 8}},
        "eval": {"knn_k": 20, "batch_size": 128},
    }


def run_timed_cell(cell: dict, device: str, evaluate: bool = True) -> dict:
    """Run the cell here; returns ``{"epoch_s": [seconds per epoch], "cell_s": run_cell wall seconds,
    "pid": this process}``."""
    from pydantic import TypeAdapter

    from smn_core.pipeline import run_cell
    from smn_core.config import CellConfig

    cfg = TypeAdapter(CellConfig).validate_python(cell)
    epochs: list[float] = []
    t0 = time.perf_counter()
    run_cell(cfg, device=device, evaluate=evaluate,
             on_epoch_end=lambda epoch, metrics, state_fn: epochs.append(float(metrics["seconds"])))
    return {"epoch_s": epochs, "cell_s": time.perf_counter() - t0, "pid": os.getpid()}


def _train_loop(config: dict) -> None:
    """Ray Train worker: the cell under DDP; rank 0 evaluates and writes its timings to ``config["out"]``."""
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    out = run_timed_cell(config["cell"], str(ray.train.torch.get_device()), evaluate=rank == 0)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(out))


def _split(wall: float, timed: dict) -> tuple[float, float]:
    """(fixed start-up seconds, per-epoch seconds) of one run."""
    epochs = timed["epoch_s"]
    per_epoch = median(epochs[1:]) if len(epochs) > 1 else epochs[0]
    return wall - sum(epochs), per_epoch


def run(s: Settings) -> list[Row]:
    """Ray start-up, task and TorchTrainer rows (see the module docstring)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.engine.plain import ensure_ray

    cell = cell_config(s.quick)
    device = "cuda" if s.cuda else "cpu"
    n_gpus = torch.cuda.device_count() if s.cuda else 0
    runs: dict[str, list[tuple[float, float]]] = {}
    threads = torch.get_num_threads()

    def in_process() -> None:
        torch.set_num_threads(1)
        try:
            t0 = time.perf_counter()
            timed = run_timed_cell(cell, device)
            runs.setdefault("in-process", []).append(_split(time.perf_counter() - t0, timed))
        finally:
            torch.set_num_threads(threads)

    in_process()
    rows: list[Row] = []
    init_s = None
    if not ray.is_initialized():
        t0 = time.perf_counter()
        ensure_ray()
        init_s = time.perf_counter() - t0
    task = ray.remote(num_cpus=1, num_gpus=1 if s.cuda else 0)(run_timed_cell)
    seen: set[int] = set()

    def as_task() -> None:
        # Ray hands a task to any idle worker: "warm" means this process ran the cell before
        t0 = time.perf_counter()
        timed = ray.get(task.remote(cell, device))
        label = "Ray task, warm worker" if timed["pid"] in seen else "Ray task, cold worker"
        seen.add(timed["pid"])
        runs.setdefault(label, []).append(_split(time.perf_counter() - t0, timed))

    for _ in range(3):
        as_task()
    storage = tempfile.mkdtemp(prefix="trainer-", dir=s.work)
    for workers in (1, 2):
        label = f"TorchTrainer, {workers} worker{'s' if workers > 1 else ''}"
        if s.cuda and n_gpus < workers:
            rows.append(note_row(AREA, label, "skipped", f"needs {workers} GPUs, this node has {n_gpus}", s))
            continue
        out = Path(storage) / f"timings-{workers}.json"
        t0 = time.perf_counter()
        TorchTrainer(_train_loop, train_loop_config={"cell": cell, "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=workers, use_gpu=s.cuda,
                                                  resources_per_worker={"CPU": 1, **({"GPU": 1} if s.cuda else {})}),
                     run_config=RunConfig(name=f"bench-{workers}w-{os.getpid()}", storage_path=storage)).fit()
        runs[label] = [_split(time.perf_counter() - t0, json.loads(out.read_text()))]
    as_task()
    in_process()
    if "Ray task, warm worker" not in runs:
        rows.append(note_row(AREA, "Ray task, warm worker", "skipped",
                             f"none of the {len(seen)} worker processes got a second task", s))

    base_fixed = median([f for f, _ in runs["in-process"]])
    base_epoch = median([e for _, e in runs["in-process"]])
    cell_note = (f"digits 5-9 at 16 px, {cell['dataset']['max_train_samples']} train images, batch 32, "
                 f"{cell['train']['epochs']} epochs, CIFAR ResNet-8 random init, k-NN + linear probe")
    in_s = [f + e for f, e in runs["in-process"]]
    rows.insert(0, compared(AREA, "in-process cell: fixed start-up (wall - epochs)", base_fixed, "s",
                            "the same cell's per-epoch time (in-process)", base_epoch, settings=s, repeats=2,
                            notes=f"{cell_note}; median of the first and last run of this area"))
    if init_s is not None:
        rows.insert(1, compared(AREA, "ray.init (local, 127.0.0.1), once per driver", init_s, "s",
                                "in-process cell, fixed start-up", base_fixed, settings=s,
                                notes=f"in-process cell total {median(in_s):.1f} s"))
    for label, samples in runs.items():
        if label == "in-process":
            continue
        fixed, per_epoch = median([f for f, _ in samples]), median([e for _, e in samples])
        workers = 2 if "2 workers" in label else 1
        slots = n_gpus if s.cuda else (os.cpu_count() or 1)
        rows.append(compared(AREA, f"{label}: fixed start-up", fixed, "s", "in-process cell, fixed start-up",
                             base_fixed, ideal=1.0, settings=s, repeats=len(samples), notes=cell_note))
        rows.append(compared(AREA, f"{label}: per-epoch", per_epoch, "s", "in-process cell, per-epoch", base_epoch,
                             ideal=1.0 / min(workers, max(1, slots)), settings=s, repeats=len(samples),
                             notes=f"global batch 32 split over {workers} worker(s)" if workers > 1 else ""))
    return rows
