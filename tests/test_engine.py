"""The cell engine, the experiment layout and the ledger's per-cell reads, on real files and a real local Ray:
every location from one layout, atomic writes, read_cell / wide, bounded submission with retries, warm
workers that keep their process across jobs and replay a job after their process is killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from smn_core.checkpoint import atomic_write


@pytest.mark.unit
def test_layout_names_every_location_local_and_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lay = ExperimentLayout.of("res", "exp")
    assert lay.results == str(tmp_path / "res")  # relative input made absolute where the user typed it
    assert lay.mask("c1") == f"{tmp_path}/res/exp/masks/c1.safetensors"
    assert lay.state("c1") == f"{tmp_path}/res/exp/states/c1"
    assert lay.checkpoint("c1") == f"{tmp_path}/res/exp/checkpoints/c1"
    assert lay.cascade("r1", "routes.safetensors") == f"{tmp_path}/res/exp/cascade/r1/routes.safetensors"
    assert lay.ledger_file("c1") == f"{tmp_path}/res/exp/ledger/c1.parquet"
    assert lay.figure("fig8") == f"{tmp_path}/res/figures/fig8.png"
    assert ExperimentLayout.of(lay, "other").results == lay.results
    uri = ExperimentLayout.of("s3://bucket/pre/?endpoint_override=localhost:9&scheme=http", "exp")
    assert uri.is_uri and uri.tune == "s3://bucket/pre/exp/tune?endpoint_override=localhost:9&scheme=http"
    assert uri.artifact("a.safetensors") == \
        "s3://bucket/pre/exp/artifacts/a.safetensors?endpoint_override=localhost:9&scheme=http"
    assert ExperimentLayout.of("s3://bucket/pre?x=1", "exp").location("masks", "m") == "s3://bucket/pre/exp/masks/m?x=1"
    for bad in ("..", "", "a/b", "q?x"):
        with pytest.raises(ValueError, match="not a plain name"):
            lay.location("masks", bad)


@pytest.mark.unit
def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "deep" / "dir" / "f.json"
    atomic_write(str(target), b"first")
    atomic_write(f"file://{target}", b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


@pytest.mark.unit
def test_read_cell_reads_one_file_and_wide_has_one_row_per_cell(tmp_path):
    results = str(tmp_path / "r")
    lay = ExperimentLayout.of(results, "e")
    common = dict(method="smn", backbone="b", dataset="digits", seed=0, config={"a": 1}, started_at=1.0e9,
                  finished_at=1.0e9 + 5)
    ledger.write_cell(results, "e", cell_id="c1", grid={"k": 1}, metrics={"knn_top1": 0.5, "wall_s": 5.0}, **common)
    ledger.write_cell(results, "e", cell_id="c2", grid={"k": 2}, metrics={"knn_top1": 0.7, "density": 0.3}, **common)
    assert ledger.read_cell(lay, "c1") == {"knn_top1": 0.5, "wall_s": 5.0}
    assert ledger.read_cell(lay, "nope") is None
    Path(lay.ledger_file("c2")).write_bytes(b"not parquet")
    assert ledger.read_cell(lay, "c2") is None  # unreadable: not done, the cell runs again
    ledger.write_cell(results, "e", cell_id="c2", grid={"k": 2}, metrics={"knn_top1": 0.7, "density": 0.3}, **common)
    w = ledger.wide(ledger.read_ledger(results, "e"))
    assert list(w["cell_id"]) == ["c1", "c2"]
    assert w.set_index("cell_id").loc["c2", "density"] == 0.3 and w["density"].isna().tolist() == [True, False]
    assert {"method", "grid_json", "started_at", "knn_top1"} <= set(w.columns)
    assert ledger.wide(ledger.read_ledger(results, "missing")).empty


@pytest.mark.unit
def test_land_writes_failure_records_measurements_and_trained_cells(tmp_path):
    """land() is the one writer: a failure record, then a measurement cell (no wall_s), then a trained cell's
    masks, state, curves and ledger file, with its epoch checkpoint dropped and its failure record removed."""
    import torch

    from orchestrator.engine.cell import CellJob, Failure, Record, land
    from smn_core.checkpoint import has_checkpoint, load_checkpoint, load_tensors, save_checkpoint
    from smn_core.pipeline import CellOutcome
    from smn_core.config import BackboneSpec, CellConfig

    lay = ExperimentLayout.of(str(tmp_path / "r"), "e")
    cfg = CellConfig(method="smn", backbone=BackboneSpec(arch="cifar_resnet8", weights="random"))
    job = CellJob(cfg, "c1", "smn seed=0", {"k": 1}, lay)
    assert land(job, Failure("ValueError: boom", 3), None) == {}
    assert ledger.read_failures(lay.results, "e")["c1"]["attempts"] == 3 and not ledger.completed_cells(lay.results, "e")

    measured = CellJob(None, "m1", "codec", {"payload": "mask"}, lay, record=Record("codec:none", "b", "d", 0, {"x": 1}))
    assert land(measured, {"bytes": 10.0}, None) == {"bytes": 10.0}  # a measurement has no wall time
    row = ledger.read_ledger(lay.results, "e").query("cell_id == 'm1'")
    assert row["method"].tolist() == ["codec:none"] and (row["started_at"] == row["finished_at"]).all()

    save_checkpoint(lay.checkpoint("c1"), {"w": torch.zeros(1)}, {"epoch": 0})
    outcome = CellOutcome(metrics={"knn_top1": 0.5}, masks={"conv.weight": torch.ones(2, 2)},
                          history=[{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.5}], train_result=None,
                          state={"scores": torch.arange(3.0)})
    started = time.time() - 2.0
    metrics = land(job, outcome, started, extra={"expert": 1.0})
    assert list(metrics) == ["knn_top1", "expert", "wall_s"] and metrics["wall_s"] >= 2.0
    assert ledger.read_cell(lay, "c1") == metrics and "c1" not in ledger.read_failures(lay.results, "e")
    assert torch.equal(load_tensors(lay.mask("c1"))["conv.weight"], torch.ones(2, 2))
    state, meta = load_checkpoint(lay.state("c1"))
    assert torch.equal(state["scores"], torch.arange(3.0)) and meta["cell_id"] == "c1"
    assert meta["config"]["method"] == "smn" and meta["config"]["backbone"]["arch"] == "cifar_resnet8"
    assert not has_checkpoint(lay.checkpoint("c1")), "a landed cell's epoch checkpoints are spent"
    from orchestrator.results.curves import read_curves

    assert read_curves(lay, "c1")["loss"].tolist() == [2.0, 1.5]


def _flaky(marker: str, value: int) -> int:
    """Fails the first time it runs for ``marker`` (a file records the first try), then returns ``value``."""
    path = Path(marker)
    if not path.exists():
        path.write_text("tried")
        raise ValueError(f"first try of {value}")
    return value


def _window(folder: str, i: int) -> tuple[float, float]:
    t0 = time.time()
    time.sleep(0.5)
    return t0, time.time()


@pytest.mark.ray
@pytest.mark.slow
def test_run_bounded_keeps_the_limit_and_retries_application_errors(ray_local, tmp_path):
    import ray

    from orchestrator.engine.pool import run_bounded

    flaky = ray.remote(num_cpus=0)(_flaky)
    out = {item: (res, exc) for item, res, exc in
           run_bounded([1, 2, 3], lambda i, slot: flaky.remote(str(tmp_path / f"m{i}"), i * 10), 2, retries=1)}
    assert out == {1: (10, None), 2: (20, None), 3: (30, None)}  # each failed once, then succeeded
    out = list(run_bounded([4], lambda i, slot: flaky.remote(str(tmp_path / f"m{i}"), i), 1, retries=0))
    assert out[0][1] is None and "first try of 4" in str(out[0][2])

    window = ray.remote(num_cpus=0)(_window)
    slots = []
    spans = [res for _, res, _ in run_bounded(range(6), lambda i, slot: (slots.append(slot), window.remote("", i))[1], 2)]
    assert set(slots) == {0, 1}
    # never more than two in flight: at any start, at most one other window is open
    for s0, _ in spans:
        assert sum(1 for a, b in spans if a <= s0 < b) <= 2


def _pid_and_modules() -> tuple[int, bool]:
    import sys

    return os.getpid(), "smn_core.pipeline" in sys.modules


def _slow_job(marker: str) -> int:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(30 if not Path(marker + ".replayed").exists() else 0)
    return os.getpid()


@pytest.mark.ray
@pytest.mark.slow
def test_warm_worker_keeps_its_process_and_replays_a_job_after_its_process_dies(ray_local, tmp_path):
    import ray

    from orchestrator.engine.pool import WarmPool

    with WarmPool(1, num_cpus=1) as pool:
        info = pool.wait_warm(timeout=300)[0]
        assert info["import_s"] >= 0
        first = ray.get(pool.submit(0, _pid_and_modules))
        second = ray.get(pool.submit(0, _pid_and_modules))
        assert first == second == (info["pid"], True)  # one process, imports done once, many jobs

        marker = str(tmp_path / "job")
        ref = pool.submit(0, _slow_job, marker)
        deadline = time.time() + 120
        while not Path(marker).exists():
            assert time.time() < deadline
            time.sleep(0.1)
        victim = int(Path(marker).read_text())
        Path(marker + ".replayed").write_text("")  # the replay returns at once
        os.kill(victim, signal.SIGKILL)
        replayed_pid = ray.get(ref, timeout=300)  # Ray restarts the worker and replays the call
        assert replayed_pid != victim and int(Path(marker).read_text()) == replayed_pid


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_out_of_restarts_fails_its_job_and_heal_gives_the_slot_a_fresh_worker(ray_local, tmp_path):
    import ray

    from orchestrator.engine.pool import WarmPool, run_bounded

    with WarmPool(1, num_cpus=1, max_restarts=0, warm=False) as pool:
        marker = str(tmp_path / "job")
        jobs = [marker, "second"]

        def submit(item, slot):
            return pool.submit(slot, _slow_job, item) if item == marker else pool.submit(slot, _pid_and_modules)

        killed: list[int] = []

        def kill_when_started() -> None:
            deadline = time.time() + 120
            while not Path(marker).exists() and time.time() < deadline:
                time.sleep(0.1)
            killed.append(int(Path(marker).read_text()))
            os.kill(killed[0], signal.SIGKILL)

        import threading

        killer = threading.Thread(target=kill_when_started, daemon=True)
        killer.start()
        (first, _, err), (second, (pid, _), err2) = list(run_bounded(jobs, submit, 1, on_error=pool.heal))
        killer.join(timeout=5)
        victim = killed[0]
        assert first == marker and isinstance(err, ray.exceptions.RayActorError)
        assert second == "second" and err2 is None and pid != victim  # the slot's fresh worker ran it


@pytest.mark.ray
def test_pool_size_fits_fractional_workers_exactly(ray_local):
    """Ten 0.4-CPU experts fit on 4 CPUs (Ray counts in units of 1e-4; ``4 // 0.4`` is 9.0 in floats)."""
    import ray

    from orchestrator.engine.pool import pool_size

    assert ray.cluster_resources()["CPU"] == 4
    assert pool_size(12, 0.4, 0) == 10
    assert pool_size(3, 0.4, 0) == 3          # never more than wanted
    assert pool_size(5, 1.5, 0) == 2
    assert pool_size(5, 8.0, 0) == 1          # at least one: an autoscaler may add the node it needs
