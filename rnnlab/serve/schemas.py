"""HTTP schemas and limits of the service.

Every request body is a pydantic model with ``extra="forbid"``: a misspelt field (``max_tokens``) is a 422 naming
it rather than a silently ignored option. Limits live here as constants so the OpenAPI page at ``/docs`` states
them and a violation is a 422 whose message quotes the limit (pydantic words it: "at most 64 items").
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Limits. Generous for real use (the longest IMDb review is ~14k characters), small enough that one request
# cannot occupy a replica for long.
MAX_TEXTS = 64
MAX_TEXT_CHARS = 20_000
MAX_HISTORY_ROWS = 5_000
MAX_PROMPT_CHARS = 2_000
MAX_NEW_TOKENS = 2_000
MAX_TEMPERATURE = 5.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- sentiment ---------------------------------------------------------------------------------------------
class SentimentRequest(_Strict):
    texts: list[str] = Field(
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
class PriceRow(_Strict):
    date: dt.date
    open: float = Field(gt=0)
    high: float = Field(gt=0)
    low: float = Field(gt=0)
    close: float = Field(gt=0)
    volume: float = Field(ge=0)


class ForecastRequest(_Strict):
    rows: list[PriceRow] = Field(
        min_length=1,
        max_length=MAX_HISTORY_ROWS,
        description="Daily price history, oldest first, at most "
        f"{MAX_HISTORY_ROWS} rows; the model needs about a year (252 trading days) plus its window. "
        "The last row's open is the day whose close is forecast (its high/low/close are not used).",
    )


class ForecastResponse(BaseModel):
    model: str
    forecast: dict = Field(
        description="The inference layer's answer: the forecast close beside the naive baseline (close = open)."
    )


# --- generation --------------------------------------------------------------------------------------------
class GenerateRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["the emperor"])
    max_new_tokens: int = Field(200, ge=1, le=MAX_NEW_TOKENS, description="Characters to generate.")
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, description="0 means greedy decoding.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k most likely characters only.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Same request and seed give the same text; chosen and returned if absent."
    )
    stream: bool = Field(False, description="Send characters as they are produced (server-sent events).")


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


def error_item(loc: list[str | int], msg: str, kind: str = "value_error") -> dict:
    return {"loc": list(loc), "msg": msg, "type": kind}
