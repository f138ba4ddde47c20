"""kill -9 a training run inside its training steps, resume it, and check it ends with the uninterrupted run's weights.

    python -m benchmarks.kill_resume --kills 20 --json benchmarks/results/kill_resume.json
    python -m benchmarks.kill_resume --kills 5 --job charlm --source my.txt --set train.max_steps=40

1. One uninterrupted run (``rnnlab.launch.train JOB --preset smoke``, every step logged): its bundle weights are
   the reference and its metrics.jsonl gives the number of training steps N.
2. ``--kills`` times: a fresh run (``--resume auto``, the same command line as every restart) is sent SIGKILL
   as soon as its metrics.jsonl records training step k, drawn uniformly from 1..N-1 (each line is written and
   closed as the step ends, so the file is the run's own clock): between two steps, or in the validation and
   checkpoint write that follow a step. A kill timed by the wall clock instead landed, on the 2-core CPU where
   imports and the bundle export take most of a 26 s smoke run, in none of 20 training steps.
   Each run records the last training step it wrote before the kill and whether the kill landed inside
   training (1 <= that step < N, and no ``test`` record yet).
3. Then ``--resume auto`` to the end. Every run must exit 0 or be killed (no traceback), the bundle must hold
   the reference's weights bit for bit, and metrics.jsonl must be whole JSON lines.

The same function, with a few kills, is a test (tests/test_faults.py); the 20-kill figure goes in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class KillLoop:
    kills: int
    reference_s: float
    steps: int  # training steps of the uninterrupted run
    runs: list[dict] = field(default_factory=list)  # per kill: target step, killed?, in training?, identical?

    @property
    def identical(self) -> int:
        return sum(run["identical"] and run["metrics_lines_ok"] and not run["errors"] for run in self.runs)

    @property
    def in_training(self) -> int:
        return sum(run["in_training"] for run in self.runs)


def train_command(job: str, output: Path, extra: list[str], resume: bool) -> list[str]:
    return [sys.executable, "-m", "rnnlab.launch.train", job, "--preset", "smoke", "--output", str(output), *extra,
            *(["--resume", "auto"] if resume else [])]


def run_to_end(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def bundle_weights(output: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(output / "bundle" / "model.safetensors"))


def _events(output: Path) -> list[dict] | None:
    """metrics.jsonl as records; None when a line is not whole JSON."""
    path = output / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    except json.JSONDecodeError:
        return None


def _whole_lines(path: Path) -> list[dict]:
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


def _train_steps(events: list[dict]) -> int:
    return max((r["step"] for r in events if r.get("event") == "train"), default=0)


def kill_at_step(process: subprocess.Popen, metrics: Path, step: int, timeout: float) -> bool:
    """SIGKILL ``process`` as soon as ``metrics`` records training step >= ``step`` (polled every millisecond);
    False if the process ended first or ``timeout`` seconds passed (then it is killed anyway, and says so)."""
    deadline, offset, pending = time.monotonic() + timeout, 0, b""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with open(metrics, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in filter(None, lines):
            record = json.loads(line)
            if record.get("event") == "train" and record["step"] >= step:
                process.send_signal(signal.SIGKILL)
                return True
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    return False


def _last_line(text: str, fallback: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else fallback


def kill_loop(work: Path, *, job: str = "stock", extra: list[str] = (), kills: int = 20, seed: int = 0,
              steps: list[int] | None = None) -> KillLoop:
    """The loop of the module docstring in ``work``; ``steps`` (training steps to kill at) replaces the draw."""
    import shutil

    import torch

    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    extra = [*extra, "--set", "train.log_every=1"]  # every step a line in metrics.jsonl: the kill's clock
    reference = work / "straight"
    started = time.perf_counter()
    done = run_to_end(train_command(job, reference, extra, resume=False), env)
    reference_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {_last_line(done.stderr, 'no output')}")
    straight = bundle_weights(reference)
    total = _train_steps(_events(reference) or [])
    if total < 2:
        raise RuntimeError(f"the uninterrupted run recorded {total} training steps; a kill needs at least 2")
    report = KillLoop(kills=kills, reference_s=round(reference_s, 2), steps=total)
    for index in range(kills):
        target = steps[index] if steps else rng.randint(1, total - 1)
        output = work / f"run-{index:02d}"
        run = {"target_step": target, "killed": False, "errors": []}
        process = subprocess.Popen(train_command(job, output, extra, resume=True), env=env, cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        run["killed"] = kill_at_step(process, output / "metrics.jsonl", target, timeout=10 * reference_s + 60)
        _, err = process.communicate()
        if process.returncode not in (0, -signal.SIGKILL):
            run["errors"].append(_last_line(err, f"exit {process.returncode}"))
        before = _whole_lines(output / "metrics.jsonl")  # the kill may have cut the line after
        run["steps_before_kill"] = _train_steps(before)
        run["in_training"] = (run["killed"] and 1 <= run["steps_before_kill"] < total
                              and not any(r.get("event") == "test" for r in before))
        final = run_to_end(train_command(job, output, extra, resume=True), env)
        if final.returncode != 0:
            run["errors"].append(_last_line(final.stderr, "the resumed run failed"))
        events = _events(output)
        run["metrics_lines_ok"] = events is not None
        starts = [r for r in events or [] if r.get("event") == "config"]
        run["resumed_from"] = starts[-1].get("resumed_from", "") if starts else ""
        run["identical"] = False
        if final.returncode == 0:
            resumed = bundle_weights(output)
            run["identical"] = straight.keys() == resumed.keys() and all(
                torch.equal(straight[name], resumed[name]) for name in straight)
        report.runs.append(run)
        print(json.dumps({"run": index, **run}), flush=True)
        if run["identical"] and not run["errors"]:
            shutil.rmtree(output, ignore_errors=True)  # keep only the folders of runs that went wrong
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--job", default="stock")
    parser.add_argument("--source", help="data file (default: the job's data set, from the mirror or cache)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training steps to kill at")
    parser.add_argument("--work", default="runs/kill-resume", help="scratch folder (emptied first)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    import shutil

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    extra = [*(["--source", args.source] if args.source else []),
             *[item for override in args.overrides for item in ("--set", override)]]
    started = time.perf_counter()
    report = kill_loop(work, job=args.job, extra=extra, kills=args.kills, seed=args.seed)
    result = {"job": args.job, "preset": "smoke", "identical": report.identical, "in_training": report.in_training,
              **asdict(report), "wall_s": round(time.perf_counter() - started, 1)}
    print(f"{report.identical} of {report.kills} killed-and-resumed runs ended with the uninterrupted run's "
          f"weights; {report.in_training} of the {report.kills} kills landed inside training "
          f"(after one of its {report.steps} steps, before the last)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if report.identical == report.in_training == report.kills else 1


if __name__ == "__main__":
    sys.exit(main())
