"""The horizon job: from the days up to day t's close, the closes of days t+1 .. t+H as calibrated quantiles.

Config keys (``data.*`` here, ``model.*`` in rnnlab/models/horizon.py), the Job the one training loop drives
(batches of rolling-origin windows, the pinball loss on per-horizon scaled log returns, forecasters' metrics in
prices beside the historical-simulation random walk), and its report (the fan chart, the coverage table).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from rnnlab.config import Count, Date, DataSettings, JobConfig, PositiveInt, TrainSettings, model_section
from rnnlab.data.horizon import PROTOCOLS, random_walk_quantiles
from rnnlab.forecasting import forecast_metrics
from rnnlab.models.horizon import HorizonConfig
from rnnlab.trainers.job import Batch, EvalResult, Job, gather

log = logging.getLogger(__name__)

# what the loop, Tune and the registry rank by (all lower-is-better); coverage_80/90 are reported beside them
METRICS = {"loss": "min", "crps": "min", "pinball": "min", "mase": "min", "smape": "min",
           "coverage_80_error": "min", "coverage_90_error": "min"}
BASELINE = "rw"  # the random walk with historical-simulation quantiles (trailing year)
RW_LOOKBACK = 252


class HorizonData(DataSettings):
    window: PositiveInt = 21  # days of features per forecast (a month)
    features: Literal["scale_free", "chapter"] = "scale_free"
    # targets divided by the recent daily volatility at the origin, so the intervals follow it: an EWMA of squared
    # returns with span vol_days (32 = RiskMetrics' 0.94) or the std of the last vol_days returns; vol_days 0:
    # by the training part's per-horizon std alone
    vol: Literal["ewma", "std"] = "ewma"
    vol_days: Count = 32
    train_end: Date = PROTOCOLS["chapter"]["train_end"]
    val_end: Date = PROTOCOLS["chapter"]["val_end"]  # validation: the origins after train_end up to val_end
    test_start: Date = PROTOCOLS["chapter"]["test_start"]
    test_end: Date = PROTOCOLS["chapter"]["test_end"]


class HorizonTrain(TrainSettings):
    batch_size: PositiveInt = 128
    monitor: str = "crps"


HorizonModel = model_section(HorizonConfig)


class HorizonJobConfig(JobConfig):
    job: Literal["horizon"] = "horizon"
    data: HorizonData = Field(default_factory=HorizonData)
    model: HorizonModel = Field(default_factory=HorizonModel)
    train: HorizonTrain = Field(default_factory=HorizonTrain)


class HorizonJob(Job):
    Config = HorizonJobConfig

    def load_data(self) -> None:
        from rnnlab.data.horizon import load_horizon_data

        d, m = self.config.data, self.config.model
        self.data = load_horizon_data(self.source_path(), window=d.window, horizon=m.horizon, feature_set=d.features,
                                      vol_days=d.vol_days, vol=d.vol,
                                      train_end=d.train_end, val_end=d.val_end, test_start=d.test_start,
                                      test_end=d.test_end)
        self.taus = list(m.quantiles)
        train = self.data.splits["train"]
        keep = np.arange(len(train.y))
        if d.limit_train and d.limit_train < len(keep):  # the most recent windows: the test period follows
            log.info("data.limit_train=%d: using the last %d of %d training windows", d.limit_train, d.limit_train,
                     len(keep))
            keep = keep[-d.limit_train :]
        self.X = {s: torch.from_numpy(self.data.splits[s].X) for s in ("val", "test")}
        self.X["train"] = torch.from_numpy(np.ascontiguousarray(train.X[keep]))
        self.y_scaled = {s: torch.from_numpy(self.scale_targets(self.data.splits[s].y, self.data.splits[s].origin_scale))
                         for s in ("val", "test")}
        self.y_scaled["train"] = torch.from_numpy(self.scale_targets(train.y[keep], train.origin_scale[keep]))
        self.tau_tensor = torch.tensor(self.taus, dtype=torch.float32)
        self._baselines: dict[str, dict] = {}

    def has_validation(self) -> bool:
        return len(self.data.splits["val"].y) > 0

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.y_scaled["train"]) / self.batch_size)

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        n = len(self.y_scaled["train"])
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        for k in range(start, self.steps_per_epoch()):
            global_batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            if len(global_batch) < self.world_size:
                continue
            mine = torch.from_numpy(self._share(global_batch))
            x = self.X["train"][mine]
            yield Batch(inputs=(x.to(self.device),), targets=self.y_scaled["train"][mine].to(self.device),
                        global_units=len(global_batch), samples=len(mine), tokens=len(mine) * x.shape[1])

    def data_model_config(self) -> dict:
        return {"num_features": self.data.num_features}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        return pinball_sum(model(*batch.inputs).float(), batch.targets, self.tau_tensor.to(batch.targets.device))

    @torch.no_grad()
    def predict_scaled(self, model, split: str, accelerator) -> np.ndarray:
        """[N, H, Q] scaled log-return quantiles of every origin of ``split`` (gathered from every process)."""
        X = self.X[split]
        mine = self._share(np.arange(len(X)))
        preds = []
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = torch.from_numpy(mine[start : start + self.eval_batch_size])
            with accelerator.autocast():
                preds.append(model(X[chunk].to(self.device)).float().cpu().numpy())
        H, Q = self.config.model.horizon, len(self.taus)
        local = np.concatenate(preds) if preds else np.zeros((0, H, Q), np.float32)
        pieces = gather(accelerator, (mine, local))
        out = np.empty((len(X), H, Q), dtype=np.float64)
        out[np.concatenate([p[0] for p in pieces])] = np.concatenate([p[1] for p in pieces])
        return out

    def scale_targets(self, y: np.ndarray, origin_scale: np.ndarray) -> np.ndarray:
        return (y / origin_scale[:, None] / self.data.target_scaler.scale[None, :]).astype(np.float32)

    def to_prices(self, scaled: np.ndarray, split: str) -> np.ndarray:
        """Scaled log-return quantiles [N, H, Q] -> close quantiles (every scale is positive, so the order of the
        quantiles holds)."""
        part = self.data.splits[split]
        return to_prices(scaled, part.close, part.origin_scale, self.data.target_scaler.scale)

    def baseline(self, split: str) -> dict:
        """The historical-simulation random walk's quantiles and metrics on ``split`` (computed once)."""
        if split not in self._baselines:
            part = self.data.splits[split]
            q = random_walk_quantiles(self.data.closes, part.origins, self.config.model.horizon, self.taus,
                                      lookback=RW_LOOKBACK)
            self._baselines[split] = {"quantiles": q, "metrics": forecast_metrics(
                part.future_close, q, self.taus, self.data.naive_scale, per_horizon=False)}
        return self._baselines[split]

    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        scaled = self.predict_scaled(model, split, accelerator)
        part = self.data.splits[split]
        loss = pinball_sum(torch.from_numpy(scaled), self.y_scaled[split].double(),
                           torch.tensor(self.taus, dtype=torch.float64))
        quantiles = self.to_prices(scaled, split)
        metrics = {"loss": float(loss) / max(1, len(scaled))}
        metrics.update(forecast_metrics(part.future_close, quantiles, self.taus, self.data.naive_scale))
        base = self.baseline(split)["metrics"]
        for name in ("crps", "pinball", "mase", "smape", "coverage_80", "coverage_90"):
            metrics[f"baseline_{BASELINE}_{name}"] = base[name]
        return EvalResult(metrics, {"origins": part.origins, "close": part.close, "actual": part.future_close,
                                    "quantiles": quantiles, "taus": self.taus})

    def assets(self) -> dict[str, dict]:
        return {"scaler": self.data.scaler.to_json(), "target_scaler": self.data.target_scaler.to_json()}

    def report(self, model, val: dict, test: EvalResult, output_dir, tracker) -> dict:
        table = coverage_table(test.metrics, self.config.model.horizon)
        print(horizon_table(val, test.metrics), flush=True)
        path = plot_fan(self.data.closes, test.details, Path(output_dir) / "fan_chart.png")
        if tracker is not None:
            import wandb

            tracker.log({"test/fan_chart": wandb.Image(str(path)),
                         "test/coverage_table": wandb.Table(columns=table[0], data=table[1:])})
        return {}


def to_prices(scaled: np.ndarray, close: np.ndarray, origin_scale: np.ndarray, horizon_scale: np.ndarray
              ) -> np.ndarray:
    """[N, H, Q] model outputs -> close quantiles: close_t * exp(out * origin_scale_t * horizon_scale_h)."""
    log_returns = scaled * origin_scale[:, None, None] * np.asarray(horizon_scale)[None, :, None]
    return np.asarray(close)[:, None, None] * np.exp(log_returns)


def pinball_sum(pred: torch.Tensor, target: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """SUM over windows of each window's mean pinball loss over its H x Q outputs. pred [B, H, Q], target [B, H]."""
    diff = target.unsqueeze(-1) - pred
    loss = torch.maximum(taus * diff, (taus - 1) * diff)
    return loss.mean(dim=(1, 2)).sum()


def coverage_table(metrics: dict, horizon: int) -> list[list]:
    """[header, rows...]: per horizon the coverage of the 80 % and 90 % intervals, CRPS and MASE."""
    rows = [["horizon", "coverage_80", "coverage_90", "crps", "mase"]]
    for h in range(1, horizon + 1):
        rows.append([f"t+{h}", *(round(float(metrics.get(f"{n}_h{h}", float("nan"))), 4)
                                 for n in ("coverage_80", "coverage_90", "crps", "mase"))])
    rows.append(["all", *(round(float(metrics.get(n, float("nan"))), 4)
                          for n in ("coverage_80", "coverage_90", "crps", "mase"))])
    return rows


def horizon_table(val: dict, test: dict) -> str:
    """CRPS / MASE / sMAPE / coverage of the model beside the random walk, validation and test."""
    names = ("crps", "mase", "smape", "coverage_80", "coverage_90")
    lines = [f"{'':26s}" + "".join(f"{s + ' ' + n:>18s}" for s in ("val", "test") for n in names)]
    for label, prefix in (("model", ""), ("random walk (hist. sim.)", f"baseline_{BASELINE}_")):
        lines.append(f"{label:26s}" + "".join(f"{m.get(prefix + n, float('nan')):18.4f}"
                                              for m in (val, test) for n in names))
    return "\n".join(lines)


def plot_fan(closes, details: dict, path, *, recent: int = 60) -> Path:
    """Two panels: the last test origin's recent closes and its fan of intervals; over every test origin, the
    t+H forecast's intervals as % changes with the changes that happened."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus, q = list(details["taus"]), details["quantiles"]
    origins, actual = details["origins"], details["actual"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    last = len(origins) - 1
    origin = origins[last]
    past = closes[closes.index <= origin].iloc[-recent:]
    future = closes[closes.index > origin].iloc[: q.shape[1]]
    left.plot(past.index, past.to_numpy(), color="black", linewidth=1.3, label="close")
    fan_dates = [origin, *future.index]
    _fan(left, fan_dates, np.vstack([np.full(len(taus), details["close"][last]), q[last]]), taus)
    left.plot(future.index, actual[last][: len(future)], "o", color="tab:red", markersize=4, label="actual")
    left.set_title(f"Forecast from {origin.date()}: median and 50/80/90 % intervals")
    left.legend(loc="upper left")
    H = q.shape[1]
    base = np.asarray(details["close"])[:, None]
    _fan(right, origins, 100 * (q[:, H - 1, :] / base - 1), taus)
    right.plot(origins, 100 * (actual[:, H - 1] / base[:, 0] - 1), ".", color="black", markersize=2,
               label=f"actual {H}-day change")
    right.axhline(0, color="gray", linewidth=0.6)
    right.set_ylabel("% change from the origin's close")
    right.set_title(f"Every test origin: the t+{H} forecast's intervals and what happened")
    right.legend(loc="upper right", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _fan(ax, dates, q: np.ndarray, taus: list) -> None:
    """Shade the central intervals (90, 80, 50 %) and draw the median."""
    for level, alpha in ((0.90, 0.15), (0.80, 0.25), (0.50, 0.35)):
        lo, hi = _index(taus, (1 - level) / 2), _index(taus, 1 - (1 - level) / 2)
        if lo is not None and hi is not None:
            ax.fill_between(dates, q[:, lo], q[:, hi], color="tab:blue", alpha=alpha, linewidth=0,
                            label=f"{int(level * 100)} % interval")
    mid = _index(taus, 0.5)
    if mid is not None:
        ax.plot(dates, q[:, mid], color="tab:blue", linewidth=1.2, label="median")


def _index(taus: list, tau: float) -> int | None:
    hits = [i for i, t in enumerate(taus) if abs(t - tau) < 1e-9]
    return hits[0] if hits else None
