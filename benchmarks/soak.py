"""Soak run for `rnnlab serve`: mixed traffic over every served job from 16 clients for 20 minutes (an hour with
`--minutes 60`), watching errors, p99 latency and each replica's resident memory minute by minute.

    python -m benchmarks.soak                                   # 16 clients, 20 min, its own service
    python -m benchmarks.soak --minutes 60                      # the hour the README's table reports
    python -m benchmarks.soak --minutes 3 --fit-after 1 --json /tmp/soak.json --png /tmp/soak.png   # a shake-out
    python -m benchmarks.soak --minutes 12 --trace-memory /tmp/trace   # where each replica's memory goes
    python -m benchmarks.soak --bundles runs/bundles            # over trained bundles instead of random ones
    python -m benchmarks.soak --url http://127.0.0.1:8000       # a service already running on this machine

It starts the service as users do (`rnnlab serve`, a subprocess: direct ingress, default limits) over
chapter-sized bundles of randomly initialised models (_harness.py's: the compute of trained ones), unless
`--url` names a running one. Each client sends one request after another, each to a served job (the registry's,
`POST /v1/<job>`) picked at random: a review to classify (sentiment), a next-close forecast from 300 days (stock), a
100-character generation stream (charlm, `stream: true`, read to its `done` event), the next days' quantiles from
300 days (horizon). A served job with no request in `REQUESTS` stops the soak before it starts, so a new job cannot
be left out unnoticed. An error is anything but a 200 with a whole answer: another status, a stream without `done`,
a connection error, no answer within `--timeout` s.

Every `--sample-s` seconds it reads the resident memory (RSS) of each Serve replica process on this machine
(`ray::ServeReplica:<app>:<deployment>` in /proc, via psutil; a restarted replica shows as a new pid), and the
one-minute load average (the box may be shared: a noisy neighbour shows there). Per minute: requests, errors,
p50/p99 latency by job and overall, each replica's RSS at the minute's end. Verdict: zero errors, and every
replica's memory slope at most `--max-slope` (0.05 MiB/min): the least-squares slope of its RSS samples against time
after minute `--fit-after` (10; the minutes before are warm-up: imports, allocator pools, caches of batch shapes
filling). A restarted replica is listed; its slope is fitted over the samples of the process alive at the end.

`--trace-memory DIR` has each replica trace its own allocations (rnnlab/serve/memory.py: tracemalloc, glibc's malloc
counters, object counts) and write what grew to DIR every `--trace-every-s` seconds; the service is slower then.

Writes the JSON report (`--json`, default benchmarks/results/soak.json) and the curve (`--png`, default
docs/soak.png): p99 latency per minute by job, and RSS per replica with its fitted slope.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import REPO, imdb_reviews, post_outcome, price_rows, random_bundles, repo_env
from rnnlab import registry
from rnnlab.serve.local import LocalService
from rnnlab.serve.memory import ENV_DIR, ENV_INTERVAL
# what each served job is asked: (rng, reviews, price rows) -> body of POST /v1/<job>; a generation job streams
REQUESTS = {
    "sentiment": lambda rng, reviews, rows: {"texts": [rng.choice(reviews)]},
    "stock": lambda rng, reviews, rows: {"rows": rows},
    "charlm": lambda rng, reviews, rows: {"prompt": "the emperor", "max_new_tokens": 100,
                                         "seed": rng.randrange(2**31), "stream": True},
    "horizon": lambda rng, reviews, rows: {"rows": rows},
}


def served_jobs() -> tuple[str, ...]:
    """The registry's served jobs, each of which the mix asks; one without a request in REQUESTS stops the soak."""
    missing = [job for job in registry.served() if job not in REQUESTS]
    if missing:
        raise SystemExit(f"soak: no request for the served job(s) {', '.join(missing)}; add one to REQUESTS in "
                         "benchmarks/soak.py.")
    return registry.served()


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
async def one_request(http, base: str, job: str, rng: random.Random, reviews, rows, timeout: float,
                      headers: dict) -> str:
    body = REQUESTS[job](rng, reviews, rows)
    return await post_outcome(http, f"{base}/v1/{job}", body, stream=bool(body.get("stream")), timeout=timeout,
                              headers=headers,
                              answered=lambda payload: bool(payload.get("results") or payload.get("forecast")))


async def soak(base: str, args, jobs: tuple[str, ...], reviews, rows, root: int | None) -> tuple[list, list]:
    import aiohttp

    records: list[tuple[float, float, str, str]] = []  # (sent, answered, job, outcome) in s from the start
    samples: list[dict] = []
    began = time.monotonic()
    deadline = began + args.minutes * 60
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def client(index: int, http) -> None:
        rng = random.Random(index)
        while time.monotonic() < deadline:
            job = rng.choice(jobs)
            sent = time.monotonic() - began
            outcome = await one_request(http, base, job, rng, reviews, rows, args.timeout, headers)
            records.append((sent, time.monotonic() - began, job, outcome))
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


def memory_slopes(samples: list, fit_after_s: float) -> dict:
    """{replica: {"pid", "samples", "from_mb", "to_mb", "slope_mb_per_min"}}: the least-squares slope of each
    replica's RSS against time over the samples from ``fit_after_s`` on, for the process alive at the end."""
    later = [sample for sample in samples if sample["t"] >= fit_after_s]
    slopes = {}
    for name, info in (later[-1]["replicas"].items() if later else ()):
        points = [(sample["t"] / 60, sample["replicas"][name]["rss_mb"]) for sample in later
                  if sample["replicas"].get(name, {}).get("pid") == info["pid"]]
        if len(points) < 3:  # two points always fit: no slope worth a verdict
            continue
        slope = statistics.linear_regression(*zip(*points)).slope
        slopes[name] = {"pid": info["pid"], "samples": len(points), "from_minute": round(points[0][0], 2),
                        "from_mb": round(points[0][1], 1), "to_mb": round(points[-1][1], 1),
                        "slope_mb_per_min": round(slope, 4)}
    return slopes


def summarize(records: list, samples: list, jobs: tuple[str, ...], minutes: float, fit_after: float,
              max_slope: float) -> dict:
    per_minute = []
    for minute in range(int(round(minutes))):
        mine = [r for r in records if minute * 60 <= r[1] < (minute + 1) * 60]  # by when it was answered
        row = {"minute": minute + 1, "requests": len(mine), "errors": sum(o != "ok" for *_, o in mine),
               "p50_ms": _percentile([a - s for s, a, _, o in mine if o == "ok"], 0.50),
               "p99_ms": _percentile([a - s for s, a, _, o in mine if o == "ok"], 0.99)}
        for job in jobs:
            row[f"p99_ms_{job}"] = _percentile([a - s for s, a, k, o in mine if k == job and o == "ok"], 0.99)
        at_end = [s for s in samples if s["t"] <= (minute + 1) * 60 + 1]
        last = at_end[-1] if at_end else {"replicas": {}, "load_1min": None}
        row["rss_mb"] = {name: round(info["rss_mb"], 1) for name, info in last["replicas"].items()}
        row["pids"] = {name: info["pid"] for name, info in last["replicas"].items()}
        row["load_1min"] = last["load_1min"]
        per_minute.append(row)
    slopes = memory_slopes(samples, fit_after * 60)
    restarted = sorted({name for row in per_minute for name, pid in row["pids"].items()
                        if per_minute[0]["pids"].get(name) not in (None, pid)})
    outcomes: dict[str, int] = {}
    for *_, outcome in records:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    errors = sum(v for k, v in outcomes.items() if k != "ok")
    worst = max((fit["slope_mb_per_min"] for fit in slopes.values()), default=None)
    return {
        "requests": len(records), "errors": errors, "outcomes": outcomes,
        "by_job": {job: sum(k == job for _, _, k, _ in records) for job in jobs},
        "per_minute": per_minute, "memory_slopes": slopes, "restarted_replicas": restarted,
        "verdict": {"zero_errors": errors == 0,
                    "memory_flat": None if worst is None else worst <= max_slope,
                    "worst_slope_mb_per_min": worst, "max_slope_mb_per_min": max_slope,
                    "fit_after_minutes": fit_after},
        "samples": samples,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows, samples, slopes = report["per_minute"], report["samples"], report["memory_slopes"]
    fit_after = report["verdict"]["fit_after_minutes"]
    minutes = [row["minute"] for row in rows]
    figure, (latency, memory, drift) = plt.subplots(1, 3, figsize=(16, 4.2))
    for job in report["by_job"]:
        values = [row[f"p99_ms_{job}"] for row in rows]
        latency.plot(minutes, [v if v is not None else float("nan") for v in values], marker=".", label=job)
    latency.set(xlabel="minute", ylabel="p99 latency (ms)", title="p99 latency per minute, by job")
    latency.set_ylim(bottom=0)
    latency.legend(fontsize=8)
    names = sorted({name for sample in samples for name in sample["replicas"]})
    for name in names:
        points = [(s["t"] / 60, s["replicas"][name]["rss_mb"]) for s in samples if name in s["replicas"]]
        line, = memory.plot(*zip(*points), linewidth=1, label=name)
        fit = slopes.get(name)
        if fit is None:
            continue
        # the fitted samples (the process alive at the end) about their median, so a spike at the start does not
        # shift a whole curve, and the fitted line through them
        times, rss = zip(*((s["t"] / 60, s["replicas"][name]["rss_mb"]) for s in samples
                           if s["t"] >= fit_after * 60 and s["replicas"].get(name, {}).get("pid") == fit["pid"]))
        change = [mb - statistics.median(rss) for mb in rss]
        mean_t, mean_change = sum(times) / len(times), sum(change) / len(change)
        slope = fit["slope_mb_per_min"]
        drift.plot(times, change, linewidth=1, color=line.get_color(), alpha=0.6)
        drift.plot([times[0], times[-1]], [mean_change + slope * (t - mean_t) for t in (times[0], times[-1])],
                   linestyle="--", color=line.get_color(), label=f"{name} {slope:+.3f} MiB/min")
    memory.axvline(fit_after, color="grey", linestyle=":", linewidth=1)
    memory.set(xlabel="minute", ylabel="resident memory (MiB)", title="RSS per replica")
    memory.legend(fontsize=8)
    drift.axhline(0, color="grey", linewidth=0.5)
    drift.set(xlabel="minute", ylabel="RSS - its median (MiB)",
              title=f"after minute {fit_after:g}: RSS and its least-squares slope")
    if slopes:
        drift.legend(fontsize=8)
    for axis in (latency, memory, drift):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    setup, verdict = report["setup"], report["verdict"]
    worst = verdict["worst_slope_mb_per_min"]
    figure.suptitle(f"rnnlab serve soak: {setup['clients']} clients, {setup['minutes']:g} min, "
                    f"{report['requests']} requests, {report['errors']} errors; worst memory slope "
                    f"{'(too few samples)' if worst is None else f'{worst:+.3f} MiB/min'} "
                    f"(limit {verdict['max_slope_mb_per_min']:g})", fontsize=10)
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
    parser.add_argument("--fit-after", type=float, default=10.0,
                        help="minutes of warm-up before the memory slopes are fitted")
    parser.add_argument("--max-slope", type=float, default=0.05,
                        help="the most MiB/min a replica's fitted RSS slope may be")
    parser.add_argument("--trace-memory", metavar="DIR",
                        help="each replica writes what its memory holds here (rnnlab/serve/memory.py); slower")
    parser.add_argument("--trace-every-s", type=float, default=120.0, help="seconds between --trace-memory dumps")
    parser.add_argument("--bundles", help="serve these bundles (default: chapter-sized random ones)")
    parser.add_argument("--url", help="a running service on this machine (its replicas' memory is read from /proc)")
    parser.add_argument("--api-key", default=os.environ.get("RNNLAB_API_KEY"))
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `rnnlab serve` argument")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    parser.add_argument("--png", default=str(REPO / "docs" / "soak.png"))
    args = parser.parse_args(argv)
    if args.trace_memory and args.url:
        parser.error("--trace-memory needs the service this script starts, not --url")

    jobs = served_jobs()
    reviews, rows = imdb_reviews(), price_rows()
    service, scratch = None, tempfile.TemporaryDirectory(prefix="soak-")
    try:
        if args.url:
            base = args.url.rstrip("/")
        else:
            bundles = Path(args.bundles) if args.bundles else random_bundles(Path(scratch.name))
            started = time.monotonic()
            trace = {ENV_DIR: str(Path(args.trace_memory).resolve()), ENV_INTERVAL: str(args.trace_every_s)} \
                if args.trace_memory else {}
            service = LocalService(bundles, args.serve_arg, env=repo_env() | trace,
                                   log=Path(scratch.name) / "serve.log")
            service.start()
            print(f"service up in {time.monotonic() - started:.0f} s on port {service.port}; soaking "
                  f"{args.minutes:g} min with {args.clients} clients", flush=True)
            base = service.url
        load_before = os.getloadavg()
        records, samples = asyncio.run(soak(base, args, jobs, reviews, rows,
                                            service.process.pid if service else None))
    finally:
        if service is not None:
            service.stop()
        scratch.cleanup()
    report = summarize(records, samples, jobs, args.minutes, args.fit_after, args.max_slope)
    report["setup"] = {"clients": args.clients, "minutes": args.minutes, "timeout_s": args.timeout,
                       "mix": f"each request to one of {', '.join(jobs)} picked at random (soak.py's REQUESTS)",
                       "trace_memory": bool(args.trace_memory),
                       "service": args.url or "rnnlab serve (direct ingress, default limits)",
                       "bundles": "given" if args.bundles else "chapter-sized, randomly initialised",
                       "load_average_before": load_before, "cpus": os.cpu_count()}
    for row in report["per_minute"]:
        rss = ", ".join(f"{name} {mb:.0f}" for name, mb in row["rss_mb"].items())
        print(f"min {row['minute']:3d}: {row['requests']:5d} req, {row['errors']} err, p99 {row['p99_ms']} ms "
              f"(load {row['load_1min']:.1f}) | RSS MiB: {rss}", flush=True)
    verdict = report["verdict"]
    slopes = ", ".join(f"{name} {fit['slope_mb_per_min']:+.3f}" for name, fit in report["memory_slopes"].items())
    print(f"{report['requests']} requests, {report['errors']} errors {report['outcomes']}; RSS slope after minute "
          f"{args.fit_after:g} (MiB/min): {slopes or 'not enough samples'} (limit {args.max_slope:g}); restarted: "
          f"{report['restarted_replicas'] or 'none'}")
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {json_path}")
    plot(report, Path(args.png))
    return 0 if verdict["zero_errors"] and verdict["memory_flat"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
