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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
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


def replica(deployment: str):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]
    return ray.get_actor(names[0], namespace="serve")


async def chaos(base: str, args, reviews, rows) -> tuple[list, dict]:
    import aiohttp
    import ray

    records: list[tuple[float, float, str, str]] = []  # (sent, answered, kind, outcome), seconds from start
    kills: dict[str, float] = {}
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
            print(f"[{kills[deployment]:5.1f} s] killed the {deployment} replica", flush=True)

    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(killer(), *(client(i, http) for i in range(args.clients)))
    return records, kills


def summarize(records: list, kills: dict, seconds: float) -> dict:
    outcomes = collections.Counter(outcome for *_, outcome in records)
    by_kind = {kind: dict(collections.Counter(o for _, _, k, o in records if k == kind)) for kind in KINDS}
    recovery = {}
    for deployment, killed in kills.items():
        kinds = [k for k, d in DEPLOYMENT_OF.items() if d == deployment]
        mine = [(s, a, o) for s, a, k, o in records if k in kinds]
        first_ok = min((a for s, a, o in mine if s >= killed and o == "ok"), default=None)
        failures = [a for s, a, o in mine if a >= killed and o != "ok"]  # in flight at the kill, or sent after
        recovery[deployment] = {
            "killed_at_s": round(killed, 2),
            "recovered_after_s": round(first_ok - killed, 2) if first_ok is not None else None,
            "errors_until_s": round(max(failures) - killed, 2) if failures else 0.0,
            "failed_requests": len(failures),
        }
    latency = {kind: round(max((a - s for s, a, k, _ in records if k == kind), default=0.0), 2) for kind in KINDS}
    return {"requests": len(records), "requests_per_s": len(records) / seconds, "outcomes": dict(outcomes),
            "by_endpoint": by_kind, "max_latency_s": latency, "recovery": recovery,
            # (sent, answered, kind, outcome) in seconds from the start, for every request that was not ok
            "failures": [[round(s, 3), round(a, 3), k, o] for s, a, k, o in records if o != "ok"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--kill-generator-at", type=float, default=15.0)
    parser.add_argument("--kill-sentiment-at", type=float, default=35.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="a request unanswered this long is a hang")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from rnnlab.serve.local import in_process

    reviews, rows = imdb_reviews(), price_rows()
    with tempfile.TemporaryDirectory() as scratch, in_process(http_options={"request_timeout_s": 60}) as base:
        deploy(random_bundles(Path(scratch)))
        records, kills = asyncio.run(chaos(base, args, reviews, rows))
    report = summarize(records, kills, args.seconds)
    report["setup"] = {"clients": args.clients, "seconds": args.seconds, "timeout_s": args.timeout,
                       "kills": kills}
    print(f"\n{report['requests']} requests in {args.seconds:.0f} s ({report['requests_per_s']:.1f}/s) from "
          f"{args.clients} clients")
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in sorted(report["outcomes"].items(), key=lambda i: -i[1])))
    for kind, counts in report["by_endpoint"].items():
        print(f"  {kind:9s}", ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda i: -i[1])))
    for deployment, r in report["recovery"].items():
        print(f"{deployment} killed at {r['killed_at_s']} s: ok again after {r['recovered_after_s']} s, "
              f"last failure {r['errors_until_s']} s after the kill, {r['failed_requests']} failed requests")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
