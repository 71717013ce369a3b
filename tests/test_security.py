"""Safe by default (issue 14): a local Ray started by ``smn`` uses token authentication (an outsider
cannot read it), resources the cluster can never give fail at once, Ctrl-C exits 130 with a line that
says how to resume, and redirected output carries no Ray INFO lines or ANSI colour codes."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.engine import session as ray_session
from orchestrator.cli.app import main as smn_main

from .conftest import REPO, STARTUP_TIMEOUT, TINY_SPEC, kill_driver_tree

RAY = str(Path(sys.executable).with_name("ray"))


def _clean_env(home: Path) -> dict[str, str]:
    """The environment of a fresh user: no RAY_* variables, its own HOME (so no token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    home.mkdir(parents=True, exist_ok=True)
    return env


# ----------------------------------------------------------------------------------- auth, unit level


@pytest.mark.unit
def test_token_file_is_created_private_and_a_loose_one_is_tightened(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray" / "auth_token"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    path = ray_session.ensure_token_file()
    assert path == tmp_path / "ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    token = path.read_text()
    os.chmod(path, 0o644)
    assert ray_session.ensure_token_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token  # kept, tightened


@pytest.mark.unit
def test_disabled_auth_is_the_users_explicit_choice_and_says_what_is_exposed(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_session.configure_auth(local=True) == "disabled"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [ray_session.DISABLED_WARNING]
    assert "any client" in err[0] and "every interface" in err[0]


@pytest.mark.unit
def test_the_watchdog_leaves_at_once_when_the_session_ended_normally(tmp_path):
    """The driver (this process) lives and the node's processes are gone (``ray.shutdown()``): the watchdog
    returns at once and signals nothing."""
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have this pid
    t0 = time.monotonic()
    assert ray_session.watch_driver(os.getpid(), str(tmp_path / "session_x"), [gone], poll_s=5) == 0
    assert time.monotonic() - t0 < 2


@pytest.mark.unit
def test_remote_errors_carry_no_colour_codes(monkeypatch):
    """Ray heads a remote error's text with ANSI colours, which Ray Tune writes into each failed trial's
    ``error.txt`` under the results folder (issue 26); :func:`plain_ray_errors` (called by ``ensure_ray``)
    makes that text plain."""
    import ray.exceptions

    # Ray's own colorama (an earlier ensure_ray in this process may have replaced it); restored after the test
    monkeypatch.setattr(ray.exceptions, "colorama", sys.modules["colorama"])
    error = ray.exceptions.RayTaskError("call", "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                                        "ValueError: bad", ValueError("bad"), proctitle="ray::CellWorker.call")
    assert "\x1b[" in str(error)  # Ray's own formatting, before
    ray_session.plain_ray_errors()
    text = str(error)
    assert "\x1b" not in text and text.startswith("ray::CellWorker.call() (pid=") and "ValueError: bad" in text


@pytest.mark.unit
def test_a_worker_stopped_mid_gc_reports_no_systemexit(monkeypatch):
    """Ray's SIGTERM handler raises SystemExit; raised inside a garbage-collection callback it cannot propagate
    and Python reports it through ``sys.unraisablehook`` ("Exception ignored in: ..."). The workers' setup hook
    drops that report only: any other unraisable exception still reaches the hook that was there before."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    ray_session.quiet_worker_exit()

    class Dies:
        def __init__(self, exc: BaseException):
            self.exc = exc

        def __del__(self):
            raise self.exc

    Dies(SystemExit(1))  # collected at once: its __del__ raises where nothing can catch it
    assert seen == []
    Dies(ValueError("kept"))
    assert [type(u.exc_value) for u in seen] == [ValueError]
    from orchestrator.engine.plain import worker_runtime_env

    env = worker_runtime_env({"X": "1"})
    assert env["worker_process_setup_hook"] == ray_session.WORKER_SETUP_HOOK and env["env_vars"]["X"] == "1"


@pytest.mark.ray
def test_every_worker_runs_the_setup_hook(ray_local):
    """The session's Ray (started with :func:`worker_runtime_env`, as ``smn run`` starts its own) runs the hook
    named by its module path in each worker before the worker's first task."""
    import ray

    @ray.remote(num_cpus=0)
    def hook_name() -> str:
        return sys.unraisablehook.__qualname__

    assert ray.get(hook_name.remote(), timeout=120) == "quiet_worker_exit.<locals>.hook"


# ----------------------------------------------------------------------------------- the outsider test


def _session_processes(driver_pid: int, marker: str) -> list[psutil.Process]:
    """The driver, its descendants, and every process naming ``marker`` (the run's Ray temp folder) on its
    command line (Ray's agents re-parent to PID 1 when the raylet dies)."""
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid == driver_pid or marker in " ".join(proc.info["cmdline"] or []) or \
                    any(p.pid == driver_pid for p in proc.parents()):
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return list(found.values())


def _listeners(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """``(process name, ip, port)`` of every listening TCP socket of ``procs`` still alive."""
    out = []
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            out += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return out


def _answers_without_token(ip: str, port: int) -> str | None:
    """What a client without the token gets from ``ip:port`` that it should not: an HTTP status below 400, or
    a gRPC call that is not refused (``UNAUTHENTICATED``); None when it is refused both ways."""
    import urllib.error
    import urllib.request

    import grpc

    host = f"[{ip}]" if ":" in ip else ip
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5) as resp:
            return f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        if exc.code < 400:
            return f"HTTP {exc.code}"
    except Exception:  # noqa: BLE001 - not an HTTP server (a gRPC one): asked below
        pass
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
        try:
            call(b"", timeout=5)
            return "gRPC OK"
        except grpc.RpcError as exc:
            code = exc.code()
    return None if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DEADLINE_EXCEEDED) else f"gRPC {code.name}"


def _exposed(listening: list[tuple[str, str, int]]) -> list[str]:
    """The listeners off loopback that answer a client without the token."""
    bad = []
    for name, ip, port in listening:
        if ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback:
            continue
        answer = _answers_without_token(ip, port)
        if answer is not None:
            bad.append(f"{name} on {ip}:{port} answers {answer}")
    return bad


def _http_status(url: str, token: str | None = None) -> int:
    """The HTTP status ``url`` answers (with ``Authorization: Bearer token`` when given)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    deadline = time.time() + 60  # the dashboard's HTTP server may still be starting
    while True:
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except urllib.error.URLError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _read_gcs(driver: subprocess.Popen) -> tuple[str | None, str]:
    """The GCS address the driver prints once its Ray is up (None if it exits first), and its output."""
    lines: list[str] = []
    deadline = time.time() + 240
    while time.time() < deadline:
        line = driver.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("GCS "):
            return line.split()[1], "".join(lines)
    return None, "".join(lines)


@pytest.mark.cluster
@pytest.mark.slow
def test_an_outsider_cannot_read_a_local_smn_ray(tmp_path):
    """Start a local Ray the way ``smn run`` does (``ensure_ray``, RAY_AUTH_MODE unset), then read it with
    ``ray status``: the same user (who holds the token) can, an outsider without the token cannot. Every
    listening socket of the run's processes (psutil) is on loopback or refuses a client without the token
    (HTTP and gRPC) while it runs a task, and none is left 10 s after the driver is SIGKILLed (issue 26:
    Ray's agents alone kept theirs 40-60 s; the session's watchdog ends them)."""
    owner_env = _clean_env(tmp_path / "owner")
    ray_tmp = tempfile.mkdtemp(prefix="smnsec", dir="/tmp")  # names every process of this Ray (short: sockets)
    owner_env["RAY_TMPDIR"] = ray_tmp
    code = ("import sys, ray\n"
            "from orchestrator.engine.plain import ensure_ray\n"
            "ensure_ray(num_cpus=1, dashboard=True)\n"  # smn run --dashboard
            "assert ray.get(ray.remote(lambda: 1).remote()) == 1\n"  # a worker process, listening too
            "print('GCS', ray.get_runtime_context().gcs_address, flush=True)\n"
            "sys.stdin.readline()\n"
            "ray.shutdown()\n")
    gcs, text = None, ""
    for _ in range(3):  # a raylet that misses its startup deadline on a loaded machine: start again
        driver = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=owner_env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        gcs, text = _read_gcs(driver)
        if gcs or STARTUP_TIMEOUT not in text:
            break
        kill_driver_tree(driver, ray_tmp)
    try:
        assert gcs, f"the local Ray did not start:\n{text[-3000:]}"
        token = tmp_path / "owner" / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        # --dashboard: its address is printed, on loopback, and its HTTP API wants the same token
        dash = re.search(r"Ray dashboard: (http://[\d.]+:\d+) \(token authentication: paste the token from (\S+) ", text)
        assert dash and dash.group(1).startswith("http://127.0.0.1:"), text[-2000:]
        assert dash.group(2) == str(token)
        assert _http_status(dash.group(1) + "/api/version") in (401, 403)
        assert _http_status(dash.group(1) + "/api/version", token.read_text().strip()) == 200

        def status(env: dict) -> subprocess.CompletedProcess:
            return subprocess.run([RAY, "status", "--address", gcs], env=env, capture_output=True, text=True,
                                  timeout=120)

        # the node is 127.0.0.1: a ray CLI reaches it with Ray's single-machine switch (else it maps 127.0.0.1
        # to this machine's external IP, where nothing listens); an outsider on this machine can do the same
        local = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        insider = status({**owner_env, "RAY_AUTH_MODE": "token", **local})
        assert insider.returncode == 0, insider.stderr[-2000:]  # the check below can fail: the cluster is readable
        outsiders = {
            "no token, no auth mode": {**_clean_env(tmp_path / "outsider"), **local},
            "auth mode token, wrong token": {**_clean_env(tmp_path / "outsider"), **local, "RAY_AUTH_MODE": "token",
                                             "RAY_AUTH_TOKEN": "0" * 64},
        }
        for who, env in outsiders.items():
            out = status(env)
            assert out.returncode != 0, f"{who}: read the cluster:\n{out.stdout[-2000:]}"
            assert "Authentication token is missing or incorrect" in out.stdout + out.stderr, who

        procs = _session_processes(driver.pid, ray_tmp)
        during = _listeners(procs)
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in during}, during  # the scan sees Ray's servers
        assert _exposed(during) == [], during
        assert all(ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback for _, ip, _ in during), during
        os.kill(driver.pid, signal.SIGKILL)  # a crash: nothing of the driver runs any more
        driver.wait(timeout=30)
        killed = time.monotonic()
        after = _listeners(procs)
        while after and time.monotonic() - killed < 10:  # the watchdog ends the session (Ray alone: 40-60 s)
            time.sleep(0.25)
            after = _listeners(procs)
        gone_s = time.monotonic() - killed
        assert after == [], f"still listening {gone_s:.0f}s after the driver's SIGKILL: {after}"
        print(f"listening during the run: {len(during)}; none {gone_s:.1f}s after the driver's SIGKILL")
    finally:
        for proc in _session_processes(driver.pid, ray_tmp):
            if proc.pid != os.getpid():
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------- no hangs


@pytest.mark.ray
def test_cpus_the_cluster_can_never_give_fail_at_once(ray_local, tiny_spec, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SMN_ALLOW_AUTOSCALE_CPUS", raising=False)
    biggest = max(n["Resources"].get("CPU", 0) for n in ray_local.nodes() if n["Alive"])
    results = tmp_path / "results"
    assert smn_main(["validate", str(tiny_spec("cpus"))]) == 0  # imports warm: time the check, not torch's import
    capsys.readouterr()
    for override, words in ((f"resources.cpus_per_worker={int(biggest) * 16}", "the largest Ray node has"),
                            (f"resources.workers={int(biggest) + 1}", "CPUs but the Ray cluster has")):
        t0 = time.time()
        code = smn_main(["run", str(tiny_spec("cpus")), "--results", str(results), override])
        took = time.time() - t0
        err = capsys.readouterr().err
        assert code == 1, err
        assert took < 10, f"{override}: {took:.1f}s"
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and words in lines[0] and "SMN_ALLOW_AUTOSCALE_CPUS" in lines[0], err
        assert not results.exists() or not any(results.rglob("*.parquet"))
    monkeypatch.setenv("SMN_ALLOW_AUTOSCALE_CPUS", "1")  # an autoscaling cluster may add a big node later
    ray_session.check_cluster_fits(biggest * 16)


# ----------------------------------------------------------------------------------- Ctrl-C, redirected output


@pytest.mark.cluster
@pytest.mark.slow
def test_ctrl_c_exits_130_and_redirected_output_is_plain(tmp_path):
    """A real ``smn run`` with stdout and stderr redirected: no Ray INFO lines, no ANSI codes; Ctrl-C
    (SIGINT) once the first cell is done gives one line saying how to resume, exit 130, no traceback."""
    spec = tmp_path / "ctrlc.yaml"
    # one cell at a time, 6 cells of 8 epochs: when the first has landed, seconds of work are left for the Ctrl-C
    # to interrupt (with 4 one-epoch cells at once, a busy machine saw the run end before the signal came)
    spec.write_text(TINY_SPEC.format(name="ctrlc", epochs=8, workers=1).replace("seeds: [0]", "seeds: [0, 1, 2]")
                    .replace("cpus_per_worker: 1}", "cpus_per_worker: 1, max_concurrent_cells: 1}"))
    # unbuffered: the driver's progress lines go to a file, where Python buffers them by the block; the test waits
    # for the first "cells done" line, which otherwise may reach the file only when the run has ended
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(spec), "--results",
                                 str(tmp_path / "results")], cwd=REPO, env=env, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.time() + 400
            while time.time() < deadline and "cells done" not in out_path.read_text():
                assert proc.poll() is None, err_path.read_text()[-3000:]
                time.sleep(0.2)
            assert "cells done" in out_path.read_text(), "no cell finished in time"
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                kill_driver_tree(proc, str(tmp_path))
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert rc == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "smn: interrupted: run the same command again to resume"
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-3000:]
    for text in (stdout, stderr):
        assert "\x1b[" not in text, repr(text[-2000:])
        assert " INFO " not in text and "Started a local Ray instance" not in text, text[-2000:]


@pytest.mark.cluster
@pytest.mark.slow
def test_unsatisfiable_cpus_fail_in_a_fresh_smn_run_before_ray_starts(tiny_spec, tmp_path):
    """The whole command, in a fresh process without Ray: refused before a local Ray is started."""
    need = (os.cpu_count() or 1) * 32
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(tiny_spec("fresh")), "--results",
                          str(tmp_path / "results"), f"resources.cpus_per_worker={need}"], cwd=REPO,
                         env=_clean_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"resources.cpus_per_worker={need} but this machine" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "home" / ".ray").exists()  # no Ray was started (it would have made a token)
    print(f"refused in {took:.1f}s (a fresh process, imports included)")


@pytest.mark.ray
def test_a_remote_failure_is_one_line_naming_the_cell_and_the_stack_is_kept(ray_local, tiny_spec, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "junkdata"  # a Parquet dataset whose metadata is fine and whose images are not images:
    data.mkdir()                  # the spec passes its checks, the cell fails when it decodes them
    for split in ("train", "test"):
        images = pa.array([{"bytes": b"not an image" * 4, "path": None}] * 64,
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        pq.write_table(pa.table({"image": images, "label": pa.array([0, 1] * 32, pa.int64())}),
                       data / f"{split}.parquet")
    results = tmp_path / "results"
    code = smn_main(["run", str(tiny_spec("remote")), "--results", str(results), "methods=[smn]",
                     "dataset.source=parquet", f"dataset.root={data}", "dataset.classes=null",
                     "resources.max_retries=0"])
    captured = capsys.readouterr()
    assert code == 1, captured.err[-3000:]
    ours = [ln for ln in captured.err.splitlines() if ln.startswith("smn:")]
    assert len(ours) == 1 and ours[0].startswith("smn: cell ") and " failed: " in ours[0], captured.err[-3000:]
    assert "Traceback" not in ours[0]
    (record,) = (results / "remote" / "failures").glob("*.json")
    assert record.stem in ours[0] and str(record) in ours[0]
    assert "Traceback" in record.read_text() or "File " in record.read_text()  # the whole stack is kept
