"""The model cascade on Ray (paper Sec. 3.4, Table 3, App. G): one command, four stages.

1. **Dispatcher.** Every ``smn`` cell of the spec is a dispatcher. It comes from the ledger when it
   is there; otherwise :func:`orchestrator.engine.plain.run_experiment` trains it (with the spec's other
   cells). Its final trainable state (``states/<cell_id>/``) is what the experts start from.
2. **Router** (a Ray task per dispatcher): embeds the train and test splits with the dispatcher,
   fits :func:`smn_core.cascade.fit_router` (L2 norm, PCA, seeded Gaussian mixture), routes both
   splits and records cluster sizes and homogeneity (App. G, Fig. 11).
3. **Experts** (the actor graph): one :class:`ExpertJob` per cluster, run by :func:`train_expert` on a
   :class:`orchestrator.engine.cell.WarmPool` of ``cascade.experts.max_concurrent`` warm workers (default: one
   per expert, as many as the cluster's resources hold; ``cascade.experts.resources``: e.g. one GPU each;
   ``workers > 1`` makes the worker drive a DDP ``TorchTrainer``). The workers import torch and
   ``smn_core`` once, before the stage's clock starts, and then take expert after expert. Each expert
   starts from the dispatcher's scores, head and prototypes, trains on its cluster only with the
   same loss for ``round(N / D_k x E)`` epochs (queue after the first fifth), checkpoints every
   epoch to ``<results>/<experiment>/checkpoints/<expert cell_id>/``, then embeds both splits.
4. **Combination** (a Ray task per dispatcher): conditional and unconditional cascade embeddings,
   centred and projected back to the dispatcher's dimension (whitened by default), evaluated with
   the spec's k-NN and linear probe.

Ledger (one cell each, via :func:`orchestrator.results.ledger.write_cell`): ``cascade_router``,
``cascade_expert`` (one per expert, grid ``{"expert": k}``), ``cascade_conditional``,
``cascade_unconditional``; the dispatcher is its own ``smn`` row. Each cascade cell id hashes its
inputs (dispatcher cell id, router settings, expert index, ...), so running the same command again
skips every finished stage and resumes an interrupted expert from its last epoch.

Fault tolerance: the pool's workers are actors created with ``max_restarts=-1`` (default;
``cascade.experts.max_restarts``) and ``max_task_retries=-1``. When a worker's process or its node
dies, Ray restarts that actor (elsewhere if needed) and replays its pending :func:`train_expert` call,
which resumes from the expert's last checkpoint on the results storage; the other experts are not
touched. Application errors (a bug, a bad config) are not retried: they fail that expert only and
are reported. Each epoch checkpoint records the node it was written on (``node_id`` in its meta).

Files (``<results>/<experiment>/``): ``cascade/<router id>/router.safetensors`` (PCA and mixture
parameters), ``cascade/<router id>/routes.safetensors`` (dispatcher embeddings, labels, routes),
``cascade/<expert id>/embeddings.safetensors``, ``masks/<expert id>.safetensors``,
``states/<expert id>/``. As for the runner, results may be a local or shared (NFS) folder or a
``pyarrow.fs`` URI (``s3://bucket/prefix``): every location comes from one
:class:`orchestrator.results.layout.ExperimentLayout` and every file goes through :mod:`smn_core.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import ray

from smn_core.checkpoint import delete_checkpoint, has_checkpoint, load_checkpoint, load_tensors, location_exists, save_checkpoint, save_tensors
from smn_core.pipeline import CellConfig

from orchestrator.results import ledger
from orchestrator.engine.session import check_cluster_fits, error_cause
from orchestrator.engine.pool import WarmPool, pool_size, run_bounded
from orchestrator.engine.cell import ddp_checkpointing, device, fit_ddp, local_checkpointing, log
from orchestrator.results.layout import ExperimentLayout
from orchestrator.engine.prepare import pretrain_artifact_path
from orchestrator.engine.plain import ensure_ray, run_experiment
from orchestrator.spec.cascade import CascadeSpec, cascade_spec
from orchestrator.spec.experiment import Cell, ExperimentSpec, expand_cells

__all__ = ["CascadePlan", "plan_cascades", "ExpertJob", "train_expert", "run_cascade", "CascadeSummary", "CASCADE_METHODS"]

CASCADE_METHODS = ("cascade_router", "cascade_expert", "cascade_conditional", "cascade_unconditional")


# ---------------------------------------------------------------------------------------------
# plan: ids of every cascade cell
# ---------------------------------------------------------------------------------------------


def _hash(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    spec's expanded cells, when the caller has them already)."""
    plans = []
    expert_key = cs.experts.model_dump(include={"epochs", "queue_start_fraction"})
    for cell in (expand_cells(spec) if cells is None else cells):
        if cell.config.method != "smn":
            continue
        router_id = _hash({"role": "router", "dispatcher": cell.cell_id, "router": cs.router.model_dump()})
        experts = [_hash({"role": "expert", "router": router_id, "expert": k, "experts": expert_key})
                   for k in range(cs.router.clusters)]
        combos = {m: _hash({"role": m, "experts": experts,
                            "combination": cs.combination.model_dump(include={"scaling", "dim"})})
                  for m in cs.combination.modes}
        plans.append(CascadePlan(dispatcher=cell, router_id=router_id, expert_ids=experts, combination_ids=combos))
    return plans


def _expert_config(cfg: CellConfig, epochs: int, queue_start_fraction: float) -> CellConfig:
    train = replace(cfg.train, epochs=int(epochs), warmup_epochs=min(cfg.train.warmup_epochs, float(epochs)),
                    swav=replace(cfg.train.swav, queue_start_fraction=float(queue_start_fraction)))
    return replace(cfg, train=train)


# ---------------------------------------------------------------------------------------------
# stage 2: router
# ---------------------------------------------------------------------------------------------


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


def _router_stage(job: dict) -> dict[str, float]:
    """Embed both splits with the dispatcher, fit the router, route, record (runs as a Ray task)."""
    from smn_core.cascade import cluster_homogeneity, cluster_sizes, fit_router

    started = time.time()
    cfg, lay = job["cell"], job["layout"]
    state, _ = load_checkpoint(job["dispatcher_state"])
    train_ds, test_ds, (xtr, ytr), (xte, yte) = _embed_splits(cfg, state, job["pipeline_weights"], device())
    r = job["router"]
    router = fit_router(xtr, components=r["components"], clusters=r["clusters"], seed=r["seed"],
                        covariance_type=r["covariance_type"], reg_covar=r["reg_covar"], n_init=r["n_init"])
    rtr, rte = router.route(xtr), router.route(xte)
    save_tensors(lay.cascade(job["cell_id"], "router.safetensors"),
                 router.to_tensors(), metadata={"router_id": job["cell_id"]})
    import torch

    save_tensors(job["routes"], {
        "train_embeddings": xtr, "test_embeddings": xte, "train_labels": ytr, "test_labels": yte,
        "train_routes": torch.from_numpy(rtr), "test_routes": torch.from_numpy(rte)},
        metadata={"router_id": job["cell_id"], "dispatcher": job["dispatcher_id"]})
    k = router.clusters
    sizes_tr, sizes_te = cluster_sizes(rtr, k), cluster_sizes(rte, k)
    homog = cluster_homogeneity(rtr, ytr.numpy(), k, num_classes=len(train_ds.class_names))
    metrics: dict[str, float] = {
        "clusters": float(k), "pca_components": float(r["components"]),
        "pca_explained_variance": float(router.explained_variance_ratio.sum()),
        "gmm_converged": float(bool(router.gmm.converged_)), "feature_dim": float(xtr.shape[1]),
        "num_train": float(len(train_ds)), "num_test": float(len(test_ds)),
    }
    for c in range(k):
        metrics[f"cluster{c}_train_size"] = float(sizes_tr[c])
        metrics[f"cluster{c}_test_size"] = float(sizes_te[c])
        for x in range(homog.shape[1]):
            metrics[f"cluster{c}_top{x + 1}"] = float(homog[c, x])
    metrics["wall_s"] = time.time() - started
    ledger.write_cell(lay.results, lay.experiment, cell_id=job["cell_id"], method="cascade_router",
                      backbone=cfg.backbone.arch, dataset=cfg.dataset.source, seed=cfg.seed, grid=job["grid"],
                      config={"role": "router", "dispatcher_cell_id": job["dispatcher_id"], "router": r,
                              "dispatcher": cfg.to_dict()},
                      metrics=metrics, started_at=started, finished_at=time.time())
    return metrics


_router_task = ray.remote(_router_stage)


# ---------------------------------------------------------------------------------------------
# stage 3: experts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertJob:
    """One cascade expert to train (typed payload of :func:`train_expert`).

    Attributes:
        config: the expert's ``CellConfig`` (the dispatcher's, with the expert's epoch budget).
        cell_id: the expert's cell id; label: its log label.
        expert: its cluster index k.
        grid: the dispatcher's grid values (the ledger adds ``expert: k``).
        layout: where the experiment's files live.
        routes: location of the router's routes file; dispatcher_state: the dispatcher's final state folder.
        dispatcher_id, router_id: the cells it derives from.
        pipeline_weights: the pretrained backbone artifact (``weights: pipeline``), or None.
        resources: per expert (``workers > 1``: DDP in a ``TorchTrainer``).
    """

    config: CellConfig
    cell_id: str
    label: str
    expert: int
    grid: dict
    layout: ExperimentLayout
    routes: str
    dispatcher_state: str
    dispatcher_id: str
    router_id: str
    pipeline_weights: str | None
    resources: Resources


def _expert_ddp_loop(config: dict) -> None:
    """Ray Train worker of a DDP expert: the expert's training under DDP; rank 0 saves the final state."""
    import ray.train
    import ray.train.torch

    from smn_core.pipeline import run_cell

    job: ExpertJob = config["job"]
    rank = ray.train.get_context().get_world_rank()
    resume, on_epoch_end = ddp_checkpointing(job.label)
    init_state = load_checkpoint(job.dispatcher_state)[0]
    outcome = run_cell(job.config, pipeline_weights=job.pipeline_weights, device=ray.train.torch.get_device(),
                       resume=resume, init_state=init_state, on_epoch_end=on_epoch_end, evaluate=False,
                       train_subset=config["indices"], progress=log(job.label))
    if rank == 0:
        _save_expert(job, outcome)


def _save_expert(job: ExpertJob, outcome) -> None:
    """Masks and final state (metrics in its meta) of a trained expert, before its ledger rows."""
    cfg, lay = job.config, job.layout
    if outcome.masks is not None:
        save_tensors(lay.mask(job.cell_id), outcome.masks, metadata={"cell_id": job.cell_id, "arch": cfg.backbone.arch})
    metrics = dict(outcome.metrics)
    metrics["resumed_from_epoch"] = float(outcome.train_result.resumed_from_epoch if outcome.train_result else 0)
    save_checkpoint(lay.state(job.cell_id), outcome.state,
                    {"cell_id": job.cell_id, "config": cfg.to_dict(), "metrics": metrics})


def train_expert(job: ExpertJob) -> dict[str, float]:
    """Train one expert (or resume it, or skip training when its final state exists), embed both splits
    with it, and write its ledger cell. Runs on a warm pool worker (:class:`orchestrator.engine.cell.WarmPool`).

    Returns:
        The expert's metrics (``cluster_size``, ``epochs``, ``steps``, ``train_loss``, ``density``,
        ``resumed_from_epoch``, ``wall_s``, ...).

    Raises:
        ValueError: if the expert's cluster is smaller than one batch.
    """
    from smn_core.pipeline import run_cell

    started = time.time()
    cfg, lay = job.config, job.layout
    routes = load_tensors(job.routes)["train_routes"].numpy()
    indices = np.flatnonzero(routes == job.expert).astype(np.int64)
    if len(indices) < cfg.train.batch_size:
        raise ValueError(f"expert {job.expert}'s cluster holds {len(indices)} train images, fewer than one "
                         f"batch of {cfg.train.batch_size}; use fewer cascade.router.clusters or a smaller "
                         "train.batch_size")
    state_dir, ckpt_dir = lay.state(job.cell_id), lay.checkpoint(job.cell_id)
    dev = device()
    if not has_checkpoint(state_dir):
        if job.resources.workers > 1:
            # named after the expert, so a restarted worker resumes the same Ray Train run
            fit_ddp(_expert_ddp_loop, {"job": job, "indices": indices.tolist()}, job.resources, lay,
                    f"expert-{job.cell_id}")
        else:
            node = ray.get_runtime_context().get_node_id()
            resume, on_epoch_end = local_checkpointing(ckpt_dir, job.label, {"node_id": node})
            outcome = run_cell(cfg, pipeline_weights=job.pipeline_weights, device=dev, resume=resume,
                               init_state=load_checkpoint(job.dispatcher_state)[0],
                               on_epoch_end=on_epoch_end, progress=log(job.label), evaluate=False,
                               train_subset=indices)
            _save_expert(job, outcome)
    state, meta = load_checkpoint(state_dir)
    metrics = dict(meta["metrics"])
    _, _, (xtr, _), (xte, _) = _embed_splits(cfg, state, job.pipeline_weights, dev)
    save_tensors(lay.cascade(job.cell_id, "embeddings.safetensors"),
                 {"train_embeddings": xtr, "test_embeddings": xte}, metadata={"cell_id": job.cell_id})
    metrics.update(expert=float(job.expert), cluster_size=float(len(indices)),
                   epochs=float(cfg.train.epochs), wall_s=time.time() - started)
    ledger.write_cell(lay.results, lay.experiment, cell_id=job.cell_id, method="cascade_expert",
                      backbone=cfg.backbone.arch, dataset=cfg.dataset.source, seed=cfg.seed,
                      grid={**job.grid, "expert": job.expert},
                      config={"role": "expert", "expert": job.expert, "dispatcher_cell_id": job.dispatcher_id,
                              "router_cell_id": job.router_id, "cell": cfg.to_dict()},
                      metrics=metrics, started_at=started, finished_at=time.time())
    delete_checkpoint(ckpt_dir)  # the cell has landed: its epoch checkpoints are spent
    return metrics


# ---------------------------------------------------------------------------------------------
# stage 4: combination
# ---------------------------------------------------------------------------------------------


def _combination_stage(job: dict) -> dict[str, dict[str, float]]:
    """Build, project and evaluate the requested cascades of one dispatcher (runs as a Ray task)."""
    from smn_core.cascade import cascade_embedding, cascade_storage_bits, combine_cascade, fit_projection, forward_passes
    from smn_core.evaluation import knn_top1, linear_probe

    cfg, lay = job["cell"], job["layout"]
    ev = cfg.eval
    routes = load_tensors(job["routes"])
    ytr, yte = routes["train_labels"], routes["test_labels"]
    d_tr, d_te = routes["train_embeddings"], routes["test_embeddings"]
    e_tr, e_te = [], []
    for eid in job["expert_ids"]:
        t = load_tensors(lay.cascade(eid, "embeddings.safetensors"))
        e_tr.append(t["train_embeddings"])
        e_te.append(t["test_embeddings"])
    k = len(job["expert_ids"])
    num_classes = int(max(int(ytr.max()), int(yte.max())) + 1)

    def evaluate(xtr, xte) -> dict[str, float]:
        knn = knn_top1(xtr, ytr, xte, yte, k=ev.knn_k, temperature=ev.knn_temperature, num_classes=num_classes)
        probe = linear_probe(xtr, ytr, xte, yte, **ev.probe_kwargs())
        return {"knn_top1": knn, "linear_probe_top1": probe.top1, "linear_probe_train_top1": probe.train_top1,
                "linear_probe_C": probe.C}

    base = evaluate(d_tr, d_te)
    # control: the dispatcher alone, centred, projected and scaled the same way (whitening by itself
    # changes k-NN accuracy; this separates its effect from the experts')
    alone = fit_projection(d_tr, d_tr.shape[1] if job["dim"] is None else min(job["dim"], d_tr.shape[1]), job["scaling"])
    control = evaluate(alone.transform(d_tr), alone.transform(d_te))
    out = {}
    for mode, cid in job["todo"].items():
        started = time.time()
        xtr, xte, proj = combine_cascade(d_tr, e_tr, d_te, e_te, mode=mode, routes_train=routes["train_routes"],
                                         routes_test=routes["test_routes"], scaling=job["scaling"], dim=job["dim"])
        metrics = evaluate(xtr, xte)
        concat = cascade_embedding(d_tr, e_tr, mode, routes["train_routes"]).numpy().astype(np.float64)
        total_var = float(concat.var(axis=0, ddof=1).sum())
        bits = cascade_storage_bits(job["dispatcher_storage_bits"], k, mode)
        metrics.update({
            "dispatcher_knn_top1": base["knn_top1"], "dispatcher_linear_probe_top1": base["linear_probe_top1"],
            "dispatcher_projected_knn_top1": control["knn_top1"],
            "dispatcher_projected_linear_probe_top1": control["linear_probe_top1"],
            "embedding_dim": float(xtr.shape[1]), "concat_dim": float(proj.mean.shape[0]),
            "clusters": float(k), "forward_passes": float(forward_passes(mode, k)),
            "storage_bits": bits, "storage_masks": float(k + 1), "backbone_params": job["backbone_params"],
            "storage_beta": bits / (32.0 * job["backbone_params"]) if job["backbone_params"] else float("nan"),
            "projection_eigenvalue_sum": float(proj.eigenvalues.sum()),
            "expert_stage_wall_s": job["expert_stage_wall_s"], "expert_sum_wall_s": job["expert_sum_wall_s"],
        })
        metrics["projection_variance_kept"] = float(proj.eigenvalues.sum()) / total_var if total_var else float("nan")
        metrics["wall_s"] = time.time() - started
        ledger.write_cell(lay.results, lay.experiment, cell_id=cid, method=f"cascade_{mode}",
                          backbone=cfg.backbone.arch, dataset=cfg.dataset.source, seed=cfg.seed, grid=job["grid"],
                          config={"role": mode, "dispatcher_cell_id": job["dispatcher_id"],
                                  "router_cell_id": job["router_id"], "expert_cell_ids": job["expert_ids"],
                                  "scaling": job["scaling"], "dim": job["dim"], "eval": cfg.to_dict()["eval"]},
                          metrics=metrics, started_at=started, finished_at=time.time())
        out[mode] = metrics
    return out


_combination_task = ray.remote(_combination_stage)


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


class CascadeSummary(dict):
    """What :func:`run_cascade` did: ``dispatchers``, per stage ``{"ran", "skipped"}`` (``router``,
    ``experts``, ``combinations``), ``failed`` ``{cell_id: error}``, ``expert_stage_s`` (driver wall
    time of the expert stage in this call, seconds) and ``expert_sum_s`` (sum of the experts' own wall
    times of this call), ``expert_warmup_s`` (seconds the expert workers took to start and import, before
    the stage's clock starts)."""


def _expert_times(df, expert_ids: list[str]) -> tuple[float, float]:
    """(stage wall = last finish - first start, sum of the experts' own wall times) from ledger rows."""
    rows = df[df["cell_id"].isin(expert_ids)].drop_duplicates("cell_id")
    if rows.empty:
        return float("nan"), float("nan")
    start, end = rows["started_at"].min(), rows["finished_at"].max()
    total = float((rows["finished_at"] - rows["started_at"]).dt.total_seconds().sum())
    return float((end - start).total_seconds()), total


def run_cascade(spec: ExperimentSpec, results: str, *, address: str | None = None,
                echo: Callable[[str], None] = print, cascade: CascadeSpec | None = None) -> CascadeSummary:
    """Run the whole cascade of ``spec`` (every stage the ledger does not hold yet).

    Args:
        spec: a validated spec with the ``smn`` method (its ``cascade`` section configures the rest).
        results: results folder (local or shared by every node) or ``pyarrow.fs`` URI (``s3://bucket/prefix``).
        address: Ray cluster to join (default ``$RAY_ADDRESS`` or a local Ray).
        echo: where progress lines go.
        cascade: the validated section (default: :func:`cascade_spec` of ``spec``).

    Returns:
        A :class:`CascadeSummary`. Experts that fail are listed in ``failed`` and their
        dispatcher's combination is skipped; the other experts go on.

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
    exp = spec.name
    eres = cs.experts.resources or spec.resources
    ensure_ray(address)
    check_cluster_fits(eres.cpus_per_worker, eres.gpus_per_worker, eres.workers, what="cascade.experts.resources")
    # --- 1. dispatchers
    run = run_experiment(spec, lay, address=address, echo=echo, cells=cells)
    bad = {p.dispatcher.cell_id: run["failed"][p.dispatcher.cell_id] for p in plans
           if p.dispatcher.cell_id in run["failed"]}
    if bad:
        raise RuntimeError(f"dispatcher cell(s) failed, no cascade can start: {bad}")
    ensure_ray(address)
    done = ledger.completed_cells(lay.results, exp)
    info = {}
    for p in plans:
        cell = p.dispatcher
        state_dir = lay.state(cell.cell_id)
        if not has_checkpoint(state_dir):
            raise RuntimeError(f"dispatcher {cell.cell_id} ({cell.label}) is in the ledger but its final state "
                               f"{state_dir} is missing (written by runs since the cascade was added); move its "
                               f"ledger file {cell.cell_id}.parquet aside to train it again")
        weights = (pretrain_artifact_path(lay, exp, cell.config)
                   if cell.config.backbone.weights == "pipeline" else None)
        info[p.router_id] = {"cell": cell.config, "layout": lay, "dispatcher_state": state_dir,
                             "pipeline_weights": weights, "dispatcher_id": cell.cell_id,
                             "grid": dict(cell.grid_values), "routes": lay.cascade(p.router_id, "routes.safetensors"),
                             "router_id": p.router_id}
    # --- 2. routers
    res = spec.resources
    refs = {}
    for p in plans:
        if p.router_id in done and location_exists(info[p.router_id]["routes"]):
            summary["router"]["skipped"] += 1
            continue
        echo(f"router {p.router_id}: embedding with dispatcher {p.dispatcher.cell_id} and fitting "
             f"PCA({cs.router.components}) + GMM({cs.router.clusters}, seed {cs.router.seed})")
        job = {**info[p.router_id], "cell_id": p.router_id, "router": cs.router.model_dump()}
        refs[p.router_id] = _router_task.options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
                                                 max_retries=res.max_retries).remote(job)
    for rid, ref in refs.items():
        try:
            m = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - reported with the router's id
            raise RuntimeError(f"router {rid} failed: {exc}") from exc
        summary["router"]["ran"] += 1
        sizes = [int(m[f"cluster{c}_train_size"]) for c in range(int(m["clusters"]))]
        echo(f"router {rid}: train cluster sizes {sizes}, PCA keeps {m['pca_explained_variance']:.2f} of the variance")
    # --- 3. experts
    jobs: list[ExpertJob] = []
    for p in plans:
        routes = load_tensors(info[p.router_id]["routes"])["train_routes"].numpy()
        sizes = np.bincount(routes, minlength=cs.router.clusters)
        cfg = p.dispatcher.config
        small = [(k, int(s)) for k, s in enumerate(sizes) if s < cfg.train.batch_size]
        if small:
            raise RuntimeError(f"router {p.router_id}: cluster(s) {small} (expert, train images) hold fewer images than "
                               f"one batch of {cfg.train.batch_size}; use fewer cascade.router.clusters or a smaller "
                               "train.batch_size")
        for k, eid in enumerate(p.expert_ids):
            if eid in done and location_exists(lay.cascade(eid, "embeddings.safetensors")):
                summary["experts"]["skipped"] += 1
                continue
            epochs = cs.experts.epochs or _budget(len(routes), int(sizes[k]), cfg.train.epochs)
            i = info[p.router_id]
            jobs.append(ExpertJob(
                config=_expert_config(cfg, epochs, cs.experts.queue_start_fraction), cell_id=eid,
                label=f"expert {k} {eid} ({int(sizes[k])} images, {epochs} epochs)", expert=k, grid=i["grid"],
                layout=lay, routes=i["routes"], dispatcher_state=i["dispatcher_state"],
                dispatcher_id=i["dispatcher_id"], router_id=p.router_id, pipeline_weights=i["pipeline_weights"],
                resources=eres))
    if jobs:
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
            for job, m, exc in run_bounded(jobs, lambda j, slot: pool.submit(slot, train_expert, j), len(pool),
                                           on_error=pool.heal, on_idle=pool.release):
                if exc is not None:  # one failed expert must not stop the others
                    summary["failed"][job.cell_id] = f"{type(exc).__name__}: {exc}"
                    echo(f"[{job.label}] FAILED: {error_cause(exc)}")
                    continue
                summary["experts"]["ran"] += 1
                summary["expert_sum_s"] += m["wall_s"]
                echo(f"[{job.label}] done in {m['wall_s']:.0f}s: loss {m.get('train_loss', float('nan')):.4f}, "
                     f"density {m.get('density', float('nan')):.3f}"
                     + (f", resumed at epoch {int(m['resumed_from_epoch']) + 1}" if m.get("resumed_from_epoch") else "")
                     + (" (warning: SwAV collapse detected: loss near ln K or assignment entropy near 0)"
                        if m.get("collapsed") else ""))
            summary["expert_stage_s"] = time.time() - t_stage
        finally:
            pool.shutdown()
    # --- 4. combinations
    df = ledger.read_ledger(lay.results, exp)
    done = set(df["cell_id"].unique())
    crefs = {}
    for p in plans:
        todo = {m: cid for m, cid in p.combination_ids.items() if cid not in done}
        summary["combinations"]["skipped"] += len(p.combination_ids) - len(todo)
        if not todo:
            continue
        if any(eid not in done for eid in p.expert_ids):
            echo(f"dispatcher {p.dispatcher.cell_id}: not every expert finished; no combination")
            continue
        facts = ledger.read_cell(lay, p.dispatcher.cell_id) or {}
        stage_wall, expert_sum = _expert_times(df, p.expert_ids)
        job = {**info[p.router_id], "expert_ids": p.expert_ids, "todo": todo,
               "scaling": cs.combination.scaling, "dim": cs.combination.dim,
               "dispatcher_storage_bits": facts.get("storage_bits", facts.get("mask_bits", float("nan"))),
               "backbone_params": facts.get("backbone_params", float("nan")),
               "expert_stage_wall_s": stage_wall, "expert_sum_wall_s": expert_sum}
        crefs[p.router_id] = _combination_task.options(num_cpus=res.cpus_per_worker,
                                                       max_retries=res.max_retries).remote(job)
    for rid, ref in crefs.items():
        try:
            out = ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            summary["failed"][rid] = f"combination: {type(exc).__name__}: {exc}"
            echo(f"combination for router {rid} FAILED: {error_cause(exc)}")
            continue
        summary["combinations"]["ran"] += len(out)
        for mode, m in out.items():
            echo(f"cascade {mode}: k-NN {m['knn_top1']:.3f} (dispatcher {m['dispatcher_knn_top1']:.3f}, projected "
                 f"alike {m['dispatcher_projected_knn_top1']:.3f}), linear probe {m['linear_probe_top1']:.3f} "
                 f"(dispatcher {m['dispatcher_linear_probe_top1']:.3f}, projected alike "
                 f"{m['dispatcher_projected_linear_probe_top1']:.3f})")
    return summary


def _budget(num_train: int, cluster_size: int, epochs: int) -> int:
    from smn_core.cascade import expert_epochs

    return expert_epochs(num_train, cluster_size, epochs)
