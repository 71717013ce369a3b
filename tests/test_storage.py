"""The results-location preflight (orchestrator.engine.preflight) on real filesystems and a real multi-node Ray.

The multi-node tests run a head plus worker nodes on this machine. A node that cannot reach the shared
storage is made for real: a `ray start` worker node inside its own mount namespace (`unshare -m`, needs
root), where the results folder is covered by an empty tmpfs (an NFS export that is not mounted there:
writable, but not the driver's files) or bind-mounted read-only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from orchestrator.results import ledger
from orchestrator.cli.app import main as smn_main
from orchestrator.engine.plain import run_experiment
from orchestrator.spec.experiment import load_spec
from orchestrator.engine.preflight import StorageUnreachable, check_results_location

from .conftest import REPO

RAY_BIN = str(Path(sys.executable).with_name("ray"))
# The isolated nodes' Python processes cache their bytecode here (outside the venv): a raylet gives its
# agents a fixed 15 s to start (ray-project/ray#65983), and compiling Ray's modules on every start (a venv
# without .pyc files and PYTHONDONTWRITEBYTECODE=1) can take longer than that on a loaded 2-core machine.
PYCACHE = os.path.join(tempfile.gettempdir(), "smn-test-pycache")
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}}


@pytest.mark.unit
def test_local_folder_is_checked_and_left_clean(tmp_path):
    results = tmp_path / "new" / "results"
    check_results_location(str(results))
    assert results.is_dir() and list(results.iterdir()) == []  # the probe folder is removed


@pytest.mark.unit
def test_file_uri_is_checked(tmp_path):
    check_results_location(f"file://{tmp_path}/res")
    assert (tmp_path / "res").is_dir()


@pytest.mark.unit
def test_unwritable_location_names_the_driver_and_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageUnreachable, match=r"not writable from the driver \(host .+\)") as err:
        check_results_location(str(blocker / "results"))
    assert str(blocker / "results") in str(err.value)
    assert blocker.read_text() == "not a folder"


@pytest.mark.unit
def test_unsupported_uri_is_a_clear_error():
    with pytest.raises(ValueError, match=r"results location 'ftp://host/x' is not supported"):
        check_results_location("ftp://host/x")


# ---------------------------------------------------------------- multi-node (a real Ray cluster)


def _can_unshare() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    """Head + two worker nodes on this machine (1 CPU each); the driver (this process) is on the head.

    The nodes take the machine's own IP: a driver cannot join a cluster_utils head bound to 127.0.0.1,
    because ray.init rewrites a 127.0.0.1 address to that IP. A cluster test: its own pytest process
    (scripts/test.sh), so no session Ray is up; in a one-process run, conftest starts that again after.
    """
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address, runtime_env=RUNTIME_ENV)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _alive() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


@pytest.mark.cluster
@pytest.mark.slow
def test_shared_folder_passes_on_every_node(cluster, tmp_path):
    assert len(_alive()) == 3
    results = tmp_path / "results"
    t0 = time.time()
    check_results_location(str(results))
    print(f"preflight on 3 nodes: {time.time() - t0:.1f}s")
    assert results.is_dir() and list(results.iterdir()) == []


def _start_isolated_node(cluster: Cluster, folder: Path, how: str) -> subprocess.Popen:
    """A worker node whose mount namespace hides ``folder`` behind an empty tmpfs (``how="tmpfs"``) or
    makes it read-only (``how="readonly"``); the rest of the machine, Ray's sockets included, is shared."""
    mount = {"tmpfs": f"mount -t tmpfs smn-unshared {folder}",
             "readonly": f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"}[how]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "PYTHONPATH": str(REPO),
           "PYTHONPYCACHEPREFIX": PYCACHE}
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # see PYCACHE
    # explicit agent ports: with 0 the raylet waits (15 s at most) for the agents to report theirs, which a
    # loaded 2-core machine can miss; 52365 (the agent's default HTTP port) may be held by another Ray
    socks = [socket.socket() for _ in range(4)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    script = (f"mount --make-rprivate / && {mount} && exec {RAY_BIN} start --address={cluster.address} "
              f"--num-cpus=1 --dashboard-agent-listen-port={ports[0]} --dashboard-agent-grpc-port={ports[1]} "
              f"--runtime-env-agent-port={ports[2]} --metrics-export-port={ports[3]} --disable-usage-stats --block")
    return subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _join_isolated_node(cluster: Cluster, folder: Path, how: str, nodes_after: int) -> subprocess.Popen:
    """Start an isolated node and wait until it is alive. A raylet gives its agents a fixed 15 s to start
    (ray-project/ray#65983), which a loaded 2-core machine can miss: such a start is retried (3 tries)."""
    for attempt in range(3):
        proc = _start_isolated_node(cluster, folder, how)
        deadline = time.time() + 180
        while len(_alive()) < nodes_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        if len(_alive()) >= nodes_after:
            return proc
        output = proc.stdout.read() if proc.poll() is not None else "(still starting)"
        _stop_tree(proc)
    pytest.fail(f"the {how} node did not join in 3 tries:\n{output}")


def _stop_tree(proc: subprocess.Popen) -> None:
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    proc.wait(timeout=30)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs Linux mount namespaces (unshare -m as root)")
def test_nodes_without_the_shared_storage_are_named_and_nothing_runs(cluster, tiny_spec, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    before = _alive()
    procs = []
    try:
        for how in ("tmpfs", "readonly"):  # one after the other: `ray start`s racing for ports crash
            procs.append(_join_isolated_node(cluster, results, how, len(before) + len(procs) + 1))
        isolated = {n["NodeID"]: n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before}

        with pytest.raises(StorageUnreachable) as err:
            check_results_location(str(results))
        msg = str(err.value)
        assert f"results location {str(results)!r} is not shared by every node" in msg
        problems = [line for line in msg.splitlines() if line.startswith("  node ")]
        assert len(problems) == 2, msg  # exactly the two isolated nodes; the head and the two good workers pass
        for node_id in isolated:
            assert sum(node_id[:12] in line for line in problems) == 1, msg
        assert "cannot read the driver's probe file" in msg  # tmpfs: an empty folder of its own
        assert "cannot write" in msg and "Read-only file system" in msg  # read-only bind mount
        assert list(results.iterdir()) == []  # the probes are cleaned up on the driver's side

        # the same check stops `smn run` before any cell runs: a clear message, exit code 2, no ledger
        spec_path = tiny_spec("unshared")
        with pytest.raises(StorageUnreachable):
            run_experiment(load_spec(spec_path), str(results), echo=lambda s: None)
        assert smn_main(["run", str(spec_path), "--results", str(results)]) == 1
        assert ledger.completed_cells(str(results), "unshared") == set()
        assert not (results / "unshared").exists()
    finally:
        for p in procs:
            _stop_tree(p)
