"""``make demo``: the whole product in a few minutes on a CPU, with answers that are right.

1. trains the three jobs with their ``demo`` presets (configs/presets/*.yaml: small models sized for a CPU in
   about a minute and a half together) on the real data and prints their test metrics;
2. starts the HTTP service over the three bundles (``rnnlab serve``, a real Ray Serve instance);
3. sends one request of each kind and prints the answers beside what a right answer is: the label expected for
   each example review, the forecast beside the naive ``close = open`` and the actual close, and the share of
   the generated words that are words of War and Peace;
4. stops the service.

Everything goes under ``runs/demo`` (or ``--output``). ``rnnlab train JOB --preset default`` trains the real thing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from rnnlab.registry import served

JOBS = tuple(served())  # the jobs the service answers for (the review LM is a starting point, not served)

PRESET = "demo"  # each job's demo preset: where its size and its measured figures are written down
# (review, the label a right answer gives)
REVIEWS = [
    ("A moving, beautifully acted film; I loved every minute of it.", "positive"),
    ("Dull, predictable and far too long. I want my two hours back.", "negative"),
]
PROMPT = "the emperor"
# Low temperature: a small model sampled at 1.0 spells badly; at 0.5 it keeps to the words it knows best.
TEMPERATURE = 0.5


def train_all(output: Path) -> dict[str, dict]:
    from rnnlab.config import load_config
    from rnnlab.trainers.loop import train

    results = {}
    for job in JOBS:
        print(f"\n== training {job} ({PRESET} preset, real data) ==", flush=True)
        config = load_config(job, PRESET, None, ["tracking.group=demo"])
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


def price_history(rows: int = 300) -> tuple[list[dict], float]:
    """The last ``rows`` days of the index file, the final day reduced to its open (the day to forecast), and
    that day's actual close (kept out of the request, to print beside the forecast)."""
    from rnnlab.data.sources import locate
    from rnnlab.data.stock import read_prices

    prices = read_prices(locate("stock")).tail(rows)
    history = [
        {"date": day.strftime("%Y-%m-%d"), "open": r.Open, "high": r.High, "low": r.Low, "close": r.Close,
         "volume": r.Volume}
        for day, r in zip(prices.index, prices.itertuples())
    ]
    actual_close = float(history[-1]["close"])
    history[-1] = {"date": history[-1]["date"], "open": history[-1]["open"]}
    return history, actual_close


def book_words() -> set[str]:
    """Every word of War and Peace (lowercase runs of letters), to check the generated text against."""
    from rnnlab.data.sources import locate
    from rnnlab.data.text import read_text

    return set(words_of(read_text(locate("text"))))


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def share_of_known_words(text: str, vocabulary: set[str]) -> float:
    """The fraction of the words of ``text`` that are in ``vocabulary`` (0.0 for a text with no words)."""
    words = words_of(text)
    return sum(word in vocabulary for word in words) / len(words) if words else 0.0


def query_all(base: str) -> None:
    print("\n== POST /v1/sentiment ==")
    texts = [text for text, _ in REVIEWS]
    for (text, expected), answer in zip(REVIEWS, post(base, "/v1/sentiment", {"texts": texts})["results"]):
        confidence = answer["probability"] if answer["label"] == "positive" else 1 - answer["probability"]
        verdict = "right" if answer["label"] == expected else f"WRONG (expected {expected})"
        print(f"  {answer['label']} with probability {confidence:.3f} ({verdict})  <- {text!r}")

    print("\n== POST /v1/forecast (the index file's history, forecasting its last day from its open) ==")
    history, actual = price_history()
    answer = post(base, "/v1/forecast", {"rows": history})["forecast"]
    forecast, naive = answer["close"], answer["baseline_open"]
    print(f"  {answer['date']}: forecast close {forecast:,.2f}  |  close = open {naive:,.2f}  |  actual close "
          f"{actual:,.2f}")
    print(f"  error {abs(forecast - actual):,.2f} (close = open: {abs(naive - actual):,.2f}); one day decides little: "
          "the test MAE beside close = open's is in the stock table above")

    print(f"\n== POST /v1/generate (temperature {TEMPERATURE}) ==")
    answer = post(base, "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 200, "temperature": TEMPERATURE,
                                         "seed": 1})
    text = PROMPT + answer["text"]
    print("  " + text.replace("\n", "\n  "))
    share = share_of_known_words(text, book_words())
    print(f"  {share:.0%} of its {len(words_of(text))} words are words of War and Peace")


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
    base = f"http://127.0.0.1:{args.port}"
    service = start_service(output, args.port)
    try:
        wait_until_healthy(base, service)
        query_all(base)
    finally:
        stop_service(service)
    print(f"\n== done in {time.monotonic() - started:.0f} s: the service is stopped; runs and bundles are under "
          f"{output} ==")
    return 0


if __name__ == "__main__":
    sys.exit(main())
