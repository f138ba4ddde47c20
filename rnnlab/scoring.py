"""Score a bundle on any data in its job's format, read with the bundle's OWN vocabulary or scaler.

``rnnlab evaluate BUNDLE --data PATH`` comes here (``rnnlab evaluate BUNDLE`` alone scores the job's test
split through the training code instead: ``rnnlab.trainers.evaluate``). What each job accepts and reports:

* sentiment: a folder with ``pos/`` and ``neg/`` text files, or a CSV with ``text,label`` columns -> accuracy,
  ROC AUC, log loss, and how many tokens the bundle's vocabulary does not know (they read as ``<unk>``, as in
  serving). Reviews longer than the training ``data.max_length`` keep their last tokens, as in training.
* charlm: any UTF-8 text file -> nats and bits per character. Characters outside the bundle's vocabulary are
  SKIPPED (left out of the text before scoring), counted and named in the result; the text is lowercased first
  when the model was trained lowercased.
* stock: any Yahoo-layout daily CSV, optionally cut to the days ``start``..``end`` -> MAE, R^2 and MAPE of the
  forecast close, beside the naive forecasts close = same-day open and close = previous close on the same days.

Each scorer returns a plain JSON-able dict (non-finite figures become None). Malformed data is a DataError,
a bundle of another job an InputError: one sentence each.
"""

from __future__ import annotations

import datetime
import inspect
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnlab import registry
from rnnlab.bundle import Bundle, load_bundle
from rnnlab.errors import DataError, InputError

SHOWN_UNKNOWN = 10  # unknown tokens / characters listed by name, most frequent first
SCORE_ROWS = 64  # parallel rows a text is split into for scoring (each row starts from a zero state)


def score_data(
    bundle_dir: str | Path,
    data: str | Path,
    *,
    start: datetime.date | str | None = None,
    end: datetime.date | str | None = None,
) -> dict[str, Any]:
    """The scores of the bundle at ``bundle_dir`` on ``data`` (a path in the bundle's job's format)."""
    bundle = load_bundle(bundle_dir)
    spec = registry.job(bundle.job)
    if spec.scorer is None:  # a job this module does not know yet
        raise InputError(f"Scoring data for {bundle.job} bundles is not supported.")
    scorer = spec.load("scorer")
    dated = "start" in inspect.signature(scorer).parameters  # the scorer can cut its data to a span of days
    if (start is not None or end is not None) and not dated:
        raise InputError(f"Dates select days of a price file; {bundle_dir} is a {bundle.job} bundle, which scores "
                         "all of its data: leave out --from/--to.")
    if start is not None and end is not None and str(start) > str(end):
        raise InputError(f"The start date {start} comes after the end date {end}; swap them.")
    result = scorer(bundle, data, start=start, end=end) if dated else scorer(bundle, data)
    return _finite({"job": bundle.job, "bundle": str(bundle_dir), "data": str(data), **result})


# ------------------------------------------------------------------------------------------------ sentiment


def score_reviews(bundle: Bundle, path: str | Path) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from rnnlab.data.imdb import read_labelled_reviews, tokenize
    from rnnlab.inference import SentimentClassifier

    reviews = read_labelled_reviews(path)
    classifier = SentimentClassifier(bundle)
    unk = classifier.vocab.unk_index
    encoded, labels, unknown = [], [], Counter()
    tokens_total = 0
    skipped = Counter(reviews.skipped)
    for text, label in zip(reviews.texts, reviews.labels):
        tokens = tokenize(text)
        if not tokens:
            skipped["reviews with no words (left out)"] += 1
            continue
        ids = np.asarray(classifier.vocab.encode(tokens), dtype=np.int64)
        unknown.update(token for token, id_ in zip(tokens, ids) if id_ == unk)
        tokens_total += len(tokens)
        encoded.append(ids[-classifier.max_length :] if classifier.max_length is not None else ids)
        labels.append(int(label))
    if not encoded:
        raise DataError(f"None of the {len(reviews.texts)} reviews in {path} has a word to read; pass review text.")
    probabilities = np.array([p["probability"] for p in classifier.predict_encoded(encoded)])
    labels = np.asarray(labels)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    both_classes = 0 < labels.sum() < len(labels)
    return {
        "reviews": len(labels),
        "positive": int(labels.sum()),
        "accuracy": float(np.mean((probabilities >= 0.5) == (labels == 1))),
        "roc_auc": float(roc_auc_score(labels, probabilities)) if both_classes else None,
        "loss": float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))),
        "tokens": tokens_total,
        "unknown_tokens": sum(unknown.values()),
        "unknown_share": sum(unknown.values()) / tokens_total,
        "most_frequent_unknown": dict(unknown.most_common(SHOWN_UNKNOWN)),
        "skipped": dict(skipped),
    }


# ------------------------------------------------------------------------------------------------ charlm


def score_text(bundle: Bundle, path: str | Path) -> dict[str, Any]:
    from rnnlab.data.text import encode_known, read_text
    from rnnlab.inference import TextGenerator

    generator = TextGenerator(bundle)
    text = read_text(path, lowercase=generator.lowercase)
    ids, skipped = encode_known(text, generator.vocab)
    if len(ids) < 2:
        raise DataError(
            f"{path} has {len(ids)} character(s) the model knows; scoring needs at least 2 (one to predict from)."
        )
    seq_len = int(bundle.config.get("data", {}).get("seq_len", 100))
    nats, scored = mean_nats(generator.model, ids, seq_len)
    return {
        "characters": len(text),
        "characters_scored": scored,
        "nats_per_char": nats,
        "bits_per_char": nats / math.log(2),
        "perplexity": math.exp(nats),
        "out_of_vocabulary": {
            "policy": "skipped: left out of the text before scoring",
            "characters": sum(skipped.values()),
            "most_frequent": {char: count for char, count in skipped.most_common(SHOWN_UNKNOWN)},
            "distinct": len(skipped),
        },
    }


@torch.inference_mode()
def mean_nats(model: torch.nn.Module, ids: np.ndarray, seq_len: int, rows: int = SCORE_ROWS) -> tuple[float, int]:
    """Mean next-character cross-entropy over ``ids``, read as up to ``rows`` contiguous rows with the state
    carried from window to window (as the training evaluation reads a split); returns (nats, characters scored).
    The < ``rows`` characters that do not fill the last column are left out."""
    from rnnlab.data.text import TBPTTBatcher

    rows = max(1, min(rows, (len(ids) - 1) // seq_len))
    device = next(model.parameters()).device
    state, total, count = None, 0.0, 0
    for x, y in TBPTTBatcher(ids, rows, seq_len, drop_last=False):
        logits, state = model(x.to(device), state)
        total += float(torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1), reduction="sum"))
        count += y.numel()
    return total / count, count


# ------------------------------------------------------------------------------------------------ stock


def score_prices(bundle: Bundle, path: str | Path, *, start=None, end=None) -> dict[str, Any]:
    from rnnlab.data.stock import (
        TARGET_COLUMN,
        make_features,
        naive_previous_close,
        naive_same_day_open,
        read_prices,
        regression_metrics,
        to_price,
        windows_between,
    )
    from rnnlab.inference import StockForecaster

    forecaster = StockForecaster(bundle)
    features = make_features(read_prices(path))
    X, rows = windows_between(features, forecaster.scaler, forecaster.window, start, end)
    with torch.inference_mode():
        scaled = torch.cat([forecaster.model(torch.from_numpy(X[i : i + 1024]).to(forecaster.device)).float().cpu()
                            for i in range(0, len(X), 1024)]).numpy()
    predicted = to_price(forecaster.target_scaler.inverse_transform(scaled.astype(np.float64)), rows,
                         forecaster.target)
    actual = rows[TARGET_COLUMN].to_numpy(dtype=np.float64)
    result: dict[str, Any] = {"days": len(rows), "first_day": rows.index[0].date().isoformat(),
                              "last_day": rows.index[-1].date().isoformat()}
    for name, forecast in (("model", predicted), ("same_day_open", naive_same_day_open(rows)),
                           ("previous_close", naive_previous_close(rows))):
        result[name] = regression_metrics(actual, forecast)
    return result


# ------------------------------------------------------------------------------------------------ helpers


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN; R^2 of one day is undefined)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
