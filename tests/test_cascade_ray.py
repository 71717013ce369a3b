"""The cascade end to end on a real local Ray and real data (digits 5-9, CIFAR ResNet-8): the experts run
concurrently, routing is reproducible, the ledger holds every stage and a rerun is a resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.results import ledger
from orchestrator.spec.cascade import cascade_spec
from orchestrator.engine.cascade import plan_cascades, run_cascade
from orchestrator.spec.experiment import load_spec
from smn_core.checkpoint import load_tensors

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CASCADE_SPEC = """\
name: {name}
methods: [smn]
seeds: [0]
backbone: {{arch: cifar_resnet8, weights: random}}
dataset: {{source: digits, classes: [5, 6, 7, 8, 9], image_size: 16, max_train_samples: 160, max_test_samples: 60}}
train:
  epochs: {epochs}
  batch_size: 8
  score_lr: 200.0
  bn_mode: frozen
  swav: {{num_prototypes: 8, queue_length: 0, freeze_prototypes_steps: 0}}
  multicrop: {{n_global: 2, n_local: 1, local_size: 8}}
eval: {{knn_k: 20, batch_size: 160, probe_max_iter: 200}}
resources: {{workers: 1, cpus_per_worker: 1}}
cascade:
  router: {{components: 4, clusters: 5, seed: 0, covariance_type: spherical}}
  experts: {{epochs: {expert_epochs}, max_restarts: {max_restarts},
            resources: {{workers: 1, cpus_per_worker: {expert_cpus}}}}}
"""


def write_cascade_spec(tmp_path: Path, name: str, *, epochs: int = 2, expert_epochs: str = "null",
                       expert_cpus: float = 0.5, max_restarts: int = -1) -> Path:
    """A tiny real-data cascade spec (digits 5-9 at 16 px, 160 train images, five experts)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(CASCADE_SPEC.format(name=name, epochs=epochs, expert_epochs=expert_epochs,
                                        expert_cpus=expert_cpus, max_restarts=max_restarts))
    return path


def _kill_an_expert_mid_training(spec, plan, results: str, epochs_of) -> tuple[dict, str]:
    """Run the cascade in a thread; SIGKILL the warm worker of the first expert that has an epoch checkpoint and
    at least 4 epochs of its budget (``epochs_of(expert_id)``) left. Returns the run's summary and the victim."""
    outcome: dict = {}

    def drive() -> None:
        try:
            outcome["summary"] = run_cascade(spec, results, echo=print)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertions below
            outcome["error"] = exc

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    ckpts = Path(results) / spec.name / "checkpoints"
    victim = None
    deadline = time.time() + 400
    while victim is None and time.time() < deadline and driver.is_alive():
        for meta_path in ckpts.glob("*/meta.json") if ckpts.exists() else []:
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # being replaced right now
            eid = meta_path.parent.name
            if eid in plan.expert_ids and "pid" in meta and 1 <= meta["epoch"] < epochs_of(eid) - 4:
                victim = eid
                os.kill(meta["pid"], signal.SIGKILL)  # the expert's warm worker, started by this run
                break
        time.sleep(0.1)
    assert victim is not None, f"no expert checkpointed in time: {outcome}"
    driver.join(timeout=400)
    assert not driver.is_alive() and "error" not in outcome, outcome
    return outcome["summary"], victim


def test_cascade_end_to_end_a_killed_expert_resumes_experts_overlap_and_a_rerun_runs_nothing(ray_local, tmp_path):
    """The whole cascade on real data, with one fault: an expert whose worker is killed for good (no actor
    restarts) fails alone, with a failure record like any cell, while the other four run at the same time; the
    next run resumes it from its last epoch checkpoint and the record goes; then every stage's ledger rows,
    Table 3 and Fig. 11 are checked, a third run runs nothing and routing is reproducible."""
    spec = load_spec(write_cascade_spec(tmp_path, "casc", epochs=3, max_restarts=0))
    cs = cascade_spec(spec)
    (plan,) = plan_cascades(spec, cs)
    results = str(tmp_path / "results")
    ckpts = Path(results) / "casc" / "checkpoints"

    def budget(eid: str) -> int:  # the step-matched expert budget, from the router's landed cluster sizes
        size = ledger.read_ledger(results, "casc").query(
            f"cell_id == '{plan.router_id}' and metric == 'cluster{plan.expert_ids.index(eid)}_train_size'")
        return int(np.floor(160 / float(size["value"].iloc[0]) * 3 + 0.5))

    first, victim = _kill_an_expert_mid_training(spec, plan, results, budget)
    assert list(first["failed"]) == [victim], first["failed"]
    assert first["experts"]["ran"] == 4 and first["combinations"]["ran"] == 0
    failures = ledger.read_failures(results, "casc")
    assert list(failures) == [victim] and failures[victim]["attempts"] == 1
    assert victim not in ledger.completed_cells(results, "casc")
    assert (ckpts / victim / "meta.json").exists(), "the killed expert's epoch checkpoint stays for the rerun"
    # the four other experts ran at the same time: every one started before any one finished
    experts = ledger.read_ledger(results, "casc").query("method == 'cascade_expert'").drop_duplicates("cell_id")
    assert len(experts) == 4 and experts["started_at"].max() < experts["finished_at"].min(), \
        experts[["started_at", "finished_at"]]

    lines: list[str] = []
    summary = run_cascade(spec, results, echo=lines.append)
    assert not summary["failed"], summary
    assert summary["experts"] == {"ran": 1, "skipped": 4} and summary["combinations"]["ran"] == 2
    assert ledger.read_failures(results, "casc") == {}, "landing the expert removes its failure record"
    assert not (ckpts / victim).exists(), "a landed expert's epoch checkpoints are spent"

    df = ledger.read_ledger(results, "casc")
    per_method = df.drop_duplicates("cell_id")["method"].value_counts().to_dict()
    assert per_method == {"smn": 1, "cascade_router": 1, "cascade_expert": 5, "cascade_conditional": 1,
                          "cascade_unconditional": 1}
    assert set(df["cell_id"]) == {plan.dispatcher.cell_id, plan.router_id, *plan.expert_ids,
                                  *plan.combination_ids.values()}

    # each expert trained on its own cluster, for the step-matched budget (the killed one too: its whole budget,
    # exactly once, resumed from its epoch checkpoint), from the dispatcher's state
    val = lambda cid, m: float(df[(df["cell_id"] == cid) & (df["metric"] == m)]["value"].iloc[0])  # noqa: E731
    assert val(victim, "resumed_from_epoch") >= 1, "the rerun resumed the expert from its epoch checkpoint"
    router_sizes = [val(plan.router_id, f"cluster{k}_train_size") for k in range(5)]
    assert sum(router_sizes) == 160
    for k, eid in enumerate(plan.expert_ids):
        assert val(eid, "cluster_size") == router_sizes[k]
        assert val(eid, "epochs") == int(np.floor(160 / router_sizes[k] * 3 + 0.5))
        assert val(eid, "steps") == val(eid, "epochs") * (router_sizes[k] // 8)
        cfg = json.loads(df[df["cell_id"] == eid]["config_json"].iloc[0])
        assert cfg["dispatcher_cell_id"] == plan.dispatcher.cell_id and cfg["expert"] == k

    # the combined embedding has the dispatcher's dimension; storage and forward passes follow Table 3
    feature_dim = val(plan.router_id, "feature_dim")
    for mode, cid in plan.combination_ids.items():
        assert val(cid, "embedding_dim") == feature_dim == 64
        assert val(cid, "concat_dim") == 6 * feature_dim
        assert val(cid, "forward_passes") == (2 if mode == "conditional" else 6)
        assert val(cid, "storage_bits") == 6 * val(plan.dispatcher.cell_id, "storage_bits")
        # the dispatcher rebuilt from its saved state embeds exactly as the trained model did
        assert val(cid, "dispatcher_knn_top1") == pytest.approx(val(plan.dispatcher.cell_id, "knn_top1"), abs=1e-12)
        assert 0.0 <= val(cid, "knn_top1") <= 1.0 and 0.0 <= val(cid, "linear_probe_top1") <= 1.0

    # the stored routes are the ones whose cluster sizes the router recorded
    routes = load_tensors(Path(results) / "casc" / "cascade" / plan.router_id / "routes.safetensors")
    assert torch.equal(routes["train_routes"].bincount(minlength=5).double(), torch.tensor(router_sizes).double())

    # Table 3 and Fig. 11 from the ledger alone
    from orchestrator.reports import registry as reports

    t3 = reports.tables()["table3"].build(df)
    assert list(t3.index) == ["Self-masking", "Self-masking, projected alike (control)",
                              "Self-masking + cascade (conditional)", "Self-masking + cascade (unconditional)"]
    uncond = plan.combination_ids["unconditional"]
    assert t3.loc["Self-masking, projected alike (control)", "digits k-NN"] == \
        f"{val(uncond, 'dispatcher_projected_knn_top1'):.3f}"
    assert t3.loc["Self-masking + cascade (unconditional)", "digits linear probe"] == \
        f"{val(uncond, 'linear_probe_top1'):.3f}"
    assert t3.loc["Self-masking + cascade (unconditional)", "Storage"].startswith("6β/32")
    assert t3.loc["Self-masking", "digits k-NN"] == f"{val(plan.dispatcher.cell_id, 'knn_top1'):.3f}"
    png = tmp_path / "fig11.png"
    reports.figures()["fig11"].draw(df, str(png))
    assert png.stat().st_size > 10_000

    # a rerun runs nothing
    again = run_cascade(spec, results, echo=lines.append)
    assert (again["router"], again["experts"], again["combinations"]) == (
        {"ran": 0, "skipped": 1}, {"ran": 0, "skipped": 5}, {"ran": 0, "skipped": 2})
    assert len(ledger.read_ledger(results, "casc")) == len(df)

    # routing is identical across two runs with one seed: move the router's results aside, run again
    exp_dir = Path(results) / "casc"
    aside = tmp_path / "aside"
    aside.mkdir()
    shutil.move(str(exp_dir / "ledger" / f"{plan.router_id}.parquet"), aside / "router.parquet")
    shutil.move(str(exp_dir / "cascade" / plan.router_id), aside / "router")
    third = run_cascade(spec, results, echo=lines.append)
    assert third["router"]["ran"] == 1 and third["experts"]["ran"] == 0 and third["combinations"]["ran"] == 0
    before = load_tensors(aside / "router" / "routes.safetensors")
    after = load_tensors(exp_dir / "cascade" / plan.router_id / "routes.safetensors")
    for key in ("train_routes", "test_routes", "train_embeddings"):
        assert torch.equal(before[key], after[key]), key
    r_before = load_tensors(aside / "router" / "router.safetensors")
    r_after = load_tensors(exp_dir / "cascade" / plan.router_id / "router.safetensors")
    assert all(torch.equal(r_before[k], r_after[k]) for k in r_before)
