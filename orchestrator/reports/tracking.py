"""Experiment trackers (MLflow, Weights & Biases), fed from the ledger.

In a spec::

    tracking:
      mlflow: {uri: mlruns}                          # a folder (file store), or http://host:5000, sqlite:///...
      wandb: {project: smn-ablations, mode: offline} # offline: runs land in <dir>/wandb/offline-run-*

(the section's models: :mod:`orchestrator.spec.tracking`), or on the command line: ``smn run SPEC --track mlflow`` (a
file store in ``<results>/mlruns``) or ``--track wandb`` (offline, under ``<results>``).

Every cell of the ledger becomes one tracker run, laid out the way MLflow and W&B users expect:

* **time**: an MLflow run spans the cell's training and evaluation (``train_seconds + eval_seconds``, ending when
  the cell landed, ``finished_at``), not the moment it was logged; each epoch's point (MLflow and W&B) carries
  the time that epoch ended. W&B times a run from its logging; the span is in its config (``smn.started_at``,
  ``smn.finished_at``, ``smn.seconds``). The cell's whole wall time (setup included) is its ``wall_s`` metric.
* **grouping**: MLflow: one parent run per experiment (tag ``smn.role = experiment``), the cells as its nested
  runs (``mlflow.parentRunId``); W&B: ``group`` = the experiment, ``job_type`` = the method.
* **provenance**: tags ``mlflow.source.git.commit`` / ``smn.git_commit`` (the checkout's commit when it was
  logged), ``smn.version`` and ``smn.host`` (from the ledger row); W&B gets the same as ``git_commit`` and
  ``host`` settings and config keys. MLflow: the dataset as a run input (``log_inputs``: name, source, digest
  of the dataset spec, and its train / test sizes); W&B: ``smn.dataset`` config keys.
* **metrics**: one name per quantity. The per-epoch curves (:mod:`orchestrator.results.curves`) are histories at
  the optimizer step each epoch ended (``train_loss``, ``density``, ``code_entropy``, ``lr``,
  ``epoch_seconds``); every other ledger metric is one value at the last step. (The ledger's
  ``train_loss@<epoch>`` columns, the same numbers as the ``train_loss`` history, are not logged again.)
* **params**: the resolved config (flattened, dotted keys); artifacts: its mask file, its curves file and a PNG
  of its curves.

Runs are named and tagged with the spec's name and the cell id (``smn.experiment``, ``smn.cell_id``); a cell that
already has a run is not logged again, so a rerun adds no runs. The ledger stays the source of truth:
:func:`sync` runs on the driver after the cells landed, a tracker that cannot be reached is reported once (a
warning) and skipped, and nothing a tracker does fails a cell or a run.

Reading them back (docs/commands.md): MLflow 3 keeps its file store behind ``MLFLOW_ALLOW_FILE_STORE=true``
(``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RESULTS/mlruns``, or ``mlflow.search_runs`` with
that variable set); W&B offline runs are folders ``<dir>/wandb/offline-run-*`` (``wandb sync`` uploads them).
"""

from __future__ import annotations

import hashlib
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

from orchestrator import echo as echo_line
from orchestrator.reports.registry import save_figure
from orchestrator.results import ledger
from orchestrator.results.curves import read_curves
from orchestrator.results.layout import ExperimentLayout, filesystem
from orchestrator.spec.keys import flatten
from orchestrator.spec.tracking import MlflowTarget, TrackingSpec, WandbTarget, parse_tracking

__all__ = ["CellRecord", "cell_records", "cell_span", "curve_points", "dataset_facts", "final_metrics", "git_commit",
           "log_cell_mlflow", "log_cell_wandb", "log_experiment_mlflow", "mlflow_parent_run", "sync", "wandb_run_id"]


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
    started_at: float | None = None  # UNIX seconds, from the ledger row
    finished_at: float | None = None
    host: str = ""
    smn_version: str = ""


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
                                  curves=curves, artifacts=artifacts, started_at=_seconds(first.get("started_at")),
                                  finished_at=_seconds(first.get("finished_at")), host=str(first.get("host") or ""),
                                  smn_version=str(first.get("smn_version") or "")))
    return records


def _seconds(stamp: Any) -> float | None:
    """UNIX seconds of a ledger timestamp (None when absent)."""
    if stamp is None or (isinstance(stamp, float) and math.isnan(stamp)) or pd.isna(stamp):
        return None
    return float(pd.Timestamp(stamp).timestamp())


def cell_span(record: CellRecord) -> tuple[float, float]:
    """``(start, end)`` in UNIX seconds of a cell's tracker run: its training and evaluation.

    It ends when the cell landed (``finished_at``) and lasts ``train_seconds + eval_seconds`` (no longer than the
    cell's own ``started_at .. finished_at``); a cell without them spans ``started_at .. finished_at``.
    """
    end = record.finished_at if record.finished_at is not None else float(pd.Timestamp.now().timestamp())
    start = record.started_at if record.started_at is not None else end
    busy = sum(v for k in ("train_seconds", "eval_seconds")
               if isinstance(v := record.metrics.get(k), float) and math.isfinite(v) and v > 0)
    return (max(start, end - busy) if busy > 0 else start), end


def git_commit(root: str | os.PathLike | None = None) -> str | None:
    """The commit checked out at ``root`` (default: this checkout), read from its ``.git`` files (no ``git``
    process): a worktree's ``gitdir`` pointer, ``HEAD``, loose refs, ``packed-refs``. None outside a checkout."""
    top = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    dotgit = top / ".git"
    try:
        gitdir = dotgit
        if dotgit.is_file():  # a worktree or submodule: "gitdir: <path>"
            gitdir = (top / dotgit.read_text().split(":", 1)[1].strip()).resolve()
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
        ref = head.split(":", 1)[1].strip()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        for folder in dict.fromkeys((gitdir, common)):
            if (folder / ref).is_file():
                return (folder / ref).read_text().strip()
            packed = folder / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
    except (OSError, IndexError):
        return None
    return None


def dataset_facts(record: CellRecord) -> dict[str, Any]:
    """The cell's dataset as a tracker input: ``name``, ``source``, ``digest`` (16 hex digits of the dataset spec's
    SHA-256) and the split sizes the cell saw."""
    ds = dict(record.config.get("dataset") or {})
    name = str(ds.get("source") or "dataset")
    digest = hashlib.sha256(json.dumps(ds, sort_keys=True, default=str).encode()).hexdigest()[:16]
    sizes = {k: int(record.metrics[k]) for k in ("num_train", "num_test") if k in record.metrics}
    return {"name": name, "source": str(ds.get("root") or name), "digest": digest, "spec": ds, **sizes}


_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def _metric_name(name: str) -> str:
    return _BAD.sub("_", name)


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {_metric_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


# curve column -> the tracker's metric name (the final value under the same name is the ledger's)
_CURVE_NAMES = {"loss": "train_loss", "seconds": "epoch_seconds"}
_PER_EPOCH = re.compile(r"^train_loss@\d+$")  # the ledger's per-epoch losses: the train_loss history already


def curve_points(record: CellRecord) -> list[tuple[int, float, dict[str, float]]]:
    """``(step, UNIX time, {metric: value})`` per epoch of the cell's curves: the optimizer step the epoch ended at
    (``steps`` spread evenly over the epochs; the epoch number when ``steps`` is unknown) and the time it ended
    (the run's start plus the epochs' ``seconds``)."""
    curves = record.curves
    if curves is None or not len(curves):
        return []
    n = len(curves)
    steps = record.metrics.get("steps")
    per_epoch = steps / n if isinstance(steps, float) and math.isfinite(steps) and steps > 0 else None
    start, end = cell_span(record)
    secs = curves["seconds"].fillna(0).cumsum().tolist() if "seconds" in curves else [None] * n
    cols = [c for c in curves.columns if c != "epoch"]
    out = []
    for i, (_, row) in enumerate(curves.iterrows()):
        epoch = int(row["epoch"]) + 1
        step = int(round(per_epoch * epoch)) if per_epoch else epoch
        when = start + secs[i] if secs[i] is not None else start + (end - start) * (i + 1) / n
        out.append((step, min(when, end), _finite({_CURVE_NAMES.get(c, c): row[c] for c in cols})))
    return out


def final_metrics(record: CellRecord) -> dict[str, float]:
    """The ledger metrics a tracker logs once (at the last step): all finite ones except the per-epoch
    ``train_loss@<epoch>`` columns (the ``train_loss`` history holds them)."""
    return _finite({k: v for k, v in record.metrics.items() if not _PER_EPOCH.match(k)})


def _provenance(record: CellRecord, commit: str | None) -> dict[str, str]:
    tags = {"smn.version": record.smn_version, "smn.host": record.host}
    if commit:
        tags.update({"smn.git_commit": commit, "mlflow.source.git.commit": commit})
    return {k: v for k, v in tags.items() if v}


def _mlflow_uri(uri: str) -> str:
    """A tracking URI for ``uri``; a plain folder becomes a ``file://`` URI of MLflow's file store (which
    MLflow 3 keeps behind ``MLFLOW_ALLOW_FILE_STORE``)."""
    if "://" in uri or uri.startswith(("file:", "sqlite:", "databricks")):
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a plain folder: MLflow's file store
    return Path(uri).resolve().as_uri()


def _mlflow_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def mlflow_parent_run(client, exp_id: str, experiment: str, start: float, commit: str | None) -> str:
    """The id of the experiment's parent run (tag ``smn.role = experiment``), created when absent (named after the
    experiment, starting at ``start``, UNIX seconds)."""
    found = client.search_runs([exp_id], filter_string=f"tags.`smn.role` = 'experiment' and "
                               f"tags.`smn.experiment` = '{experiment}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"smn.role": "experiment", "smn.experiment": experiment}
    if commit:
        tags.update({"smn.git_commit": commit, "mlflow.source.git.commit": commit})
    return client.create_run(exp_id, start_time=int(start * 1000), tags=tags, run_name=experiment).info.run_id


def log_cell_mlflow(target: MlflowTarget, record: CellRecord, *, parent_id: str | None = None,
                    commit: str | None = None) -> bool:
    """Log one cell as an MLflow run (nested under ``parent_id`` when given) unless a run tagged with its cell id
    exists; returns True if logged. See the module's docstring for what the run holds."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

    client = _mlflow_client(target)
    exp_id = _mlflow_experiment(client, target.experiment or record.experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`smn.cell_id` = '{record.cell_id}'", max_results=1)
    if found:
        return False
    start, end = cell_span(record)
    tags = {"smn.experiment": record.experiment, "smn.cell_id": record.cell_id, "smn.method": record.method,
            **_provenance(record, commit)}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run = client.create_run(exp_id, start_time=int(start * 1000), tags=tags,
                            run_name=f"{record.method}-s{record.seed}-{record.cell_id}")
    rid = run.info.run_id
    try:
        params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(record.config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        points = curve_points(record)
        last = points[-1][0] if points else 0
        metrics = [Metric(k, v, int(when * 1000), step) for step, when, values in points for k, v in values.items()]
        history = {m.key for m in metrics}
        metrics += [Metric(k, v, int(end * 1000), last) for k, v in final_metrics(record).items() if k not in history]
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        facts = dataset_facts(record)
        profile = json.dumps({k: facts[k] for k in ("num_train", "num_test") if k in facts})
        client.log_inputs(rid, datasets=[DatasetInput(
            Dataset(name=facts["name"], digest=facts["digest"], source_type="smn", source=facts["source"],
                    schema=json.dumps(facts["spec"], default=str), profile=profile),
            tags=[InputTag("mlflow.data.context", "train")])])
        for path in record.artifacts:
            client.log_artifact(rid, path)
        client.set_terminated(rid, "FINISHED", end_time=int(end * 1000))
    except Exception:
        client.set_terminated(rid, "FAILED")
        client.delete_run(rid)  # a half-logged run would block the cell's next attempt
        raise
    return True


def _mlflow_client(target: MlflowTarget):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=_mlflow_uri(target.uri))


def log_experiment_mlflow(target: MlflowTarget, records: list[CellRecord]) -> int:
    """Log the cells of one experiment under its parent run (created when absent; its end moved to the last cell's
    end); returns the number of runs added."""
    if not records:
        return 0
    client = _mlflow_client(target)
    experiment = records[0].experiment
    exp_id = _mlflow_experiment(client, target.experiment or experiment)
    commit = git_commit()
    spans = [cell_span(r) for r in records]
    parent = mlflow_parent_run(client, exp_id, experiment, min(s for s, _ in spans), commit)
    added = sum(log_cell_mlflow(target, r, parent_id=parent, commit=commit) for r in records)
    client.set_terminated(parent, "FINISHED", end_time=int(max(e for _, e in spans) * 1000))
    return added


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


def log_cell_wandb(target: WandbTarget, record: CellRecord, folder: str, *, commit: str | None = None) -> bool:
    """Log one cell as a W&B run (id :func:`wandb_run_id`) unless it exists; returns True if logged.

    ``group`` = the experiment, ``job_type`` = the method; each epoch's history row carries its step and the time
    it ended (``_timestamp``); git commit and host as W&B settings, and ``smn.*`` config keys (version, host,
    commit, dataset, and the cell's training span ``smn.started_at`` / ``smn.finished_at`` / ``smn.seconds``,
    :func:`cell_span`). W&B itself times the run from its logging (its ``_runtime``): its SDK has no public way to
    give a past start, so the span is in the config."""
    import wandb

    run_id = wandb_run_id(record.experiment, record.cell_id)
    if _wandb_has_run(target, folder, run_id):
        return False
    os.makedirs(folder, exist_ok=True)
    start, end = cell_span(record)
    facts = dataset_facts(record)
    extra = {"smn.dataset": {k: facts[k] for k in ("name", "source", "digest", "num_train", "num_test") if k in facts},
             **{k: v for k, v in _provenance(record, commit).items() if k.startswith("smn.")},
             "smn.started_at": pd.Timestamp(start, unit="s", tz="UTC").isoformat(),
             "smn.finished_at": pd.Timestamp(end, unit="s", tz="UTC").isoformat(), "smn.seconds": round(end - start, 3)}
    settings = dict(silent=True, x_disable_stats=True, console="off", disable_git=True)
    if commit:
        settings["git_commit"] = commit
    if record.host:
        settings["host"] = record.host
    run = wandb.init(project=target.project, entity=target.entity, mode=target.mode, dir=folder, id=run_id,
                     name=f"{record.method}-s{record.seed}-{record.cell_id}", group=record.experiment,
                     job_type=record.method, tags=[record.experiment, record.method],
                     config={**flatten(record.config), **extra}, reinit="create_new",
                     settings=wandb.Settings(**settings))
    try:
        for step, when, values in curve_points(record):
            run.log({**values, "_timestamp": when}, step=step)
        run.summary.update({**final_metrics(record), "smn.cell_id": record.cell_id,
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
         echo: Callable[[str], None] = echo_line) -> dict[str, int]:
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
        commit = git_commit()
        for name, target in targets:
            added[name] = 0
            try:
                if name == "mlflow":
                    added[name] = log_experiment_mlflow(target, records)
                else:
                    for rec in records:
                        added[name] += log_cell_wandb(target, rec, _wandb_dir(target, results), commit=commit)
            except Exception as exc:  # noqa: BLE001 - the ledger is the source of truth; a tracker never fails a run
                msg = (f"tracker {name} is unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                       f"its runs are skipped, the ledger holds every result (run again to log the missing cells)")
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                echo(f"warning: {msg}")
        done = ", ".join(f"{n}: {k} new run(s)" for n, k in added.items())
        echo(f"tracking {experiment}: {done} ({len(records)} cells in the ledger)")
    return added
