"""Choose the horizon job's recipe on rolling-origin folds before the test, then score the test: seeds, not one run.

One validation year is a noisy judge of a forecaster (the backtest's, 2019, is a calm rise before the crash):
its pick on seed 0 was the worst of four recipes on five seeds' test. So the recipes are ranked the way
forecasters rank them, on several earlier origins, each fold trained up to its start:

* f2008: train to 2006, early-stop on 2007, scored on 2008-2009 (the financial crisis);
* f2015: train to 2013, early-stop on 2014, scored on 2015-2016;
* f2018: train to 2016, early-stop on 2017, scored on 2018-01 .. 2019-12-20 (the last origin whose five days
  end before 2020).

Nothing from 2020 on is read. Every run is a real ``rnnlab train horizon --preset backtest --set ...`` (the one
loop, its own early stopping), ``OMP_NUM_THREADS=1``, ``--parallel`` at a time; a recipe's fold score is its
CRPS over the historical-simulation random walk's, averaged over folds and seeds, with RiskMetrics (the random
walk with Gaussian quantiles of the EWMA volatility: no network) scored on the same origins beside it.

``--stage test`` then trains the recipes on the two protocols (``backtest``, ``chapter``) with ``--test-seeds``
seeds each and reports the test's mean and spread: each seed's test is scored once, by its run, at its end.

    OMP_NUM_THREADS=1 python -m benchmarks.horizon_folds --stage folds --json benchmarks/results/horizon_folds.json
    OMP_NUM_THREADS=1 python -m benchmarks.horizon_folds --stage test --recipes direct_zero seq2seq_learned \\
        --json benchmarks/results/horizon_folds.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks._common import machine_description
from benchmarks.forecast_peers import TAUS, ewma_gaussian

from rnnlab.data.horizon import PROTOCOLS, load_horizon_data, random_walk_quantiles
from rnnlab.data.sources import resolve
from rnnlab.forecasting import forecast_metrics

ROOT = Path(__file__).resolve().parents[1]
FOLDS = {
    "f2008": {"train_end": "2006-12-31", "val_end": "2007-12-31", "test_start": "2008-01-01", "test_end": "2009-12-31"},
    "f2015": {"train_end": "2013-12-31", "val_end": "2014-12-31", "test_start": "2015-01-01", "test_end": "2016-12-31"},
    "f2018": {"train_end": "2016-12-31", "val_end": "2017-12-31", "test_start": "2018-01-01", "test_end": "2019-12-20"},
}
# the candidates: decoder x median, at the presets' 30 epochs and at 10 (the seed study: the longer a run trained
# before its best validation, the worse its test)
RECIPES = {f"{decoder}_{median}{suffix}": {"model.decoder": decoder, "model.median": median, **extra}
           for decoder in ("seq2seq", "direct") for median in ("learned", "zero")
           for suffix, extra in (("", {}), ("_10ep", {"train.epochs": 10}))}


def train_run(out: Path, preset: str, settings: dict[str, Any]) -> dict:
    """One ``rnnlab train horizon`` run (reused when its bundle exists); its bundle's val and test metrics."""
    metrics = out / "bundle" / "metrics.json"
    if not metrics.is_file():
        sets = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
        command = [sys.executable, "-m", "rnnlab.launch.cli", "train", "horizon", "--preset", preset,
                   "--output", str(out), *sets, "--set", "train.progress=false", "--set", "tracking.wandb=false"]
        shutil.rmtree(out, ignore_errors=True)
        with open(f"{out}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return json.loads(metrics.read_text())


def ratios(metrics: dict) -> dict:
    """A run's test scores beside the random walk's on the same origins, and its validation CRPS beside it too."""
    test, val = metrics["test"], metrics["val"]
    return {"crps_vs_rw": test["crps"] / test["baseline_rw_crps"], "coverage_80": test["coverage_80"],
            "coverage_90": test["coverage_90"], "mase_vs_rw": test["mase"] / test["baseline_rw_mase"],
            "val_crps_vs_rw": val["crps"] / val["baseline_rw_crps"]}


def riskmetrics(dates: dict) -> dict:
    """RiskMetrics' and the random walk's scores on a fold's (or protocol's) test origins."""
    data = load_horizon_data(resolve("stock", None), window=21, horizon=5, **dates)
    test = data.splits["test"]
    q = ewma_gaussian(data.closes, test.origins)
    m = forecast_metrics(test.future_close, q, TAUS, data.naive_scale, per_horizon=False)
    rw = forecast_metrics(test.future_close, random_walk_quantiles(data.closes, test.origins, 5, TAUS, lookback=252),
                          TAUS, data.naive_scale, per_horizon=False)
    return {"crps_vs_rw": m["crps"] / rw["crps"], "coverage_80": m["coverage_80"], "coverage_90": m["coverage_90"],
            "origins": len(test.origins)}


def summarise(runs: list[dict]) -> dict:
    out = {"runs": len(runs)}
    for key in ("crps_vs_rw", "coverage_80", "coverage_90", "mase_vs_rw"):
        values = [r[key] for r in runs]
        out[key] = statistics.mean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{key}_range"] = [min(values), max(values)]
    return out


def run_all(tasks: list[tuple], parallel: int) -> list[dict]:
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda task: train_run(*task), tasks))


def folds_stage(args) -> dict:
    recipes = {name: RECIPES[name] for name in args.recipes}
    tasks, keys = [], []
    for name, settings in recipes.items():
        for fold, dates in FOLDS.items():
            for seed in range(args.fold_seeds):
                tasks.append((args.workdir / f"{fold}-{name}-s{seed}", "backtest",
                              {**settings, **{f"data.{k}": v for k, v in dates.items()}, "train.seed": seed}))
                keys.append((name, fold, seed))
    results = run_all(tasks, args.parallel)
    report: dict[str, Any] = {"folds": FOLDS, "riskmetrics": {f: riskmetrics(d) for f, d in FOLDS.items()},
                              "recipes": {}}
    for name in recipes:
        runs = {f"{fold}-s{seed}": ratios(m) for (n, fold, seed), m in zip(keys, results) if n == name}
        report["recipes"][name] = {"settings": recipes[name], **summarise(list(runs.values())), "each": runs}
    report["pick"] = min(report["recipes"], key=lambda n: report["recipes"][n]["crps_vs_rw"])
    return report


def test_stage(args) -> dict:
    report: dict[str, Any] = {"protocols": {}}
    for protocol in ("backtest", "chapter"):
        tasks, names = [], []
        for name in args.recipes:
            for seed in range(args.test_seeds):
                tasks.append((args.workdir / f"{protocol}-{name}-s{seed}", protocol, {**RECIPES[name], "train.seed": seed}))
                names.append((name, seed))
        results = run_all(tasks, args.parallel)
        part: dict[str, Any] = {"riskmetrics": riskmetrics(PROTOCOLS[protocol]), "recipes": {}}
        for name in args.recipes:
            runs = {f"s{seed}": ratios(m) for (n, seed), m in zip(names, results) if n == name}
            part["recipes"][name] = {"settings": RECIPES[name], **summarise(list(runs.values())), "each": runs}
        report["protocols"][protocol] = part
    return report


def print_table(title: str, part: dict) -> None:
    print(f"\n{title}: test CRPS / the random walk's, 80 / 90 % coverage (mean +- sd over folds and seeds)")
    rm = part["riskmetrics"]
    rm = rm if "crps_vs_rw" in rm else {k: statistics.mean(v[k] for v in rm.values()) for k in next(iter(rm.values()))}
    print(f"  {'riskmetrics (no network)':28s} {rm['crps_vs_rw']:.3f}          {100 * rm['coverage_80']:5.1f} / "
          f"{100 * rm['coverage_90']:5.1f}")
    for name, r in part["recipes"].items():
        print(f"  {name:28s} {r['crps_vs_rw']:.3f} +- {r['crps_vs_rw_sd']:.3f} {100 * r['coverage_80']:5.1f} / "
              f"{100 * r['coverage_90']:5.1f}   (runs {r['runs']}, CRPS {r['crps_vs_rw_range'][0]:.3f} .. "
              f"{r['crps_vs_rw_range'][1]:.3f})")


def figure(report: dict, path: Path) -> None:
    """Per recipe: every fold run's score (the choice) beside every seed's backtest test score (after it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds, tests = report["folds"], report["test"]["protocols"]["backtest"]
    names = list(folds["recipes"])
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    for y, name in enumerate(names):
        fold_runs = [r["crps_vs_rw"] for r in folds["recipes"][name]["each"].values()]
        ax.scatter(fold_runs, [y + 0.15] * len(fold_runs), color="tab:gray", s=14,
                   label="folds before 2020 (the choice)" if y == 0 else None)
        if name in tests["recipes"]:
            test_runs = [r["crps_vs_rw"] for r in tests["recipes"][name]["each"].values()]
            ax.scatter(test_runs, [y - 0.15] * len(test_runs), color="tab:blue", s=14,
                       label="backtest test, one point a seed" if y == 0 else None)
    folds_rm = statistics.mean(r["crps_vs_rw"] for r in folds["riskmetrics"].values())
    ax.axvline(folds_rm, color="tab:gray", linestyle=":", label="RiskMetrics, folds")
    ax.axvline(tests["riskmetrics"]["crps_vs_rw"], color="tab:blue", linestyle=":", label="RiskMetrics, backtest")
    ax.axvline(0.95, color="tab:red", linestyle="--", linewidth=0.8, label="target: 5 % below the random walk")
    ax.set_yticks(range(len(names)), [n + (" (pick)" if n == folds["pick"] else "") for n in names])
    ax.set_xlabel("test CRPS / the historical-simulation random walk's (lower is better)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["folds", "test"], required=True)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--fold-seeds", type=int, default=3)
    parser.add_argument("--test-seeds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/horizon-folds"))
    parser.add_argument("--json", type=Path, help="merge this stage's report into this file")
    parser.add_argument("--figure", type=Path, help="once both stages are in --json: the folds beside the test")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stage == "folds":
        report = folds_stage(args)
        print_table("folds before 2020", report)
        print(f"\npick (lowest mean fold CRPS / RW): {report['pick']}")
    else:
        report = test_stage(args)
        for protocol, part in report["protocols"].items():
            print_table(f"{protocol} protocol", part)
    if args.json:
        merged = json.loads(args.json.read_text()) if args.json.is_file() else {}
        merged[args.stage] = report
        merged["machine"] = machine_description()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"wrote {args.json}")
        if args.figure and {"folds", "test"} <= set(merged):
            figure(merged, args.figure)
            print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
