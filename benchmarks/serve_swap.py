"""Model swaps under load: 32 clients for 60 s while the bundles behind two model ids are swapped every 15 s.

    python -m benchmarks.serve_swap                        # 32 clients, 60 s, a swap every 15 s
    python -m benchmarks.serve_swap --json benchmarks/results/serve_swap.json

Starts `rnnlab serve` (a subprocess, as users start it: direct ingress, default limits) over two models,
``imdb`` (sentiment) and ``wp`` (charlm), each with two versions: chapter-sized bundles of randomly initialised
models, two seeds each, so each version has its own weights digest. Half the clients classify a review
(`/v1/sentiment`, ``model: imdb``), half read a 100-character generation stream (`/v1/generate`, ``model: wp``,
``stream: true``). Every ``--every`` seconds both ids are pointed at their other version in one in-place update
(``rnnlab.serve.versions.swap``, what ``rnnlab swap`` does: Ray Serve reconfigures the running replicas).

Counted: every request that is not a 200 with a whole answer (another status, a stream without ``done``, a
connection error, no answer within ``--timeout`` s) is a failure -- the target is zero; the version each answer
came from (its ``model``: ID@VERSION) per second; the p99 latency in the window around each swap (from 2 s before
it was asked for until 5 s after every replica had the new version) beside the p99 away from swaps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import REPO, imdb_reviews, random_bundles, repo_env, stream_outcome
from rnnlab.serve.local import LocalService

MODELS = {"imdb": "sentiment", "wp": "charlm"}  # served id -> the bundle of random_bundles it is
TARGETS = {"sentiment": "imdb", "stream": "wp"}  # the model id each kind of client asks for


def make_versions(root: Path) -> tuple[Path, dict[str, list[Path]]]:
    """``root/serving`` (what --bundles names: version 1 of each id) and {id: [version 1, version 2]}."""
    import shutil

    versions: dict[str, list[Path]] = {model_id: [] for model_id in MODELS}
    for seed in (1, 2):
        built = random_bundles(root / f"seed{seed}", seed=seed, jobs=MODELS.values())
        for model_id, job in MODELS.items():
            target = root / f"v{seed}" / model_id
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(built / job), target)
            versions[model_id].append(target)
    serving = root / "serving"
    serving.mkdir()
    for model_id, (first, _) in versions.items():
        shutil.copytree(first, serving / model_id)
    return serving, versions


async def one_request(http, base: str, kind: str, rng: random.Random, reviews, timeout: float,
                      targets: dict[str, str] | None = None):
    """(outcome, version) of one request; version is the VERSION of the answer's ``model`` (ID@VERSION)."""
    import aiohttp

    targets = targets or TARGETS

    async def send():
        if kind == "sentiment":
            async with http.post(base + "/v1/sentiment", json={"texts": [rng.choice(reviews)],
                                                                "model": targets["sentiment"]}) as response:
                payload = await response.read()
                if response.status != 200:
                    return f"http {response.status}", None
                return "ok", json.loads(payload)["model"].rsplit("@", 1)[1]
        body = {"prompt": "the emperor", "max_new_tokens": 100, "seed": rng.randrange(2**31), "stream": True,
                "model": targets["stream"]}
        async with http.post(base + "/v1/generate", json=body) as response:
            if response.status != 200:
                await response.read()
                return f"http {response.status}", None
            version, event = None, None
            async for line in response.content:
                if line.startswith(b"event: "):
                    event = line[7:].strip().decode()
                elif line.startswith(b"data: ") and event == "start" and version is None:
                    version = json.loads(line[6:])["model"].rsplit("@", 1)[1]
            return stream_outcome(event), version

    try:
        return await asyncio.wait_for(send(), timeout)
    except asyncio.TimeoutError:
        return "timeout", None
    except aiohttp.ClientError as error:
        return f"connection {type(error).__name__}", None


def run_load(base: str, address: str, versions: dict[str, list[Path]], *, clients: int, seconds: float,
             every: float, timeout: float, reviews: list[str],
             targets: dict[str, str] | None = None) -> tuple[list, list]:
    """Clients for ``seconds`` and, in a process of its own, a swap of every id every ``every`` seconds; returns the records
    (sent, answered, kind, outcome, version) and the swaps (asked at, done at, {id: version}) in s from start."""
    import aiohttp

    records: list[tuple] = []
    # the swaps come from a process of their own: Ray reads its settings (token auth among them) when it is first
    # imported, and the process measuring the clients never joins the service's Ray instance. It says READY once
    # it has joined; the clock starts then, for both.
    plan = {"address": address, "every": every, "seconds": seconds,
            "versions": {model_id: [str(p) for p in paths] for model_id, paths in versions.items()}}
    swapper = subprocess.Popen([sys.executable, "-m", "benchmarks.serve_swap", "--swapper", json.dumps(plan)],
                               env=repo_env(), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = swapper.stdout.readline()
    if ready.strip() != "READY":
        swapper.kill()
        raise SystemExit(f"serve_swap: the swapping process did not join the service's Ray: {ready!r}")
    epoch, began = time.time(), time.monotonic()
    deadline = began + seconds
    swapper.stdin.write(f"{epoch}\n")
    swapper.stdin.flush()

    async def client(index: int, http) -> None:
        kind, rng = ("sentiment", "stream")[index % 2], random.Random(index)
        while time.monotonic() < deadline:
            sent = time.monotonic() - began
            outcome, version = await one_request(http, base, kind, rng, reviews, timeout, targets)
            records.append((sent, time.monotonic() - began, kind, outcome, version))
            if outcome != "ok":
                await asyncio.sleep(0.2)

    async def main() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
            await asyncio.gather(*(client(i, http) for i in range(clients)))

    try:
        asyncio.run(main())
        output, _ = swapper.communicate(timeout=max(120.0, timeout))
    finally:
        if swapper.poll() is None:
            swapper.kill()
    swaps = [tuple(json.loads(line[len("SWAP "):])) for line in output.splitlines() if line.startswith("SWAP ")]
    for line in output.splitlines():
        if not line.startswith("SWAP "):
            print(line, flush=True)
    return records, swaps


def swapper_main(plan: dict) -> int:
    """``--swapper PLAN``: join the service's Ray, say READY, read the start time (epoch) from stdin, then every
    ``every`` s until ``seconds`` pass point every id at its other version; one ``SWAP [asked, done, {id: version}
    or {"error": ...}]`` line per swap, in s from the epoch."""
    from rnnlab.cluster import bring_token

    bring_token()  # before Ray is imported
    import ray

    from rnnlab.cluster import connect
    from rnnlab.serve.versions import swap

    every = plan["every"]
    connect(plan["address"], namespace="serve", log_to_driver=False, logging_level="ERROR")
    logging.getLogger("ray.serve").addFilter(lambda record: record.levelno >= logging.WARNING)
    try:
        from rnnlab.serve.versions import served_models

        from rnnlab.serve.versions import check_new_bundle

        served_models()  # the first handle calls and bundle loads of a process are slow: made before the clock
        for paths in plan["versions"].values():
            check_new_bundle(paths[1])
        print("READY", flush=True)
        epoch = float(sys.stdin.readline())
        turn = 1
        while True:
            next_at = epoch + every * turn
            if next_at + 1 > epoch + plan["seconds"]:
                break
            time.sleep(max(0.0, next_at - time.time()))
            asked = time.time() - epoch
            try:
                done = swap({model_id: paths[turn % 2] for model_id, paths in plan["versions"].items()},
                            say=lambda line: print(f"[{time.time() - epoch:5.1f} s] {line}", flush=True))
            except Exception as error:  # noqa: BLE001 -- reported beside the requests, the load goes on
                done = {"error": f"{type(error).__name__}: {error}"}
            print("SWAP " + json.dumps([asked, time.time() - epoch, done]), flush=True)
            turn += 1
    finally:
        ray.shutdown()
    return 0


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(0.99 * len(values)))] * 1000, 1)


def summarize(records: list, swaps: list, seconds: float) -> dict:
    failures = [r for r in records if r[3] != "ok"]
    windows = [(asked - 2.0, done + 5.0) for asked, done, _ in swaps]

    def near(t: float) -> bool:
        return any(start <= t <= end for start, end in windows)

    around = []
    for asked, done, new in swaps:
        mine = [r for r in records if r[3] == "ok" and asked - 2.0 <= r[1] <= done + 5.0]
        around.append({"asked_at_s": round(asked, 2), "took_s": round(done - asked, 2), "versions": new,
                       "requests": len(mine), "p99_ms": _p99([a - s for s, a, *_ in mine]),
                       "p99_ms_by_kind": {k: _p99([a - s for s, a, kk, *_ in mine if kk == k])
                                          for k in ("sentiment", "stream")}})
    away = [r for r in records if r[3] == "ok" and not near(r[1])]
    timeline: dict[int, dict[str, int]] = {}
    for _, answered, kind, outcome, version in records:
        if version is not None:
            slot = timeline.setdefault(int(answered), {})
            key = f"{kind}:{version}"
            slot[key] = slot.get(key, 0) + 1
    outcomes: dict[str, int] = {}
    for record in records:
        outcomes[record[3]] = outcomes.get(record[3], 0) + 1
    return {"requests": len(records), "requests_per_s": round(len(records) / seconds, 1),
            "failed": len(failures), "outcomes": outcomes, "swaps": around,
            "p99_ms_away_from_swaps": _p99([a - s for s, a, *_ in away]),
            "p99_ms_away_by_kind": {k: _p99([a - s for s, a, kk, *_ in away if kk == k])
                                    for k in ("sentiment", "stream")},
            "versions_per_second": {str(second): counts for second, counts in sorted(timeline.items())},
            "failures": [[round(s, 3), round(a, 3), k, o] for s, a, k, o, _ in failures]}


def benchmark(*, clients: int, seconds: float, every: float, timeout: float = 60.0,
              scratch: Path | None = None) -> dict:
    reviews = imdb_reviews(256)
    with tempfile.TemporaryDirectory(prefix="swap-") as temporary:
        root = Path(scratch or temporary)
        serving, versions = make_versions(root)
        started = time.monotonic()
        with LocalService(serving, env=repo_env(), log=root / "serve.log") as service:
            print(f"service up in {time.monotonic() - started:.0f} s; {clients} clients for {seconds:g} s, a swap "
                  f"every {every:g} s", flush=True)
            records, swaps = run_load(service.url, service.ray_address, versions, clients=clients,
                                      seconds=seconds, every=every, timeout=timeout, reviews=reviews)
    report = summarize(records, swaps, seconds)
    report["setup"] = {"clients": clients, "seconds": seconds, "every_s": every, "timeout_s": timeout,
                       "load_average": os.getloadavg(), "cpus": os.cpu_count(),
                       "service": "rnnlab serve (direct ingress, default limits)",
                       "models": "imdb (sentiment) and wp (charlm), chapter-sized, random weights, two seeds each"}
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--swapper"]:
        return swapper_main(json.loads(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between swaps")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    report = benchmark(clients=args.clients, seconds=args.seconds, every=args.every, timeout=args.timeout)
    print(f"\n{report['requests']} requests ({report['requests_per_s']}/s), {report['failed']} failed "
          f"{report['outcomes']}")
    print(f"p99 away from swaps: {report['p99_ms_away_from_swaps']} ms {report['p99_ms_away_by_kind']}")
    for swap in report["swaps"]:
        print(f"swap at {swap['asked_at_s']} s, done in {swap['took_s']} s -> {swap['versions']}: p99 around it "
              f"{swap['p99_ms']} ms {swap['p99_ms_by_kind']} ({swap['requests']} requests)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
