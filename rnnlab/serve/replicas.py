"""Replicas: how many each model deployment runs, the CPU each reserves, how fast a dead one is noticed, and what
its start-up is made of.

**Death.** A replica whose process dies is noticed by Serve's controller only through its health check: routers
that see the death stop sending it requests but do not tell the controller. Serve checks every 10 s by default,
so a dead replica stayed dead for up to 10 s before its successor even started; :data:`HEALTH_CHECKS` checks every
second (a call to each replica's event loop, nothing of ours runs) and gives a wedged replica 10 s, not 30, to
answer (three misses in a row restart it).

**Start-up.** The successor is a cold start: Ray starts a worker process, Serve's replica code and rnnlab's
serving code (torch with it) are imported, the constructor loads the bundles, the controller marks it running.
:class:`StartupClock` stamps the phases the replica sees; ``describe()`` returns them and the replica logs them, so
benchmarks/serve_chaos.py can say which part of a recovery took the time. With ``replicas`` >= 2 a death costs
only the requests in flight on it: the router sends the next ones to a live replica at once.

**CPU.** Every replica (the Gateway's and each model deployment's) reserves an equal share of the cluster's CPUs
(:func:`cpu_share`): the largest that lets all of them fit on the nodes, at most ``torch_threads`` (what one
replica's torch can use). Below :data:`MIN_CPU_SHARE` they do not fit, and the service refuses to start with one
sentence naming how many replicas would.
"""

from __future__ import annotations

import logging
import time

from rnnlab.errors import ConfigError

logger = logging.getLogger("ray.serve")

HEALTH_CHECKS = {"health_check_period_s": 1.0, "health_check_timeout_s": 10.0}
MIN_CPU_SHARE = 0.1  # the least CPU a replica reserves (a floor chosen, not measured): more replicas are refused


def checked_replicas(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"replicas must be a whole number of at least 1, got {value!r}.")
    return value


def node_cpus() -> list[float]:
    """The CPUs of each live node of the Ray cluster this process is connected to."""
    import ray

    return [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]


def cpu_share(jobs: int, replicas: int, nodes: list[float], most: float) -> float:
    """The CPUs each replica reserves so that the Gateway and ``jobs`` x ``replicas`` model replicas all fit on
    ``nodes`` (each node's CPUs): the largest such share in hundredths of a CPU (Ray counts 1/10,000ths, so the
    shares never add up past a node's CPUs), at most ``most``. ConfigError, one sentence, below MIN_CPU_SHARE."""
    wanted = 1 + jobs * replicas
    hundredths = [int(cpus * 100 + 1e-6) for cpus in nodes]
    floor = round(MIN_CPU_SHARE * 100)
    for share in range(max(floor, round(most * 100)), floor - 1, -1):
        if sum(cpus // share for cpus in hundredths) >= wanted:
            return share / 100
    fit = (sum(cpus // floor for cpus in hundredths) - 1) // max(jobs, 1)
    advice = f"ask for {fit} replicas or fewer" if fit >= 1 else "serve fewer jobs"
    raise ConfigError(f"{jobs} served jobs x {replicas} replicas and the Gateway do not fit on the cluster's "
                      f"{sum(nodes):g} CPUs at {MIN_CPU_SHARE} CPU each; {advice}, or give Ray more CPUs.")


def process_started() -> float | None:
    """When this process started (seconds since the epoch), or None where psutil (Ray ships it) cannot say."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 -- a timing nicety never stops a replica from starting
        return None


class StartupClock:
    """Wall-clock stamps (``time.time()``, comparable across processes on one machine) of a replica's start-up:
    ``process_started``, ``constructor_started`` (Ray's worker, Serve's replica and rnnlab's imports done),
    ``models_loaded`` (every bundle loaded: the constructor's work)."""

    def __init__(self) -> None:
        self.phases = {"process_started": process_started(), "constructor_started": time.time()}

    def models_loaded(self, job: str) -> None:
        self.phases["models_loaded"] = time.time()
        constructing, loaded = self.phases["constructor_started"], self.phases["models_loaded"]
        started = self.phases["process_started"] or constructing
        logger.info("rnnlab serve: %s replica ready %.2f s after its process started (%.2f s to its constructor, "
                    "%.2f s loading its models)", job, loaded - started, constructing - started, loaded - constructing)
