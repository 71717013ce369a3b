"""A worker node removed during a sweep (ray.cluster_utils.Cluster: a head and two worker nodes) costs no
cell: the trials on it are retried elsewhere and resume from their checkpoints; the ledger ends with
exactly one row set per cell."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from orchestrator import ledger
from orchestrator.runner import run_experiment
from orchestrator.spec import expand_cells, load_spec

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_worker_node_lost_mid_sweep_costs_no_cell(tiny_spec, tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                                                    "RAY_AUTH_MODE": "disabled"}})
        spec = load_spec(tiny_spec("nodeloss", epochs=4, extra="grid:\n  train.swav.num_prototypes: [10, 20, 30]\n"),
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
    finally:
        ray.shutdown()
        cluster.shutdown()
