"""``make demo``: the whole product in a few minutes on a CPU, with answers that are right.

1. trains every served job (the registry's) with its ``demo`` preset (configs/presets/*.yaml: small models sized
   for a CPU in about a minute and a half together) on the real data and prints their test metrics;
2. starts the HTTP service over their bundles (``rnnlab serve``, a real Ray Serve instance);
3. sends one request to each job's route and prints the answer beside what a right answer is (each job's
   ``demo``, in its module: the label expected for each example review, the forecast beside the naive
   ``close = open`` and the actual close, the share of the generated words that are words of War and Peace);
4. stops the service.

Everything goes under ``runs/demo`` (or ``--output``). ``rnnlab train JOB --preset default`` trains the real thing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from rnnlab.registry import job as spec_of
from rnnlab.registry import served
from rnnlab.serve.local import LocalService, ServiceFailed

JOBS = tuple(served())  # the jobs the service answers for (the review LM is a starting point, not served)

PRESET = "demo"  # each job's demo preset: where its size and its measured figures are written down


def train_all(output: Path) -> dict[str, dict]:
    from rnnlab.config import load_config
    from rnnlab.launch.train import result_table
    from rnnlab.trainers.loop import train

    results = {}
    for job in JOBS:
        print(f"\n== training {job} ({PRESET} preset, real data) ==", flush=True)
        config = load_config(job, PRESET, None, ["tracking.group=demo"])
        result = train(config, output / job)
        results[job] = {"val": result["val"], "test": result["test"], "bundle": result["bundle"]}
        print(result_table(job, result), flush=True)
    return results


def service_env() -> dict:
    """The service's environment: its own Ray instance keeps Ray's token authentication (its ports listen on the
    machine's address, not only loopback); asked for by name, Ray does not warn that it turned it on by default."""
    return os.environ | {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}


def post(base: str, path: str, payload: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{path}", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def query_all(base: str) -> None:
    """One request to each served job's route, its answer printed beside what a right one is (the job's ``demo``)."""
    for job in JOBS:
        if spec_of(job).demo:
            print(f"\n== POST /v1/{job} ==")
            spec_of(job).load("demo")(lambda body, job=job: post(base, f"/v1/{job}", body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnlab.launch.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/demo", help="where runs and bundles go (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    output = Path(args.output)
    started = time.monotonic()
    train_all(output)
    service = LocalService(output, port=args.port, env=service_env(), echo=True)
    print(f"\n== starting the service: {' '.join(service.command[2:])} ==", flush=True)
    try:
        service.start(timeout_s=180)
        query_all(service.url)
    except ServiceFailed as error:
        raise SystemExit(f"demo: {error}.") from None
    finally:
        service.stop(grace_s=60)  # SIGINT takes the service's own shutdown path; SIGKILL if that hangs
    print(f"\n== done in {time.monotonic() - started:.0f} s: the service is stopped; runs and bundles are under "
          f"{output} ==")
    return 0


if __name__ == "__main__":
    sys.exit(main())
