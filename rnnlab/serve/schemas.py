"""HTTP schemas and limits of the service.

Every request body is a pydantic model with ``extra="forbid"``: a misspelt field (``max_tokens``) is a 422 naming
it rather than a silently ignored option. Limits live here as constants so the OpenAPI page at ``/docs`` states
them and a violation is a 422 whose message quotes the limit (pydantic words it: "at most 64 items").
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# One set of limits for the CLI and the service: the inference layer's. Generous for real use (the longest IMDb
# review is ~14k characters), small enough that one request cannot occupy a replica for long.
from rnnlab.inference import MAX_HISTORY_ROWS, MAX_PROMPT_CHARS, MAX_TEXT_CHARS, MAX_TEXTS
from rnnlab.sampling import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- sentiment ---------------------------------------------------------------------------------------------
class SentimentRequest(_Strict):
    texts: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_TEXTS,
        description=f"Reviews to classify, 1 to {MAX_TEXTS} per request, each at most {MAX_TEXT_CHARS} characters.",
        examples=[["A moving film with a wonderful cast.", "Two hours I will never get back."]],
    )


class SentimentResult(BaseModel):
    label: Literal["positive", "negative"]
    probability: float = Field(description="Probability that the text is positive.")


class SentimentResponse(BaseModel):
    model: str = Field(description="Bundle name and version that answered.")
    results: list[SentimentResult]


# --- forecast ----------------------------------------------------------------------------------------------
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()  # datetime64[D] counts days from here


class PriceRow(_Strict):
    date: dt.date
    open: float = Field(gt=0)
    # the last row is the day to forecast: only its date and open are known, so these may be null there
    high: float | None = Field(None, gt=0)
    low: float | None = Field(None, gt=0)
    close: float | None = Field(None, gt=0)
    volume: float | None = Field(None, ge=0)


class ForecastRequest(_Strict):
    rows: list[PriceRow] = Field(
        min_length=1,
        max_length=MAX_HISTORY_ROWS,
        description="Daily prices, oldest first, at most "
        f"{MAX_HISTORY_ROWS} rows. The LAST row is the day to forecast: its date and open (high, low, close, "
        "volume may be null and are ignored). The model needs 254 + window rows (about a year of history).",
    )

    def columns(self) -> dict:
        """The rows as columns (datetime64 days, float64 with NaN for nulls): what the Forecast deployment reads,
        a few arrays to ship to it rather than hundreds of dicts."""
        import numpy as np

        rows = self.rows
        days = np.array([row.date.toordinal() for row in rows], dtype=np.int64) - _EPOCH_ORDINAL
        values = np.array([(row.open, row.high, row.low, row.close, row.volume) for row in rows], dtype=np.float64)
        return {"date": days.astype("datetime64[D]")} | dict(zip(("open", "high", "low", "close", "volume"), values.T))


class Forecast(BaseModel):
    date: str = Field(description="The forecast day (the last row's date).")
    close: float = Field(description="The model's forecast of that day's close.")
    baseline_open: float = Field(description="The naive forecast close = open, beside it.")
    actual_close: float | None = Field(description="The last row's close when it was sent (for back-tests).")


class ForecastResponse(BaseModel):
    model: str
    forecast: Forecast


# --- generation --------------------------------------------------------------------------------------------
class GenerateRequest(SamplingParams):
    """The prompt and whether to stream, plus the sampling fields of ``rnnlab.sampling.SamplingParams`` (the one
    definition of their ranges, shared with the CLI, the scheduler and training's samples)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["the emperor"])
    stream: bool = Field(False, description="Send characters as they are produced (server-sent events).")

    def sampling(self) -> SamplingParams:
        return SamplingParams(**self.model_dump(include=set(SamplingParams.model_fields)))


class GenerateResponse(BaseModel):
    model: str
    text: str = Field(description="The generated continuation (without the prompt).")
    seed: int
    tokens: int


# --- errors ------------------------------------------------------------------------------------------------
class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where the fault is, e.g. ['body', 'texts', 3].")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[ErrorItem]
    request_id: str | None = Field(None, description="With a 500: the id of the server's log line about it.")


def error_item(loc: list[str | int], msg: str, kind: str = "value_error") -> dict:
    return {"loc": list(loc), "msg": msg, "type": kind}
