"""A worker node removed during a sweep (ray.cluster_utils.Cluster: a head and two worker nodes) costs no
cell: the trials on it are retried elsewhere and resume from their checkpoints; the ledger ends with
exactly one row set per cell. Kept in its own file: it shuts down any Ray of the session first."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from orchestrator.results import ledger
from orchestrator.engine.plain import ensure_ray, run_experiment
from orchestrator.spec.experiment import expand_cells, load_spec

pytestmark = pytest.mark.slow


def test_worker_node_lost_mid_sweep_costs_no_cell(tiny_spec, tmp_path, monkeypatch):
    ray.shutdown()
    # a private Ray temp dir (the Cluster records its address under it, where no other ray.init() looks) and
    # token authentication off explicitly, before the head starts (Ray 2.59+ turns it on if a token file exists)
    ray_tmp = tempfile.mkdtemp(prefix="smnsc", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=2)  # 3 one-CPU trials on 2 x 2 CPUs: both nodes hold a trial
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        ensure_ray(cluster.address)
        spec = load_spec(tiny_spec("nodeloss", epochs=8, extra="grid:\n  train.swav.num_prototypes: [10, 20, 30]\n"),
                         ["methods=[smn]", "resources.max_retries=3"])
        results = tmp_path / "results"
        removed = threading.Event()

        def remove_when_a_cell_has_checkpointed() -> None:
            ckpts = results / "nodeloss" / "checkpoints"
            deadline = time.time() + 600
            while time.time() < deadline:
                if ckpts.exists() and list(ckpts.glob("*/meta.json")):
                    cluster.remove_node(doomed)  # SIGKILLs the node's raylet and its workers
                    removed.set()
                    return
                time.sleep(0.2)

        killer = threading.Thread(target=remove_when_a_cell_has_checkpointed, daemon=True)
        killer.start()
        lines: list[str] = []
        summary = run_experiment(spec, str(results), echo=lines.append)
        killer.join(timeout=5)
        assert removed.is_set(), "the node was never removed: the test did not test anything"
        assert not summary["failed"], "\n".join(lines)
        assert any("retrying" in line for line in lines), "no trial was on the removed node:\n" + "\n".join(lines)
        df = ledger.read_ledger(str(results), "nodeloss")
        assert set(df["cell_id"]) == {c.cell_id for c in expand_cells(spec)}
        assert not df.duplicated(["cell_id", "metric"]).any()
        steps = df[df["metric"] == "steps"].set_index("cell_id")["value"]
        assert (steps == 8 * (96 // 32)).all(), f"every cell ran its whole budget exactly once: {steps.to_dict()}"
        resumed = df[df["metric"] == "resumed_from_epoch"]["value"]
        print(f"resumed_from_epoch per cell: {sorted(resumed)}")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
