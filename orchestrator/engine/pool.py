"""Warm workers: long-lived Ray actors that import torch and smn_core once and run many jobs, and
bounded submission of jobs onto them (see :mod:`orchestrator.engine.cell` for why a pool of actors).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

import ray

__all__ = ["warm_imports", "CellWorker", "pool_size", "WarmPool", "run_bounded"]

T = TypeVar("T")

def warm_imports() -> float:
    """Import what every cell needs (torch, torchvision transforms, scikit-learn, ``smn_core.pipeline``);
    returns the seconds it took (0 when already imported)."""
    t0 = time.perf_counter()
    import sklearn.linear_model  # noqa: F401  (the linear probe)
    import sklearn.model_selection  # noqa: F401  (dataset splits)
    import torchvision.transforms.v2  # noqa: F401  (the transforms; reaches torch._dynamo)

    import smn_core.pipeline  # noqa: F401

    return time.perf_counter() - t0


class CellWorker:
    """A long-lived worker process (a Ray actor) that runs many jobs with its imports done once.

    Created through :class:`WarmPool`. Every method is cheap except :meth:`call`, which runs a job.
    """

    def __init__(self) -> None:
        self.jobs = 0

    def warm(self) -> dict[str, Any]:
        """Do the imports now; returns ``{"node_id", "pid", "import_s"}``."""
        return {"node_id": self.where(), "pid": os.getpid(), "import_s": warm_imports()}

    def where(self) -> str:
        """Hex id of the Ray node this worker runs on."""
        return ray.get_runtime_context().get_node_id()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in this warm process and return its result (errors propagate)."""
        self.jobs += 1
        return fn(*args, **kwargs)


def pool_size(wanted: int, cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` CPUs / ``gpus`` GPUs to start for ``wanted`` concurrent jobs: no more
    than the Ray cluster holds now (at least 1, so an autoscaling cluster can grow into it)."""
    have = ray.cluster_resources()
    fit = wanted
    # true division, then floor with a tolerance: 2 // 0.4 is 4.0 in floating point, while Ray (which counts
    # in units of 1e-4) fits five 0.4-CPU workers on 2 CPUs
    if cpus > 0:
        fit = min(fit, int(have.get("CPU", 0) / cpus + 1e-6))
    if gpus > 0:
        fit = min(fit, int(have.get("GPU", 0) / gpus + 1e-6))
    return max(1, min(wanted, fit))


class WarmPool:
    """``size`` :class:`CellWorker` actors with the same resources, warming up as soon as they start.

    Args:
        size: number of workers (see :func:`pool_size`).
        num_cpus, num_gpus: resources each worker holds for its whole life.
        max_restarts: actor restarts after a process or node death (-1: unlimited). Calls are replayed
            after a restart (``max_task_retries=-1``); application errors are not retried by Ray (see
            :func:`run_bounded`).
        warm: start the imports right away (:meth:`CellWorker.warm`), without waiting for them.

    Use as a context manager, or call :meth:`shutdown`: the workers hold their resources until then.
    """

    def __init__(self, size: int, *, num_cpus: float = 1, num_gpus: float = 0, max_restarts: int = -1,
                 warm: bool = True) -> None:
        self._actor = ray.remote(CellWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                                     max_task_retries=-1)
        self.workers = [self._actor.remote() for _ in range(max(1, size))]
        self.warming = [w.warm.remote() for w in self.workers] if warm else []

    def __len__(self) -> int:
        return len(self.workers)

    def __enter__(self) -> "WarmPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def wait_warm(self, timeout: float | None = None) -> list[dict]:
        """Block until every worker finished its imports; returns their :meth:`CellWorker.warm` answers."""
        return ray.get(self.warming, timeout=timeout) if self.warming else []

    def submit(self, slot: int, fn: Callable, *args: Any, **kwargs: Any):
        """Run ``fn(*args, **kwargs)`` on worker ``slot``; returns the ObjectRef of its result."""
        return self.workers[slot].call.remote(fn, *args, **kwargs)

    def heal(self, slot: int, error: BaseException) -> None:
        """After a call on ``slot`` failed with ``error``: when the worker itself is gone for good (its
        restarts spent, ``ray.exceptions.RayActorError``), start a fresh worker in its place, so the jobs
        still to come on that slot do not fail with it. Application errors leave the worker as it is."""
        if isinstance(error, ray.exceptions.RayActorError):
            ray.kill(self.workers[slot], no_restart=True)
            self.workers[slot] = self._actor.remote()

    def release(self, slot: int) -> None:
        """End worker ``slot`` now that it has nothing left to do, so its resources go back to Ray at once
        (a worker restarted after a node loss may be waiting for exactly those)."""
        if self.workers[slot] is not None:
            ray.kill(self.workers[slot], no_restart=True)
            self.workers[slot] = None

    def shutdown(self) -> None:
        """End every worker (their resources go back to Ray)."""
        for w in self.workers:
            if w is not None:
                ray.kill(w, no_restart=True)
        self.workers = []


def run_bounded(items: Iterable[T], submit: Callable[[T, int], Any], limit: int, *, retries: int = 0,
                on_error: Callable[[int, BaseException], None] | None = None,
                on_idle: Callable[[int], None] | None = None) -> Iterator[tuple[T, Any, BaseException | None]]:
    """Run ``items`` with at most ``limit`` in flight; yield ``(item, result, error)`` as each ends.

    Args:
        items: the jobs, submitted in order.
        submit: ``submit(item, slot) -> ObjectRef``; ``slot`` (``0 <= slot < limit``) is free for this item
            (a :class:`WarmPool` worker index; plain tasks ignore it).
        limit: jobs in flight at most (>= 1).
        retries: an item whose result raises is submitted again, on the same slot, up to this many times.
        on_error: called with ``(slot, exception)`` after every failure, before any resubmission (e.g.
            :meth:`WarmPool.heal`).
        on_idle: called with a slot that has finished and will get no more items (e.g.
            :meth:`WarmPool.release`, which hands its resources back to Ray at once).

    Yields:
        ``(item, result, None)`` on success, ``(item, None, exception)`` once the retries are spent.
    """
    pending = list(items)
    free = list(range(max(1, limit)))
    running: dict[Any, tuple[T, int, int]] = {}
    while pending or running:
        while pending and free:
            item, slot = pending.pop(0), free.pop(0)
            running[submit(item, slot)] = (item, slot, 0)
        if on_idle is not None and not pending:
            while free:
                on_idle(free.pop())
        ready, _ = ray.wait(list(running), num_returns=1)
        item, slot, tries = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - reported to the caller, never stops the others
            if on_error is not None:
                on_error(slot, exc)
            if tries < retries:
                running[submit(item, slot)] = (item, slot, tries + 1)
                continue
            free.append(slot)
            yield item, None, exc
            continue
        free.append(slot)
        yield item, result, None
