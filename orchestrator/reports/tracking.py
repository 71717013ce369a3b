"""Experiment trackers (MLflow, Weights & Biases), fed from the ledger.

In a spec::

    tracking:
      mlflow: {uri: mlruns}                          # a folder (file store), or http://host:5000, sqlite:///...
      wandb: {project: smn-ablations, mode: offline} # offline: runs land in <dir>/wandb/offline-run-*

(the section's models: :mod:`orchestrator.spec.tracking`), or on the command line: ``smn run SPEC --track mlflow`` (a file store in ``<results>/mlruns``) or
``--track wandb`` (offline, under ``<results>``).

Every cell of the ledger becomes one tracker run: params = its resolved config (flattened, dotted keys),
metrics = its ledger metrics plus its per-epoch curves (loss, density, code entropy, from
:mod:`orchestrator.results.curves`, logged with ``step = epoch``), artifacts = its mask file, its curves file and a
PNG of its curves. Runs are named and tagged with the spec's name and the cell id (``smn.experiment``,
``smn.cell_id``); a cell that already has a run is not logged again, so a rerun adds no runs. The ledger
stays the source of truth: :func:`sync` runs on the driver after the cells landed, a tracker that cannot
be reached is reported once (a warning) and skipped, and nothing a tracker does fails a cell or a run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict

from orchestrator.reports.registry import save_figure
from orchestrator.results import ledger
from orchestrator.results.curves import read_curves
from orchestrator.results.layout import ExperimentLayout, filesystem
from orchestrator.spec.keys import flatten
from orchestrator.spec.tracking import MlflowTarget, TrackingSpec, WandbTarget, parse_tracking

__all__ = ["CellRecord", "cell_records", "sync", "log_cell_mlflow", "log_cell_wandb", "wandb_run_id"]


class CellRecord(BaseModel):
    """What a tracker gets for one cell: spec name, cell id, resolved config, metrics, per-epoch curves,
    artifact paths (local files)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    experiment: str
    cell_id: str
    method: str
    seed: int
    config: dict[str, Any]
    metrics: dict[str, float]
    curves: Any = None  # pandas DataFrame (one row per epoch) or None
    artifacts: list[str] = []


def _local_copy(location: str, tmp: str) -> str | None:
    """A local path for an artifact next to the ledger (copied out of a URI results location)."""
    if "://" not in location:
        return location if os.path.exists(location) else None
    fs, inner = filesystem(location)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    dest = os.path.join(tmp, inner.rsplit("/", 1)[-1])
    with fs.open_input_stream(inner) as src, open(dest, "wb") as dst:
        dst.write(src.read())
    return dest


def _curves_png(curves: pd.DataFrame, title: str, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in ("loss", "density", "code_entropy") if c in curves.columns]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3), squeeze=False)
    for ax, c in zip(axes[0], cols):
        ax.plot(curves["epoch"] + 1, curves[c], marker="o", ms=3)
        ax.set_title(c.replace("_", " "))
        ax.set_xlabel("epoch")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, out)
    return out


def cell_records(results: str, experiment: str, tmp: str) -> list[CellRecord]:
    """One :class:`CellRecord` per ledger cell of ``experiment`` (artifacts copied under ``tmp`` when the
    results are a URI; the curves PNG is drawn there)."""
    df = ledger.read_ledger(results, experiment)
    lay = ExperimentLayout.of(results, experiment)
    records = []
    for cid, rows in df.groupby("cell_id", sort=True):
        first = rows.iloc[0]
        curves = read_curves(lay, cid)
        artifacts = []
        for location in (lay.mask(cid), lay.location("curves", f"{cid}.parquet")):
            path = _local_copy(location, tmp)
            if path:
                artifacts.append(path)
        if curves is not None and len(curves) and any(c in curves for c in ("loss", "density", "code_entropy")):
            artifacts.append(_curves_png(curves, f"{experiment} {cid}", os.path.join(tmp, f"curves-{cid}.png")))
        records.append(CellRecord(experiment=experiment, cell_id=cid, method=first["method"], seed=int(first["seed"]),
                                  config=json.loads(first["config_json"]),
                                  metrics={m: float(v) for m, v in zip(rows["metric"], rows["value"])},
                                  curves=curves, artifacts=artifacts))
    return records


_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def _metric_name(name: str) -> str:
    return _BAD.sub("_", name)


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {_metric_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _curve_steps(curves: pd.DataFrame | None) -> list[tuple[int, dict[str, float]]]:
    if curves is None:
        return []
    cols = [c for c in curves.columns if c != "epoch"]
    return [(int(r["epoch"]), _finite({f"epoch_{c}": r[c] for c in cols})) for _, r in curves.iterrows()]


def _mlflow_uri(uri: str) -> str:
    """A tracking URI for ``uri``; a plain folder becomes a ``file://`` URI of MLflow's file store (which
    MLflow 3 keeps behind ``MLFLOW_ALLOW_FILE_STORE``)."""
    if "://" in uri or uri.startswith(("file:", "sqlite:", "databricks")):
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a plain folder: MLflow's file store
    return Path(uri).resolve().as_uri()


def log_cell_mlflow(target: MlflowTarget, record: CellRecord) -> bool:
    """Log one cell as an MLflow run unless a run tagged with its cell id exists; returns True if logged."""
    from mlflow.tracking import MlflowClient

    uri = _mlflow_uri(target.uri)
    client = MlflowClient(tracking_uri=uri)
    name = target.experiment or record.experiment
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    found = client.search_runs([exp_id], filter_string=f"tags.`smn.cell_id` = '{record.cell_id}'", max_results=1)
    if found:
        return False
    run = client.create_run(exp_id, run_name=f"{record.method}-s{record.seed}-{record.cell_id}",
                            tags={"smn.experiment": record.experiment, "smn.cell_id": record.cell_id,
                                  "smn.method": record.method})
    rid = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(record.config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        ts = int(pd.Timestamp.now().timestamp() * 1000)
        metrics = [Metric(k, v, ts, 0) for k, v in _finite(record.metrics).items()]
        metrics += [Metric(k, v, ts, step) for step, values in _curve_steps(record.curves) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        for path in record.artifacts:
            client.log_artifact(rid, path)
        client.set_terminated(rid, "FINISHED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        client.delete_run(rid)  # a half-logged run would block the cell's next attempt
        raise
    return True


def wandb_run_id(experiment: str, cell_id: str) -> str:
    """The W&B run id of a cell: the same on every rerun, so a cell is logged once."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{experiment}-{cell_id}")[:64]


def _wandb_dir(target: WandbTarget, results: str) -> str:
    return target.dir or (str(results) if "://" not in str(results) else os.getcwd())


def _wandb_has_run(target: WandbTarget, folder: str, run_id: str) -> bool:
    if target.mode == "offline":
        return any(Path(folder, "wandb").glob(f"offline-run-*-{run_id}"))
    if target.mode == "disabled":
        return False
    import wandb

    try:
        wandb.Api().run(f"{target.entity + '/' if target.entity else ''}{target.project}/{run_id}")
        return True
    except wandb.errors.CommError:
        return False


def log_cell_wandb(target: WandbTarget, record: CellRecord, folder: str) -> bool:
    """Log one cell as a W&B run (id :func:`wandb_run_id`) unless it exists; returns True if logged."""
    import wandb

    run_id = wandb_run_id(record.experiment, record.cell_id)
    if _wandb_has_run(target, folder, run_id):
        return False
    os.makedirs(folder, exist_ok=True)
    run = wandb.init(project=target.project, entity=target.entity, mode=target.mode, dir=folder, id=run_id,
                     name=f"{record.method}-s{record.seed}-{record.cell_id}", group=record.experiment,
                     tags=[record.experiment, record.method], config=flatten(record.config),
                     reinit="create_new", settings=wandb.Settings(silent=True, x_disable_stats=True,
                                                                  console="off"))
    try:
        for step, values in _curve_steps(record.curves):
            run.log(values, step=step)
        run.summary.update({**_finite(record.metrics), "smn.cell_id": record.cell_id,
                            "smn.experiment": record.experiment})
        if record.artifacts:
            art = wandb.Artifact(f"cell-{run_id}", type="smn-cell")
            for path in record.artifacts:
                art.add_file(path)
            run.log_artifact(art)
    except Exception:
        run.finish(exit_code=1)
        if target.mode == "offline":  # a half-written offline run would block the cell's next attempt
            for d in Path(folder, "wandb").glob(f"offline-run-*-{run_id}"):
                shutil.rmtree(d, ignore_errors=True)
        raise
    run.finish()
    return True


def sync(results: str, experiment: str, tracking: TrackingSpec | dict | None,
         echo: Callable[[str], None] = print) -> dict[str, int]:
    """Log every ledger cell of ``experiment`` that a configured tracker does not hold yet.

    Returns ``{tracker: runs added}``. Never raises for a tracker's sake: a tracker that fails (down,
    unreachable, misconfigured) is reported once through a ``RuntimeWarning`` and ``echo`` and skipped.
    """
    spec = tracking if isinstance(tracking, TrackingSpec) else parse_tracking(tracking)
    added: dict[str, int] = {}
    targets = [(n, t) for n, t in (("mlflow", spec.mlflow), ("wandb", spec.wandb)) if t is not None]
    if not targets:
        return added
    with tempfile.TemporaryDirectory(prefix="smn-track-") as tmp:
        records = cell_records(results, experiment, tmp)
        for name, target in targets:
            added[name] = 0
            try:
                for rec in records:
                    if name == "mlflow":
                        added[name] += log_cell_mlflow(target, rec)
                    else:
                        added[name] += log_cell_wandb(target, rec, _wandb_dir(target, results))
            except Exception as exc:  # noqa: BLE001 - the ledger is the source of truth; a tracker never fails a run
                msg = (f"tracker {name} is unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                       f"its runs are skipped, the ledger holds every result (run again to log the missing cells)")
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                echo(f"warning: {msg}")
        done = ", ".join(f"{n}: {k} new run(s)" for n, k in added.items())
        echo(f"tracking {experiment}: {done} ({len(records)} cells in the ledger)")
    return added
