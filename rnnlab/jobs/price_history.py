"""What the jobs that forecast from a daily price history (stock, horizon) share: the request's rows and their limit,
the rows as the columns a deployment reads, and a history's first checks before the job's own reading of it.
Not a job: the registry names none here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from rnnlab.data.stock import TRUST_PRICES_MEANS, TrustedHistory
from rnnlab.errors import InputError
from rnnlab.serve.schemas import StrictBody

MAX_HISTORY_ROWS = 5_000  # ~20 years of trading days
FIELDS = ("open", "high", "low", "close", "volume")
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()  # datetime64[D] counts days from here


class PriceRow(StrictBody):
    """One trading day. Only the date and open are required: a stock forecast's last row is the day to forecast."""

    date: dt.date
    open: float = Field(gt=0)
    high: float | None = Field(None, gt=0)
    low: float | None = Field(None, gt=0)
    close: float | None = Field(None, gt=0)
    volume: float | None = Field(None, ge=0)


class CompletePriceRow(PriceRow):
    """One trading day with every field given."""

    high: float = Field(gt=0)
    low: float = Field(gt=0)
    close: float = Field(gt=0)
    volume: float = Field(ge=0)


class PriceHistoryRequest(StrictBody):
    """A request of ONE price history; a job's request subclasses it to say what its rows must hold and what its
    last row is (the ``rows`` field's type and description)."""

    raw_json: ClassVar[bool] = True  # the service validates the raw JSON in one pass: hundreds of rows

    rows: list[PriceRow] = Field(min_length=1, max_length=MAX_HISTORY_ROWS)
    trust_prices: bool = Field(False, description=f"true: {TRUST_PRICES_MEANS}; false: such a row is a 422 naming it.")

    def columns(self) -> dict:
        """The rows as columns (datetime64 days, float64 with NaN for nulls): a few arrays to ship to the
        deployment rather than hundreds of dicts."""
        days = np.array([row.date.toordinal() for row in self.rows], dtype=np.int64) - _EPOCH_ORDINAL
        values = np.array([[getattr(row, name) for name in FIELDS] for row in self.rows], dtype=np.float64)
        return {"date": days.astype("datetime64[D]")} | dict(zip(FIELDS, values.T))

    def items(self) -> list:
        """The items the service batches (with those of concurrent requests): the one history."""
        return [TrustedHistory(self.columns()) if self.trust_prices else self.columns()]

    @staticmethod
    def error_loc(index: int) -> list:
        return ["body", "rows"]


def bounded_history(history: Any, min_rows: int) -> tuple[Any, bool]:
    """(the history as a DataFrame or a mapping of columns, whether its sender vouched for its prices) of whatever a
    predictor's ``prepare`` was given, refusing more than ``MAX_HISTORY_ROWS`` rows."""
    history, trusted = TrustedHistory.unwrap(history)
    if isinstance(history, Sequence) and not isinstance(history, str):
        history = pd.DataFrame(list(history))
    if isinstance(history, dict):
        rows = len(next(iter(history.values()), []))
    else:
        rows = len(history) if isinstance(history, pd.DataFrame) else 0
    if rows > MAX_HISTORY_ROWS:
        raise InputError(f"The price history has {rows:,} rows, more than the limit of {MAX_HISTORY_ROWS:,}; "
                         f"send the last {min_rows} or more, up to {MAX_HISTORY_ROWS:,}.")
    return history, trusted


def add_history_arguments(parser) -> None:
    """The ``rnnlab forecast`` arguments every price-history job takes."""
    parser.add_argument("--csv", required=True, metavar="FILE",
                        help="Yahoo-layout daily prices (Date,Open,High,Low,Close,Volume)")
    parser.add_argument("--trust-prices", action="store_true",  # argparse reads % as a format: %%
                        help=f"{TRUST_PRICES_MEANS}: forecast from them rather than refuse them".replace("%", "%%"))


def history_from_args(args) -> Any:
    """The history ``rnnlab forecast`` sends its predictor: the file's last rows (a forecast reads a few hundred
    days, the 252-day features and a window; a whole file is longer than the service's limit), vouched for under
    ``--trust-prices``."""
    from rnnlab.data.stock import read_prices

    history = read_prices(args.csv).iloc[-1000:]
    return TrustedHistory(history) if args.trust_prices else history
