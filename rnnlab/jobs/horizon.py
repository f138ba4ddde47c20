"""The horizon job: from the days up to day t's close, the closes of days t+1 .. t+H as calibrated quantiles.

Its config keys (``data.*`` here, ``model.*`` in rnnlab/models/horizon.py); the Job the one training loop drives
(batches of rolling-origin windows, the pinball loss on log returns scaled by the origin's recent volatility,
forecasters' metrics in prices beside the historical-simulation random walk) and its report (the fan chart, the
coverage table); its predictor (a price history -> the next H days' quantiles), the service's request and answer
(POST /v1/horizon), the scorer of any price file (``rnnlab evaluate --data --from --to``), the ``rnnlab forecast``
answer for horizon bundles and the demo request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field

from rnnlab.bundle import Bundle
from rnnlab.config import Count, Date, DataSettings, JobConfig, PositiveInt, TrainSettings, model_section
from rnnlab.data.horizon import PROTOCOLS, random_walk_quantiles
from rnnlab.errors import InputError
from rnnlab.forecasting import forecast_metrics, plot_fan
from rnnlab.inference import PREDICT_BATCH_SIZE, Predictor
from rnnlab.jobs.price_history import (
    MAX_HISTORY_ROWS, CompletePriceRow, PriceHistoryRequest, add_history_arguments, bounded_history, history_from_args,
)  # fmt: skip
from rnnlab.models.horizon import HorizonConfig
from rnnlab.runtime import GraphSpec
from rnnlab.trainers.evaluate import score_with_job
from rnnlab.trainers.job import Batch, EvalResult, Job

log = logging.getLogger(__name__)

# what the loop, Tune and the registry rank by (all lower-is-better); coverage_80/90 are reported beside them
METRICS = {"loss": "min", "crps": "min", "pinball": "min", "mase": "min", "smape": "min",
           "coverage_80_error": "min", "coverage_90_error": "min"}
BASELINE = "rw"  # the random walk with historical-simulation quantiles (trailing year)
RW_LOOKBACK = 252


class HorizonDataSettings(DataSettings):
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


class HorizonTrainSettings(TrainSettings):
    batch_size: PositiveInt = 128
    monitor: str = "crps"


HorizonModelSettings = model_section(HorizonConfig)


class HorizonJobConfig(JobConfig):
    job: Literal["horizon"] = "horizon"
    data: HorizonDataSettings = Field(default_factory=HorizonDataSettings)
    model: HorizonModelSettings = Field(default_factory=HorizonModelSettings)
    train: HorizonTrainSettings = Field(default_factory=HorizonTrainSettings)


class HorizonJob(Job):
    Config = HorizonJobConfig

    def load_data(self) -> None:
        from rnnlab.data.horizon import load_horizon_data

        d, m = self.config.data, self.config.model
        data = load_horizon_data(self.source_path(), window=d.window, horizon=m.horizon, feature_set=d.features,
                                 vol_days=d.vol_days, vol=d.vol, train_end=d.train_end, val_end=d.val_end,
                                 test_start=d.test_start, test_end=d.test_end)
        train = data.splits["train"]
        if d.limit_train and d.limit_train < len(train.y):  # the most recent windows: the test period follows
            log.info("data.limit_train=%d: using the last %d of %d training windows", d.limit_train, d.limit_train,
                     len(train.y))
            keep = slice(-d.limit_train, None)
            data.splits["train"] = type(train)(**{f.name: getattr(train, f.name)[keep]
                                                  for f in dataclasses.fields(train)})
        self._hold(data)

    def load_data_to_score(self, path, assets: dict, start=None, end=None) -> dict:
        from rnnlab.data.horizon import HorizonData, naive_scales, rolling_origins
        from rnnlab.data.stock import Scaler, read_prices

        d, m = self.config.data, self.config.model
        prices = read_prices(path)
        scaler = Scaler.from_json(assets["scaler"])
        part = rolling_origins(prices, scaler, window=d.window, horizon=m.horizon, feature_set=d.features,
                               vol_days=d.vol_days, vol=d.vol, start=start, end=end)
        # MASE's scale as training's: the one-day changes up to the training end, or before the first origin in a
        # file that starts later
        scale, scale_log = naive_scales(prices["Close"], min(pd.Timestamp(d.train_end), part.origins[0]))
        self._hold(HorizonData(scaler=scaler, target_scaler=Scaler.from_json(assets["target_scaler"]),
                               window=d.window, horizon=m.horizon, feature_set=d.features,
                               feature_names=list(scaler.columns), splits={"test": part}, naive_scale=scale,
                               naive_scale_log=scale_log, closes=prices["Close"]))
        return {"origins": len(part.origins), "first_origin": str(part.origins[0].date()),
                "last_origin": str(part.origins[-1].date()), "naive_scale": scale}

    def _hold(self, data) -> None:
        """``data``'s splits as what batches and ``evaluate`` read: windows and the scaled targets."""
        self.data = data
        self.taus = list(self.config.model.quantiles)
        self.X = {s: torch.from_numpy(np.ascontiguousarray(part.X)) for s, part in data.splits.items()}
        self.y_scaled = {s: torch.from_numpy(self.scale_targets(part.y, part.origin_scale))
                         for s, part in data.splits.items()}
        self.tau_tensor = torch.tensor(self.taus, dtype=torch.float32)
        self._baselines: dict[str, dict] = {}

    def has_validation(self) -> bool:
        return len(self.data.splits["val"].y) > 0

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.y_scaled["train"]) / self.batch_size)

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        return self.shuffled_batches(self.X["train"], self.y_scaled["train"], epoch, start)

    def data_model_config(self) -> dict:
        return {"num_features": self.data.num_features}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        return pinball_sum(model(*batch.inputs).float(), batch.targets, self.tau_tensor.to(batch.targets.device))

    def predict_scaled(self, model, split: str, accelerator) -> np.ndarray:
        """[N, H, Q] scaled log-return quantiles of every origin of ``split`` (gathered from every process)."""
        shape = (self.config.model.horizon, len(self.taus))
        return self.predict_examples(model, self.X[split], accelerator, output_shape=shape)

    def scale_targets(self, y: np.ndarray, origin_scale: np.ndarray) -> np.ndarray:
        return (y / origin_scale[:, None] / self.data.target_scaler.scale[None, :]).astype(np.float32)

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
        quantiles = to_prices(scaled, part.close, part.origin_scale, self.data.target_scaler.scale)
        # the metrics: what the registry ranks by (+ the random walk's beside them); every score -- coverage, per
        # horizon, scaled -- in the details, which the report adds to the test figures (bundle, W&B summary)
        scores = forecast_metrics(part.future_close, quantiles, self.taus, self.data.naive_scale)
        metrics = {"loss": float(loss) / max(1, len(scaled)), **{k: scores[k] for k in METRICS if k in scores}}
        base = self.baseline(split)["metrics"]
        for name in ("crps", "pinball", "mase", "smape", "coverage_80", "coverage_90"):
            metrics[f"baseline_{BASELINE}_{name}"] = base[name]
        return EvalResult(metrics, {"origins": part.origins, "close": part.close, "actual": part.future_close,
                                    "quantiles": quantiles, "taus": self.taus, "scores": scores})

    def figures(self, result: EvalResult) -> dict:
        """Every score the metrics leave out: coverage, per horizon, scaled."""
        return {k: v for k, v in result.details["scores"].items() if k not in result.metrics}

    def assets(self) -> dict[str, dict]:
        return {"scaler": self.data.scaler.to_json(), "target_scaler": self.data.target_scaler.to_json()}

    def example(self) -> dict:
        from rnnlab.data.stock import example_request

        return example_request(self.source_path(), self.config.data.window)

    def report(self, model, val: dict, test: EvalResult, output_dir, tracker) -> dict:
        extra = self.figures(test)
        scores = {**test.metrics, **extra}
        table = coverage_table(scores, self.config.model.horizon)
        print(horizon_table(val, scores), flush=True)
        path = plot_fan(self.data.closes, test.details, Path(output_dir) / "fan_chart.png")
        if tracker is not None:
            import wandb

            tracker.log({"test/fan_chart": wandb.Image(str(path)),
                         "test/coverage_table": wandb.Table(columns=table[0], data=table[1:]),
                         **{f"test/{k}": v for k, v in extra.items()}})
        return extra  # coverage, per horizon, scaled: into the test figures the bundle keeps


def to_prices(scaled: np.ndarray, close: np.ndarray, origin_scale: np.ndarray, horizon_scale: np.ndarray
              ) -> np.ndarray:
    """[N, H, Q] model outputs -> close quantiles: close_t * exp(out * origin_scale_t * horizon_scale_h) (every scale
    is positive, so the order of the quantiles holds)."""
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
    """CRPS / MASE / sMAPE of the model beside the random walk on validation and test, and the test's coverage."""
    columns = [("val", n) for n in ("crps", "mase", "smape")] + [
        ("test", n) for n in ("crps", "mase", "smape", "coverage_80", "coverage_90")]
    lines = [f"{'':26s}" + "".join(f"{s + ' ' + n:>18s}" for s, n in columns)]
    for label, prefix in (("model", ""), ("random walk (hist. sim.)", f"baseline_{BASELINE}_")):
        lines.append(f"{label:26s}" + "".join(f"{(val if s == 'val' else test).get(prefix + n, float('nan')):18.4f}"
                                              for s, n in columns))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ predictor

class HorizonPredictor(Predictor):
    """The next H days' closes as quantiles, from a price history whose LAST row is the origin (its close known).

    A request is ONE table of daily rows, oldest first, with date, open, high, low, close, volume (a DataFrame in
    any capitalisation, with a DatetimeIndex or a date column; a list of row dicts; or a mapping of columns). Every
    row must be complete: the forecast starts from the last row's close. At least 254 + window rows (the 252-day
    features, their warm-up and the window), at most ``MAX_HISTORY_ROWS``. The answer: ``{"origin": date,
    "close": the origin's close, "quantiles": levels, "steps": [{"step": h, "values": [Q closes], "median",
    "lower_80", "upper_80", "lower_90", "upper_90"}, ...]}``.
    """

    job, noun = "horizon", "History"

    def __init__(self, bundle: Bundle) -> None:
        from rnnlab.data.horizon import history_rows
        from rnnlab.data.stock import Scaler

        super().__init__(bundle)
        data = HorizonDataSettings.from_dict(bundle.config.get("data", {}), prefix="data")
        self.window, self.feature_set, self.vol, self.vol_days = data.window, data.features, data.vol, data.vol_days
        self.scaler = Scaler.from_json(bundle.assets["scaler"])
        self.horizon_scale = np.asarray(bundle.assets["target_scaler"]["scale"], dtype=np.float64)
        self.taus = [float(t) for t in bundle.model_config["quantiles"]]
        self.horizon = int(bundle.model_config["horizon"])
        self.min_rows = history_rows(self.window)

    def prepare(self, history) -> tuple:
        """Validate ONE history (InputError naming the fault) -> (scaled window, origin date, close, volatility).
        A history wrapped in a ``TrustedHistory`` is read as sent even where its rows cannot be real prices."""
        from rnnlab.data.horizon import window_for_history
        from rnnlab.data.stock import read_history

        history, trusted = bounded_history(history, self.min_rows)
        read = read_history(history, window=self.window, trust_prices=trusted)
        last = read.values[-1]
        if np.isnan(last).any():
            missing = [n for n, v in zip(("open", "high", "low", "close", "volume"), last) if np.isnan(v)]
            raise InputError(f"The last row ({read.dates[-1]}) is the forecast's origin and has no {missing[0]}; "
                             "every row needs open, high, low, close and volume (the forecast starts from the last close).")
        prices = pd.DataFrame(read.values, columns=["Open", "High", "Low", "Close", "Volume"],
                              index=pd.DatetimeIndex(read.dates.astype("datetime64[ns]"), name="Date"))
        return window_for_history(prices, self.scaler, window=self.window, feature_set=self.feature_set,
                                  vol_days=self.vol_days, vol=self.vol)

    def predict_prepared(self, prepared: Sequence[tuple], batch_size: int = PREDICT_BATCH_SIZE) -> list[dict]:
        """Forecasts for :meth:`prepare` outputs. A history whose quantiles pass the largest float (prices of
        1e300, sent with trust_prices) gets ``{"error": sentence}`` in its place: JSON has no infinity."""
        if not prepared:
            return []
        scaled = self.forward(np.stack([p[0] for p in prepared]), batch_size)
        closes = np.array([p[2] for p in prepared])
        with np.errstate(over="ignore"):  # an overflow is that history's error below
            q = to_prices(scaled.astype(np.float64), closes, np.array([p[3] for p in prepared]),
                          self.horizon_scale)
        return [self.answer(p[1], p[2], q[i]) if np.isfinite(q[i]).all() else {"error": (
            f"The forecast from the close of {p[2]:.4g} on {pd.Timestamp(p[1]).date()} passes the largest number a "
            "float holds; send prices in a smaller unit.")} for i, p in enumerate(prepared)]

    def answer(self, origin, close: float, q: np.ndarray) -> dict[str, Any]:
        def at(tau):
            hits = [i for i, t in enumerate(self.taus) if abs(t - tau) < 1e-9]
            return hits[0] if hits else None

        steps = []
        for h in range(q.shape[0]):
            step = {"step": h + 1, "values": [round(float(v), 4) for v in q[h]]}
            for name, tau in (("median", 0.5), ("lower_80", 0.1), ("upper_80", 0.9), ("lower_90", 0.05),
                              ("upper_90", 0.95)):
                i = at(tau)
                step[name] = None if i is None else round(float(q[h, i]), 4)
            steps.append(step)
        return {"origin": str(pd.Timestamp(origin).date()), "close": float(close), "quantiles": self.taus,
                "steps": steps}


# ------------------------------------------------------------------------------------------------ ONNX graph


def graph_examples(bundle: Bundle) -> list[tuple]:
    """Windows of standardised features (what the scaler hands the model), batch 1 and 16."""
    generator = torch.Generator().manual_seed(0)
    window = HorizonDataSettings.from_dict(bundle.config.get("data", {}), prefix="data").window
    shape = (window, bundle.model_config["num_features"])
    return [(torch.randn(1, *shape, generator=generator),), (torch.randn(16, *shape, generator=generator),)]


# windows [B, window, features] in (the window fixed at the bundle's), quantiles [B, H, Q] out
GRAPH = GraphSpec(inputs=("windows",), outputs=("quantiles",), examples=graph_examples,
                  dynamic_axes={"windows": {0: "batch"}, "quantiles": {0: "batch"}})

# ------------------------------------------------------------------------------------------------ service


class HorizonRequest(PriceHistoryRequest):
    rows: list[CompletePriceRow] = Field(
        min_length=1, max_length=MAX_HISTORY_ROWS,
        description=f"Daily prices, oldest first, at most {MAX_HISTORY_ROWS} rows, every field given. The LAST row "
        "is the origin: the forecast is of the closes of the next H trading days. The model needs 254 + window rows "
        "(about 13 months).")


class HorizonStep(BaseModel):
    step: int = Field(description="Trading days after the origin (1 = the next day).")
    values: list[float] = Field(description="The close at each quantile level, in order.")
    median: float | None
    lower_80: float | None
    upper_80: float | None
    lower_90: float | None
    upper_90: float | None


class HorizonForecast(BaseModel):
    origin: str = Field(description="The last row's date: the forecast starts from its close.")
    close: float
    quantiles: list[float] = Field(description="The quantile levels of every step's values.")
    steps: list[HorizonStep]


class HorizonResponse(BaseModel):
    model: str
    forecast: HorizonForecast

    @staticmethod
    def answer(model: str, results: list[dict]) -> dict:
        return {"model": model, "forecast": results[0]}


# ------------------------------------------------------------------------------------------------ scorer


def score(bundle: Bundle, path, *, start=None, end=None) -> dict[str, Any]:
    """Any Yahoo-layout daily CSV: every day from ``start`` to ``end`` with H days after it in the file is an origin
    -> the test figures of training on those origins: CRPS, pinball, MASE, sMAPE and 80/90 % coverage, overall and
    per horizon, beside the historical-simulation random walk (``baseline_rw_*``). MASE's scale is the file's mean
    absolute one-day change up to the bundle's training end (``data.train_end``), as in training, or before the
    first origin when that comes earlier."""
    return score_with_job(bundle, path, start=start, end=end)


# ------------------------------------------------------------------------------------------------ CLI verb and demo


class CLI:
    """``rnnlab forecast BUNDLE --csv FILE [--json]`` with a horizon bundle: the next H days from the file's last
    row, a table of quantiles (or the answer as JSON)."""

    @staticmethod
    def add_arguments(parser) -> None:
        add_history_arguments(parser)
        parser.add_argument("--json", action="store_true", help="horizon bundles: print the answer as JSON")

    @staticmethod
    def run(args, load_predictor) -> int:
        import json

        answer = load_predictor().predict([history_from_args(args)])[0]
        print(json.dumps(answer) if args.json else forecast_table(answer))
        return 0


def forecast_table(answer: dict) -> str:
    """The answer as a table: a row per day ahead, a column per quantile level, every cell 11 wide."""
    taus = answer["quantiles"]
    lines = [f"origin {answer['origin']}, close {price_text(answer['close'])}: the next {len(answer['steps'])} "
             "trading days", f"{'day':>5s}" + "".join(f"{'q' + format(t, 'g'):>11s}" for t in taus)]
    for step in answer["steps"]:
        lines.append(f"{'t+' + str(step['step']):>5s}" + "".join(f"{price_text(v):>11s}" for v in step["values"]))
    return "\n".join(lines)


def price_text(value: float) -> str:
    """A price in at most 10 characters, so a table's columns hold for prices of any size: to the cent from 0.01 to
    a million (13,716.16), else to 4 significant digits (1.235e+07, 1e+300, 5e-05)."""
    return f"{value:,.2f}" if 0.01 <= abs(value) < 1e6 else f"{value:.4g}"


def demo(post) -> None:
    """``make demo``: the index file's last 300 days through ``post(body)`` (POST /v1/horizon); the table printed."""
    from rnnlab.data.sources import locate
    from rnnlab.data.stock import read_prices, request_rows

    rows = request_rows(read_prices(locate("stock")).tail(300))
    print("  " + forecast_table(post({"rows": rows})["forecast"]).replace("\n", "\n  "))
