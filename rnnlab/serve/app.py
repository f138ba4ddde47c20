"""The Ray Serve application: a FastAPI ingress and one deployment per bundle kind.

    HTTP -> Gateway (FastAPI: schemas, limits, status codes, SSE; @serve.batch gathers texts / histories)
              |-> Sentiment  (one call per gathered batch)    SentimentClassifier.encode + predict_encoded
              |-> Forecast   (one call per gathered batch)    StockForecaster.prepare + predict_prepared
              '-> Generator  (iteration-level scheduler)      CharLSTM.step for all active sequences

Classification and forecasting are batched in the Gateway: its ``@serve.batch`` methods gather the items of
concurrent requests and make ONE handle call per batch, so the Gateway -> model hop (which costs about as much as
an LSTM pass over a review) is paid per batch, not per request. The model deployment validates every item on its
own and answers per item ({"error": sentence} for a bad one) rather than raising, so one bad text never fails the
requests batched with it (a raising batch function fails its whole batch); the Gateway turns errors into 422s
naming the field.

Batch sizes and timeouts are ``user_config`` (live-updatable by ``serve deploy``/``serve run``): the Gateway's
says how many items it gathers and how long it waits; a model deployment's says how many items go through one
forward pass. Replicas, autoscaling and ``ray_actor_options`` (fractional ``num_gpus``) are ordinary deployment
options in configs/serve.yaml. ``build_app`` is the application builder both ``rnnlab serve`` and ``serve run``
use.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures at request time inside the
# replica, where string annotations of the Gateway's methods (shipped by cloudpickle) no longer resolve.
import asyncio
import collections
import functools
import importlib.resources
import json
import logging
import math
import secrets
import time
import weakref
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rnnlab import __version__
from rnnlab.errors import BundleError, InputError, RnnlabError
from rnnlab.serve import connections, limits, metrics
from rnnlab.serve.schemas import (
    ErrorResponse,
    ForecastRequest,
    ForecastResponse,
    GenerateRequest,
    GenerateResponse,
    SentimentRequest,
    SentimentResponse,
    error_item,
)

# Serve's own logger: lines land in the replica's log file (and the driver's console) in Serve's format
logger = logging.getLogger("ray.serve")

# The Gateway waits up to 20 ms for a batch to fill: at 32 concurrent clients on 2 cores, 5 ms gave batches of ~3
# and half the throughput (benchmarks/README.md); a lone request pays the 20 ms.
DEFAULT_BATCH = {"max_batch_size": 32, "batch_wait_timeout_s": 0.02}
# 128 sequences per decoding step: on a CPU a step for 128 costs ~2.5x one for 32, so 1.7x the characters/s
DEFAULT_GENERATION = {"max_batch_size": 128}
# Deployment defaults sized for a 2-core laptop: fractional CPUs so all four replicas fit, and one constructor
# try, because a corrupt bundle will not heal on retry (Serve's default retries a failing constructor).
MODEL_DEPLOYMENT = {"ray_actor_options": {"num_cpus": 0.5}, "max_constructor_retry_count": 1}


def checked_batching(config: dict | None, defaults: dict, where: str) -> dict:
    """``defaults`` updated with a user_config / serve argument, each batching value checked: a bad one (say
    ``max_batch_size: 0``, which would leave generation admitting nothing) is one sentence naming it."""
    import math

    from rnnlab.errors import ConfigError

    config = defaults | {k: v for k, v in dict(config or {}).items() if v is not None}
    size = config.get("max_batch_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{where} max_batch_size must be a whole number of at least 1, got {size!r}.")
    if "batch_wait_timeout_s" in config:
        wait = config["batch_wait_timeout_s"]
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0:
            raise ConfigError(f"{where} batch_wait_timeout_s must be a number of seconds >= 0, got {wait!r}.")
    return config


class BatchStats:
    """Sizes of the batches a deployment actually ran, for /v1/models (proof that batching happens)."""

    def __init__(self) -> None:
        self.sizes: collections.Counter[int] = collections.Counter()

    def record(self, size: int) -> None:
        self.sizes[size] += 1

    def summary(self) -> dict:
        batches = sum(self.sizes.values())
        items = sum(k * n for k, n in self.sizes.items())
        return {
            "batches": batches,
            "items": items,
            "batch_size_histogram": {str(k): self.sizes[k] for k in sorted(self.sizes)},
            "batch_size_max": max(self.sizes, default=0),
            "batch_size_mean": items / batches if batches else 0.0,
        }


# oneDNN (torch's CPU LSTM) keeps a compiled primitive per input shape, up to 1,024 of them by default; reviews of
# every length in batches of every size make a new shape nearly every batch, so a Sentiment replica's memory grew
# ~1 MB every 5 s for as long as the soak ran (benchmarks/soak.py). 64 keeps the shapes in use hot (the same
# reviews/s in a plain loop) and the memory flat. Read by oneDNN at its first primitive, so set before any forward.
ONEDNN_CACHE_CAPACITY = "64"


def bound_onednn_cache() -> None:
    import os

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def _load(bundle_dir: str, job: str, torch_threads: int | None):
    """Load a bundle inside a replica; on failure log ONE line and raise, so the deployment fails at start."""
    import ray
    import torch

    from rnnlab.bundle import load_bundle
    from rnnlab.serve.bundles import bundle_info

    if torch_threads:
        torch.set_num_threads(torch_threads)
    bound_onednn_cache()
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    try:
        bundle = load_bundle(bundle_dir, device=device)
        if bundle.job != job:
            raise BundleError(f"Bundle {bundle_dir} is a {bundle.job} bundle, not a {job} one; fix the path.")
    except RnnlabError as error:
        logger.error("rnnlab serve: cannot load the %s bundle: %s", job, error)
        raise
    return bundle, bundle_info(bundle) | {"device": device}


def _model_id(info: dict) -> str:
    return f"{info['name']}@{info['version']}"


class _BatchedModel:
    """What the Sentiment and Forecast deployments share: a batch of items in (gathered by the Gateway's
    ``@serve.batch`` from concurrent requests: one handle call per batch, not per request), each item validated
    on its own, the valid ones through the model ``max_batch_size`` at a time, one answer per item back.
    A bad item's answer is ``{"error": sentence}``, so it never fails the others in its batch."""

    stats: BatchStats
    max_batch_size: int

    def reconfigure(self, config: dict) -> None:
        self.max_batch_size = checked_batching(config, DEFAULT_BATCH, type(self).__name__.removesuffix("Deployment"))["max_batch_size"]

    async def run_batch(self, items: list) -> dict:
        # in a thread: the replica's event loop keeps taking the next batch while torch (GIL released) works
        results = await asyncio.to_thread(self._run_batch, items)
        return {"model": _model_id(self.info), "results": results}

    def _run_batch(self, items: list) -> list[dict]:
        prepared, answers = [], [None] * len(items)
        for index, item in enumerate(items):
            try:
                prepared.append((index, self.prepare(item)))
            except InputError as error:
                answers[index] = {"error": str(error)}
        size = self.max_batch_size
        for start in range(0, len(prepared), size):  # max_batch_size=1 really means one item per forward pass
            chunk = prepared[start : start + size]
            self.stats.record(len(chunk))
            metrics.batch_size(self.info["job"], len(chunk))
            for (index, _), result in zip(chunk, self.predict([p for _, p in chunk])):
                answers[index] = result
        return answers

    def prepare(self, item):  # validate and preprocess ONE item; InputError if it is bad
        raise NotImplementedError

    def predict(self, prepared: list) -> list[dict]:  # one forward pass over prepared items
        raise NotImplementedError

    def describe(self) -> dict:
        return self.info | {"batching": {"max_batch_size": self.max_batch_size, **self.stats.summary()}}


@serve.deployment(name="Sentiment", max_ongoing_requests=64, **MODEL_DEPLOYMENT)
class SentimentDeployment(_BatchedModel):
    def __init__(self, bundle_dir: str, torch_threads: int | None = 1) -> None:
        from rnnlab.inference import SentimentClassifier

        bundle, self.info = _load(bundle_dir, "sentiment", torch_threads)
        self.classifier = SentimentClassifier(bundle)
        self.stats = BatchStats()
        self.max_batch_size = DEFAULT_BATCH["max_batch_size"]

    def prepare(self, text: str):
        return self.classifier.encode(text)  # validated and tokenized once

    def predict(self, encoded: list) -> list[dict]:
        return self.classifier.predict_encoded(encoded, batch_size=len(encoded))


@serve.deployment(name="Forecast", max_ongoing_requests=64, **MODEL_DEPLOYMENT)
class ForecastDeployment(_BatchedModel):
    def __init__(self, bundle_dir: str, torch_threads: int | None = 1) -> None:
        from rnnlab.inference import StockForecaster

        bundle, self.info = _load(bundle_dir, "stock", torch_threads)
        self.forecaster = StockForecaster(bundle)
        self.stats = BatchStats()
        self.max_batch_size = DEFAULT_BATCH["max_batch_size"]

    def prepare(self, columns: dict):
        return self.forecaster.prepare(columns)  # validated; only the rows the 252-day windows read are kept

    def predict(self, histories: list) -> list[dict]:
        # the features of the whole batch in one vectorised pass; a history with undefined features -> its error
        results = self.forecaster.predict_prepared(histories, batch_size=len(histories))
        return [result if "error" in result else {"forecast": result} for result in results]


@serve.deployment(name="Generator", max_ongoing_requests=256, **MODEL_DEPLOYMENT)
class GeneratorDeployment:
    def __init__(self, bundle_dir: str, torch_threads: int | None = 1) -> None:
        from rnnlab.inference import TextGenerator
        from rnnlab.serve.scheduler import GenerationScheduler

        bundle, self.info = _load(bundle_dir, "charlm", torch_threads)
        self.generator = TextGenerator(bundle)
        self.scheduler = GenerationScheduler(
            bundle.model, max_batch_size=DEFAULT_GENERATION["max_batch_size"], device=self.info["device"], log=logger
        )

    def reconfigure(self, config: dict) -> None:
        config = checked_batching(config, DEFAULT_GENERATION, "Generator")
        self.scheduler.set_max_batch_size(config["max_batch_size"])

    def _watch(self) -> None:
        """Export the scheduler's step sizes and queue as metrics, sampled once a second (the decode loop pays
        nothing for them). Started by the first request: the constructor has no event loop to start it in."""
        if getattr(self, "_watcher", None) is None:
            self._watcher = asyncio.get_running_loop().create_task(self._export_metrics())

    async def _export_metrics(self) -> None:
        # Thousands of decode steps a second would cost thousands of observe() calls; the histogram gets one
        # value a second instead: that second's mean sequences per step.
        seen: dict[int, int] = {}
        while True:
            try:
                sizes = dict(self.scheduler.step_sizes)  # one copy: the decoding thread may be counting
                steps = {size: count - seen.get(size, 0) for size, count in sizes.items()}
                total = sum(steps.values())
                if total:
                    metrics.batch_size("charlm", round(sum(k * n for k, n in steps.items()) / total))
                seen = sizes
                stats = self.scheduler.stats()
                metrics.queue_depth("generate", "waiting", stats["waiting"])
                metrics.queue_depth("generate", "active", stats["active"])
            except Exception as error:  # noqa: BLE001 -- metrics never take the deployment down
                logger.warning("rnnlab serve: generation metrics skipped: %s", error)
            await asyncio.sleep(1.0)

    def _prepare(self, request: dict):
        """Validate and encode one request before it joins the running batch; returns (ids, params) or errors.
        The Gateway's schema checked the sampling fields already; they are checked again (the same
        SamplingParams) for callers that use this deployment's handle directly."""
        from pydantic import ValidationError

        from rnnlab.sampling import SamplingParams

        try:
            ids = self.generator.encode_prompt(request["prompt"])
        except InputError as error:
            return None, {"errors": [error_item(["body", "prompt"], str(error))]}
        try:
            params = SamplingParams(**{k: request[k] for k in SamplingParams.model_fields if k in request})
        except ValidationError as error:
            return None, {"errors": [error_item(["body", *map(str, e["loc"])], e["msg"], e["type"])
                                     for e in error.errors()]}
        return ids, params.with_seed()  # the seed is returned to the client, so any answer can be reproduced

    async def generate(self, request: dict) -> dict:
        from rnnlab.serve.scheduler import GenerationFailed

        self._watch()
        ids, params = self._prepare(request)
        if ids is None:
            return params
        request_id = request.get("request_id")
        try:
            pieces = [self._decode(chunk.ids) async for chunk in self.scheduler.generate(
                ids, params, request_id=request_id, stream=False)]
        except GenerationFailed as error:
            return {"failed": error.request_id}
        text = "".join(pieces)
        metrics.generated(len(text))
        return {"model": _model_id(self.info), "text": text, "seed": params.seed, "tokens": len(text)}

    async def generate_stream(self, request: dict):
        """First item: {"model", "seed"} or {"errors"}; then {"text": chunk} items, the final one marked
        ``"last": True``, or a last {"failed": request id}. Closing the stream (the client went away; Serve cancels
        this generator) frees the sequence's slot."""
        from rnnlab.serve.scheduler import GenerationFailed

        self._watch()
        ids, params = self._prepare(request)
        if ids is None:
            yield params
            return
        yield {"model": _model_id(self.info), "seed": params.seed}
        stream = self.scheduler.generate(ids, params, request_id=request.get("request_id"))
        try:
            async for chunk in stream:
                text = self._decode(chunk.ids)
                metrics.generated(len(text))
                yield {"text": text, "last": True} if chunk.last else {"text": text}
        except GenerationFailed as error:
            yield {"failed": error.request_id}
        finally:
            await stream.aclose()

    def _decode(self, ids: list[int]) -> str:
        itos = self.generator.vocab.itos
        return "".join(itos[i] for i in ids)

    def describe(self) -> dict:
        return self.info | {"batching": self.scheduler.stats()}


# --- the HTTP ingress ------------------------------------------------------------------------------------------
api = FastAPI(
    title="rnnlab",
    version=__version__,
    description="Sentiment classification, next-close forecasting and character generation from rnnlab bundles. "
    "Concurrent requests are batched: @serve.batch for classification and forecasting, iteration-level "
    "batching (one LSTM step for every active sequence) for generation.",
)
# key, body-size and idle-send checks before any route (rnnlab.serve.limits); added before @serve.ingress freezes
# the app
api.add_middleware(limits.Guard)
_ERRORS = {401: {"model": ErrorResponse, "description": "No or a wrong API key (when the service has one)."},
           413: {"model": ErrorResponse, "description": "The request body is over the service's limit."},
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


# What the Gateway answers when a model deployment cannot: a JSON 5xx, never a hang or an HTML page.


def _retry_later(status: int, msg: str, kind: str) -> JSONResponse:
    metrics.rejected(kind)
    return JSONResponse(status_code=status, content={"detail": [error_item(["service"], msg, kind)]},
                        headers={"Retry-After": str(math.ceil(limits.SETTINGS.retry_after_s))})


@api.exception_handler(BackPressureError)
async def _overloaded(request: Request, error: Exception) -> JSONResponse:
    return _retry_later(503, "The service is at its queue limit; retry after the Retry-After seconds.", "overloaded")


@api.exception_handler(RayActorError)
@api.exception_handler(DeploymentUnavailableError)
@api.exception_handler(ReplicaUnavailableError)
async def _replica_failed(request: Request, error: Exception) -> JSONResponse:
    logger.warning("rnnlab serve: a model replica failed during %s: %s", request.url.path, type(error).__name__)
    return _retry_later(503, "A model replica failed and is being restarted; retry after the Retry-After seconds.",
                        "replica_failed")


@api.exception_handler(asyncio.TimeoutError)  # the builtin TimeoutError from Python 3.11
async def _timed_out(request: Request, error: Exception) -> JSONResponse:
    return _retry_later(504, "The request took longer than the service's request_timeout_s; retry, or ask for less.",
                        "timeout")


@api.exception_handler(RayError)
async def _ray_failed(request: Request, error: Exception) -> JSONResponse:
    logger.error("rnnlab serve: %s failed: %s", request.url.path, str(error).strip().splitlines()[0:1])
    return JSONResponse(status_code=500, content={"detail": [error_item(
        ["service"], "The model deployment failed on this request; see the replica logs.", "internal")]})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own 4xx (an unparseable body, an unknown path or method) in the service's shape: a list naming
    # where the fault is, like every other error it answers
    detail = error.detail
    if not isinstance(detail, list):
        where = {404: ["path"], 405: ["method"]}.get(error.status_code, ["body"])
        detail = [error_item(where, str(detail), "http_error")]
    return JSONResponse(status_code=error.status_code, content={"detail": detail}, headers=error.headers)


def _parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Validate a raw JSON body with pydantic in one pass; errors as FastAPI words them (loc from "body")."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise RequestValidationError(
            [{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        ) from None


def _documented_body(model: type[BaseModel]) -> dict:
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


def _unavailable(kind: str) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": [error_item(
        ["path"], f"No {kind} bundle is being served; add one to the --bundles folder and restart.", "unavailable")]})


def _invalid(errors: list[dict]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": errors})


@functools.cache
def _playground_page() -> str:
    return importlib.resources.files("rnnlab.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def _sse(event: str | None, data: Any) -> str:
    # JSON keeps newlines inside generated text from breaking SSE framing
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def _failure_message(request_id: str) -> str:
    return (f"Generation failed inside the service for request {request_id}; the server log has one line with "
            "this id. Other requests are not affected; retry, and report the id if it persists.")


def _failed(request_id: str) -> JSONResponse:
    return JSONResponse(status_code=500, content={
        "detail": [error_item([], _failure_message(request_id), "internal_error")], "request_id": request_id})


def _request_id() -> str:
    """Serve's id for the request being handled (its access log and ``x-request-id`` header carry the same), or a
    fresh one."""
    try:
        from ray.serve.context import _get_serve_request_context

        request_id = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 -- a private Serve API: any change there falls back to our own id
        request_id = ""
    return request_id or secrets.token_hex(8)


class _ShuttingDown(Exception):
    pass


async def _events(first: dict, stream, deadline: float, stopping: asyncio.Event, on_close=None):
    tokens, finished = 0, False
    # `start` goes out with the first chunk, and the final chunk with `done`: every message is a send through Ray
    # and the proxy, and a short stream would otherwise cost twice as many
    pending = _sse("start", first)
    try:
        while True:
            try:
                item = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            if stopping.is_set():
                raise _ShuttingDown
            if "failed" in item:  # this sequence failed; the others in its batch go on
                failure = {"detail": _failure_message(item["failed"]), "request_id": item["failed"]}
                yield pending + _sse("error", failure)
                return
            tokens += len(item["text"])
            if item.pop("last", False):
                finished = True
                yield pending + _sse(None, item) + _sse("done", {"tokens": tokens})
                return
            yield pending + _sse(None, item)
            pending = ""
        finished = True
        yield pending + _sse("done", {"tokens": tokens})
    except (RayError, asyncio.TimeoutError, _ShuttingDown) as error:
        # headers are sent: the fault goes to the client as an event, and the stream ends
        reason = ("timeout" if isinstance(error, asyncio.TimeoutError) else
                  "shutting_down" if isinstance(error, _ShuttingDown) else "replica_failed")
        metrics.rejected(reason)
        message = {"timeout": "The stream took longer than the service's request_timeout_s.",
                   "shutting_down": "The service is shutting down; retry the request against its next instance.",
                   "replica_failed": "The generation replica failed during this stream; retry the request."}[reason]
        logger.warning("rnnlab serve: a generation stream ended early: %s", type(error).__name__)
        yield pending + _sse("error", {"detail": [error_item(["service"], message, reason)], "tokens": tokens})
    finally:
        if not finished:  # the client went away: stop the replica's generator so its slot is freed now
            stream.cancel()
        if on_close is not None:
            on_close()


# Everything the Gateway calls must be defined above it: @serve.ingress serializes the class when applied.
@serve.deployment(name="Gateway", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Gateway:
    def __init__(
        self,
        sentiment: DeploymentHandle | None = None,
        forecast: DeploymentHandle | None = None,
        generator: DeploymentHandle | None = None,
        guard: dict | None = None,
    ) -> None:
        self.handles = {"sentiment": sentiment, "forecast": forecast, "generate": generator}
        self.batch_wait_timeout_s = DEFAULT_BATCH["batch_wait_timeout_s"]
        guard = dict(guard or {})
        self.limits = limits.check_limits({k: v for k, v in guard.items() if k in limits.LIMITS})
        limits.configure(limits.GuardSettings(key_sha256=guard.get("key_sha256"),
                                              max_body_bytes=int(self.limits["max_body_bytes"]),
                                              idle_send_timeout_s=self.limits["idle_send_timeout_s"],
                                              retry_after_s=self.limits["retry_after_s"]))
        # header deadline and connection cap for the HTTP server Ray Serve starts in this replica under direct
        # ingress (after this constructor); Ray's proxy gets them from rnnlab serve (rnnlab.serve.connections)
        connections.install(self.limits["header_timeout_s"], int(self.limits["max_connections"]),
                            self.limits["retry_after_s"])
        # open streams: the SSE generators not yet finished (a WeakSet, so one the server dropped without ever
        # starting it cannot hold a slot forever) plus those still waiting for their first item
        self._streams: weakref.WeakSet = weakref.WeakSet()
        self._starting = 0
        self._stopping = asyncio.Event()

    def reconfigure(self, config: dict) -> None:
        """max_batch_size / batch_wait_timeout_s for gathering sentiment texts and forecast histories (the model
        deployments' user_config sets how many items go through one forward pass)."""
        config = checked_batching(config, DEFAULT_BATCH, "Gateway")
        self.batch_wait_timeout_s = float(config["batch_wait_timeout_s"])
        for gather in (self._sentiment_batch, self._forecast_batch):
            gather.set_max_batch_size(int(config["max_batch_size"]))
            gather.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    # Items from concurrent requests go to the model deployment in ONE handle call per batch: the hop to another
    # replica costs about as much as an LSTM pass over a review, so paying it per request capped the batches.
    # The model deployment answers per item ({"error": ...} for a bad one), so one bad item fails nothing else.
    @serve.batch(**DEFAULT_BATCH)
    async def _sentiment_batch(self, texts: list[str]) -> list[tuple[str, dict]]:
        answer = await self.handles["sentiment"].run_batch.remote(texts)
        return [(answer["model"], result) for result in answer["results"]]

    @serve.batch(**DEFAULT_BATCH)
    async def _forecast_batch(self, histories: list[dict]) -> list[tuple[str, dict]]:
        answer = await self.handles["forecast"].run_batch.remote(histories)
        return [(answer["model"], result) for result in answer["results"]]

    async def _within_timeout(self, awaitable):
        """Await a model call for at most request_timeout_s (Ray's own timeout can be lifted by a client header)."""
        return await asyncio.wait_for(awaitable, self.limits["request_timeout_s"])

    @property
    def open_streams(self) -> int:
        return self._starting + sum(1 for events in self._streams if events.ag_frame is not None)

    def _stream_closed(self) -> None:  # called from the closing stream's finally, so it still counts itself
        metrics.queue_depth("gateway", "streams", max(0, self.open_streams - 1))

    async def drain(self, grace_s: float = 10.0) -> int:
        """Before shutdown (``rnnlab serve`` calls this on Ctrl-C / SIGTERM): open streams get ``grace_s`` to
        finish, then each gets an ``error`` event and ends, so no client is left with a cut connection. Returns
        how many were ended early. (Serve's own graceful shutdown waits for them, but its proxy closes first.)"""
        deadline = time.monotonic() + grace_s
        while self.open_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        ended = self.open_streams
        self._stopping.set()
        while self.open_streams and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)
        return ended

    @api.get("/", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """One static page that calls the /v1/* routes: try the three models in a browser."""
        return HTMLResponse(_playground_page())

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "serving": [kind for kind, handle in self.handles.items() if handle is not None]}

    @api.get("/v1/models")
    async def models(self) -> dict:
        kinds = [kind for kind, handle in self.handles.items() if handle is not None]
        described = await asyncio.gather(*(self.handles[kind].describe.remote() for kind in kinds))
        for kind, info in zip(kinds, described):
            if kind != "generate":  # gathered here, in the Gateway
                info["batching"]["batch_wait_timeout_s"] = self.batch_wait_timeout_s
        return {"models": [{"endpoint": f"/v1/{kind}"} | info for kind, info in zip(kinds, described)],
                "streams": {"open": self.open_streams, "max": int(self.limits["max_streams"])}}

    @api.post("/v1/sentiment", response_model=SentimentResponse, responses=_ERRORS)
    async def sentiment(self, body: SentimentRequest):
        if self.handles["sentiment"] is None:
            return _unavailable("sentiment")
        answers = await self._within_timeout(asyncio.gather(*(self._sentiment_batch(text) for text in body.texts)))
        errors = [error_item(["body", "texts", i], result["error"])
                  for i, (_, result) in enumerate(answers) if "error" in result]
        if errors:
            return _invalid(errors)
        return {"model": answers[0][0], "results": [result for _, result in answers]}

    @api.post("/v1/forecast", response_model=ForecastResponse, responses=_ERRORS,
              openapi_extra=_documented_body(ForecastRequest))
    async def forecast(self, request: Request):
        if self.handles["forecast"] is None:
            return _unavailable("stock forecast")
        # A history is hundreds of rows: pydantic validates the raw JSON in one pass (FastAPI's json.loads and then
        # validation of the objects cost three times as much) and the rows travel on as a few arrays.
        body = _parse_body(ForecastRequest, await request.body())
        model, result = await self._within_timeout(self._forecast_batch(body.columns()))
        if "error" in result:
            return _invalid([error_item(["body", "rows"], result["error"])])
        return {"model": model, "forecast": result["forecast"]}

    @api.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses=_ERRORS | {200: {"content": {"text/event-stream": {}},
                                   "description": "JSON, or with stream=true server-sent events: `start` "
                                   "{model, seed}, then data {text} per chunk, then `done` {tokens}."}},
    )
    async def generate(self, body: GenerateRequest):
        handle = self.handles["generate"]
        if handle is None:
            return _unavailable("text generation")
        request = body.model_dump() | {"request_id": _request_id()}
        if not body.stream:
            response = handle.generate.remote(request)
            try:
                answer = await self._within_timeout(response)
            except asyncio.TimeoutError:
                response.cancel()
                raise
            if "failed" in answer:
                return _failed(answer["failed"])
            return _invalid(answer["errors"]) if "errors" in answer else answer
        if self.open_streams >= self.limits["max_streams"]:
            return _retry_later(503, f"The service already has {self.open_streams} generation streams open, its "
                                "max_streams; retry after the Retry-After seconds.", "overloaded")
        deadline = time.monotonic() + self.limits["request_timeout_s"]
        self._starting += 1  # counted from here: a slow first item holds a stream slot too
        stream = handle.options(stream=True).generate_stream.remote(request)
        try:
            first = await self._within_timeout(stream.__anext__())
        except BaseException:
            stream.cancel()
            raise
        finally:
            self._starting -= 1
        if "errors" in first:
            stream.cancel()
            return _invalid(first["errors"])
        events = _events(first, stream, deadline, self._stopping, self._stream_closed)
        self._streams.add(events)
        metrics.queue_depth("gateway", "streams", self.open_streams)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- the application builder -----------------------------------------------------------------------------------
def build_app(args: dict | None = None) -> serve.Application:
    """Ray Serve application builder (``import_path: rnnlab.serve.app:build_app`` in configs/serve.yaml).

    args: ``bundles`` (a folder of bundles) and/or ``sentiment`` / ``stock`` / ``charlm`` (one bundle each);
    ``torch_threads`` per replica (default 1: on a small CPU box the replicas share the cores);
    ``max_batch_size`` / ``batch_wait_timeout_s`` for the Gateway's gathering and all three model deployments
    (a deployment's ``user_config`` in the YAML wins over these); ``api_key_file`` (else ``RNNLAB_API_KEY``) and
    the limits of ``rnnlab.serve.limits.LIMITS`` (``max_queued_requests`` applies to every deployment, a
    deployment's own setting in the YAML wins).
    """
    from ray.serve.config import BackpressureConfig

    from rnnlab.errors import ConfigError
    from rnnlab.serve import auth
    from rnnlab.serve.bundles import find_bundles

    args = dict(args or {})
    from rnnlab.serve.bundles import KINDS

    known = {"bundles", *KINDS, "torch_threads", "max_batch_size", "batch_wait_timeout_s", "api_key_file",
             *limits.LIMITS}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"Unknown serve argument(s) {', '.join(unknown)}; use {', '.join(sorted(known))}.")
    checked = limits.check_limits({name: args.get(name) for name in limits.LIMITS})
    batching = {key: args[key] for key in ("max_batch_size", "batch_wait_timeout_s") if args.get(key) is not None}
    key = auth.load_key(args.get("api_key_file"))
    found = find_bundles(args.get("bundles"), explicit={job: args.get(job) for job in KINDS})
    threads = args.get("torch_threads", 1)
    checked_batching(batching, DEFAULT_BATCH, "serve argument")
    generation = {"max_batch_size": batching["max_batch_size"]} if "max_batch_size" in batching else {}
    # excess load is a 503 with Retry-After at every hop (the proxy's queue for the Gateway, the Gateway's for
    # the models), never an unbounded wait
    shedding = {"max_queued_requests": int(checked["max_queued_requests"]),
                "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=checked["retry_after_s"])}

    def bind(deployment, job: str, user_config: dict):
        if job not in found:
            return None
        options = shedding | ({"user_config": user_config} if user_config else {})
        return deployment.options(**options).bind(str(found[job]), threads)

    gateway = Gateway.options(max_ongoing_requests=int(checked["max_ongoing_requests"]), **shedding,
                              **({"user_config": batching} if batching else {}))
    guard = {name: checked[name] for name in limits.LIMITS} | {"key_sha256": auth.digest(key) if key else None}
    return gateway.bind(
        bind(SentimentDeployment, "sentiment", batching),
        bind(ForecastDeployment, "stock", batching),
        bind(GeneratorDeployment, "charlm", generation),
        guard,
    )
