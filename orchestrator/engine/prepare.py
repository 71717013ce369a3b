"""What every caller of the engine does before its cells run, shared by :mod:`orchestrator.engine.plain`
(plain runs), :mod:`orchestrator.engine.sweep` (Ray Tune) and :mod:`orchestrator.engine.cascade`:

* which cells the ledger holds already (:func:`completed_cells`; a rerun is a resume);
* the pretrained-backbone artifacts that ``weights: pipeline`` cells need, built once each
  (:func:`prepare_pipeline_weights`, at :func:`orchestrator.results.layout.pretrain_artifact_path`);
* the :class:`orchestrator.engine.cell.CellJob` of each cell (:func:`cell_jobs`);
* the summary a run returns (:class:`RunSummary`) and its per-cell line (:func:`echo_cell_done`).

It imports the engine and the layout, never the runner or the sweep, so those two no longer import each
other.
"""

from __future__ import annotations

from typing import Callable

import ray

from smn_core.checkpoint import location_exists, save_tensors

from orchestrator import echo as echo_line
from orchestrator.engine.cell import CellJob, log
from orchestrator.engine.control import RandomMaskStage
from orchestrator.engine.pool import WarmPool, run_bounded
from orchestrator.engine.preflight import StorageUnreachable
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout, pretrain_artifact_path
from orchestrator.spec.experiment import CONTROLS, Cell, ExperimentSpec, control_reference

__all__ = ["RunSummary", "completed_cells", "prepare_pipeline_weights", "cell_jobs",
           "uses_tune", "echo_cell_done", "landed_references"]


class RunSummary(dict):
    """``{"total", "skipped", "ran", "failed": {cell_id: error}}`` of one run (plain or sweep)."""


def _pretrain(cell, out_path: str) -> dict[str, float]:
    from smn_core.pipeline import pretrain_backbone

    state, metrics = pretrain_backbone(cell.backbone, cell.pretrain, progress=log("pretrain"))
    save_tensors(out_path, state, metadata={k: str(v) for k, v in metrics.items()})
    return metrics


_pretrain_task = ray.remote(_pretrain)


def cell_jobs(cells: list[Cell], layout: ExperimentLayout, weights: dict[str, str]) -> list[CellJob]:
    """One :class:`orchestrator.engine.cell.CellJob` per cell (``weights``: ``{cell_id: pretrained artifact}``); a
    random-mask control's job evaluates its SMN cell's mask redrawn
    (:class:`orchestrator.engine.control.RandomMaskStage`)."""
    return [CellJob(c.config, c.cell_id, c.label, dict(c.grid_values), layout, weights.get(c.cell_id),
                    stage=_control_stage(c.config)) for c in cells]


def _control_stage(config) -> RandomMaskStage | None:
    match = CONTROLS.get(config.method)
    return None if match is None else RandomMaskStage(control_reference(config), match)


def completed_cells(results: str | ExperimentLayout, experiment: str) -> set[str]:
    """:func:`orchestrator.results.ledger.completed_cells`, read by the driver before anything runs.

    Raises:
        orchestrator.engine.preflight.StorageUnreachable: if the ledger's storage cannot be read (an ``s3://``
            endpoint that does not answer, a bucket the credentials cannot list); names the location.
    """
    root = results.results if isinstance(results, ExperimentLayout) else results
    try:
        return ledger.completed_cells(root, experiment)
    except OSError as exc:
        raise StorageUnreachable(f"cannot read the ledger of {experiment!r} under results location {root!r} from "
                                 f"the driver: {exc}") from None


def landed_references(layout: ExperimentLayout, experiment: str, waiting: set[str],
                      summary: RunSummary) -> tuple[dict[str, float], set[str]]:
    """After a round: ``(densities, missing)``, the density of every cell in the ledger (what the dependent
    cells, top-k at a found density and random-mask controls, are expanded from) and the referenced cells of
    ``waiting`` that did not land; each of those is recorded in ``summary["failed"]`` as ``<id>:dependent``."""
    densities = ledger.cell_metric(layout.results, experiment, "density")
    missing = waiting - densities.keys()
    for ref in sorted(missing):
        summary["failed"][f"{ref}:dependent"] = (f"reference cell {ref} did not land; the cells that depend on it "
                                                 "(top-k at its found density, random-mask controls) cannot run")
    return densities, missing


def prepare_pipeline_weights(spec: ExperimentSpec, results: str | ExperimentLayout, cells: list[Cell],
                             echo: Callable[[str], None] = echo_line, pool: WarmPool | None = None) -> dict[str, str]:
    """Build (once each) the pretraining artifacts the ``weights: pipeline`` cells need: on ``pool``'s warm
    workers when given (they hold the cluster's resources), else as Ray tasks.

    Returns ``{cell_id: artifact path}`` for those cells.

    Raises:
        Whatever the pretraining raised (the run cannot go on without its backbone).
    """
    res = spec.resources
    weights: dict[str, str] = {}
    todo: dict[str, object] = {}
    for c in cells:
        if c.config.backbone.weights == "pipeline":
            path = pretrain_artifact_path(results, spec.name, c.config)
            if path not in todo and not location_exists(path):
                name = path.split("?")[0].rsplit("/", 1)[-1]
                echo(f"pretraining {c.config.backbone.arch} on {c.config.pretrain.dataset.source} -> {name}")
                todo[path] = c.config
            weights[c.cell_id] = path

    def submit(item: tuple[str, object], slot: int):
        path, cfg = item
        if pool is not None:
            return pool.submit(slot, _pretrain, cfg, path)
        return _pretrain_task.options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker).remote(cfg, path)

    limit = len(pool) if pool is not None else max(1, len(todo))
    for _, m, exc in run_bounded(list(todo.items()), submit, limit):
        if exc is not None:
            raise exc
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


