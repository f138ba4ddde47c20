"""``make demo``: the whole product in a few minutes on a CPU, with answers that are right.

1. trains every served job (the registry's) with its ``demo`` preset (configs/presets/*.yaml: small models sized
   for a CPU in about a minute and a half together) on the real data and prints their test metrics, and adds the
   int8 graph where the job has a quality gate for it and the gate passes (``rnnlab export --int8``);
2. starts the HTTP service over their bundles (``rnnlab serve``, a real Ray Serve instance; on a CPU ONNX Runtime
   runs each model that has a graph) and prints the runtime each model runs on;
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
        add_int8(job, result["bundle"])
    return results


def add_int8(job: str, bundle: str) -> None:
    """The bundle's int8 graph, kept only if the job's quality gate passes (a job without a gate keeps fp32)."""
    from rnnlab.errors import RnnlabError
    from rnnlab.launch.export_cmd import report
    from rnnlab.export import export_bundle
    from rnnlab.runtime import graph_spec

    if graph_spec(job).int8_gate is None:
        return
    try:
        print(report(bundle, export_bundle(bundle, int8=True).graph), flush=True)
    except RnnlabError as error:  # no graph, or one that does not export: the service runs it on torch
        print(f"rnnlab: {bundle} stays without an int8 graph ({error})", flush=True)


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


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=60) as response:
        return json.loads(response.read())


def query_all(base: str) -> None:
    """One request to each served job's route, its answer printed beside what a right one is (the job's ``demo``)."""
    print("\n== GET /v1/models: what runs each model ==")
    for model in get(base, "/v1/models")["data"]:
        print(f"{model['id']} ({model['job']}): {model['runtime']} {model.get('precision', '')} on {model['device']}")
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
