"""The chapter's cells compared on every job: LSTM, GRU and plain RNN at the same hidden size, and the GRU at the
LSTM's parameter count (plus the LSTM with its forget-gate bias at 1, where asked).

Each variant is one real ``rnnlab train JOB --preset P --set ...`` run (the same loop, data and evaluation as any
training), one process at a time, ``OMP_NUM_THREADS=1``; the figures come from its ``metrics.jsonl``:

* parameters: counted in the bundle's weights;
* throughput, twice: (a) the training units (characters for charlm, tokens otherwise) per second that the loop
  logged, the median over its ``train`` events -- but each run meets another load on a shared box -- and (b) the
  headline, ``throughput_interleaved``: the variants' models trained in ONE process on the same batches, one
  optimizer step each in turn (``interleaved_throughput``), so that the load falls on all alike;
* wall time to the best validation figure: from the run's ``config`` event (data loaded, model built) to the
  ``val`` event at the best step;
* validation figure at the best step and the test figure of that checkpoint, beside the job's baseline.

Budgets (the 2-core box is shared; meant to take about an hour, it took ~100 min of wall time at a load average
of 12-27, with sentiment and lm run in a second process beside charlm and their JSON merged):

* stock: the ``default`` preset to early stopping (patience 10 validations, once an epoch);
* charlm: the ``demo`` preset (one layer of 256, embedding 32, batch 64 x 64 characters, Adam 0.008 cosine) for
  a fixed ``--charlm-steps`` (150) steps, validated every third on the first 100,000 validation characters (the
  preset's), tested on the FULL test part (as the n-gram figure);
* lm: the ``default`` preset (embedding 128, one layer of 256, adaptive softmax, batch 64 x 64 tokens) for
  ``--lm-steps`` (120) steps, validated every third on the first 20,000 held-out tokens, tested on the first
  50,000 test tokens;
* sentiment: a reduced recipe to early stopping, set out in ``SENTIMENT_REDUCED`` below: 5,000 training reviews
  cut to their last 150 tokens, a 10,000-word vocabulary, one direction of 64 units read to the LAST state (the
  chapter's pooling: everything the classifier knows must cross the review through the recurrence), AdamW 0.005,
  3 epochs at most, validated every half epoch (39 steps) with patience 3, on 1,000 validation and 5,000 test
  reviews.

Baselines: stock -- persistence "close = same day's open" on the same days (the job reports it); charlm -- the
interpolated Witten-Bell n-gram of benchmarks/results/baselines.json (best order on validation); sentiment --
TF-IDF + logistic regression from the same file (trained on all 25,000 reviews, full test set: a stronger setting
than the reduced recipe's); lm -- a unigram model of the training stream (add-one), computed here.

    OMP_NUM_THREADS=1 python -m benchmarks.cells --json benchmarks/results/cells.json           # ~1 h, 2-core CPU
    OMP_NUM_THREADS=1 python -m benchmarks.cells --jobs stock --variants lstm gru --json /tmp/x.json   # a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import machine_description

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

COMMON = ["tracking.wandb=false", "train.progress=false"]
STOCK = {"preset": "default", "sets": []}
CHARLM = {"preset": "demo", "sets": ["data.limit_test=0"]}
LM = {"preset": "default", "sets": ["data.limit_val=20000", "data.limit_test=50000", "train.warmup_steps=20"]}
SENTIMENT_REDUCED = {
    "preset": "chapter",
    "sets": [
        "data.max_vocab=10000", "data.max_length=150", "data.limit_train=5000", "data.limit_val=1000",
        "data.limit_test=5000",
        "model.embed_dim=32", "model.hidden_size=64", "model.num_layers=1", "model.bidirectional=false",
        "model.fc_size=32", "model.pooling=last",
        "train.optimizer=adamw", "train.lr=0.005", "train.batch_size=64", "train.epochs=3", "train.grad_clip=1.0",
        "train.eval_every=39", "train.early_stopping_patience=3", "train.monitor=accuracy",
    ],
}
UNITS = {"stock": "tokens", "charlm": "characters", "lm": "tokens", "sentiment": "tokens"}
# the figure each job is judged by on validation and test, and whether lower is better
FIGURE = {"stock": ("mae", True), "charlm": ("loss", True), "lm": ("perplexity", True),
          "sentiment": ("accuracy", False)}


def recipe(job: str, args) -> dict:
    if job == "stock":
        return STOCK
    if job == "charlm":
        every = max(1, args.charlm_steps // 3)
        return {**CHARLM, "sets": CHARLM["sets"] + [f"train.max_steps={args.charlm_steps}", f"train.eval_every={every}"]}
    if job == "lm":
        every = max(1, args.lm_steps // 3)
        return {**LM, "sets": LM["sets"] + [f"train.max_steps={args.lm_steps}", f"train.eval_every={every}"]}
    return SENTIMENT_REDUCED


def run_train(job: str, preset: str, sets: list[str], output: Path, log) -> dict:
    """One ``rnnlab train`` run; returns its figures from metrics.jsonl and the bundle."""
    shutil.rmtree(output, ignore_errors=True)  # a fresh run each time (rnnlab train refuses to mix two)
    command = [sys.executable, "-m", "rnnlab.launch.cli", "train", job, "--preset", preset, "--output", str(output)]
    for item in [*COMMON, *sets]:
        command += ["--set", item]
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    started = time.perf_counter()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    if done.returncode:
        return {"error": f"rnnlab train exited with {done.returncode}", "command": command[2:]}
    events = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = next(e for e in events if e["event"] == "config")
    summary = next(e for e in events if e["event"] == "summary")
    vals = [e for e in events if e["event"] == "val"]
    best = next((e for e in vals if e["step"] == summary["best_step"]), vals[-1] if vals else None)
    rates = [e["tokens_per_s"] for e in events if e["event"] == "train" and "tokens_per_s" in e]
    from safetensors import safe_open

    with safe_open(str(output / "bundle" / "model.safetensors"), framework="pt") as weights:
        parameters = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    bundle_config = json.loads((output / "bundle" / "config.json").read_text())
    return {
        "command": "rnnlab " + " ".join(command[3:]),
        "model": bundle_config["model"],
        "parameters": parameters,
        "units_per_s": statistics.median(rates) if rates else None,
        "steps": summary.get("steps"),
        "best_step": summary.get("best_step"),
        "stopped_early": summary.get("stopped_early"),
        "s_to_best_val": (best["time"] - config["time"]) if best else None,
        "train_s": max(e["time"] for e in events if e["event"] in ("train", "val")) - config["time"],
        "process_s": wall,
        "val": summary.get("val"),
        "test": summary.get("test"),
        "val_curve": [{k: e.get(k) for k in ("step", "loss", "accuracy", "mae", "perplexity", "bpc")} for e in vals],
    }


def interleaved_throughput(job: str, spec: dict, models: dict[str, dict], seconds: float) -> dict:
    """Training units per second of each variant's model, measured together: one job's data, and every batch
    trained on by every model in turn (the order rotating), one optimizer step each, so that the load of a shared
    machine falls on all alike. Counts ``seconds`` of each model's own step time (plus one untimed warm-up step).
    The loss and optimizer are the job's loss and a plain Adam step (what ``rnnlab train`` does per step, less
    Accelerate's bookkeeping)."""
    import torch

    from rnnlab.config import load_config
    from rnnlab.models import build_model
    from rnnlab.trainers.job import make_job

    config = load_config(job, spec["preset"], overrides=[*COMMON, *spec["sets"]])
    runner = make_job(config)
    runner.load_data()
    torch.manual_seed(0)
    nets = {name: build_model(job, model).train() for name, model in models.items()}
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-3) for name, net in nets.items()}
    times = {name: 0.0 for name in nets}
    units = {name: 0 for name in nets}
    steps = {name: -1 for name in nets}  # the first step of each is a warm-up, not timed
    epoch, names = 0, list(nets)
    while min(times.values()) < seconds:
        runner.start_epoch(epoch, 0)
        for batch in runner.batches(epoch, 0):
            for name in names:
                if hasattr(runner, "carry"):
                    runner.carry = None  # a carried state belongs to one model; its cost is the same without it
                started = time.perf_counter()
                optimizers[name].zero_grad(set_to_none=True)
                loss = runner.loss_sum(nets[name], batch) / batch.global_units
                loss.backward()
                optimizers[name].step()
                if steps[name] >= 0:
                    times[name] += time.perf_counter() - started
                    units[name] += batch.tokens
                steps[name] += 1
            names = names[1:] + names[:1]
            if min(times.values()) >= seconds:
                break
        epoch += 1
    return {name: {"units_per_s": units[name] / times[name], "steps": steps[name], "seconds": times[name]}
            for name in nets}


def matched_hidden(job: str, model: dict, cell: str) -> int:
    """The hidden size at which ``cell`` has the parameter count closest to ``model``'s (an LSTM's)."""
    from rnnlab.models import build_model

    def count(config: dict) -> int:
        return sum(p.numel() for p in build_model(job, config).parameters())

    target = count(model)
    best = None
    for hidden in range(1, 2 * model["hidden_size"] + 1):
        n = count({**model, "cell": cell, "forget_bias": None, "hidden_size": hidden})
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (hidden, n)
    return best[0]


def baseline(job: str, output: Path) -> dict:
    """The job's reference figure on validation and test (see the module docstring)."""
    if job in ("charlm", "sentiment"):
        data = json.loads((RESULTS / "baselines.json").read_text())
        if job == "charlm":
            order = min(data["charlm"]["orders"], key=lambda o: o["val_nats"])
            return {"name": f"{data['charlm']['model']}, order {order['order']}",
                    "val": {"loss": order["val_nats"]}, "test": {"loss": order["test_nats"]}}
        lr = data["sentiment"]["tfidf_lr"]
        return {"name": lr["model"] + " (all 25,000 training reviews, full test set)",
                "val": None, "test": {"accuracy": lr["test_accuracy"]}}
    if job == "stock":
        return {"name": "persistence: close = the same day's open", "note": "the job's own baseline_same_day_open_*"}
    return {"name": "unigram (add-one) of the training stream", **unigram_lm(output)}


def unigram_lm(output: Path) -> dict:
    """Perplexity of an add-one unigram model of the LM's training stream on the same validation/test tokens."""
    import numpy as np

    from rnnlab.config import load_config
    from rnnlab.trainers.job import make_job

    spec = recipe("lm", argparse.Namespace(lm_steps=1))
    config = load_config("lm", spec["preset"], overrides=[*COMMON, *spec["sets"]])
    job = make_job(config)
    job.load_data()
    counts = np.bincount(job.streams["train"], minlength=len(job.vocab)).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    figures = {}
    for split in ("val", "test"):
        stream = job.streams[split][1:]  # the targets: every token but the first
        figures[split] = {"perplexity": float(np.exp(-logp[stream].mean()))}
    return figures


def measure_throughput(result: dict, job: str, args) -> None:
    entry = result["jobs"].get(job, {})
    models = {name: v["model"] for name, v in entry.get("variants", {}).items()
              if "model" in v and name != "lstm_fb1"}  # the forget bias costs nothing per step
    if not models:
        return
    print(f"{time.strftime('%H:%M:%S')} {job}: interleaved throughput of {', '.join(models)} ...", flush=True)
    try:
        measured = interleaved_throughput(job, recipe(job, args), models, args.throughput_seconds)
    except Exception as error:  # noqa: BLE001 -- keep the training figures
        print(f"{job}: throughput failed: {type(error).__name__}: {error}", flush=True)
        return
    entry["throughput_interleaved"] = measured
    print(f"{time.strftime('%H:%M:%S')} {job}: " + ", ".join(f"{n} {m['units_per_s']:.0f}/s" for n, m in
                                                               measured.items()), flush=True)


NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN", "gru_matched": "GRU, LSTM's parameters",
         "lstm_fb1": "LSTM, forget bias 1"}
SHOWN = {"stock": ("MAE (USD)", 1.0, "{:.1f}"), "charlm": ("nats/char", 1.0, "{:.3f}"),
         "lm": ("perplexity", 1.0, "{:.0f}"), "sentiment": ("accuracy %", 100.0, "{:.2f}")}


def table(result: dict) -> str:
    """The results as a Markdown table (the README's)."""
    rows = ["| job | cell | hidden | parameters | units/s, interleaved (in its run) | s to best val | val | test | "
            "baseline val / test |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for job in ("stock", "charlm", "sentiment", "lm"):
        entry = result.get("jobs", {}).get(job)
        if not entry:
            continue
        figure, scale, fmt = SHOWN[job]
        key = entry["figure"]

        def show(figures, split):
            value = (figures or {}).get(split) or {}
            value = value.get(key)
            return fmt.format(value * scale) if isinstance(value, (int, float)) else "-"

        base = entry.get("baseline", {})
        if job == "stock":
            v = entry["variants"].get("lstm", {})
            base_text = (f"persistence {fmt.format(v['val']['baseline_same_day_open_mae'])} / "
                         f"{fmt.format(v['test']['baseline_same_day_open_mae'])}") if v.get("val") else "-"
        else:
            short = {"charlm": "Witten-Bell n-gram", "sentiment": "TF-IDF + LR (all 25,000 reviews)",
                     "lm": "unigram"}[job]
            if job == "charlm" and "order" in base.get("name", ""):
                short = f"Witten-Bell {base['name'].rsplit('order ', 1)[1]}-gram"
            base_text = f"{short} {show(base, 'val')} / {show(base, 'test')}"
        interleaved = entry.get("throughput_interleaved", {})
        for name, v in entry["variants"].items():
            if "error" in v:
                rows.append(f"| {job} | {NAMES[name]} | | | | | failed: {v['error']} | | |")
                continue
            rate = interleaved.get(name, {}).get("units_per_s")
            rate_text = (f"{rate:,.0f} ({v['units_per_s']:,.0f})" if rate else f"({v['units_per_s']:,.0f})")
            rows.append(f"| {job} ({figure}) | {NAMES[name]} | {v['model']['hidden_size']} | {v['parameters']:,} | "
                        f"{rate_text} | {v['s_to_best_val']:.0f} | {show(v, 'val')} | {show(v, 'test')} | "
                        f"{base_text} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=["stock", "charlm", "sentiment", "lm"])
    parser.add_argument("--variants", nargs="+", default=["lstm", "gru", "rnn", "gru_matched", "lstm_fb1"],
                        help="lstm, gru, rnn (same hidden size), gru_matched (the LSTM's parameter count), "
                             "lstm_fb1 (forget bias 1)")
    parser.add_argument("--fb-jobs", nargs="+", default=["stock", "charlm"],
                        help="the jobs on which lstm_fb1 runs (it decides the forget_bias default)")
    parser.add_argument("--charlm-steps", type=int, default=150)
    parser.add_argument("--lm-steps", type=int, default=120)
    parser.add_argument("--throughput-only", action="store_true",
                        help="measure only the interleaved throughput of the variants already in --json")
    parser.add_argument("--throughput-seconds", type=float, default=20.0,
                        help="timed seconds per model in the interleaved throughput measurement (0: none)")
    parser.add_argument("--runs", default="/tmp/rnnlab-cells", help="where the runs' folders go")
    parser.add_argument("--json", default=str(RESULTS / "cells.json"))
    parser.add_argument("--table", action="store_true", help="print --json as the README's Markdown table")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.json).read_text())))
        return

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    path = Path(args.json)
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result.update({"machine": machine_description(), "threads": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "charlm_steps": args.charlm_steps, "lm_steps": args.lm_steps,
                   "sentiment_reduced": SENTIMENT_REDUCED})
    result.setdefault("jobs", {})
    log = open(runs / "train.log", "a", encoding="utf-8")  # noqa: SIM115 -- open for the whole benchmark
    if args.throughput_only:
        for job in args.jobs:
            measure_throughput(result, job, args)
            path.write_text(json.dumps(result, indent=1) + "\n")
        return
    for job in args.jobs:
        spec = recipe(job, args)
        entry = result["jobs"].setdefault(job, {})
        entry.update({"preset": spec["preset"], "sets": spec["sets"], "unit": UNITS[job],
                      "figure": FIGURE[job][0], "lower_is_better": FIGURE[job][1]})
        entry.setdefault("variants", {})
        for variant in args.variants:
            if variant == "lstm_fb1" and job not in args.fb_jobs:
                continue
            sets = list(spec["sets"])
            if variant in ("lstm", "gru", "rnn"):
                sets.append(f"model.cell={variant}")
            elif variant == "lstm_fb1":
                sets += ["model.cell=lstm", "model.forget_bias=1.0"]
            elif variant == "gru_matched":
                lstm = entry["variants"].get("lstm")
                if not lstm or "model" not in lstm:
                    print(f"{job}: gru_matched needs the lstm variant first", flush=True)
                    continue
                hidden = matched_hidden(job, lstm["model"], "gru")
                sets += ["model.cell=gru", f"model.hidden_size={hidden}"]
            print(f"{time.strftime('%H:%M:%S')} {job} {variant} ...", flush=True)
            figures = run_train(job, spec["preset"], sets, runs / f"{job}-{variant}", log)
            entry["variants"][variant] = figures
            name, _ = FIGURE[job]
            print(f"{time.strftime('%H:%M:%S')} {job} {variant}: params {figures.get('parameters')}, "
                  f"{figures.get('units_per_s') or 0:.0f} {UNITS[job]}/s, "
                  f"best val {((figures.get('val') or {}).get(name))}, test {((figures.get('test') or {}).get(name))}, "
                  f"{figures.get('s_to_best_val') or 0:.0f} s to best; {figures.get('error', '')}", flush=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
        if args.throughput_seconds:
            measure_throughput(result, job, args)
        if "baseline" not in entry:
            try:
                entry["baseline"] = baseline(job, runs)
            except Exception as error:  # noqa: BLE001 -- a missing baseline must not lose the runs
                entry["baseline"] = {"error": f"{type(error).__name__}: {error}"}
        path.write_text(json.dumps(result, indent=1) + "\n")
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
