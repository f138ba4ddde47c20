"""Soak run for `rnnlab serve`: mixed traffic from 16 clients for 20 minutes, watching errors, p99 latency and each
replica's resident memory minute by minute.

    python -m benchmarks.soak                                   # 16 clients, 20 min, its own service
    python -m benchmarks.soak --minutes 3 --json /tmp/soak.json --png /tmp/soak.png   # a short shake-out
    python -m benchmarks.soak --bundles runs/bundles            # over trained bundles instead of random ones
    python -m benchmarks.soak --url http://127.0.0.1:8000       # a service already running on this machine

It starts the service as users do (`rnnlab serve`, a subprocess: direct ingress, default limits) over
chapter-sized bundles of randomly initialised models (_harness.py's: the compute of trained ones), unless
`--url` names a running one. Each client sends one request after another, each a random pick of: a review to
classify (`/v1/sentiment`), a 100-character generation stream (`/v1/generate`, `stream: true`, read to its `done`
event) or a 300-day forecast (`/v1/forecast`). An error is anything but a 200 with a whole answer: another status,
a stream without `done`, a connection error, no answer within `--timeout` s.

Every `--sample-s` seconds it reads the resident memory (RSS) of each Serve replica process on this machine
(`ray::ServeReplica:<app>:<deployment>` in /proc, via psutil; a restarted replica shows as a new pid), and the
one-minute load average (the box may be shared: a noisy neighbour shows there). Per minute: requests, errors,
p50/p99 latency by kind and overall, each replica's RSS at the minute's end. Verdict: zero errors, and no replica's
RSS above its value at the end of minute 2 by more than `--rss-tolerance` (5 %) at any later minute (the first two
minutes are warm-up: imports, allocator pools, first batches).

Writes the JSON report (`--json`, default benchmarks/results/soak.json) and the curve (`--png`, default
docs/soak.png): p99 latency per minute by kind, and RSS per replica per minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import REPO, imdb_reviews, post_outcome, price_rows, random_bundles, repo_env
from rnnlab.serve.local import LocalService

KINDS = ("sentiment", "stream", "forecast")


# --- the service's replicas ------------------------------------------------------------------------------------
def replica_memory(root: int | None) -> dict[str, dict]:
    """{deployment: {"pid", "rss_mb"}} of the Serve replica processes under process ``root`` (the service this
    script started: Ray's processes are its descendants), or on the whole machine (``root`` None: --url).
    Several replicas of one deployment: "name", "name#2", ..."""
    import psutil

    found: dict[str, dict] = {}
    if root is None:
        processes = list(psutil.process_iter())
    else:
        try:
            processes = psutil.Process(root).children(recursive=True)
        except psutil.Error:
            return found
    for process in processes:
        try:
            command = " ".join(process.cmdline())
            if "ServeReplica:" not in command:
                continue
            rss = process.memory_info().rss
            # "ray::ServeReplica:<app>:<deployment>", with ".<method>" appended while it runs a request
            deployment = command.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
            name, n = deployment, 2
            while name in found:
                name, n = f"{deployment}#{n}", n + 1
            found[name] = {"pid": process.pid, "rss_mb": rss / 2**20}
        except (psutil.Error, IndexError):
            continue
    return dict(sorted(found.items()))


# --- the traffic -------------------------------------------------------------------------------------------------
async def one_request(http, base: str, kind: str, rng: random.Random, reviews, rows, timeout: float,
                      headers: dict) -> str:
    if kind == "sentiment":
        path, body = "/v1/sentiment", {"texts": [rng.choice(reviews)]}
    elif kind == "forecast":
        path, body = "/v1/forecast", {"rows": rows}
    else:
        path, body = "/v1/generate", {"prompt": "the emperor", "max_new_tokens": 100,
                                      "seed": rng.randrange(2**31), "stream": True}
    return await post_outcome(http, base + path, body, stream=kind == "stream", timeout=timeout, headers=headers,
                              answered=lambda payload: bool(payload.get("results") or payload.get("forecast")))


async def soak(base: str, args, reviews, rows, root: int | None) -> tuple[list, list]:
    import aiohttp

    records: list[tuple[float, float, str, str]] = []  # (sent, answered, kind, outcome) in s from the start
    samples: list[dict] = []
    began = time.monotonic()
    deadline = began + args.minutes * 60
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def client(index: int, http) -> None:
        rng = random.Random(index)
        while time.monotonic() < deadline:
            kind = rng.choice(KINDS)
            sent = time.monotonic() - began
            outcome = await one_request(http, base, kind, rng, reviews, rows, args.timeout, headers)
            records.append((sent, time.monotonic() - began, kind, outcome))
            if outcome != "ok":
                await asyncio.sleep(0.5)  # backs off a little, as Retry-After asks

    async def sampler() -> None:
        while True:
            now = time.monotonic() - began
            memory = await asyncio.to_thread(replica_memory, root)
            samples.append({"t": round(now, 1), "load_1min": os.getloadavg()[0], "replicas": memory})
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(args.sample_s, max(0.0, deadline - time.monotonic())))

    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(sampler(), *(client(i, http) for i in range(args.clients)))
    return records, samples


# --- the report --------------------------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def summarize(records: list, samples: list, minutes: float, tolerance: float) -> dict:
    per_minute = []
    for minute in range(int(round(minutes))):
        mine = [r for r in records if minute * 60 <= r[1] < (minute + 1) * 60]  # by when it was answered
        row = {"minute": minute + 1, "requests": len(mine), "errors": sum(o != "ok" for *_, o in mine),
               "p50_ms": _percentile([a - s for s, a, _, o in mine if o == "ok"], 0.50),
               "p99_ms": _percentile([a - s for s, a, _, o in mine if o == "ok"], 0.99)}
        for kind in KINDS:
            row[f"p99_ms_{kind}"] = _percentile([a - s for s, a, k, o in mine if k == kind and o == "ok"], 0.99)
        at_end = [s for s in samples if s["t"] <= (minute + 1) * 60 + 1]
        last = at_end[-1] if at_end else {"replicas": {}, "load_1min": None}
        row["rss_mb"] = {name: round(info["rss_mb"], 1) for name, info in last["replicas"].items()}
        row["pids"] = {name: info["pid"] for name, info in last["replicas"].items()}
        row["load_1min"] = last["load_1min"]
        per_minute.append(row)
    growth = {}
    if len(per_minute) > 2:
        base = per_minute[1]["rss_mb"]
        for name, start in base.items():
            later = [row["rss_mb"].get(name) for row in per_minute[2:] if row["pids"].get(name) == per_minute[1]["pids"][name]]
            later = [value for value in later if value is not None]
            if later and start:
                growth[name] = {"after_minute_2_mb": start, "max_later_mb": max(later), "last_mb": later[-1],
                                "max_growth": round(max(later) / start - 1, 4)}
    restarted = sorted({name for row in per_minute for name, pid in row["pids"].items()
                        if per_minute[0]["pids"].get(name) not in (None, pid)})
    outcomes: dict[str, int] = {}
    for *_, outcome in records:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    errors = sum(v for k, v in outcomes.items() if k != "ok")
    worst = max((g["max_growth"] for g in growth.values()), default=None)
    return {
        "requests": len(records), "errors": errors, "outcomes": outcomes,
        "by_kind": {kind: sum(k == kind for _, _, k, _ in records) for kind in KINDS},
        "per_minute": per_minute, "rss_growth_after_minute_2": growth, "restarted_replicas": restarted,
        "verdict": {"zero_errors": errors == 0,
                    "rss_within_tolerance": None if worst is None else worst <= tolerance,
                    "worst_rss_growth": worst, "tolerance": tolerance},
        "samples": samples,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_minute"]
    minutes = [row["minute"] for row in rows]
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in KINDS:
        values = [row[f"p99_ms_{kind}"] for row in rows]
        latency.plot(minutes, [v if v is not None else float("nan") for v in values], marker="o", label=kind)
    from matplotlib.ticker import MaxNLocator

    for axis in (latency, memory):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    latency.set(xlabel="minute", ylabel="p99 latency (ms)", title="p99 latency per minute")
    latency.set_ylim(bottom=0)
    latency.legend()
    names = sorted({name for row in rows for name in row["rss_mb"]})
    for name in names:
        memory.plot(minutes, [row["rss_mb"].get(name, float("nan")) for row in rows], marker="o", label=name)
    if len(rows) > 2:
        memory.axvline(2, color="grey", linestyle=":", linewidth=1)
    memory.set(xlabel="minute", ylabel="resident memory (MiB)", title="RSS per replica (end of each minute)")
    memory.legend(fontsize=8)
    setup = report["setup"]
    figure.suptitle(f"rnnlab serve soak: {setup['clients']} clients, {setup['minutes']:g} min, "
                    f"{report['requests']} requests, {report['errors']} errors", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--timeout", type=float, default=60.0, help="a request unanswered this long is an error")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--bundles", help="serve these bundles (default: chapter-sized random ones)")
    parser.add_argument("--url", help="a running service on this machine (its replicas' memory is read from /proc)")
    parser.add_argument("--api-key", default=os.environ.get("RNNLAB_API_KEY"))
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `rnnlab serve` argument")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    parser.add_argument("--png", default=str(REPO / "docs" / "soak.png"))
    args = parser.parse_args(argv)

    reviews, rows = imdb_reviews(), price_rows()
    service, scratch = None, tempfile.TemporaryDirectory(prefix="soak-")
    try:
        if args.url:
            base = args.url.rstrip("/")
        else:
            bundles = Path(args.bundles) if args.bundles else random_bundles(Path(scratch.name))
            started = time.monotonic()
            service = LocalService(bundles, args.serve_arg, env=repo_env())
            service.start()
            print(f"service up in {time.monotonic() - started:.0f} s on port {service.port}; soaking "
                  f"{args.minutes:g} min with {args.clients} clients", flush=True)
            base = service.url
        load_before = os.getloadavg()
        records, samples = asyncio.run(soak(base, args, reviews, rows, service.process.pid if service else None))
    finally:
        if service is not None:
            service.stop()
        scratch.cleanup()
    report = summarize(records, samples, args.minutes, args.rss_tolerance)
    report["setup"] = {"clients": args.clients, "minutes": args.minutes, "timeout_s": args.timeout,
                       "mix": "each request a random pick of sentiment (1 review), stream (100 chars), forecast "
                              "(300 days)", "service": args.url or "rnnlab serve (direct ingress, default limits)",
                       "bundles": "given" if args.bundles else "chapter-sized, randomly initialised",
                       "load_average_before": load_before, "cpus": os.cpu_count()}
    for row in report["per_minute"]:
        rss = ", ".join(f"{name} {mb:.0f}" for name, mb in row["rss_mb"].items())
        print(f"min {row['minute']:3d}: {row['requests']:5d} req, {row['errors']} err, p99 {row['p99_ms']} ms "
              f"(load {row['load_1min']:.1f}) | RSS MiB: {rss}", flush=True)
    verdict = report["verdict"]
    print(f"{report['requests']} requests, {report['errors']} errors {report['outcomes']}; worst RSS growth after "
          f"minute 2: {verdict['worst_rss_growth']} (tolerance {verdict['tolerance']}); restarted: "
          f"{report['restarted_replicas'] or 'none'}")
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {json_path}")
    plot(report, Path(args.png))
    return 0 if verdict["zero_errors"] and verdict["rss_within_tolerance"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
