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

import math
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch

from rnnlab.bundle import Bundle, load_bundle
from rnnlab.data.imdb import tokenize
from rnnlab.data.stock import FEATURE_NAMES, Scaler, features_for_history, min_history_rows, to_price
from rnnlab.data.text import encode_text
from rnnlab.data.vocab import Vocab
from rnnlab.errors import BundleError, InputError

MAX_TEXTS = 64  # reviews per request (predict itself takes any number and works in chunks)
MAX_TEXT_CHARS = 20_000  # the longest IMDb review has ~14k characters
MAX_HISTORY_ROWS = 5_000  # ~20 years of trading days
MAX_PROMPT_CHARS = 2_000
MAX_NEW_TOKENS = 2_000
MAX_TEMPERATURE = 5.0
MAX_SEED = 2**63  # seeds are 0 <= seed < MAX_SEED
PREDICT_BATCH_SIZE = 64  # rows per forward pass inside predict

PerRow = Union[float, int, None, Sequence[Union[float, int, None]], torch.Tensor]


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

    def validate(self, history: pd.DataFrame | Sequence[dict]) -> None:
        self.features(history)

    def features(self, history: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
        """Validate ONE history and return its unscaled feature rows (InputError for anything malformed); a
        server computes them once per request and passes them to :meth:`predict_features`."""
        if isinstance(history, Sequence) and not isinstance(history, str):
            history = pd.DataFrame(list(history))
        if isinstance(history, pd.DataFrame) and len(history) > MAX_HISTORY_ROWS:
            raise InputError(
                f"The price history has {len(history):,} rows, more than the limit of {MAX_HISTORY_ROWS:,}; "
                f"send the last {self.min_rows} or more, up to {MAX_HISTORY_ROWS:,}."
            )
        return features_for_history(history, window=self.window)

    def predict(self, histories: Sequence[pd.DataFrame | Sequence[dict]]) -> list[dict[str, Any]]:
        return self.predict_features([_at_position(self.features, h, "History", i) for i, h in enumerate(histories)])

    @torch.inference_mode()
    def predict_features(
        self, features: Sequence[pd.DataFrame], batch_size: int = PREDICT_BATCH_SIZE
    ) -> list[dict[str, Any]]:
        """Forecasts from :meth:`features` outputs (one per history), batched through the model."""
        if not features:
            return []
        windows = np.stack([self.scaler.transform(f[FEATURE_NAMES].iloc[-self.window :]) for f in features])
        last_rows = pd.concat([f.iloc[[-1]] for f in features])
        outputs = []
        for start in range(0, len(windows), batch_size):
            x = torch.from_numpy(windows[start : start + batch_size].astype(np.float32))
            outputs.append(self.model(x.to(self.device)).float().cpu().numpy())
        target = self.target_scaler.inverse_transform(np.concatenate(outputs).astype(np.float64))
        closes = to_price(target, last_rows, self.target)
        results = []
        for (date, row), close in zip(last_rows.iterrows(), closes):
            actual = row["close"]
            results.append({
                "date": pd.Timestamp(date).date().isoformat(),
                "close": float(close),
                "baseline_open": float(row["open"]),
                "actual_close": None if pd.isna(actual) else float(actual),
            })  # fmt: skip
        return results


# ------------------------------------------------------------------------------------------------ generation


def sample_next(
    logits: torch.Tensor,
    temperature: PerRow = 1.0,
    top_k: PerRow = None,
    top_p: PerRow = None,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Sample one token id per row of ``logits[B, V]``; returns LongTensor[B] on the logits' device.

    Each parameter is one value for every row or one per row (list or tensor; None entries mean "off"):
    ``temperature`` 0 = greedy (argmax); ``top_k`` None/0 = off; ``top_p`` None/1.0 = off (nucleus: keep the
    most likely tokens until their mass reaches top_p; the top token always stays).

    Randomness: exactly one uniform draw per row per call. With a list of generators (CPU ``torch.Generator``s),
    row i draws from ``generator[i]`` only, so a sequence's tokens depend on its own seed and never on what else
    shares the batch; one generator draws B numbers in row order; None uses torch's global RNG.
    Inverse-CDF sampling over the sorted, filtered distribution (as ``rnnlab.serve.scheduler`` does, so the CLI
    and the service give the same text for the same seed).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    device = logits.device
    temperature_t = _per_row(temperature, rows, default=1.0, dtype=torch.float32, device=device)
    top_k_t = _per_row(top_k, rows, default=0, dtype=torch.long, device=device)
    top_p_t = _per_row(top_p, rows, default=1.0, dtype=torch.float32, device=device)
    if bool((temperature_t < 0).any()) or bool((top_k_t < 0).any()):
        raise ValueError("temperature and top_k must be >= 0")
    if bool(((top_p_t <= 0) | (top_p_t > 1)).any()):
        raise ValueError("top_p must be in (0, 1]")
    top_k_t = torch.where(top_k_t == 0, torch.full_like(top_k_t, vocab), top_k_t)
    uniforms = _uniforms(rows, generator).to(device)

    greedy = temperature_t <= 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature_t), temperature_t).unsqueeze(1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    drop = ranks >= top_k_t.unsqueeze(1)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p_t.unsqueeze(1)  # mass before a token already reaches top_p
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)
    choice = torch.where(greedy.unsqueeze(1), torch.zeros_like(choice), choice)
    return order.gather(1, choice).squeeze(1)


def _per_row(value: PerRow, rows: int, *, default: float, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        out = value.to(device=device, dtype=dtype).reshape(-1)
        return out.expand(rows) if out.numel() == 1 else out
    if value is None or isinstance(value, (int, float)):
        return torch.full((rows,), default if value is None else value, dtype=dtype, device=device)
    values = [default if v is None else v for v in value]
    if len(values) != rows:
        raise ValueError(f"got {len(values)} per-row values for {rows} rows")
    return torch.tensor(values, dtype=dtype, device=device)


def _uniforms(rows: int, generator) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(rows, generator=generator)
    if len(generator) != rows:
        raise ValueError(f"got {len(generator)} generators for {rows} rows")
    return torch.cat([torch.rand(1, generator=g) for g in generator])


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

    def validate_sampling(
        self,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> None:
        """InputError naming the first parameter out of range."""
        if not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise InputError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS:,}, got {max_new_tokens!r}.")
        if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise InputError(f"temperature must be a number from 0 (greedy) to {MAX_TEMPERATURE}, got {temperature!r}.")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise InputError(f"top_k must be a positive integer or absent, got {top_k!r}.")
        if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
            raise InputError(f"top_p must be a number in (0, 1] or absent, got {top_p!r}.")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
            raise InputError(f"seed must be an integer from 0 to 2**63 - 1 or absent, got {seed!r}.")

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> str:
        """The continuation of ``prompt`` (``max_new_tokens`` characters); deterministic for a given seed."""
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, seed=seed))  # fmt: skip

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Like ``generate`` but yields each character as soon as it is sampled. Input is checked up front,
        before the first character."""
        ids = self.encode_prompt(prompt)
        self.validate_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        return self._decode(ids, max_new_tokens, temperature, top_k, top_p, seed)

    def _decode(self, ids: list[int], max_new_tokens, temperature, top_k, top_p, seed) -> Iterator[str]:
        generator = torch.Generator(device="cpu").manual_seed(secrets.randbits(63) if seed is None else seed)
        *context, next_id = ids
        with torch.inference_mode():
            if context:
                _, state = self.model(torch.tensor([context], device=self.device))
            else:
                state = self.model.init_state(1, self.device)
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                logits, state = self.model.step(torch.tensor([next_id], device=self.device), state)
                next_id = int(sample_next(logits, temperature, top_k, top_p, [generator])[0])
            yield self.vocab.itos[next_id]


# ------------------------------------------------------------------------------------------------ loading

Predictor = Union[SentimentClassifier, StockForecaster, TextGenerator]
PREDICTORS: dict[str, type] = {"sentiment": SentimentClassifier, "stock": StockForecaster, "charlm": TextGenerator}


def load_predictor(bundle_dir: str | Path, *, device: str | torch.device = "cpu") -> Predictor:
    """The predictor for whatever job the bundle at ``bundle_dir`` was trained for."""
    bundle = load_bundle(bundle_dir, device=device)
    return PREDICTORS[bundle.job](bundle)


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


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
