"""The stock job: windows of daily features, a loss on the scaled target, R^2 / MAE / MAPE in prices beside
the two naive baselines (close = same-day open, close = previous close)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from rnnlab.config import (
    Count, DataSettings, Date, JobConfig, PositiveInt, PositiveNumber, TrainSettings, model_section,
)  # fmt: skip
from rnnlab.data.stock import TEST_END, TEST_START, TRAIN_END, VAL_DAYS
from rnnlab.errors import ConfigError
from rnnlab.models.stock import StockConfig
from rnnlab.trainers.job import Batch, EvalResult, Job, gather

log = logging.getLogger(__name__)

LOSSES = ("mse", "l1", "huber")


class StockData(DataSettings):
    window: PositiveInt = 5  # days of features per prediction
    target: Literal["close", "log_return"] = "close"
    train_end: Date = TRAIN_END
    test_start: Date = TEST_START
    test_end: Date = TEST_END
    val_days: Count = VAL_DAYS  # the last trading days before train_end, held out; 0 = no validation split
    scale_target: bool = True  # false: train on the raw target (the chapter's raw close)


class StockTrain(TrainSettings):
    batch_size: PositiveInt = 128
    monitor: str = "mae"
    # on the scaled target (huber_delta in those units); l1 fits the conditional median, which minimises the MAE
    loss: Literal["mse", "l1", "huber"] = "mse"
    huber_delta: PositiveNumber = 1.0


StockModel = model_section(StockConfig)


class StockJobConfig(JobConfig):
    job: Literal["stock"] = "stock"
    data: StockData = Field(default_factory=StockData)
    model: StockModel = Field(default_factory=StockModel)
    train: StockTrain = Field(default_factory=StockTrain)

    @property
    def has_validation_split(self) -> bool:
        # val_days=0 is the chapter's protocol: no selection, the final weights are the bundle's
        return self.data.val_days > 0


class StockJob(Job):
    Config = StockJobConfig

    def load_data(self) -> None:
        from rnnlab.data import stock

        d = self.config.data
        self.data = stock.load_stock_data(
            self.source_path(), window=d.window, target=d.target, train_end=d.train_end, test_start=d.test_start,
            test_end=d.test_end, val_days=d.val_days, scale_target=d.scale_target,
        )  # fmt: skip
        self._stock = stock
        X, y, rows = self.data.splits["train"]
        if d.limit_train and d.limit_train < len(y):  # keep the most recent windows: the test period follows
            log.info("data.limit_train=%d: using the last %d of %d training windows", d.limit_train,
                     d.limit_train, len(y))
            X, y, rows = X[-d.limit_train :], y[-d.limit_train :], rows.iloc[-d.limit_train :]
        self.X = {s: torch.from_numpy(np.ascontiguousarray(self.data.splits[s][0])) for s in ("val", "test")}
        self.X["train"] = torch.from_numpy(np.ascontiguousarray(X))
        scale = self.data.target_scaler
        self.y_scaled = {
            "train": torch.from_numpy(scale.transform(y).astype(np.float32)),
            **{s: torch.from_numpy(scale.transform(self.data.splits[s][1]).astype(np.float32)) for s in ("val", "test")},
        }
        self.loss_name = self.config.train.loss
        self.huber_delta = self.config.train.huber_delta

    def has_validation(self) -> bool:
        return len(self.data.splits["val"][1]) > 0

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
        return stock_loss(model(*batch.inputs).float(), batch.targets, self.loss_name, self.huber_delta)

    @torch.no_grad()
    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        X = self.X[split]
        mine = self._share(np.arange(len(X)))
        preds = []
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = torch.from_numpy(mine[start : start + self.eval_batch_size])
            with accelerator.autocast():
                preds.append(model(X[chunk].to(self.device)).float().cpu().numpy())
        local = np.concatenate(preds) if preds else np.zeros(0, np.float32)
        pieces = gather(accelerator, (mine, local))
        scaled = np.empty(len(X), dtype=np.float64)
        scaled[np.concatenate([p[0] for p in pieces])] = np.concatenate([p[1] for p in pieces])
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
