"""Run an experiment's cells on Ray.

* ``resources.workers == 1``: each cell is one Ray task (the cheapest correct path: no Ray Train
  controller, whose fixed start-up is tens of seconds on a small machine). The task checkpoints
  every epoch to ``<results>/<experiment>/checkpoints/<cell_id>/`` and resumes from it when it is
  retried or the experiment is started again.
* ``resources.workers > 1``: a Ray Train ``TorchTrainer`` runs DDP across the workers (gloo on CPU,
  NCCL on GPU) and resumes from its last reported checkpoint after a worker failure
  (``FailureConfig(max_failures=resources.max_retries)``). Rank 0 evaluates and writes the ledger.
* Cells whose backbone uses ``weights: pipeline`` first need the pretraining artifact
  ``<results>/<experiment>/artifacts/pretrain-<hash>.safetensors``; it is built once, as a Ray task.

``results`` is a local path (an NFS mount on a cluster) or a ``pyarrow.fs`` URI (``s3://bucket/prefix``):
every artifact location comes from :func:`orchestrator.ledger.artifact_location`, files go through
:mod:`smn_core.checkpoint` (which writes URIs through ``pyarrow.fs``), and Ray Train / Ray Tune get the
URI itself as their ``storage_path``. Workers read S3 credentials and endpoints from the URI's query or
from the ``AWS_*`` variables, which :func:`ensure_ray` passes on to them.

Every finished cell writes its own ledger file from the worker, so results survive a killed driver;
running the same command again runs only the missing cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import ray
from pydantic import TypeAdapter

from smn_core.checkpoint import (delete_checkpoint, has_checkpoint, load_checkpoint, location_exists, save_checkpoint,
                                 save_tensors)
from smn_core.pipeline import CellConfig, run_cell

from . import ledger, ray_session
from .curves import write_curves
from .spec import Cell, ExperimentSpec, expand_cells

__all__ = ["ensure_ray", "run_experiment", "pretrain_artifact_path", "final_state_dir", "ddp_checkpointing", "RunSummary",
           "FORWARDED_ENV"]

_CELL = TypeAdapter(CellConfig)

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
"""Environment variables :func:`ensure_ray` passes from the driver to the Ray workers (S3 access)."""


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``), or start a local one.

    A local Ray starts without a dashboard and with token authentication unless the user set
    ``RAY_AUTH_MODE`` (:func:`orchestrator.ray_session.configure_auth`: token file mode 0600; a one-line
    warning for ``disabled``). Ray's own gRPC ports listen on every interface; the token guards them.
    The driver's ``AWS_*`` variables (:data:`FORWARDED_ENV`: S3 endpoint, region, credentials) are passed
    to the workers, so they reach an ``s3://`` results location the way the driver does.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray_session.configure_auth(local=not address)
    # workers must import this checkout's packages even when it is not pip-installed
    root = str(Path(__file__).resolve().parents[1])
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                        **{k: os.environ[k] for k in ("RAY_AUTH_MODE", *FORWARDED_ENV) if k in os.environ}}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env,
                 log_to_driver=True, _node_ip_address="127.0.0.1")


def _artifact_key(cell: CellConfig) -> str:
    payload = {"arch": cell.backbone.arch, "pretrain": asdict(cell.pretrain), "seed": 0}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrain_artifact_path(results: str, experiment: str, cell: CellConfig) -> str:
    """Where the pipeline's pretrained backbone for ``cell`` lives (a local path, or a URI for URI results)."""
    return ledger.artifact_location(results, experiment, "artifacts", f"pretrain-{_artifact_key(cell)}.safetensors")


def _log(prefix: str) -> Callable[[str], None]:
    def emit(line: str) -> None:
        print(f"[{prefix}] {line}", flush=True)
    return emit


@ray.remote
def _pretrain_task(cell_dict: dict, out_path: str) -> dict[str, float]:
    from smn_core.pipeline import pretrain_backbone

    cell = _CELL.validate_python(cell_dict)
    state, metrics = pretrain_backbone(cell.backbone, cell.pretrain, progress=_log("pretrain"))
    save_tensors(out_path, state, metadata={k: str(v) for k, v in metrics.items()})
    return metrics


def _cell_paths(results: str, experiment: str, cell_id: str) -> tuple[str, str]:
    return (ledger.artifact_location(results, experiment, "checkpoints", cell_id),
            ledger.artifact_location(results, experiment, "masks", f"{cell_id}.safetensors"))


def final_state_dir(results: str, experiment: str, cell_id: str) -> str:
    """Folder of a finished cell's final trainable state (``smn_core.checkpoint`` format: scores, head,
    prototypes, buffers), written before its ledger rows; a cascade's experts start from it. A local path,
    or a URI for URI results (:func:`orchestrator.ledger.artifact_location`)."""
    return ledger.artifact_location(results, experiment, "states", cell_id)


def _finish(results: str, experiment: str, cell_id: str, cfg: CellConfig, grid: dict, outcome, started: float) -> dict:
    ckpt_dir, mask_path = _cell_paths(results, experiment, cell_id)
    if outcome.masks is not None:
        save_tensors(mask_path, outcome.masks, metadata={"cell_id": cell_id, "arch": cfg.backbone.arch})
    if outcome.state is not None:
        save_checkpoint(final_state_dir(results, experiment, cell_id), outcome.state,
                        {"cell_id": cell_id, "config": cfg.to_dict()})
    metrics = dict(outcome.metrics)
    metrics["wall_s"] = time.time() - started
    write_curves(results, experiment, cell_id, outcome.history)  # per-epoch loss / density / code entropy
    ledger.write_cell(results, experiment, cell_id=cell_id, method=cfg.method, backbone=cfg.backbone.arch,
                      dataset=cfg.dataset.source, seed=cfg.seed, grid=grid, config=cfg.to_dict(),
                      metrics=metrics, started_at=started, finished_at=time.time())
    delete_checkpoint(ckpt_dir)  # the cell has landed: its epoch checkpoints are spent
    return metrics


def run_cell_here(cell_dict: dict, cell_id: str, label: str, grid: dict, experiment: str, results: str,
                  pipeline_weights: str | None) -> dict[str, float]:
    """Run one cell in this process (a Ray task or a Tune trial), checkpointing every epoch to
    ``<results>/<experiment>/checkpoints/<cell_id>/`` and resuming from there; write its ledger rows.

    Returns the cell's metrics.
    """
    import torch

    started = time.time()
    cfg = _CELL.validate_python(cell_dict)
    ckpt_dir, _ = _cell_paths(results, experiment, cell_id)
    resume = load_checkpoint(ckpt_dir) if has_checkpoint(ckpt_dir) else None
    if resume is not None:
        print(f"[{cell_id} {label}] resuming after epoch {resume[1]['epoch'] + 1}", flush=True)

    def on_epoch_end(epoch: int, metrics: dict, state_fn) -> None:
        tensors, meta = state_fn()
        save_checkpoint(ckpt_dir, tensors, meta)

    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    outcome = run_cell(cfg, pipeline_weights=pipeline_weights, device=device, resume=resume,
                       on_epoch_end=on_epoch_end, progress=_log(f"{cell_id} {label}"))
    return _finish(results, experiment, cell_id, cfg, grid, outcome, started)


_cell_task = ray.remote(run_cell_here)


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


def _ddp_worker_loop(config: dict) -> None:
    """Ray Train worker: the same cell loop under DDP; rank 0 evaluates and writes the ledger."""
    import ray.train
    import ray.train.torch

    started = config["started"]
    cfg = _CELL.validate_python(config["cell"])
    rank = ray.train.get_context().get_world_rank()
    resume, on_epoch_end = ddp_checkpointing(f"{config['cell_id']} {config['label']}")
    outcome = run_cell(cfg, pipeline_weights=config["pipeline_weights"], device=ray.train.torch.get_device(),
                       resume=resume, on_epoch_end=on_epoch_end, evaluate=rank == 0,
                       progress=_log(f"{config['cell_id']} {config['label']}"))
    if rank == 0:
        _finish(config["results"], config["experiment"], config["cell_id"], cfg, config["grid"], outcome, started)


def run_ddp_cell(cell_dict: dict, cell_id: str, label: str, grid: dict, experiment: str, results: str,
                 pipeline_weights: str | None, resources: dict) -> dict[str, float]:
    """Run one cell as DDP across ``resources["workers"]`` Ray Train workers (a ``TorchTrainer``),
    resuming from its last reported checkpoint after a worker failure; rank 0 writes the ledger.

    Returns the cell's metrics (read back from the ledger).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = ledger.artifact_location(results, experiment, "ray_train")  # Ray Train takes s3:// URIs as they are
    use_gpu = resources["gpus_per_worker"] > 0
    per_worker = {"CPU": resources["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = resources["gpus_per_worker"]
    trainer = TorchTrainer(
        _ddp_worker_loop,
        train_loop_config={"cell": cell_dict, "cell_id": cell_id, "label": label, "grid": grid,
                           "experiment": experiment, "results": results, "pipeline_weights": pipeline_weights,
                           "started": time.time()},
        scaling_config=ScalingConfig(num_workers=resources["workers"], use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"cell-{cell_id}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=resources["max_retries"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
    rows = ledger.read_ledger(results, experiment)
    rows = rows[rows["cell_id"] == cell_id]
    return dict(zip(rows["metric"], rows["value"]))


_ddp_cell_task = ray.remote(num_cpus=0)(run_ddp_cell)


class RunSummary(dict):
    """``{"total", "skipped", "ran", "failed": {cell_id: error}}`` of one :func:`run_experiment` call."""


def _check_resources(spec: ExperimentSpec) -> None:
    # a fixed cluster that can never give them would wait forever (the autoscaler's "No available node types")
    res = spec.resources
    ray_session.check_cluster_fits(res.cpus_per_worker, res.gpus_per_worker, res.workers)


def completed_cells(results: str, experiment: str) -> set[str]:
    """:func:`orchestrator.ledger.completed_cells`, read by the driver before anything runs.

    Raises:
        orchestrator.storage.StorageUnreachable: if the ledger's storage cannot be read (an ``s3://``
            endpoint that does not answer, a bucket the credentials cannot list); names the location.
    """
    from .storage import StorageUnreachable

    try:
        return ledger.completed_cells(results, experiment)
    except OSError as exc:
        raise StorageUnreachable(f"cannot read the ledger of {experiment!r} under results location {results!r} from "
                                 f"the driver: {exc}") from None


def start_ray_for(spec: ExperimentSpec, results: str, address: str | None = None) -> None:
    """Join or start Ray and check, before any work, that the cluster can run ``spec``.

    Raises:
        RuntimeError: if the spec asks for GPUs the cluster does not have.
        orchestrator.storage.StorageUnreachable, ValueError: if ``results`` is not writable from the driver
            and shared with every alive node (:func:`orchestrator.storage.check_results_location`).
    """
    from .storage import check_results_location

    ensure_ray(address)
    _check_resources(spec)
    check_results_location(results)


def prepare_pipeline_weights(spec: ExperimentSpec, results: str, cells: list[Cell],
                             echo: Callable[[str], None] = print) -> dict[str, str]:
    """Build (once, as Ray tasks) the pretraining artifacts the ``weights: pipeline`` cells need.

    Returns ``{cell_id: artifact path}`` for those cells.
    """
    res = spec.resources
    weights: dict[str, str] = {}
    pre = {}
    for c in cells:
        if c.config.backbone.weights == "pipeline":
            path = pretrain_artifact_path(results, spec.name, c.config)
            if path not in pre and not location_exists(path):
                name = path.split("?")[0].rsplit("/", 1)[-1]
                echo(f"pretraining {c.config.backbone.arch} on {c.config.pretrain.dataset.source} -> {name}")
                pre[path] = _pretrain_task.options(num_cpus=res.cpus_per_worker,
                                                   num_gpus=res.gpus_per_worker).remote(_dump(c), path)
            weights[c.cell_id] = path
    for path, ref in pre.items():
        m = ray.get(ref)
        echo(f"pretrained backbone ready ({', '.join(f'{k} {v:.3f}' for k, v in m.items())})")
    return weights


def uses_tune(spec: ExperimentSpec) -> bool:
    """Whether ``spec`` runs as a Ray Tune sweep (``resources.engine``; auto: it has a grid or a search)."""
    if spec.resources.engine != "auto":
        return spec.resources.engine == "tune"
    return bool(spec.grid) or spec.search is not None


def echo_cell_done(echo: Callable[[str], None], prefix: str, cell: Cell, metrics: dict[str, float]) -> None:
    """Print one finished cell's headline metrics, and a warning when SwAV collapsed."""
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("knn_top1", "knn_dino_top1", "linear_probe_top1", "density")
                      if k in metrics)
    echo(f"{prefix} {cell.cell_id} {cell.label}: {shown}")
    if metrics.get("collapsed"):
        echo(f"  warning: SwAV collapse detected in {cell.cell_id} (loss {metrics.get('train_loss', float('nan')):.4f} "
             f"near ln K, or assignment entropy {metrics.get('code_entropy', float('nan')):.3f} near 0); "
             "train longer, or change prototypes / score_lr")


def run_experiment(spec: ExperimentSpec, results: str, *, address: str | None = None,
                   echo: Callable[[str], None] = print) -> RunSummary:
    """Run every cell of ``spec`` that the ledger does not hold yet; return a summary.

    Specs with a grid or a search run as a Ray Tune sweep (:func:`orchestrator.sweep.run_sweep`);
    others as one Ray task per cell (or a ``TorchTrainer`` per cell for ``workers > 1``). Cells run
    concurrently as far as the cluster's resources allow (and ``resources.max_concurrent_cells``).
    A cell that fails after its retries is reported in ``summary["failed"]``; the other cells go on.
    ``results`` is a local path or a ``pyarrow.fs`` URI (``s3://bucket/prefix``).

    Raises:
        orchestrator.storage.StorageUnreachable: if the ledger cannot be read, or (before any cell runs) the
            results location is not writable from the driver or not shared with every alive node.
        RuntimeError: if the spec asks for GPUs the cluster does not have.
        ValueError: if ``results`` is a URI that pyarrow does not support.
    """
    if uses_tune(spec):
        from .sweep import run_sweep

        return run_sweep(spec, results, address=address, echo=echo)
    cells = expand_cells(spec)
    done = completed_cells(results, spec.name)
    todo = [c for c in cells if c.cell_id not in done]
    summary = RunSummary(total=len(cells), skipped=len(cells) - len(todo), ran=0, failed={})
    echo(f"experiment {spec.name}: {len(cells)} cells, {summary['skipped']} already in the ledger, {len(todo)} to run")
    if not todo:
        return summary
    start_ray_for(spec, results, address)
    res = spec.resources
    weights = prepare_pipeline_weights(spec, results, todo, echo)

    def submit(c: Cell):
        args = (_dump(c), c.cell_id, c.label, c.grid_values, spec.name, results, weights.get(c.cell_id))
        if res.workers > 1:
            return _ddp_cell_task.options(max_retries=res.max_retries, retry_exceptions=True).remote(
                *args, res.model_dump())
        return _cell_task.options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
                                  max_retries=res.max_retries, retry_exceptions=True).remote(*args)

    limit = res.max_concurrent_cells or len(todo)
    pending = list(todo)
    running: dict[Any, Cell] = {}
    t0 = time.time()
    finished = summary["skipped"]
    while pending or running:
        while pending and len(running) < limit:
            c = pending.pop(0)
            running[submit(c)] = c
        ready, _ = ray.wait(list(running), num_returns=1)
        cell = running.pop(ready[0])
        finished += 1
        try:
            metrics = ray.get(ready[0])
            summary["ran"] += 1
            echo_cell_done(echo, f"[{finished}/{len(cells)} cells done, {time.time() - t0:.0f}s]", cell, metrics)
        except Exception as exc:  # noqa: BLE001 - a failed cell must not stop the others
            summary["failed"][cell.cell_id] = f"{type(exc).__name__}: {exc}"
            ledger.write_failure(results, spec.name, cell_id=cell.cell_id, label=cell.label,
                                 error=summary["failed"][cell.cell_id], attempts=res.max_retries + 1)
            echo(f"[{finished}/{len(cells)} cells done] {cell.cell_id} {cell.label} FAILED: {ray_session.error_cause(exc)}")
    return summary


def _dump(cell: Cell) -> dict:
    return json.loads(json.dumps(_CELL.dump_python(cell.config, mode="json")))

