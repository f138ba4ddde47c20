"""The model deployments: one class per way a job is served (the registry's ``served_by``), bound once per
served job with the job's name as the deployment's name.

    BatchedDeployment     (one call per batch the Gateway gathered)  predictor.prepare + predictor.predict_prepared
    GenerationDeployment  (iteration-level scheduler)                model.step for all active sequences

A batched deployment validates every item on its own and answers per item ({"error": sentence} for a bad one)
rather than raising, so one bad item never fails the items batched with it (a raising batch function fails its
whole batch); the Gateway turns errors into 422s naming the field. Batch sizes are ``user_config``
(live-updatable by ``serve deploy``/``serve run``): how many items go through one forward pass, or how many
sequences share one decoding step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading

from ray import serve

from rnnlab.errors import BundleError, ConfigError, InputError, RnnlabError
from rnnlab.serve import memory, metrics
from rnnlab.serve.completions import CompletionsMixin
from rnnlab.serve.replicas import HEALTH_CHECKS, StartupClock
from rnnlab.serve.schemas import error_item

# Serve's own logger: lines land in the replica's log file (and the driver's console) in Serve's format
logger = logging.getLogger("ray.serve")

# The Gateway waits up to 20 ms for a batch to fill: at 32 concurrent clients on 2 cores, 5 ms gave batches of ~3
# and half the throughput (benchmarks/README.md); a lone request pays the 20 ms.
DEFAULT_BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}
# ... and keeps two batches in flight, so that one batch's answers travel back and the next requests arrive while
# the model computes the other (a replica computes one batch at a time). With one batch of 32 in flight the model
# sat idle during every round trip: 32 clients sent 507 / 495 req/s to a sentiment replica, 559 / 544 with two
# batches of 16 (benchmarks.serve_load, the same session, 2 cores; ONNX Runtime int8 gains more, benchmarks/README.md).
BATCHES_IN_FLIGHT = 2
# 128 sequences per decoding step: on a CPU a step for 128 costs ~2.5x one for 32, so 1.7x the characters/s
DEFAULT_GENERATION = {"max_batch_size": 128}
# One constructor try, because a corrupt bundle will not heal on retry (Serve's default retries a failing
# constructor); a dead replica noticed within about a second (rnnlab/serve/replicas.py). The CPUs each replica
# reserves and how many there are come from build_app (replicas.cpu_share), sized to the cluster. Serve's access
# log stays on the Gateway, one line per HTTP request; a model replica's line per call from it said the same again
# (with the request id), and wrote and flushed a file and stderr under the interpreter lock the decoding thread needs.
MODEL_DEPLOYMENT = {"max_constructor_retry_count": 1, "logging_config": {"enable_access_log": False}, **HEALTH_CHECKS}


def checked_batching(config: dict | None, defaults: dict, where: str) -> dict:
    """``defaults`` updated with a user_config / serve argument, each batching value checked: a bad one (say
    ``max_batch_size: 0``, which would leave generation admitting nothing) is one sentence naming it."""
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
# every length in batches of every size make a new shape nearly every batch, so a sentiment replica's memory grew
# ~1 MB every 5 s for as long as the soak ran (benchmarks/soak.py). 64 keeps the shapes in use hot (the same
# reviews/s in a plain loop) and the memory flat. Read by oneDNN at its first primitive, so set before any forward.
ONEDNN_CACHE_CAPACITY = "64"


def bound_onednn_cache() -> None:
    import os

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def load_served(bundle_dir: str, job: str, torch_threads: int | None, runtime: str | None = None):
    """Load a bundle and its job's predictor inside a replica, its model run by ``runtime`` (rnnlab/runtime.py) on
    ``torch_threads`` threads; on failure log ONE line and raise, so the deployment fails at start (or a swap keeps
    the model it had). Returns (predictor, what /v1/models shows about it, its runtime included)."""
    import ray
    import torch

    from rnnlab import registry
    from rnnlab.bundle import load_bundle
    from rnnlab.inference import for_inference
    from rnnlab.serve.bundles import bundle_info

    if torch_threads:
        torch.set_num_threads(torch_threads)
    bound_onednn_cache()
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    try:
        bundle = load_bundle(bundle_dir, device=device)
        if bundle.job != job:
            raise BundleError(f"Bundle {bundle_dir} is a {bundle.job} bundle, not a {job} one; fix the path.")
        runnable = for_inference(bundle, runtime, torch_threads)
        predictor = registry.job(job).load("predictor")(runnable)
    except RnnlabError as error:
        logger.error("rnnlab serve: cannot load the %s bundle: %s", job, error)
        raise
    return predictor, bundle_info(bundle) | runnable.model.describe()


def model_id(info: dict) -> str:
    return f"{info['name']}@{info['version']}"


class ServesExamples:
    """``example``, for the Gateway's GET /v1/<job>/example: what a deployment's ``models`` keep as each bundle's
    example request body."""

    def example(self, model: str | None = None) -> dict:
        """``{"id", "example"}`` (the example None when the bundle has none), or ``{"error"}`` for an unknown id."""
        from rnnlab.serve.versions import UnknownModel

        try:
            return {"id": model or self.models.default, "example": self.models.example(model)}
        except UnknownModel as error:
            return {"error": str(error)}


@serve.deployment(name="batched", max_ongoing_requests=64, **MODEL_DEPLOYMENT)
class BatchedDeployment(ServesExamples):
    """A batch of items in (gathered by the Gateway's ``@serve.batch`` from concurrent requests: one handle call
    per batch, not per request), each item validated on its own (``predictor.prepare``), the valid ones through
    the model ``max_batch_size`` at a time (``predictor.predict_prepared``), one answer per item back. A bad
    item's answer is ``{"error": sentence}``, so it never fails the others in its batch.

    ``models``: {model id: bundle folder}, every model of the job (rnnlab/serve/versions.py); an item is
    ``(model id or None, item)``, None for the job's ``default``. ``user_config["models"]`` points ids at other
    bundles in place (``rnnlab swap``)."""

    def __init__(self, models: dict[str, str] | str, job: str, torch_threads: int | None = 1,
                 default: str | None = None, runtime: str | None = None) -> None:
        from rnnlab.serve.versions import ModelSet

        self.startup = StartupClock()
        memory.trace_from_env(job)
        self.job = job
        self.models = ModelSet(job, models, default, lambda path: load_served(path, job, torch_threads, runtime))
        self.stats = BatchStats()
        self.max_batch_size = DEFAULT_BATCH["max_batch_size"]
        # one forward pass at a time: the Gateway's batches in flight overlap their validation and travel with the
        # model's work, not two passes on the replica's one-core share
        self.computing = threading.Lock()
        self.startup.models_loaded(job)

    async def reconfigure(self, config: dict) -> None:
        self.max_batch_size = checked_batching(config, DEFAULT_BATCH, self.job)["max_batch_size"]
        await self.models.update((config or {}).get("models"))

    async def run_batch(self, items: list) -> dict:
        """``{"models": [ID@VERSION per item], "results": [answer per item]}``."""
        # in a thread: the replica's event loop keeps taking the next batch while torch (GIL released) works
        return await asyncio.to_thread(self._run_batch, items)

    def _run_batch(self, items: list) -> dict:
        from rnnlab.serve.versions import UnknownModel

        answers, names = [None] * len(items), [None] * len(items)
        groups: dict = {}  # model id -> [(index, item)]: each model's items through its own forward passes
        for index, entry in enumerate(items):
            requested, item = entry if isinstance(entry, tuple) else (None, entry)
            groups.setdefault(requested, []).append((index, item))
        for requested, group in groups.items():
            try:
                predictor, info = self.models.pick(requested)  # one version for the whole group
            except UnknownModel as error:
                for index, _ in group:
                    answers[index] = {"error": str(error), "type": "unknown_model"}
                continue
            prepared = []
            for index, item in group:
                names[index] = model_id(info)
                try:
                    prepared.append((index, predictor.prepare(item)))
                except InputError as error:
                    answers[index] = {"error": str(error)}
            size = self.max_batch_size
            for start in range(0, len(prepared), size):  # max_batch_size=1 really means one item per forward pass
                chunk = prepared[start : start + size]
                self.stats.record(len(chunk))
                metrics.batch_size(self.job, len(chunk))
                with self.computing:
                    results = predictor.predict_prepared([p for _, p in chunk], batch_size=len(chunk))
                for (index, _), result in zip(chunk, results):
                    answers[index] = result
        return {"models": names, "results": answers}

    def describe(self) -> dict:
        return {"job": self.job, "models": self.models.describe(), "startup": self.startup.phases,
                "batching": {"max_batch_size": self.max_batch_size, **self.stats.summary()}}


@serve.deployment(name="generation", max_ongoing_requests=256, **MODEL_DEPLOYMENT)
class GenerationDeployment(CompletionsMixin, ServesExamples):  # complete / complete_stream: OpenAI's completions
    """Text generation with iteration-level batching (rnnlab.serve.scheduler): one model step for every active
    sequence. The predictor gives ``encode_prompt`` (a checked prompt -> ids), ``vocab`` and ``model``."""

    def __init__(self, models: dict[str, str] | str, job: str, torch_threads: int | None = 1,
                 default: str | None = None, runtime: str | None = None) -> None:
        from rnnlab.serve.versions import ModelSet

        self.startup = StartupClock()
        memory.trace_from_env(job)
        self.job = job
        self.max_batch_size = DEFAULT_GENERATION["max_batch_size"]
        self.torch_threads = torch_threads
        self.runtime = runtime
        # each model decodes with its own scheduler (its own step); a swapped-out one finishes the sequences it
        # holds, and its thread ends once idle
        self.models = ModelSet(job, models, default, self._load)
        self.startup.models_loaded(job)

    def _load(self, path: str):
        from rnnlab.serve.scheduler import GenerationScheduler

        generator, info = load_served(path, self.job, self.torch_threads, self.runtime)
        generator.scheduler = GenerationScheduler(generator.model, max_batch_size=self.max_batch_size,
                                                  device=info["device"], log=logger)
        return generator, info

    def _schedulers(self) -> list:
        return [generator.scheduler for generator, _ in self.models.served.values()]

    async def reconfigure(self, config: dict) -> None:
        self.max_batch_size = checked_batching(config, DEFAULT_GENERATION, self.job)["max_batch_size"]
        for scheduler in self._schedulers():
            scheduler.set_max_batch_size(self.max_batch_size)
        await self.models.update((config or {}).get("models"))

    def _watch(self) -> None:
        """Export the scheduler's step sizes and queue as metrics, sampled once a second (the decode loop pays
        nothing for them). Started by the first request: the constructor has no event loop to start it in."""
        if getattr(self, "_watcher", None) is None:
            self._watcher = asyncio.get_running_loop().create_task(self._export_metrics())

    async def _export_metrics(self) -> None:
        # Thousands of decode steps a second would cost thousands of observe() calls; the histogram gets one
        # value a second instead: that second's mean sequences per step.
        seen: dict[tuple[int, int], int] = {}
        while True:
            try:
                steps: dict[int, int] = {}
                now: dict[tuple[int, int], int] = {}
                waiting = active = 0
                for scheduler in self._schedulers():  # every model's
                    for size, count in dict(scheduler.step_sizes).items():  # one copy: the decoding thread counts
                        now[id(scheduler), size] = count
                        steps[size] = steps.get(size, 0) + count - seen.get((id(scheduler), size), 0)
                    stats = scheduler.stats()
                    waiting, active = waiting + stats["waiting"], active + stats["active"]
                total = sum(steps.values())
                if total:
                    metrics.batch_size(self.job, round(sum(k * n for k, n in steps.items()) / total))
                seen = now
                metrics.queue_depth(self.job, "waiting", waiting)
                metrics.queue_depth(self.job, "active", active)
            except Exception as error:  # noqa: BLE001 -- metrics never take the deployment down
                logger.warning("rnnlab serve: generation metrics skipped: %s", error)
            await asyncio.sleep(1.0)

    def _prepare(self, request: dict):
        """Validate and encode one request before it joins the running batch; returns (generator, info, ids,
        params) of the model it names, or (None, errors). The Gateway's schema checked the sampling fields already;
        they are checked again (the same SamplingParams) for callers that use this deployment's handle directly."""
        from pydantic import ValidationError

        from rnnlab.sampling import SamplingParams
        from rnnlab.serve.versions import UnknownModel

        try:
            generator, info = self.models.pick(request.get("model"))  # one version for the whole request
        except UnknownModel as error:
            return None, {"errors": [error_item(["body", "model"], str(error), "unknown_model")]}
        try:
            ids = generator.encode_prompt(request["prompt"])
        except InputError as error:
            return None, {"errors": [error_item(["body", "prompt"], str(error))]}
        try:
            params = SamplingParams(**{k: request[k] for k in SamplingParams.model_fields if k in request})
        except ValidationError as error:
            return None, {"errors": [error_item(["body", *map(str, e["loc"])], e["msg"], e["type"])
                                     for e in error.errors()]}
        # the seed is returned to the client, so any answer can be reproduced
        return (generator, info, ids, params.with_seed()), None

    async def generate(self, request: dict) -> dict:
        from rnnlab.serve.scheduler import GenerationFailed

        self._watch()
        prepared, errors = self._prepare(request)
        if prepared is None:
            return errors
        generator, info, ids, params = prepared
        request_id = request.get("request_id")
        try:
            pieces = [self._decode(generator, chunk.ids) async for chunk in generator.scheduler.generate(
                ids, params, request_id=request_id, stream=False)]
        except GenerationFailed as error:
            return {"failed": error.request_id}
        text = "".join(pieces)
        metrics.generated(len(text))
        return {"model": model_id(info), "text": text, "seed": params.seed, "tokens": len(text)}

    async def generate_stream(self, request: dict):
        """First item: {"model", "seed"} or {"errors"}; then {"text": chunk} items, the final one marked
        ``"last": True``, or a last {"failed": request id}. Closing the stream (the client went away; Serve cancels
        this generator) frees the sequence's slot. A stream decodes on the model version it started on, a swap
        meanwhile or not."""
        from rnnlab.serve.scheduler import GenerationFailed

        self._watch()
        prepared, errors = self._prepare(request)
        if prepared is None:
            yield errors
            return
        generator, info, ids, params = prepared
        yield {"model": model_id(info), "seed": params.seed}
        stream = generator.scheduler.generate(ids, params, request_id=request.get("request_id"))
        try:
            async for chunk in stream:
                text = self._decode(generator, chunk.ids)
                metrics.generated(len(text))
                yield {"text": text, "last": True} if chunk.last else {"text": text}
        except GenerationFailed as error:
            yield {"failed": error.request_id}
        finally:
            await stream.aclose()

    @staticmethod
    def _decode(generator, ids: list[int]) -> str:
        itos = generator.vocab.itos
        return "".join(itos[i] for i in ids)

    def describe(self) -> dict:
        models = [info | {"batching": self.models.served[info["id"]][0].scheduler.stats()}
                  for info in self.models.describe()]
        return {"job": self.job, "models": models, "startup": self.startup.phases,
                "batching": {"max_batch_size": self.max_batch_size}}


DEPLOYMENTS = {"batched": BatchedDeployment, "generation": GenerationDeployment}  # the registry's served_by
