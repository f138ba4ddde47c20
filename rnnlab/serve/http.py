"""The HTTP side of the service: the FastAPI app the Gateway serves, its error answers (every fault is JSON in one
shape: a list naming where it is), body parsing, and the server-sent-events framing of generation streams.
"""

# No ``from __future__ import annotations``: FastAPI reads signatures at request time inside the replica.
import asyncio
import functools
import importlib.resources
import json
import logging
import math
import secrets
import time
from typing import Any, NamedTuple

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rnnlab import __version__, registry
from rnnlab.serve import limits, metrics
from rnnlab.serve.schemas import ErrorResponse, error_item, failure_message

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="rnnlab",
    version=__version__,
    description="Answers from rnnlab bundles, one route per job (POST /v1/<job>): "
    + "; ".join(f"{name}: {registry.JOBS[name].description}" for name in registry.served())
    + ". Concurrent requests are batched: @serve.batch for batched jobs, iteration-level batching (one LSTM step "
    "for every active sequence) for generation.",
)
# key, body-size and idle-send checks before any route (rnnlab.serve.limits); added before @serve.ingress freezes
# the app
api.add_middleware(limits.Guard)
ERRORS = {401: {"model": ErrorResponse, "description": "No or a wrong API key (when the service has one)."},
           413: {"model": ErrorResponse, "description": "The request body is over the service's limit."},
           404: {"model": ErrorResponse, "description": "The request's `model` is not served (GET /v1/models lists "
                 "the ids)."},
           422: {"model": ErrorResponse, "description": "Invalid input; `loc` names the field."},
           500: {"model": ErrorResponse, "description": "A fault inside the service; `request_id` names the log line."},
           503: {"model": ErrorResponse, "description": "No bundle of this kind is being served, or the service is "
                 "overloaded or restarting a replica: retry after the `Retry-After` seconds."},
           504: {"model": ErrorResponse, "description": "The request took longer than the service's timeout."}}


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the offending input back; with 20k-character texts that is noise. Keep loc + msg.
    detail = [error_item([str(p) if not isinstance(p, int) else p for p in e["loc"]], e["msg"], e["type"])
              for e in error.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


# What the Gateway answers when a model call fails: a JSON 5xx, never a hang or an HTML page. One table for every
# route, in the service's shape here and in OpenAI's on the OpenAI routes (completions.service_error).

# a failed model call: a Ray task's error, or the gRPC call's own for generation (the Gateway calls those replicas
# over gRPC, rnnlab/serve/app.py; a replica that is gone is a RayActorError there too)
CALL_FAULTS = (RayError, grpc.aio.AioRpcError)
REPLICA_GONE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


class Fault(NamedTuple):
    status: int
    kind: str  # the error item's type, OpenAI's error code and the rejected-requests metric's reason
    message: str
    retry: bool  # whether the client should retry: the answer carries Retry-After

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(math.ceil(limits.SETTINGS.retry_after_s))} if self.retry else None
        return JSONResponse(status_code=self.status, headers=headers,
                            content={"detail": [error_item(["service"], self.message, self.kind)]})


def fault_of(error: BaseException, path: str) -> Fault | None:
    """The answer for ``error``, raised by a model call for ``path``, counted and logged here; None when it is not
    a model call's failure."""
    if isinstance(error, BackPressureError):
        fault = Fault(503, "overloaded", "The service is at its queue limit; retry after the Retry-After seconds.",
                      True)
    elif isinstance(error, REPLICA_GONE):
        logger.warning("rnnlab serve: a model replica failed during %s: %s", path, type(error).__name__)
        fault = Fault(503, "replica_failed", "A model replica failed and is being restarted; retry after the "
                      "Retry-After seconds.", True)
    elif isinstance(error, asyncio.TimeoutError):  # the builtin TimeoutError from Python 3.11
        fault = Fault(504, "timeout", "The request took longer than the service's request_timeout_s; retry, or ask "
                      "for less.", True)
    elif isinstance(error, CALL_FAULTS):
        logger.error("rnnlab serve: %s failed: %s", path, str(error).strip().splitlines()[0:1])
        return Fault(500, "internal_error", "The model deployment failed on this request; see the replica logs.",
                     False)
    else:
        return None
    metrics.rejected(fault.kind)
    return fault


def too_many_streams(open_streams: int) -> Fault:
    metrics.rejected("overloaded")
    return Fault(503, "overloaded", f"The service already has {open_streams} generation streams open, its "
                 "max_streams; retry after the Retry-After seconds.", True)


async def _model_call_failed(request: Request, error: Exception) -> JSONResponse:
    return fault_of(error, request.url.path).response()


for _fault in (BackPressureError, *REPLICA_GONE, asyncio.TimeoutError, *CALL_FAULTS):
    api.add_exception_handler(_fault, _model_call_failed)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own 4xx (an unparseable body, an unknown path or method) in the service's shape: a list naming
    # where the fault is, like every other error it answers
    detail = error.detail
    if not isinstance(detail, list):
        where = {404: ["path"], 405: ["method"]}.get(error.status_code, ["body"])
        detail = [error_item(where, str(detail), "http_error")]
    return JSONResponse(status_code=error.status_code, content={"detail": detail}, headers=error.headers)


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Validate a raw JSON body with pydantic in one pass; errors as FastAPI words them (loc from "body")."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise RequestValidationError(
            [{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        ) from None


def documented_body(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that parses its body itself: the model's schema, its $defs inlined."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def unavailable(job: str) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": [error_item(
        ["path"], f"No {job} bundle is being served; add one to the --bundles folder and restart.", "unavailable")]})


def invalid(errors: list[dict]) -> JSONResponse:
    """422 naming each bad field; 404 when what is wrong is the ``model`` the request named (no such model)."""
    unknown = [error for error in errors if error.get("type") == "unknown_model"]
    return JSONResponse(status_code=404 if unknown else 422, content={"detail": unknown or errors})


@functools.cache
def playground_page() -> str:
    return importlib.resources.files("rnnlab.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def sse(event: str | None, data: Any) -> str:
    # JSON keeps newlines inside generated text from breaking SSE framing
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def failed(request_id: str) -> JSONResponse:
    return JSONResponse(status_code=500, content={
        "detail": [error_item([], failure_message(request_id), "internal_error")], "request_id": request_id})


def current_request_id() -> str:
    """Serve's id for the request being handled (its access log and ``x-request-id`` header carry the same), or a
    fresh one."""
    try:
        from ray.serve.context import _get_serve_request_context

        request_id = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 -- a private Serve API: any change there falls back to our own id
        request_id = ""
    return request_id or secrets.token_hex(8)


class ShuttingDown(Exception):
    pass


STREAM_FAULTS = (*CALL_FAULTS, asyncio.TimeoutError, ShuttingDown)  # what ends a stream whose headers are sent


async def next_item(stream, deadline: float, stopping: asyncio.Event):
    """The replica stream's next item by the request's deadline (asyncio.TimeoutError after it; StopAsyncIteration
    at its end); ShuttingDown once the service drains."""
    item = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
    if stopping.is_set():
        raise ShuttingDown
    return item


def stream_fault(error: BaseException, route: str) -> tuple[str, str]:
    """(reason, one sentence) for a stream ended by one of STREAM_FAULTS; counted and logged once, here."""
    reason = ("timeout" if isinstance(error, asyncio.TimeoutError) else
              "shutting_down" if isinstance(error, ShuttingDown) else "replica_failed")
    metrics.rejected(reason)
    logger.warning("rnnlab serve: a %s stream ended early: %s", route, type(error).__name__)
    return reason, {"timeout": "The stream took longer than the service's request_timeout_s.",
                    "shutting_down": "The service is shutting down; retry the request against its next instance.",
                    "replica_failed": "The generation replica failed during this stream; retry the request."}[reason]


async def events(first: dict, stream, deadline: float, stopping: asyncio.Event, on_close=None):
    tokens, finished = 0, False
    # `start` goes out with the first chunk, and the final chunk with `done`: every message is a send through Ray
    # and the proxy, and a short stream would otherwise cost twice as many
    pending = sse("start", first)
    try:
        while True:
            try:
                item = await next_item(stream, deadline, stopping)
            except StopAsyncIteration:
                break
            if "failed" in item:  # this sequence failed; the others in its batch go on
                failure = {"detail": failure_message(item["failed"]), "request_id": item["failed"]}
                yield pending + sse("error", failure)
                return
            tokens += len(item["text"])
            if item.pop("last", False):
                finished = True
                yield pending + sse(None, item) + sse("done", {"tokens": tokens})
                return
            yield pending + sse(None, item)
            pending = ""
        finished = True
        yield pending + sse("done", {"tokens": tokens})
    except STREAM_FAULTS as error:
        # headers are sent: the fault goes to the client as an event, and the stream ends; a restarting replica or
        # service says when to retry, as a 503's Retry-After would
        reason, message = stream_fault(error, "generation")
        retry = {"retry_after_s": limits.SETTINGS.retry_after_s} if reason != "timeout" else {}
        yield pending + sse("error", {"detail": [error_item(["service"], message, reason)], "tokens": tokens, **retry})
    finally:
        if not finished:  # the client went away: stop the replica's generator so its slot is freed now
            stream.cancel()
        if on_close is not None:
            on_close()
