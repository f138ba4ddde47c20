"""The Ray Serve application: a FastAPI Gateway and one model deployment per served job, all from the registry.

    HTTP -> Gateway (FastAPI: schemas, limits, status codes, SSE; @serve.batch gathers each batched job's items)
              |-> <job> BatchedDeployment     (one call per gathered batch)   predictor.prepare + predict_prepared
              '-> <job> GenerationDeployment  (iteration-level scheduler)     model.step for all active sequences

Every served job (the registry's ``served_by``) answers ``POST /v1/<job>`` from a deployment named after it;
its request and answer schemas are its module's. Older routes (the registry's ``aliases``: ``/v1/forecast`` for
stock, ``/v1/generate`` for charlm) answer the same, for one release.

Batched jobs are batched in the Gateway: a ``@serve.batch`` per job gathers the items of concurrent requests and
makes ONE handle call per batch, so the Gateway -> model hop (which costs about as much as an LSTM pass over a
review) is paid per batch, not per request; two batches are in flight at once, so the model computes one while the
other travels.

Batch sizes and timeouts are ``user_config`` (live-updatable by ``serve deploy``/``serve run``): the Gateway's
says how many items it gathers and how long it waits; a model deployment's says how many items go through one
forward pass. Each model deployment runs the ``replicas`` arg's count of replicas, and every replica reserves an
equal share of the cluster's CPUs (rnnlab/serve/replicas.py); a deployment's own autoscaling or
``ray_actor_options`` (fractional ``num_gpus``) in configs/serve.yaml win over them. ``build_app`` is the
application builder both ``rnnlab serve`` and ``serve run`` use.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures at request time inside the
# replica, where string annotations of the Gateway's methods (shipped by cloudpickle) no longer resolve.
import asyncio
import time
import weakref
from typing import NamedTuple
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from rnnlab import registry
from rnnlab.serve import completions, connections, http, limits, memory, metrics, openai, replicas
from rnnlab.serve.deployments import BATCHES_IN_FLIGHT, DEFAULT_BATCH, DEPLOYMENTS, checked_batching
from rnnlab.serve.http import api
from rnnlab.serve.schemas import ErrorResponse, error_item, with_model_field


class Gateway:
    """The HTTP ingress. ``handles``: served job -> its model deployment's handle (None: no bundle for it)."""

    def __init__(self, handles: dict | None = None, guard: dict | None = None) -> None:
        memory.trace_from_env("Gateway")
        self.handles = {job: (handles or {}).get(job) for job in registry.served()}
        # Generation's requests are many and small (a prompt, at most MAX_NEW_TOKENS characters back): they go to
        # the replica over Serve's direct gRPC channel (the data plane of Ray's throughput-optimized mode), not as
        # Ray actor tasks: a fifth less of the Gateway's CPU per request, 3-13 % more characters/s served on 2
        # cores (benchmarks/README.md). Batches of reviews or prices stay Ray tasks: gRPC caps a message at 4 MB,
        # and a batch of long reviews can be larger.
        for job, handle in self.handles.items():
            if handle is not None and registry.job(job).served_by == "generation":
                self.handles[job] = handle.options(_by_reference=False)
        self.batch_wait_timeout_s = DEFAULT_BATCH["batch_wait_timeout_s"]
        # Items from concurrent requests go to the model deployment in ONE handle call per batch: the hop to
        # another replica costs about as much as an LSTM pass over a review, so paying it per request capped the
        # batches. The model deployment answers per item ({"error": ...} for a bad one), so one bad item fails
        # nothing else.
        self.gather = {job: serve.batch(**DEFAULT_BATCH, max_concurrent_batches=BATCHES_IN_FLIGHT)(self._gatherer(job))
                       for job in registry.served() if registry.job(job).served_by == "batched"}
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

    def _gatherer(self, job: str):
        # an item is (model id or None for the job's default, item); the deployment answers with the ID@VERSION
        # that served each one
        async def gather_items(items: list) -> list:
            answer = await self.handles[job].run_batch.remote(items)
            return list(zip(answer["models"], answer["results"]))

        return gather_items

    def reconfigure(self, config: dict) -> None:
        """max_batch_size / batch_wait_timeout_s for gathering the batched jobs' items (the model deployments'
        user_config sets how many items go through one forward pass)."""
        config = checked_batching(config, DEFAULT_BATCH, "Gateway")
        self.batch_wait_timeout_s = float(config["batch_wait_timeout_s"])
        for gather in self.gather.values():
            gather.set_max_batch_size(int(config["max_batch_size"]))
            gather.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    async def _within_timeout(self, awaitable):
        """Await a model call for at most request_timeout_s (Ray's own timeout can be lifted by a client header)."""
        return await asyncio.wait_for(awaitable, self.limits["request_timeout_s"])

    @property
    def open_streams(self) -> int:
        return self._starting + sum(1 for events in self._streams if events.ag_frame is not None)

    def _stream_closed(self) -> None:  # called from the closing stream's finally, so it still counts itself
        metrics.queue_depth("gateway", "streams", max(0, self.open_streams - 1))

    # both generation routes (/v1/charlm and OpenAI's /v1/completions) open their streams with these three
    def stream_refused(self) -> http.Fault | None:
        """The 503 when max_streams streams are open already."""
        return http.too_many_streams(self.open_streams) if self.open_streams >= self.limits["max_streams"] else None

    async def first_item(self, stream) -> dict:
        """The replica stream's first item, within request_timeout_s; the stream is cancelled if that fails. It
        holds a stream slot while it waits: a slow first item counts too."""
        self._starting += 1
        try:
            return await self._within_timeout(stream.__anext__())
        except BaseException:
            stream.cancel()
            raise
        finally:
            self._starting -= 1

    def streaming(self, events, *args) -> StreamingResponse:
        """The response sending ``events(*args, stopping, on_close)``, an SSE generator: counted among the open
        streams until it ends, and ended early when the service drains."""
        events = events(*args, self._stopping, self._stream_closed)
        self._streams.add(events)
        metrics.queue_depth("gateway", "streams", self.open_streams)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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
        """One static page that calls the /v1/* routes: try the served jobs in a browser."""
        return HTMLResponse(http.playground_page())

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "serving": [job for job, handle in self.handles.items() if handle is not None]}

    @api.get("/v1/models")
    async def models(self) -> dict:
        """One entry per served model (several per job: rnnlab/serve/versions.py): its id (send it as ``model``),
        version (the weights' digest), whether it is its job's default, and its deployment's batching."""
        jobs = [job for job, handle in self.handles.items() if handle is not None]
        described = await asyncio.gather(*(self.handles[job].describe.remote() for job in jobs))
        entries = []
        for job, deployment in zip(jobs, described):
            batching = dict(deployment["batching"])
            if job in self.gather:  # gathered here, in the Gateway
                batching["batch_wait_timeout_s"] = self.batch_wait_timeout_s
            for info in deployment["models"]:
                # where its example request is, when its bundle has one (the body itself would swell this list)
                example = f"/v1/{job}/example?model={quote(info['id'])}" if info.get("example") else None
                entries.append(openai.model_entry(info["id"], {"endpoint": f"/v1/{job}"} | info
                                                  | {"batching": info.get("batching", batching), "example": example},
                                                  created=info.get("created")))
        # OpenAI's list shape (client.models.list()): each model's id, rnnlab's facts as extra fields
        return openai.model_list(entries, streams={"open": self.open_streams, "max": int(self.limits["max_streams"])})

    async def answer_batched(self, job: str, body):
        """POST /v1/<job> of a batched job: the body's items gathered with concurrent requests' items, a 422 naming
        each bad item, else the job's answer."""
        spec = registry.job(job)
        if self.handles[job] is None:
            return http.unavailable(job)
        items = [(body.model, item) for item in body.items()]
        answers = await self._within_timeout(asyncio.gather(*(self.gather[job](item) for item in items)))
        if len({model for model, _ in answers}) > 1:
            # a swap landed between two batches holding this request's items: ask again, so one answer comes
            # from one version (the second time they all meet the new one)
            answers = await self._within_timeout(asyncio.gather(*(self.gather[job](item) for item in items)))
        unknown = next((result for _, result in answers if result.get("type") == "unknown_model"), None)
        if unknown is not None:
            return http.invalid([error_item(["body", "model"], unknown["error"], "unknown_model")])
        errors = [error_item(body.error_loc(i), result["error"])
                  for i, (_, result) in enumerate(answers) if "error" in result]
        if errors:
            return http.invalid(errors)
        return spec.load("answer").answer(answers[0][0], [result for _, result in answers])

    async def example(self, job: str, model: str | None):
        """GET /v1/<job>/example: the example request body the model's bundle keeps; 404 naming ``model`` when it
        is not served or its bundle has none."""
        if self.handles[job] is None:
            return http.unavailable(job)
        answer = await self._within_timeout(self.handles[job].example.remote(model))
        if "error" in answer:
            return http.invalid([error_item(["query", "model"], answer["error"], "unknown_model")])
        if answer["example"] is None:
            return JSONResponse(status_code=404, content={"detail": [error_item(
                ["query", "model"], f"Model {answer['id']} has no example: its bundle was exported without one "
                "(bundles trained by this rnnlab have one, where the job gives it); send your own request.",
                "no_example")]})
        return JSONResponse(answer["example"])

    async def answer_generation(self, job: str, body):
        """POST /v1/<job> of a generation job: JSON, or with ``stream`` server-sent events."""
        handle = self.handles[job]
        if handle is None:
            return http.unavailable(job)
        request = body.model_dump() | {"request_id": http.current_request_id()}
        if not body.stream:
            response = handle.generate.remote(request)
            try:
                answer = await self._within_timeout(response)
            except asyncio.TimeoutError:
                response.cancel()
                raise
            if "failed" in answer:
                return http.failed(answer["failed"])
            return http.invalid(answer["errors"]) if "errors" in answer else answer
        refused = self.stream_refused()
        if refused is not None:
            return refused.response()
        deadline = time.monotonic() + self.limits["request_timeout_s"]
        stream = handle.options(stream=True).generate_stream.remote(request)
        first = await self.first_item(stream)
        if "errors" in first:
            stream.cancel()
            return http.invalid(first["errors"])
        return self.streaming(http.events, first, stream, deadline)


def _add_route(route: str, job: str) -> None:
    """POST /v1/<route> answered by ``job``, as a Gateway method (Serve's ingress binds each route to the replica's
    Gateway by the method's qualified name)."""
    spec = registry.job(job)
    # every job's body gets ``model``: which of the job's served models answers (rnnlab/serve/versions.py)
    request_model, answer_model = with_model_field(spec.load("request")), spec.load("answer")
    alias = route != job
    extra = {}
    if spec.served_by == "batched" and getattr(request_model, "raw_json", False):
        # A long body (a history is hundreds of rows): pydantic validates the raw JSON in one pass (FastAPI's
        # json.loads and then validation of the objects cost three times as much).
        async def endpoint(self, request: Request):
            if self.handles[job] is None:
                return http.unavailable(job)
            return await self.answer_batched(job, http.parse_body(request_model, await request.body()))

        extra = {"openapi_extra": http.documented_body(request_model)}
    elif spec.served_by == "batched":
        async def endpoint(self, body):
            return await self.answer_batched(job, body)

        endpoint.__annotations__["body"] = request_model  # a real class: FastAPI parses the body with it
    else:
        async def endpoint(self, body):
            return await self.answer_generation(job, body)

        endpoint.__annotations__["body"] = request_model
        extra = {"responses": http.ERRORS | {200: {"content": {"text/event-stream": {}}, "description":
                 "JSON, or with stream=true server-sent events: `start` {model, seed}, then data {text} per chunk, "
                 "then `done` {tokens}."}}}
    endpoint.__name__ = f"post_{route}"
    endpoint.__qualname__ = f"Gateway.{endpoint.__name__}"
    setattr(Gateway, endpoint.__name__, endpoint)
    api.post(f"/v1/{route}", response_model=answer_model, deprecated=alias or None,
             summary=f"{job} (alias of /v1/{job}, kept for one release)" if alias else spec.description,
             **({"responses": http.ERRORS} | extra))(endpoint)
    if not alias:
        _add_example_route(job, request_model)


def _add_example_route(job: str, request_model) -> None:
    """GET /v1/<job>/example[?model=ID]: a request body for POST /v1/<job> that the model's bundle keeps (training
    wrote it), for a visitor to try the model with; the playground's "load example"."""
    async def example(self, model: str | None = None):
        return await self.example(job, model)

    example.__name__ = f"example_{job}"
    example.__qualname__ = f"Gateway.{example.__name__}"
    setattr(Gateway, example.__name__, example)
    api.get(f"/v1/{job}/example", summary=f"An example request body for POST /v1/{job}",
            description="What the model's bundle keeps as its example (a forecaster's: the last price rows one "
            "forecast reads), ready to send to POST /v1/" + job + ". `model`: a served model id (GET /v1/models; "
            "its `example` field links here when its bundle has one); the job's default model when left out.",
            responses={200: {"model": request_model, "description": "A request body for POST /v1/" + job + "."},
                       404: {"model": ErrorResponse, "description": "`model` is not served for this job, or its "
                             "bundle has no example."},
                       401: http.ERRORS[401], 503: http.ERRORS[503], 504: http.ERRORS[504]})(example)


for _route, _job in registry.routes().items():
    _add_route(_route, _job)

completions.add_routes(Gateway, api)  # POST /v1/completions and friends: OpenAI's API (rnnlab.serve.completions)

# @serve.ingress serializes the app when applied: every route is on it by now.
# its CPU share comes from build_app (replicas.cpu_share), sized to the cluster
Gateway = serve.deployment(name="Gateway", max_ongoing_requests=512, **replicas.HEALTH_CHECKS)(
    serve.ingress(api)(Gateway))


# --- the application builder -----------------------------------------------------------------------------------
def build_app(args: dict | None = None) -> serve.Application:
    """Ray Serve application builder (``import_path: rnnlab.serve.app:build_app`` in configs/serve.yaml).

    args: ``bundles`` (a folder of bundles) and/or one bundle per served job, named by the job (``sentiment``,
    ...: ``registry.served()``); ``replicas`` of each model deployment (default 1; with 2 or more, requests go to a
    live replica at once when one dies); ``torch_threads`` per replica (default 1: on a small CPU box the replicas
    share the cores); ``max_batch_size`` / ``batch_wait_timeout_s`` for the Gateway's gathering and all the model
    deployments (a deployment's ``user_config`` in the YAML wins over these); ``api_key_file`` (else
    ``RNNLAB_API_KEY``) and the limits of ``rnnlab.serve.limits.LIMITS`` (``max_queued_requests`` applies to every
    deployment, a deployment's own setting in the YAML wins). Each model deployment is named after its job and
    serves every bundle of that job found, each under its model id (rnnlab/serve/versions.py);
    ``default_models`` (a list of ids) picks the model a job's route answers with when a request names none;
    ``runtime`` (``auto``, ``torch`` or ``onnx``; rnnlab/runtime.py) what runs every model (default: each bundle's
    own default). Every replica reserves an equal share of the Ray cluster's CPUs (rnnlab/serve/replicas.py); before
    Ray is started (``rnnlab serve`` checking its arguments) the cluster is not known and no share is set.
    """
    import ray
    from ray.serve.config import BackpressureConfig

    from rnnlab.serve import auth
    from rnnlab.serve.bundles import default_model

    found, defaults, checked, batching, key = check_args(args)
    served = registry.served()
    threads = (args or {}).get("torch_threads", 1)
    runtime = (args or {}).get("runtime")
    count = replicas.checked_replicas((args or {}).get("replicas", 1))
    share = (replicas.cpu_share(len(found), count, replicas.node_cpus(), threads or 1) if ray.is_initialized()
             else None)
    cpus = {"ray_actor_options": {"num_cpus": share}} if share is not None else {}
    user_config = {
        "batched": batching,
        "generation": {"max_batch_size": batching["max_batch_size"]} if "max_batch_size" in batching else {},
    }
    # excess load is a 503 with Retry-After at every hop (the proxy's queue for the Gateway, the Gateway's for
    # the models), never an unbounded wait
    shedding = {"max_queued_requests": int(checked["max_queued_requests"]),
                "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=checked["retry_after_s"])}
    handles = {}
    for job in served:
        if job in found:
            kind = registry.job(job).served_by
            options = shedding | cpus | ({"user_config": user_config[kind]} if user_config[kind] else {})
            models = {model_id: str(path) for model_id, path in found[job].items()}
            handles[job] = DEPLOYMENTS[kind].options(name=job, num_replicas=count, **options).bind(
                models, job, threads, default_model(job, found[job], defaults), runtime)
    gateway = Gateway.options(max_ongoing_requests=int(checked["max_ongoing_requests"]), **shedding, **cpus,
                              **({"user_config": batching} if batching else {}))
    guard = {name: checked[name] for name in limits.LIMITS} | {"key_sha256": auth.digest(key) if key else None}
    return gateway.bind(handles, guard)


class CheckedArgs(NamedTuple):
    found: dict  # job -> {model id: bundle folder}
    defaults: list  # the model ids ``default_models`` names
    limits: dict  # every limit of ``rnnlab.serve.limits.LIMITS``, defaults filled in
    batching: dict  # max_batch_size / batch_wait_timeout_s where given
    key: object  # the API key (a str), or None


def check_args(args: dict | None) -> CheckedArgs:
    """``build_app``'s arguments checked in the process that calls it (``rnnlab serve`` calls it before Ray starts):
    one sentence (ConfigError, BundleError) for an unknown argument, a limit out of range, an unreadable key file,
    a missing or corrupt bundle (each is loaded once) or a default model that is not served."""
    from rnnlab.errors import ConfigError
    from rnnlab.serve import auth
    from rnnlab.serve.bundles import check_defaults, find_models

    args = dict(args or {})
    served = registry.served()
    known = {"bundles", *served, "replicas", "torch_threads", "max_batch_size", "batch_wait_timeout_s",
             "api_key_file", "default_models", "runtime", *limits.LIMITS}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"Unknown serve argument(s) {', '.join(unknown)}; use {', '.join(sorted(known))}.")
    checked = limits.check_limits({name: args.get(name) for name in limits.LIMITS})
    batching = {key: args[key] for key in ("max_batch_size", "batch_wait_timeout_s") if args.get(key) is not None}
    key = auth.load_key(args.get("api_key_file"))
    found = find_models(args.get("bundles"), explicit={job: args.get(job) for job in served},
                        runtime=args.get("runtime"))
    defaults = args.get("default_models") or []
    if isinstance(defaults, str):
        defaults = [defaults]
    check_defaults(found, defaults)
    replicas.checked_replicas(args.get("replicas", 1))
    checked_batching(batching, DEFAULT_BATCH, "serve argument")
    return CheckedArgs(found, defaults, checked, batching, key)
