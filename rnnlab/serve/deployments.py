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

from ray import serve

from rnnlab.errors import BundleError, ConfigError, InputError, RnnlabError
from rnnlab.serve import metrics
from rnnlab.serve.completions import CompletionsMixin
from rnnlab.serve.schemas import error_item

# Serve's own logger: lines land in the replica's log file (and the driver's console) in Serve's format
logger = logging.getLogger("ray.serve")

# The Gateway waits up to 20 ms for a batch to fill: at 32 concurrent clients on 2 cores, 5 ms gave batches of ~3
# and half the throughput (benchmarks/README.md); a lone request pays the 20 ms.
DEFAULT_BATCH = {"max_batch_size": 32, "batch_wait_timeout_s": 0.02}
# 128 sequences per decoding step: on a CPU a step for 128 costs ~2.5x one for 32, so 1.7x the characters/s
DEFAULT_GENERATION = {"max_batch_size": 128}
# Deployment defaults sized for a 2-core laptop: fractional CPUs so all the replicas fit, and one constructor
# try, because a corrupt bundle will not heal on retry (Serve's default retries a failing constructor).
# 0.4 CPU each: the Gateway (0.25) and the four served jobs' deployments (1.6) fit in 2 CPUs (at 0.5 the fourth
# never started: a 2-core machine serving every job waited for it for ever).
MODEL_DEPLOYMENT = {"ray_actor_options": {"num_cpus": 0.4}, "max_constructor_retry_count": 1}


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


def load_served(bundle_dir: str, job: str, torch_threads: int | None):
    """Load a bundle and its job's predictor inside a replica; on failure log ONE line and raise, so the
    deployment fails at start. Returns (predictor, what /v1/models shows about it)."""
    import ray
    import torch

    from rnnlab import registry
    from rnnlab.bundle import load_bundle
    from rnnlab.serve.bundles import bundle_info

    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    try:
        bundle = load_bundle(bundle_dir, device=device)
        if bundle.job != job:
            raise BundleError(f"Bundle {bundle_dir} is a {bundle.job} bundle, not a {job} one; fix the path.")
        predictor = registry.job(job).load("predictor")(bundle)
    except RnnlabError as error:
        logger.error("rnnlab serve: cannot load the %s bundle: %s", job, error)
        raise
    return predictor, bundle_info(bundle) | {"device": device}


def model_id(info: dict) -> str:
    return f"{info['name']}@{info['version']}"


@serve.deployment(name="batched", max_ongoing_requests=64, **MODEL_DEPLOYMENT)
class BatchedDeployment:
    """A batch of items in (gathered by the Gateway's ``@serve.batch`` from concurrent requests: one handle call
    per batch, not per request), each item validated on its own (``predictor.prepare``), the valid ones through
    the model ``max_batch_size`` at a time (``predictor.predict_prepared``), one answer per item back. A bad
    item's answer is ``{"error": sentence}``, so it never fails the others in its batch."""

    def __init__(self, bundle_dir: str, job: str, torch_threads: int | None = 1) -> None:
        self.job = job
        self.predictor, self.info = load_served(bundle_dir, job, torch_threads)
        self.stats = BatchStats()
        self.max_batch_size = DEFAULT_BATCH["max_batch_size"]

    def reconfigure(self, config: dict) -> None:
        self.max_batch_size = checked_batching(config, DEFAULT_BATCH, self.job)["max_batch_size"]

    async def run_batch(self, items: list) -> dict:
        # in a thread: the replica's event loop keeps taking the next batch while torch (GIL released) works
        results = await asyncio.to_thread(self._run_batch, items)
        return {"model": model_id(self.info), "results": results}

    def _run_batch(self, items: list) -> list[dict]:
        prepared, answers = [], [None] * len(items)
        for index, item in enumerate(items):
            try:
                prepared.append((index, self.predictor.prepare(item)))
            except InputError as error:
                answers[index] = {"error": str(error)}
        size = self.max_batch_size
        for start in range(0, len(prepared), size):  # max_batch_size=1 really means one item per forward pass
            chunk = prepared[start : start + size]
            self.stats.record(len(chunk))
            metrics.batch_size(self.job, len(chunk))
            results = self.predictor.predict_prepared([p for _, p in chunk], batch_size=len(chunk))
            for (index, _), result in zip(chunk, results):
                answers[index] = result
        return answers

    def describe(self) -> dict:
        return self.info | {"batching": {"max_batch_size": self.max_batch_size, **self.stats.summary()}}


@serve.deployment(name="generation", max_ongoing_requests=256, **MODEL_DEPLOYMENT)
class GenerationDeployment(CompletionsMixin):  # complete / complete_stream: OpenAI's completions
    """Text generation with iteration-level batching (rnnlab.serve.scheduler): one model step for every active
    sequence. The predictor gives ``encode_prompt`` (a checked prompt -> ids), ``vocab`` and ``model``."""

    def __init__(self, bundle_dir: str, job: str, torch_threads: int | None = 1) -> None:
        from rnnlab.serve.scheduler import GenerationScheduler

        self.job = job
        self.generator, self.info = load_served(bundle_dir, job, torch_threads)
        self.scheduler = GenerationScheduler(
            self.generator.model, max_batch_size=DEFAULT_GENERATION["max_batch_size"], device=self.info["device"],
            log=logger,
        )

    def reconfigure(self, config: dict) -> None:
        config = checked_batching(config, DEFAULT_GENERATION, self.job)
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
                    metrics.batch_size(self.job, round(sum(k * n for k, n in steps.items()) / total))
                seen = sizes
                stats = self.scheduler.stats()
                metrics.queue_depth(self.job, "waiting", stats["waiting"])
                metrics.queue_depth(self.job, "active", stats["active"])
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
        return {"model": model_id(self.info), "text": text, "seed": params.seed, "tokens": len(text)}

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
        yield {"model": model_id(self.info), "seed": params.seed}
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


DEPLOYMENTS = {"batched": BatchedDeployment, "generation": GenerationDeployment}  # the registry's served_by
