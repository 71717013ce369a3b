"""The model cascade on Ray (paper Sec. 3.4, Table 3, App. G): one command, four stages.

1. **Dispatcher.** Every ``smn`` cell of the spec is a dispatcher. It comes from the ledger when it
   is there; otherwise :func:`orchestrator.engine.plain.run_experiment` trains it (with the spec's other
   cells). Its final trainable state (``states/<cell_id>/``) is what the experts start from.
2. **Router** (a :class:`RouterStage` job per dispatcher, run as a Ray task): embeds the train and test
   splits with the dispatcher, fits :func:`smn_core.cascade.fit_router` (L2 norm, PCA, seeded Gaussian mixture), routes both
   splits and records cluster sizes and homogeneity (App. G, Fig. 11).
3. **Experts** (the actor graph): an expert is a cell like any other, whose config is the dispatcher's
   with the expert's epoch budget, and whose :class:`ExpertStage` gives it its start (the dispatcher's
   final state) and its cluster's routes. The engine runs them (:func:`orchestrator.engine.cell.run_job`)
   on a :class:`orchestrator.engine.pool.WarmPool` of ``cascade.experts.max_concurrent`` warm workers
   (default: one per expert, as many as the cluster's resources hold; ``cascade.experts.resources``:
   e.g. one GPU each; ``workers > 1`` makes the worker drive the engine's DDP ``TorchTrainer``). The
   workers import torch and ``smn_core`` once, before the stage's clock starts, and then take expert
   after expert. Each expert starts from the dispatcher's scores, head and prototypes, trains on its
   cluster only with the same loss for ``round(N / D_k x E)`` epochs (queue after the first fifth),
   checkpoints every epoch to ``<results>/<experiment>/checkpoints/<expert cell_id>/``, then embeds
   both splits.
4. **Combination** (a :class:`CombinationStage` job per dispatcher and mode, run as a Ray task):
   conditional and unconditional cascade embeddings, centred and projected back to the dispatcher's
   dimension (whitened by default), evaluated with the spec's k-NN and linear probe.

Every stage is a :class:`orchestrator.engine.cell.CellJob` and lands through
:func:`orchestrator.engine.cell.land`; a stage that fails leaves a failure record (``failures/<cell_id>.json``,
shown by ``smn ls``) like any cell. Ledger (one cell each): ``cascade_router``,
``cascade_expert`` (one per expert, grid ``{"expert": k}``), ``cascade_conditional``,
``cascade_unconditional``; the dispatcher is its own ``smn`` row. Each cascade cell id hashes its
inputs (dispatcher cell id, router settings, expert index, ...), so running the same command again
skips every finished stage and resumes an interrupted expert from its last epoch.

Fault tolerance: the pool's workers are actors created with ``max_restarts=-1`` (default;
``cascade.experts.max_restarts``) and ``max_task_retries=-1``. When a worker's process or its node
dies, Ray restarts that actor (elsewhere if needed) and replays its pending expert, which resumes from
the expert's last checkpoint on the results storage; the other experts are not touched. Application
errors (a bug, a bad config), and a worker lost for good, are not retried: they fail that expert only,
are reported and recorded, and the next run resumes the expert from its last epoch checkpoint. Each
epoch checkpoint records the node and process it was written in (``node_id``, ``pid`` in its meta).

Files (``<results>/<experiment>/``): ``cascade/<router id>/router.safetensors`` (PCA and mixture
parameters), ``cascade/<router id>/routes.safetensors`` (dispatcher embeddings, labels, routes),
``cascade/<expert id>/embeddings.safetensors``, ``masks/<expert id>.safetensors``,
``states/<expert id>/``. As for the runner, results may be a local or shared (NFS) folder or a
``pyarrow.fs`` URI (``s3://bucket/prefix``): every location comes from one
:class:`orchestrator.results.layout.ExperimentLayout` and every file goes through :mod:`smn_core.checkpoint`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import ray

from smn_core.checkpoint import has_checkpoint, load_checkpoint, load_tensors, location_exists, save_tensors
from smn_core.config import CellConfig

from orchestrator import echo as echo_line
from orchestrator.engine.cell import (CellJob, Failure, Record, Stage, TrainingStage, TrainInputs, land, run_job,
                                      run_local)
from orchestrator.engine.plain import ensure_ray, run_experiment
from orchestrator.engine.pool import WarmPool, pool_size, run_bounded
from orchestrator.engine.session import check_cluster_fits, error_cause
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout, pretrain_artifact_path
from orchestrator.spec.cascade import CascadeSpec, RouterSpec, cascade_spec
from orchestrator.spec.experiment import Cell, ExperimentSpec, config_hash, expand_cells

__all__ = ["CascadePlan", "plan_cascades", "RouterStage", "ExpertStage", "CombinationStage", "run_cascade",
           "CascadeSummary", "CASCADE_METHODS"]

CASCADE_METHODS = ("cascade_router", "cascade_expert", "cascade_conditional", "cascade_unconditional")


# ---------------------------------------------------------------------------------------------
# plan: ids of every cascade cell
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CascadePlan:
    """The cell ids of one dispatcher's cascade (computable before anything runs): the dispatcher
    cell, the router's id, one id per expert (index = cluster) and one per combination mode."""

    dispatcher: Cell
    router_id: str
    expert_ids: list[str]
    combination_ids: dict[str, str]


def plan_cascades(spec: ExperimentSpec, cs: CascadeSpec, cells: list[Cell] | None = None) -> list[CascadePlan]:
    """One :class:`CascadePlan` per ``smn`` cell of ``spec`` (the dispatchers), in cell order (``cells``: the
    spec's expanded cells, when the caller has them already). Every id is
    :func:`orchestrator.spec.experiment.config_hash` of the stage's inputs."""
    plans = []
    expert_key = cs.experts.model_dump(include={"epochs", "queue_start_fraction"})
    for cell in (expand_cells(spec) if cells is None else cells):
        if cell.config.method != "smn":
            continue
        router_id = config_hash({"role": "router", "dispatcher": cell.cell_id, "router": cs.router.model_dump()})
        experts = [config_hash({"role": "expert", "router": router_id, "expert": k, "experts": expert_key})
                   for k in range(cs.router.clusters)]
        combos = {m: config_hash({"role": m, "experts": experts,
                                  "combination": cs.combination.model_dump(include={"scaling", "dim"})})
                  for m in cs.combination.modes}
        plans.append(CascadePlan(dispatcher=cell, router_id=router_id, expert_ids=experts, combination_ids=combos))
    return plans


@dataclass(frozen=True)
class _Dispatcher:
    """What every stage of one dispatcher's cascade reads: its plan, final state, pretrained backbone
    (``weights: pipeline``) and the router's routes file."""

    plan: CascadePlan
    layout: ExperimentLayout
    state: str
    pipeline_weights: str | None
    routes: str

    def job(self, cell_id: str, label: str, stage, record: Record, *, config: CellConfig | None = None,
            grid: dict | None = None) -> CellJob:
        """A :class:`CellJob` of this cascade (config: the dispatcher's unless given)."""
        cell = self.plan.dispatcher
        return CellJob(config or cell.config, cell_id, label, dict(cell.grid_values) if grid is None else grid,
                       self.layout, self.pipeline_weights, stage, record)


def _embed_splits(cfg: CellConfig, state: dict, pipeline_weights: str | None, device: str):
    """``(train_ds, test_ds, (train embeddings (N, F), labels (N,)), (test embeddings, labels))``: the cell's
    data and its embeddings under the adapted backbone restored from ``state`` (a dispatcher's or an
    expert's final trainable state)."""
    from smn_core.cascade import embed_dataset, restore_adapted_backbone
    from smn_core.pipeline import load_cell_data

    model, bb = restore_adapted_backbone(cfg, state, pipeline_weights=pipeline_weights, device=device)
    train_ds, test_ds = load_cell_data(cfg.dataset)
    size = cfg.dataset.image_size or bb.input_size
    emb = dict(image_size=size, mean=bb.mean, std=bb.std, batch_size=cfg.eval.batch_size, device=device)
    return train_ds, test_ds, embed_dataset(model, train_ds, **emb), embed_dataset(model, test_ds, **emb)


# ---------------------------------------------------------------------------------------------
# stage 2: router
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterStage(Stage):
    """Embed both splits with the dispatcher, fit the router (L2 norm, PCA, Gaussian mixture), route both
    splits and record cluster sizes and homogeneity (paper App. G, Fig. 11).

    Attributes:
        settings: the ``cascade.router`` section.
        dispatcher_state: the dispatcher's final state folder; dispatcher_id: its cell id.
        routes: where the routes file goes (``cascade/<router id>/routes.safetensors``).
    """

    settings: RouterSpec
    dispatcher_state: str
    dispatcher_id: str
    routes: str

    def run(self, job: CellJob, device: str) -> dict[str, float]:
        """Fit and apply the router; write ``router.safetensors`` and the routes file. Returns the metrics
        (``clusters``, ``pca_explained_variance``, ``cluster<k>_train_size``, ``cluster<k>_top<x>``, ...)."""
        import torch

        from smn_core.cascade import cluster_homogeneity, cluster_sizes, fit_router

        cfg, r = job.config, self.settings
        state, _ = load_checkpoint(self.dispatcher_state)
        train_ds, test_ds, (xtr, ytr), (xte, yte) = _embed_splits(cfg, state, job.pipeline_weights, device)
        router = fit_router(xtr, components=r.components, clusters=r.clusters, seed=r.seed,
                            covariance_type=r.covariance_type, reg_covar=r.reg_covar, n_init=r.n_init)
        rtr, rte = router.route(xtr), router.route(xte)
        save_tensors(job.layout.cascade(job.cell_id, "router.safetensors"),
                     router.to_tensors(), metadata={"router_id": job.cell_id})
        save_tensors(self.routes, {
            "train_embeddings": xtr, "test_embeddings": xte, "train_labels": ytr, "test_labels": yte,
            "train_routes": torch.from_numpy(rtr), "test_routes": torch.from_numpy(rte)},
            metadata={"router_id": job.cell_id, "dispatcher": self.dispatcher_id})
        k = router.clusters
        sizes_tr, sizes_te = cluster_sizes(rtr, k), cluster_sizes(rte, k)
        homog = cluster_homogeneity(rtr, ytr.numpy(), k, num_classes=len(train_ds.class_names))
        metrics: dict[str, float] = {
            "clusters": float(k), "pca_components": float(r.components),
            "pca_explained_variance": float(router.explained_variance_ratio.sum()),
            "gmm_converged": float(bool(router.gmm.converged_)), "feature_dim": float(xtr.shape[1]),
            "num_train": float(len(train_ds)), "num_test": float(len(test_ds)),
        }
        for c in range(k):
            metrics[f"cluster{c}_train_size"] = float(sizes_tr[c])
            metrics[f"cluster{c}_test_size"] = float(sizes_te[c])
            for x in range(homog.shape[1]):
                metrics[f"cluster{c}_top{x + 1}"] = float(homog[c, x])
        return metrics


def _router_job(d: _Dispatcher, cs: CascadeSpec) -> CellJob:
    p = d.plan
    stage = RouterStage(cs.router, d.state, p.dispatcher.cell_id, d.routes)
    record = Record.of(p.dispatcher.config, method="cascade_router", record={
        "role": "router", "dispatcher_cell_id": p.dispatcher.cell_id, "router": cs.router.model_dump(),
        "dispatcher": p.dispatcher.config.to_dict()})
    return d.job(p.router_id, "router", stage, record)


# ---------------------------------------------------------------------------------------------
# stage 3: experts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertStage(TrainingStage):
    """A cascade expert (paper Sec. 3.4): its cell trains from the dispatcher's final state on its cluster
    only, without evaluation; after training it embeds both splits (``cascade/<expert id>/embeddings``).

    Attributes:
        expert: the cluster index k.
        routes: the router's routes file; dispatcher_state: the dispatcher's final state folder.
    """

    expert: int
    routes: str
    dispatcher_state: str

    def indices(self) -> np.ndarray:
        """Indices (into the train split) of the images routed to this expert."""
        routes = load_tensors(self.routes)["train_routes"].numpy()
        return np.flatnonzero(routes == self.expert).astype(np.int64)

    def inputs(self, job: CellJob) -> TrainInputs:
        """The dispatcher's state, this expert's cluster, no evaluation.

        Raises:
            ValueError: if the expert's cluster is smaller than one batch.
        """
        indices = self.indices()
        if len(indices) < job.config.train.batch_size:
            raise ValueError(f"expert {self.expert}'s cluster holds {len(indices)} train images, fewer than one "
                             f"batch of {job.config.train.batch_size}; use fewer cascade.router.clusters or a "
                             "smaller train.batch_size")
        return TrainInputs(init_state=load_checkpoint(self.dispatcher_state)[0], train_subset=indices,
                           evaluate=False)

    def finish(self, job: CellJob, outcome, device: str) -> dict[str, float]:
        """Embed both splits with the trained expert; return ``expert``, ``cluster_size`` and ``epochs``."""
        _, _, (xtr, _), (xte, _) = _embed_splits(job.config, outcome.state, job.pipeline_weights, device)
        save_tensors(job.layout.cascade(job.cell_id, "embeddings.safetensors"),
                     {"train_embeddings": xtr, "test_embeddings": xte}, metadata={"cell_id": job.cell_id})
        return {"expert": float(self.expert), "cluster_size": float(len(self.indices())),
                "epochs": float(job.config.train.epochs)}


def _expert_config(cfg: CellConfig, epochs: int, queue_start_fraction: float) -> CellConfig:
    train = replace(cfg.train, epochs=int(epochs), warmup_epochs=min(cfg.train.warmup_epochs, float(epochs)),
                    swav=replace(cfg.train.swav, queue_start_fraction=float(queue_start_fraction)))
    return replace(cfg, train=train)


def _expert_jobs(d: _Dispatcher, cs: CascadeSpec, done: set[str], summary: "CascadeSummary") -> list[CellJob]:
    """The :class:`CellJob` of every expert of ``d`` that has not landed (counted as skipped otherwise).

    Raises:
        RuntimeError: if a cluster holds fewer images than one batch.
    """
    from smn_core.cascade import expert_epochs

    p, cfg = d.plan, d.plan.dispatcher.config
    routes = load_tensors(d.routes)["train_routes"].numpy()
    sizes = np.bincount(routes, minlength=cs.router.clusters)
    small = [(k, int(s)) for k, s in enumerate(sizes) if s < cfg.train.batch_size]
    if small:
        raise RuntimeError(f"router {p.router_id}: cluster(s) {small} (expert, train images) hold fewer images than "
                           f"one batch of {cfg.train.batch_size}; use fewer cascade.router.clusters or a smaller "
                           "train.batch_size")
    jobs = []
    for k, eid in enumerate(p.expert_ids):
        if eid in done and location_exists(d.layout.cascade(eid, "embeddings.safetensors")):
            summary["experts"]["skipped"] += 1
            continue
        epochs = cs.experts.epochs or expert_epochs(len(routes), int(sizes[k]), cfg.train.epochs)
        ecfg = _expert_config(cfg, epochs, cs.experts.queue_start_fraction)
        record = Record.of(ecfg, method="cascade_expert", record={
            "role": "expert", "expert": k, "dispatcher_cell_id": p.dispatcher.cell_id,
            "router_cell_id": p.router_id, "cell": ecfg.to_dict()})
        jobs.append(d.job(eid, f"expert {k} ({int(sizes[k])} images, {epochs} epochs)",
                          ExpertStage(k, d.routes, d.state), record, config=ecfg,
                          grid={**p.dispatcher.grid_values, "expert": k}))
    return jobs


# ---------------------------------------------------------------------------------------------
# stage 4: combination
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CombinationStage(Stage):
    """One cascade embedding of one dispatcher (paper Sec. 3.4, Table 3): conditional or unconditional,
    centred and projected back to the dispatcher's dimension, evaluated with the spec's k-NN and linear
    probe, next to the dispatcher alone and the dispatcher projected alike (the control).

    Attributes:
        mode: ``conditional`` or ``unconditional``; scaling, dim: the projection's (``cascade.combination``).
        routes: the router's routes file; expert_ids: the experts' cell ids, by cluster.
        dispatcher_storage_bits, backbone_params: the dispatcher's, from its ledger cell.
        expert_stage_wall_s, expert_sum_wall_s: the expert stage's wall time and the experts' summed wall times.
    """

    mode: str
    routes: str
    expert_ids: tuple[str, ...]
    scaling: str
    dim: int | None
    dispatcher_storage_bits: float
    backbone_params: float
    expert_stage_wall_s: float
    expert_sum_wall_s: float

    def run(self, job: CellJob, device: str) -> dict[str, float]:
        """Build, project and evaluate this cascade; returns its metrics (``knn_top1``,
        ``linear_probe_top1``, ``dispatcher_*``, ``storage_bits``, ``forward_passes``, ...)."""
        from smn_core.cascade import (cascade_embedding, cascade_storage_bits, combine_cascade, fit_projection,
                                      forward_passes)

        routes = load_tensors(self.routes)
        d_tr, d_te = routes["train_embeddings"], routes["test_embeddings"]
        e = [load_tensors(job.layout.cascade(eid, "embeddings.safetensors")) for eid in self.expert_ids]
        e_tr, e_te = [t["train_embeddings"] for t in e], [t["test_embeddings"] for t in e]
        k = len(self.expert_ids)
        evaluate = self._evaluator(job.config.eval, routes["train_labels"], routes["test_labels"])
        base = evaluate(d_tr, d_te)
        # control: the dispatcher alone, centred, projected and scaled the same way (whitening by itself
        # changes k-NN accuracy; this separates its effect from the experts')
        alone = fit_projection(d_tr, d_tr.shape[1] if self.dim is None else min(self.dim, d_tr.shape[1]), self.scaling)
        control = evaluate(alone.transform(d_tr), alone.transform(d_te))
        xtr, xte, proj = combine_cascade(d_tr, e_tr, d_te, e_te, mode=self.mode, routes_train=routes["train_routes"],
                                         routes_test=routes["test_routes"], scaling=self.scaling, dim=self.dim)
        metrics = evaluate(xtr, xte)
        concat = cascade_embedding(d_tr, e_tr, self.mode, routes["train_routes"]).numpy().astype(np.float64)
        total_var = float(concat.var(axis=0, ddof=1).sum())
        bits = cascade_storage_bits(self.dispatcher_storage_bits, k, self.mode)
        params = self.backbone_params
        metrics.update({
            "dispatcher_knn_top1": base["knn_top1"], "dispatcher_linear_probe_top1": base["linear_probe_top1"],
            "dispatcher_projected_knn_top1": control["knn_top1"],
            "dispatcher_projected_linear_probe_top1": control["linear_probe_top1"],
            "embedding_dim": float(xtr.shape[1]), "concat_dim": float(proj.mean.shape[0]),
            "clusters": float(k), "forward_passes": float(forward_passes(self.mode, k)),
            "storage_bits": bits, "storage_masks": float(k + 1), "backbone_params": params,
            "storage_beta": bits / (32.0 * params) if params else float("nan"),
            "projection_eigenvalue_sum": float(proj.eigenvalues.sum()),
            "expert_stage_wall_s": self.expert_stage_wall_s, "expert_sum_wall_s": self.expert_sum_wall_s,
        })
        metrics["projection_variance_kept"] = float(proj.eigenvalues.sum()) / total_var if total_var else float("nan")
        return metrics

    @staticmethod
    def _evaluator(ev, ytr, yte) -> Callable:
        from smn_core.evaluation import knn_top1, linear_probe

        num_classes = int(max(int(ytr.max()), int(yte.max())) + 1)

        def evaluate(xtr, xte) -> dict[str, float]:
            knn = knn_top1(xtr, ytr, xte, yte, k=ev.knn_k, temperature=ev.knn_temperature, num_classes=num_classes)
            probe = linear_probe(xtr, ytr, xte, yte, **ev.probe_kwargs())
            return {"knn_top1": knn, "linear_probe_top1": probe.top1, "linear_probe_train_top1": probe.train_top1,
                    "linear_probe_C": probe.C}

        return evaluate


def _combination_jobs(d: _Dispatcher, cs: CascadeSpec, todo: dict[str, str], df) -> list[CellJob]:
    """One :class:`CellJob` per combination mode in ``todo`` (``{mode: cell id}``) of dispatcher ``d``
    (``df``: the ledger, for the dispatcher's storage and the experts' times)."""
    p = d.plan
    facts = ledger.read_cell(d.layout, p.dispatcher.cell_id) or {}
    stage_wall, expert_sum = _expert_times(df, p.expert_ids)
    jobs = []
    for mode, cid in todo.items():
        stage = CombinationStage(mode, d.routes, tuple(p.expert_ids), cs.combination.scaling, cs.combination.dim,
                                 facts.get("storage_bits", facts.get("mask_bits", float("nan"))),
                                 facts.get("backbone_params", float("nan")), stage_wall, expert_sum)
        record = Record.of(p.dispatcher.config, method=f"cascade_{mode}", record={
            "role": mode, "dispatcher_cell_id": p.dispatcher.cell_id, "router_cell_id": p.router_id,
            "expert_cell_ids": p.expert_ids, "scaling": cs.combination.scaling, "dim": cs.combination.dim,
            "eval": p.dispatcher.config.to_dict()["eval"]})
        jobs.append(d.job(cid, f"cascade {mode}", stage, record))
    return jobs


def _expert_times(df, expert_ids: list[str]) -> tuple[float, float]:
    """(stage wall = last finish - first start, sum of the experts' own wall times) from ledger rows."""
    rows = df[df["cell_id"].isin(expert_ids)].drop_duplicates("cell_id")
    if rows.empty:
        return float("nan"), float("nan")
    start, end = rows["started_at"].min(), rows["finished_at"].max()
    total = float((rows["finished_at"] - rows["started_at"]).dt.total_seconds().sum())
    return float((end - start).total_seconds()), total


# ---------------------------------------------------------------------------------------------
# the driver: one function per stage
# ---------------------------------------------------------------------------------------------


class CascadeSummary(dict):
    """What :func:`run_cascade` did: ``dispatchers``, per stage ``{"ran", "skipped"}`` (``router``,
    ``experts``, ``combinations``), ``failed`` ``{cell_id: error}``, ``expert_stage_s`` (driver wall
    time of the expert stage in this call, seconds) and ``expert_sum_s`` (sum of the experts' own wall
    times of this call), ``expert_warmup_s`` (seconds the expert workers took to start and import, before
    the stage's clock starts)."""


_local_task = ray.remote(run_local)  # a router or combination job as a Ray task


def _attempts(exc: BaseException, retries: int) -> int:
    # Ray retries a task after a system failure (a lost worker), never after an application error
    return 1 if isinstance(exc, ray.exceptions.RayTaskError) else retries + 1


def _fail(job: CellJob, exc: BaseException, attempts: int, summary: CascadeSummary) -> str:
    """Record a failed stage (``summary["failed"]`` and its failure record); returns the error text."""
    error = f"{type(exc).__name__}: {exc}"
    summary["failed"][job.cell_id] = error
    land(job, Failure(error, attempts), None)
    return error


def _dispatchers(spec: ExperimentSpec, plans: list[CascadePlan], lay: ExperimentLayout, cells: list[Cell],
                 address: str | None, echo: Callable[[str], None]) -> list[_Dispatcher]:
    """Stage 1: train the dispatchers the ledger lacks (:func:`orchestrator.engine.plain.run_experiment`).

    Raises:
        RuntimeError: a dispatcher failed, or its final state is missing.
    """
    run = run_experiment(spec, lay, address=address, echo=echo, cells=cells)
    bad = {p.dispatcher.cell_id: run["failed"][p.dispatcher.cell_id] for p in plans
           if p.dispatcher.cell_id in run["failed"]}
    if bad:
        raise RuntimeError(f"dispatcher cell(s) failed, no cascade can start: {bad}")
    ensure_ray(address)
    out = []
    for p in plans:
        cell = p.dispatcher
        state_dir = lay.state(cell.cell_id)
        if not has_checkpoint(state_dir):
            raise RuntimeError(f"dispatcher {cell.cell_id} ({cell.label}) is in the ledger but its final state "
                               f"{state_dir} is missing (written by runs since the cascade was added); move its "
                               f"ledger file {cell.cell_id}.parquet aside to train it again")
        weights = (pretrain_artifact_path(lay, spec.name, cell.config)
                   if cell.config.backbone.weights == "pipeline" else None)
        out.append(_Dispatcher(p, lay, state_dir, weights, lay.cascade(p.router_id, "routes.safetensors")))
    return out


def _routers(ds: list[_Dispatcher], cs: CascadeSpec, res, done: set[str], summary: CascadeSummary,
             echo: Callable[[str], None]) -> None:
    """Stage 2: fit and apply the routers the ledger lacks, one Ray task each.

    Raises:
        RuntimeError: a router failed (after its failure record is written).
    """
    refs: list[tuple[CellJob, ray.ObjectRef]] = []
    for d in ds:
        p = d.plan
        if p.router_id in done and location_exists(d.routes):
            summary["router"]["skipped"] += 1
            continue
        echo(f"router {p.router_id}: embedding with dispatcher {p.dispatcher.cell_id} and fitting "
             f"PCA({cs.router.components}) + GMM({cs.router.clusters}, seed {cs.router.seed})")
        job = _router_job(d, cs)
        refs.append((job, _local_task.options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
                                              max_retries=res.max_retries).remote(job)))
    for job, ref in refs:
        try:
            m = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - recorded and reported with the router's id
            _fail(job, exc, _attempts(exc, res.max_retries), summary)
            raise RuntimeError(f"router {job.cell_id} failed: {exc}") from exc
        summary["router"]["ran"] += 1
        sizes = [int(m[f"cluster{c}_train_size"]) for c in range(int(m["clusters"]))]
        echo(f"router {job.cell_id}: train cluster sizes {sizes}, PCA keeps {m['pca_explained_variance']:.2f} "
             "of the variance")


def _expert_line(job: CellJob, m: dict[str, float]) -> str:
    return (f"[{job.prefix}] done in {m['wall_s']:.0f}s: loss {m.get('train_loss', float('nan')):.4f}, "
            f"density {m.get('density', float('nan')):.3f}"
            + (f", resumed at epoch {int(m['resumed_from_epoch']) + 1}" if m.get("resumed_from_epoch") else "")
            + (" (warning: SwAV collapse detected: loss near ln K or assignment entropy near 0)"
               if m.get("collapsed") else ""))


def _experts(ds: list[_Dispatcher], cs: CascadeSpec, eres, done: set[str], summary: CascadeSummary,
             echo: Callable[[str], None]) -> None:
    """Stage 3: train the experts the ledger lacks on a warm pool; a failed expert is recorded and reported,
    the others go on."""
    jobs = [job for d in ds for job in _expert_jobs(d, cs, done, summary)]
    if not jobs:
        return
    ddp = eres.workers > 1  # the worker only drives a TorchTrainer, whose workers ask for the real resources
    cpus, gpus_each = (0, 0) if ddp else (eres.cpus_per_worker, eres.gpus_per_worker)
    want = min(cs.experts.max_concurrent or len(jobs), len(jobs))
    t_warm = time.time()
    pool = WarmPool(pool_size(want, cpus, gpus_each), num_cpus=cpus, num_gpus=gpus_each,
                    max_restarts=cs.experts.max_restarts)
    echo(f"experts: {len(jobs)} to train ({summary['experts']['skipped']} already in the ledger), "
         f"{len(pool)} at once on warm workers, each {eres.cpus_per_worker} CPU / {eres.gpus_per_worker} GPU"
         + (f" x {eres.workers} DDP workers" if ddp else ""))
    try:
        try:
            pool.wait_warm()
        except Exception as exc:  # noqa: BLE001 - a worker lost while warming is restarted by Ray; go on
            echo(f"  an expert worker failed while warming up ({exc}); it is restarted by Ray")
        summary["expert_warmup_s"] = time.time() - t_warm
        t_stage = time.time()
        # a worker with nothing left to do is ended at once: a worker restarted after a node loss may need
        # its resources
        for job, m, exc in run_bounded(jobs, lambda j, slot: pool.submit(slot, run_job, j, eres), len(pool),
                                       on_error=pool.heal, on_idle=pool.release):
            if exc is not None:  # one failed expert must not stop the others
                _fail(job, exc, 1, summary)
                echo(f"[{job.prefix}] FAILED: {error_cause(exc)}")
                continue
            summary["experts"]["ran"] += 1
            summary["expert_sum_s"] += m["wall_s"]
            echo(_expert_line(job, m))
        summary["expert_stage_s"] = time.time() - t_stage
    finally:
        pool.shutdown()


def _combinations(ds: list[_Dispatcher], cs: CascadeSpec, res, summary: CascadeSummary,
                  echo: Callable[[str], None]) -> None:
    """Stage 4: the combinations the ledger lacks, of every dispatcher whose experts all landed; one Ray
    task per combination."""
    df = ledger.read_ledger(ds[0].layout.results, ds[0].layout.experiment) if ds else None
    done = set(df["cell_id"].unique()) if df is not None else set()
    refs: list[tuple[CellJob, ray.ObjectRef]] = []
    for d in ds:
        p = d.plan
        todo = {m: cid for m, cid in p.combination_ids.items() if cid not in done}
        summary["combinations"]["skipped"] += len(p.combination_ids) - len(todo)
        if not todo:
            continue
        if any(eid not in done for eid in p.expert_ids):
            echo(f"dispatcher {p.dispatcher.cell_id}: not every expert finished; no combination")
            continue
        for job in _combination_jobs(d, cs, todo, df):
            task = _local_task.options(num_cpus=res.cpus_per_worker, max_retries=res.max_retries)
            refs.append((job, task.remote(job)))
    for job, ref in refs:
        try:
            m = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - recorded and reported; the other combinations go on
            _fail(job, exc, _attempts(exc, res.max_retries), summary)
            echo(f"{job.label} ({job.cell_id}) FAILED: {error_cause(exc)}")
            continue
        summary["combinations"]["ran"] += 1
        echo(f"{job.label}: k-NN {m['knn_top1']:.3f} (dispatcher {m['dispatcher_knn_top1']:.3f}, projected "
             f"alike {m['dispatcher_projected_knn_top1']:.3f}), linear probe {m['linear_probe_top1']:.3f} "
             f"(dispatcher {m['dispatcher_linear_probe_top1']:.3f}, projected alike "
             f"{m['dispatcher_projected_linear_probe_top1']:.3f})")


def run_cascade(spec: ExperimentSpec, results: str | ExperimentLayout, *, address: str | None = None,
                echo: Callable[[str], None] = echo_line, cascade: CascadeSpec | None = None,
                connect_timeout_s: float | None = None) -> CascadeSummary:
    """Run the whole cascade of ``spec`` (every stage the ledger does not hold yet): dispatchers, routers,
    experts, combinations.

    Args:
        spec: a validated spec with the ``smn`` method (its ``cascade`` section configures the rest).
        results: results folder (local or shared by every node), ``pyarrow.fs`` URI (``s3://bucket/prefix``)
            or :class:`orchestrator.results.layout.ExperimentLayout`.
        address: Ray cluster to join (default ``$RAY_ADDRESS`` or a local Ray).
        echo: where progress lines go.
        cascade: the validated section (default: :func:`cascade_spec` of ``spec``).
        connect_timeout_s: the deadline on joining ``address`` (:func:`orchestrator.engine.session.join_cluster`;
            default 30 s).

    Returns:
        A :class:`CascadeSummary`. Experts and combinations that fail are listed in ``failed`` (and get a
        failure record); a failed expert's dispatcher gets no combination; the other experts go on.

    Raises:
        SpecError: invalid ``cascade`` section (before any work).
        RuntimeError: a dispatcher failed to train, its final state is missing, or the router failed.
    """
    cs = cascade or cascade_spec(spec)
    cells = expand_cells(spec)  # once per run
    plans = plan_cascades(spec, cs, cells)
    lay = ExperimentLayout.of(results, spec.name)  # absolute: Ray workers may run in another directory
    summary = CascadeSummary(dispatchers=len(plans), router={"ran": 0, "skipped": 0},
                             experts={"ran": 0, "skipped": 0}, combinations={"ran": 0, "skipped": 0},
                             failed={}, expert_stage_s=0.0, expert_sum_s=0.0, expert_warmup_s=0.0)
    eres = cs.experts.resources or spec.resources
    ensure_ray(address, connect_timeout_s=connect_timeout_s)
    check_cluster_fits(eres.cpus_per_worker, eres.gpus_per_worker, eres.workers, what="cascade.experts.resources")
    ds = _dispatchers(spec, plans, lay, cells, address, echo)
    done = ledger.completed_cells(lay.results, spec.name)
    _routers(ds, cs, spec.resources, done, summary, echo)
    _experts(ds, cs, eres, done, summary, echo)
    _combinations(ds, cs, spec.resources, summary, echo)
    return summary
