"""The horizon job's baselines and peers on the same rolling origins, both protocols.

Every method forecasts the closes t+1 .. t+H (H = 5) at the quantiles 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95 from
every test origin of rnnlab.data.horizon (every test day with H days after it in the file), and is scored by
rnnlab.forecasting.forecast_metrics in prices (MASE and the scaled losses use the training part's one-step naive
error):

* ``rw``: the random walk, median = the origin's close, the other quantiles by historical simulation (the
  trailing 252 days' h-day log returns, centred on their median);
* ``rw_drift``: the random walk plus the mean daily log return of every day from the training part's start to
  the origin;
* ``ewma_gauss``: RiskMetrics, the random walk with Gaussian quantiles scaled by the EWMA (0.94) volatility at the
  origin (what the job divides its targets by: the part of its intervals no network is needed for);
* ``auto_ets`` / ``auto_arima``: statsforecast's AutoETS and AutoARIMA on the log close (fitted once at the first
  origin, then run forward over each origin's history: ``cross_validation(refit=False)``), their 50/80/90 %
  intervals as the quantiles (the mean of the log is the median);
* ``nf_lstm`` / ``nf_deepar``: NeuralForecast's LSTM (multi-quantile loss, the same quantiles) and DeepAR
  (Student-t, 50/80/90 % intervals) on the close with the same window (21) and horizon, trained once on the data
  before the first origin for a bounded number of steps, then forecasting every origin;
* the horizon job's own runs (``--run LABEL=RUN_DIR``): their bundle's test metrics, computed by the same function
  on the same origins.

statsforecast and neuralforecast are benchmark extras (``pip install rnnlab[peers]``), never runtime dependencies.

    python -m benchmarks.forecast_peers --protocol both --json benchmarks/results/forecast_peers.json \
        --run backtest:seq2seq=runs/horizon-backtest --figure docs/horizon_peers.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rnnlab.data.horizon import PROTOCOLS, load_horizon_data, random_walk_quantiles
from rnnlab.data.sources import resolve
from rnnlab.forecasting import forecast_metrics

TAUS = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
LEVELS = {0.05: ("lo", 90), 0.1: ("lo", 80), 0.25: ("lo", 50), 0.75: ("hi", 50), 0.9: ("hi", 80),
          0.95: ("hi", 90)}
HORIZON, WINDOW = 5, 21
SUMMARY = ("crps", "mase", "smape", "coverage_80", "coverage_90", "pinball", "scaled_crps")


def level_quantiles(frame: pd.DataFrame, name: str, median: str, transform=np.exp) -> np.ndarray:
    """[N*H] rows of a peer's output with ``name-lo-90`` (or ``name-lo-90.0``) .. columns -> [N*H, Q] quantiles."""
    cols = []
    for tau in TAUS:
        if tau == 0.5:
            cols.append(frame[median].to_numpy())
        else:
            side, level = LEVELS[tau]
            column = next(c for c in (f"{name}-{side}-{level}", f"{name}-{side}-{float(level)}") if c in frame)
            cols.append(frame[column].to_numpy())
    return transform(np.stack(cols, axis=-1).astype(np.float64))


def ewma_gaussian(closes: pd.Series, origins: pd.DatetimeIndex) -> np.ndarray:
    """RiskMetrics: the random walk with Gaussian quantiles of sd sigma_t * sqrt(h), sigma_t the EWMA (0.94) of
    squared daily log returns up to the origin; the volatility the horizon job divides its targets by."""
    from statistics import NormalDist

    from rnnlab.data.horizon import recent_volatility

    sigma = recent_volatility(closes.to_numpy(), 32, "ewma")[closes.index.get_indexer(origins)]
    z = np.array([NormalDist().inv_cdf(t) for t in TAUS])
    steps = np.sqrt(np.arange(1, HORIZON + 1))
    close = closes.reindex(origins).to_numpy()
    return close[:, None, None] * np.exp(z[None, None, :] * sigma[:, None, None] * steps[None, :, None])


def series_to(prices_close: pd.Series, last_date) -> pd.DataFrame:
    """One series (integer trading-day index as ds) of closes up to ``last_date``."""
    part = prices_close[prices_close.index <= last_date]
    return pd.DataFrame({"unique_id": "index", "ds": np.arange(len(part)), "y": part.to_numpy(dtype=np.float64)},
                        ), part.index


def check_cutoffs(cutoffs: np.ndarray, dates: pd.DatetimeIndex, origins: pd.DatetimeIndex, what: str) -> None:
    got = dates[np.asarray(cutoffs, dtype=int)]
    if not (len(got) == len(origins) and (got == origins).all()):
        raise RuntimeError(f"{what}: its forecast origins differ from the job's ({got[:3]} vs {origins[:3]})")


def stats_peers(closes: pd.Series, origins: pd.DatetimeIndex, which: list[str]) -> dict[str, tuple[np.ndarray, float]]:
    from statsforecast import StatsForecast
    from statsforecast.models import AutoARIMA, AutoETS

    last = closes.index[closes.index.get_loc(origins[-1]) + HORIZON]
    df, dates = series_to(closes, last)
    df["y"] = np.log(df["y"])
    out = {}
    for key, model in (("auto_ets", AutoETS(season_length=1)), ("auto_arima", AutoARIMA(season_length=1))):
        if key not in which:
            continue
        start = time.perf_counter()
        sf = StatsForecast(models=[model], freq=1, n_jobs=1)
        cv = sf.cross_validation(df=df, h=HORIZON, n_windows=len(origins), step_size=1, level=[50, 80, 90],
                                 refit=False)
        cv = cv.sort_values(["cutoff", "ds"])
        name = repr(model)
        check_cutoffs(cv["cutoff"].to_numpy()[::HORIZON], dates, origins, key)
        q = level_quantiles(cv, name, name).reshape(len(origins), HORIZON, len(TAUS))
        out[key] = (np.sort(q, axis=-1), time.perf_counter() - start)
        logging.info("%s: %.1f s", key, out[key][1])
    return out


def neural_peers(closes: pd.Series, origins: pd.DatetimeIndex, which: list[str], steps: int
                 ) -> dict[str, tuple[np.ndarray, float]]:
    from neuralforecast.losses.pytorch import DistributionLoss, MQLoss
    from neuralforecast.models import LSTM, DeepAR

    last = closes.index[closes.index.get_loc(origins[-1]) + HORIZON]
    df, dates = series_to(closes, last)
    common = dict(h=HORIZON, input_size=WINDOW, max_steps=steps, random_seed=0, enable_progress_bar=False,
                  enable_model_summary=False, logger=False, accelerator="cpu", devices=1)
    models = {
        "nf_lstm": lambda: LSTM(loss=MQLoss(quantiles=TAUS), encoder_hidden_size=64, decoder_hidden_size=64,
                                batch_size=32, **common),
        # DeepAR's default scaler is the identity: on index levels (~10^4) its Student-t never fits; robust
        # scaling per window as the LSTM has by default
        "nf_deepar": lambda: DeepAR(loss=DistributionLoss("StudentT", level=[50, 80, 90]), lstm_hidden_size=64,
                                    batch_size=32, windows_batch_size=256, scaler_type="robust", **common),
    }
    out = {}
    for key in which:
        if key not in models:
            continue
        try:
            out[key] = one_neural(key, models[key], df, dates, origins)
        except Exception as error:  # reported in the JSON, not hidden
            logging.exception("%s failed", key)
            out[key] = error
    return out


def one_neural(key, make, df, dates, origins) -> tuple[np.ndarray, float]:
    from neuralforecast import NeuralForecast

    start = time.perf_counter()
    model = make()
    nf = NeuralForecast(models=[model], freq=1)
    cv = nf.cross_validation(df=df, n_windows=len(origins), step_size=1, refit=False)
    cv = cv.sort_values(["cutoff", "ds"])
    check_cutoffs(cv["cutoff"].to_numpy()[::HORIZON], dates, origins, key)
    name = type(model).__name__
    logging.info("%s columns: %s", key, [c for c in cv.columns if c.startswith(name)])
    median = f"{name}-median" if f"{name}-median" in cv else name
    q = level_quantiles(cv, name, median, transform=lambda a: a)
    q = np.sort(q.reshape(len(origins), HORIZON, len(TAUS)).astype(np.float64), axis=-1)
    seconds = time.perf_counter() - start
    logging.info("%s: %.1f s", key, seconds)
    return q, seconds


def run_protocol(protocol: str, path: Path, args) -> dict[str, Any]:
    dates = PROTOCOLS[protocol]
    data = load_horizon_data(path, window=WINDOW, horizon=HORIZON, **dates)
    test = data.splits["test"]
    closes, origins = data.closes, test.origins
    methods: dict[str, tuple[np.ndarray, float]] = {}
    for key, drift in (("rw", False), ("rw_drift", True)):
        start = time.perf_counter()
        q = random_walk_quantiles(closes, origins, HORIZON, TAUS, lookback=252, drift=drift,
                                  drift_from=str(data.splits["train"].origins[0].date()))
        methods[key] = (q, time.perf_counter() - start)
    start = time.perf_counter()
    methods["ewma_gauss"] = (ewma_gaussian(closes, origins), time.perf_counter() - start)
    wanted = args.methods
    if {"auto_ets", "auto_arima"} & set(wanted):
        methods.update(stats_peers(closes, origins, wanted))
    failed = {}
    if {"nf_lstm", "nf_deepar"} & set(wanted):
        for key, value in neural_peers(closes, origins, wanted, args.nf_steps).items():
            key = f"{key}_{args.nf_steps}" if args.nf_steps != 300 else key  # a longer run beside the default
            if isinstance(value, Exception):
                failed[key] = f"{type(value).__name__}: {value}"
            else:
                methods[key] = value
    results = {}
    for key, (q, seconds) in methods.items():
        m = forecast_metrics(test.future_close, q, TAUS, data.naive_scale)
        results[key] = {**m, "wall_s": round(seconds, 2)}
    for label, run_dir in args.runs.get(protocol, {}).items():
        metrics = json.loads((Path(run_dir) / "bundle" / "metrics.json").read_text())
        results[f"horizon_{label}"] = {**metrics["test"], "val_crps": metrics["val"].get("crps"),
                                       "val_baseline_rw_crps": metrics["val"].get("baseline_rw_crps"),
                                       "wall_s": args.walls.get(f"{protocol}:{label}")}
    rw = results["rw"]["crps"]
    for value in results.values():
        value["crps_vs_rw"] = value["crps"] / rw
        value["mase_vs_rw"] = value["mase"] / results["rw"]["mase"]
    return {"dates": dates, "origins": len(origins), "first_origin": str(origins[0].date()),
            "last_origin": str(origins[-1].date()), "naive_scale": data.naive_scale, "methods": results,
            "failed": failed, "nf_steps": args.nf_steps}


def table(protocol: str, report: dict) -> str:
    lines = [f"{protocol}: {report['origins']} origins {report['first_origin']}..{report['last_origin']}",
             f"{'method':26s}{'CRPS':>10s}{'vs RW':>8s}{'MASE':>8s}{'sMAPE':>8s}{'cov80':>8s}{'cov90':>8s}"
             f"{'wall s':>9s}"]
    for key, m in report["methods"].items():
        wall = m.get("wall_s")
        lines.append(f"{key:26s}{m['crps']:10.2f}{m['crps_vs_rw']:8.3f}{m['mase']:8.3f}{m['smape']:8.3f}"
                     f"{100 * m['coverage_80']:7.1f}%{100 * m['coverage_90']:7.1f}%"
                     f"{wall if wall is not None else float('nan'):9.1f}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The README tables: per protocol, every method's test CRPS (and / the random walk's), MASE, sMAPE, coverage,
    validation CRPS / the random walk's for the job's runs, wall time."""
    out = []
    for protocol, part in report["protocols"].items():
        out += [f"**{protocol}** ({part['origins']} origins, {part['first_origin']} .. {part['last_origin']}; "
                f"train to {part['dates']['train_end']})", "",
                "| method | CRPS | / RW | MASE | sMAPE % | 80 % cov. | 90 % cov. | val CRPS / RW | wall s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, m in part["methods"].items():
            val = (f"{m['val_crps'] / m['val_baseline_rw_crps']:.3f}" if m.get("val_crps") and m.get("val_baseline_rw_crps")
                   else "")
            wall = f"{m['wall_s']:.0f}" if m.get("wall_s") is not None else ""
            out.append(f"| {key} | {m['crps']:.2f} | {m['crps_vs_rw']:.3f} | {m['mase']:.3f} | {m['smape']:.3f} | "
                       f"{100 * m['coverage_80']:.1f} | {100 * m['coverage_90']:.1f} | {val} | {wall} |")
        if part.get("failed"):
            out.append("")
            out += [f"- {key} failed: {why}" for key, why in part["failed"].items()]
        out.append("")
    return "\n".join(out)


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(report["protocols"])
    fig, axes = plt.subplots(len(protocols), 2, figsize=(13, 4.8 * len(protocols)), squeeze=False)
    for i, protocol in enumerate(protocols):
        methods = report["protocols"][protocol]["methods"]
        names = list(methods)
        labels = [n.replace("horizon_", "rnnlab ").replace("_median_", ", median ") for n in names]
        colors = ["tab:blue" if n.startswith("horizon_") else "tab:gray" for n in names]
        ax = axes[i, 0]
        ratios = [methods[n]["crps_vs_rw"] for n in names]
        ax.barh(labels, ratios, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(0.95, color="tab:red", linewidth=0.8, linestyle="--", label="target: 5 % below the random walk")
        ax.set_xlim(0.85, max(1.05, max(ratios) + 0.03))
        ax.set_title(f"{protocol}: test CRPS / the random walk's (lower is better)")
        ax.legend(loc="lower right", fontsize=8)
        ax = axes[i, 1]
        y = np.arange(len(names))
        ax.barh(y - 0.2, [100 * methods[n]["coverage_80"] for n in names], height=0.4, label="80 % interval")
        ax.barh(y + 0.2, [100 * methods[n]["coverage_90"] for n in names], height=0.4, label="90 % interval")
        for nominal in (80, 90):
            ax.axvspan(nominal - 3, nominal + 3, color="tab:green", alpha=0.12)
            ax.axvline(nominal, color="black", linewidth=0.8, linestyle=":")
        ax.set_yticks(y, labels)
        ax.set_xlim(60, 100)
        ax.set_title(f"{protocol}: test coverage (%), nominal +- 3 shaded")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.05), ncol=2, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_runs(items: list[str]) -> tuple[dict, dict]:
    runs: dict[str, dict[str, str]] = {}
    walls: dict[str, float] = {}
    for item in items:
        name, _, run_dir = item.partition("=")
        protocol, _, label = name.partition(":")
        runs.setdefault(protocol, {})[label] = run_dir
    return runs, walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="both")
    parser.add_argument("--methods", default="auto_ets,auto_arima,nf_lstm,nf_deepar",
                        help="peers to run beside the random walks (comma-separated)")
    parser.add_argument("--nf-steps", type=int, default=300, help="NeuralForecast training steps per model")
    parser.add_argument("--run", action="append", default=[], metavar="PROTOCOL:LABEL=RUN_DIR",
                        help="a horizon run (its bundle's test metrics join the table)")
    parser.add_argument("--wall", action="append", default=[], metavar="PROTOCOL:LABEL=SECONDS",
                        help="a run's training wall time, for the table")
    parser.add_argument("--source", help="price CSV (default: the stock data set via the mirror)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--figure", type=Path, help="write the CRPS / coverage bar charts here")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.methods = [m for m in args.methods.split(",") if m]
    args.runs, _ = parse_runs(args.run)
    args.walls = {k: float(v) for k, _, v in (w.partition("=") for w in args.wall)}
    path = Path(args.source) if args.source else resolve("stock", None)
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    report: dict[str, Any] = {"taus": TAUS, "horizon": HORIZON, "window": WINDOW, "source": str(path),
                              "omp_threads": os.environ.get("OMP_NUM_THREADS"), "protocols": {}}
    for protocol in protocols:
        report["protocols"][protocol] = run_protocol(protocol, path, args)
        print(table(protocol, report["protocols"][protocol]), flush=True)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.is_file() else {}
        protocols = dict(old.get("protocols", {}))
        for name, new in report["protocols"].items():  # a rerun of some methods keeps the others' figures
            before = protocols.get(name, {})
            protocols[name] = {**before, **new, "methods": {**before.get("methods", {}), **new["methods"]},
                               "failed": {**before.get("failed", {}), **new["failed"]}}
            rw = protocols[name]["methods"]["rw"]
            for value in protocols[name]["methods"].values():
                value["crps_vs_rw"], value["mase_vs_rw"] = value["crps"] / rw["crps"], value["mase"] / rw["mase"]
        merged = {**old, **report, "protocols": protocols}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(merged, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
        report = merged
    if args.markdown:
        args.markdown.write_text(markdown(report) + "\n")
        print(f"wrote {args.markdown}")
    if args.figure:
        figure(report, args.figure)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
