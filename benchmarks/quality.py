"""Quality of rnnlab's presets beside the simple baselines: runs ``rnnlab train`` and tabulates test metrics.

For each requested ``JOB:PRESET`` it runs ``rnnlab train JOB --preset PRESET --output OUT/JOB-PRESET`` in a
subprocess (the product exactly as a user runs it), times it, and reads ``bundle/metrics.json`` and
``metrics.jsonl`` (throughput). The table puts each figure beside its baseline:

* sentiment test accuracy  vs TF-IDF + logistic regression and NBSVM-bi (benchmarks/baselines.py) and the
  chapter's 86.1 %;
* charlm val/test nats/char vs the Witten-Bell character n-gram (benchmarks/baselines.py);
* stock test R^2 / MAE     vs persistence (close = same-day open, close = previous close).

Baseline figures come from ``--baselines results/baselines.json`` (written by ``baselines.py --json``) when
given; otherwise the reference figures measured on the mirror (benchmarks/README.md) are shown.

Full presets take hours on a 2-core CPU (charlm ``chapter`` is 10,000 steps of 64 x 40 characters; sentiment
``chapter`` is 10 epochs). ``--set JOB:KEY=VALUE`` changes a run (shorter, a variant); the table names the keys a run changed (keys that only
change logging, ``tracking.*`` and ``train.progress``, are not counted).

    python -m benchmarks.quality stock:chapter stock:default
    python -m benchmarks.quality sentiment:chapter --set sentiment:train.epochs=2 --json results/quality.json
    python -m benchmarks.quality --collect-only sentiment:default     # tabulate a finished run again
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import machine_description, write_json

from rnnlab.registry import JOBS, presets

# Measured with baselines.py on the mirror (see benchmarks/README.md); used when --baselines is not given.
REFERENCE_BASELINES: dict[str, Any] = {
    "sentiment": {"TF-IDF + LR test accuracy": 0.9085, "chapter's LSTM (reported) test accuracy": 0.861},
    "charlm": {"Witten-Bell 6-gram val nats": 1.2814, "Witten-Bell 6-gram test nats": 1.3601},
    "stock": {"close = same-day open": {"r2": 0.9772, "mae": 97.57},
              "close = previous close": {"r2": 0.9681, "mae": 117.42},
              "linear regression": {"r2": 0.9747, "mae": 103.42}},
}


def baselines_from(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return REFERENCE_BASELINES
    raw = json.loads(path.read_text())
    out = json.loads(json.dumps(REFERENCE_BASELINES))
    if "sentiment" in raw:
        out["sentiment"]["TF-IDF + LR test accuracy"] = raw["sentiment"]["tfidf_lr"]["test_accuracy"]
        out["sentiment"]["NBSVM-bi test accuracy"] = raw["sentiment"]["nbsvm_bi"]["test_accuracy"]
    if "charlm" in raw:
        best = min(raw["charlm"]["orders"], key=lambda r: r["val_nats"])  # the order chosen on validation
        out["charlm"] = {f"Witten-Bell {best['order']}-gram val nats": best["val_nats"],
                         f"Witten-Bell {best['order']}-gram test nats": best["test_nats"]}
    if "stock" in raw:
        test = raw["stock"]["metrics"]["test"]
        out["stock"] = {"close = same-day open": test["close = same-day open"],
                        "close = previous close": test["close = previous close"],
                        "linear regression": test["linear regression (37 scaled features)"]}
    return out


def run_training(job: str, preset: str, output: Path, sets: list[str], mirror: str | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "rnnlab.launch.cli"]
    if mirror:
        command += ["--data-mirror", mirror]
    command += ["train", job, "--preset", preset, "--output", str(output)]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
           "WANDB_SILENT": os.environ.get("WANDB_SILENT", "true")}
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, env=env)
    return {"returncode": completed.returncode, "wall_s": time.perf_counter() - start, "command": command}


def collect(output: Path) -> dict[str, Any]:
    """Final metrics from the bundle, and mean training throughput from metrics.jsonl."""
    metrics_path = output / "bundle" / "metrics.json"
    if not metrics_path.exists():
        return {"error": f"no {metrics_path}"}
    metrics = json.loads(metrics_path.read_text())
    rates: dict[str, list[float]] = {"samples_per_s": [], "tokens_per_s": []}
    config: dict[str, Any] = {}
    stamps: list[float] = []
    jsonl = output / "metrics.jsonl"
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            event = json.loads(line)
            if "time" in event:
                stamps.append(float(event["time"]))
            if event.get("event") == "train":
                for key in rates:
                    if key in event:
                        rates[key].append(float(event[key]))
            elif event.get("event") == "config":
                config = event.get("config", {})
    throughput = {key: sum(v) / len(v) for key, v in rates.items() if v}
    return {"val": metrics.get("val", {}), "test": metrics.get("test", {}), "steps": metrics.get("steps"),
            "best_step": metrics.get("best_step"), "stopped_early": metrics.get("stopped_early"),
            "throughput": throughput, "train_config": config.get("train", {}),
            # from the first to the last logged event: training + evaluation, without process start-up
            "logged_s": (max(stamps) - min(stamps)) if stamps else None}


# --set keys that change what is logged or shown, not what is trained: a run with only these is the preset itself.
COSMETIC_SETS = ("tracking.", "train.progress=", "train.log_every=")


def changed_sets(sets: list[str]) -> list[str]:
    return [item for item in sets if not item.startswith(COSMETIC_SETS)]


def row_text(job: str, preset: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"  {job}:{preset:<8} {result['error']}"
    changed = changed_sets(result.get("sets", []))
    tag = f" (with {' '.join(changed)})" if changed else ""
    wall = f"{result['wall_s']:.0f} s" if result.get("wall_s") is not None else "n/a"
    if result.get("logged_s") is not None:
        wall += f" (logged {result['logged_s']:.0f} s)"
    val, test = result["val"], result["test"]
    if job == "sentiment":
        figures = (f"test accuracy {100 * test.get('accuracy', float('nan')):.2f} %, "
                   f"ROC-AUC {test.get('roc_auc', float('nan')):.4f}")
    elif job == "charlm":
        figures = f"val {val.get('nats', val.get('loss', float('nan'))):.4f} nats/char, " \
                  f"test {test.get('nats', test.get('loss', float('nan'))):.4f}"
    else:
        figures = f"test R^2 {test.get('r2', float('nan')):.4f}, MAE {test.get('mae', float('nan')):.2f}"
    tput = ", ".join(f"{k} {v:,.0f}" for k, v in result.get("throughput", {}).items())
    return f"  {job}:{preset:<8}{tag} {figures}; {result.get('steps')} steps, wall {wall}; {tput}"


def print_table(report: dict[str, Any]) -> None:
    print(f"\nmachine: {report['machine']}")
    by_job: dict[str, list[str]] = {}
    for key, result in report["runs"].items():
        job, preset = key.split(":")
        by_job.setdefault(job, []).append(row_text(job, preset, result))
    for job, rows in by_job.items():
        print(f"\n{job}")
        for row in rows:
            print(row)
        base = report["baselines"].get(job, {})
        for name, value in base.items():
            if isinstance(value, dict):
                print(f"  baseline {name:<38} test R^2 {value['r2']:.4f}, MAE {value['mae']:.2f}")
            elif "accuracy" in name:
                print(f"  baseline {name:<38} {100 * value:.2f} %")
            else:
                print(f"  baseline {name:<38} {value:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="JOB:PRESET", help="e.g. sentiment:chapter charlm:default")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="JOB:KEY=VALUE",
                        help="extra --set for one job's runs, e.g. charlm:train.max_steps=500 (repeatable)")
    parser.add_argument("--output", type=Path, default=Path("runs/quality"), help="one sub-folder per run")
    parser.add_argument("--collect-only", action="store_true", help="do not train; tabulate existing runs")
    parser.add_argument("--baselines", type=Path, default=None, help="JSON written by baselines.py --json")
    parser.add_argument("--data-mirror", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"machine": machine_description(), "baselines": baselines_from(args.baselines),
                              "runs": {}}
    for spec in args.runs:
        job, _, preset = spec.partition(":")
        if job not in JOBS or preset not in presets():
            parser.error(f"{spec!r} is not JOB:PRESET (jobs {'/'.join(JOBS)}, presets {'/'.join(presets())})")
        sets = [s.split(":", 1)[1] for s in args.sets if s.startswith(f"{job}:")]
        output = args.output / f"{job}-{preset}"
        run: dict[str, Any] = {"sets": sets, "wall_s": None}
        if not args.collect_only:
            run.update(run_training(job, preset, output, sets, args.data_mirror))
        run.update(collect(output))
        report["runs"][spec] = run
    print_table(report)
    if args.json:
        write_json(args.json, report)
    return 0 if all(r.get("returncode", 0) == 0 and "error" not in r for r in report["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
