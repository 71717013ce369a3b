"""Preflight for the results location: before any cell runs, every machine must reach the same storage.

A multi-node run writes its ledger, masks and checkpoints from whichever node runs a cell, and a
resumed cell may read its checkpoint on another node. So the results location (a local path, an NFS
mount, or a URI that ``pyarrow.fs`` understands) must be writable from the driver and from every alive
Ray node, and they must all see the same files: an NFS mount missing on one node looks like a writable
empty local folder there, and results written into it would be lost to the others.

:func:`check_results_location` proves both. The driver writes a probe file with a random token under
``<results>/.smn-probe-<token>/``; one tiny task per other alive node (pinned with
``NodeAffinitySchedulingStrategy``, no CPU reserved) reads the driver's probe and writes its own, which
the driver reads back. Any failure raises :class:`StorageUnreachable` naming the machine and the
location. Nodes that join later (an autoscaler adding GPU workers) are not checked here.

Object stores work the same way: for a URI (``s3://bucket/prefix``) the probes go through the URI's
``pyarrow.fs`` filesystem from the driver and from every node, so a node without a route to the endpoint,
without credentials (``AWS_*`` variables, which :func:`orchestrator.engine.plain.ensure_ray` passes to the
workers, or the URI's own query) or without access to the bucket is named before any cell runs. Every
file of a run (ledger, masks, epoch checkpoints, final states, pretrained backbones, failure records,
Ray Train and Ray Tune storage) then goes to that filesystem too.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.results.layout import filesystem

__all__ = ["StorageUnreachable", "check_results_location"]

_PROBE_PREFIX = ".smn-probe-"


class StorageUnreachable(RuntimeError):
    """The results location cannot be used from the driver or from a node (the message names which)."""


@dataclass(frozen=True)
class _Probe:
    results: str
    token: str

    def folder(self) -> str:
        """A folder of this check's own (concurrent runs on the same results do not share it)."""
        return f"{filesystem(self.results)[1].rstrip('/')}/{_PROBE_PREFIX}{self.token}"

    def path(self, who: str) -> str:
        return f"{self.folder()}/{who}"


def _write_and_read_back(fs: pafs.FileSystem, path: str, payload: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(payload)
    with fs.open_input_stream(path) as src:
        back = src.read()
    if back != payload:
        raise OSError(f"read back {len(back)} bytes that differ from the {len(payload)} written")


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as src:
        return src.read()


@ray.remote(num_cpus=0, max_retries=0)
def _probe_node(results: str, token: str) -> str | None:
    """On one node: read the driver's probe, write this node's; returns what went wrong, or None."""
    probe = _Probe(results, token)
    node_id = ray.get_runtime_context().get_node_id()
    try:
        fs, _ = filesystem(results)
    except ValueError as exc:
        return str(exc)
    try:
        seen = _read(fs, probe.path("driver"))
    except OSError as exc:
        return f"cannot read the driver's probe file {probe.path('driver')} ({exc})"
    if seen != token.encode():
        return f"the driver's probe file {probe.path('driver')} holds other bytes here"
    try:
        _write_and_read_back(fs, probe.path(node_id), f"{token} {node_id}".encode())
    except OSError as exc:
        return f"cannot write {probe.path(node_id)} ({exc})"
    return None


def _describe(node: dict) -> str:
    return (f"node {node.get('NodeManagerHostname', '?')} ({node.get('NodeManagerAddress', '?')}, "
            f"node id {node['NodeID'][:12]})")


def _alive_nodes() -> dict[str, dict]:
    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


def check_results_location(results: str, *, timeout_s: float = 120.0) -> None:
    """Check that ``results`` is writable from the driver and shared with every alive Ray node.

    Without an initialised Ray, only the driver is checked. The driver's own node is covered by the
    driver's check. Probe files are removed afterwards; the results folder itself is left in place.

    Args:
        results: local path, NFS path or ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``file:///...``).
        timeout_s: seconds to wait for all nodes' probes (a node's first task starts a worker process).

    Raises:
        ValueError: if the URI's filesystem is not supported by pyarrow.
        StorageUnreachable: if the driver cannot write and read back a probe file, if a node cannot read
            the driver's probe or write its own, if the driver cannot read a node's probe, or if a node
            does not answer within ``timeout_s``; the message names the machine and the location.
    """
    fs, _ = filesystem(results)
    local = isinstance(fs, pafs.LocalFileSystem)
    probe = _Probe(results, uuid.uuid4().hex)
    host = socket.gethostname()
    try:
        fs.create_dir(probe.folder(), recursive=True)
        _write_and_read_back(fs, probe.path("driver"), probe.token.encode())
    except OSError as exc:
        raise StorageUnreachable(
            f"results location {results!r} is not writable from the driver (host {host}): {exc}; "
            + ("give a folder this machine can create and write (on a cluster: a path every node mounts, "
               "e.g. NFS at /mnt/smn)" if local else
               f"check that the {fs.type_name} endpoint is reachable from here, that the bucket exists and that "
               "the credentials (AWS_* variables, or the URI's query) allow writing under that prefix")) from None
    try:
        if ray.is_initialized():
            _check_nodes(fs, probe, timeout_s)
    finally:
        try:
            fs.delete_dir(probe.folder())
        except OSError:
            pass  # a probe folder left behind is harmless; the check's verdict stands


def _check_nodes(fs: pafs.FileSystem, probe: _Probe, timeout_s: float) -> None:
    nodes = _alive_nodes()
    here = ray.get_runtime_context().get_node_id()
    refs = {
        _probe_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
            probe.results, probe.token): node_id
        for node_id in nodes if node_id != here
    }
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    problems = []
    still_alive = _alive_nodes()
    for ref in late:
        ray.cancel(ref, force=True)
        node = nodes[refs[ref]]
        if refs[ref] in still_alive:
            problems.append(f"{_describe(node)} did not answer the storage probe within {timeout_s:.0f}s")
    for ref in ready:
        node_id = refs[ref]
        node = nodes[node_id]
        try:
            error = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a node that vanished meanwhile is not a storage problem
            if node_id in still_alive:
                problems.append(f"{_describe(node)}: the storage probe failed ({type(exc).__name__}: {exc})")
            continue
        if error is None:
            try:
                if _read(fs, probe.path(node_id)) != f"{probe.token} {node_id}".encode():
                    error = f"the driver reads other bytes in the node's probe file {probe.path(node_id)}"
            except OSError as exc:
                error = f"the driver cannot read the node's probe file {probe.path(node_id)} ({exc})"
        if error is not None:
            problems.append(f"{_describe(node)}: {error}")
    if problems:
        relative = "://" not in probe.results and not os.path.isabs(probe.results)
        if isinstance(fs, pafs.LocalFileSystem):
            advice = ("every node must see the same files there: mount the same NFS export at that path on every "
                      "node; a plain local folder is only shared on a single machine"
                      + ("; and a relative path is resolved against each process's working directory: give an "
                         "absolute one" if relative else ""))
        else:
            advice = (f"every node must reach the same {fs.type_name} storage: check the node's route to the "
                      "endpoint and its credentials (the driver's AWS_* variables reach the workers when "
                      "`smn run` starts or joins Ray; a cluster started elsewhere needs them on every node)")
        raise StorageUnreachable(
            f"results location {probe.results!r} is not shared by every node of the Ray cluster:\n  "
            + "\n  ".join(problems) + "\n" + advice)
