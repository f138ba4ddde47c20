"""rnnlab's own Prometheus metrics, exported by Ray beside Serve's (``ray.serve.metrics``).

    rnnlab_batch_size            histogram  items per forward pass (batched jobs); generation: each second's mean
                                            sequences per decode step (one value a second)
    rnnlab_queue_depth           gauge      generation: sequences waiting for a slot and active; Gateway: open streams
    rnnlab_generated_characters  counter    characters generated
    rnnlab_rejected_requests     counter    requests turned away, by reason (unauthorized, body_too_large, overloaded,
                                            timeout, replica_failed, client_stopped_reading,
                                            header_timeout, too_many_connections)

The ``kind`` tag is the job's name (the same as its route /v1/<job> and its deployment), or ``gateway`` for the
Gateway's open streams (every job's together). Not called ``job``: Prometheus gives every series it scrapes a
``job`` label of its own (the scrape target's), and renames a series' own ``job`` to ``exported_job``. Ray adds the
deployment, replica and application tags. Metrics are created lazily in the process that records them (a
replica); outside a Ray worker (unit tests, the driver) recording is a no-op.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("ray.serve")

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@functools.cache
def _metrics():
    try:
        import ray
        from ray.serve import metrics

        if not ray.is_initialized():
            return None
        return {
            "batch": metrics.Histogram("rnnlab_batch_size", description="Items per forward pass or decode step.",
                                       boundaries=BATCH_BOUNDARIES, tag_keys=("kind",)),
            "queue": metrics.Gauge("rnnlab_queue_depth", description="Requests waiting or running, by state.",
                                   tag_keys=("kind", "state")),
            "chars": metrics.Counter("rnnlab_generated_characters", description="Characters generated."),
            "rejected": metrics.Counter("rnnlab_rejected_requests", description="Requests turned away, by reason.",
                                        tag_keys=("reason",)),
        }
    except Exception as error:  # metrics must never fail a request
        logger.warning("rnnlab metrics are off: %s", error)
        return None


def batch_size(job: str, size: float) -> None:
    if (m := _metrics()) is not None:
        m["batch"].observe(size, tags={"kind": job})


def queue_depth(kind: str, state: str, value: int) -> None:
    if (m := _metrics()) is not None:
        m["queue"].set(value, tags={"kind": kind, "state": state})


def generated(characters: int) -> None:
    if characters and (m := _metrics()) is not None:
        m["chars"].inc(characters)


def rejected(reason: str) -> None:
    if (m := _metrics()) is not None:
        m["rejected"].inc(1, tags={"reason": reason})
