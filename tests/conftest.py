"""Shared fixtures and the test tiers: paths to ../shared, one real local Ray for the session, small specs on real
data (sklearn digits), and one landed ledger for the read-side tests.

Every test carries exactly one tier marker (collection fails otherwise):

- ``unit``: fast, no Ray (a guard makes ``ray.init`` fail inside a unit test) and no subprocess: the inner loop,
  ``pytest -m unit`` (about 2 min on 2 cores);
- ``ray``: runs in the process of the one session-scoped local Ray (:func:`ray_local`, requested for every ``ray``
  test): the Ray tests, and the slow in-process tests (real training on CIFAR-10, CLIP, the mask store's real
  masks), which would make the inner loop minutes long;
- ``cluster``: starts processes of its own: a Ray (``ray.cluster_utils.Cluster``, ``ray start``,
  ``ray job submit``, a subprocess ``smn run``) or another Python (the benchmark harness, ``python -m
  orchestrator``). ``scripts/test.sh`` runs each tier in its own pytest process, so a cluster test
  never tears down the ``ray`` tier's session; in one process, the session's Ray is started again after a
  cluster test shut it down.

``slow`` stays, beside the tiers: a test that takes more than a few seconds (real training on CIFAR-10, CLIP,
Tune sweeps, clusters); no ``unit`` test is slow. ``scripts/test.sh`` runs every tier, slow tests included.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # explicit: Ray 2.59+ enables token auth silently
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def kill_driver_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL a driver started with ``start_new_session=True`` as a machine crash would: its process group,
    all its descendants (Ray workers rename themselves ``ray::...``, so they are found through the process
    tree, before the kill orphans them) and every process naming ``marker`` (its Ray temp dir) on its
    command line (GCS, raylet)."""
    import psutil

    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    me = os.getpid()
    victims += [p for p in psutil.process_iter(["cmdline"])
                if p.pid != me and any(marker in a for a in (p.info["cmdline"] or []))]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    proc.wait(timeout=30)


DEMO_LEDGER = REPO / "docs" / "results" / "demo" / "ledger"


def demo_cell_files(controls: bool = False) -> list[Path]:
    """The committed demo ledger's cell files, sorted by name; without the random-mask controls' (issue 25: 6 of
    15) unless ``controls``: the 9 cells (frozen, BN control and SMN on seeds 0-2) that the demo spec expands to
    before its controls can run."""
    import pyarrow.parquet as pq

    files = sorted(DEMO_LEDGER.glob("*.parquet"))
    return files if controls else [
        f for f in files if not pq.read_table(f, columns=["method"])["method"][0].as_py().startswith("random_mask")]


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared data, absent on this machine)")
    return path


TIERS = ("unit", "ray", "cluster")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: every collected file is checked, whatever runs
def pytest_collection_modifyitems(config, items):
    """Fail collection when a test has no tier marker or more than one (:data:`TIERS`)."""
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'none'}")
    if wrong:
        raise pytest.UsageError("every test needs exactly one tier marker (pytest.mark.unit, .ray or .cluster; "
                                "see tests/conftest.py); these have " + ("none or several:\n" + "\n".join(wrong)))


def _tier(item) -> str:
    return next(m.name for m in item.iter_markers() if m.name in TIERS)


STARTUP_TIMEOUT = "timed out during startup"
"""Ray's words when a raylet missed its fixed 30 s to register with the GCS (``ray/_private/node.py``), which a
loaded 2-core machine can miss: such a start is tried again."""


def _start_session_ray():
    import ray

    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            # address="local": always a fresh instance, never a cluster some other process started
            from orchestrator.engine.plain import worker_runtime_env  # the product's workers' env and setup hook

            ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                     runtime_env=worker_runtime_env({"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}))
        except Exception as exc:  # noqa: BLE001 - only the startup timeout is retried
            ray.shutdown()
            if STARTUP_TIMEOUT not in str(exc) or attempt == 2:
                raise
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance for the whole session (4 logical CPUs on 127.0.0.1), shared by every ``ray``
    test; ``cluster`` tests may not use it."""
    ray = _start_session_ray()
    yield ray
    ray.shutdown()


def _unit_guard(*args, **kwargs):
    raise RuntimeError("a unit test started Ray: mark it pytest.mark.ray (the shared session Ray) or "
                       "pytest.mark.cluster (a Ray of its own)")


@pytest.fixture(autouse=True)
def _tier_setup(request, monkeypatch):
    """Per tier: ``unit`` may not start Ray; ``ray`` gets the session's Ray (started again if a cluster test
    of the same process shut it down); ``cluster`` may not ask for the session's Ray (it shuts down any Ray of
    its process before starting its own)."""
    tier = _tier(request.node)
    if tier == "unit":
        import ray

        monkeypatch.setattr(ray, "init", _unit_guard)
        yield
    elif tier == "ray":
        request.getfixturevalue("ray_local")
        _start_session_ray()
        yield
    else:
        if "ray_local" in request.fixturenames:
            pytest.fail("a cluster test may not use the session's ray_local: it starts a Ray of its own")
        yield


TINY_SPEC = """\
name: {name}
methods: [pretrained, smn]
seeds: [0]
backbone: {{arch: cifar_resnet8, weights: random}}
dataset: {{source: digits, classes: [5, 6, 7, 8, 9], image_size: 16, max_train_samples: 96, max_test_samples: 60}}
train:
  epochs: {epochs}
  batch_size: 32
  bn_mode: frozen
  swav: {{num_prototypes: 20, queue_length: 0, freeze_prototypes_steps: 0}}
  multicrop: {{n_global: 2, n_local: 2, local_size: 8}}
eval: {{knn_k: 20, batch_size: 128}}
resources: {{workers: {workers}, cpus_per_worker: 1}}
"""


@pytest.fixture
def tiny_spec(tmp_path):
    """Write a tiny real-data spec (digits 5-9 at 16 px, ResNet-8) and return its path."""

    def make(name: str = "tiny", epochs: int = 1, workers: int = 1, extra: str = "") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(TINY_SPEC.format(name=name, epochs=epochs, workers=workers) + extra)
        return path

    return make


LANDED_GRID = """
grid:
  train.swav.num_prototypes: [10, 20, 30]
tracking:
  mlflow: {{uri: {mlruns}}}
  wandb: {{project: smn-test, mode: offline, dir: {wandb}}}
"""


def last_json(text: str) -> dict:
    """The summary object ``smn run --json`` prints last (Ray may still forward a worker line before it)."""
    import json

    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def _smn_run_json(args: list[str]) -> dict:
    import contextlib
    import io

    from orchestrator.cli.app import main

    buf = io.StringIO()  # capsys is function-scoped: capture stdout by hand
    with contextlib.redirect_stdout(buf):
        code = main(["run", *args, "--json"])
    assert code == 0, buf.getvalue()[-3000:]
    return last_json(buf.getvalue())


@pytest.fixture(scope="session")
def landed(ray_local, tmp_path_factory):
    """Two landed experiments for the read-side tests (report, table, ls, tracking, the store), run once per
    session on the shared Ray through ``smn run --json`` (the CLI in this process):

    - ``landed["plain"]``: the tiny plain spec (:data:`TINY_SPEC`: the frozen backbone and SMN, seed 0,
      1 epoch), experiment ``tiny``, in its own results folder;
    - ``landed["grid"]``: a 3-cell SMN grid over the prototype count (2 epochs), experiment ``sweep3``,
      tracked in MLflow (a file store, ``root/mlruns``) and W&B (offline, ``root/wb``), run twice: the
      second run lands and tracks nothing.

    Each is a dict: ``root``, ``spec`` (path), ``results`` (str), ``first`` / ``second`` (the JSON summaries;
    ``plain`` has ``first`` only). Tests may add files beside the ledger but must not change what landed.
    """
    out = {}
    root = tmp_path_factory.mktemp("landed-plain")
    spec = root / "tiny.yaml"
    spec.write_text(TINY_SPEC.format(name="tiny", epochs=1, workers=1))
    results = root / "results"
    out["plain"] = {"root": root, "spec": spec, "results": str(results),
                    "first": _smn_run_json([str(spec), "--results", str(results)])}
    root = tmp_path_factory.mktemp("landed-grid")
    spec = root / "sweep3.yaml"
    spec.write_text(TINY_SPEC.format(name="sweep3", epochs=2, workers=1)
                    + LANDED_GRID.format(mlruns=root / "mlruns", wandb=root / "wb"))
    results = root / "results"
    runs = [_smn_run_json([str(spec), "--results", str(results), "methods=[smn]"]) for _ in range(2)]
    out["grid"] = {"root": root, "spec": spec, "results": str(results), "first": runs[0], "second": runs[1]}
    return out
