"""Cascade: the expert stage's wall time with the experts in parallel against the same experts one after
another, both through ``orchestrator.engine.cascade.run_cascade``.

The spec is a tiny real cascade (a self-masked random-init CIFAR ResNet-8 on digits 5-9 at 16 px as the
dispatcher, PCA + GMM router, K = 5 experts). The dispatcher is trained once (``run_experiment``) and
its results folder copied, so each cascade run trains the same experts from the same dispatcher state
and routes: one run with ``cascade.experts.max_concurrent: 1`` (one after another), one (two in full
mode, the median) with every expert at once, alternating (parallel, sequential, parallel). The figure is
``CascadeSummary["expert_stage_s"]``, the driver's wall time from the first expert actor's creation to
the last expert's result, and ``expert_sum_s``, the sum of the experts' own wall times (each actor's
``run``, from the ledger rows).

Ideal: the parallel stage takes ``1 / min(K, slots)`` of the sequential one, ``slots`` = CPU cores (each
expert runs one torch thread) or GPUs. Each expert is a fresh actor process (cold start: Python,
torch, smn imports), which the sequential run pays K times in a row and the parallel run at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from .common import Row, Settings, compared, median, note_row

AREA = "cascade"
EXPERTS = 5


def spec_text(name: str, s: Settings) -> str:
    """The cascade spec (YAML): tiny, real data, five experts."""
    expert_res = {"workers": 1, "cpus_per_worker": 1.0 if s.cuda else 0.4,
                  "gpus_per_worker": 1.0 / EXPERTS if s.cuda else 0.0}
    spec = {
        "name": name,
        "methods": ["smn"],
        "seeds": [0],
        "backbone": {"arch": "cifar_resnet8", "weights": "random"},
        "dataset": {"source": "digits", "classes": [5, 6, 7, 8, 9], "image_size": 16,
                    "max_train_samples": 160, "max_test_samples": 60},
        "train": {"epochs": 1 if s.quick else 2, "batch_size": 8, "score_lr": 200.0, "bn_mode": "frozen",
                  "swav": {"num_prototypes": 8, "queue_length": 0, "freeze_prototypes_steps": 0},
                  "multicrop": {"n_global": 2, "n_local": 1, "local_size": 8}},
        "eval": {"knn_k": 20, "batch_size": 160, "probe_max_iter": 200},
        "resources": {"workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 1.0 if s.cuda else 0.0},
        "cascade": {"router": {"components": 8, "clusters": EXPERTS, "seed": 0, "covariance_type": "diag"},
                    "experts": {"epochs": 1 if s.quick else None, "resources": expert_res}},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def run(s: Settings) -> list[Row]:
    """Sequential vs parallel expert stage rows (or a skipped row when the cascade API is absent)."""
    try:
        from orchestrator.spec.cascade import cascade_spec
        from orchestrator.engine.cascade import run_cascade
    except ImportError as exc:
        return [note_row(AREA, "expert stage, parallel vs one after another", "skipped",
                         f"orchestrator.engine.cascade not available ({exc})", s)]
    from orchestrator.engine.plain import run_experiment
    from orchestrator.spec.experiment import load_spec

    folder = Path(tempfile.mkdtemp(prefix="cascade-", dir=s.work))
    (folder / "cascade.yaml").write_text(spec_text("bench_cascade", s))
    spec = load_spec(folder / "cascade.yaml")
    cs = cascade_spec(spec)
    lines: list[str] = []
    first = folder / "dispatcher"
    run = run_experiment(spec, str(first), echo=lines.append)
    if run["failed"]:
        raise RuntimeError(f"the dispatcher failed: {run['failed']}")
    sequential_cs = cs.model_copy(update={"experts": cs.experts.model_copy(update={"max_concurrent": 1})})
    order = ["parallel", "sequential"] + ([] if s.quick else ["parallel"])
    stage: dict[str, list[float]] = {"parallel": [], "sequential": []}
    own: dict[str, list[float]] = {"parallel": [], "sequential": []}
    for i, mode in enumerate(order):
        results = folder / f"run{i}-{mode}"
        shutil.copytree(first, results)
        t0 = time.perf_counter()
        summary = run_cascade(spec, str(results), echo=lines.append,
                              cascade=sequential_cs if mode == "sequential" else cs)
        total = time.perf_counter() - t0
        if summary["failed"] or summary["experts"]["ran"] != EXPERTS:
            raise RuntimeError(f"cascade run {mode} did not train {EXPERTS} experts: {summary}")
        stage[mode].append(summary["expert_stage_s"])
        own[mode].append(summary["expert_sum_s"])
        lines.append(f"{mode}: stage {summary['expert_stage_s']:.1f} s, whole call {total:.1f} s")
    par, seq = median(stage["parallel"]), median(stage["sequential"])
    slots = (torch.cuda.device_count() if s.cuda else os.cpu_count()) or 1
    ideal = 1.0 / min(EXPERTS, slots)
    note = (f"{EXPERTS} experts, 160 train images split by a PCA + GMM router, digits 5-9 at 16 px, CIFAR ResNet-8; "
            f"runs in order {', '.join(order)}")
    return [
        compared(AREA, f"expert stage wall, {EXPERTS} experts in parallel", par, "s",
                 "the same experts one after another (max_concurrent 1, same run)", seq, ideal=ideal, settings=s,
                 repeats=len(stage["parallel"]),
                 notes=f"{note}; ideal 1/min(K={EXPERTS}, {slots} {'GPUs' if s.cuda else 'cores'})"),
        compared(AREA, "expert stage wall (parallel) vs the experts' own wall times summed", par, "s",
                 "sum of the experts' own wall_s (their ledger rows), parallel run", median(own["parallel"]),
                 ideal=1.0 / EXPERTS, settings=s, repeats=len(stage["parallel"]),
                 notes="ideal 1/K: perfect overlap; own times stretch when K experts share the cores"),
        compared(AREA, "expert stage wall (sequential) vs the experts' own wall times summed", seq, "s",
                 "sum of the experts' own wall_s (their ledger rows), sequential run", median(own["sequential"]), ideal=1.0,
                 settings=s, notes="what the stage adds around the experts' own work: actor creation, process start"),
    ]
