"""Daily stock prices -> the chapter's 37 features, date splits, a JSON scaler and sliding windows.

The features are those of ``generate_features`` in *Python Machine Learning by Example* (4th ed., ch. 5),
under the chapter's names. "30" and "365" in the names mean 21 and 252 trading days, as in the chapter.
Every feature at day t uses prices up to day t-1, except ``open`` (day t's open), and the target is day
t's ``close``: the model sees the morning and predicts the evening.

The longest feature, ``moving_avg_365`` (a 252-day mean of ``return_1``, itself lagged twice), is first
defined on the 255th row of a series, so the first ``WARMUP_ROWS`` = 254 rows never get features. One
prediction from windows of length L therefore needs ``min_history_rows(L)`` = 254 + L rows of history
(259 for the default L = 5); see ``features_for_history``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from rnnlab.errors import DataError, InputError, RnnlabError, first_line

log = logging.getLogger(__name__)

PRICE_COLUMNS = ["Date", "Open", "High", "Low", "Close", "Adj Close", "Volume"]
REQUIRED_COLUMNS = ["Date", "Open", "High", "Low", "Close", "Volume"]  # "Adj Close" is optional and unused
VALUE_COLUMNS = ["Open", "High", "Low", "Close", "Volume"]
PRICE_VALUE_COLUMNS = ["Open", "High", "Low", "Close"]

# Chapter window names -> trading days.
PERIODS = {"5": 5, "30": 21, "365": 252}

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

# moving_avg_365 = return_1 (first defined at row index 2) -> rolling(252) (+251) -> shift(1) (+1) = index 254.
WARMUP_ROWS = 2 + (PERIODS["365"] - 1) + 1
MIN_ROWS = WARMUP_ROWS + 1  # rows a price file needs for a single feature row

TARGETS = ("close", "log_return")

UNDEFINED_FEATURES = (
    "The price history gives undefined features for its last days (a zero volume or constant prices make a ratio "
    "0/0); send a history with non-zero volumes."
)

# Cells that mean "no value" (Yahoo writes "null" for days it has no quote).
_MISSING_TOKENS = {"", "null", "nan", "na", "n/a", "none", "-"}


def min_history_rows(window: int = 5) -> int:
    """Rows of price history needed for one prediction from windows of ``window`` feature rows (254 + L)."""
    return WARMUP_ROWS + window


# ---------------------------------------------------------------------------------------------------------
# Reading and validating prices


def read_prices(path: Path | str) -> pd.DataFrame:
    """Read a Yahoo-layout daily CSV into a frame indexed by ``Date`` with float Open, High, Low, Close, Volume.

    Rows with a missing value are dropped and counted in the log; every other fault is a DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Price file {path} does not exist; pass a Yahoo-layout daily CSV ({','.join(PRICE_COLUMNS)})."
        )
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"Price file {path} is not a readable CSV ({first_line(exc)}); export it again as CSV.") \
            from exc
    prices = _validate_prices(raw, f"Price file {path}", DataError, last_row_may_be_open_only=False)
    if len(prices) < MIN_ROWS:
        raise DataError(
            f"Price file {path} has {len(prices)} usable rows but the 252-day features need at least {MIN_ROWS}; "
            "use a longer price history."
        )
    return prices


def features_for_history(prices_frame: pd.DataFrame, *, window: int = 1) -> pd.DataFrame:
    """Validate a user-supplied price history and return its feature rows (for inference and serving).

    ``prices_frame`` holds one row per trading day, oldest first, with a date (a ``date``/``Date`` column or a
    DatetimeIndex) and open, high, low, close, volume (any capitalisation; numbers or numeric strings), e.g.
    ``pd.DataFrame(request_json["rows"])``. It needs at least ``min_history_rows(window)`` = 254 + window rows.

    To forecast day T's close, send the history through day T-1 plus a row for day T with its open; that last
    row's high, low, close and volume may be missing (None), as they are not known yet and no feature uses
    them. Any other missing, non-numeric, non-positive, unsorted or duplicated value is an InputError.

    Returns FEATURE_NAMES + "close" for every day past the warm-up (at least ``window`` rows); ``close`` of
    the last row is NaN when it was not given. Features are unscaled: apply the bundle's Scaler.
    """
    if not isinstance(prices_frame, pd.DataFrame):
        raise InputError("The price history must be a table of rows with date, open, high, low, close, volume.")
    raw = prices_frame
    if isinstance(raw.index, pd.DatetimeIndex) and not any(str(c).strip().lower() == "date" for c in raw.columns):
        raw = raw.reset_index(names="Date")
    prices = _validate_prices(raw.reset_index(drop=True), "The price history", InputError,
                              last_row_may_be_open_only=True)
    needed = min_history_rows(window)
    if len(prices) < needed:
        raise InputError(
            f"The price history has {len(prices)} rows but one prediction with windows of {window} days needs at "
            f"least {needed} (254 warm-up days for the 252-day features plus the window)."
        )
    features = _compute_features(prices).iloc[WARMUP_ROWS:].replace([np.inf, -np.inf], np.nan)
    if features[FEATURE_NAMES].iloc[-window:].isna().any(axis=None):
        raise InputError(UNDEFINED_FEATURES)
    return features


def _canonical_columns(raw: pd.DataFrame) -> dict[str, str]:
    """Map the frame's own column names to PRICE_COLUMNS, ignoring case and surrounding spaces."""
    wanted = {name.lower(): name for name in PRICE_COLUMNS}
    wanted["adj_close"] = "Adj Close"
    mapping: dict[str, str] = {}
    for column in raw.columns:
        key = str(column).strip().lower()
        if key in wanted and wanted[key] not in mapping.values():
            mapping[column] = wanted[key]
    return mapping


def _is_missing(cells: pd.Series) -> pd.Series:
    text = cells.astype(str).str.strip().str.lower()
    return cells.isna() | text.isin(_MISSING_TOKENS)


def _line(position: int) -> str:
    return f"row {position + 1}"


def _validate_prices(
    raw: pd.DataFrame, source: str, error: type[RnnlabError], *, last_row_may_be_open_only: bool
) -> pd.DataFrame:
    """The checks shared by CSV files (DataError) and request histories (InputError); returns typed prices."""
    mapping = _canonical_columns(raw)
    missing_columns = [c for c in REQUIRED_COLUMNS if c not in mapping.values()]
    if missing_columns:
        raise error(
            f"{source} lacks the column(s) {', '.join(missing_columns)}; it needs {', '.join(REQUIRED_COLUMNS)} "
            "(Yahoo daily layout)."
        )
    frame = raw.rename(columns=mapping)[REQUIRED_COLUMNS].reset_index(drop=True)
    if frame.empty:
        raise error(f"{source} has no rows; it needs at least {MIN_ROWS} trading days.")

    dates = _parse_dates(frame["Date"], source, error)
    duplicated = dates.duplicated()
    if duplicated.any():
        first = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise error(
            f"{source} has duplicate dates (first {dates[first].date()} at {_line(first)}); keep one row per day."
        )
    if not dates.is_monotonic_increasing:
        first = int(np.flatnonzero(np.diff(dates.to_numpy()) < np.timedelta64(0))[0]) + 1
        raise error(
            f"{source} has unsorted dates ({dates[first].date()} at {_line(first)} comes after "
            f"{dates[first - 1].date()}); sort the rows by date, oldest first."
        )

    values = pd.DataFrame(index=frame.index)
    missing = pd.DataFrame(index=frame.index)
    for column in VALUE_COLUMNS:
        cells = frame[column]
        missing[column] = _is_missing(cells)
        numbers = pd.to_numeric(cells.where(~missing[column]), errors="coerce")
        bad = numbers.isna() & ~missing[column]
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise error(
                f"{source} has a non-numeric {column} value {str(cells.iloc[first])!r} at {_line(first)}; "
                "fix or remove that row."
            )
        values[column] = numbers.astype(float)
    infinite = ~np.isfinite(values.fillna(0.0).to_numpy()).all(axis=1)
    if infinite.any():
        first = int(np.flatnonzero(infinite)[0])
        raise error(f"{source} has an infinite value at {_line(first)}; fix or remove that row.")
    values.index = pd.DatetimeIndex(dates, name="Date")
    missing.index = values.index

    row_missing = missing.any(axis=1)
    if last_row_may_be_open_only:
        # The day being forecast: only its open is known (and only its open is used).
        tail = missing.iloc[-1]
        if not tail["Open"]:
            row_missing.iloc[-1] = False
        if row_missing.any():
            first = int(np.flatnonzero(row_missing.to_numpy())[0])
            column = missing.columns[missing.iloc[first].to_numpy()][0]
            raise error(
                f"{source} has no {column} value at {_line(first)}; every row needs open, high, low, close and "
                "volume (only the last row may give just its open)."
            )
    elif row_missing.any():
        log.warning(
            "%s: dropped %d of %d rows with a missing value (first on %s).",
            source, int(row_missing.sum()), len(values), values.index[row_missing.to_numpy()][0].date(),
        )
        values = values[~row_missing.to_numpy()]

    nonpositive = (values[PRICE_VALUE_COLUMNS] <= 0).any(axis=1) | (values["Volume"] < 0)
    if nonpositive.any():
        day = values.index[nonpositive.to_numpy()][0]
        raise error(
            f"{source} has a non-positive price or negative volume on {day.date()}; prices must be above zero."
        )
    return values


def _parse_dates(cells: pd.Series, source: str, error: type[RnnlabError]) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(cells):
        dates = pd.to_datetime(cells)
    else:
        text = cells.astype(str).str.strip()
        dates = pd.to_datetime(text, format="ISO8601", errors="coerce")
        if dates.isna().any():  # not ISO: let pandas infer one consistent format (e.g. 01/02/1990)
            try:
                inferred = pd.to_datetime(text, errors="coerce")
            except (ValueError, TypeError):
                inferred = dates
            if inferred.isna().sum() < dates.isna().sum():
                dates = inferred
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_localize(None)
    if dates.isna().any():
        first = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise error(
            f"{source} has an unparseable date {str(cells.iloc[first])!r} at {_line(first)}; "
            "write dates as YYYY-MM-DD."
        )
    return dates.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# Features


def _compute_features(prices: pd.DataFrame) -> pd.DataFrame:
    """The chapter's generate_features without its final dropna (warm-up rows are NaN)."""
    open_, high, low, close, volume = (prices[c] for c in VALUE_COLUMNS)
    out: dict[str, pd.Series] = {
        "open": open_,
        "open_1": open_.shift(1),
        "close_1": close.shift(1),
        "high_1": high.shift(1),
        "low_1": low.shift(1),
        "volume_1": volume.shift(1),
    }
    for stat, series, kind in (
        ("avg", close, "price"), ("avg", volume, "volume"), ("std", close, "price"), ("std", volume, "volume")
    ):
        names = {}
        for label, days in PERIODS.items():
            rolling = series.rolling(days)
            names[label] = f"{stat}_{kind}_{label}"
            out[names[label]] = (rolling.mean() if stat == "avg" else rolling.std()).shift(1)
        for short, long in (("5", "30"), ("5", "365"), ("30", "365")):
            out[f"ratio_{stat}_{kind}_{short}_{long}"] = out[names[short]] / out[names[long]]
    for label, days in (("1", 1), *PERIODS.items()):
        out[f"return_{label}"] = ((close - close.shift(days)) / close.shift(days)).shift(1)
    for label, days in PERIODS.items():
        out[f"moving_avg_{label}"] = out["return_1"].rolling(days).mean().shift(1)
    frame = pd.DataFrame({name: out[name] for name in FEATURE_NAMES})
    frame[TARGET_COLUMN] = close
    return frame


# ---------------------------------------------------------------------------------------------------------
# Forecast features: the last days of many histories at once, from only the rows their windows read


@dataclass
class PriceHistory:
    """A validated request history, cut to the ``min_history_rows(window)`` rows its forecast reads."""

    dates: np.ndarray  # datetime64[D], oldest first
    values: np.ndarray  # float64 [rows, 5]: Open, High, Low, Close, Volume; NaN where the last row's are unknown


def read_history(history: Any, *, window: int) -> PriceHistory:
    """``features_for_history``'s checks and errors, keeping the rows a forecast with ``window`` days reads.

    ``history``: a DataFrame as ``features_for_history`` takes it, or a mapping of columns (date -> ISO strings,
    dates or datetime64; open, high, low, close, volume -> numbers, with None/NaN for the last row's unknowns).
    Clean typed columns (what the service sends) are checked in numpy; anything else, or anything that fails
    a check, goes through the general pandas validation, which words the error exactly as it always has.
    """
    needed = min_history_rows(window)
    typed = _typed_history(history)
    if typed is None:
        frame = pd.DataFrame(dict(history)) if isinstance(history, dict) else history
        if not isinstance(frame, pd.DataFrame):
            raise InputError("The price history must be a table of rows with date, open, high, low, close, volume.")
        if isinstance(frame.index, pd.DatetimeIndex) and not any(str(c).strip().lower() == "date" for c in frame.columns):
            frame = frame.reset_index(names="Date")
        prices = _validate_prices(frame.reset_index(drop=True), "The price history", InputError,
                                  last_row_may_be_open_only=True)
        typed = PriceHistory(dates=prices.index.to_numpy().astype("datetime64[D]"),
                             values=prices[VALUE_COLUMNS].to_numpy(dtype=np.float64))
    if len(typed.values) < needed:
        raise InputError(
            f"The price history has {len(typed.values)} rows but one prediction with windows of {window} days needs "
            f"at least {needed} (254 warm-up days for the 252-day features plus the window)."
        )
    return PriceHistory(dates=typed.dates[-needed:], values=typed.values[-needed:])


def _typed_history(history: Any) -> PriceHistory | None:
    """The history as arrays when its columns are already clean (numbers, ISO dates, sorted, positive, complete
    but for the last row's high/low/close/volume); None when it needs the general checks."""
    if isinstance(history, pd.DataFrame):
        columns = {str(name): history[name].to_numpy() for name in history.columns}
        if isinstance(history.index, pd.DatetimeIndex) and not any(c.strip().lower() == "date" for c in columns):
            columns["date"] = history.index.to_numpy()
    elif isinstance(history, dict):
        columns = {str(name): np.asarray(cells) if not isinstance(cells, np.ndarray) else cells
                   for name, cells in history.items()}
    else:
        return None
    by_name = {name.strip().lower(): cells for name, cells in columns.items()}
    if len(by_name) != len(columns) or any(c.lower() not in by_name for c in REQUIRED_COLUMNS):
        return None
    try:
        dates = _days(by_name["date"])
        values = np.stack([_numeric(by_name[c.lower()]) for c in VALUE_COLUMNS], axis=1)
    except (TypeError, ValueError):
        return None
    if values.ndim != 2 or len(values) == 0 or np.isnat(dates).any() or not (np.diff(dates) > np.timedelta64(0)).all():
        return None
    known = values.copy()
    known[-1, 1:] = np.where(np.isnan(known[-1, 1:]), 1.0, known[-1, 1:])  # the day to forecast: open only
    if not np.isfinite(known).all() or (known[:, :4] <= 0).any() or (known[:, 4] < 0).any():
        return None
    return PriceHistory(dates=dates, values=values)


def _days(cells: np.ndarray) -> np.ndarray:
    """datetime64[D] for dates that are plain days (datetime64 at midnight, date objects, YYYY-MM-DD strings);
    ValueError for anything else (numpy would silently cut a time of day or read 20200101 as a year)."""
    cells = np.asarray(cells)
    if cells.dtype.kind not in "MOU":
        raise ValueError("not dates")
    days = cells.astype("datetime64[D]")
    same = days == cells if cells.dtype.kind == "M" else days.astype(str) == cells.astype(str)
    if not same.all():
        raise ValueError("not plain days")
    return days


def _numeric(cells: np.ndarray) -> np.ndarray:
    """float64 for numeric cells (None -> NaN); ValueError for anything pandas would have to interpret."""
    cells = np.asarray(cells)
    if cells.dtype.kind in "fiu":
        return cells.astype(np.float64)
    if cells.dtype.kind == "O" and all(
        cell is None or (isinstance(cell, (int, float, np.integer, np.floating)) and not isinstance(cell, bool))
        for cell in cells
    ):
        return cells.astype(np.float64)
    raise ValueError("not plain numbers")


def forecast_features(values: np.ndarray, window: int) -> np.ndarray:
    """FEATURE_NAMES for the last ``window`` days of each history: ``values`` [B, rows, 5] (Open, High, Low,
    Close, Volume, oldest first; only the last ``min_history_rows(window)`` rows are read) -> [B, window, 37].

    The same features as ``_compute_features``, computed from each window's own rows and vectorised over the
    batch instead of rolled over the whole series: pandas' rolling sums carry rounding from every earlier row,
    so these agree with the training pipeline's features to rounding (the model reads them as float32), and
    shifts, returns and opens exactly. A row with an undefined feature (a ratio with a zero denominator) is
    NaN, as in pandas.
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
        out[f"moving_avg_{label}"] = _mean_std(before(return_1, length))[0]
    features = np.stack([out[name] for name in FEATURE_NAMES], axis=-1)
    features[~np.isfinite(features)] = np.nan
    return features


def _mean_std(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) over the last axis, two-pass; a window of one repeated value gets that value
    and 0 exactly (as pandas' rolling gives it), not a rounding residue."""
    windows = np.ascontiguousarray(windows)
    mean = windows.sum(axis=-1) / windows.shape[-1]
    deviations = windows - mean[..., None]
    std = np.sqrt((deviations * deviations).sum(axis=-1) / (windows.shape[-1] - 1))
    constant = windows.max(axis=-1) == windows.min(axis=-1)
    return np.where(constant, windows[..., 0], mean), np.where(constant, 0.0, std)


def make_features(prices: pd.DataFrame) -> pd.DataFrame:
    """FEATURE_NAMES + "close" per day; the NaN warm-up rows are dropped and counted in the log.

    Ratios with a zero denominator (e.g. zero volume) are undefined and dropped like the warm-up, counted.
    """
    frame = _compute_features(prices).replace([np.inf, -np.inf], np.nan)
    undefined = frame.isna().any(axis=1).to_numpy()
    warmup = np.zeros(len(frame), dtype=bool)
    warmup[:WARMUP_ROWS] = True
    log.info("Features: dropped %d warm-up rows (the 252-day windows).", int(min(WARMUP_ROWS, len(frame))))
    other = int((undefined & ~warmup).sum())
    if other:
        log.warning("Features: dropped %d more rows with undefined features (e.g. a zero-volume ratio).", other)
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


@dataclass
class Scaler:
    """Standardisation as sklearn's StandardScaler does it (population std; constant columns keep scale 1)."""

    mean: np.ndarray
    scale: np.ndarray
    columns: list[str]

    @classmethod
    def fit(cls, frame_or_array: pd.DataFrame | np.ndarray, columns: list[str] | None = None) -> Scaler:
        if isinstance(frame_or_array, pd.DataFrame):
            columns = list(columns) if columns is not None else [str(c) for c in frame_or_array.columns]
            values = frame_or_array[columns].to_numpy(dtype=np.float64)
        else:
            values = np.asarray(frame_or_array, dtype=np.float64)
            if values.ndim == 1:
                values = values[:, None]
            columns = list(columns) if columns is not None else [str(i) for i in range(values.shape[1])]
        if len(values) == 0:
            raise DataError("Cannot fit a scaler on zero rows; the training split is empty.")
        mean = values.mean(axis=0)
        scale = values.std(axis=0)
        scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
        return cls(mean=mean, scale=scale, columns=columns)

    def _values(self, data: pd.DataFrame | np.ndarray) -> np.ndarray:
        if isinstance(data, pd.DataFrame):
            return data[self.columns].to_numpy(dtype=np.float64)
        return np.asarray(data, dtype=np.float64)

    def transform(self, array: pd.DataFrame | np.ndarray) -> np.ndarray:
        values = self._values(array)
        if values.ndim == 1 and len(self.columns) == 1:
            return (values - self.mean[0]) / self.scale[0]
        return (values - self.mean) / self.scale

    def inverse_transform(self, array: np.ndarray) -> np.ndarray:
        values = np.asarray(array, dtype=np.float64)
        if values.ndim == 1 and len(self.columns) == 1:
            return values * self.scale[0] + self.mean[0]
        return values * self.scale + self.mean

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scaler:
        try:
            columns = [str(c) for c in d["columns"]]
            mean = np.asarray(d["mean"], dtype=np.float64)
            scale = np.asarray(d["scale"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"Scaler JSON is malformed ({exc}); it needs columns, mean and scale lists.") from exc
        if not (len(columns) == mean.shape[0] == scale.shape[0]) or mean.ndim != 1 or scale.ndim != 1:
            raise DataError("Scaler JSON has columns, mean and scale of different lengths; re-export the bundle.")
        return cls(mean=mean, scale=scale, columns=columns)


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
