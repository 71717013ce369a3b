"""The local Ray session ``smn`` starts or joins: token authentication by default, and a check, before
any work, that the cluster can ever give what a spec asks for.

Security (measured with Ray 2.60 on Linux): by default Ray's GCS, raylet, object manager and worker gRPC
servers listen on every interface (``*:PORT``), its agents on the machine's external IP and its metrics
exports on ``0.0.0.0``, whatever node IP is given. A local Ray started by ``smn`` keeps every listener on
``127.0.0.1`` (:func:`loopback_node`), and, since an open Ray cluster runs any code it is sent, uses Ray's
token authentication (``RAY_AUTH_MODE=token``) unless the user set ``RAY_AUTH_MODE`` explicitly. The token
lives in ``$RAY_AUTH_TOKEN_PATH`` or Ray's default ``~/.ray/auth_token``; :func:`ensure_token_file` creates it
on first use with a random value, readable only by the user (mode 0600), and tightens a looser one.
Every Ray client of the same user (``ray status``, ``ray job submit``) finds it there. A client without
the token is refused, and every listening socket of a local run is on loopback (``tests/test_security.py``).
Joining a cluster (``--address``) has a deadline (:func:`join_cluster`).

``RAY_AUTH_MODE=disabled`` remains possible when the user sets it; ``smn`` then prints one line saying
what is exposed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["AUTH_ENV", "ClusterTooSmall", "ClusterUnreachable", "configure_auth", "token_path", "ensure_token_file",
           "check_cluster_fits", "check_local_fits", "error_cause", "DISABLED_WARNING", "CONNECT_TIMEOUT_S",
           "parse_address", "probe_address", "join_cluster", "loopback_node", "every_log_line", "dashboard_line",
           "start_driver_watchdog", "watch_driver", "WATCHDOG_POLL_S", "plain_ray_errors", "check_auth_env",
           "WORKER_SETUP_HOOK", "quiet_worker_exit"]

CONNECT_TIMEOUT_S = 30.0  # default of `smn run --connect-timeout`

AUTH_ENV = "RAY_AUTH_MODE"
DISABLED_WARNING = ("smn: warning: RAY_AUTH_MODE=disabled: this Ray cluster accepts any client that reaches "
                    "its ports (a local Ray: every user of this machine; a cluster's GCS, raylet and workers listen "
                    "on every interface) and runs any code it is sent")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colour codes (Ray colours a remote error's header)


class ClusterTooSmall(RuntimeError):
    """The Ray cluster can never give the resources a spec asks for (the task would wait forever)."""


class ClusterUnreachable(RuntimeError):
    """The Ray cluster at ``--address`` / ``$RAY_ADDRESS`` did not answer within the connect timeout."""


def parse_address(address: str, *, what: str = "--address") -> tuple[str, int] | None:
    """Check the syntax of a Ray address; returns ``(host, port)`` to probe, or None for ``auto`` / ``local``
    (Ray resolves those itself).

    Allowed: ``HOST:PORT`` (a host name or IPv4 address, or ``[IPv6]:PORT``; port 1..65535),
    ``ray://HOST[:PORT]`` (Ray Client, port 10001 by default), ``auto``, ``local``.

    Raises:
        ValueError: naming the address and what is allowed (exit 2, before any work).
    """
    allowed = (f"allowed: HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT, 'auto' or 'local'; "
               "unset both --address and RAY_ADDRESS for a local Ray")
    text = (address or "").strip()
    if text in ("auto", "local"):
        return None
    rest, default_port = text, None
    if text.startswith("ray://"):
        rest, default_port = text[len("ray://"):], 10001
    elif "://" in text:
        raise ValueError(f"{what} {address!r} has an unsupported scheme; {allowed}")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ("" if not tail else None)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what} {address!r}: {host!r} is not an IPv6 address; {allowed}") from None
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            host, port_text = rest, ""
    if port_text == "" and default_port:
        port_text = str(default_port)
    valid_host = bool(host) and all(c.isalnum() or c in ".-_:" for c in host)
    if not valid_host or port_text is None or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {address!r} is not a Ray address; {allowed}")
    return host, int(port_text)


def probe_address(address: str, timeout_s: float, *, what: str = "--address") -> None:
    """Open (and close) a TCP connection to the Ray address within ``timeout_s`` seconds: a refused port or a
    host that does not answer is named at once instead of Ray retrying for minutes.

    Raises:
        ValueError: the address is malformed (:func:`parse_address`).
        ClusterUnreachable: nothing answers there within the deadline (the message names the address, the
            cause and the way out).
    """
    target = parse_address(address, what=what)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=max(timeout_s, 0.1)):
            return
    except socket.timeout:
        cause = f"no answer within {timeout_s:g}s (--connect-timeout)"
    except socket.gaierror as exc:
        cause = f"unknown host {host!r} ({exc.strerror})"
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        if isinstance(exc, ConnectionRefusedError):
            cause = "connection refused: nothing listens on that port"
    raise ClusterUnreachable(f"cannot reach the Ray cluster at {what} {address}: {cause}; start it with "
                             "`ray start --head` there, fix the address, or unset --address and RAY_ADDRESS "
                             "for a local Ray")


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """Set the environment variables ``values`` for the ``with`` block; each one's previous value (or its
    absence) is restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def loopback_node():
    """While a local Ray starts: its node is ``127.0.0.1``, so every listener it opens is on loopback.

    Ray 2.60 replaces a loopback node IP (``_node_ip_address="127.0.0.1"``) by the machine's external IP
    (``ray._private.services.resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off,
    its switch for single-machine Ray. With the switch off, the GCS, raylet, object manager, workers, the
    dashboard agent (gRPC, HTTP and its Prometheus metrics export), the runtime-env agent, and the
    autoscaler's and dashboard's metrics servers all bind ``127.0.0.1`` (measured: tests/test_security.py);
    with it on, the GCS, raylet and workers listen on every interface, the agents on the external IP and
    the metrics exports on ``0.0.0.0``. The variable reaches the processes Ray starts (they inherit this
    environment); this process's copy of the constant is set too (Ray read it when it was imported). Both
    are restored afterwards, so that a later multi-node cluster of this process is unaffected. A ``ray`` CLI
    reaching such a node from another shell (``ray status --address 127.0.0.1:PORT``) needs the same
    switch, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; without it Ray maps 127.0.0.1 to the external IP, where
    nothing listens.

    When the driver dies (SIGKILL), the kernel takes the GCS and the raylet with it at once (Ray starts them
    with ``PR_SET_PDEATHSIG``); the dashboard agent and the runtime-env agent notice the raylet's death within
    2 s but first try to report it to the dead GCS (``ray._private.process_watcher.report_raylet_error_logs``:
    a fixed 60 s timeout that no setting shortens), so they would keep their listeners for a minute or more:
    :func:`start_driver_watchdog` ends them within a few seconds.
    """
    from ray._private import ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    with environ({ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}):
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            yield
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


WATCHDOG_POLL_S = 0.5  # how often the watchdog looks at the driver (and refreshes the session's process list)
WATCHDOG_GRACE_S = 2.0  # SIGTERM, then SIGKILL after this long


def start_driver_watchdog() -> subprocess.Popen | None:
    """Start a small process that ends this driver's local Ray session soon after the driver dies.

    Ray has no hook for this: the GCS and the raylet die with the driver (``PR_SET_PDEATHSIG``), but the
    dashboard agent and the runtime-env agent, children of the raylet, then spend Ray's fixed 60 s
    timeout reporting the raylet's death to the dead GCS, listening all the while. The watchdog
    (:func:`watch_driver`) polls the driver every :data:`WATCHDOG_POLL_S` seconds; on its death it
    terminates every process of the session (SIGTERM, SIGKILL after :data:`WATCHDOG_GRACE_S`): the
    node's processes, their descendants, and any process naming the session folder on its command line.
    It exits by itself, killing nothing, when the driver ends the session normally (``ray.shutdown()``:
    the node's processes are gone while the driver lives). It runs in its own session (a Ctrl-C of the
    driver's terminal does not reach it) with no terminal streams (a pipe reading the driver's output
    ends with the driver).

    Call it right after starting a local Ray (``ray.init(address="local")``) in this process; returns the
    watchdog's ``Popen``, or None when this process holds no local node (a joined cluster).
    """
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not getattr(node, "head", False):
        return None
    roots = [str(info.process.pid) for infos in node.all_processes.values() for info in infos
             if info.process is not None and info.process.poll() is None]
    if not roots:
        return None
    root = str(Path(__file__).resolve().parents[2])  # this checkout, importable without installing it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = ("import sys\nfrom orchestrator.engine.session import watch_driver\n"
            "watch_driver(int(sys.argv[1]), sys.argv[2], [int(p) for p in sys.argv[3:]])")
    return subprocess.Popen([sys.executable, "-c", code, str(os.getpid()), node.get_session_dir_path(), *roots],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env=env)


def _running(proc) -> bool:
    """``proc`` (a ``psutil.Process``) still runs: the same process (not a reused pid) and not a zombie."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_driver(driver_pid: int, session_dir: str, node_pids: list[int], *,
                 poll_s: float = WATCHDOG_POLL_S, grace_s: float = WATCHDOG_GRACE_S) -> int:
    """The watchdog's loop (:func:`start_driver_watchdog`): wait until the driver ``driver_pid`` dies, then
    end the Ray session's processes; returns how many it signalled (0 after a normal ``ray.shutdown()``).

    Args:
        driver_pid: the process that started the local Ray.
        session_dir: the session's folder (``/tmp/ray/session_...``): a process naming it on its command
            line belongs to the session.
        node_pids: the node's processes (GCS, raylet, log monitor...); their descendants (workers, the
            agents) are re-listed every ``poll_s`` seconds while the driver lives.
        poll_s: seconds between two looks at the driver.
        grace_s: seconds between SIGTERM and SIGKILL.
    """
    import psutil

    def process(pid: int):
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None

    driver = process(driver_pid)
    roots = [p for p in map(process, node_pids) if p is not None]
    tracked = {p.pid: p for p in roots}
    while driver is not None and _running(driver):
        alive = [p for p in roots if _running(p)]
        if not alive:
            return 0  # ray.shutdown(): the node ended its processes itself
        for p in alive:
            try:
                tracked.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                continue
        time.sleep(poll_s)
    me = os.getpid()
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != me and any(session_dir in a for a in (p.info["cmdline"] or [])):
            tracked.setdefault(p.pid, p)
    victims = [p for p in tracked.values() if p.pid != me and _running(p)]
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.terminate()  # psutil checks that the pid still names the same process
    _, left = psutil.wait_procs(victims, timeout=grace_s)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=grace_s)
    return len(victims)


class _NoColour:
    """Stands for colorama's ``Fore`` / ``Back`` / ``Style``: every colour is the empty string."""

    def __getattr__(self, name: str) -> str:
        return ""


def plain_ray_errors() -> None:
    """Keep ANSI colour codes out of the text of Ray's remote errors in this process.

    ``RayTaskError.__str__`` heads a remote error with the task's name in cyan (colorama's codes, whatever
    the output), and that text reaches files: Ray Tune writes it to each failed trial's ``error.txt`` and
    its experiment state under ``<results>/<experiment>/tune/``, and the failure records and one-line
    causes are made from it. Ray has no setting for this (``RAY_COLOR_PREFIX=0`` covers only the
    ``(pid=...)`` prefix of forwarded worker logs), so ``ray.exceptions``' own reference to colorama is
    replaced by colourless constants; other colorama users of the process are unaffected. Idempotent.
    """
    import types

    import ray.exceptions

    ray.exceptions.colorama = types.SimpleNamespace(Fore=_NoColour(), Back=_NoColour(), Style=_NoColour())


def _connect_knobs(timeout_s: float) -> dict[str, str]:
    """Ray's own settings that bound a driver's connect to ``timeout_s`` in all (Ray 2.60: the GCS channel,
    the pubsub channel and the cluster-id request wait in turn, and the whole is tried
    ``RAY_gcs_server_port_wait_time_s`` times)."""
    part = str(max(1, int(timeout_s // 3)))
    return {"RAY_gcs_server_port_wait_time_s": "1", "RAY_gcs_rpc_server_connect_timeout_s": part,
            "RAY_py_gcs_connect_timeout_s": part}


@contextlib.contextmanager
def _stderr_to(path: str):
    """Send this process's file descriptor 2 (Ray's C++ log while it connects) to ``path`` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def join_cluster(address: str, *, runtime_env: dict, timeout_s: float | None = None, **init_kwargs):
    """``ray.init(address=...)`` with a deadline; returns what ``ray.init`` returns. A TCP probe first
    (:func:`probe_address`), then Ray's own connect settings bounded by ``timeout_s`` (default :data:`CONNECT_TIMEOUT_S`), Ray's C++ log of the
    connect in a log file instead of the console.

    Raises:
        ValueError: a malformed address.
        ClusterUnreachable: the cluster does not answer, or Ray cannot join it, within about ``timeout_s``
            (the message names the address and the log file).
    """
    import ray

    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    probe_address(address, timeout_s)
    fd, log = tempfile.mkstemp(prefix="smn-ray-connect-", suffix=".log")
    os.close(fd)
    t0 = time.monotonic()
    try:
        with environ(_connect_knobs(timeout_s)):
            _refresh_ray_config()
            with _stderr_to(log):
                context = ray.init(address=address, runtime_env=runtime_env, **init_kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        raise ClusterUnreachable(
            f"cannot join the Ray cluster at {address} within {time.monotonic() - t0:.0f}s: "
            f"{' '.join(str(exc).split())[:200]} (Ray's log: {log}); check that a Ray head (`ray start --head`) "
            "listens there and that you hold its token") from None
    os.unlink(log)
    return context


def token_path() -> Path:
    """Where Ray reads the token: ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(env).expanduser() if env else Path.home() / ".ray" / "auth_token"


def ensure_token_file() -> Path | None:
    """Make sure a token exists for token authentication; returns its file (None if ``$RAY_AUTH_TOKEN``
    gives it). A new file gets 64 random hex digits and mode 0600; an existing one readable by others is
    set to 0600."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def check_auth_env() -> None:
    """Before any work: ``$RAY_AUTH_MODE``, when set, is ``token`` or ``disabled`` (any case), and a token
    file named by ``$RAY_AUTH_TOKEN_PATH`` that exists is a regular file.

    Raises:
        ValueError: naming the variable, its value and what is allowed (exit 2).
    """
    mode = os.environ.get(AUTH_ENV)
    if mode is not None and mode.lower() not in ("token", "disabled"):
        raise ValueError(f"{AUTH_ENV}={mode!r} is not an authentication mode; allowed: token (the default for a "
                         "local Ray), disabled, or unset")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and os.path.exists(os.path.expanduser(path)) and not os.path.isfile(os.path.expanduser(path)):
        raise ValueError(f"RAY_AUTH_TOKEN_PATH={path!r} is not a file; allowed: the path of a token file "
                         "(created with mode 0600 if missing), or unset for ~/.ray/auth_token")


def configure_auth(*, local: bool) -> str:
    """Set ``RAY_AUTH_MODE`` for this process and the Ray processes it starts; returns the mode.

    Unset: ``token`` for a local Ray (with :func:`ensure_token_file`); when joining a cluster, ``token``
    if a token is available (file or ``$RAY_AUTH_TOKEN``), else left to Ray. ``disabled`` (set by the user)
    prints :data:`DISABLED_WARNING` once on stderr.
    """
    mode = os.environ.get(AUTH_ENV)
    if mode is None:
        if not (local or os.environ.get("RAY_AUTH_TOKEN") or token_path().is_file()):
            return ""
        os.environ[AUTH_ENV] = mode = "token"
        _refresh_ray_config()
    if mode.lower() == "token" and (local or not os.environ.get("RAY_AUTH_TOKEN")):
        if local:
            ensure_token_file()
        elif token_path().is_file() and stat.S_IMODE(token_path().stat().st_mode) & 0o077:
            os.chmod(token_path(), 0o600)
    elif mode.lower() == "disabled":
        print(DISABLED_WARNING, file=sys.stderr, flush=True)
    return mode


def _refresh_ray_config() -> None:
    """Make this process's Ray core re-read ``RAY_AUTH_MODE`` (it caches its config when ``ray`` is imported);
    this is what Ray's own default-enable path does (``ray._private.authentication``)."""
    from ray._raylet import Config

    Config.initialize("")


def _alive_cpus() -> list[float]:
    import ray

    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def check_cluster_fits(cpus_per_worker: float, gpus_per_worker: float = 0.0, workers: int = 1, *,
                       what: str = "resources") -> None:
    """Refuse, at once, resources the running Ray cluster can never give.

    One worker must fit on one node (``cpus_per_worker`` <= the largest node's CPUs) and a DDP group on
    the cluster (``workers x cpus_per_worker`` <= all CPUs); GPUs: ``gpus_per_worker`` <= the cluster's.
    An autoscaling cluster may add nodes later: ``SMN_ALLOW_AUTOSCALE_CPUS=1`` / ``SMN_ALLOW_AUTOSCALE_GPUS=1``
    skip the CPU / GPU check.

    Raises:
        ClusterTooSmall: naming the request, what the cluster has, and the way out.
    """
    import ray

    if not os.environ.get("SMN_ALLOW_AUTOSCALE_CPUS"):
        nodes = _alive_cpus()
        biggest, total = max(nodes, default=0.0), sum(nodes)
        if cpus_per_worker > biggest:
            raise ClusterTooSmall(
                f"{what}.cpus_per_worker={cpus_per_worker:g} but the largest Ray node has {biggest:g} CPUs; "
                f"set {what}.cpus_per_worker<={biggest:g} (SMN_ALLOW_AUTOSCALE_CPUS=1 if larger nodes autoscale)")
        if workers * cpus_per_worker > total:
            raise ClusterTooSmall(
                f"{what}: {workers} workers x {cpus_per_worker:g} CPUs = {workers * cpus_per_worker:g} CPUs but the "
                f"Ray cluster has {total:g}; lower {what}.workers or {what}.cpus_per_worker "
                "(SMN_ALLOW_AUTOSCALE_CPUS=1 if nodes autoscale)")
    if gpus_per_worker > 0 and not os.environ.get("SMN_ALLOW_AUTOSCALE_GPUS"):
        have = ray.cluster_resources().get("GPU", 0)
        if have < gpus_per_worker:
            raise ClusterTooSmall(
                f"the spec asks for {gpus_per_worker} GPU(s) per worker but the Ray cluster has {have}; set "
                f"{what}.gpus_per_worker=0 or run on a GPU cluster (SMN_ALLOW_AUTOSCALE_GPUS=1 if GPU nodes "
                "autoscale from zero)")


def check_local_fits(cpus_per_worker: float, workers: int = 1, *, what: str = "resources") -> None:
    """Before a local Ray is started (seconds earlier than :func:`check_cluster_fits`): refuse CPUs this
    machine does not have (``os.cpu_count()``; ``SMN_ALLOW_AUTOSCALE_CPUS=1`` skips the check).

    Raises:
        ClusterTooSmall: naming the request, the machine's CPUs and the way out.
    """
    if os.environ.get("SMN_ALLOW_AUTOSCALE_CPUS"):
        return
    have = float(os.cpu_count() or 1)
    if cpus_per_worker > have or workers * cpus_per_worker > have:
        asked = (f"{what}.cpus_per_worker={cpus_per_worker:g}" if cpus_per_worker > have else
                 f"{what}: {workers} workers x {cpus_per_worker:g} CPUs")
        raise ClusterTooSmall(f"{asked} but this machine (a local Ray) has {have:g} CPUs; set {what}.cpus_per_worker"
                              f"<={have:g} / fewer workers, or join a larger cluster with --address "
                              "(SMN_ALLOW_AUTOSCALE_CPUS=1 skips this check)")


def error_cause(error: object) -> str:
    """The one-line cause of a (remote) failure: the last ``SomeError: message`` line of its text, as a
    Ray task error carries the whole remote stack (the full text stays in the cell's failure record); ANSI
    colour codes removed."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(error)).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if " " not in head and head.endswith(("Error", "Exception", "Interrupt", "Exit", "Unreachable", "Small")):
            return ln[:300]
    return (lines[-1] if lines else str(error))[:300]


WORKER_SETUP_HOOK = "orchestrator.engine.session.quiet_worker_exit"  # the runtime_env's worker_process_setup_hook


def quiet_worker_exit() -> None:
    """Run in every Ray worker process of an smn run, before any of its tasks (Ray's ``worker_process_setup_hook``
    of the run's runtime_env, :data:`WORKER_SETUP_HOOK`): drop the report of a ``SystemExit`` that Python could
    not raise.

    Ray stops a worker (the end of a run, a Tune trial's actor) with SIGTERM, and its handler raises
    ``SystemExit``. When the signal lands while Python runs a garbage-collection callback (a ``WeakSet``'s), the
    exception cannot propagate, and Python prints "Exception ignored in: ..." with a traceback, which Ray forwards
    to the driver's console just before the run's summary. That exit is the one Ray asked for. Every other
    unraisable exception still goes to the hook that was there before (Python's default: stderr).
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def every_log_line() -> None:
    """Forward every line a worker prints to the driver as it comes, unless the user set ``RAY_DEDUP_LOGS``.

    Ray's driver folds lines that differ only in their numbers (``[<cell> smn seed=1] epoch 2/8 ...`` of every
    cell) into one ``[repeated 3x across cluster]`` notice and holds the last of them back up to 5 s, or until the
    driver shuts Ray down, so a cell's last epoch line could come after the run's summary. smn's lines already
    name their cell; it turns the folding off (Ray reads ``RAY_DEDUP_LOGS`` when it is imported, so this sets
    the constant its log printer reads, as the variable would have).
    """
    if "RAY_DEDUP_LOGS" in os.environ:
        return
    from ray._private import ray_logging

    ray_logging.RAY_DEDUP_LOGS = False


def dashboard_line(context) -> str:
    """The line ``smn run --dashboard`` prints once Ray is up: the dashboard's address (``context``: what
    ``ray.init`` returned) and how to pass Ray's token guard (token authentication guards the dashboard's
    HTTP API as it guards the gRPC ports: a browser asks for the token once and keeps it in a cookie)."""
    url = getattr(context, "dashboard_url", None)
    if not url:
        return "Ray dashboard: not running on this cluster (start its head with `ray start --head --include-dashboard=true`)"
    url = url if "://" in url else f"http://{url}"
    mode = os.environ.get(AUTH_ENV, "").lower()
    if mode == "token":
        where = "$RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else str(token_path())
        return f"Ray dashboard: {url} (token authentication: paste the token from {where} when it asks)"
    return f"Ray dashboard: {url} (no token authentication: RAY_AUTH_MODE={mode or 'unset'})"
