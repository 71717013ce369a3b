"""``smn serve STORE``: check the input, start (or join) Ray, run the Serve application until Ctrl-C.

Every bad input is refused with exit 2 before Ray starts: a missing store or one whose backbone does not match
its recorded hash, a port outside 1-65535 or already taken, replicas or tasks per replica < 1, a host other
than loopback without ``--api-key-file``, an unreadable or empty key file. The parser is
:mod:`orchestrator.cli.serve`; the application :mod:`orchestrator.serve.app`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import sys
import time
import warnings

with warnings.catch_warnings():  # Ray Serve's own models use a pydantic API that pydantic 2 deprecates
    warnings.filterwarnings("ignore", message="Using extra keyword arguments on `Field`")
    from ray import serve as ray_serve

from smn_core.mask_file import BackboneMismatchError, MaskFileError

from orchestrator.cli.common import EXIT_OK, EXIT_USAGE
from orchestrator.engine.plain import ensure_ray
from orchestrator.engine.session import parse_address
from orchestrator.serve.app import build_app, read_api_key
from orchestrator.store.mask_store import MaskStore, StoreError

__all__ = ["serve", "check_serve_args", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as the HTTP server binds it (uvicorn sets SO_REUSEADDR): connections of a server stopped a moment ago
        # (TIME_WAIT) do not make the port taken, a socket listening on it does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_serve_args(args) -> str | None:
    """The first problem with ``smn serve``'s arguments as one line (names the bad value and what is allowed),
    or None. Opens the store and hash-checks its backbone; starts nothing."""
    for name, value in (("--replicas", args.replicas), ("--max-tasks-per-replica", args.max_tasks),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            return f"{name} must be >= 1, got {value}"
    if not 1 <= args.port <= 65535:
        return f"--port must be in 1-65535, got {args.port}"
    if not (math.isfinite(args.replica_cpus) and args.replica_cpus >= 0):
        return f"--replica-cpus must be a finite number >= 0, got {args.replica_cpus}"
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            parse_address(address, what="--address" if args.address else "RAY_ADDRESS")
        except ValueError as exc:
            return str(exc)
    if not is_loopback(args.host) and not args.api_key_file:
        return (f"--host {args.host} is not a loopback address: binding it needs --api-key-file FILE (every request "
                "must then send that bearer token); allowed without a key: 127.0.0.1, ::1, localhost")
    if args.api_key_file:
        try:
            read_api_key(args.api_key_file)
        except ValueError as exc:
            return str(exc)
    try:
        MaskStore(args.store).switcher()  # the backbone's hash, checked before any replica starts
    except (StoreError, BackboneMismatchError, MaskFileError, ValueError, FileNotFoundError) as exc:
        return str(exc)
    if not _port_free(args.host, args.port):
        return f"--port {args.port} on {args.host} is taken (or the address is not on this machine); choose another"
    return None


def serve(args) -> int:
    """Run ``smn serve``; returns the exit code (2: refused before Ray started; 0 after Ctrl-C)."""
    problem = check_serve_args(args)
    if problem:
        print(f"smn serve: {' '.join(problem.split())}", file=sys.stderr)
        return EXIT_USAGE
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        # a Ray of its own: Serve's controller, proxy and replicas are actors with workers of their own, so the idle
        # workers Ray starts ahead for a first driver (one per CPU) would only slow the replicas' start
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    ensure_ray(args.address)
    ray_serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(args.store, replicas=args.replicas, max_tasks=args.max_tasks, api_key_file=args.api_key_file,
                    max_body_bytes=args.max_body_bytes, replica_cpus=args.replica_cpus)
    ray_serve.run(app, name="smn", route_prefix="/")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.store} at http://{shown}:{args.port}/v1/tasks ({args.replicas} replica(s), up to "
          f"{args.max_tasks} tasks each{', bearer token required' if args.api_key_file else ''}); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("smn serve: stopped (Ctrl-C)", file=sys.stderr, flush=True)
    finally:
        ray_serve.shutdown()
    return EXIT_OK
