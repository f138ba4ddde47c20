"""The stock job: windows of daily features, a loss on the scaled target, R^2 / MAE / MAPE in prices beside
the two naive baselines (close = same-day open, close = previous close); its predictor (a price history -> the
next close), the service's request and answer (POST /v1/stock, alias /v1/forecast), the scorer of any price
file (``rnnlab evaluate --data``) and the ``rnnlab forecast`` verb."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import pandas as pd
from pydantic import BaseModel, Field

from rnnlab.config import (
    Count, DataSettings, Date, JobConfig, PositiveInt, PositiveNumber, TrainSettings, model_section,
)  # fmt: skip
from rnnlab.data.stock import TEST_END, TEST_START, TRAIN_END, VAL_DAYS
from rnnlab.bundle import Bundle
from rnnlab.errors import ConfigError
from rnnlab.inference import PREDICT_BATCH_SIZE, Predictor
from rnnlab.jobs.price_history import (
    MAX_HISTORY_ROWS, PriceHistoryRequest, PriceRow, add_history_arguments, bounded_history, history_from_args,
)  # fmt: skip
from rnnlab.models.stock import StockConfig
from rnnlab.runtime import GraphSpec
from rnnlab.trainers.evaluate import score_with_job
from rnnlab.trainers.job import Batch, EvalResult, Job

log = logging.getLogger(__name__)

LOSSES = ("mse", "l1", "huber")


class StockDataSettings(DataSettings):
    window: PositiveInt = 5  # days of features per prediction
    target: Literal["close", "log_return"] = "close"
    train_end: Date = TRAIN_END
    test_start: Date = TEST_START
    test_end: Date = TEST_END
    val_days: Count = VAL_DAYS  # the last trading days before train_end, held out; 0 = no validation split
    scale_target: bool = True  # false: train on the raw target (the chapter's raw close)


class StockTrainSettings(TrainSettings):
    batch_size: PositiveInt = 128
    monitor: str = "mae"
    # on the scaled target (huber_delta in those units); l1 fits the conditional median, which minimises the MAE
    loss: Literal["mse", "l1", "huber"] = "mse"
    huber_delta: PositiveNumber = 1.0


StockModelSettings = model_section(StockConfig)


class StockJobConfig(JobConfig):
    job: Literal["stock"] = "stock"
    data: StockDataSettings = Field(default_factory=StockDataSettings)
    model: StockModelSettings = Field(default_factory=StockModelSettings)
    train: StockTrainSettings = Field(default_factory=StockTrainSettings)

    @property
    def has_validation_split(self) -> bool:
        # val_days=0 is the chapter's protocol: no selection, the final weights are the bundle's
        return self.data.val_days > 0


class StockJob(Job):
    Config = StockJobConfig

    def load_data(self) -> None:
        from rnnlab.data import stock

        d = self.config.data
        data = stock.load_stock_data(
            self.source_path(), window=d.window, target=d.target, train_end=d.train_end, test_start=d.test_start,
            test_end=d.test_end, val_days=d.val_days, scale_target=d.scale_target,
        )  # fmt: skip
        X, y, rows = data.splits["train"]
        if d.limit_train and d.limit_train < len(y):  # keep the most recent windows: the test period follows
            log.info("data.limit_train=%d: using the last %d of %d training windows", d.limit_train,
                     d.limit_train, len(y))
            data.splits["train"] = X[-d.limit_train :], y[-d.limit_train :], rows.iloc[-d.limit_train :]
        self._hold(data)

    def load_data_to_score(self, path, assets: dict, start=None, end=None) -> dict:
        from rnnlab.data import stock

        d = self.config.data
        scaler, target_scaler = (stock.Scaler.from_json(assets[name]) for name in ("scaler", "target_scaler"))
        features = stock.make_features(stock.read_prices(path))
        X, rows = stock.windows_between(features, scaler, d.window, start, end)
        y = stock.target_values(rows, d.target).astype(np.float32)  # as make_windows gives training's
        self._hold(stock.StockData(scaler=scaler, target_scaler=target_scaler, target=d.target, window=d.window,
                                   splits={"test": (X, y, rows)}, feature_names=list(stock.FEATURE_NAMES)))
        return {"days": len(rows), "first_day": rows.index[0].date().isoformat(),
                "last_day": rows.index[-1].date().isoformat()}

    def _hold(self, data) -> None:
        """``data``'s splits as what batches and ``evaluate`` read: windows and the scaled target."""
        from rnnlab.data import stock

        self.data, self._stock = data, stock
        scale = data.target_scaler
        self.X = {s: torch.from_numpy(np.ascontiguousarray(X)) for s, (X, _, _) in data.splits.items()}
        self.y_scaled = {s: torch.from_numpy(scale.transform(y).astype(np.float32))
                         for s, (_, y, _) in data.splits.items()}
        self.loss_name = self.config.train.loss
        self.huber_delta = self.config.train.huber_delta

    def has_validation(self) -> bool:
        return len(self.data.splits["val"][1]) > 0

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.y_scaled["train"]) / self.batch_size)

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        return self.shuffled_batches(self.X["train"], self.y_scaled["train"], epoch, start)

    def data_model_config(self) -> dict:
        return {"num_features": self.data.num_features}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        return stock_loss(model(*batch.inputs).float(), batch.targets, self.loss_name, self.huber_delta)

    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        scaled = self.predict_examples(model, self.X[split], accelerator)
        _, y_raw, rows = self.data.splits[split]
        predicted_target = self.data.target_scaler.inverse_transform(scaled)
        predicted = self._stock.to_price(predicted_target, rows, self.data.target)
        actual = rows[self._stock.TARGET_COLUMN].to_numpy(dtype=np.float64)
        loss = stock_loss(torch.from_numpy(scaled), self.y_scaled[split].double(), self.loss_name, self.huber_delta)
        metrics = {"loss": float(loss) / max(1, len(scaled))}  # the training loss (train.loss), per window
        metrics.update(self._stock.regression_metrics(actual, predicted))
        for name, baseline in (("same_day_open", self._stock.naive_same_day_open),
                               ("previous_close", self._stock.naive_previous_close)):
            for key, value in self._stock.regression_metrics(actual, baseline(rows)).items():
                metrics[f"baseline_{name}_{key}"] = value
        return EvalResult(metrics, {"dates": rows.index, "actual": actual, "predicted": predicted,
                                    "open": self._stock.naive_same_day_open(rows)})

    def assets(self) -> dict[str, dict]:
        return {"scaler": self.data.scaler.to_json(), "target_scaler": self.data.target_scaler.to_json()}

    def example(self) -> dict:
        return self._stock.example_request(self.source_path(), self.config.data.window)

    def report(self, model, val: dict, test: EvalResult, output_dir, tracker) -> dict:
        print(stock_table(val, test.metrics), flush=True)
        path = plot_predictions(test.details, output_dir / "predicted_vs_actual.png")
        if tracker is not None:
            import wandb

            tracker.log({"test/predicted_vs_actual": wandb.Image(str(path))})
        return {}


def stock_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_delta: float = 1.0) -> torch.Tensor:
    """SUM of the per-window losses on the scaled target: ``mse``, ``l1`` (fits the conditional median, which
    minimises the MAE the job is scored on) or ``huber`` (quadratic within ``huber_delta``, linear beyond)."""
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="sum")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="sum", delta=huber_delta)
    raise ConfigError(f"train.loss is {kind!r}; choose one of {', '.join(LOSSES)}.")


def stock_table(val: dict, test: dict) -> str:
    """R^2 / MAE / MAPE of the model beside both naive baselines, for validation and test, as one table."""
    lines = [f"{'':28s}{'val R2':>9s}{'val MAE':>10s}{'val MAPE':>10s}{'test R2':>9s}{'test MAE':>10s}{'test MAPE':>10s}"]
    for label, prefix in (("model", ""), ("close = same-day open", "baseline_same_day_open_"),
                          ("close = previous close", "baseline_previous_close_")):
        cells = []
        for m in (val, test):
            cells += [f"{m.get(prefix + 'r2', float('nan')):9.4f}", f"{m.get(prefix + 'mae', float('nan')):10.2f}",
                      f"{100 * m.get(prefix + 'mape', float('nan')):9.2f}%"]
        lines.append(f"{label:28s}" + "".join(cells))
    return "\n".join(lines)


def plot_predictions(details: dict, path) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(details["dates"], details["actual"], label="actual close", color="black", linewidth=1.5)
    ax.plot(details["dates"], details["predicted"], label="predicted close", color="tab:blue", linewidth=1.2)
    ax.plot(details["dates"], details["open"], label="close = open (baseline)", color="tab:gray",
            linewidth=0.8, linestyle="--")
    ax.set_title("Test split: predicted vs actual close")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ predictor


def window_of(bundle: Bundle) -> int:
    """Days of features per forecast of the bundle's model."""
    return int(bundle.config.get("data", {}).get("window", 5))


class StockPredictor(Predictor):
    """Forecast one day's close from the price history before it and that day's open.

    A request is ONE table of daily rows, oldest first, with date, open, high, low, close, volume (a DataFrame
    with those columns in any capitalisation, or with a DatetimeIndex for the dates; a list of row dicts works
    too). **The last row is the day to forecast**: only its date and open are used (the open is a feature, as
    in training); its high, low, close and volume may be missing (None/NaN) and are ignored when given, so the
    CSV of a past period forecasts its last day without peeking. Every other row must be complete.

    At least ``min_rows`` = 254 + window rows are needed (252-day features plus warm-up plus the window);
    ``MAX_HISTORY_ROWS`` at most. The answer: ``{"date": the last row's date (ISO), "close": forecast,
    "baseline_open": that day's open (the naive close = open forecast), "actual_close": the last row's close
    if it was given, else None}``.
    """

    job, noun = "stock", "History"

    def __init__(self, bundle: Bundle) -> None:
        from rnnlab.data.stock import Scaler, min_history_rows

        super().__init__(bundle)
        data = bundle.config.get("data", {})
        self.window = window_of(bundle)
        self.target = str(data.get("target", "close"))
        self.scaler = Scaler.from_json(bundle.assets["scaler"])
        self.target_scaler = Scaler.from_json(bundle.assets["target_scaler"])
        self.min_rows = min_history_rows(self.window)

    def prepare(self, history: pd.DataFrame | Sequence[dict] | dict):
        """Validate ONE history and keep the rows its forecast reads (InputError for anything malformed). A server
        prepares each request as it arrives and forecasts the gathered batch with :meth:`predict_prepared`.
        ``history`` may also be a mapping of columns (what the service sends: dates and float arrays), and any of
        these wrapped in a ``TrustedHistory`` (rows that cannot be real prices are then read as sent)."""
        from rnnlab.data.stock import read_history

        history, trusted = bounded_history(history, self.min_rows)
        return read_history(history, window=self.window, trust_prices=trusted)

    def predict_prepared(self, histories: Sequence, batch_size: int = PREDICT_BATCH_SIZE) -> list[dict[str, Any]]:
        """Forecasts for :meth:`prepare` outputs: the features of the whole batch in one vectorised pass, then the
        model ``batch_size`` windows at a time. A history whose last days give an undefined feature (a zero
        volume or constant prices make a ratio 0/0) gets ``{"error": sentence}`` in its place."""
        from rnnlab.data.stock import UNDEFINED_FEATURES, forecast_features, to_price

        if not histories:
            return []
        features = forecast_features(np.stack([h.values for h in histories]), self.window)
        defined = np.isfinite(features).all(axis=(1, 2))
        windows = self.scaler.transform(features[defined]).astype(np.float32)
        scaled = self.forward(windows, batch_size).reshape(-1)
        target = self.target_scaler.inverse_transform(scaled.astype(np.float64))
        last_days = [h.values[-1] for h, ok in zip(histories, defined) if ok]
        closes = iter(to_price(target, pd.DataFrame({"open": [day[0] for day in last_days]}), self.target))
        results = []
        for history, ok in zip(histories, defined):
            if not ok:
                results.append({"error": UNDEFINED_FEATURES})
                continue
            open_, close = history.values[-1, 0], history.values[-1, 3]
            results.append({
                "date": str(history.dates[-1]),
                "close": float(next(closes)),
                "baseline_open": float(open_),
                "actual_close": None if np.isnan(close) else float(close),
            })  # fmt: skip
        return results


# ------------------------------------------------------------------------------------------------ ONNX graph


def graph_examples(bundle: Bundle) -> list[tuple]:
    """Windows of standardised features (what the scaler hands the model), batch 1 and 16."""
    generator = torch.Generator().manual_seed(0)
    shape = (window_of(bundle), bundle.model_config["num_features"])
    return [(torch.randn(1, *shape, generator=generator),), (torch.randn(16, *shape, generator=generator),)]


# windows [B, window, features] in (the window fixed at the bundle's), the scaled target [B] out
GRAPH = GraphSpec(inputs=("windows",), outputs=("target",), examples=graph_examples,
                  dynamic_axes={"windows": {0: "batch"}, "target": {0: "batch"}})

# ------------------------------------------------------------------------------------------------ service

class StockRequest(PriceHistoryRequest):
    rows: list[PriceRow] = Field(
        min_length=1,
        max_length=MAX_HISTORY_ROWS,
        description="Daily prices, oldest first, at most "
        f"{MAX_HISTORY_ROWS} rows. The LAST row is the day to forecast: its date and open (high, low, close, "
        "volume may be null and are ignored). The model needs 254 + window rows (about a year of history).",
    )


class Forecast(BaseModel):
    date: str = Field(description="The forecast day (the last row's date).")
    close: float = Field(description="The model's forecast of that day's close.")
    baseline_open: float = Field(description="The naive forecast close = open, beside it.")
    actual_close: float | None = Field(description="The last row's close when it was sent (for back-tests).")


class StockResponse(BaseModel):
    model: str
    forecast: Forecast

    @staticmethod
    def answer(model: str, results: list[dict]) -> dict:
        return {"model": model, "forecast": results[0]}


# ------------------------------------------------------------------------------------------------ scorer


def score(bundle: Bundle, path: str | Path, *, start=None, end=None) -> dict[str, Any]:
    """Any Yahoo-layout daily CSV, optionally cut to the days ``start``..``end`` -> the test figures of training on
    those days: the loss, R^2, MAE and MAPE of the forecast close, beside the naive forecasts close = same-day open
    and close = previous close (``baseline_*``)."""
    return score_with_job(bundle, path, start=start, end=end)


# ------------------------------------------------------------------------------------------------ CLI verb and demo


class CLI:
    """``rnnlab forecast BUNDLE --csv FILE``: the forecast of the file's last day, one JSON line."""

    add_arguments = staticmethod(add_history_arguments)

    @staticmethod
    def run(args, load_predictor) -> int:
        import json

        print(json.dumps(load_predictor().predict([history_from_args(args)])[0], default=str))
        return 0


def demo(post) -> None:
    """``make demo``: the index file's last 300 days through ``post(body)`` (POST /v1/stock), the last day reduced to
    its open (the day to forecast); the forecast printed beside close = open and the actual close."""
    from rnnlab.data.sources import locate
    from rnnlab.data.stock import read_prices, request_rows

    rows = request_rows(read_prices(locate("stock")).tail(300))
    actual = float(rows[-1]["close"])
    rows[-1] = {"date": rows[-1]["date"], "open": rows[-1]["open"]}
    answer = post({"rows": rows})["forecast"]
    forecast, naive = answer["close"], answer["baseline_open"]
    print(f"  {answer['date']}: forecast close {forecast:,.2f}  |  close = open {naive:,.2f}  |  actual close "
          f"{actual:,.2f}")
    print(f"  error {abs(forecast - actual):,.2f} (close = open: {abs(naive - actual):,.2f}); one day decides little: "
          "the test MAE beside close = open's is in the stock table above")
