"""The cell engine: the one place where a unit of work runs on Ray and lands in the results.

A *cell* is one fully resolved :class:`smn_core.pipeline.CellConfig` with its id (the hash of that
config). The callers (:mod:`orchestrator.engine.plain` for plain runs, :mod:`orchestrator.engine.sweep` for Ray Tune
grids and Optuna searches, :mod:`orchestrator.engine.cascade` for the cascade's router, experts and
combinations) all hand the engine a :class:`CellJob` and get the cell's metrics back. Read this module top
to bottom:

1. :class:`CellJob`: what a unit of work needs, typed (config, id, label, grid values, experiment layout,
   pretrained-backbone artifact, its ledger :class:`Record`, and an optional stage). Its config is the
   validated ``CellConfig`` object itself: it is validated once, when the spec's cells are expanded, and
   travels to the workers pickled, not as JSON. A :class:`Stage` is work done in place of training (the
   cascade's router and combinations); a :class:`TrainingStage` trains the cell from its own start state
   on its own subset and adds a last step (a cascade expert).
2. **Epoch checkpoints.** :func:`local_checkpointing` (a plain worker: ``checkpoints/<cell_id>/`` on the
   results storage) and :func:`ddp_checkpointing` (a Ray Train worker: reported to Ray Train) give a
   ``(resume, on_epoch_end)`` pair for :func:`smn_core.pipeline.run_cell`. A cell killed mid-way loses at
   most the epoch it was in.
3. **Running and landing.** :func:`run_local` runs a job in this process (a warm pool worker, a Tune
   trial, a Ray task, a test); :func:`run_ddp` runs it as DDP in a Ray Train ``TorchTrainer`` (used only
   when ``resources.workers > 1``); :func:`run_job` picks between them. Every result goes through
   :func:`land`, the only writer of ledger rows, curves, failure records (:class:`Failure`) and final
   state: masks, final state, curves, then the ledger file (the cell "lands"), then its epoch
   checkpoints are removed.
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

import re

import abc
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import ray

from smn_core.checkpoint import delete_checkpoint, has_checkpoint, load_checkpoint, save_checkpoint, save_tensors

from orchestrator import echo
from orchestrator.results import ledger
from orchestrator.results import per_image
from orchestrator.results.curves import write_curves
from orchestrator.results.layout import ExperimentLayout

__all__ = ["Record", "Failure", "ray_job_columns", "SUBMISSION_ENV", "TrainInputs", "Stage", "TrainingStage", "CellJob", "device", "log",
           "local_checkpointing", "ddp_checkpointing", "land", "run_local", "fit_ddp", "run_ddp", "run_job"]

@dataclass(frozen=True)
class Record:
    """A cell's ledger columns other than its metrics, grid and times (:mod:`orchestrator.results.ledger`).

    Attributes:
        method: the ``method`` column (``smn``, ``cascade_expert``, ``codec:zstd``, ...).
        backbone, dataset, seed: the ``backbone``, ``dataset`` and ``seed`` columns.
        config: the ``config_json`` column (what the cell's id hashes, or the stage's inputs).
    """

    method: str
    backbone: str
    dataset: str
    seed: int
    config: dict

    @classmethod
    def of(cls, config, *, method: str | None = None, record: dict | None = None) -> "Record":
        """The record of a ``CellConfig``: its method (or ``method``), backbone, dataset and seed, and its
        resolved dict as ``config_json`` (or ``record``)."""
        return cls(method or config.method, config.backbone.arch, config.dataset.source, int(config.seed),
                   config.to_dict() if record is None else record)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, cursor moves), e.g. ``RayTaskError``'s coloured header."""
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class Failure:
    """A unit of work that failed for good: its error text and the attempts it had (:func:`land` writes its
    failure record, which ``smn ls`` shows until the cell lands)."""

    error: str
    attempts: int

    def __post_init__(self) -> None:  # Ray colours a remote error's header; a record and a log stay plain text
        object.__setattr__(self, "error", strip_ansi(str(self.error)))


@dataclass(frozen=True)
class TrainInputs:
    """What a :class:`TrainingStage` adds to the training of its cell (:func:`smn_core.pipeline.run_cell`).

    Attributes:
        init_state: trainable state to start from (a cascade expert starts from its dispatcher's), or None.
        train_subset: indices into the train split to adapt on (an expert's cluster), or None (all).
        evaluate: run the cell's evaluation after training (an expert is evaluated by the combination).
    """

    init_state: dict | None = None
    train_subset: Sequence[int] | None = None
    evaluate: bool = True


class Stage(abc.ABC):
    """Work a :class:`CellJob` does instead of training its cell (a cascade router or combination): it runs
    in the worker and returns the metrics that :func:`land` writes. Stages are picklable frozen dataclasses."""

    @abc.abstractmethod
    def run(self, job: "CellJob", device: str) -> dict[str, float]:
        """Do the work of ``job`` on ``device``; return its metrics (``wall_s`` is added by :func:`land`)."""


class TrainingStage(abc.ABC):
    """A cell trained like any other (epoch checkpoints, resume, DDP) but with its own start and last step (a
    cascade expert): :meth:`inputs` before training, :meth:`finish` after it (on rank 0 under DDP), before
    the cell lands."""

    @abc.abstractmethod
    def inputs(self, job: "CellJob") -> TrainInputs:
        """The start state, train subset and evaluation switch of ``job``'s training.

        Raises:
            ValueError: when the job cannot train (e.g. an expert's cluster smaller than one batch).
        """

    @abc.abstractmethod
    def finish(self, job: "CellJob", outcome, device: str) -> dict[str, float]:
        """After training (``outcome``: the :class:`smn_core.pipeline.CellOutcome`): write the stage's own
        files; return metrics to add to the cell's."""


@dataclass(frozen=True)
class CellJob:
    """Everything a worker needs to run one unit of work and land it in the ledger: a plain cell, a Tune
    trial, a cascade router, expert or combination, or a codec measurement.

    Attributes:
        config: the validated ``smn_core.pipeline.CellConfig`` (None for a measurement with a ``record``).
        cell_id: the cell's id (hash of its resolved config or of the stage's inputs; the ledger file's name).
        label: a short human label for log lines (``smn seed=0 ...``).
        grid: the grid values that made this cell (``{dotted key: value}``), stored in the ledger.
        layout: where the experiment's files live.
        pipeline_weights: location of the pretrained-backbone artifact for ``weights: pipeline`` cells.
        stage: None (train and evaluate ``config``), a :class:`Stage` (work in place of training) or a
            :class:`TrainingStage` (training with its own start and last step).
        record: the ledger columns (default: :meth:`Record.of` ``config``).
    """

    config: Any
    cell_id: str
    label: str
    grid: dict = field(default_factory=dict)
    layout: ExperimentLayout | None = None
    pipeline_weights: str | None = None
    stage: Stage | TrainingStage | None = None
    record: Record | None = None

    @property
    def prefix(self) -> str:
        """The log prefix of this cell's lines: ``<cell_id> <label>``."""
        return f"{self.cell_id} {self.label}"

    def ledger_record(self) -> Record:
        """:attr:`record`, or the one of :attr:`config`."""
        return self.record if self.record is not None else Record.of(self.config)


def device() -> str:
    """``"cuda"`` when Ray gave this worker a GPU and torch sees one, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"


def log(prefix: str) -> Callable[[str], None]:
    """A progress function that prints ``[prefix] line`` (flushed: Ray forwards worker output live)."""
    def emit(line: str) -> None:
        echo(f"[{prefix}] {line}")
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
        echo(f"[{label}] resuming after epoch {resume[1]['epoch'] + 1}")

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
            echo(f"[{label}] resuming after epoch {resume[1]['epoch'] + 1}")

    def on_epoch_end(epoch: int, metrics: dict, state_fn) -> None:
        if rank == 0:
            tensors, meta = state_fn()
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, tensors, meta)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    return resume, on_epoch_end


def land(job: CellJob, result, started: float | None, *, extra: Mapping[str, float] | None = None) -> dict[str, float]:
    """Land one unit of work: the only writer of ledger rows, curves, failure records and final state.

    * ``result`` a :class:`smn_core.pipeline.CellOutcome` (a trained cell): its masks
      (``masks/<cell_id>``), final state (``states/<cell_id>/``), linear-probe head (``probes/<cell_id>``, see
      :func:`_save_probe`), per-epoch curves and per-test-image correctness (``per_image/<cell_id>.parquet``,
      :mod:`orchestrator.results.per_image`), then its ledger file
      (the cell "lands"; a failure record of it is removed), then its epoch checkpoints are dropped.
    * ``result`` a mapping ``{metric: value}`` (a stage, a measurement): its ledger file only.
    * ``result`` a :class:`Failure`: the failure record ``failures/<cell_id>.json`` only.

    Args:
        job: the unit of work (:meth:`CellJob.ledger_record` gives the ledger columns).
        started: UNIX time (s) the work began; ``wall_s`` is measured from it and added last. None: a
            measurement with no duration of its own (no ``wall_s``; ``started_at = finished_at``).
        extra: metrics added after the result's (e.g. :meth:`TrainingStage.finish`'s).

    Returns:
        The metrics written (``{}`` for a failure).

    Raises:
        ValueError: if there are no metrics to write.
    """
    lay = job.layout
    if isinstance(result, Failure):
        ledger.write_failure(lay.results, lay.experiment, cell_id=job.cell_id, label=job.label, error=result.error,
                             attempts=result.attempts)
        return {}
    trained = not isinstance(result, Mapping)
    if trained:
        cfg = job.config
        if result.masks is not None:
            save_tensors(lay.mask(job.cell_id), result.masks,
                         metadata={"cell_id": job.cell_id, "arch": cfg.backbone.arch})
        if result.state is not None:
            save_checkpoint(lay.state(job.cell_id), result.state, {"cell_id": job.cell_id, "config": cfg.to_dict()})
        if result.masks is not None and getattr(result, "probe_head", None):
            _save_probe(lay.probe(job.cell_id), job.cell_id, result.probe_head)
        write_curves(lay, job.cell_id, result.history)  # loss / density / entropy per epoch
    if trained and getattr(result, "per_image", None):  # each test image's correctness: paired differences
        per_image.write_correctness(lay, job.cell_id, result.per_image)
    metrics = dict(result.metrics if trained else result)
    metrics.update(extra or {})
    now = time.time()
    if started is not None:
        metrics["wall_s"] = now - started
    rec = job.ledger_record()
    ledger.write_cell(lay.results, lay.experiment, cell_id=job.cell_id, method=rec.method, backbone=rec.backbone,
                      dataset=rec.dataset, seed=rec.seed, grid=job.grid, config=rec.config, metrics=metrics,
                      started_at=now if started is None else started, finished_at=time.time(),
                      extra_columns=ray_job_columns())
    if trained:
        delete_checkpoint(lay.checkpoint(job.cell_id))  # the cell has landed: its epoch checkpoints are spent
    return metrics


SUBMISSION_ENV = "SMN_RAY_SUBMISSION_ID"
"""The variable through which the driver of a ``ray job submit`` passes its submission id to its workers
(:func:`orchestrator.engine.plain.ensure_ray`), for :func:`ray_job_columns`."""


def ray_job_columns() -> dict[str, str]:
    """The Ray job a cell ran in, for its ledger rows: ``ray_job_id`` (``ray.get_runtime_context().get_job_id()``,
    the driver's Ray job) and, under ``ray job submit``, ``ray_submission_id`` (the id ``ray job submit`` prints
    and ``ray job logs`` takes); ``{}`` outside Ray."""
    if not ray.is_initialized():
        return {}
    out = {"ray_job_id": ray.get_runtime_context().get_job_id()}
    if os.environ.get(SUBMISSION_ENV):
        out["ray_submission_id"] = os.environ[SUBMISSION_ENV]
    return out


def _save_probe(location: str, cell_id: str, head: Mapping) -> None:
    """Write a masked cell's fitted linear probe (:func:`smn_core.evaluation.probe_head_arrays`: ``weight``,
    ``bias``, ``mean``, ``scale``, ``labels``) as safetensors, its ``classes`` (names in label order) as JSON
    metadata, so ``smn store add`` can give the task a head that answers in class names."""
    import torch  # reason: torch is loaded in any process that holds a CellOutcome

    tensors = {k: torch.as_tensor(head[k]) for k in ("weight", "bias", "mean", "scale", "labels")}
    save_tensors(location, tensors, metadata={"cell_id": cell_id, "classes": json.dumps(list(head["classes"]))})


def _train(job: CellJob, device, resume, on_epoch_end, *, evaluate: bool = True):
    """Train (and evaluate) ``job``'s cell with :func:`smn_core.pipeline.run_cell`; a :class:`TrainingStage`
    gives the start state, train subset and evaluation switch."""
    from smn_core.pipeline import run_cell  # reason: torch loads in the worker, not in every driver that imports us

    inputs = job.stage.inputs(job) if isinstance(job.stage, TrainingStage) else TrainInputs()
    return run_cell(job.config, pipeline_weights=job.pipeline_weights, device=device, resume=resume,
                    init_state=inputs.init_state, on_epoch_end=on_epoch_end, progress=log(job.prefix),
                    evaluate=evaluate and inputs.evaluate, train_subset=inputs.train_subset)


def _finish(job: CellJob, outcome, device) -> dict[str, float] | None:
    return job.stage.finish(job, outcome, str(device)) if isinstance(job.stage, TrainingStage) else None


def _then(first: Callable, second: Callable) -> Callable:
    """An ``on_epoch_end`` hook that calls ``first`` then ``second`` with the same arguments."""
    def both(epoch: int, metrics: dict, state_fn) -> None:
        first(epoch, metrics, state_fn)
        second(epoch, metrics, state_fn)
    return both


def run_local(job: CellJob, on_epoch: Callable | None = None) -> dict[str, float]:
    """Run one unit of work in this process (a warm pool worker, a Tune trial, a Ray task) and land it
    (:func:`land`).

    A :class:`Stage` runs as it is. A cell trains resuming from and writing epoch checkpoints to
    ``checkpoints/<cell_id>/`` (their meta records this worker's ``node_id`` and ``pid``); ``on_epoch``
    (``f(epoch, metrics, state_fn)``, as :func:`smn_core.training.train`'s ``on_epoch_end``) is called after
    each epoch's checkpoint is written (a Tune trial reports the epoch through it).

    Returns:
        The cell's metrics (``knn_top1``, ``linear_probe_top1``, ``density``, ``wall_s``, ...).

    Raises:
        Whatever the work raises (a bad config, a data error); the epoch checkpoint stays for a retry.
    """
    started = time.time()
    if isinstance(job.stage, Stage):
        return land(job, job.stage.run(job, device()), started)
    where = ({"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
             if ray.is_initialized() else None)
    resume, on_epoch_end = local_checkpointing(job.layout.checkpoint(job.cell_id), job.prefix, where)
    if on_epoch is not None:
        on_epoch_end = _then(on_epoch_end, on_epoch)
    dev = device()
    outcome = _train(job, dev, resume, on_epoch_end)
    return land(job, outcome, started, extra=_finish(job, outcome, dev))


def _ddp_cell_loop(config: dict) -> None:
    """Ray Train worker of a DDP cell: the same cell loop under DDP; rank 0 evaluates and lands the cell."""
    import ray.train
    import ray.train.torch

    job: CellJob = config["job"]
    rank = ray.train.get_context().get_world_rank()
    resume, on_epoch_end = ddp_checkpointing(job.prefix)
    dev = ray.train.torch.get_device()
    outcome = _train(job, dev, resume, on_epoch_end, evaluate=rank == 0)
    if rank == 0:
        land(job, outcome, config["started"], extra=_finish(job, outcome, dev))


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


def run_job(job: CellJob, resources, on_epoch: Callable | None = None) -> dict[str, float]:
    """:func:`run_ddp` when ``resources.workers > 1`` (a ``TorchTrainer``, whose epochs Ray Train reports) and the
    job trains, else :func:`run_local` (``on_epoch``: its per-epoch hook)."""
    if resources.workers > 1 and not isinstance(job.stage, Stage):
        return run_ddp(job, resources)
    return run_local(job, on_epoch)
