"""A node removed in the middle of the expert stage costs no expert (ray.cluster_utils.Cluster: a head and
two worker nodes, real data). Kept in its own file: it shuts down any Ray of the session first."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from orchestrator.results import ledger
from orchestrator.spec.cascade import cascade_spec
from orchestrator.engine.cascade import plan_cascades, run_cascade
from orchestrator.engine.plain import ensure_ray
from orchestrator.spec.experiment import load_spec

from .test_cascade_ray import write_cascade_spec

pytestmark = pytest.mark.slow

EXPERT_EPOCHS = 10


def test_node_loss_during_expert_training_costs_no_expert(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # a private Ray temp dir: the Cluster records its address under it, where no other ray.init() looks
    ray_tmp = tempfile.mkdtemp(prefix="smncc", dir="/tmp")
    old_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        ensure_ray(cluster.address)
        spec = load_spec(write_cascade_spec(tmp_path, "nodeloss", epochs=2, expert_epochs=str(EXPERT_EPOCHS),
                                            expert_cpus=1))
        (plan,) = plan_cascades(spec, cascade_spec(spec))
        results = str(tmp_path / "results")
        outcome: dict = {}

        def drive() -> None:
            try:
                outcome["summary"] = run_cascade(spec, results, address=cluster.address, echo=print)
            except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
                outcome["error"] = exc

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        by_id = {w.node_id: w for w in workers}
        ckpts = Path(results) / "nodeloss" / "checkpoints"
        victim = victim_expert = None
        deadline = time.time() + 400
        while victim is None and time.time() < deadline and driver.is_alive():
            for meta_path in ckpts.glob("*/meta.json") if ckpts.exists() else []:
                try:
                    meta = json.loads(meta_path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue  # being replaced right now
                if (meta_path.parent.name in plan.expert_ids and meta.get("node_id") in by_id
                        and meta["epoch"] < EXPERT_EPOCHS - 3):
                    victim, victim_expert = by_id[meta["node_id"]], meta_path.parent.name
                    break
            time.sleep(0.2)
        assert victim is not None, f"no expert checkpointed on a worker node in time: {outcome}"
        cluster.remove_node(victim)
        driver.join(timeout=500)
        assert not driver.is_alive(), "the cascade did not finish after the node loss"
        assert "error" not in outcome, outcome.get("error")
        summary = outcome["summary"]
        assert not summary["failed"], summary["failed"]
        assert summary["experts"]["ran"] == 5 and summary["combinations"]["ran"] == 2

        df = ledger.read_ledger(results, "nodeloss")
        experts = df[df["method"] == "cascade_expert"]
        assert sorted(experts["cell_id"].unique()) == sorted(plan.expert_ids)
        assert not df.duplicated(["cell_id", "metric"]).any(), "one row set per expert, nothing twice"
        files = sorted(p.stem for p in (Path(results) / "nodeloss" / "ledger").glob("*.parquet"))
        assert sorted(set(plan.expert_ids) & set(files)) == sorted(plan.expert_ids)
        resumed = experts[(experts["cell_id"] == victim_expert) & (experts["metric"] == "resumed_from_epoch")]
        assert float(resumed["value"].iloc[0]) >= 1, "the expert on the lost node resumed from its checkpoint"
        for eid in plan.expert_ids:
            steps = float(experts[(experts["cell_id"] == eid) & (experts["metric"] == "steps")]["value"].iloc[0])
            size = float(experts[(experts["cell_id"] == eid) & (experts["metric"] == "cluster_size")]["value"].iloc[0])
            assert steps == EXPERT_EPOCHS * (size // 8), "every expert completed its whole budget exactly once"
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmp
        shutil.rmtree(ray_tmp, ignore_errors=True)
