"""Run an experiment's cells on Ray: the plain (non-Tune) caller of :mod:`orchestrator.engine.cell`.

* ``resources.workers == 1``: the cells run on a :class:`orchestrator.engine.cell.WarmPool` of long-lived
  workers (one per concurrent cell), which import torch and ``smn_core`` once, while the driver reads
  the ledger and builds pretraining artifacts, and then run cell after cell. Each cell checkpoints every
  epoch to ``checkpoints/<cell_id>/`` and resumes from it when its worker is restarted (process or node
  lost) or the experiment is started again.
* ``resources.workers > 1``: a Ray Train ``TorchTrainer`` per cell runs DDP across the workers (gloo on
  CPU, NCCL on GPU), driven from a zero-CPU Ray task, and resumes from its last reported checkpoint after
  a worker failure. Rank 0 evaluates and writes the ledger.
* Cells whose backbone uses ``weights: pipeline`` first need the pretraining artifact
  ``artifacts/pretrain-<hash>.safetensors``; it is built once, as a Ray task.

Every location comes from one :class:`orchestrator.results.layout.ExperimentLayout`, built here from ``results``
(a local path, an NFS mount, or a ``pyarrow.fs`` URI such as ``s3://bucket/prefix``). Workers read S3
credentials and endpoints from the URI's query or from the ``AWS_*`` variables, which :func:`ensure_ray`
passes on to them.

Every finished cell writes its own ledger file from the worker, so results survive a killed driver;
running the same command again runs only the missing cells.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import ray

from orchestrator import echo as echo_line
from orchestrator.engine import session as ray_session
from orchestrator.engine.cell import SUBMISSION_ENV, CellJob, Failure, land, run_ddp, run_local
from orchestrator.engine.pool import WarmPool, pool_size, run_bounded
from orchestrator.engine.preflight import check_results_location
from orchestrator.engine.prepare import (RunSummary, cell_jobs, completed_cells, echo_cell_done, landed_references,
                                         prepare_pipeline_weights, uses_tune)
from orchestrator.results.layout import ExperimentLayout
from orchestrator.results import ledger
from orchestrator.spec.experiment import Cell, ExperimentSpec, expand_cells, pending_references, waiting_count

__all__ = ["ensure_ray", "run_experiment", "RunSummary", "FORWARDED_ENV", "start_ray_for", "worker_runtime_env"]

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
"""Environment variables :func:`ensure_ray` passes from the driver to the Ray workers (S3 access)."""


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               connect_timeout_s: float | None = None, dashboard: bool = False,
               echo: Callable[[str], None] = echo_line) -> None:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``), or start a local one.

    A local Ray listens on 127.0.0.1 only (:func:`orchestrator.engine.session.loopback_node`), starts without a
    dashboard (``dashboard=True``: with Ray's dashboard on 127.0.0.1, under the same token; its address is
    echoed, :func:`orchestrator.engine.session.dashboard_line`; joining a cluster, its dashboard's address is
    echoed) and with token authentication unless the user set
    ``RAY_AUTH_MODE`` (:func:`orchestrator.engine.session.configure_auth`: token file mode 0600; a one-line
    warning for ``disabled``); the token also guards a joined cluster's ports.
    The driver's ``AWS_*`` variables (:data:`FORWARDED_ENV`: S3 endpoint, region, credentials) are passed
    to the workers, so they reach an ``s3://`` results location the way the driver does. A local Ray does not
    outlive a killed driver by more than a few seconds (:func:`orchestrator.engine.session.start_driver_watchdog`).

    Joining has a deadline (:func:`orchestrator.engine.session.join_cluster`: ``connect_timeout_s``, default
    30 s; raises ``ClusterUnreachable``, or ValueError for a malformed address).
    """
    ray_session.plain_ray_errors()  # no colour codes in remote errors (Tune's error.txt, failure records)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray_session.configure_auth(local=not address)
    env = worker_runtime_env()
    ray_session.every_log_line()  # no "[repeated 3x across cluster]": each worker line when it is printed
    if address:
        context = ray_session.join_cluster(address, runtime_env=env, timeout_s=connect_timeout_s, log_to_driver=True)
    else:
        where = {"dashboard_host": "127.0.0.1"} if dashboard else {}
        with ray_session.loopback_node():  # every listener of a local Ray on 127.0.0.1
            context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=env,
                               log_to_driver=True, _node_ip_address="127.0.0.1", **where)
        ray_session.start_driver_watchdog()  # the session ends within seconds of a killed driver
    if dashboard:
        echo(ray_session.dashboard_line(context))


def worker_runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """The runtime_env of the Ray session :func:`ensure_ray` starts or joins, for every worker of the run:
    ``PYTHONPATH`` names this checkout (workers import its packages even when it is not pip-installed), the
    driver's ``RAY_AUTH_MODE`` and :data:`FORWARDED_ENV` variables, the ``ray job submit`` submission id, then
    ``env_vars`` (overriding); and :func:`orchestrator.engine.session.quiet_worker_exit` as the workers' setup
    hook (no "Exception ignored" traceback when Ray stops a worker)."""
    root = str(Path(__file__).resolve().parents[2])
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                         **{k: os.environ[k] for k in ("RAY_AUTH_MODE", *FORWARDED_ENV) if k in os.environ},
                         **({SUBMISSION_ENV: sub} if (sub := submission_id()) else {}),
                         **(env_vars or {})},
            "worker_process_setup_hook": ray_session.WORKER_SETUP_HOOK}


def submission_id() -> str | None:
    """The submission id of the ``ray job submit`` job this driver runs as (the job's metadata, which Ray's job
    supervisor passes to the driver in ``RAY_JOB_CONFIG_JSON_ENV_VAR``), or None (not a submitted job)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    sub = (config.get("metadata") or {}).get("job_submission_id") if isinstance(config, dict) else None
    return str(sub) if sub else None


_ddp_cell_task = ray.remote(num_cpus=0)(run_ddp)


def _check_resources(spec: ExperimentSpec) -> None:
    # a fixed cluster that can never give them would wait forever (the autoscaler's "No available node types")
    res = spec.resources
    ray_session.check_cluster_fits(res.cpus_per_worker, res.gpus_per_worker, res.workers)


def start_ray_for(spec: ExperimentSpec, results: str | ExperimentLayout, address: str | None = None, *,
                  connect_timeout_s: float | None = None) -> None:
    """Join or start Ray and check, before any work, that the cluster can run ``spec``.

    Raises:
        RuntimeError: if the spec asks for GPUs the cluster does not have.
        orchestrator.engine.preflight.StorageUnreachable, ValueError: if ``results`` is not writable from the driver
            and shared with every alive node (:func:`orchestrator.engine.preflight.check_results_location`).
    """
    ensure_ray(address, connect_timeout_s=connect_timeout_s)
    _check_resources(spec)
    check_results_location(results.results if isinstance(results, ExperimentLayout) else results)


def run_experiment(spec: ExperimentSpec, results: str | ExperimentLayout, *, address: str | None = None,
                   echo: Callable[[str], None] = echo_line, cells: list[Cell] | None = None,
                   connect_timeout_s: float | None = None) -> RunSummary:
    """Run every cell of ``spec`` that the ledger does not hold yet; return a summary.

    Specs with a grid or a search run as a Ray Tune sweep (:func:`orchestrator.engine.sweep.run_sweep`);
    others on a :class:`orchestrator.engine.cell.WarmPool` (or a ``TorchTrainer`` per cell for ``workers > 1``).
    Cells run concurrently as far as the cluster's resources allow (and ``resources.max_concurrent_cells``).
    A cell that fails after its retries is reported in ``summary["failed"]``; the other cells go on.

    Args:
        results: a local path, a ``pyarrow.fs`` URI (``s3://bucket/prefix``), or an
            :class:`orchestrator.results.layout.ExperimentLayout` (its root is used).
        cells: the spec's expanded cells when the caller has them already (expanded once per run).
        connect_timeout_s: deadline to join the cluster at ``address`` (default 30 s).

    Raises:
        orchestrator.engine.preflight.StorageUnreachable: if the ledger cannot be read, or (before any cell runs) the
            results location is not writable from the driver or not shared with every alive node.
        RuntimeError: if the spec asks for GPUs the cluster does not have.
        ValueError: if ``results`` is a URI that pyarrow does not support.
    """
    layout = ExperimentLayout.of(results, spec.name)
    if uses_tune(spec):
        from orchestrator.engine.sweep import run_sweep  # reason: ray.tune takes seconds to import; plain runs skip it

        return run_sweep(spec, layout, echo=echo, start_ray=lambda: start_ray_for(spec, layout, address, connect_timeout_s=connect_timeout_s),
                         cells=cells)
    cells = expand_cells(spec) if cells is None else cells
    waiting = pending_references(spec)  # the cells that dependent cells (random-mask controls, ...) wait for
    if waiting:  # a rerun: the references in the ledger already make their dependent cells ready
        densities = ledger.cell_metric(layout.results, spec.name, "density") if spec.name in ledger.list_experiments(
            layout.results) else {}
        cells, waiting = expand_cells(spec, densities), pending_references(spec, densities)
    later = waiting_count(spec, densities) if waiting else 0
    done = completed_cells(layout, spec.name)
    todo = [c for c in cells if c.cell_id not in done]
    summary = RunSummary(total=len(cells) + later, skipped=len(cells) - len(todo), ran=0, failed={})
    echo(f"experiment {spec.name}: {len(cells) + later} cell{'' if len(cells) + later == 1 else 's'}" +
         (f" ({later} of them after the {len(waiting)} cell{'' if len(waiting) == 1 else 's'} they depend on)"
          if later else "") + f", {summary['skipped']} already in the ledger, {len(todo)} to run"
         + (" now" if later else ""))
    if not todo and not waiting:
        return summary
    start_ray_for(spec, layout, address, connect_timeout_s=connect_timeout_s)
    res = spec.resources
    limit = min(res.max_concurrent_cells or len(cells), len(cells))
    pool = None
    if res.workers == 1:  # start (and warm) the workers now: their imports overlap the pretraining below
        # a worker lost to a process or node death is restarted and its cell replayed (resuming from its epoch
        # checkpoint) up to max_retries times, as Ray retried a task before; then a fresh worker takes the slot
        pool = WarmPool(pool_size(limit, res.cpus_per_worker, res.gpus_per_worker), num_cpus=res.cpus_per_worker,
                        num_gpus=res.gpus_per_worker, max_restarts=res.max_retries)
        limit = len(pool)
    try:
        seen = {c.cell_id for c in cells}
        while True:  # rounds: the ready cells, then the dependent cells whose references landed
            _run_round(spec, layout, todo, summary, echo, pool, limit, last=not waiting)
            if not waiting:
                break
            densities, missing = landed_references(layout, spec.name, waiting, summary)
            new = [c for c in expand_cells(spec, densities) if c.cell_id not in seen]
            seen.update(c.cell_id for c in new)
            done = completed_cells(layout, spec.name)
            todo = [c for c in new if c.cell_id not in done]
            summary["skipped"] += len(new) - len(todo)
            waiting = pending_references(spec, densities) - missing
    finally:
        if pool is not None:
            pool.shutdown()
    return summary


def _run_round(spec: ExperimentSpec, layout: ExperimentLayout, todo: list[Cell], summary: RunSummary,
               echo: Callable[[str], None], pool: WarmPool | None, limit: int, *, last: bool) -> None:
    """Run ``todo`` (pretraining first where needed) on ``pool`` (or a ``TorchTrainer`` each), at most ``limit``
    at a time; count them into ``summary`` and land each failure's record. In the ``last`` round, a worker with
    nothing left to do is released at once (earlier rounds keep them for the dependent cells)."""
    if not todo:
        return
    res = spec.resources
    weights = prepare_pipeline_weights(spec, layout, todo, echo, pool)
    jobs = cell_jobs(todo, layout, weights)

    def submit(job: CellJob, slot: int):
        if pool is None:
            return _ddp_cell_task.options(max_retries=res.max_retries, retry_exceptions=True).remote(job, res)
        return pool.submit(slot, run_local, job)

    t0 = time.time()
    by_id = {c.cell_id: c for c in todo}
    for job, metrics, exc in run_bounded(jobs, submit, min(limit, len(jobs)), retries=res.max_retries if pool else 0,
                                         on_error=pool.heal if pool else None,
                                         on_idle=pool.release if pool and last else None):
        cell = by_id[job.cell_id]
        finished = summary["skipped"] + summary["ran"] + sum(":" not in k for k in summary["failed"]) + 1
        if exc is None:
            summary["ran"] += 1
            echo_cell_done(echo, f"[{finished}/{summary['total']} cells done, {time.time() - t0:.0f}s]", cell, metrics)
            continue
        summary["failed"][cell.cell_id] = f"{type(exc).__name__}: {exc}"
        land(job, Failure(summary["failed"][cell.cell_id], res.max_retries + 1), None)
        echo(f"[{finished}/{summary['total']} cells done] {cell.cell_id} {cell.label} FAILED: "
             f"{ray_session.error_cause(exc)}")
