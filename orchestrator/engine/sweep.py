"""Ablation sweeps on Ray Tune: a spec's grid, or an Optuna search, as Tune trials of one cell each.

* **Grid** (``grid:`` in the spec): every cell of methods x grid x seeds that the ledger does not
  hold becomes one trial of a ``tune.grid_search`` over cell ids, with the cell's method, seed and grid
  values in the trial's config under their dotted names (:func:`grid_param_space`). Trials run concurrently within
  the resources the spec asks for (``cpus_per_worker`` / ``gpus_per_worker`` per trial;
  ``max_concurrent_cells``). A trial with ``workers > 1`` builds and fits a Ray Train
  ``TorchTrainer`` inside the trial (DDP), as Ray 2.60 requires.
* **Dependent cells** (``train.mask.topk_density: found``, paper Table 2): they run in a second
  round, after the threshold cells whose ledger ``density`` they use.
* **Search** (``search:`` in the spec): Optuna's TPE sampler (``ray.tune.search.optuna``) proposes
  ``num_samples`` cells over continuous or categorical axes, for one metric. Cells the ledger holds
  already are given to Optuna as evaluated points and count against the budget, so a rerun only
  runs the missing trials.

Every trial runs its cell through :func:`orchestrator.engine.cell.run_job` (per-epoch checkpoints, resume;
a ``TorchTrainer`` only for ``workers > 1``) and writes the cell's ledger rows itself, so a sweep stopped at any point (Ctrl-C, a killed
driver, a lost node) and started again with the same command finishes the missing cells only.
Failed trials are retried ``resources.max_retries`` times (Tune ``FailureConfig``); a trial that keeps
failing gets a failure record (:func:`orchestrator.engine.cell.land`) and the rest of the sweep goes on.
Progress: one line per trial event with trials done / running / pending / failed and the best
metric so far.

Warm trials: Tune reuses trial actors (``reuse_actors=True``), so a trial process imports torch and
``smn_core`` once and runs trial after trial (a fresh process per trial cost tens of seconds on a small
machine). A trial first checks its own cell's ledger file (:func:`orchestrator.results.ledger.read_cell`, one
file, not the whole ledger), so a cell another driver finished meanwhile is reported, not rerun.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
from typing import Any, Callable

import ray
from ray import tune

from smn_core.checkpoint import delete_checkpoint, save_checkpoint
from smn_core.config import METHODS

from orchestrator import echo as echo_line
from orchestrator.engine.cell import CellJob, Failure, land, run_job
from orchestrator.engine.prepare import (RunSummary, cell_jobs, completed_cells, echo_cell_done, landed_references,
                                         prepare_pipeline_weights)
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.spec.experiment import (EPOCH_METRICS, Cell, ExperimentSpec, SpecError, expand_cells,
                                          pending_references, search_cell)

__all__ = ["run_sweep", "SweepProgress", "grid_param_space", "epoch_reporter", "scheduler_of"]

_PROGRESS_METRIC = "knn_top1"


class SweepProgress(tune.Callback):
    """Live progress of a sweep: trials done / running / pending / failed and the best metric so far.

    Args:
        total: number of trials of this Tune run.
        labels: ``{trial config key value: cell label}`` resolver, ``label(config) -> str``.
        metric, mode: the metric to track (``"max"`` or ``"min"``).
        echo: where lines go (:func:`orchestrator.echo`, flushed).
    """

    def __init__(self, total: int, label: Callable[[dict], str], metric: str, mode: str,
                 echo: Callable[[str], None], name: str) -> None:
        self.total, self.label, self.metric, self.mode, self.echo, self.name = total, label, metric, mode, echo, name
        self.running: set[str] = set()
        self.done = 0
        self.failed = 0
        self.best: tuple[float, str] | None = None
        self.t0 = time.time()

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment state; the output function stays behind
        return {k: v for k, v in self.__dict__.items() if k != "echo"} | {"echo": None}

    def _echo(self, line: str) -> None:
        (self.echo or echo_line)(line)

    def line(self) -> str:
        pending = max(0, self.total - self.done - self.failed - len(self.running))
        best = f"; best {self.metric} {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        return (f"[sweep {self.name} {time.time() - self.t0:.0f}s] {self.done} done, {len(self.running)} running, "
                f"{pending} pending, {self.failed} failed{best}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._echo(f"{self.line()}  <- started {self.label(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
            if better:
                self.best = (float(value), self.label(trial.config))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._echo(f"{self.line()}  <- retrying {self.label(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._trial_over(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._trial_over(trial, failed=True)

    def _trial_over(self, trial, failed: bool) -> None:
        """Count a trial that finished (or failed) and echo the progress line naming it."""
        self.running.discard(trial.trial_id)
        if failed:
            self.failed += 1
        else:
            self.done += 1
        # a landed cell's last report carries its wall_s; a trial the scheduler stopped reported an epoch last
        stopped = not failed and "wall_s" not in (getattr(trial, "last_result", None) or {"wall_s": 0})
        what = "FAILED" if failed else "stopped early" if stopped else "finished"
        self._echo(f"{self.line()}  <- {what} {self.label(trial.config)}")


def _epochs(config) -> int:
    """Epochs a cell trains (0 for a frozen method, whose config keeps no training)."""
    return int(config.train.epochs) if METHODS[config.method] is not None else 0


def _report(metrics: dict[str, Any], job: CellJob) -> None:
    """The trial's last report: the landed cell's metrics, at ``epoch`` = its last epoch."""
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    tune.report({**clean, "epoch": _epochs(job.config), "cell_id": job.cell_id})


def epoch_reporter(cell_id: str) -> Callable[[int, dict, Callable], None]:
    """The per-epoch hook of a Tune trial (:func:`orchestrator.engine.cell.run_local`'s ``on_epoch``): ``tune.report``
    of the epoch's metrics (``epoch`` 1-based, ``train_loss``, ``density``, ``val_knn_dino_top1`` with a
    validation split, ...) with the epoch's checkpoint, so Tune's scheduler can stop the trial after any epoch
    (the report then ends the trial's thread) and Tune keeps the last checkpoint of each trial."""

    # Ray Train logs "Checkpoint successfully created at: ..." at INFO for each report, into the run's console
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

    def on_epoch(epoch: int, metrics: dict, state_fn) -> None:
        clean = {("train_loss" if k == "loss" else k): float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and k != "epoch"}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, *state_fn())
            tune.report({**clean, "epoch": epoch + 1, "cell_id": cell_id},
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    return on_epoch


def _grid_trial(config: dict, *, jobs: dict[str, CellJob], resources) -> None:
    """Tune trial of a grid sweep: run cell ``jobs[config["cell_id"]]`` (or read it from its ledger file
    when another driver finished it meanwhile), reporting every epoch, then its final metrics."""
    job = jobs[config["cell_id"]]
    metrics = ledger.read_cell(job.layout, job.cell_id)
    if metrics is None:
        metrics = run_job(job, resources, epoch_reporter(job.cell_id))
    _report(metrics, job)


def _search_trial(config: dict, *, spec: ExperimentSpec, space: list[str], layout: ExperimentLayout, resources,
                  pipeline_weights: str | None) -> None:
    """Tune trial of an Optuna search: build the cell of the proposed values, run it (or read it from
    the ledger when it is there already) and report its metrics."""
    cell = search_cell(spec, {k: config[k] for k in space})
    job = CellJob(cell.config, cell.cell_id, cell.label, dict(cell.grid_values), layout, pipeline_weights)
    metrics = ledger.read_cell(layout, cell.cell_id)
    if metrics is None:
        # Optuna takes every report as a step of its metric: per-epoch reports only when they carry it
        per_epoch = epoch_reporter(cell.cell_id) if spec.search.metric in EPOCH_METRICS else None
        metrics = run_job(job, resources, per_epoch)
    _report(metrics, job)


def _trial_resources(spec: ExperimentSpec) -> dict[str, float]:
    res = spec.resources
    if res.workers > 1:
        # the trial only drives a TorchTrainer, whose workers ask for the real resources
        return {"cpu": 0.01}
    return {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}


def scheduler_of(spec: ExperimentSpec, max_epochs: int):
    """Tune's trial scheduler for ``search.scheduler`` on ``search.metric``, with ``epoch`` (1-based, reported by
    :func:`epoch_reporter`) as its time: ``ASHAScheduler`` (rungs from ``grace_epochs`` by ``reduction_factor``
    up to ``max_epochs``; a trial past the last rung runs to its end and lands whole) or ``MedianStoppingRule``;
    None for ``none`` or no search section (Tune's FIFO: every trial runs to its end)."""
    s = spec.search
    if s is None or s.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    if s.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=max(max_epochs, s.grace_epochs),
                             grace_period=s.grace_epochs, reduction_factor=s.reduction_factor, stop_last_trials=False)
    return MedianStoppingRule(time_attr="epoch", metric=s.metric, mode=s.mode, grace_period=s.grace_epochs,
                              min_samples_required=3)


def _land_stopped(spec: ExperimentSpec, result_grid, job_of: Callable[[dict], CellJob | None], summary: RunSummary,
                  echo: Callable[[str], None]) -> set[str]:
    """Land every cell whose trial Tune's scheduler stopped: its last reported metrics (training and
    validation; no test evaluation), ``stopped_early`` = 1, ``scheduler_stopped`` = 1 and ``epochs_done``, so that
    a rerun does not run it again. Its epoch checkpoint is dropped (Tune keeps the last one in its run folder).
    Returns the ids of the cells it landed (counted in ``summary["ran"]`` and ``summary["stopped"]``)."""
    stopped: set[str] = set()
    for r in result_grid:
        job = job_of(r.config or {})
        if job is None or r.error is not None or ledger.read_cell(job.layout, job.cell_id) is not None:
            continue
        last = {k: float(v) for k, v in (r.metrics or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _TUNE_KEYS}
        done = int(last.pop("epoch", 0))
        if done >= _epochs(job.config) or not last:
            continue  # not a scheduler's stop (the trial ended without landing: recorded as a failure elsewhere)
        last.update(stopped_early=1.0, scheduler_stopped=1.0, epochs_done=float(done))
        started = (r.metrics or {}).get("timestamp", time.time()) - (r.metrics or {}).get("time_total_s", 0.0)
        land(job, last, started)
        delete_checkpoint(job.layout.checkpoint(job.cell_id))
        summary["stopped"] = summary.get("stopped", 0) + 1
        summary["ran"] += 1
        stopped.add(job.cell_id)
        echo(f"  stopped by {spec.search.scheduler} after epoch {done}: {job.prefix} "
             f"({spec.search.metric} {last.get(spec.search.metric, math.nan):.3f})")
    return stopped


_TUNE_KEYS = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "time_since_restore",
              "iterations_since_restore", "done", "should_checkpoint", "checkpoint_dir_name", "node_ip", "date",
              "hostname", "experiment_tag", "trial_id", "lr", "seconds"}
"""Keys of a Tune result that are Tune's bookkeeping (or an epoch's learning rate and duration), not cell metrics."""


def _run_config(spec: ExperimentSpec, layout: ExperimentLayout, callbacks: list) -> tune.RunConfig:
    # a URI (s3://...) goes to Tune as it is, query included: Tune opens it with pyarrow.fs itself
    storage = layout.tune
    if not layout.is_uri:
        os.makedirs(storage, exist_ok=True)
    # a fresh name each time: re-using a Tune run name in the same storage silently resumes it;
    # resuming is the ledger's job (finished cells are skipped, running ones resume from checkpoints)
    name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=0,
                          failure_config=tune.FailureConfig(max_failures=spec.resources.max_retries),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))  # each trial's last epoch


def _record_failures(spec: ExperimentSpec, layout: ExperimentLayout, result_grid, cell_of: Callable[[dict], Cell | None],
                     summary: RunSummary, echo: Callable[[str], None], stopped: set[str] = frozenset()) -> None:
    for r in result_grid:
        cell = cell_of(r.config or {})
        if cell is None or cell.cell_id in stopped:
            continue
        if r.error is not None:
            err = f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1] if str(r.error).strip() else ''}"
            summary["failed"][cell.cell_id] = err
            land(CellJob(cell.config, cell.cell_id, cell.label, dict(cell.grid_values), layout),
                 Failure(str(r.error), spec.resources.max_retries + 1), None)
            echo(f"  cell {cell.cell_id} {cell.label} failed after {spec.resources.max_retries + 1} attempt(s): {err}")
        else:
            summary["ran"] += 1
            echo_cell_done(echo, "  done:", cell, r.metrics or {})


def _quiet_tune() -> None:
    # Tune's own console output (configuration boxes, trial tables) would interleave with our
    # progress lines; the legacy reporter at verbose=0 prints nothing
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # a report with a checkpoint every epoch snapshots the experiment state often; Tune would warn each time
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


class _AxisValue:
    """``tune.sample_from`` resolver of one grid axis: the value the trial's cell (``config["cell_id"]``) has, or
    None where the axis does not apply to that cell.

    A class, not a lambda, so Tune can pickle it with the experiment state.
    """

    def __init__(self, axis: str, values: dict[str, dict[str, Any]]) -> None:
        self.axis, self.values = axis, values

    def __call__(self, config: dict) -> Any:
        # None for a cell the axis does not apply to (the frozen backbone's cells have no train.* axes)
        return self.values[config["cell_id"]].get(self.axis)


def grid_param_space(cells: list[Cell]) -> dict[str, Any]:
    """Tune ``param_space`` of a grid round: the cells' settings under their own names.

    ``cell_id`` (a ``grid_search`` over the cells to run) is the identity; ``method``, ``seed`` and every grid
    axis under its dotted name (``train.swav.num_prototypes``) are resolved from it (``tune.sample_from``), so
    Tune's tables, callbacks and ``ResultGrid.get_dataframe()`` (columns ``config/<axis>``) show the settings,
    while the cells to run need not be a full product of the axes (cells in the ledger are left out).
    """
    values = {c.cell_id: {"method": c.config.method, "seed": c.config.seed, **c.grid_values} for c in cells}
    axes = list(dict.fromkeys(k for v in values.values() for k in v))
    return {"cell_id": tune.grid_search([c.cell_id for c in cells]),
            **{axis: tune.sample_from(_AxisValue(axis, values)) for axis in axes}}


def _grid_round(spec: ExperimentSpec, layout: ExperimentLayout, cells: list[Cell], summary: RunSummary,
                echo: Callable[[str], None]) -> None:
    weights = prepare_pipeline_weights(spec, layout, cells, echo)
    jobs = {job.cell_id: job for job in cell_jobs(cells, layout, weights)}
    trainable = tune.with_parameters(_grid_trial, jobs=jobs, resources=spec.resources)
    trainable = tune.with_resources(trainable, _trial_resources(spec))
    by_id = {c.cell_id: c for c in cells}
    progress = SweepProgress(len(cells), lambda cfg: by_id[cfg["cell_id"]].label, _PROGRESS_METRIC, "max",
                             echo, spec.name)
    tuner = tune.Tuner(
        trainable,
        param_space=grid_param_space(cells),
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent_cells, reuse_actors=True,
                                    scheduler=scheduler_of(spec, max(_epochs(c.config) for c in cells))),
        run_config=_run_config(spec, layout, [progress]),
    )
    grid = tuner.fit()
    stopped = _land_stopped(spec, grid, lambda cfg: jobs.get(cfg.get("cell_id")), summary, echo)
    _record_failures(spec, layout, grid, lambda cfg: by_id.get(cfg.get("cell_id")), summary, echo, stopped)


def run_sweep(spec: ExperimentSpec, results: str | ExperimentLayout, *, echo: Callable[[str], None] = echo_line,
              start_ray: Callable[[], None] | None = None, cells: list[Cell] | None = None) -> RunSummary:
    """Run the missing cells of a grid or search spec as a Ray Tune sweep; return the summary.

    Args:
        results: a results location or an :class:`orchestrator.results.layout.ExperimentLayout`.
        start_ray: called once, before the first trial, when there is work: joins or starts Ray and runs
            the preflight checks (:func:`orchestrator.engine.plain.start_ray_for`, which
            :func:`orchestrator.engine.plain.run_experiment` passes). None: Ray must be initialised already.
        cells: the spec's expanded cells when the caller has them (the first round's; later rounds, with
            found densities, expand again).

    Raises:
        RuntimeError: if the spec asks for GPUs the cluster lacks (before any work starts), or if Ray is not
            initialised and no ``start_ray`` is given.
        SpecError: if a search varies the backbone or pretraining of a ``weights: pipeline`` spec.
    """
    _quiet_tune()
    layout = ExperimentLayout.of(results, spec.name)

    def ready() -> None:
        if start_ray is not None:
            start_ray()
        elif not ray.is_initialized():
            raise RuntimeError("run_sweep needs Ray: pass start_ray (orchestrator.engine.plain.start_ray_for) or call "
                               "ray.init first")

    if spec.search is not None and spec.search.space:
        return _run_search(spec, layout, ready=ready, echo=echo)
    summary = RunSummary(total=0, skipped=0, ran=0, failed={})
    densities: dict[str, float] | None = None
    seen: set[str] = set()
    first = True
    while True:
        cells = expand_cells(spec, densities) if cells is None or densities is not None else cells
        waiting = pending_references(spec, densities)
        done = completed_cells(layout, spec.name)
        todo = [c for c in cells if c.cell_id not in done and c.cell_id not in summary["failed"]]
        summary["skipped"] += sum(c.cell_id in done for c in cells if c.cell_id not in seen)
        seen.update(c.cell_id for c in cells)
        if first:
            echo(f"sweep {spec.name}: {len(cells)} cell{'' if len(cells) == 1 else 's'}" + (f" (+ top-k cells at found densities, after their "
                 f"{len(waiting)} threshold cells)" if waiting else "") +
                 f", {summary['skipped']} already in the ledger, {len(todo)} to run now")
            first = False
        if todo:
            ready()
            _grid_round(spec, layout, todo, summary, echo)
        if not waiting:
            break
        densities, missing = landed_references(layout, spec.name, waiting, summary)
        if missing:
            echo(f"  {len(missing)} threshold cell(s) did not land; their top-k cells at the found density are skipped")
            if missing == waiting:
                break
    summary["total"] = len(cells) + len(pending_references(spec, densities))
    return summary


def _search_space(spec: ExperimentSpec) -> dict[str, Any]:
    out = {}
    for key, axis in spec.search.space.items():
        if axis.type == "uniform":
            out[key] = tune.uniform(axis.low, axis.high)
        elif axis.type == "loguniform":
            out[key] = tune.loguniform(axis.low, axis.high)
        elif axis.type == "int":
            out[key] = tune.randint(int(axis.low), int(axis.high) + 1)
        else:
            out[key] = tune.choice(axis.values)
    return out


def _run_search(spec: ExperimentSpec, layout: ExperimentLayout, *, ready: Callable[[], None],
                echo: Callable[[str], None]) -> RunSummary:
    from ray.tune.search.optuna import OptunaSearch

    s = spec.search
    keys = list(s.space)
    base = search_cell(spec, {})
    if base.config.backbone.weights == "pipeline" and any(k.startswith(("backbone.", "pretrain.")) for k in keys):
        raise SpecError("a search over backbone.* or pretrain.* keys needs backbone.weights other than 'pipeline'")
    completed_cells(layout, spec.name)  # a clear StorageUnreachable when the ledger cannot be read
    df = ledger.read_ledger(layout.results, spec.name)
    points, rewards = [], []
    for cid, rows in df.groupby("cell_id"):
        grid = json.loads(rows["grid_json"].iloc[0])
        values = dict(zip(rows["metric"], rows["value"]))
        if set(grid) == set(keys) and s.metric in values:
            points.append(grid)
            rewards.append(float(values[s.metric]))
    remaining = s.num_samples - len(points)
    summary = RunSummary(total=s.num_samples, skipped=len(points), ran=0, failed={})
    echo(f"search {spec.name}: Optuna TPE over {', '.join(keys)} for {s.mode} {s.metric}, budget {s.num_samples} "
         f"trials, {len(points)} already in the ledger, {remaining} to run")
    if remaining <= 0:
        return summary
    ready()
    weights = prepare_pipeline_weights(spec, layout, [base], echo)
    # the sampler's seed moves on with the trials already done: the same seed would propose the same
    # first random points again, which the ledger already holds
    searcher = OptunaSearch(metric=s.metric, mode=s.mode, seed=s.seed + len(points),
                            points_to_evaluate=points or None, evaluated_rewards=rewards or None)
    trainable = tune.with_parameters(_search_trial, spec=spec, space=keys, layout=layout, resources=spec.resources,
                                     pipeline_weights=weights.get(base.cell_id))
    trainable = tune.with_resources(trainable, _trial_resources(spec))

    def cell_of(cfg: dict) -> Cell | None:
        try:
            return search_cell(spec, {k: cfg[k] for k in keys})
        except (KeyError, SpecError):
            return None

    progress = SweepProgress(remaining, lambda cfg: (c.label if (c := cell_of(cfg)) else str(cfg)), s.metric, s.mode,
                             echo, spec.name)
    tuner = tune.Tuner(
        trainable, param_space=_search_space(spec),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining, scheduler=scheduler_of(spec, _epochs(
                                        base.config)), max_concurrent_trials=spec.resources.max_concurrent_cells,
                                    reuse_actors=True),
        run_config=_run_config(spec, layout, [progress]),
    )
    grid = tuner.fit()

    def job_of(cfg: dict) -> CellJob | None:
        cell = cell_of(cfg)
        return None if cell is None else CellJob(cell.config, cell.cell_id, cell.label, dict(cell.grid_values), layout)

    stopped = _land_stopped(spec, grid, job_of, summary, echo)
    _record_failures(spec, layout, grid, cell_of, summary, echo, stopped)
    return summary
