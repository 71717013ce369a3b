"""The cell engine: the one place where a cell runs on Ray.

A *cell* is one fully resolved :class:`smn_core.pipeline.CellConfig` with its id (the hash of that
config). The callers (:mod:`orchestrator.engine.plain` for plain runs, :mod:`orchestrator.engine.sweep` for Ray Tune
grids and Optuna searches, :mod:`orchestrator.engine.cascade` for the cascade's experts) all hand the engine a
:class:`CellJob` and get the cell's metrics back. Read this module top to bottom:

1. :class:`CellJob`: what a cell needs, typed (config, id, label, grid values, experiment layout,
   pretrained-backbone artifact). Its config is the validated ``CellConfig`` object itself: it is
   validated once, when the spec's cells are expanded, and travels to the workers pickled, not as JSON.
2. **Epoch checkpoints.** :func:`local_checkpointing` (a plain worker: ``checkpoints/<cell_id>/`` on the
   results storage) and :func:`ddp_checkpointing` (a Ray Train worker: reported to Ray Train) give a
   ``(resume, on_epoch_end)`` pair for :func:`smn_core.pipeline.run_cell`. A cell killed mid-way loses at
   most the epoch it was in.
3. **Running a cell.** :func:`run_local` runs it in this process (a warm pool worker, a Tune trial, a
   test); :func:`run_ddp` runs it as DDP in a Ray Train ``TorchTrainer`` (used only when
   ``resources.workers > 1``); :func:`run_job` picks between them. Both end in :func:`finish_cell`:
   masks, final state, then the ledger file (the cell "lands"), then its epoch checkpoints are removed.
4. **Warm workers.** A :class:`CellWorker` is a long-lived Ray actor that imports torch, torchvision and
   ``smn_core`` once (:meth:`CellWorker.warm`) and then runs many jobs (:meth:`CellWorker.call`).
   :class:`WarmPool` holds a few of them, created with ``max_restarts=-1, max_task_retries=-1``: when a
   worker's process or node dies, Ray restarts the actor (elsewhere if needed) and replays the call it
   was running, which resumes from the cell's last epoch checkpoint. Nothing lands twice: a ledger file is
   named after its cell and written atomically, so a replay rewrites the same file.
5. **Bounded submission.** :func:`run_bounded` keeps at most ``limit`` jobs in flight (one per pool
   worker), yields each result (or error) as it comes, and resubmits application errors up to
   ``retries`` times.

Why a pool of actors rather than Ray tasks: a task runs in whichever idle worker process Ray picks, so
the first cell on each process pays the imports (seconds to tens of seconds), and warm-up cannot be
started ahead of time. Pool workers are started (and warmed) while the driver still reads the ledger
and builds pretraining artifacts, and keep their imports for every later cell. Ray Tune sweeps get the
same effect from Tune's own actor reuse (``reuse_actors=True``): a trial actor runs many trials.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from smn_core.checkpoint import delete_checkpoint, has_checkpoint, load_checkpoint, save_checkpoint, save_tensors

from orchestrator.results import ledger
from orchestrator.results.curves import write_curves
from orchestrator.results.layout import ExperimentLayout

__all__ = ["CellJob", "device", "log", "local_checkpointing", "ddp_checkpointing", "finish_cell", "run_local",
           "fit_ddp", "run_ddp", "run_job"]

@dataclass(frozen=True)
class CellJob:
    """Everything a worker needs to run one cell and land it in the ledger.

    Attributes:
        config: the validated ``smn_core.pipeline.CellConfig``.
        cell_id: the cell's id (hash of its resolved config; the ledger file's name).
        label: a short human label for log lines (``smn seed=0 ...``).
        grid: the grid values that made this cell (``{dotted key: value}``), stored in the ledger.
        layout: where the experiment's files live.
        pipeline_weights: location of the pretrained-backbone artifact for ``weights: pipeline`` cells.
        method: the ledger's ``method`` column (default: ``config.method``).
    """

    config: Any
    cell_id: str
    label: str
    grid: dict = field(default_factory=dict)
    layout: ExperimentLayout | None = None
    pipeline_weights: str | None = None
    method: str | None = None

    @property
    def prefix(self) -> str:
        """The log prefix of this cell's lines: ``<cell_id> <label>``."""
        return f"{self.cell_id} {self.label}"


def device() -> str:
    """``"cuda"`` when Ray gave this worker a GPU and torch sees one, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"


def log(prefix: str) -> Callable[[str], None]:
    """A progress function that prints ``[prefix] line`` (flushed: Ray forwards worker output live)."""
    def emit(line: str) -> None:
        print(f"[{prefix}] {line}", flush=True)
    return emit


def local_checkpointing(folder: str, label: str, extra_meta: dict | None = None) -> tuple[tuple[dict, dict] | None,
                                                                                            Callable]:
    """``(resume, on_epoch_end)`` for :func:`smn_core.pipeline.run_cell` in a plain (non-DDP) worker.

    ``resume`` is the ``(tensors, meta)`` of the checkpoint in ``folder`` (None when there is none);
    ``on_epoch_end`` overwrites that checkpoint after every epoch (with ``extra_meta`` merged into its meta,
    e.g. the node id), so a restarted worker loses at most the epoch it was in.
    """
    resume = load_checkpoint(folder) if has_checkpoint(folder) else None
    if resume is not None:
        print(f"[{label}] resuming after epoch {resume[1]['epoch'] + 1}", flush=True)

    def on_epoch_end(epoch: int, metrics: dict, state_fn) -> None:
        tensors, meta = state_fn()
        if extra_meta:
            meta.update(extra_meta)
        save_checkpoint(folder, tensors, meta)

    return resume, on_epoch_end


def ddp_checkpointing(label: str) -> tuple[tuple[dict, dict] | None, Callable]:
    """Inside a Ray Train worker: ``(resume, on_epoch_end)`` for :func:`smn_core.pipeline.run_cell`.

    ``resume`` is the ``(tensors, meta)`` of the last checkpoint Ray Train registered for this run (None
    on a first start); ``on_epoch_end`` reports each epoch's metrics from every rank and, on rank 0, the
    epoch checkpoint, so a restarted worker group resumes after the last reported epoch.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_checkpoint(d)
        if rank == 0:
            print(f"[{label}] resuming after epoch {resume[1]['epoch'] + 1}", flush=True)

    def on_epoch_end(epoch: int, metrics: dict, state_fn) -> None:
        if rank == 0:
            tensors, meta = state_fn()
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, tensors, meta)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    return resume, on_epoch_end


def finish_cell(job: CellJob, outcome, started: float) -> dict[str, float]:
    """Land a trained cell: its masks, final state and per-epoch curves, then its ledger file, then drop its
    epoch checkpoints.

    Args:
        outcome: the :class:`smn_core.pipeline.CellOutcome` of ``run_cell``.
        started: UNIX time (s) the cell's work began; ``wall_s`` is measured from it.

    Returns:
        The metrics written (``outcome.metrics`` plus ``wall_s``).
    """
    lay, cfg = job.layout, job.config
    if outcome.masks is not None:
        save_tensors(lay.mask(job.cell_id), outcome.masks, metadata={"cell_id": job.cell_id, "arch": cfg.backbone.arch})
    if outcome.state is not None:
        save_checkpoint(lay.state(job.cell_id), outcome.state, {"cell_id": job.cell_id, "config": cfg.to_dict()})
    metrics = dict(outcome.metrics)
    metrics["wall_s"] = time.time() - started
    write_curves(lay, job.cell_id, outcome.history)  # per-epoch loss / density / entropy
    ledger.write_cell(lay.results, lay.experiment, cell_id=job.cell_id, method=job.method or cfg.method,
                      backbone=cfg.backbone.arch, dataset=cfg.dataset.source, seed=cfg.seed, grid=job.grid,
                      config=cfg.to_dict(), metrics=metrics, started_at=started, finished_at=time.time())
    delete_checkpoint(lay.checkpoint(job.cell_id))  # the cell has landed: its epoch checkpoints are spent
    return metrics


def run_local(job: CellJob) -> dict[str, float]:
    """Run one cell in this process (a warm pool worker, a Tune trial), resuming from and writing epoch
    checkpoints to ``checkpoints/<cell_id>/``; land it (:func:`finish_cell`).

    Returns:
        The cell's metrics (``knn_top1``, ``linear_probe_top1``, ``density``, ``wall_s``, ...).

    Raises:
        Whatever the training raises (a bad config, a data error); the epoch checkpoint stays for a retry.
    """
    from smn_core.pipeline import run_cell

    started = time.time()
    resume, on_epoch_end = local_checkpointing(job.layout.checkpoint(job.cell_id), job.prefix)
    outcome = run_cell(job.config, pipeline_weights=job.pipeline_weights, device=device(), resume=resume,
                       on_epoch_end=on_epoch_end, progress=log(job.prefix))
    return finish_cell(job, outcome, started)


def _ddp_cell_loop(config: dict) -> None:
    """Ray Train worker of a DDP cell: the same cell loop under DDP; rank 0 evaluates and lands the cell."""
    import ray.train
    import ray.train.torch

    from smn_core.pipeline import run_cell

    job: CellJob = config["job"]
    rank = ray.train.get_context().get_world_rank()
    resume, on_epoch_end = ddp_checkpointing(job.prefix)
    outcome = run_cell(job.config, pipeline_weights=job.pipeline_weights, device=ray.train.torch.get_device(),
                       resume=resume, on_epoch_end=on_epoch_end, evaluate=rank == 0, progress=log(job.prefix))
    if rank == 0:
        finish_cell(job, outcome, config["started"])


def fit_ddp(loop: Callable[[dict], None], loop_config: dict, resources, layout: ExperimentLayout, name: str) -> None:
    """Fit a Ray Train ``TorchTrainer`` running ``loop`` on ``resources.workers`` DDP workers (gloo on CPU,
    NCCL on GPU), storing its checkpoints under ``layout.ray_train/<name>``.

    The run is named after the cell, so a restarted driver (a retried task, a restarted actor) resumes the
    same Ray Train run from its last reported checkpoint; ``FailureConfig(max_failures=resources.max_retries)``
    restarts the worker group after a worker dies.

    Args:
        resources: an :class:`orchestrator.spec.experiment.Resources` (``workers``, ``cpus_per_worker``,
            ``gpus_per_worker``, ``max_retries``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=layout.ray_train,  # Ray Train takes s3:// URIs as they are
                             failure_config=FailureConfig(max_failures=resources.max_retries),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    ).fit()


def run_ddp(job: CellJob, resources) -> dict[str, float]:
    """Run one cell as DDP across ``resources.workers`` Ray Train workers; rank 0 lands it.

    Returns:
        The cell's metrics, read back from its ledger file.

    Raises:
        RuntimeError: if the trainer finished but the cell's ledger file is missing.
        ray.train.TrainingFailedError: if the workers failed more than ``resources.max_retries`` times.
    """
    fit_ddp(_ddp_cell_loop, {"job": job, "started": time.time()}, resources, job.layout, f"cell-{job.cell_id}")
    metrics = ledger.read_cell(job.layout, job.cell_id)
    if metrics is None:
        raise RuntimeError(f"DDP cell {job.prefix} finished without its ledger file {job.layout.ledger_file(job.cell_id)}")
    return metrics


def run_job(job: CellJob, resources) -> dict[str, float]:
    """:func:`run_ddp` when ``resources.workers > 1`` (a ``TorchTrainer``), else :func:`run_local`."""
    if resources.workers > 1:
        return run_ddp(job, resources)
    return run_local(job)
