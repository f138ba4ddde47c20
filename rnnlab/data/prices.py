"""Daily price histories: a Yahoo-layout CSV (:func:`read_prices`) or a forecast request's rows
(:func:`read_history`), validated with one set of checks and errors, and how much history the features need.

A forecast's rows must also be prices that can be real (:func:`unreal_row`): a high under the day's low, open or
close, a low over them, or a price more than ``MAX_DAILY_MOVE`` from the day before's close is refused unless the
sender vouches for the rows (``trust_prices``: a :class:`TrustedHistory`). Training and scoring files are read as
they are: the index file passes these checks over 1990-2023, and a share's own file may hold a real split.

The stock features (:mod:`rnnlab.data.stock`) read, for day t, prices up to day t-1 and day t's open. The
longest, ``moving_avg_365`` (a 252-day mean of ``return_1``, itself lagged twice), is first defined on the
255th row of a series, so the first ``WARMUP_ROWS`` = 254 rows never get features. One prediction from
windows of length L therefore needs ``min_history_rows(L)`` = 254 + L rows of history (259 for L = 5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rnnlab.errors import DataError, InputError, RnnlabError, first_line

log = logging.getLogger(__name__)

PRICE_COLUMNS = ["Date", "Open", "High", "Low", "Close", "Adj Close", "Volume"]
REQUIRED_COLUMNS = ["Date", "Open", "High", "Low", "Close", "Volume"]  # "Adj Close" is optional and unused
VALUE_COLUMNS = ["Open", "High", "Low", "Close", "Volume"]
PRICE_VALUE_COLUMNS = ["Open", "High", "Low", "Close"]

# Chapter window names -> trading days.
PERIODS = {"5": 5, "30": 21, "365": 252}
# moving_avg_365 = return_1 (first defined at row index 2) -> rolling(252) (+251) -> shift(1) (+1) = index 254.
WARMUP_ROWS = 2 + (PERIODS["365"] - 1) + 1
MIN_ROWS = WARMUP_ROWS + 1  # rows a price file needs for a single feature row

# No index moves this far from one close to the next day's prices: the Dow's worst day since 1900 (1987-10-19) fell
# 22.6 %, and the index file's largest close-to-close moves, 1990-2023, are +14.2 % (2001-01-03) and -12.3 %
# (2020-03-16). A share can move further (trust_prices says its rows are real).
MAX_DAILY_MOVE = 0.5
# What trust_prices (--trust-prices) says, for the request's field and the CLI flag.
TRUST_PRICES_MEANS = (f"the rows are real prices even where an index's could not be (a high under the day's low, "
                      f"open or close; a move of more than {MAX_DAILY_MOVE:.0%} from the day before's close)")

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
    prices = validate_prices(raw, f"Price file {path}", DataError, last_row_may_be_open_only=False)
    if len(prices) < MIN_ROWS:
        raise DataError(
            f"Price file {path} has {len(prices)} usable rows but the 252-day features need at least {MIN_ROWS}; "
            "use a longer price history."
        )
    return prices

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


def validate_prices(
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
# Request histories: checked in numpy when their columns are clean, else as a CSV file is


@dataclass
class PriceHistory:
    """A validated request history, cut to the ``min_history_rows(window)`` rows its forecast reads."""

    dates: np.ndarray  # datetime64[D], oldest first
    values: np.ndarray  # float64 [rows, 5]: Open, High, Low, Close, Volume; NaN where the last row's are unknown


@dataclass(frozen=True)
class TrustedHistory:
    """A forecast's history whose sender says its rows are real prices (``trust_prices``: the CLI's
    ``--trust-prices``, a request's ``"trust_prices": true``), so :func:`read_history` reads them without
    :func:`unreal_row`. A predictor's ``prepare`` takes it in place of the history it wraps."""

    rows: Any

    @staticmethod
    def unwrap(history: Any) -> tuple[Any, bool]:
        """(the history, whether its sender vouched for it) of a history, wrapped or not."""
        return (history.rows, True) if isinstance(history, TrustedHistory) else (history, False)


def read_history(history: Any, *, window: int, trust_prices: bool = False) -> PriceHistory:
    """Validate a forecast request's price history and keep the ``min_history_rows(window)`` rows it reads.

    ``history`` holds one row per trading day, oldest first: a DataFrame (a ``date``/``Date`` column or a
    DatetimeIndex; open, high, low, close, volume in any capitalisation, numbers or numeric strings, e.g.
    ``pd.DataFrame(request_json["rows"])``) or a mapping of columns (date -> ISO strings, dates or datetime64;
    the values -> numbers). To forecast day T's close, send the history through day T-1 plus a row for day T
    with its open; that last row's high, low, close and volume may be missing (None/NaN), as no feature uses
    them. Any other missing, non-numeric, non-positive, unsorted or duplicated value is an InputError, and so is
    a row the forecast reads that cannot be real prices (:func:`unreal_row`) unless ``trust_prices``.

    Clean typed columns (what the service sends) are checked in numpy; anything else, or anything that fails
    a check, goes through :func:`validate_prices` (as CSV files do), which words every error.
    """
    needed = min_history_rows(window)
    typed = _typed_history(history)
    if typed is None:
        frame = pd.DataFrame(dict(history)) if isinstance(history, dict) else history
        if not isinstance(frame, pd.DataFrame):
            raise InputError("The price history must be a table of rows with date, open, high, low, close, volume.")
        if isinstance(frame.index, pd.DatetimeIndex) and not any(str(c).strip().lower() == "date" for c in frame.columns):
            frame = frame.reset_index(names="Date")
        prices = validate_prices(frame.reset_index(drop=True), "The price history", InputError,
                                  last_row_may_be_open_only=True)
        typed = PriceHistory(dates=prices.index.to_numpy().astype("datetime64[D]"),
                             values=prices[VALUE_COLUMNS].to_numpy(dtype=np.float64))
    if len(typed.values) < needed:
        raise InputError(
            f"The price history has {len(typed.values)} rows but one prediction with windows of {window} days needs "
            f"at least {needed} (254 warm-up days for the 252-day features plus the window)."
        )
    read = PriceHistory(dates=typed.dates[-needed:], values=typed.values[-needed:])
    fault = None if trust_prices else unreal_row(read)
    if fault:
        raise InputError(f"The price history's row for {fault}; correct it, or say the prices are real "
                         "(trust_prices, on the command line --trust-prices).")
    return read


# A row's checks, in the order its fault is named: (field, "move" from the day before's close | "under" | "over",
# the field it contradicts). A close or open far from the day before's close first (a high under a close of 50x
# is the close's fault), then the row's own contradictions, then a high or low far away.
_CHECKS = [("close", "move", None), ("open", "move", None), ("high", "under", "low"), ("high", "under", "open"),
           ("high", "under", "close"), ("low", "over", "open"), ("low", "over", "close"), ("high", "move", None),
           ("low", "move", None)]


def unreal_row(history: PriceHistory) -> str | None:
    """The day and fault of the earliest row that cannot be real prices ("2023-06-30 cannot be real: its high (1) is
    under its low (13,716.16)"), or None when every row can be: a high under the day's low, open or close; a low
    over its open or close; an open, high, low or close more than ``MAX_DAILY_MOVE`` from the day before's close.
    Unknown (NaN) values, as in the last row of a stock forecast, pass."""
    prices = dict(zip(("open", "high", "low", "close"), history.values[:, :4].T))
    previous_close = np.concatenate([[np.nan], prices["close"][:-1]])

    def fails(field: str, how: str, other: str | None) -> np.ndarray:  # NaN compares False: unknown passes
        if how == "move":
            return np.abs(prices[field] / previous_close - 1) > MAX_DAILY_MOVE
        return prices[field] < prices[other] if how == "under" else prices[field] > prices[other]

    bad = np.stack([fails(*check) for check in _CHECKS], axis=1)  # [rows, checks]
    if not bad.any():
        return None
    row, check = divmod(int(np.argmax(bad)), len(_CHECKS))  # row-major: the earliest row, then its first fault
    field, how, other = _CHECKS[check]
    value = f"{history.dates[row]} cannot be real: its {field} ({_number(prices[field][row])}) is"
    if how != "move":
        return f"{value} {how} its {other} ({_number(prices[other][row])})"
    return (f"{value} {prices[field][row] / previous_close[row]:.3g}x the close of {history.dates[row - 1]} "
            f"({_number(previous_close[row])}), a move beyond the {MAX_DAILY_MOVE:.0%} in a day no index makes")


def _number(value: float) -> str:
    return f"{value:,.8g}"


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
