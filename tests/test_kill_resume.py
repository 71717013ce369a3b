"""Kill and resume, for real, over the four kinds of run: a fault in the middle of the work costs no cell and
no finished work is done again; the ledger ends with exactly one row set per cell, each with its whole step
budget, and the cell the fault hit resumes from its last epoch checkpoint, not from scratch.

=========  ==========================================  =========================================================
kind       fault                                       how the run finishes
=========  ==========================================  =========================================================
plain      ``smn run`` killed (its process group, its   the same command again: finished cells are skipped,
           own local Ray with it: a machine crash)      the interrupted one resumes
tune       a worker node of a 3-node Ray cluster        the same run: Tune retries the trials of the lost
           removed mid-sweep                            node elsewhere, from their checkpoints
ddp        one of the two TorchTrainer workers          the same run: Ray Train restarts the worker group
           SIGKILLed                                    after the last registered checkpoint
cascade    the worker node holding an expert removed    the same run: the expert is retried on the other
           mid-expert-stage                             node, from its checkpoint
=========  ==========================================  =========================================================

Every driver is a real ``python -m orchestrator run`` process; ``tune`` and ``cascade`` join a
``ray.cluster_utils.Cluster`` (a head and two worker nodes) started by the test, the others start their own
local Ray in a private temp folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.results import ledger
from orchestrator.spec.experiment import expand_cells, load_spec

from .conftest import REPO, STARTUP_TIMEOUT, TINY_SPEC, kill_driver_tree
from .test_cascade_ray import write_cascade_spec

CLUSTER = pytest.mark.cluster  # the kill tests start Ray processes of their own; the in-process resume test: ray

EXPERT_EPOCHS = 10
VIEW_METRICS = {"view_cos_same", "view_cos_other", "view_cos_gap"}


def _spec(tmp_path: Path, kind: str) -> tuple[Path, list[str], int]:
    """The spec file, its overrides and the epochs every trained cell must complete."""
    path = tmp_path / f"kr{kind}.yaml"
    if kind == "cascade":
        return write_cascade_spec(tmp_path, "krcascade", epochs=2, expert_epochs=str(EXPERT_EPOCHS),
                                  expert_cpus=1), [], EXPERT_EPOCHS
    epochs, workers, extra, overrides = {
        # one cell at a time, so that the kill finds finished and unfinished cells
        "plain": (4, 1, "", ["seeds=[0,1]", "resources.max_concurrent_cells=1", "dataset.max_train_samples=192"]),
        # 3 one-CPU trials on two 2-CPU worker nodes: both nodes hold a trial
        "tune": (8, 1, "grid:\n  train.swav.num_prototypes: [10, 20, 30]\n", ["methods=[smn]",
                                                                                "resources.max_retries=3"]),
        "ddp": (16, 2, "", ["methods=[smn]", "dataset.max_train_samples=192"]),
    }[kind]
    path.write_text(TINY_SPEC.format(name=f"kr{kind}", epochs=epochs, workers=workers) + extra)
    return path, overrides, epochs


# A raylet has a fixed 30 s to register with the GCS (ray/_private/node.py), which a loaded 2-core machine can
# miss; a driver whose Ray did not start is started again (the same command: nothing had run), and so is a
# cluster whose node did not start


class Driver:
    """``smn run`` as a subprocess in its own process group, its output in a file per start; started again
    (3 starts at most) when its local Ray or its connection timed out during startup."""

    def __init__(self, cmd: list[str], env: dict, log: Path, marker: str):
        self.cmd, self.env, self.marker, self.log, self.starts = cmd, env, marker, log, 0
        self._start()

    def _start(self) -> None:
        if self.starts:
            kill_driver_tree(self.proc, self.marker)
        self.starts += 1
        self.current = self.log.with_suffix(f".{self.starts}.log")
        with open(self.current, "w") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.current.read_text()

    def _restarted(self) -> bool:
        if self.proc.poll() not in (None, 0) and STARTUP_TIMEOUT in self.text() and self.starts < 3:
            self._start()
            return True
        return False

    def wait_for(self, what: str, ready, timeout: float = 400):
        """Poll ``ready()`` until it returns something true; fails if the driver exits first."""
        deadline = time.time() + timeout
        while not (found := ready()):
            if self._restarted():
                deadline = time.time() + timeout
                continue
            assert self.proc.poll() is None, f"the driver exited before {what}:\n{self.text()[-4000:]}"
            assert time.time() < deadline, f"no {what} in time:\n{self.text()[-4000:]}"
            time.sleep(0.2)
        return found

    def wait(self, *, restart: bool, timeout: float = 600) -> int:
        """The driver's exit code, once it has finished; ``restart``: start it again if its Ray timed out
        during startup (only where nothing was injected into this run)."""
        while True:
            rc = self.proc.wait(timeout=timeout)
            if not (restart and self._restarted()):
                return rc


def _start_cluster(head_cpus: int):
    """A head and two 2-CPU worker nodes (``ray.cluster_utils.Cluster``); returns it and its first worker
    node. A node that timed out during startup (a loaded machine) makes it start again (3 tries)."""
    from ray.cluster_utils import Cluster

    for attempt in range(3):
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=head_cpus, include_dashboard=False)
            first = cluster.add_node(num_cpus=2)
            cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            return cluster, first
        except Exception as exc:  # noqa: BLE001 - only the startup timeout is retried
            cluster.shutdown()
            if STARTUP_TIMEOUT not in str(exc) or attempt == 2:
                raise


def _metas(folder: Path) -> list[dict]:
    out = []
    for path in folder.rglob("meta.json") if folder.exists() else []:
        try:
            out.append({**json.loads(path.read_text()), "cell": path.parent.name})
        except (OSError, json.JSONDecodeError):
            continue  # being replaced right now
    return out


@CLUSTER
@pytest.mark.parametrize("kind", ["plain", "tune", "ddp", "cascade"])
def test_a_fault_mid_run_costs_no_cell_and_the_hit_cell_resumes(kind, tmp_path, monkeypatch):
    spec_path, overrides, epochs = _spec(tmp_path, kind)
    spec = load_spec(spec_path, overrides)
    name = spec.name
    results = tmp_path / "results"
    exp = results / name
    ray_tmp = tempfile.mkdtemp(prefix=f"smn{kind[:2]}", dir="/tmp")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # explicit, before any Ray starts (2.59+ turns it on)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cmd = [sys.executable, "-m", "orchestrator", "run", str(spec_path), "--results", str(results), *overrides]
    cluster = None
    if kind in ("tune", "cascade"):
        # tune: a head without CPUs, so every trial is on a worker node; cascade: the head takes a stage task
        cluster, doomed = _start_cluster(head_cpus=0 if kind == "tune" else 1)
        cmd += ["--address", cluster.address]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    driver = Driver(cmd, env, tmp_path / "run.log", ray_tmp)
    victim_cell, killed_at = None, None
    try:
        if kind == "plain":
            driver.wait_for("finished cell and checkpoint", lambda: list((exp / "ledger").glob("*.parquet"))
                            and _metas(exp / "checkpoints"))
            kill_driver_tree(driver.proc, ray_tmp)
            before = ledger.completed_cells(str(results), name)
            assert 1 <= len(before) < 4
            landed = {p.name: p.stat().st_mtime_ns for p in (exp / "ledger").glob("*.parquet")}
            driver = Driver(cmd, env, tmp_path / "rerun.log", ray_tmp)  # the same command again
        elif kind == "ddp":
            # a checkpoint is on storage before the Train controller registers it (it polls the workers every
            # couple of seconds); kill only once the controller has had time to register the second one
            driver.wait_for("two epoch checkpoints", lambda: len(_metas(exp / "ray_train")) >= 2)
            time.sleep(4)
            assert driver.proc.poll() is None and len(_metas(exp / "ray_train")) < epochs, "finished before the kill"
            workers = [p for p in psutil.Process(driver.proc.pid).children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            assert len(workers) == 2, [" ".join(p.cmdline())[:80] for p in psutil.Process(driver.proc.pid).children(True)]
            workers[-1].kill()
            killed_at = time.time()
        elif kind == "tune":
            driver.wait_for("a trial checkpoint", lambda: _metas(exp / "checkpoints"))
            cluster.remove_node(doomed)  # SIGKILLs the node's raylet and its workers
        else:  # cascade: the worker node of an expert that has checkpointed and has epochs left
            from orchestrator.engine.cascade import plan_cascades
            from orchestrator.spec.cascade import cascade_spec

            (plan,) = plan_cascades(spec, cascade_spec(spec))
            by_id = {n.node_id: n for n in cluster.worker_nodes}
            meta = driver.wait_for("an expert checkpoint on a worker node", lambda: next(
                (m for m in _metas(exp / "checkpoints") if m["cell"] in plan.expert_ids
                 and m.get("node_id") in by_id and m["epoch"] < EXPERT_EPOCHS - 3), None))
            victim_cell = meta["cell"]
            cluster.remove_node(by_id[meta["node_id"]])
        rc = driver.wait(restart=kind == "plain")  # plain: the rerun, a fresh start
    finally:
        if cluster is not None:
            cluster.shutdown()
        kill_driver_tree(driver.proc, ray_tmp)  # and whatever is left with the temp folder on its command line
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = driver.text()
    assert rc == 0, text[-4000:]

    # every cell once, nothing twice
    df = ledger.read_ledger(str(results), name)
    if kind == "cascade":
        expected = {plan.dispatcher.cell_id, plan.router_id, *plan.expert_ids, *plan.combination_ids.values()}
    else:
        expected = {c.cell_id for c in expand_cells(spec)}
    assert set(df["cell_id"]) == expected
    assert not df.duplicated(["cell_id", "metric"]).any(), "one row set per cell"

    # the resumed cell writes every metric an uninterrupted one does (issue 26: it lacked view_cos_*)
    names = df.groupby("cell_id")["metric"].agg(frozenset)
    for method, ids in df.groupby("method")["cell_id"].unique().items():
        kinds = {names[c] for c in ids}
        assert len(kinds) == 1, f"{method}: cells with different metric names: {[sorted(k ^ min(kinds, key=len)) for k in kinds]}"
    if kind != "cascade":  # experts start from the dispatcher's state: no view check of the frozen backbone
        assert VIEW_METRICS <= set(df.loc[df["method"] == "smn", "metric"]), sorted(set(df["metric"]))

    # every trained cell (every expert) ran its whole budget exactly once
    trained = df[df["method"] == ("cascade_expert" if kind == "cascade" else "smn")]
    val = trained.pivot(index="cell_id", columns="metric", values="value")
    batch = 8 if kind == "cascade" else 32
    size = val["cluster_size"] if kind == "cascade" else spec.dataset.max_train_samples
    assert (val["steps"] == epochs * (size // batch)).all(), val["steps"].to_dict()

    # and the cell the fault hit resumed from a checkpoint, not from scratch
    if kind == "plain":
        assert f"{len(before)} already in the ledger, {4 - len(before)} to run" in text, text[-4000:]
        assert "resuming after epoch" in text
        assert {n: (exp / "ledger" / n).stat().st_mtime_ns for n in landed} == landed, "a finished cell ran again"
    elif kind == "ddp":
        resumed = [int(m) for m in re.findall(r"resuming after epoch (\d+)", text)]
        assert resumed and min(resumed) >= 1, text[-4000:]
        assert all(f"train_loss@{k}" in val.columns for k in range(1, epochs + 1))
        assert df["finished_at"].iloc[0].timestamp() > killed_at
    elif kind == "tune":
        assert "retrying" in text, "no trial was on the removed node:\n" + text[-4000:]
    else:
        assert val.loc[victim_cell, "resumed_from_epoch"] >= 1, "the expert on the lost node resumed"


@pytest.mark.ray  # in-process and Ray-free, but seconds of real training: the slow in-process tests' tier
@pytest.mark.slow
def test_a_cell_resumed_from_an_epoch_checkpoint_writes_what_an_uninterrupted_one_writes(tiny_spec, tmp_path):
    """In this process (no Ray task): the SMN cell of the tiny spec run through, and again resumed from its first
    epoch's checkpoint (saved to and read back from disk, as the engine does): the same metric names, and
    the same deterministic metrics (the frozen backbone's view check, steps, the mask and its evaluation);
    only ``resumed_from_epoch`` (and the timings) differ."""
    from smn_core.checkpoint import load_checkpoint, save_checkpoint
    from smn_core.pipeline import run_cell

    spec = load_spec(tiny_spec(epochs=2), ["methods=[smn]", "dataset.max_train_samples=64", "dataset.max_test_samples=30",
                                           "eval.knn_k=5", "eval.knn_dino_k=5", "eval.probe_max_iter=100"])
    (cell,) = expand_cells(spec)
    ckpt = tmp_path / "epoch1"

    def keep_first(epoch, metrics, state_fn):
        if epoch == 0:
            save_checkpoint(ckpt, *state_fn())

    full = run_cell(cell.config, on_epoch_end=keep_first).metrics
    resumed = run_cell(cell.config, resume=load_checkpoint(ckpt)).metrics
    assert set(resumed) == set(full), sorted(set(resumed) ^ set(full))
    assert VIEW_METRICS <= set(full)
    assert full["resumed_from_epoch"] == 0 and resumed["resumed_from_epoch"] == 1
    timings = {"train_seconds", "resumed_from_epoch"} | {k for k in full if k.endswith("_seconds")}
    for name in sorted(set(full) - timings):
        assert resumed[name] == pytest.approx(full[name], rel=1e-5, abs=1e-6), name
