"""The HTTP ingress of ``smn serve`` (:class:`Gateway`), in a process that never imports torch.

The gateway checks the bearer token, the task name, that the task's file exists, the body size and that the body
is a JPEG or PNG image, and passes the request on to the model deployment
(:class:`orchestrator.serve.app.TaskModels`) with the task as Serve's multiplexed model id. It imports only
Ray Serve, FastAPI, PIL and the store's layout (:mod:`orchestrator.store.layout`): a gateway replica starts
without paying for torch, so ``smn serve`` answers sooner. The application is assembled in
:mod:`orchestrator.serve.app`.
"""

import asyncio
import hmac
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from orchestrator.serve.images import ImageError, decode_image
from orchestrator.store.layout import StoreError, StoreLayout, exists, validate_task_name

__all__ = ["Gateway", "read_api_key", "error_body", "task_listing", "DEFAULT_MAX_BODY_BYTES", "GRACEFUL_WAIT_S"]

#: Largest request body accepted (bytes); larger ones get 413.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: Seconds a stopping replica first waits, and then between its checks, for requests still in flight (Serve's
#: ``graceful_shutdown_wait_loop_s``, 2 s by default): Ctrl-C on ``smn serve`` stops sooner, and a request in
#: flight is still answered.
GRACEFUL_WAIT_S = 0.2


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


def error_body(status: int, message: object) -> dict[str, Any]:
    """``{"status": status, "error": message on one line}``: every error answer's JSON."""
    return {"status": status, "error": " ".join(str(message).split())}


def task_listing(store: Any, infos: list[Any]) -> dict[str, Any]:
    """``GET /v1/tasks``' JSON: the store's arch and backbone hash, and per task (:class:`TaskInfo` of
    :meth:`MaskStore.list`) its name, codec, bytes, bits per weight, density and whether it has a head."""
    return {"arch": store.arch, "backbone_hash": store.backbone_hash, "tasks": [
        {"task": i.task, "codec": i.codec, "bytes": i.file_bytes, "bits_per_weight": i.bits_per_weight,
         "density": i.density, "has_head": i.has_head} for i in infos]}


api = FastAPI(title="smn serve", description="Embed and classify images with the tasks of a mask store.")


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=GRACEFUL_WAIT_S)
@serve.ingress(api)
class Gateway:
    """The HTTP ingress (see the module docstring for the endpoints and status codes).

    Its process imports neither torch nor the store's decoding side: it checks a task's file exists
    (:class:`orchestrator.store.layout.StoreLayout`) and asks a model replica for the task list.

    Args:
        models: handle of the :class:`orchestrator.serve.app.TaskModels` deployment.
        store: the mask store's location.
        api_key_file: file holding the bearer token every request must carry; None: no token asked.
        max_body_bytes: largest accepted body, >= 1.

    Raises:
        StoreError: no store at ``store``.
    """

    def __init__(self, models: DeploymentHandle, store: str, api_key_file: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.models = models
        self.files = StoreLayout.of(store)
        if not exists(self.files.fs, self.files.meta):
            raise StoreError(f"no mask store at {store!r} (no store.json); create one with `smn store init`")
        self.key = read_api_key(api_key_file) if api_key_file else None
        self.max_body_bytes = int(max_body_bytes)

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode()):
            return None
        return JSONResponse(error_body(401, "missing or wrong bearer token; send 'Authorization: Bearer <key>'"),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes | JSONResponse:
        too_big = JSONResponse(error_body(413, f"the body exceeds {self.max_body_bytes} bytes"), status_code=413)
        try:
            if int(request.headers.get("content-length", "0")) > self.max_body_bytes:
                return too_big
        except ValueError:
            return JSONResponse(error_body(400, "the Content-Length header is not a number"), status_code=400)
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
            listing = await self.models.tasks.remote()
        except Exception as exc:  # noqa: BLE001 - a replica that died or timed out: the gateway stays up
            return JSONResponse(error_body(503, f"the model replicas could not answer ({type(exc).__name__}: "
                                           f"{str(exc)[:200]})"), status_code=503)
        return JSONResponse(listing, status_code=int(listing.pop("status", 200)))

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
            known = await asyncio.to_thread(exists, self.files.fs, self.files.task(task))
        except StoreError as exc:
            return JSONResponse(error_body(404, exc), status_code=404)
        if not known:
            return JSONResponse(error_body(404, f"task {task!r} is not in the store; GET /v1/tasks lists them"),
                                status_code=404)
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            decode_image(body)
        except ImageError as exc:
            return JSONResponse(error_body(400, exc), status_code=400)
        try:
            result = await self.models.options(multiplexed_model_id=task).infer.remote(op, body)
        except Exception as exc:  # noqa: BLE001 - a replica that died or timed out: the gateway stays up
            return JSONResponse(error_body(503, f"the model replicas could not answer ({type(exc).__name__}: "
                                           f"{str(exc)[:200]})"), status_code=503)
        return JSONResponse(result, status_code=int(result.get("status", 200)))
