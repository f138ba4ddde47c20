"""``make demo``: the whole product in a few minutes on a CPU.

1. trains the three jobs briefly (``RECIPES``: small presets, few steps) on the real data and prints their metrics;
2. starts the HTTP service over the three bundles (``rnnlab serve``, a real Ray Serve instance);
3. sends one request of each kind and prints the answers;
4. stops the service.

Everything goes under ``runs/demo`` (or ``--output``). The models are tiny, so the answers show the
plumbing, not the quality: ``rnnlab train JOB --preset default`` trains the real thing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# (preset, overrides): small enough for a CPU in a minute or two, large enough to learn something.
RECIPES = {
    "sentiment": ("smoke", ["data.limit_train=4000", "data.limit_val=500", "data.limit_test=1000",
                            "data.max_length=150", "data.max_vocab=10000", "model.embed_dim=32",
                            "model.hidden_size=32", "train.epochs=2"]),
    "stock": ("default", ["train.epochs=5", "train.progress=false"]),
    "charlm": ("smoke", ["train.max_steps=300", "train.eval_every=100"]),
}
REVIEWS = [
    "A moving, beautifully acted film; I loved every minute of it.",
    "Dull, predictable and far too long. I want my two hours back.",
]


def train_all(output: Path) -> dict[str, dict]:
    from rnnlab.trainers.config import load_config
    from rnnlab.trainers.loop import train

    results = {}
    for job, (preset, overrides) in RECIPES.items():
        print(f"\n== training {job} ({preset} preset {' '.join(overrides)}, real data) ==", flush=True)
        config = load_config(job, preset, None, [*overrides, "tracking.group=demo"])
        result = train(config, output / job)
        results[job] = {"val": result["val"], "test": result["test"], "bundle": result["bundle"]}
        print(json.dumps({job: results[job]["test"]}, indent=1, default=str), flush=True)
    return results


def start_service(bundles: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "rnnlab.launch.cli", "serve", "--bundles", str(bundles), "--port", str(port)]
    print(f"\n== starting the service: {' '.join(command[2:])} ==", flush=True)
    return subprocess.Popen(command, start_new_session=True)


def stop_service(service: subprocess.Popen) -> None:
    """SIGINT takes the service's own shutdown path (serve.shutdown, ray.shutdown); SIGKILL if that hangs."""
    if service.poll() is not None:
        return
    os.killpg(service.pid, signal.SIGINT)
    try:
        service.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(service.pid, signal.SIGKILL)


def wait_until_healthy(base: str, service: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit(f"demo: the service exited with code {service.returncode} before it was ready.")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise SystemExit(f"demo: the service did not answer {base}/healthz within {timeout_s:.0f} s.")


def post(base: str, path: str, payload: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{path}", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def price_history(rows: int = 300) -> list[dict]:
    """The last ``rows`` days of the DJIA file; the final day keeps only its open (the day to forecast)."""
    from rnnlab.data.sources import locate
    from rnnlab.data.stock import read_prices

    prices = read_prices(locate("stock")).tail(rows)
    history = [
        {"date": day.strftime("%Y-%m-%d"), "open": r.Open, "high": r.High, "low": r.Low, "close": r.Close,
         "volume": r.Volume}
        for day, r in zip(prices.index, prices.itertuples())
    ]
    history[-1] = {"date": history[-1]["date"], "open": history[-1]["open"]}
    return history


def query_all(base: str) -> None:
    print("\n== POST /v1/sentiment ==")
    for text, answer in zip(REVIEWS, post(base, "/v1/sentiment", {"texts": REVIEWS})["results"]):
        print(f"  {answer}  <- {text!r}")
    print("\n== POST /v1/forecast (the index file's history, forecasting its last day from its open) ==")
    print(" ", post(base, "/v1/forecast", {"rows": price_history()}))
    print("\n== POST /v1/generate ==")
    answer = post(base, "/v1/generate", {"prompt": "the emperor", "max_new_tokens": 120, "temperature": 0.8,
                                         "seed": 1})
    print("  the emperor" + answer["text"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnlab.launch.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/demo", help="where runs and bundles go (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    output = Path(args.output)
    train_all(output)
    base = f"http://127.0.0.1:{args.port}"
    service = start_service(output, args.port)
    try:
        wait_until_healthy(base, service)
        query_all(base)
    finally:
        stop_service(service)
    print("\n== done: the service is stopped; runs and bundles are under", output, "==")
    return 0


if __name__ == "__main__":
    sys.exit(main())
