"""The Ray Serve application over a mask store: ``/v1/tasks``, ``/embed`` and ``/classify`` for every task.

Two deployments (``smn serve`` and ``serve run serve_config.yaml`` build the same application with
:func:`build_app` / :func:`app_builder`):

* :class:`orchestrator.serve.gateway.Gateway` (the HTTP ingress, a FastAPI app, a process without torch):
  checks the bearer token, the task name, the body size and that the body is a JPEG or PNG image, then calls
  the model deployment with the task as Serve's *multiplexed model id*, so Serve routes the request to a
  replica that already holds that task.
* :class:`TaskModels` (``--replicas N``): each replica loads and hash-checks the backbone once
  (:class:`orchestrator.serve.model.TaskBank`) and keeps up to ``--max-tasks-per-replica M`` decoded tasks,
  bit-packed, in Serve's per-replica LRU (``@serve.multiplexed``). Requests are batched with
  ``@serve.batch`` and grouped by task inside each batch (Serve also splits a batch by model id); each group
  is one masked forward (:meth:`TaskBank.features`), which never writes the shared weights.

HTTP answers (JSON): 200; 400 a body that is not a JPEG/PNG image; 401 a missing or wrong bearer token (only
when an API key is set); 404 an unknown task, or ``/classify`` on a task without a head; 409 a task file that
is corrupted or belongs to another backbone (the store's own message); 413 a body over ``max_body_bytes``;
503 the model replicas could not answer. None of them takes a replica down.
"""

import asyncio
from typing import Any

from ray import serve

from smn_core.mask_file import BackboneMismatchError, MaskFileError

from orchestrator.serve.gateway import (DEFAULT_MAX_BODY_BYTES, GRACEFUL_WAIT_S, Gateway, error_body, read_api_key,
                                        task_listing)
from orchestrator.serve.images import ImageError, decode_image
from orchestrator.serve.model import MaskedModel, TaskBank
from orchestrator.store.mask_store import MaskStore, StoreError

__all__ = ["Gateway", "TaskModels", "build_app", "app_builder", "read_api_key", "DEFAULT_MAX_BODY_BYTES",
           "MAX_BATCH_SIZE", "BATCH_WAIT_S"]

#: Most requests in one ``@serve.batch`` of a model replica, and how long a batch waits to fill (seconds).
MAX_BATCH_SIZE, BATCH_WAIT_S = 32, 0.005
_OPS = ("embed", "classify")


@serve.deployment(ray_actor_options={"num_cpus": 1}, graceful_shutdown_wait_loop_s=GRACEFUL_WAIT_S)
class TaskModels:
    """One model replica: the backbone once, up to ``max_tasks`` resident tasks (Serve's LRU), batched
    masked forwards. Called by :class:`Gateway` with ``multiplexed_model_id=<task>``.

    Args:
        store: the mask store's location.
        max_tasks: most decoded tasks kept in this replica (``@serve.multiplexed``), >= 1.
    """

    def __init__(self, store: str, max_tasks: int) -> None:
        self.bank = TaskBank(store)

        async def load_task(task: str) -> MaskedModel:
            return await asyncio.to_thread(self.bank.load, task)

        # set at init, so that M is a parameter (Serve detects multiplexed wrappers on the instance too)
        self.load_task = serve.multiplexed(max_num_models_per_replica=int(max_tasks))(load_task)

    async def infer(self, op: str, body: bytes) -> dict[str, Any]:
        """One request of the current multiplexed task: ``op`` in ``("embed", "classify")`` on one image's
        bytes. Returns ``{"status": 200, ...}`` or ``{"status": 4xx, "error": ...}``; never raises."""
        return await self._batched((serve.get_multiplexed_model_id(), op, body))

    async def tasks(self) -> dict[str, Any]:
        """The store's task list for ``GET /v1/tasks`` (:func:`orchestrator.serve.gateway.task_listing`), read by a
        replica so that the gateway never imports the store's torch side; 409 when a task file is unreadable."""
        try:
            return {"status": 200, **task_listing(self.bank.store, await asyncio.to_thread(self.bank.store.list))}
        except MaskFileError as exc:
            return error_body(409, exc)

    async def resident(self) -> int:
        """How many tasks this replica holds now (for tests and benchmarks)."""
        wrapper = getattr(self.load_task, "__serve_multiplex_wrapper", None)
        return len(wrapper.models) if wrapper is not None else 0

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, items: list[tuple[str, str, bytes]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (task, _, _) in enumerate(items):
            groups.setdefault(task, []).append(i)
        for task, idx in groups.items():
            try:
                model = await self.load_task(task)
            except StoreError as exc:
                answer = error_body(404, exc)
            except (MaskFileError, BackboneMismatchError, ValueError) as exc:
                answer = error_body(409, exc)
            else:
                for i, result in zip(idx, await asyncio.to_thread(self._group, model, [items[i] for i in idx])):
                    out[i] = result
                continue
            for i in idx:
                out[i] = answer
        return out  # type: ignore[return-value]

    @staticmethod
    def _group(model: MaskedModel, items: list[tuple[str, str, bytes]]) -> list[dict[str, Any]]:
        """One task's requests of a batch: one masked forward over every decodable image."""
        results: list[dict[str, Any] | None] = [None] * len(items)
        ok, imgs = [], []
        for i, (_, _, body) in enumerate(items):
            try:
                imgs.append(decode_image(body))
                ok.append(i)
            except ImageError as exc:
                results[i] = error_body(400, exc)
        if ok:
            feats = model.embed(model.preprocess(imgs))
            logits = model.logits_of(feats) if model.has_head else None
            answers = model.answers(logits) if logits is not None else None
            for j, i in enumerate(ok):
                op = items[i][1]
                if op == "embed":
                    results[i] = {"status": 200, "task": model.name, "embedding": feats[j].tolist()}
                elif answers is None:
                    results[i] = error_body(404, f"task {model.name!r} has no classification head, so /classify "
                                        "cannot answer; use /embed, or store the task with a head")
                else:
                    results[i] = {"status": 200, "task": model.name, **answers[j],
                                  "logits": logits[j].tolist()}
        return results  # type: ignore[return-value]


def build_app(store: str, *, replicas: int = 1, max_tasks: int = 16, api_key_file: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, replica_cpus: float = 1.0):
    """The Serve application (``serve.run(build_app(...))``): a :class:`Gateway` over ``replicas`` replicas of
    :class:`TaskModels`, each holding up to ``max_tasks`` tasks of ``store``.

    Raises:
        ValueError: ``replicas``, ``max_tasks`` or ``max_body_bytes`` < 1, ``replica_cpus`` < 0.
    """
    for name, value in (("replicas", replicas), ("max_tasks", max_tasks), ("max_body_bytes", max_body_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if replica_cpus < 0:
        raise ValueError(f"replica_cpus must be >= 0, got {replica_cpus!r}")
    models = TaskModels.options(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
                                max_ongoing_requests=4 * MAX_BATCH_SIZE).bind(str(store), max_tasks)
    return Gateway.bind(models, str(store), api_key_file, max_body_bytes)


def app_builder(args: dict[str, Any]):
    """Application builder for Serve's config files (``import_path: orchestrator.serve.app:app_builder``);
    ``args``: ``store`` (required), ``replicas``, ``max_tasks_per_replica``, ``api_key_file``,
    ``max_body_bytes``, ``replica_cpus`` (see :func:`build_app`).

    Raises:
        ValueError: no ``store``, an unknown key, or a bad value.
    """
    allowed = {"store", "replicas", "max_tasks_per_replica", "api_key_file", "max_body_bytes", "replica_cpus"}
    unknown = sorted(set(args) - allowed)
    if unknown or "store" not in args:
        raise ValueError(f"serve config args: unknown {unknown} or no 'store'; allowed: {', '.join(sorted(allowed))}")
    MaskStore(str(args["store"]))  # refuse a missing store before any replica starts
    return build_app(str(args["store"]), replicas=int(args.get("replicas", 1)),
                     max_tasks=int(args.get("max_tasks_per_replica", 16)), api_key_file=args.get("api_key_file"),
                     max_body_bytes=int(args.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
                     replica_cpus=float(args.get("replica_cpus", 1.0)))
