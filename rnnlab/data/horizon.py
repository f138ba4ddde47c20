"""Multi-step forecasting data: windows of daily features ending at day t's close, and the log returns of the
closes t+1 .. t+H from day t's close (the ``horizon`` job).

Origins. Day t is an *origin* when the file holds H trading days after it. The window of an origin is the
``window`` feature rows t-L+1 .. t. Each row s holds features that read nothing after day s: the chapter's
features of rnnlab.data.stock (prices to day s-1 plus day s's open) and three of day s itself (its close-to-close
log return, its open-to-close log return and its high/low log range), since at the origin day t's close is known.

Protocols (both hold out the training period's last year for choosing): ``chapter`` trains to 2021, validates on
2022 and tests on 2023-H1 (the stock job's split: the train period to 2022-12-31 with its last year held out);
``backtest`` trains to 2018, validates on 2019 and tests on 2020-01 .. 2023-06. Train and validation origins need
their H target days inside their own part (no target crosses into the next part); test origins are every test
day with H days after it in the file. Features are scaled with the training part's statistics, the targets per
horizon with the training part's (its mean and standard deviation).

Nothing after an origin is read to build its window (``tests/test_horizon.py`` shifts the future and checks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rnnlab.data.stock import FEATURE_NAMES, WARMUP_ROWS, Scaler, make_features, read_prices
from rnnlab.errors import DataError, InputError

log = logging.getLogger(__name__)

# Features of day s itself (known at day s's close).
DAY_FEATURES = ["day_return", "day_intraday", "day_range"]
# The chapter's features that do not depend on the index level (ratios, returns, moving averages of returns),
# with the price spreads divided by the previous close; "scale_free" windows use these.
_SCALE_FREE_CHAPTER = [name for name in FEATURE_NAMES if name.startswith(("ratio_", "return_", "moving_avg_"))]
_RELATIVE = ["open_gap", "rel_std_price_5", "rel_std_price_30", "rel_std_price_365", "rel_high_low_1"]
FEATURE_SETS: dict[str, list[str]] = {
    "chapter": [*FEATURE_NAMES, *DAY_FEATURES],
    "scale_free": [*_SCALE_FREE_CHAPTER, *_RELATIVE, *DAY_FEATURES],
}

# Protocols: train_end, val_end (validation = (train_end, val_end]), test_start, test_end.
PROTOCOLS: dict[str, dict[str, str]] = {
    "chapter": {"train_end": "2021-12-31", "val_end": "2022-12-31", "test_start": "2023-01-01",
                "test_end": "2023-06-30"},
    "backtest": {"train_end": "2018-12-31", "val_end": "2019-12-31", "test_start": "2020-01-01",
                 "test_end": "2023-06-30"},
}


def history_rows(window: int) -> int:
    """Price rows one forecast needs: the 254 warm-up days of the 252-day features plus the window."""
    return WARMUP_ROWS + window


def horizon_features(prices: pd.DataFrame, feature_set: str = "scale_free") -> pd.DataFrame:
    """Feature rows (FEATURE_SETS[feature_set]) for every day of ``prices`` past the warm-up, plus ``close``.

    ``prices``: read_prices' frame (Open, High, Low, Close, Volume by date). Row s reads prices up to day s.
    Rows with an undefined feature (the warm-up, a zero-volume ratio) are dropped.
    """
    if feature_set not in FEATURE_SETS:
        raise DataError(f"Unknown feature set {feature_set!r}; choose one of {', '.join(FEATURE_SETS)}.")
    chapter = make_features(prices)
    frame = chapter.copy()
    close = prices["Close"]
    frame["day_return"] = np.log(close / close.shift(1)).reindex(frame.index)
    frame["day_intraday"] = np.log(prices["Close"] / prices["Open"]).reindex(frame.index)
    frame["day_range"] = np.log(prices["High"] / prices["Low"]).reindex(frame.index)
    frame["open_gap"] = np.log(frame["open"] / frame["close_1"])
    for label in ("5", "30", "365"):
        frame[f"rel_std_price_{label}"] = frame[f"std_price_{label}"] / frame["close_1"]
    frame["rel_high_low_1"] = np.log(frame["high_1"] / frame["low_1"])
    names = FEATURE_SETS[feature_set]
    out = frame[[*names, "close"]].replace([np.inf, -np.inf], np.nan)
    return out[~out[names].isna().any(axis=1)]


def future_log_returns(close: np.ndarray, horizon: int) -> np.ndarray:
    """[N, H]: log(close[i+h] / close[i]) for h = 1..H; NaN where the file ends first."""
    close = np.asarray(close, dtype=np.float64)
    out = np.full((len(close), horizon), np.nan)
    logc = np.log(close)
    for h in range(1, horizon + 1):
        out[: len(close) - h, h - 1] = logc[h:] - logc[: len(close) - h]
    return out


@dataclass
class HorizonSplit:
    X: np.ndarray  # float32 [N, window, F], scaled
    y: np.ndarray  # float64 [N, H] log returns from the origin's close (NaN never: origins have H days after)
    origins: pd.DatetimeIndex  # day t of each window
    close: np.ndarray  # float64 [N]: day t's close
    future_close: np.ndarray  # float64 [N, H]: the closes t+1 .. t+H
    origin_scale: np.ndarray  # float64 [N]: the recent daily volatility at t the targets are divided by (1: off)


@dataclass
class HorizonData:
    scaler: Scaler  # features, fit on the training part
    target_scaler: Scaler  # per-horizon scale (mean 0) of the training origins' log returns / origin_scale
    window: int
    horizon: int
    feature_set: str
    feature_names: list[str]
    splits: dict[str, HorizonSplit]
    naive_scale: float  # mean |close_s - close_{s-1}| over the training part: MASE's denominator (prices)
    naive_scale_log: float  # the same on log closes
    closes: pd.Series  # every close in the file, by date (baselines read their trailing part)

    @property
    def num_features(self) -> int:
        return len(self.feature_names)


def load_horizon_data(
    path: Path | str,
    *,
    window: int = 21,
    horizon: int = 5,
    feature_set: str = "scale_free",
    vol_days: int = 32,
    vol: str = "ewma",
    train_end: str = PROTOCOLS["chapter"]["train_end"],
    val_end: str = PROTOCOLS["chapter"]["val_end"],
    test_start: str = PROTOCOLS["chapter"]["test_start"],
    test_end: str = PROTOCOLS["chapter"]["test_end"],
) -> HorizonData:
    """Read, featurize, split, scale (fit on the training part) and window a price file by rolling origins."""
    prices = read_prices(path)
    features = horizon_features(prices, feature_set)
    names = FEATURE_SETS[feature_set]
    train_end_, val_end_ = pd.Timestamp(train_end), pd.Timestamp(val_end)
    test_start_, test_end_ = pd.Timestamp(test_start), pd.Timestamp(test_end)
    if not train_end_ <= val_end_ < test_start_ <= test_end_:
        raise DataError(f"Need train_end <= val_end < test_start <= test_end; got {train_end}, {val_end}, "
                        f"{test_start}, {test_end}.")
    close_all = prices["Close"]
    # targets by price row, so a feature row dropped mid-file never shortens the horizon
    price_pos = close_all.index.get_indexer(features.index)
    future = future_log_returns(close_all.to_numpy(), horizon)[price_pos]
    future_dates = np.full((len(price_pos), horizon), np.datetime64("NaT"), dtype="datetime64[ns]")
    dates_all = close_all.index.to_numpy()
    for h in range(1, horizon + 1):
        ok = price_pos + h < len(dates_all)
        future_dates[ok, h - 1] = dates_all[price_pos[ok] + h]
    last_target = future_dates[:, -1]

    index = features.index
    in_train = index <= train_end_
    if in_train.sum() < window + horizon:
        raise DataError(f"The training part (to {train_end}) has {int(in_train.sum())} feature rows; it needs more "
                        f"than a window of {window} days and a horizon of {horizon}.")
    scaler = Scaler.fit(features[in_train], names)
    scaled = scaler.transform(features).astype(np.float32)
    naive_scale, naive_scale_log = naive_scales(close_all, train_end_)

    has_future = ~np.isnat(last_target)
    parts = {
        "train": in_train & has_future & (last_target <= np.datetime64(train_end_)),
        "val": (index > train_end_) & (index <= val_end_) & has_future & (last_target <= np.datetime64(val_end_)),
        "test": (index >= test_start_) & (index <= test_end_) & has_future,
    }
    positions = np.arange(len(index))
    splits = {}
    closes = features["close"].to_numpy(dtype=np.float64)
    volatility = recent_volatility(close_all.to_numpy(), vol_days, vol)[price_pos]
    for name, mask in parts.items():
        pos = positions[mask]
        pos = pos[pos >= window - 1]  # a full window of feature rows before the origin
        X = _windows(scaled, pos, window)
        y = future[pos]
        fut_close = closes[pos, None] * np.exp(y)
        splits[name] = HorizonSplit(X=X, y=y, origins=index[pos], close=closes[pos], future_close=fut_close,
                                    origin_scale=volatility[pos])
    if len(splits["train"].y) == 0:
        raise DataError("No training origins: the training part is shorter than a window plus the horizon.")
    if len(splits["test"].y) == 0:
        raise DataError(f"No test origin from {test_start} to {test_end} has {horizon} days after it in the file.")
    train = splits["train"]
    target_scaler = Scaler.fit(train.y / train.origin_scale[:, None], [f"h{h}" for h in range(1, horizon + 1)])
    target_scaler.mean[:] = 0.0  # zero stays zero: a median of 0 is the random walk's
    return HorizonData(scaler=scaler, target_scaler=target_scaler, window=window, horizon=horizon,
                       feature_set=feature_set, feature_names=list(names), splits=splits, naive_scale=naive_scale,
                       naive_scale_log=naive_scale_log, closes=close_all)


def naive_scales(close: pd.Series, until: pd.Timestamp) -> tuple[float, float]:
    """MASE's denominators: the mean absolute one-day change of the closes up to ``until`` (the whole series when
    fewer than two come by then), in prices and in log prices."""
    before = close[close.index <= until]
    values = (before if len(before) > 1 else close).to_numpy(dtype=np.float64)
    return float(np.mean(np.abs(np.diff(values)))), float(np.mean(np.abs(np.diff(np.log(values)))))


def recent_volatility(close: np.ndarray, days: int, kind: str = "ewma") -> np.ndarray:
    """[N]: the recent daily volatility at each day, from the daily log returns up to and including it (reads
    nothing later): ``ewma`` the root of an exponentially weighted mean of squared returns with span ``days``
    (32: RiskMetrics' lambda = 0.94), ``std`` the standard deviation of the last ``days`` returns; 1 everywhere
    when ``days`` is 0 (the targets are then scaled by the training part alone)."""
    close = np.asarray(close, dtype=np.float64)
    if days == 0:
        return np.ones(len(close))
    returns = pd.Series(np.log(close)).diff()
    if kind == "ewma":
        vol = np.sqrt((returns**2).ewm(span=days, min_periods=2).mean().to_numpy())
    elif kind == "std":
        vol = returns.rolling(days, min_periods=2).std(ddof=0).to_numpy()
    else:
        raise DataError(f"Unknown volatility {kind!r}; choose ewma or std.")
    floor = 1e-4
    return np.where(np.isfinite(vol), np.maximum(vol, floor), floor)


def _windows(scaled: np.ndarray, positions: np.ndarray, window: int) -> np.ndarray:
    """X[i] = scaled[positions[i]-window+1 : positions[i]+1] (float32 [N, window, F])."""
    if len(positions) == 0:
        return np.zeros((0, window, scaled.shape[1]), dtype=np.float32)
    offsets = np.arange(-window + 1, 1)
    return np.ascontiguousarray(scaled[positions[:, None] + offsets[None, :]], dtype=np.float32)


def rolling_origins(prices: pd.DataFrame, scaler: Scaler, *, window: int, horizon: int, feature_set: str,
                    vol_days: int, vol: str = "ewma", start=None, end=None) -> HorizonSplit:
    """Every day of ``prices`` from ``start`` to ``end`` (inclusive; None = open-ended) with a full window before
    it and ``horizon`` days after it in the file, as origins scaled with a bundle's ``scaler``: what
    ``rnnlab evaluate BUNDLE --data`` scores. A span with no such day is a DataError."""
    features = horizon_features(prices, feature_set)
    close_all = prices["Close"]
    price_pos = close_all.index.get_indexer(features.index)
    future = future_log_returns(close_all.to_numpy(), horizon)[price_pos]
    volatility = recent_volatility(close_all.to_numpy(), vol_days, vol)[price_pos]
    scaled = scaler.transform(features[scaler.columns]).astype(np.float32)
    index = features.index
    keep = (np.arange(len(index)) >= window - 1) & ~np.isnan(future).any(axis=1)
    if start is not None:
        keep &= index >= pd.Timestamp(start)
    if end is not None:
        keep &= index <= pd.Timestamp(end)
    pos = np.flatnonzero(keep)
    if len(pos) == 0:
        raise DataError(
            f"No day from {start or 'the start'} to {end or 'the end'} is an origin: with the 252-day warm-up, "
            f"windows of {window} days and {horizon} days after it, the data spans {index[0].date() if len(index) else '-'}"
            f"..{index[-1].date() if len(index) else '-'}; choose dates inside it.")
    closes = features["close"].to_numpy(dtype=np.float64)
    y = future[pos]
    return HorizonSplit(X=_windows(scaled, pos, window), y=y, origins=index[pos], close=closes[pos],
                        future_close=closes[pos, None] * np.exp(y), origin_scale=volatility[pos])


def window_for_history(prices: pd.DataFrame, scaler: Scaler, *, window: int, feature_set: str, vol_days: int,
                       vol: str = "ewma") -> tuple[np.ndarray, pd.Timestamp, float, float]:
    """The scaled window of the last day of a validated price history (read_prices' layout): the forecast's
    origin. Returns (X [window, F], origin date, origin close, origin scale). Too short a history or an undefined
    feature in the window is an InputError."""
    needed = history_rows(window)
    if len(prices) < needed:
        raise InputError(f"The price history has {len(prices)} rows but a forecast with windows of {window} days "
                         f"needs at least {needed} (254 warm-up days for the 252-day features plus the window).")
    try:
        features = horizon_features(prices.iloc[-(needed + 1):] if len(prices) > needed else prices, feature_set)
    except DataError:  # not one feature row is defined (zero volumes throughout): this history's fault
        features = prices.iloc[:0]
    if len(features) < window or features.index[-1] != prices.index[-1]:
        raise InputError("The price history gives undefined features for its last days (a zero volume or constant "
                         "prices make a ratio 0/0); send a history with non-zero volumes.")
    X = scaler.transform(features[scaler.columns].iloc[-window:]).astype(np.float32)
    scale = recent_volatility(prices["Close"].to_numpy(), vol_days, vol)[-1]
    return X, features.index[-1], float(features["close"].iloc[-1]), float(scale)


def random_walk_quantiles(closes: pd.Series, origins: pd.DatetimeIndex, horizon: int, quantiles, *,
                          lookback: int = 252, drift: bool = False, drift_from: str | None = None) -> np.ndarray:
    """The random walk's price quantiles [N, H, Q] at each origin, by historical simulation.

    The median is the origin's close (with ``drift``: times exp(h * mean daily log return of every day up to the
    origin, from ``drift_from`` on)); the other quantiles add the empirical quantiles of the trailing ``lookback``
    days' h-day log returns, centred on their median. Reads nothing after each origin.
    """
    logc = np.log(closes.to_numpy(dtype=np.float64))
    pos = closes.index.get_indexer(origins)
    if (pos < 0).any():
        raise DataError("An origin is not a date of the price series.")
    q = np.asarray(quantiles, dtype=np.float64)
    out = np.empty((len(pos), horizon, len(q)))
    daily = np.diff(logc, prepend=np.nan)
    start = 0 if drift_from is None else int(np.searchsorted(closes.index, pd.Timestamp(drift_from)))
    cum = np.nancumsum(np.where(np.arange(len(daily)) > start, daily, 0.0))
    for i, p in enumerate(pos):
        mu = (cum[p] / max(1, p - start)) if drift else 0.0
        for h in range(1, horizon + 1):
            lo = max(0, p - lookback - h + 1)
            past = logc[lo + h : p + 1] - logc[lo : p + 1 - h]  # h-day returns ending in the trailing window
            offsets = np.quantile(past, q) - np.quantile(past, 0.5)
            out[i, h - 1] = logc[p] + h * mu + offsets
    return np.exp(out)
