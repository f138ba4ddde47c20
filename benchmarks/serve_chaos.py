"""Chaos run for `rnnlab serve`: clients keep the service busy while model replicas are killed.

    python -m benchmarks.serve_chaos                       # 32 clients, 60 s, Generator killed at 15 s, Sentiment at 35 s
    python -m benchmarks.serve_chaos --json benchmarks/results/serve_chaos.json

Starts its own local service (2 CPUs, default limits, chapter-sized random bundles as _harness.py builds) and
runs ``--clients`` clients for ``--seconds``: a quarter each on /v1/sentiment, /v1/forecast, /v1/generate and
/v1/generate with ``stream``. Each replica is killed once with ``ray.kill`` (as a crashed process would be);
Serve starts a new one. Every request is recorded: ok, its HTTP status, an SSE ``error`` event, a stream cut
without one, or a hang (no answer within ``--timeout`` s). Recovery time of a kill: from the kill to the first
request to that deployment that was SENT after the kill and answered ok; failures are the requests to it answered
(or cut) after the kill, "last failure" the latest of them.

What a recovery is made of, in seconds after the kill: ``death_detected`` (Serve's controller no longer counts
the dead replica running: its health check found it), ``process_started`` (the new replica's worker process),
``constructor_started`` (Ray's worker, Serve's replica and rnnlab's imports done), ``models_loaded`` (its
bundles loaded: the constructor's work), ``running`` (the controller counts it running again, so routers send it
requests) and ``first_ok``. The replica stamps its own phases (rnnlab/serve/replicas.py); the controller's are
read from ``serve.status()`` every 0.1 s. ``cold_start_s`` is the new replica's process start to its models loaded,
and ``target_s`` the recovery aimed for: 10 s, or that cold start + 2 s where longer. ``--replicas 2``: the
routers send requests to the live replica at once, so "ok again" no longer waits for the new one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import deploy, imdb_reviews, post_outcome, price_rows, random_bundles

KINDS = ("sentiment", "forecast", "generate", "stream")
DEPLOYMENT_OF = {"sentiment": "sentiment", "forecast": "stock", "generate": "charlm", "stream": "charlm"}  # deployment = job


async def one_request(http, base: str, kind: str, rng: random.Random, reviews, rows, timeout: float) -> str:
    body = {"sentiment": {"texts": [rng.choice(reviews)]}, "forecast": {"rows": rows},
            "generate": {"prompt": "the emperor", "max_new_tokens": 100, "seed": rng.randrange(2**31)},
            "stream": {"prompt": "the emperor", "max_new_tokens": 100, "seed": rng.randrange(2**31), "stream": True}}
    path = "/v1/generate" if kind == "stream" else f"/v1/{kind}"
    return await post_outcome(http, base + path, body[kind], stream=kind == "stream", timeout=timeout,
                              timeout_outcome="hang")


def running_replicas(deployment: str) -> int:
    from ray import serve

    return serve.status().applications["rnnlab"].deployments[deployment].replica_states.get("RUNNING", 0)


def newest_startup(deployment: str, replicas: int) -> dict:
    """The wall-clock stamps the newest replica of ``deployment`` recorded of its own start-up
    (rnnlab/serve/replicas.py); asked of every replica (the router picks one per call, so a few calls each)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name="rnnlab")
    answers = [handle.describe.remote().result(timeout_s=60)["startup"] for _ in range(4 * replicas)]
    return max(answers, key=lambda phases: phases["constructor_started"])


async def watch_recovery(deployment: str, replicas: int, killed: float) -> dict:
    """Wall-clock seconds after ``killed`` at which the controller dropped the dead replica and ran its successor,
    and the successor's own start-up phases."""
    detected = None
    while True:
        asked = time.time()
        running = await asyncio.to_thread(running_replicas, deployment)
        now = (asked + time.time()) / 2  # what the controller said held somewhere during the call
        if detected is None and running < replicas:
            detected = now
        elif detected is not None and running >= replicas:
            break
        await asyncio.sleep(0.1)
    phases = await asyncio.to_thread(newest_startup, deployment, replicas)
    after = {"death_detected": detected, **phases, "running": now}
    return {phase: round(at - killed, 2) if at is not None else None for phase, at in after.items()}


def replica(deployment: str):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]
    return ray.get_actor(names[0], namespace="serve")


async def chaos(base: str, args, reviews, rows) -> tuple[list, dict, dict]:
    import aiohttp
    import ray

    records: list[tuple[float, float, str, str]] = []  # (sent, answered, kind, outcome), seconds from start
    kills: dict[str, float] = {}
    watches: dict[str, asyncio.Task] = {}
    began = time.monotonic()
    deadline = began + args.seconds

    async def client(index: int, http) -> None:
        kind, rng = KINDS[index % len(KINDS)], random.Random(index)
        while time.monotonic() < deadline:
            sent = time.monotonic() - began
            outcome = await one_request(http, base, kind, rng, reviews, rows, args.timeout)
            records.append((sent, time.monotonic() - began, kind, outcome))
            if outcome != "ok":
                await asyncio.sleep(0.2)  # a client that backs off a little, as Retry-After asks

    async def killer() -> None:
        for deployment, at in (("charlm", args.kill_generator_at), ("sentiment", args.kill_sentiment_at)):
            await asyncio.sleep(max(0.0, began + at - time.monotonic()))
            ray.kill(replica(deployment), no_restart=True)
            kills[deployment] = time.monotonic() - began
            watches[deployment] = asyncio.create_task(watch_recovery(deployment, args.replicas, time.time()))
            print(f"[{kills[deployment]:5.1f} s] killed the {deployment} replica", flush=True)

    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(killer(), *(client(i, http) for i in range(args.clients)))
    phases = {deployment: await asyncio.wait_for(watch, args.timeout) for deployment, watch in watches.items()}
    return records, kills, phases


def summarize(records: list, kills: dict, phases: dict, seconds: float) -> dict:
    outcomes = collections.Counter(outcome for *_, outcome in records)
    by_kind = {kind: dict(collections.Counter(o for _, _, k, o in records if k == kind)) for kind in KINDS}
    recovery = {}
    for deployment, killed in kills.items():
        kinds = [k for k, d in DEPLOYMENT_OF.items() if d == deployment]
        mine = [(s, a, o) for s, a, k, o in records if k in kinds]
        first_ok = min((a for s, a, o in mine if s >= killed and o == "ok"), default=None)
        failures = [a for s, a, o in mine if a >= killed and o != "ok"]  # in flight at the kill, or sent after
        recovered = round(first_ok - killed, 2) if first_ok is not None else None
        recovery[deployment] = {
            "killed_at_s": round(killed, 2),
            "recovered_after_s": recovered,
            "errors_until_s": round(max(failures) - killed, 2) if failures else 0.0,
            "failed_requests": len(failures),
            "phases_after_kill_s": phases[deployment] | {"first_ok": recovered},
            "cold_start_s": cold_start(phases[deployment]),
            "target_s": round(max(10.0, cold_start(phases[deployment]) + 2.0), 2),
        }
    latency = {kind: round(max((a - s for s, a, k, _ in records if k == kind), default=0.0), 2) for kind in KINDS}
    # what one answer takes under this load: "ok again" includes one such answer after the replica is running
    typical = {kind: round(statistics.median([a - s for s, a, k, o in records if k == kind and o == "ok"] or [0.0]), 2)
               for kind in KINDS}
    return {"requests": len(records), "requests_per_s": len(records) / seconds, "outcomes": dict(outcomes),
            "by_endpoint": by_kind, "max_latency_s": latency, "median_latency_s": typical, "recovery": recovery,
            # (sent, answered, kind, outcome) in seconds from the start, for every request that was not ok
            "failures": [[round(s, 3), round(a, 3), k, o] for s, a, k, o in records if o != "ok"]}


def cold_start(phases: dict) -> float:
    """The new replica's own start-up: its process start (the kill's time, for a process Ray had started before)
    to its models loaded."""
    started = phases["process_started"] if phases["process_started"] is not None else phases["constructor_started"]
    return round(max(0.0, phases["models_loaded"] - max(0.0, started)), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--kill-generator-at", type=float, default=15.0)
    parser.add_argument("--kill-sentiment-at", type=float, default=35.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="a request unanswered this long is a hang")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of each model deployment")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from rnnlab.serve.limits import proxy_timeout_s
    from rnnlab.serve.local import in_process

    reviews, rows = imdb_reviews(), price_rows()
    with tempfile.TemporaryDirectory() as scratch, \
            in_process(http_options={"request_timeout_s": proxy_timeout_s(60)}) as base:
        deploy(random_bundles(Path(scratch)), replicas=args.replicas)
        load_before = os.getloadavg()
        records, kills, phases = asyncio.run(chaos(base, args, reviews, rows))
    report = summarize(records, kills, phases, args.seconds)
    report["setup"] = {"clients": args.clients, "seconds": args.seconds, "timeout_s": args.timeout,
                       "replicas": args.replicas,
                       "kills": kills, "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(f"\n{report['requests']} requests in {args.seconds:.0f} s ({report['requests_per_s']:.1f}/s) from "
          f"{args.clients} clients")
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in sorted(report["outcomes"].items(), key=lambda i: -i[1])))
    for kind, counts in report["by_endpoint"].items():
        print(f"  {kind:9s}", ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda i: -i[1])),
              f"(median {report['median_latency_s'][kind]} s)")
    for deployment, r in report["recovery"].items():
        print(f"{deployment} killed at {r['killed_at_s']} s: ok again after {r['recovered_after_s']} s "
              f"(target {r['target_s']} s; the new replica's cold start took {r['cold_start_s']} s), last failure "
              f"{r['errors_until_s']} s after the kill, {r['failed_requests']} failed requests")
        print("  after the kill:", ", ".join(f"{phase} {at} s" for phase, at in r["phases_after_kill_s"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
