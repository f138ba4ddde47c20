"""Characters/s of the OpenAI-compatible /v1/completions beside /v1/charlm, same service, same run.

    python -m benchmarks.openai_load --seconds 10 --clients 32 --rounds 2 --json openai_load.json

Starts a local service over chapter-sized random bundles (benchmarks/_harness.py's, or --bundles) and sends the
same generation (prompt, length, temperature, a fresh seed per request) to both routes AT ONCE, half of
``--clients`` on each, for ``--seconds``, plain and then streamed, ``--rounds`` times: on a shared machine whose
load comes and goes, both routes see the same load at the same moment. Their sequences share the decoding batch,
so what differs is the HTTP and handle side: OpenAI's larger JSON per chunk, the request's validation, and the
per-choice bookkeeping in the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import deploy, random_bundles

PROMPT = "the emperor"


def generated_chars(route: str, stream: bool, payload: bytes) -> int:
    """Characters generated in one answer; -1 when a stream did not end properly."""
    text = payload.decode("utf-8")
    if not stream:
        answer = json.loads(text)
        return len(answer["text"]) if route == "charlm" else sum(len(c["text"]) for c in answer["choices"])
    chars, ended = 0, False
    for block in text.split("\n\n"):
        if route == "charlm" and block.startswith("event: done"):
            ended = True
        elif block == "data: [DONE]":
            ended = True
        elif block.startswith("data: "):
            data = json.loads(block[len("data: "):])
            chars += len(data["text"]) if route == "charlm" else sum(len(c["text"]) for c in data["choices"])
    return chars if ended else -1


def body(route: str, stream: bool, tokens: int, seed: int) -> dict:
    if route == "charlm":
        return {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0.8, "seed": seed, "stream": stream}
    return {"model": "charlm", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.8, "seed": seed,
            "stream": stream}


async def phase(base: str, stream: bool, *, clients: int, seconds: float, tokens: int) -> list[dict]:
    """``clients`` concurrent clients for ``seconds``, every other one on each route, all at once: both routes
    under the same load at the same moment, their sequences in the same decoding batch."""
    import aiohttp

    routes = ("charlm", "completions")
    latencies = {route: [] for route in routes}
    errors = {route: [] for route in routes}
    chars = dict.fromkeys(routes, 0)
    deadline = time.perf_counter() + seconds

    async def client(index: int, http) -> None:
        route = routes[index % 2]
        rng = random.Random(index)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                async with http.post(f"{base}/v1/{route}", json=body(route, stream, tokens, rng.randrange(2**31))) \
                        as response:
                    payload = await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                errors[route].append(f"{type(error).__name__}: {error}")
                continue
            got = generated_chars(route, stream, payload) if response.status == 200 else -1
            if got < 0:
                errors[route].append(f"{response.status} {payload[-200:]!r}")
                continue
            chars[route] += got
            latencies[route].append(time.perf_counter() - start)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - began
    results = []
    for route in routes:
        done = sorted(latencies[route])
        pick = (lambda q: done[min(len(done) - 1, int(q * len(done)))] * 1000) if done else (lambda q: float("nan"))
        results.append({"route": f"/v1/{route}", "stream": stream, "clients": clients // 2,
                        "chars_per_s": chars[route] / elapsed, "requests": len(done), "p50_ms": pick(0.5),
                        "p99_ms": pick(0.99), "errors": len(errors[route]),
                        **({"first_error": errors[route][0]} if errors[route] else {})})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", help="bundle folder (default: chapter-sized random bundles)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=100, help="characters per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from rnnlab.serve.local import in_process

    phases = []
    with tempfile.TemporaryDirectory() as scratch, in_process(args.port, direct=True) as base:
        bundles = Path(args.bundles) if args.bundles else random_bundles(Path(scratch))
        deploy(bundles, None, max_streams=args.clients, max_ongoing_requests=2 * args.clients,
               max_queued_requests=2 * args.clients)
        for number in range(1, args.rounds + 1):
            for stream in (False, True):
                for result in asyncio.run(phase(base, stream, clients=args.clients, seconds=args.seconds,
                                                tokens=args.tokens)):
                    phases.append(result | {"round": number})
                    print(f"[round {number}] {result['route']:15s} {'stream' if stream else 'plain ':6s} "
                          f"{result['chars_per_s']:8.0f} chars/s  p50 {result['p50_ms']:7.1f} ms  "
                          f"p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}"
                          + (f" ({result['first_error']})" if result["errors"] else ""), flush=True)
    summary = {}
    for stream in (False, True):
        ratios = [c["chars_per_s"] / g["chars_per_s"] for g, c in zip(
            [p for p in phases if p["route"] == "/v1/charlm" and p["stream"] == stream],
            [p for p in phases if p["route"] == "/v1/completions" and p["stream"] == stream])]
        label = "stream" if stream else "plain"
        summary[label] = {"completions_over_charlm": ratios, "median": statistics.median(ratios)}
        print(f"{label}: /v1/completions at {statistics.median(ratios):.0%} of /v1/charlm's chars/s (median of "
              f"rounds: {', '.join(f'{r:.0%}' for r in ratios)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"phases": phases, "summary": summary, "setup": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
