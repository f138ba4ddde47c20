"""Load test for `rnnlab serve`: N concurrent clients for T seconds, batching on vs off in one run.

    python -m benchmarks.serve_load                      # starts its own local service (2 CPUs) and compares
    python -m benchmarks.serve_load --bundles runs/bundles   # ... over trained bundles instead of random ones
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --only sentiment   # a running service, as is

Phases (own service): each endpoint with batching on (max_batch_size 32 for sentiment/forecast, 128 sequences
for generation) and then with max_batch_size=1 everywhere (the Gateway's gathering and the model deployments:
one request at a time), switched by redeploying with a new user_config (Ray restarts the replicas); `--rounds N` alternates the two N times. Per phase:
requests/s, p50/p99 latency, errors; for generation also characters/s. Two ceilings with no model behind them:
GET /healthz, and POST /v1/sentiment with the benchmark's own body plus an unknown field (a 422 from the
Gateway's schema check) -- the most the sentiment endpoint can reach through Serve's proxy, batched or not.
`--generation` measures generation against the model's own speed instead: the decode-step ceiling (the model on
the runtime the service runs it on, a step and its sampling at batch 32 and 128 in a plain loop, one thread, in a
Ray worker like the replica)
and the served characters/s at 32 and 128 concurrent clients, plain and streamed, 100- and 400-character
requests (`--gen-clients`, `--gen-lengths`), each phase beside the ceiling measured just before and after it,
with the Generator replica's busy fraction and ms/step (where the time went):

    python -m benchmarks.serve_load --generation --seconds 10 --json gen.json
    python -m benchmarks.serve_load --generation --proxy   # HTTP through Ray's proxy actor, as on a cluster

The service it starts takes HTTP the way `rnnlab serve` does on one machine: the Gateway replica listens on
--port itself (Ray Serve's direct ingress); `--proxy` puts Ray's proxy actor in front, as `rnnlab serve --proxy`
and `--address` do. Each generation phase also prints the cores each process kept busy (Generator, Gateway,
proxy, this load generator, Ray's own), read from /proc.

Without --bundles it builds chapter-sized bundles from randomly initialised models (same compute as trained
ones) and uses real IMDb reviews from the mirror when it is there (else synthetic ones of the same length).
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

import httpx

from benchmarks._harness import deploy, imdb_reviews, price_rows, random_bundles
from rnnlab.registry import routes

FLOORS = ("healthz", "post-422")  # no model behind them: the HTTP path's own ceilings, measured once per round


# --- load generation -------------------------------------------------------------------------------------------
def streamed_chars(payload: bytes) -> int:
    """Characters in an SSE answer of /v1/generate (its `data: {"text": ...}` events); -1 if it did not end with
    `event: done` (an error event, a cut stream)."""
    chars, done = 0, False
    for block in payload.decode("utf-8").split("\n\n"):
        if block.startswith("event: done"):
            done = True
        elif block.startswith("data: "):
            chars += len(json.loads(block[len("data: "):])["text"])
    return chars if done else -1


async def run_clients(url: str, make_body, *, clients: int, seconds: float, count_chars: bool = False,
                      method: str = "POST", ok_status: int = 200) -> dict:
    """``clients`` tasks, each sending one request after another until ``seconds`` pass.

    aiohttp rather than httpx: the load generator shares the 2 cores with the service, and aiohttp spends
    about half the CPU per request, so more of the machine measures the service.
    """
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    chars = 0
    deadline = time.perf_counter() + seconds

    async def client(index: int, http: aiohttp.ClientSession) -> None:
        nonlocal chars
        rng = random.Random(index)
        while time.perf_counter() < deadline:
            body = make_body(rng)
            start = time.perf_counter()
            try:
                async with http.request(method, url, json=body) as response:
                    payload = await response.read()
                    if response.status != ok_status:
                        errors.append(f"{response.status} {payload[:200]!r}")
                        continue
                if count_chars:
                    got = (streamed_chars(payload) if response.content_type == "text/event-stream"
                           else len(json.loads(payload)["text"]))
                    if got < 0:
                        errors.append(f"stream without a done event: {payload[-200:]!r}")
                        continue
                    chars += got
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                errors.append(f"{type(error).__name__}: {error}")
                continue
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    result = {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "errors": len(errors),
    }
    if count_chars:
        result["chars_per_s"] = chars / elapsed
    if errors:
        result["first_error"] = errors[0]
    return result


# --- measurements -------------------------------------------------------------------------------------------
def model_ceiling(bundles: Path, reviews: list[str], seconds: float = 3.0) -> dict:
    """In-process sentiment throughput at batch 1 vs 32 (one torch thread, as a replica has): the most that
    batching can buy before any HTTP or Ray overhead is counted."""
    import torch

    from rnnlab.jobs.sentiment import SentimentPredictor
    from rnnlab.serve.bundles import find_bundles
    from rnnlab.bundle import load_bundle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    classifier = SentimentPredictor(load_bundle(find_bundles(bundles, check=False)["sentiment"]))
    out = {}
    for size in (1, 32):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            first = done % (len(reviews) - size)
            classifier.predict(reviews[first:first + size])
            done += size
        out[f"reviews_per_s_batch_{size}"] = done / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return out


def batching_stats(base: str) -> dict:
    models = httpx.get(f"{base}/v1/models", timeout=30).json()["data"]  # OpenAI's list shape
    return {m["endpoint"]: m["batching"] for m in models}


def phase_stats(before: dict, after: dict) -> dict:
    """Batch sizes (forward passes; decode steps for generation) of one phase: the difference of two cumulative
    /v1/models snapshots."""
    out = {}
    for endpoint, stats in after.items():
        old = before.get(endpoint, {}).get("batch_size_histogram", {})
        histogram = {int(size): count - old.get(size, 0) for size, count in stats["batch_size_histogram"].items()}
        histogram = {size: count for size, count in histogram.items() if count}
        batches, items = sum(histogram.values()), sum(size * count for size, count in histogram.items())
        out[endpoint] = {"batches": batches, "items": items, "batch_size_mean": items / batches if batches else 0.0,
                         "batch_size_max": max(histogram, default=0), "batch_size_histogram": histogram}
    return out


# --- generation near the ceiling ----------------------------------------------------------------------------------
def decode_ceiling(bundles: Path, batch: int, seconds: float, runtime: str | None = None) -> dict:
    """The model's own speed: the charlm bundle's model under ``runtime`` (rnnlab/runtime.py; None: the bundle's
    default, which the service runs; torch: oneDNN off for the one-step call, as served) stepping ``batch``
    sequences in a plain loop on one thread (as a replica has), each step and its sampling at temperature 0.8 as the runtime does them (``model.decode``: in the graph under
    ONNX Runtime) -- no HTTP, Ray, scheduler, requests joining or leaving. Characters/s = batch * steps/s."""
    import torch

    from rnnlab.bundle import load_bundle
    from rnnlab.runtime import load_model
    from rnnlab.sampling import per_row_params, sampling_params
    from rnnlab.serve.bundles import find_bundles

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_model(load_bundle(find_bundles(bundles, check=False)["charlm"]), runtime, threads=1)
    settings = per_row_params([sampling_params(temperature=0.8)] * batch)
    uniforms = torch.rand(1024, batch, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state = model.init_state(batch)
        ids = torch.zeros(batch, dtype=torch.long)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            ids, state, _ = model.decode(ids, state, settings, uniforms[steps % len(uniforms)])
            steps += 1
        elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return {"batch": batch, "steps_per_s": steps / elapsed, "chars_per_s": batch * steps / elapsed}


# Ray names its actor processes "ray::<Actor>" (Serve replicas "ray::ServeReplica:<app>:<deployment>"): CPU seconds
# per role during a phase show where a 2-core box's time goes besides the decode step.
ROLES = ((":charlm", "generator"), (":Gateway", "gateway"), (":sentiment", "sentiment"), (":stock", "forecast"),
         ("ProxyActor", "proxy"), ("ServeController", "controller"), ("raylet", "ray core"),
         ("gcs_server", "ray core"))


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's processes on this machine (Linux /proc); this
    process is the load generator. Other processes count as "other"."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(entry.name) == os.getpid():
            role = "load generator"
        else:
            role = next((name for key, name in ROLES if key in command), "other")
        seconds[role] = seconds.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return seconds


def generation_phases(base: str, bundles: Path, args) -> list[dict]:
    """Served characters/s at each (clients, request length, streaming) against the decode-step ceiling at
    batch = clients, the ceiling measured right before and right after each phase and averaged (load from other
    jobs drifts; a phase and its own ceiling see about the same). The ceiling runs in a Ray worker, as the
    Generator replica does: Ray starts its workers at nice 15, and on a shared box a loop in this (nice 0)
    process gets more CPU than any replica can, which would measure the machine's scheduler, not the service."""
    import ray

    remote_ceiling = ray.remote(num_cpus=0)(decode_ceiling)

    def decode_ceiling_in_worker(bundles: Path, clients: int, seconds: float) -> dict:
        return ray.get(remote_ceiling.remote(bundles, clients, seconds))

    out = []
    for clients in args.gen_clients:
        for length in args.gen_lengths:
            for stream in (False, True):
                first = decode_ceiling_in_worker(bundles, clients, args.ceiling_seconds / 2)
                body = lambda rng, length=length, stream=stream: {  # noqa: E731
                    "prompt": "the emperor", "max_new_tokens": length, "temperature": 0.8,
                    "seed": rng.randrange(2**31), "stream": stream}
                before, cpu_before = batching_stats(base), cpu_by_role()
                served = asyncio.run(run_clients(f"{base}/v1/generate", body, clients=clients, seconds=args.seconds,
                                                 count_chars=True))
                after, cpu_after = batching_stats(base), cpu_by_role()
                # cores each role kept busy during the phase (2.0 = the whole of a 2-core box)
                cores = {role: round((cpu_after[role] - cpu_before.get(role, 0.0)) / served["seconds"], 3)
                         for role in cpu_after}
                steps = phase_stats(before, after)["/v1/charlm"]
                # where the time went in the Generator replica: decoding (busy) vs waiting, and its step speed
                busy = after["/v1/charlm"]["decode_s"] - before["/v1/charlm"]["decode_s"]
                steps["decode_busy_fraction"] = busy / served["seconds"]
                steps["served_step_ms"] = 1000 * busy / max(1, steps["batches"])
                last = decode_ceiling_in_worker(bundles, clients, args.ceiling_seconds / 2)
                ceiling = {"batch": clients, "before": first, "after": last,
                           "chars_per_s": (first["chars_per_s"] + last["chars_per_s"]) / 2}
                ratio = served["chars_per_s"] / ceiling["chars_per_s"]
                ceiling_steps = (first["steps_per_s"] + last["steps_per_s"]) / 2
                label = f"{clients:3d} clients, {length:3d} chars, {'stream' if stream else 'plain '}"
                print(f"[generate] {label}: served {served['chars_per_s']:7.0f} chars/s vs ceiling "
                      f"{ceiling['chars_per_s']:7.0f} (before {first['chars_per_s']:.0f}, after "
                      f"{last['chars_per_s']:.0f}) at batch {clients} -> {ratio:5.1%}; mean active "
                      f"{steps['batch_size_mean']:5.1f}; decoding {steps['decode_busy_fraction']:4.0%} of the time, "
                      f"{steps['served_step_ms']:.2f} ms/step vs {1000 / ceiling_steps:.2f} alone; p50 "
                      f"{served['p50_ms']:6.0f} ms; errors {served['errors']}"
                      + (f" ({served['first_error']})" if served["errors"] else ""), flush=True)
                print("           cores busy: " + ", ".join(f"{role} {used:.2f}" for role, used in sorted(
                    cores.items(), key=lambda item: -item[1]) if used >= 0.01), flush=True)
                out.append({"clients": clients, "max_new_tokens": length, "stream": stream, "served": served,
                            "ceiling": ceiling, "ratio": ratio, "decode_steps": steps, "cores_busy": cores})
    return out


def print_generation_summary(phases: list[dict]) -> None:
    print("\nserved / ceiling (same run, each phase beside the ceiling measured just before it):")
    for p in phases:
        print(f"  {p['clients']:3d} clients  {p['max_new_tokens']:3d} chars  {'stream' if p['stream'] else 'plain '}"
              f"  {p['served']['chars_per_s']:7.0f} / {p['ceiling']['chars_per_s']:7.0f} = {p['ratio']:5.1%}"
              f"  errors {p['served']['errors']}")


# --- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service; measure it as it is (no batching comparison)")
    parser.add_argument("--bundles", help="bundle folder for the service this script starts")
    parser.add_argument("--preset", default="chapter", choices=["chapter", "default"],
                        help="the preset whose model sizes the random bundles have (without --bundles)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="batched phases' max_batch_size (default: "
                        "the deployments' defaults, 32 for sentiment/forecast, 128 sequences for generation)")
    parser.add_argument("--only", nargs="*", choices=[*FLOORS, "sentiment", "forecast", "generate"],
                        default=[*FLOORS, "sentiment", "forecast", "generate"])
    parser.add_argument("--batch-wait", type=float, default=None, help="batched phases' batch_wait_timeout_s "
                        "(default: the Gateway's 0.02)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate batched and unbatched phases this many times (ratios per round, medians)")
    parser.add_argument("--generation", action="store_true",
                        help="generation near the model's ceiling instead of batching on/off: served chars/s at "
                        "--gen-clients x --gen-lengths, plain and streamed, each beside the decode-step ceiling")
    parser.add_argument("--gen-clients", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--proxy", action="store_true",
                        help="HTTP through Ray's proxy actor (rnnlab serve --proxy) instead of direct ingress")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    ingress = "proxy" if args.proxy else "direct"  # of the service this script starts (not of --url's)

    reviews = imdb_reviews()
    rows = price_rows()
    bodies = {
        "sentiment": lambda rng: {"texts": [rng.choice(reviews)]},
        "forecast": lambda rng: {"rows": rows},
        "healthz": lambda rng: None,  # GET through proxy and Gateway, no model: the HTTP path's own ceiling
        # the sentiment request's own body with one unknown field: proxy, body transfer, JSON and schema check in
        # the Gateway, then a 422 before any model -- the most POST /v1/sentiment can reach, whatever batching does
        "post-422": lambda rng: {"texts": [rng.choice(reviews)], "floor": True},
        "generate": lambda rng: {"prompt": "the emperor", "max_new_tokens": args.max_new_tokens,
                                 "temperature": 0.8, "seed": rng.randrange(2**31)},
    }

    def measure(base: str, label: str) -> dict:
        out = {}
        for kind in args.only:
            if kind in FLOORS and label.startswith("unbatched"):
                continue  # nothing to batch
            url, method = {"healthz": (f"{base}/healthz", "GET"), "post-422": (f"{base}/v1/sentiment", "POST")}.get(
                kind, (f"{base}/v1/{kind}", "POST"))
            result = asyncio.run(run_clients(url, bodies[kind], clients=args.clients, seconds=args.seconds,
                                             count_chars=kind == "generate", method=method,
                                             ok_status=422 if kind == "post-422" else 200))
            out[kind] = result
            extra = f", {result['chars_per_s']:.0f} chars/s" if "chars_per_s" in result else ""
            print(f"[{label:11s}] {kind:9s} {result['requests_per_s']:8.1f} req/s{extra}  p50 {result['p50_ms']:7.1f} ms"
                  f"  p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}"
                  + (f"  ({result['first_error']})" if result["errors"] else ""), flush=True)
        return out

    if args.url:
        results = {"as_deployed": measure(args.url.rstrip("/"), "service")}
        results["batching"] = batching_stats(args.url.rstrip("/"))
    else:
        from rnnlab.serve.local import in_process

        rounds: list[dict] = []
        with tempfile.TemporaryDirectory() as scratch:
            bundles = Path(args.bundles) if args.bundles else random_bundles(Path(scratch), args.preset)
            # direct ingress as rnnlab serve has it (each phase's serve.run restarts the Gateway, which gets its
            # one port back at once)
            with in_process(args.port, direct=not args.proxy) as base:
                if args.generation:
                    # room for every client's sequence in one decoding batch, and for every client's stream and
                    # request at the Gateway (the service's defaults shed load above 32 streams)
                    most = max(args.gen_clients)
                    deploy(bundles, most, max_streams=most, max_ongoing_requests=2 * most,
                           max_queued_requests=2 * most)
                    results = {"generation": generation_phases(base, bundles, args)}
                else:
                    # Batched and unbatched phases alternate, `--rounds` times: load from other processes on the
                    # machine comes and goes, and alternating spreads it over both sides; ratios are taken within
                    # each round.
                    for number in range(1, args.rounds + 1):
                        deploy(bundles, args.batch_size, args.batch_wait)  # new user_config: Ray restarts replicas
                        before = batching_stats(base)
                        batched = measure(base, f"batched {number}")
                        stats = phase_stats(before, batching_stats(base))
                        deploy(bundles, 1)  # max_batch_size=1 everywhere: Gateway gathering and model forward passes
                        rounds.append({"batched": batched, "batched_stats": stats,
                                       "unbatched": measure(base, f"unbatched {number}")})
            if args.generation:
                print_generation_summary(results["generation"])
                results["setup"] = {"ingress": ingress, "seconds": args.seconds,
                                    "ceiling_seconds": args.ceiling_seconds,
                                    "bundles": args.bundles or "random chapter-sized"}
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=2))
                return 0
            results = {"rounds": rounds,
                       "ray_serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}}
            if "sentiment" in args.only:
                results["sentiment_model_only"] = model_ceiling(bundles, reviews)
        print()
        if "sentiment" in args.only:
            ceiling = results["sentiment_model_only"]
            print(f"sentiment model alone (no HTTP): {ceiling['reviews_per_s_batch_1']:.0f} reviews/s at batch 1, "
                  f"{ceiling['reviews_per_s_batch_32']:.0f} at batch 32 "
                  f"({ceiling['reviews_per_s_batch_32'] / ceiling['reviews_per_s_batch_1']:.1f}x ceiling)")
        if "healthz" in args.only:
            floors = [r["batched"]["healthz"]["requests_per_s"] for r in rounds]
            print(f"HTTP path alone (GET /healthz, no model): {' / '.join(f'{f:.0f}' for f in floors)} req/s "
                  "(per round)")
        if "post-422" in args.only:
            floors = [r["batched"]["post-422"]["requests_per_s"] for r in rounds]
            print(f"HTTP path alone for a sentiment POST (same body, 422 from the Gateway's schema check, no model): "
                  f"{' / '.join(f'{f:.0f}' for f in floors)} req/s (per round)")
        results["summary"] = {}
        for kind in (k for k in args.only if k not in FLOORS):
            key = "chars_per_s" if kind == "generate" else "requests_per_s"
            on = [r["batched"][kind][key] for r in rounds]
            off = [r["unbatched"][kind][key] for r in rounds]
            ratios = [a / b for a, b in zip(on, off)]
            endpoint = f"/v1/{routes()[kind]}"  # /v1/models names the job's own route (/v1/stock for /v1/forecast)
            sizes = [r["batched_stats"][endpoint]["batch_size_mean"] for r in rounds]
            errors = sum(r[side][kind]["errors"] for r in rounds for side in ("batched", "unbatched"))
            results["summary"][kind] = {"key": key, "batched": statistics.median(on),
                                        "unbatched": statistics.median(off), "ratios": ratios,
                                        "ratio_median": statistics.median(ratios), "errors": errors}
            print(f"{kind:9s} speed-up {statistics.median(ratios):5.1f}x median of rounds "
                  f"({', '.join(f'{r:.1f}x' for r in ratios)}; {key} median {statistics.median(on):.1f} vs "
                  f"{statistics.median(off):.1f}); errors {errors}; batched phases' mean batch size: "
                  f"{', '.join(f'{m:.1f}' for m in sizes)}")
        if {"sentiment", "forecast"} <= set(args.only):
            # the yardstick: a forecast (a 300-row history, 37 features) against a review, same run
            shares = [r["batched"]["forecast"]["requests_per_s"] / r["batched"]["sentiment"]["requests_per_s"]
                      for r in rounds]
            results["summary"]["forecast_vs_sentiment"] = {"ratios": shares, "ratio_median": statistics.median(shares)}
            print(f"forecast / sentiment requests/s (batched, same round): {statistics.median(shares):.0%} median "
                  f"({', '.join(f'{s:.0%}' for s in shares)})")
    results["setup"] = {"ingress": None if args.url else ingress, "clients": args.clients, "seconds": args.seconds,
                        "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "bundles": args.bundles or f"random, sentiment preset {args.preset}"}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
