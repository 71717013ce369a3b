"""The Ray Serve application over a mask store: ``/v1/tasks``, ``/embed`` and ``/classify`` for every task.

Two deployments (``smn serve`` and ``serve run serve_config.yaml`` build the same application with
:func:`build_app` / :func:`app_builder`):

* :class:`Gateway` (the HTTP ingress, a FastAPI app): checks the bearer token, the task name, the body size
  and that the body is a JPEG or PNG image, then calls the model deployment with the task as Serve's
  *multiplexed model id*, so Serve routes the request to a replica that already holds that task.
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
import hmac
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from smn_core.mask_file import BackboneMismatchError, MaskFileError

from orchestrator.serve.model import ImageError, MaskedModel, NoHeadError, TaskBank, decode_image
from orchestrator.store.mask_store import MaskStore, StoreError, validate_task_name

__all__ = ["Gateway", "TaskModels", "build_app", "app_builder", "read_api_key", "DEFAULT_MAX_BODY_BYTES",
           "MAX_BATCH_SIZE", "BATCH_WAIT_S"]

#: Largest request body accepted (bytes); larger ones get 413.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: Most requests in one ``@serve.batch`` of a model replica, and how long a batch waits to fill (seconds).
MAX_BATCH_SIZE, BATCH_WAIT_S = 32, 0.005
_OPS = ("embed", "classify")


def read_api_key(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped).

    Raises:
        ValueError: the file is missing, unreadable or empty (names the file).
    """
    p = Path(path)
    try:
        key = p.read_text().strip()
    except OSError as exc:
        raise ValueError(f"--api-key-file {str(path)!r} is not readable ({exc.strerror or exc})") from None
    if not key:
        raise ValueError(f"--api-key-file {str(path)!r} is empty; put one token (a long random string) in it")
    return key


def _error(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "error": " ".join(str(message).split())}


@serve.deployment(ray_actor_options={"num_cpus": 1})
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
                answer = _error(404, exc)
            except (MaskFileError, BackboneMismatchError, ValueError) as exc:
                answer = _error(409, exc)
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
                results[i] = _error(400, exc)
        if ok:
            feats = model.embed(model.preprocess(imgs))
            logits = model.logits_of(feats) if model.has_head else None
            answers = model.answers(logits) if logits is not None else None
            for j, i in enumerate(ok):
                op = items[i][1]
                if op == "embed":
                    results[i] = {"status": 200, "task": model.name, "embedding": feats[j].tolist()}
                elif answers is None:
                    results[i] = _error(404, f"task {model.name!r} has no classification head, so /classify "
                                        "cannot answer; use /embed, or store the task with a head")
                else:
                    results[i] = {"status": 200, "task": model.name, **answers[j],
                                  "logits": logits[j].tolist()}
        return results  # type: ignore[return-value]


api = FastAPI(title="smn serve", description="Embed and classify images with the tasks of a mask store.")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway:
    """The HTTP ingress (see the module docstring for the endpoints and status codes).

    Args:
        models: handle of the :class:`TaskModels` deployment.
        store: the mask store's location (read for the task list and names).
        api_key_file: file holding the bearer token every request must carry; None: no token asked.
        max_body_bytes: largest accepted body, >= 1.
    """

    def __init__(self, models: DeploymentHandle, store: str, api_key_file: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.models = models
        self.store = MaskStore(store)
        self.key = read_api_key(api_key_file) if api_key_file else None
        self.max_body_bytes = int(max_body_bytes)

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode()):
            return None
        return JSONResponse(_error(401, "missing or wrong bearer token; send 'Authorization: Bearer <key>'"),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes | JSONResponse:
        too_big = JSONResponse(_error(413, f"the body exceeds {self.max_body_bytes} bytes"), status_code=413)
        try:
            if int(request.headers.get("content-length", "0")) > self.max_body_bytes:
                return too_big
        except ValueError:
            return JSONResponse(_error(400, "the Content-Length header is not a number"), status_code=400)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return too_big
            chunks.append(chunk)
        return b"".join(chunks)

    @api.get("/v1/tasks")
    async def tasks(self, request: Request) -> JSONResponse:
        """The store's tasks: name, codec, bytes, bits per weight, density, whether it has a head."""
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            infos = await asyncio.to_thread(self.store.list)
        except MaskFileError as exc:
            return JSONResponse(_error(409, exc), status_code=409)
        return JSONResponse({"arch": self.store.arch, "backbone_hash": self.store.backbone_hash, "tasks": [
            {"task": i.task, "codec": i.codec, "bytes": i.file_bytes, "bits_per_weight": i.bits_per_weight,
             "density": i.density, "has_head": i.has_head} for i in infos]})

    @api.post("/v1/tasks/{task}/embed")
    async def embed(self, task: str, request: Request) -> JSONResponse:
        """The task's feature vector of the image in the body: ``{"task", "embedding": [F floats]}``."""
        return await self._infer(task, "embed", request)

    @api.post("/v1/tasks/{task}/classify")
    async def classify(self, task: str, request: Request) -> JSONResponse:
        """The task head's answer for the image in the body: ``{"task", "label", "index", "score", "logits"}``."""
        return await self._infer(task, "classify", request)

    async def _infer(self, task: str, op: str, request: Request) -> JSONResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            validate_task_name(task)
            known = await asyncio.to_thread(self.store.has, task)
        except StoreError as exc:
            return JSONResponse(_error(404, exc), status_code=404)
        if not known:
            return JSONResponse(_error(404, f"task {task!r} is not in the store; GET /v1/tasks lists them"),
                                status_code=404)
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            decode_image(body)
        except ImageError as exc:
            return JSONResponse(_error(400, exc), status_code=400)
        try:
            result = await self.models.options(multiplexed_model_id=task).infer.remote(op, body)
        except Exception as exc:  # noqa: BLE001 - a replica that died or timed out: the gateway stays up
            return JSONResponse(_error(503, f"the model replicas could not answer ({type(exc).__name__}: "
                                       f"{str(exc)[:200]})"), status_code=503)
        return JSONResponse(result, status_code=int(result.get("status", 200)))


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
