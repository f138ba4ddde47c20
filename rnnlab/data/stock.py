"""Daily stock prices -> the chapter's 37 features, date splits, a JSON scaler and sliding windows.

The features are those of ``generate_features`` in *Python Machine Learning by Example* (4th ed., ch. 5),
under the chapter's names. "30" and "365" in the names mean 21 and 252 trading days, as in the chapter.
Every feature at day t uses prices up to day t-1, except ``open`` (day t's open), and the target is day
t's ``close``: the model sees the morning and predicts the evening.

One computation gives the features for training, scoring and serving (:func:`forecast_features`): each day's
from the rows its own windows read, so a forecast from a 259-row request gets the very bits training saw for
that day. The first ``WARMUP_ROWS`` = 254 rows of a series never get features (see :mod:`rnnlab.data.prices`,
which reads and validates the prices; its names are importable from here too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from rnnlab.data.prices import (  # noqa: F401 -- re-exported: jobs, inference and scoring import them from here
    MIN_ROWS,
    PERIODS,
    PRICE_COLUMNS,
    REQUIRED_COLUMNS,
    TRUST_PRICES_MEANS,
    VALUE_COLUMNS,
    WARMUP_ROWS,
    PriceHistory,
    TrustedHistory,
    min_history_rows,
    read_history,
    read_prices,
)
from rnnlab.data.scaler import Scaler  # re-exported: bundles and the service import it from here
from rnnlab.errors import DataError

log = logging.getLogger(__name__)

FEATURE_NAMES: list[str] = [
    "open", "open_1", "close_1", "high_1", "low_1", "volume_1",
    "avg_price_5", "avg_price_30", "avg_price_365",
    "ratio_avg_price_5_30", "ratio_avg_price_5_365", "ratio_avg_price_30_365",
    "avg_volume_5", "avg_volume_30", "avg_volume_365",
    "ratio_avg_volume_5_30", "ratio_avg_volume_5_365", "ratio_avg_volume_30_365",
    "std_price_5", "std_price_30", "std_price_365",
    "ratio_std_price_5_30", "ratio_std_price_5_365", "ratio_std_price_30_365",
    "std_volume_5", "std_volume_30", "std_volume_365",
    "ratio_std_volume_5_30", "ratio_std_volume_5_365", "ratio_std_volume_30_365",
    "return_1", "return_5", "return_30", "return_365",
    "moving_avg_5", "moving_avg_30", "moving_avg_365",
]  # fmt: skip
TARGET_COLUMN = "close"
# The chapter's split, the one place it is written: train up to TRAIN_END (its last VAL_DAYS trading days held out
# for validation), test TEST_START..TEST_END. The stock job's data.* keys default to these.
TRAIN_END, TEST_START, TEST_END, VAL_DAYS = "2022-12-31", "2023-01-01", "2023-06-30", 252

TARGETS = ("close", "log_return")

UNDEFINED_FEATURES = (
    "The price history gives undefined features for its last days (a zero volume or constant prices make a ratio "
    "0/0); send a history with non-zero volumes."
)


def forecast_features(values: np.ndarray, window: int) -> np.ndarray:
    """FEATURE_NAMES for the last ``window`` days of each history: ``values`` [B, rows, 5] (Open, High, Low,
    Close, Volume, oldest first; only the last ``min_history_rows(window)`` rows are read) -> [B, window, 37].

    The chapter's generate_features (pandas rolling windows, then shift(1)), computed from each day's own rows,
    two-pass, vectorised over the batch: a day's features do not depend on how much history came before its
    windows (pandas' rolling sums carry rounding from every earlier row, up to ~1e-9 of a value). A row with an
    undefined feature (a ratio with a zero denominator) is NaN.
    """
    values = np.asarray(values, dtype=np.float64)[:, -min_history_rows(window):]
    if values.ndim != 3 or values.shape[1] < min_history_rows(window):
        raise ValueError(f"need [batch, >= {min_history_rows(window)} rows, 5] prices, got {values.shape}")
    open_, high, low, close, volume = (values[..., i] for i in range(5))
    days = slice(-window, None)  # the forecast days; day t's features read rows up to t-1

    def before(series: np.ndarray, length: int) -> np.ndarray:
        """[B, window, length]: the ``length`` values before each forecast day."""
        return sliding_window_view(series[:, :-1], length, axis=1)[:, -window:]

    # return_d for day t is (close[t-1] - close[t-1-d]) / close[t-1-d], elementwise as pandas computes it
    def returns(days_back: int) -> np.ndarray:
        previous = close[:, :-1]
        change = (previous[:, days_back:] - previous[:, :-days_back]) / previous[:, :-days_back]
        return np.concatenate([np.full((len(close), days_back + 1), np.nan), change], axis=1)

    return_1 = returns(1)
    out = {
        "open": open_[:, days],
        "open_1": open_[:, :-1][:, -window:],
        "close_1": close[:, :-1][:, -window:],
        "high_1": high[:, :-1][:, -window:],
        "low_1": low[:, :-1][:, -window:],
        "volume_1": volume[:, :-1][:, -window:],
    }
    for kind, series in (("price", close), ("volume", volume)):
        for label, length in PERIODS.items():
            out[f"avg_{kind}_{label}"], out[f"std_{kind}_{label}"] = _mean_std(before(series, length))
    for stat in ("avg", "std"):
        for kind in ("price", "volume"):
            for short, long in (("5", "30"), ("5", "365"), ("30", "365")):
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = out[f"{stat}_{kind}_{short}"] / out[f"{stat}_{kind}_{long}"]
                out[f"ratio_{stat}_{kind}_{short}_{long}"] = ratio
    out["return_1"] = return_1[:, days]
    for label, length in PERIODS.items():
        out[f"return_{label}"] = returns(length)[:, days]
        out[f"moving_avg_{label}"] = _mean_std(before(return_1, length), std=False)[0]
    features = np.stack([out[name] for name in FEATURE_NAMES], axis=-1)
    features[~np.isfinite(features)] = np.nan
    return features


def _mean_std(windows: np.ndarray, *, std: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and sample std (ddof=1) over the last axis, two-pass (``std=False``: the mean alone); a window of one
    repeated value gets that value and 0 exactly (as pandas' rolling gives it), not a rounding residue."""
    windows = np.array(windows, dtype=np.float64, order="C")  # a copy (of a view): worked on in place below
    length = windows.shape[-1]
    raw_mean = windows.sum(axis=-1) / length
    constant = windows.max(axis=-1) == windows.min(axis=-1)
    mean = np.where(constant, windows[..., 0], raw_mean)
    if not std:
        return mean, None
    deviations = np.subtract(windows, raw_mean[..., None], out=windows)
    squares = np.multiply(deviations, deviations, out=deviations)
    return mean, np.where(constant, 0.0, np.sqrt(squares.sum(axis=-1) / (length - 1)))


# Feature rows computed at once: bounds the [days, 252] window copies to a few MB whatever the file's length.
_FEATURE_BLOCK = 1024


def make_features(prices: pd.DataFrame) -> pd.DataFrame:
    """FEATURE_NAMES + "close" per day of a price frame (:func:`read_prices`); the warm-up rows are dropped and
    counted in the log. Ratios with a zero denominator (e.g. zero volume) are undefined and dropped like the
    warm-up, counted. Each row is :func:`forecast_features` of the rows before it, to the bit.
    """
    values = prices[VALUE_COLUMNS].to_numpy(dtype=np.float64)
    log.info("Features: dropped %d warm-up rows (the 252-day windows).", int(min(WARMUP_ROWS, len(values))))
    days = max(len(values) - WARMUP_ROWS, 0)
    blocks = [
        forecast_features(values[None, start : WARMUP_ROWS + min(start + _FEATURE_BLOCK, days)],
                          min(_FEATURE_BLOCK, days - start))[0]
        for start in range(0, days, _FEATURE_BLOCK)
    ]
    features = np.concatenate(blocks) if blocks else np.zeros((0, len(FEATURE_NAMES)))
    frame = pd.DataFrame(features, index=prices.index[WARMUP_ROWS:], columns=FEATURE_NAMES)
    frame[TARGET_COLUMN] = values[WARMUP_ROWS:, VALUE_COLUMNS.index("Close")]
    undefined = frame.isna().any(axis=1).to_numpy()
    if undefined.any():
        log.warning("Features: dropped %d more rows with undefined features (e.g. a zero-volume ratio).",
                    int(undefined.sum()))
    frame = frame[~undefined]
    if frame.empty:
        raise DataError(
            f"No feature rows are left after the 252-day warm-up ({len(prices)} price rows); "
            f"supply at least {MIN_ROWS} rows with non-zero volume."
        )
    return frame


# ---------------------------------------------------------------------------------------------------------
# Splits, scaling, windows


def split_by_date(
    frame: pd.DataFrame,
    *,
    train_end: str = TRAIN_END,
    test_start: str = TEST_START,
    test_end: str = TEST_END,
    val_days: int = VAL_DAYS,
) -> dict[str, pd.DataFrame]:
    """train / val / test by date: val is the last ``val_days`` rows up to ``train_end``, train the rows before.

    With ``val_days=0`` train is the whole period up to ``train_end`` (the chapter's split) and val is empty.
    """
    index = frame.index
    train_period = frame[index <= pd.Timestamp(train_end)]
    test = frame[(index >= pd.Timestamp(test_start)) & (index <= pd.Timestamp(test_end))]
    if val_days < 0 or val_days >= len(train_period):
        raise DataError(
            f"val_days={val_days} leaves no training rows: the period up to {train_end} has "
            f"{len(train_period)} feature rows; choose a smaller val_days or a later train_end."
        )
    if test.empty:
        raise DataError(
            f"The test period {test_start}..{test_end} has no feature rows (the data spans "
            f"{index[0].date()}..{index[-1].date()}); choose test dates inside the data."
        )
    if pd.Timestamp(test_start) <= pd.Timestamp(train_end):
        raise DataError(f"test_start {test_start} must come after train_end {train_end}.")
    unused = len(frame) - len(train_period) - len(test)
    if unused:
        log.info("Split: %d feature rows fall outside train and test and are not used.", unused)
    cut = len(train_period) - val_days
    return {"train": train_period.iloc[:cut], "val": train_period.iloc[cut:], "test": test}


def make_windows(features: np.ndarray, targets: np.ndarray, length: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """X[i] = features[i:i+length] (float32, [N-length+1, length, F]); y[i] = targets[i+length-1]."""
    features = np.asarray(features)
    targets = np.asarray(targets)
    if length < 1:
        raise ValueError(f"window length must be at least 1, got {length}")
    if len(features) != len(targets):
        raise ValueError(f"features ({len(features)} rows) and targets ({len(targets)}) differ in length")
    if len(features) < length:
        return (np.zeros((0, length, features.shape[1]), dtype=np.float32), np.zeros(0, dtype=np.float32))
    # sliding_window_view puts the window axis last: [N-L+1, F, L] -> [N-L+1, L, F]
    windows = sliding_window_view(features, length, axis=0).transpose(0, 2, 1)
    return np.ascontiguousarray(windows, dtype=np.float32), np.asarray(targets[length - 1:], dtype=np.float32)


def windows_between(
    features: pd.DataFrame, scaler: Scaler, window: int, start=None, end=None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Scaled windows (float32 [N, window, F]) for the feature rows dated from ``start`` to ``end`` (inclusive;
    None = open-ended), and those N rows. A day needs ``window - 1`` feature rows before it, so the first
    predictable day is the ``window``-th feature row; a range with no predictable day is a DataError."""
    scaled = scaler.transform(features).astype(np.float32)
    X, _ = make_windows(scaled, np.zeros(len(features)), window)
    rows = features.iloc[window - 1 :]
    keep = np.ones(len(rows), dtype=bool)
    if start is not None:
        keep &= rows.index >= pd.Timestamp(start)
    if end is not None:
        keep &= rows.index <= pd.Timestamp(end)
    if not keep.any():
        span = f"{rows.index[0].date()}..{rows.index[-1].date()}" if len(rows) else "no day"
        raise DataError(
            f"No day from {start or 'the start'} to {end or 'the end'} can be forecast: with the 252-day warm-up "
            f"and windows of {window} days the data gives forecasts for {span}; choose dates inside that span."
        )
    return X[keep], rows[keep]


def target_values(frame: pd.DataFrame, kind: str) -> np.ndarray:
    """The training target: the close level, or the intraday log return log(close / open)."""
    _check_target(kind)
    close = frame[TARGET_COLUMN].to_numpy(dtype=np.float64)
    if kind == "close":
        return close
    return np.log(close / frame["open"].to_numpy(dtype=np.float64))


def to_price(pred: np.ndarray, frame_rows: pd.DataFrame, kind: str) -> np.ndarray:
    """Map predictions of ``kind`` for ``frame_rows`` (same order) back to close prices."""
    _check_target(kind)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    if kind == "close":
        return pred
    return frame_rows["open"].to_numpy(dtype=np.float64) * np.exp(pred)


def _check_target(kind: str) -> None:
    if kind not in TARGETS:
        raise ValueError(f"unknown stock target {kind!r}; choose one of {', '.join(TARGETS)}")


@dataclass
class StockData:
    """Everything a stock job needs. ``splits[name] = (X, y, frame_rows)``.

    X: float32 [N, window, 37] features scaled by ``scaler`` (fit on train only). y: float32 [N] raw target
    (close level or log return; train on ``target_scaler.transform(y)`` and invert predictions with
    ``target_scaler.inverse_transform``). frame_rows: the N unscaled feature rows the predictions belong to
    (``to_price(pred, frame_rows, target)`` gives close prices; baselines take them too).
    """

    scaler: Scaler
    target_scaler: Scaler
    target: str
    window: int
    splits: dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]]
    feature_names: list[str]

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def to_price(self, pred: np.ndarray, split: str) -> np.ndarray:
        return to_price(pred, self.splits[split][2], self.target)


def load_stock_data(
    path: Path | str,
    *,
    window: int = 5,
    target: str = "close",
    train_end: str = TRAIN_END,
    test_start: str = TEST_START,
    test_end: str = TEST_END,
    val_days: int = VAL_DAYS,
    scale_target: bool = True,
) -> StockData:
    """Read, featurize, split, scale (fit on train) and window a price file.

    Train windows lie inside train (its first window-1 days only serve as context); val and test windows
    take the preceding rows as context, so every val and test day gets a prediction. ``scale_target=False``
    leaves the target in its own units (an identity ``target_scaler``), as the chapter trains on the raw close.
    """
    _check_target(target)
    features = make_features(read_prices(path))
    parts = split_by_date(features, train_end=train_end, test_start=test_start, test_end=test_end,
                          val_days=val_days)
    scaler = Scaler.fit(parts["train"], FEATURE_NAMES)
    if scale_target:
        target_scaler = Scaler.fit(target_values(parts["train"], target), [target])
    else:
        target_scaler = Scaler(mean=np.zeros(1), scale=np.ones(1), columns=[target])
    scaled = scaler.transform(features).astype(np.float32)
    targets = target_values(features, target)
    positions = {name: features.index.get_indexer(part.index) for name, part in parts.items()}

    splits: dict[str, tuple[np.ndarray, np.ndarray, pd.DataFrame]] = {}
    for name, part in parts.items():
        if part.empty:
            X, y = make_windows(scaled[:0], targets[:0], window)
            splits[name] = (X, y, part)
            continue
        first, last = int(positions[name][0]), int(positions[name][-1])
        start = first if name == "train" else first - (window - 1)
        if start < 0:
            raise DataError(
                f"The {name} split starts at the first feature row, leaving no {window - 1} days of context for "
                "its windows; move its start date later."
            )
        X, y = make_windows(scaled[start:last + 1], targets[start:last + 1], window)
        rows = part.iloc[window - 1:] if name == "train" else part
        splits[name] = (X, y, rows)
    if len(splits["train"][1]) == 0:
        raise DataError(f"The train split has fewer rows than one window of {window} days; use a smaller window.")
    return StockData(scaler=scaler, target_scaler=target_scaler, target=target, window=window, splits=splits,
                     feature_names=list(FEATURE_NAMES))


def request_rows(prices: pd.DataFrame) -> list[dict]:
    """A price frame (:func:`read_prices`) as a forecast request's rows: date, open, high, low, close, volume."""
    return [{"date": day.strftime("%Y-%m-%d"), "open": float(r.Open), "high": float(r.High), "low": float(r.Low),
             "close": float(r.Close), "volume": float(r.Volume)} for day, r in zip(prices.index, prices.itertuples())]


def example_request(path: Path | str, window: int) -> dict:
    """The last rows one forecast from windows of ``window`` days reads from a price file, as a request body
    ``{"rows": [...]}``: what a forecaster's bundle keeps as its example."""
    return {"rows": request_rows(read_prices(path).tail(min_history_rows(window)))}


# ---------------------------------------------------------------------------------------------------------
# Baselines, metrics, summary


def naive_same_day_open(frame: pd.DataFrame) -> np.ndarray:
    """Forecast close = the same day's open (known when the forecast is made)."""
    return frame["open"].to_numpy(dtype=np.float64)


def naive_previous_close(frame: pd.DataFrame) -> np.ndarray:
    """Forecast close = the previous day's close (persistence)."""
    return frame["close_1"].to_numpy(dtype=np.float64)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """R^2, mean absolute error and mean absolute percentage error (a fraction), as scikit-learn computes them."""
    from sklearn.metrics import mean_absolute_error, mean_absolute_percentage_error, r2_score

    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need equal non-empty arrays, got {y_true.shape} and {y_pred.shape}")
    r2 = r2_score(y_true, y_pred) if np.ptp(y_true) > 0 else float("nan")  # R^2 of a constant series is undefined
    return {"r2": float(r2), "mae": float(mean_absolute_error(y_true, y_pred)),
            "mape": float(mean_absolute_percentage_error(y_true, y_pred))}


def summarize_stock(
    path: Path | str,
    *,
    train_end: str = TRAIN_END,
    test_start: str = TEST_START,
    test_end: str = TEST_END,
    val_days: int = VAL_DAYS,
) -> dict[str, Any]:
    """Facts about a price file for ``rnnlab data stock``: rows, span, features, split sizes, naive baselines."""
    prices = read_prices(path)
    features = make_features(prices)
    parts = split_by_date(features, train_end=train_end, test_start=test_start, test_end=test_end,
                          val_days=val_days)

    def span(frame: pd.DataFrame) -> str | None:
        return f"{frame.index[0].date()}..{frame.index[-1].date()}" if len(frame) else None

    baselines = {
        split: {
            "same_day_open": regression_metrics(parts[split][TARGET_COLUMN], naive_same_day_open(parts[split])),
            "previous_close": regression_metrics(parts[split][TARGET_COLUMN], naive_previous_close(parts[split])),
        }
        for split in ("val", "test")
        if len(parts[split])
    }
    return {
        "file": str(path),
        "rows": len(prices),
        "first_date": str(prices.index[0].date()),
        "last_date": str(prices.index[-1].date()),
        "features": len(FEATURE_NAMES),
        "feature_rows": len(features),
        "warmup_rows_dropped": min(WARMUP_ROWS, len(prices)),
        # the chapter's "train" (before windowing): train + val here
        "train_period_rows": len(parts["train"]) + len(parts["val"]),
        "train_rows": len(parts["train"]),
        "val_rows": len(parts["val"]),
        "test_rows": len(parts["test"]),
        "train_span": span(parts["train"]),
        "val_span": span(parts["val"]),
        "test_span": span(parts["test"]),
        "baselines": baselines,
    }
