"""Predictions from bundles: the one place that turns raw user input into model input.

The CLI (``rnnlab classify | forecast | generate``) and the Ray Serve deployments both come through here, so a
review, a price history or a prompt means the same thing everywhere. Two rules shape the API:

* ``validate*`` checks ONE item and raises ``InputError`` (one sentence) -- a server validates each request
  before batching it, so one bad item never fails the requests batched with it;
* ``predict`` takes a LIST (a batch; Serve's ``@serve.batch`` hands over lists) and still validates each item,
  naming its position, for callers that skip ``validate``.

Limits are module constants (the service's schemas use the same numbers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch

from rnnlab import registry
from rnnlab.bundle import Bundle, load_bundle
from rnnlab.data.imdb import tokenize
from rnnlab.data.stock import (
    UNDEFINED_FEATURES,
    PriceHistory,
    Scaler,
    forecast_features,
    min_history_rows,
    read_history,
    to_price,
)
from rnnlab.data.text import encode_text
from rnnlab.data.vocab import Vocab
from rnnlab.errors import BundleError, InputError, RnnlabError
from rnnlab.sampling import (  # noqa: F401  (the sampling limits, re-exported: one set for CLI and service)
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    NonFiniteScores,
    SamplingParams,
    sample_next,
    sampling_params,
)

MAX_TEXTS = 64  # reviews per request (predict itself takes any number and works in chunks)
MAX_TEXT_CHARS = 20_000  # the longest IMDb review has ~14k characters
MAX_HISTORY_ROWS = 5_000  # ~20 years of trading days
MAX_PROMPT_CHARS = 2_000
PREDICT_BATCH_SIZE = 64  # rows per forward pass inside predict


# ------------------------------------------------------------------------------------------------ sentiment


class SentimentClassifier:
    """Reviews in, ``{"label": "positive" | "negative", "probability": P(positive)}`` out.

    Texts are tokenized exactly as in training (``rnnlab.data.imdb.tokenize``), unknown words map to ``<unk>``,
    and reviews longer than the training ``data.max_length`` keep their LAST tokens, as training did.
    Batching never changes a result: the model ignores padding exactly.
    """

    def __init__(self, bundle: Bundle) -> None:
        _expect_job(bundle, "sentiment")
        self.model = bundle.model.eval()
        self.vocab = Vocab.from_json(bundle.assets["vocab"])
        self.max_length = bundle.config.get("data", {}).get("max_length")
        self.device = _device_of(self.model)

    def validate(self, text: Any) -> None:
        """InputError if ``text`` is not a string, is empty, too long, or has no words."""
        self.encode(text)

    def encode(self, text: Any) -> np.ndarray:
        """Validate ONE review and return its token ids (what the model reads), tokenizing it once: a server
        encodes each item as it arrives and runs :meth:`predict_encoded` on the batch."""
        if not isinstance(text, str):
            raise InputError(f"A review must be a string, got {type(text).__name__}; send the review's text.")
        if not text.strip():
            raise InputError("The review is empty; send the text to classify.")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(
                f"The review has {len(text):,} characters, more than the limit of {MAX_TEXT_CHARS:,}; shorten it."
            )
        tokens = tokenize(text)
        if not tokens:
            raise InputError("The review has no words after removing markup and punctuation; send review text.")
        ids = np.asarray(self.vocab.encode(tokens), dtype=np.int64)
        return ids[-self.max_length :] if self.max_length is not None else ids

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        return self.predict_encoded([_at_position(self.encode, text, "Review", i) for i, text in enumerate(texts)])

    @torch.inference_mode()
    def predict_encoded(self, encoded: Sequence[np.ndarray], batch_size: int = PREDICT_BATCH_SIZE) -> list[dict]:
        """Predictions for reviews already through :meth:`encode`, ``batch_size`` reviews per forward pass."""
        # Similar lengths together: little padding per forward pass (results are exact either way).
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        probabilities = np.empty(len(encoded))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            lengths = torch.tensor([len(encoded[i]) for i in chunk])
            ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : lengths[row]] = torch.from_numpy(encoded[i])
            logits = self.model(ids.to(self.device), lengths.to(self.device))
            probabilities[chunk] = torch.sigmoid(logits.float()).cpu().numpy()
        return [
            {"label": "positive" if p >= 0.5 else "negative", "probability": float(p)} for p in probabilities
        ]


# ------------------------------------------------------------------------------------------------ stock


class StockForecaster:
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

    def __init__(self, bundle: Bundle) -> None:
        _expect_job(bundle, "stock")
        self.model = bundle.model.eval()
        data = bundle.config.get("data", {})
        self.window = int(data.get("window", 5))
        self.target = str(data.get("target", "close"))
        self.scaler = Scaler.from_json(bundle.assets["scaler"])
        self.target_scaler = Scaler.from_json(bundle.assets["target_scaler"])
        self.min_rows = min_history_rows(self.window)
        self.device = _device_of(self.model)

    def validate(self, history: pd.DataFrame | Sequence[dict] | dict) -> None:
        self.prepare(history)

    def prepare(self, history: pd.DataFrame | Sequence[dict] | dict) -> PriceHistory:
        """Validate ONE history and keep the rows its forecast reads (InputError for anything malformed). A server
        prepares each request as it arrives and forecasts the gathered batch with :meth:`predict_prepared`.
        ``history`` may also be a mapping of columns (what the service sends: dates and float arrays)."""
        if isinstance(history, Sequence) and not isinstance(history, str):
            history = pd.DataFrame(list(history))
        if isinstance(history, dict):
            rows = len(next(iter(history.values()), []))
        else:
            rows = len(history) if isinstance(history, pd.DataFrame) else 0
        if rows > MAX_HISTORY_ROWS:
            raise InputError(
                f"The price history has {rows:,} rows, more than the limit of {MAX_HISTORY_ROWS:,}; "
                f"send the last {self.min_rows} or more, up to {MAX_HISTORY_ROWS:,}."
            )
        return read_history(history, window=self.window)

    def predict(self, histories: Sequence[pd.DataFrame | Sequence[dict] | dict]) -> list[dict[str, Any]]:
        prepared = [_at_position(self.prepare, h, "History", i) for i, h in enumerate(histories)]
        results = self.predict_prepared(prepared)
        for position, result in enumerate(results):
            if "error" in result:
                raise InputError(f"History {position}: {result['error']}")
        return results

    @torch.inference_mode()
    def predict_prepared(
        self, histories: Sequence[PriceHistory], batch_size: int = PREDICT_BATCH_SIZE
    ) -> list[dict[str, Any]]:
        """Forecasts for :meth:`prepare` outputs: the features of the whole batch in one vectorised pass, then the
        model ``batch_size`` windows at a time. A history whose last days give an undefined feature (a zero
        volume or constant prices make a ratio 0/0) gets ``{"error": sentence}`` in its place."""
        if not histories:
            return []
        features = forecast_features(np.stack([h.values for h in histories]), self.window)
        defined = np.isfinite(features).all(axis=(1, 2))
        windows = self.scaler.transform(features[defined]).astype(np.float32)
        outputs = [np.zeros((0,), dtype=np.float32)]
        for start in range(0, len(windows), batch_size):
            x = torch.from_numpy(windows[start : start + batch_size])
            outputs.append(self.model(x.to(self.device)).float().cpu().numpy().reshape(-1))
        target = self.target_scaler.inverse_transform(np.concatenate(outputs).astype(np.float64))
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


# ------------------------------------------------------------------------------------------------ generation


class TextGenerator:
    """Continue a prompt with a character model, one character per step.

    The prompt is lowercased when the model was trained on lowercased text; characters outside the vocabulary
    are an InputError naming them. ``generate`` returns the continuation only (not the prompt); ``stream``
    yields it character by character. The same prompt, parameters and seed give the same text (here and in the
    service, which decodes the same way: prompt minus its last character through ``forward``, then one
    ``step`` per character, each sampled with one draw from the request's own generator).
    """

    def __init__(self, bundle: Bundle) -> None:
        _expect_job(bundle, "charlm")
        self.model = bundle.model.eval()
        self.vocab = Vocab.from_json(bundle.assets["vocab"])
        self.lowercase = bool(bundle.config.get("data", {}).get("lowercase", True))
        self.device = _device_of(self.model)

    def encode_prompt(self, prompt: Any) -> list[int]:
        """Validated prompt -> character ids (what the model reads)."""
        if not isinstance(prompt, str):
            raise InputError(f"The prompt must be a string, got {type(prompt).__name__}.")
        if not prompt:
            raise InputError("The prompt is empty; send at least one character to continue.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(
                f"The prompt has {len(prompt):,} characters, more than the limit of {MAX_PROMPT_CHARS:,}; shorten it."
            )
        text = prompt.lower() if self.lowercase else prompt
        try:
            return encode_text(text, self.vocab).tolist()
        except InputError as error:
            raise InputError(str(error).replace("The text", "The prompt", 1)) from None

    def validate_prompt(self, prompt: Any) -> None:
        self.encode_prompt(prompt)

    def validate_sampling(self, **values: Any) -> SamplingParams:
        """The checked ``SamplingParams`` (InputError of one sentence naming the first field out of range)."""
        return sampling_params(**values)

    def generate(self, prompt: str, **sampling: Any) -> str:
        """The continuation of ``prompt``; ``sampling`` are the ``SamplingParams`` fields (max_new_tokens=200,
        temperature=1.0, top_k, top_p, seed). Deterministic for a given seed."""
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Like ``generate`` but yields each character as soon as it is sampled. Input is checked up front,
        before the first character."""
        ids = self.encode_prompt(prompt)
        params = self.validate_sampling(**sampling).with_seed()
        return self._decode(ids, params)

    def _decode(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        # the whole request's draws up front: the same numbers as one draw per step (see sample_next), and the
        # same as the service draws them
        uniforms = torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(params.seed))
        *context, next_id = ids
        with torch.inference_mode():
            if context:
                _, state = self.model(torch.tensor([context], device=self.device))
            else:
                state = self.model.init_state(1, self.device)
        for step in range(params.max_new_tokens):
            with torch.inference_mode():
                logits, state = self.model.step(torch.tensor([next_id], device=self.device), state)
                try:
                    next_id = int(sample_next(logits, params.temperature, params.top_k, params.top_p,
                                              uniforms=uniforms[step : step + 1])[0])
                except NonFiniteScores:
                    raise RnnlabError(
                        f"The model produced NaN or infinite scores after {step} characters; the bundle's weights "
                        "are broken, retrain or re-export it."
                    ) from None
            yield self.vocab.itos[next_id]


# ------------------------------------------------------------------------------------------------ loading

Predictor = Union[SentimentClassifier, StockForecaster, TextGenerator]
def load_predictor(bundle_dir: str | Path, *, device: str | torch.device = "cpu") -> Predictor:
    """The predictor for whatever job the bundle at ``bundle_dir`` was trained for."""
    bundle = load_bundle(bundle_dir, device=device)
    if registry.job(bundle.job).predictor is None:
        raise BundleError(f"Bundle {bundle_dir} is a {bundle.job} bundle, which answers no requests; it is a starting "
                          "point for training (model.init_from).")
    return registry.job(bundle.job).load("predictor")(bundle)


# ------------------------------------------------------------------------------------------------ helpers


def _expect_job(bundle: Bundle, job: str) -> None:
    if bundle.job != job:
        raise BundleError(f"Bundle {bundle.path} is a {bundle.job} bundle, not a {job} one; pass a {job} bundle.")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _at_position(check, item, noun: str, position: int):
    """Run a per-item check inside a batch; the error names the item's position."""
    try:
        return check(item)
    except InputError as error:
        raise InputError(f"{noun} {position}: {error}") from None

