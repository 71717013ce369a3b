"""``smn serve``'s parser: one HTTP endpoint over a mask store's tasks (Ray Serve, multiplexed task masks).

    smn serve STORE [--replicas N] [--max-tasks-per-replica M] [--host 127.0.0.1] [--port 8000]
                    [--api-key-file FILE] [--address ADDR]

This module is the parser only (argparse, nothing heavy); :mod:`orchestrator.cli.commands.serve` does the work.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  smn serve stores/c10                                   # http://127.0.0.1:8000, 1 replica, 16 tasks each
  smn serve stores/c10 --replicas 2 --max-tasks-per-replica 64
  smn serve stores/c10 --host 0.0.0.0 --api-key-file ~/.smn_key   # any other host needs a bearer token
  curl -s -X POST --data-binary @cat.jpg http://127.0.0.1:8000/v1/tasks/cifar10-smn/classify

endpoints: GET /v1/tasks, POST /v1/tasks/{task}/embed, POST /v1/tasks/{task}/classify (body: JPEG or PNG bytes;
JSON reply). See docs/serve.md.
"""


def add_parser(subparsers) -> None:
    """Register ``smn serve`` on the ``smn`` parser's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve a mask store's tasks over HTTP (Ray Serve; one backbone, masks switched per request)",
        description="Start a Ray Serve application over STORE: every replica loads and hash-checks the backbone "
        "once and keeps up to M decoded task masks (LRU); requests for a task go to a replica that holds it. "
        "Binds 127.0.0.1 unless --host says otherwise; any other host needs --api-key-file.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="mask store folder or URI (see `smn store`)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (each holds the backbone once), >= 1")
    p.add_argument("--max-tasks-per-replica", type=int, default=16, dest="max_tasks",
                   help="decoded task masks each replica keeps (LRU), >= 1")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds; not loopback: needs --api-key-file")
    p.add_argument("--port", type=int, default=8000, help="HTTP port, 1-65535")
    p.add_argument("--api-key-file", default=None,
                   help="file holding a bearer token; every request must send 'Authorization: Bearer <token>'")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest image body accepted, >= 1")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each model replica holds, >= 0")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join; None: $RAY_ADDRESS, else start a local Ray (token authentication)")
