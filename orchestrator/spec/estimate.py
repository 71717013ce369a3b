"""``smn run --dry-run`` cost estimate: cells, resources each, time per cell, total CPU- or GPU-hours.

time per cell = training steps x seconds per step (evaluation and Ray start-up are not counted), where

* steps = epochs x ceil(train images / batch size) (``train.max_steps_per_epoch`` caps it); train images =
  ``dataset.max_train_samples``, else the source's train split (:data:`TRAIN_IMAGES`, the share of the
  selected classes for ``digits``), else 50,000 (stated);
* seconds per step come from the ``train_step`` benchmark (``benchmarks/run_all.py``) when one was run for
  that backbone on that device: the file ``$SMN_BENCHMARKS`` or ``benchmarks/results/benchmarks.parquet``.
  Its time per masked step (batch ``B``, ``S`` px) is scaled to the cell's batch and pixels per image
  (SwAV multi-crop: every global and local view); else :data:`DEFAULT_S_PER_MPX` seconds per megapixel of
  input, times :data:`ARCH_COST` of the backbone (stated in the output as a default, not a measurement).
* a ``weights: pipeline`` backbone adds its pretraining once.

:func:`estimate_parts` (``smn run --dry-run [--json]``) adds what the per-cell figure leaves out and splits the
run's wall time into its parts: Ray start-up (:data:`RAY_STARTUP_S`, plus :data:`WORKER_START_S` for the
workers' imports), pretraining (0 when the artifact is cached), training (plus :data:`TRAIN_FIXED_S` per
trained cell) and evaluation of the cells still to run (:data:`CELL_SETUP_S`, an embedding pass over the train
and test images, forward only: a third of a training step's cost per pixel, the probe fits,
:data:`EVAL_FIXED_S`), divided over the cells that run at once on this machine (``os.cpu_count()`` over the
CPUs a cell asks for; on GPUs: the GPUs seen, else one). On the CPU every part but Ray's own start is scaled by
:func:`load_factor`: the load other processes put on the cores now. A test runs a tiny spec through the CLI and
checks that the measured wall time is within 2x of the estimate (``tests/test_estimate.py``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from smn_core.config import CONTROLS

__all__ = ["CellEstimate", "estimate_cells", "estimate_text", "estimate_parts", "benchmark_step_times", "TRAIN_IMAGES",
           "DEFAULT_S_PER_MPX", "ARCH_COST", "RAY_STARTUP_S", "WORKER_START_S", "EVAL_FIXED_S", "CELL_SETUP_S",
           "PROBE_FIT_S", "TRAIN_FIXED_S", "PER_VIEW_S", "load_factor"]

RAY_STARTUP_S = {"local": 10.0, "join": 2.0}
"""Seconds to start a local Ray (head, dashboard) or to join a running cluster: defaults, stated as such in the
estimate."""

WORKER_START_S = 10.0
"""Seconds until the warm workers can take a cell: Ray starts their processes, which import torch, torchvision,
scikit-learn and ``smn_core`` (:func:`orchestrator.engine.pool.warm_imports`; 4-8 s each on an idle core,
17-23 s at load 2.3 per core, measured on the 2-core dev machine). Part of "Ray start-up" in the estimate."""

EVAL_FIXED_S = 0.3
"""Seconds of a cell's evaluation beside the embedding pass and the probe fits: the k-NN votes at two k."""

CELL_SETUP_S = 1.0
"""Seconds a cell spends loading its data and building its backbone, before training or evaluation (the tiny
test spec's cells: 0.9-1.1 s of ``wall_s`` outside ``train_seconds`` and ``eval_seconds``). Counted with the
evaluation, which every cell has."""

PROBE_FIT_S = 0.25
"""Seconds of one logistic-regression fit per 1,000 train images (the demo's cells: 46 fits, 5-fold CV over 9
C values, on 630 images in 6-9 s of ``eval_seconds``)."""

TRAIN_FIXED_S = 0.5
"""Seconds of a trained cell's set-up outside its steps: optimiser, head, the SwAV view-strength check."""

PER_VIEW_S = 0.002
"""Seconds per augmented view and step outside the backbone's FLOPs (PIL augmentation, collation, the small
kernels of 32-px inputs; the demo's SwAV steps take about 5x the FLOP model's time without it)."""

TRAIN_IMAGES = {"digits": 1797 * 0.7, "cifar10": 50_000, "cifar100": 50_000, "food101": 75_750, "eurosat": 18_900,
                "sun397": 76_128, "tinyimagenet": 100_000, "imagenet": 1_281_167}
"""Train-split images per dataset source (digits: 1,797 images, 70 % train)."""

DEFAULT_S_PER_MPX = {"cpu": 4.0, "gpu": 0.01}
"""Default seconds per training step per megapixel of input (batch x pixels per image), for a backbone of
cost 1 (ResNet-18: about 110 GFLOPs forward + backward per megapixel), when no ``train_step`` benchmark is
there for the backbone and device: about 30 GFLOP/s on one CPU core, about 10 TFLOP/s effective on a GPU."""

ARCH_COST = {"cifar_resnet8": 0.35, "cifar_resnet20": 1.1, "cifar_resnet56": 3.2, "resnet18": 1.0, "resnet34": 2.0,
             "resnet50": 2.3, "vit_b_32": 2.4, "vit_b_16": 9.6, "clip_vit_b32": 2.4}
"""Relative FLOPs per input pixel of a backbone's forward + backward (ResNet-18 at 224 px = 1; rounded)."""

_NAME = re.compile(r"^(?P<arch>\S+) (?P<px>\d+)x\d+ px, batch (?P<batch>\d+): time per step, masked")


@dataclass
class CellEstimate:
    """One cell's estimate."""

    cell_id: str
    label: str
    resources: str
    steps: int
    seconds_per_step: float
    source: str  # "benchmark (device)" or "default"

    @property
    def seconds(self) -> float:
        """Estimated training time of the cell."""
        return self.steps * self.seconds_per_step


def benchmark_step_times(path: str | None = None) -> list[dict]:
    """``train_step`` benchmark rows ``{arch, px, batch, device, seconds}`` in file order (empty when there is no
    file). Read with pyarrow alone: the dry run stays clear of pandas' import."""
    path = path or os.environ.get("SMN_BENCHMARKS") or str(Path(__file__).resolve().parents[1] / "benchmarks" /
                                                            "results" / "benchmarks.parquet")
    if not os.path.exists(path):
        return []
    import pyarrow.parquet as pq  # only when a benchmark file is there

    cols = pq.read_table(path, columns=["area", "name", "value", "unit", "device", "status"]).to_pydict()
    rows = []
    for area, name, value, unit, device, status in zip(*cols.values()):
        m = _NAME.match(name or "") if (area, status, unit) == ("train_step", "ok", "s") else None
        if m:
            rows.append({"arch": m["arch"], "px": int(m["px"]), "batch": int(m["batch"]),
                         "device": "gpu" if "cuda" in str(device).lower() or "gpu" in str(device).lower() else "cpu",
                         "seconds": float(value)})
    return rows


def _train_images(dataset: dict) -> tuple[int, str]:
    if dataset.get("max_train_samples"):
        return int(dataset["max_train_samples"]), ""
    source = dataset.get("source", "")
    if source in TRAIN_IMAGES:
        n = TRAIN_IMAGES[source]
        if source == "digits" and dataset.get("classes"):
            n = n * len(dataset["classes"]) / 10
        return int(n), ""
    return 50_000, f"train size of {source!r} unknown: 50,000 assumed"


def _pixels_per_image(train: dict, size: int) -> int:
    if train.get("objective") == "swav":
        mc = train.get("multicrop") or {}
        g = mc.get("global_size") or size
        loc = mc.get("local_size") or max(1, size * 96 // 224)
        return int(mc.get("n_global", 2) * g * g + mc.get("n_local", 0) * loc * loc)
    return size * size


def _views(train: dict) -> int:
    """Augmented views per image and step: SwAV's multi-crop, else one."""
    mc = train.get("multicrop") or {}
    return int(mc.get("n_global", 2) + mc.get("n_local", 0)) if train.get("objective") == "swav" else 1


def _step_seconds(arch: str, batch: int, pixels: int, device: str, bench: list[dict],
                  views: int = 1) -> tuple[float, str]:
    rows = [r for r in bench if r["arch"] == arch and r["device"] == device]
    if rows:
        r = rows[-1]
        return r["seconds"] * (batch / r["batch"]) * (pixels / (r["px"] ** 2)), f"benchmark ({device})"
    cost = ARCH_COST.get(arch, 1.0)
    return DEFAULT_S_PER_MPX[device] * cost * batch * pixels / 1e6 + PER_VIEW_S * batch * views, "default"


def _steps(train: dict, dataset: dict) -> tuple[int, str]:
    n, note = _train_images(dataset)
    per_epoch = math.ceil(n / max(1, int(train.get("batch_size", 64))))
    if train.get("max_steps_per_epoch"):
        per_epoch = min(per_epoch, int(train["max_steps_per_epoch"]))
    return int(train.get("epochs", 1)) * per_epoch, note


def estimate_cells(spec, cells, bench: list[dict] | None = None) -> tuple[list[CellEstimate], list[str]]:
    """Per-cell estimates of ``cells`` (from :func:`orchestrator.spec.experiment.expand_cells`) and notes (defaults
    used, pretraining)."""
    bench = benchmark_step_times() if bench is None else bench
    res = spec.resources
    device = "gpu" if res.gpus_per_worker > 0 else "cpu"
    per = f"{res.workers} x ({res.cpus_per_worker:g} CPU" + (f", {res.gpus_per_worker:g} GPU" if device == "gpu" else "") + ")"
    out, notes = [], []
    pretrain_seen = set()
    for c in cells:
        d = c.config.to_dict()
        train = d.get("train") or {}
        arch = d["backbone"]["arch"]
        size = d["dataset"].get("image_size") or 224
        if d["method"] == "pretrained" or d["method"] in CONTROLS or not train:  # a control is drawn, not trained
            steps, note = 0, ""
        else:
            steps, note = _steps(train, d["dataset"])
        if note and note not in notes:
            notes.append(note)
        s, source = _step_seconds(arch, int(train.get("batch_size", 64)), _pixels_per_image(train, size), device, bench,
                                  _views(train))
        s /= max(1, res.workers)  # DDP splits each step's work (ideal scaling: a lower bound)
        pre = d.get("pretrain")
        if d["backbone"].get("weights") == "pipeline" and pre and arch not in pretrain_seen:
            pretrain_seen.add(arch)
            psteps, _ = _steps(pre.get("train") or {}, pre.get("dataset") or {})
            pt = psteps * _step_seconds(arch, int((pre.get("train") or {}).get("batch_size", 64)),
                                        size * size, device, bench)[0]
            out.append(CellEstimate("pretrain", f"pretrain {arch} (once, weights: pipeline)", per, psteps,
                                    pt / max(1, psteps), source))
        out.append(CellEstimate(c.cell_id, c.label, per, steps, s, source))
    if any(e.source == "default" for e in out):
        notes.append(f"no train_step benchmark for this backbone on {device}: default {DEFAULT_S_PER_MPX[device]} s "
                     "per megapixel x backbone cost (run `python -m benchmarks.run_all --only train_step` on the "
                     "target device, or set SMN_BENCHMARKS, for a measured figure)")
    return out, notes


def estimate_text(spec, cells, bench: list[dict] | None = None) -> str:
    """The cost estimate ``smn run --dry-run`` prints: a line per cell, the total in CPU- or GPU-hours."""
    est, notes = estimate_cells(spec, cells, bench)
    res = spec.resources
    device = "GPU" if res.gpus_per_worker > 0 else "CPU"
    units = res.workers * (res.gpus_per_worker if device == "GPU" else res.cpus_per_worker)
    lines = ["", f"cost estimate ({sum(e.cell_id != 'pretrain' for e in est)} cells, each on {est[0].resources if est else '-'}):"]
    for e in est:
        lines.append(f"  {e.cell_id:16s}  {e.label:40s} {e.steps:7d} steps x {e.seconds_per_step:.3g} s "
                     f"= {e.seconds / 60:8.1f} min  [{e.source}]")
    total_s = sum(e.seconds for e in est)
    hours = total_s * units / 3600
    lines.append(f"  total: {total_s / 3600:.2f} h of cell time = {hours:.2f} {device}-hours "
                 f"({units:g} {device}(s) per cell)")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def _eval_seconds(cell_dict: dict, device: str, bench: list[dict]) -> float:
    """One cell's set-up and evaluation: :data:`CELL_SETUP_S`, an embedding pass (forward only, about a third of
    a training step per pixel) over the train and test images, the probe fits (:data:`PROBE_FIT_S`: one, or one
    per C and fold of ``probe_C_grid`` plus the refit, plus one per low-shot fraction) and :data:`EVAL_FIXED_S`."""
    data = cell_dict["dataset"]
    size = data.get("image_size") or 224
    train, _ = _train_images(data)
    test = data.get("max_test_samples") or train * (0.3 / 0.7 if data.get("source") == "digits" else 0.2)
    per_image, _ = _step_seconds(cell_dict["backbone"]["arch"], 1, size * size, device, bench)
    ev = cell_dict.get("eval") or {}
    fits = 1 + len(ev.get("probe_C_grid") or []) * int(ev.get("probe_cv_folds", 5)) + len(
        ev.get("lowshot_fractions") or [])
    return CELL_SETUP_S + (train + test) * per_image / 3 + fits * PROBE_FIT_S * train / 1000 + EVAL_FIXED_S


def load_factor(device: str) -> float:
    """How much slower than on idle cores CPU work runs now: the 1-minute load average per core, at least 1
    (``os.getloadavg``; 1 where there is none, and on GPUs). Other processes that keep the cores busy now will
    most likely share them with the run."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1.0
    return 1.0 if device == "gpu" else max(1.0, load / (os.cpu_count() or 1))


def _slots(spec, device: str) -> int:
    res = spec.resources
    if device == "gpu":
        return max(1, int(os.environ.get("SMN_ESTIMATE_GPUS", "1")) // max(1, int(res.gpus_per_worker * res.workers)))
    return max(1, int((os.cpu_count() or 1) // max(1e-9, res.cpus_per_worker * res.workers)))


def estimate_parts(spec, cells, *, done: set[str] | frozenset = frozenset(), pretrain_cached: bool = False,
                   join: bool = False, bench: list[dict] | None = None) -> dict:
    """The wall-time estimate of ``smn run`` for the cells of ``cells`` not in ``done``, in parts.

    Args:
        cells: every cell of the spec (:func:`orchestrator.spec.experiment.expand_cells`).
        done: ids of the cells the ledger holds (they cost nothing).
        pretrain_cached: the pipeline's pretrained backbone is there already (no pretraining).
        join: the run joins a running cluster (``--address``) instead of starting a local Ray.

    Returns:
        ``{"ray_startup_s", "pretraining_s", "training_s", "evaluation_s", "total_s", "concurrent_cells",
        "source", "notes"}``: training and evaluation are wall seconds with ``concurrent_cells`` cells at once;
        nothing to run gives 0 everywhere.
    """
    bench = benchmark_step_times() if bench is None else bench
    device = "gpu" if spec.resources.gpus_per_worker > 0 else "cpu"
    todo = [c for c in cells if c.cell_id not in done]
    est, notes = estimate_cells(spec, todo, bench)
    slots = _slots(spec, device)
    by_id = {c.cell_id: c for c in todo}
    cells_est = [e for e in est if e.cell_id != "pretrain"]
    train = sum(e.seconds + (TRAIN_FIXED_S if e.steps else 0.0) for e in cells_est)
    evaluation = sum(_eval_seconds(by_id[e.cell_id].config.to_dict(), device, bench) for e in cells_est)
    pre = 0.0 if pretrain_cached else sum(e.seconds + TRAIN_FIXED_S for e in est if e.cell_id == "pretrain")
    load = load_factor(device)
    startup = RAY_STARTUP_S["join" if join else "local"] + WORKER_START_S * load
    parts = {"ray_startup_s": startup if todo else 0.0, "pretraining_s": pre * load if todo else 0.0,
             "training_s": train * load / slots, "evaluation_s": evaluation * load / slots}
    parts = {k: round(v, 1) for k, v in parts.items()}
    parts["total_s"] = round(sum(parts.values()), 1)
    parts.update(concurrent_cells=slots, load_factor=round(load, 2), source=sorted({e.source for e in est}) or ["-"],
                 notes=notes)
    return parts
