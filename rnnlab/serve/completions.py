"""OpenAI-compatible completions at work, on both sides of the Gateway -> generation deployment hop.

In the generation replica (``CompletionsMixin``, mixed into ``GenerationDeployment``): a request's choices join
the generation scheduler's running batch like any ``/v1/charlm`` request (``run_completion``), so batching,
seeded determinism and fault isolation are the scheduler's; the answer or the stream's chunks are built there in
OpenAI's shapes (``rnnlab.serve.openai``). In the Gateway (``create`` / ``chat``, called by its routes): the body
is validated (400s in OpenAI's shape), the stream cap, request timeout, drain on shutdown and metrics are the
Gateway's own, shared with ``/v1/charlm``, and every failure -- overload, a dead replica, a timeout -- is an
OpenAI-shaped error with the status the ``openai`` client maps (and retries, for 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from rnnlab import registry
from rnnlab.errors import InputError
from rnnlab.serve import limits, metrics
from rnnlab.serve.openai import (
    SSE_DONE,
    ChoiceState,
    CompletionRequest,
    OpenAIError,
    chat_not_supported,
    chunk_choices,
    completion,
    completion_id,
    join_deltas,
    parse_request,
    sse,
    unknown_model,
    usage,
)
from rnnlab.serve.schemas import failure_message

logger = logging.getLogger("ray.serve")


# --- in the generation replica ---------------------------------------------------------------------------------
def encode_prompts(body: CompletionRequest, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """Every prompt's character ids, all checked before anything runs (OpenAIError 400 naming the one at fault)."""
    encoded = []
    for position, prompt in enumerate(body.prompts):
        try:
            encoded.append(encode(prompt))
        except InputError as error:
            where = f"prompt {position}: " if isinstance(body.prompt, list) else ""
            raise OpenAIError(400, f"{where}{error}", param="prompt", code="invalid_prompt") from None
    return encoded


async def run_completion(scheduler, body: CompletionRequest, encoded: list[list[int]], itos: Sequence[str], *,
                         request_id: str, stream: bool, score_prompt: Callable | None = None,
                         ) -> AsyncIterator[list[dict]]:
    """Run every choice of ``body`` (prompts ``encoded``) on ``scheduler`` -- they join its batch like any
    request -- and yield lists of deltas as they settle; the last delta of each choice has its ``finish_reason``
    and, at the very end, one ``{"usage": ...}`` item. A choice that meets a stop string leaves the batch at once.
    A sequence that fails inside the scheduler raises its GenerationFailed (the other choices are cancelled).
    ``score_prompt(ids, top_n)`` gives an echoed prompt's log-probabilities (None for its first character)."""
    n = body.n or 1
    queue: asyncio.Queue = asyncio.Queue()
    # stop strings are watched as the text comes, so the scheduler streams to us whenever there are any
    live = stream or bool(body.stops)

    async def one(index: int, prompt: str, ids: list[int], sample: int) -> None:
        params = body.sampling(sample)
        state = ChoiceState(index, params.seed, body.stops, body.logprobs, itos)
        first = {"seed": params.seed}  # each choice's seed goes out with its first delta
        if body.echo:
            scores = None
            if body.logprobs is not None and score_prompt is not None:
                scores = await asyncio.to_thread(score_prompt, ids, body.logprobs)
            queue.put_nowait(state.echo(prompt, scores) | first)
            first = {}
        chunks = scheduler.generate(ids, params, request_id=f"{request_id}-{index}", stream=live,
                                    logprobs=body.logprobs)
        try:
            async for chunk in chunks:
                delta = state.feed("".join(itos[i] for i in chunk.ids), chunk.logprobs)
                if delta is not None:
                    queue.put_nowait(delta | first)
                    first = {}
                if state.matcher.stopped is not None:
                    break
        finally:
            await chunks.aclose()  # a stopped choice leaves the batch now
        generated = state.generated
        queue.put_nowait(state.finish() | first | {"_generated": generated})

    async def guarded(*args) -> None:
        try:
            await one(*args)
        except Exception as error:  # noqa: BLE001 -- handed to the consumer, which raises it
            queue.put_nowait(error)

    tasks = [asyncio.ensure_future(guarded(p * n + k, prompt, ids, k))
             for p, (prompt, ids) in enumerate(zip(body.prompts, encoded)) for k in range(n)]
    finished, generated = 0, 0
    try:
        while finished < len(tasks):
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            for delta in batch:
                if isinstance(delta, Exception):
                    raise delta
                if delta["finish_reason"] is not None:
                    finished += 1
                    generated += delta.pop("_generated")
            yield batch
    finally:
        for task in tasks:
            task.cancel()
    yield [{"usage": usage(sum(map(len, body.prompts)), generated)}]


def prompt_scorer(model, device) -> Callable[[list[int], int], list]:
    """``score_prompt`` for ``run_completion``: one forward pass over the prompt; per character after the first,
    its log-probability given the ones before and the ``top_n`` most likely characters there."""
    import torch

    from rnnlab.sampling import token_logprobs

    def score(ids: list[int], top_n: int) -> list:
        if len(ids) < 2:
            return [None] * len(ids)
        with torch.inference_mode():
            logits, _ = model.forward(torch.tensor([ids[:-1]], dtype=torch.long, device=device))
            chosen, values, top = token_logprobs(logits[0], torch.tensor(ids[1:], device=device), top_n)
        return [None, *((lp, list(zip(i, v))) for lp, v, i in zip(chosen.tolist(), values.tolist(), top.tolist()))]

    return score


class CompletionsMixin:
    """The generation deployment's OpenAI methods, on its ``models`` (rnnlab.serve.versions.ModelSet: each served
    id's predictor -- prompt encoding, vocabulary, model, its ``scheduler`` -- and info). Answers are dicts that
    cross the handle: a completion, or ``{"status", "error"}`` in OpenAI's shape."""

    def _pick(self, model: str):
        """(generator, info) of the model ``model`` names: a served id, that id @ its version, or the job's name
        (its default model). One version for the whole request, a swap meanwhile or not."""
        from rnnlab.serve.versions import UnknownModel

        model_id, _, version = model.partition("@")
        try:
            generator, info = self.models.pick(None if model_id == self.job else model_id)
        except UnknownModel:
            raise unknown_model(model, sorted(self.models.served)) from None
        if version and version != info["version"]:
            raise unknown_model(model, [f"{info['id']}@{info['version']}"])
        return generator, info

    def _completion_start(self, request: dict):
        body = parse_request(request["body"])
        generator, info = self._pick(body.model)
        head = {"id": completion_id(request["request_id"]), "object": "text_completion", "created": request["created"],
                "model": info["id"], "system_fingerprint": f"rnnlab-{info['version']}"}
        return body, generator, encode_prompts(body, generator.encode_prompt), head

    def _run(self, body: CompletionRequest, generator, encoded: list[list[int]], request_id: str, stream: bool):
        if getattr(generator, "score_prompt", None) is None:  # echo's prompt scoring, made once per model
            generator.score_prompt = prompt_scorer(generator.model, generator.device)
        if hasattr(self, "_watch"):
            self._watch()
        return run_completion(generator.scheduler, body, encoded, generator.vocab.itos, request_id=request_id,
                              stream=stream, score_prompt=generator.score_prompt)

    async def complete(self, request: dict) -> dict:
        """A whole completion (``request``: ``body``, ``request_id``, ``created``)."""
        from rnnlab.serve.scheduler import GenerationFailed

        try:
            body, generator, encoded, head = self._completion_start(request)
            deltas: dict[int, list[dict]] = {}
            used = None
            async for batch in self._run(body, generator, encoded, request["request_id"], stream=False):
                for item in batch:
                    if "usage" in item:
                        used = item["usage"]
                    else:
                        deltas.setdefault(item["index"], []).append(item)
        except OpenAIError as error:
            return {"status": error.status, "error": error.body()}
        except GenerationFailed as error:
            return {"status": 500, "error": _failure(error.request_id).body()}
        metrics.generated(used["completion_tokens"])
        return completion(head["id"], head["created"], head["model"], [join_deltas(deltas[i]) for i in sorted(deltas)],
                          used) | {"system_fingerprint": head["system_fingerprint"]}

    async def complete_stream(self, request: dict):
        """First ``{"ok": True}`` or ``{"status", "error"}``; then the stream's chunks in OpenAI's shape (the usage
        chunk last, when asked for); a failure inside the scheduler is a last ``{"status", "error"}``. Closing this
        generator (the client went away) frees the choices' slots."""
        from rnnlab.serve.scheduler import GenerationFailed

        try:
            body, generator, encoded, head = self._completion_start(request)
        except OpenAIError as error:
            yield {"status": error.status, "error": error.body()}
            return
        yield {"ok": True}
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        runner = self._run(body, generator, encoded, request["request_id"], stream=True)
        try:
            async for batch in runner:
                if "usage" in batch[0]:
                    metrics.generated(batch[0]["usage"]["completion_tokens"])
                    if include_usage:
                        yield head | {"choices": [], "usage": batch[0]["usage"]}
                    continue
                yield head | {"choices": chunk_choices(batch)} | ({"usage": None} if include_usage else {})
        except GenerationFailed as error:
            yield {"status": 500, "error": _failure(error.request_id).body()}
        finally:
            await runner.aclose()


def _failure(request_id: str) -> OpenAIError:
    return OpenAIError(500, failure_message(request_id), code="internal_error")


# --- in the Gateway ------------------------------------------------------------------------------------------
def add_routes(gateway_class, api) -> None:
    """The OpenAI routes as methods of the Gateway class (before ``@serve.ingress`` freezes it, which binds each
    route to the replica's Gateway by the method's qualified name): ``POST /v1/completions``, ``GET
    /v1/models/{model}`` (``client.models.retrieve``) and ``POST /v1/chat/completions`` (a clear 400)."""
    from fastapi import Request

    from rnnlab.serve import http

    async def post_completions(self, request):
        return await create(self, request, http.current_request_id())

    async def get_model(self, model):
        listed = await self.models()
        found = [entry for entry in listed["data"] if entry["id"] == model]
        return found[0] if found else unknown_model(model, [e["id"] for e in listed["data"]]).response()

    async def post_chat_completions(self):
        return chat_not_supported().response()

    # real classes, not the strings this module's annotations would be: FastAPI reads them inside the replica
    post_completions.__annotations__ = {"request": Request}
    get_model.__annotations__ = {"model": str}
    for method in (post_completions, get_model, post_chat_completions):
        method.__qualname__ = f"{gateway_class.__name__}.{method.__name__}"
        setattr(gateway_class, method.__name__, method)
    streamed = {"content": {"text/event-stream": {}}, "description": "OpenAI's text_completion, or with "
                "stream=true its chunks as server-sent events ending `data: [DONE]`."}
    api.post("/v1/completions", summary="OpenAI-compatible completions (a token is a character)",
             responses={200: streamed}, openapi_extra=http.documented_body(CompletionRequest))(post_completions)
    api.get("/v1/models/{model}", summary="One model of /v1/models (OpenAI's shape)")(get_model)
    api.post("/v1/chat/completions", include_in_schema=False)(post_chat_completions)


def generation_handle(gateway, model: str):
    """The generation deployment a completion goes to: the job ``model`` names, else the only one served (whose
    replica then checks ``model`` against its bundle's name)."""
    served = {job: handle for job, handle in gateway.handles.items()
              if handle is not None and registry.job(job).served_by == "generation"}
    if model in served:
        return served[model]
    if len(served) == 1:
        return next(iter(served.values()))
    raise unknown_model(model, list(served))


async def create(gateway, request, request_id: str):
    """``POST /v1/completions`` in the Gateway. Its ``limits``, open-stream count and drain apply as to the
    generation job's own route."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    try:
        try:
            body = parse_request(await request.body())
        except HTTPException as error:  # the body is over max_body_bytes (limits.Guard stopped reading it)
            raise OpenAIError(error.status_code, _words(error.detail), param="body", code="body_too_large") from None
        handle = generation_handle(gateway, body.model)
        payload = {"body": body.model_dump(exclude_none=True), "request_id": request_id, "created": int(time.time())}
        timeout = gateway.limits["request_timeout_s"]
        if not body.stream:
            response = handle.complete.remote(payload)
            try:
                answer = await asyncio.wait_for(response, timeout)
            except asyncio.TimeoutError:
                response.cancel()
                raise
            if "error" in answer:
                return JSONResponse(status_code=answer["status"], content=answer["error"])
            return JSONResponse(answer)
        refused = gateway.stream_refused()
        if refused is not None:
            raise in_openai_shape(refused)
        deadline = time.monotonic() + timeout
        stream = handle.options(stream=True).complete_stream.remote(payload)
        first = await gateway.first_item(stream)
        if "error" in first:
            stream.cancel()
            return JSONResponse(status_code=first["status"], content=first["error"])
        return gateway.streaming(_events, stream, deadline)
    except Exception as error:  # noqa: BLE001 -- every failure in OpenAI's shape, with the status the client maps
        return service_error(error, request.url.path).response()


def service_error(error: Exception, path: str) -> OpenAIError:
    """What the Gateway answers for a failure on an OpenAI route: the answer of its other routes
    (``http.fault_of``: 503 + Retry-After for overload or a replica restarting, 504 for a timeout), in OpenAI's
    shape."""
    from rnnlab.serve.http import fault_of

    if isinstance(error, OpenAIError):
        return error
    fault = fault_of(error, path)
    if fault is None:
        raise error
    return in_openai_shape(fault)


def in_openai_shape(fault) -> OpenAIError:
    return OpenAIError(fault.status, fault.message, code=fault.kind,
                       retry_after=limits.SETTINGS.retry_after_s if fault.retry else None)


def _words(detail) -> str:
    return detail[0]["msg"] if isinstance(detail, list) and detail and "msg" in detail[0] else str(detail)


async def _events(stream, deadline: float, stopping: asyncio.Event, on_close) -> AsyncIterator[str]:
    """The replica's chunks as server-sent events, ending ``data: [DONE]``; a failure after the headers went out
    is an ``{"error": ...}`` event (the client raises it) before the end."""
    from rnnlab.serve.http import STREAM_FAULTS, next_item, stream_fault

    finished = False
    try:
        while True:
            try:
                item = await next_item(stream, deadline, stopping)
            except StopAsyncIteration:
                break
            if "error" in item:
                finished = True
                yield sse(item["error"]) + SSE_DONE
                return
            yield sse(item)
        finished = True
        yield SSE_DONE
    except STREAM_FAULTS as error:
        reason, message = stream_fault(error, "completions")
        yield sse(OpenAIError(503 if reason != "timeout" else 504, message, code=reason).body()) + SSE_DONE
    finally:
        if not finished:  # the client went away: stop the replica's generator so its slots are freed now
            stream.cancel()
        on_close()
