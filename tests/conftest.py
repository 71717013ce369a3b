"""Shared fixtures: paths to ../shared, a real local Ray, small specs on real data (sklearn digits)."""

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


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared data, absent on this machine)")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance for the whole session (4 logical CPUs on 127.0.0.1)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster some other process started
        ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


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
