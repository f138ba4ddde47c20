"""Simple-model baselines that every rnnlab quality figure stands beside, on the real data.

The data goes through rnnlab's own pipelines (rnnlab.data.imdb / text / stock), so the splits are exactly the
ones the LSTMs train and are scored on:

* sentiment: TF-IDF (word 1-2 grams over rnnlab's tokenizer) + logistic regression, and NBSVM-bi (Wang &
  Manning 2012), 25k train / 25k test;
* charlm: interpolated Witten-Bell character n-grams (benchmarks/ngram.py) on the 90/5/5 contiguous split of
  lowercased War and Peace, nats/char on validation and test;
* stock: persistence (close = same-day open, close = previous close) and linear regression on the 37 scaled
  features, on the seed's date split (train .. 2022-12-31, test 2023-01..06).

    python -m benchmarks.baselines                    # all three, a table on stdout
    python -m benchmarks.baselines --only charlm --json results/baselines.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import machine_description, write_json
from benchmarks.ngram import WittenBellNgram

BASELINES = ("sentiment", "charlm", "stock")  # the jobs with a simple baseline here


# ---------------------------------------------------------------------------------------------------------
# sentiment


def sentiment_baseline(mirror: str | None, *, C: float = 4.0) -> dict[str, Any]:
    """The linear anchors on the official 25k/25k split, over rnnlab's tokenizer (HTML stripped, lowercased,
    emoticons kept: the tokens the LSTM sees): TF-IDF + logistic regression, and NBSVM-bi."""
    from rnnlab.data import imdb
    from rnnlab.data.sources import resolve

    start = time.perf_counter()
    reviews = imdb.read_imdb(resolve("imdb", mirror=mirror), splits=("train", "test"))
    read_s = time.perf_counter() - start
    train, test = reviews["train"], reviews["test"]
    texts = {"train": [r.text for r in train], "test": [r.text for r in test]}
    labels = {"train": np.array([r.label for r in train]), "test": np.array([r.label for r in test])}
    return {
        "train_reviews": len(train),
        "test_reviews": len(test),
        "read_s": read_s,
        "tfidf_lr": _timed(fit_tfidf_lr, texts, labels, C=C),
        "nbsvm_bi": _timed(fit_nbsvm_bi, texts, labels),
    }


@dataclass(frozen=True)
class LinearBaseline:
    """A linear model fitted on reviews, over rnnlab's tokens: ``scores(texts)`` are its decision values (> 0:
    positive; for logistic regression the logit of P(positive))."""

    model: str  # what it is, in words
    features: int
    scores: Callable[[list[str]], np.ndarray]


def _timed(fit, texts, labels, **options) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, roc_auc_score

    start, cpu_start = time.perf_counter(), time.process_time()
    baseline = fit(texts["train"], labels["train"], **options)
    scores = baseline.scores(texts["test"])
    return {
        "model": baseline.model,
        "features": baseline.features,
        "test_accuracy": float(accuracy_score(labels["test"], scores > 0)),
        "test_roc_auc": float(roc_auc_score(labels["test"], scores)),
        "fit_predict_s": time.perf_counter() - start,
        "fit_predict_cpu_s": time.process_time() - cpu_start,
    }


def fit_tfidf_lr(texts: list[str], labels: np.ndarray, *, C: float = 4.0) -> LinearBaseline:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from rnnlab.data import imdb

    vectorizer = TfidfVectorizer(
        tokenizer=imdb.tokenize, lowercase=False, token_pattern=None, ngram_range=(1, 2), min_df=2,
        sublinear_tf=True,
    )
    model = LogisticRegression(C=C, max_iter=1000).fit(vectorizer.fit_transform(texts), labels)
    return LinearBaseline(f"TF-IDF (1-2 grams, min_df 2, sublinear tf) + LogisticRegression(C={C})",
                          len(vectorizer.vocabulary_), lambda new: model.decision_function(vectorizer.transform(new)))


def fit_nbsvm_bi(texts: list[str], labels: np.ndarray, *, C: float = 1.0, beta: float = 0.25,
                 alpha: float = 1.0) -> LinearBaseline:
    """NBSVM-bi as Wang & Manning (2012) define it: binarized uni+bigrams scaled by the naive-Bayes log-count
    ratio r, an L2-regularised squared-hinge linear SVM on them, its weights interpolated toward their mean
    magnitude, w' = (1 - beta) mean|w| + beta w (their C = 1, beta = 0.25, alpha = 1)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.svm import LinearSVC

    from rnnlab.data import imdb

    vectorizer = CountVectorizer(tokenizer=imdb.tokenize, lowercase=False, token_pattern=None, ngram_range=(1, 2),
                                 binary=True)
    x_train = vectorizer.fit_transform(texts)
    y = np.asarray(labels)
    p = alpha + np.asarray(x_train[y == 1].sum(axis=0)).ravel()
    q = alpha + np.asarray(x_train[y == 0].sum(axis=0)).ravel()
    r = np.log((p / p.sum()) / (q / q.sum()))
    svm = LinearSVC(C=C, max_iter=5000).fit(x_train.multiply(r).tocsr(), y)
    w = svm.coef_.ravel()
    w = (1 - beta) * np.abs(w).mean() + beta * w

    def scores(new: list[str]) -> np.ndarray:
        return np.asarray(vectorizer.transform(new).multiply(r).tocsr() @ w + svm.intercept_[0]).ravel()

    return LinearBaseline(f"NBSVM-bi (binary 1-2 grams x NB log-count ratio, LinearSVC C={C}, beta {beta})",
                          len(vectorizer.vocabulary_), scores)


# ---------------------------------------------------------------------------------------------------------
# charlm


def charlm_baseline(mirror: str | None, *, orders: tuple[int, ...] = (5, 6, 7)) -> dict[str, Any]:
    """Witten-Bell n-grams fit on train; nats/char on val and test (context carried across split boundaries,
    as the stream is contiguous)."""
    from rnnlab.data import text
    from rnnlab.data.sources import resolve

    data = text.load_text_data(resolve("text", mirror=mirror))
    vocab_size = len(data.vocab)
    rows = []
    for order in orders:
        start = time.perf_counter()
        model = WittenBellNgram(order, vocab_size).fit(data.train)
        fit_s = time.perf_counter() - start
        val = model.nats_per_symbol(data.val, history=data.train)
        test = model.nats_per_symbol(data.test, history=np.concatenate([data.train, data.val]))
        rows.append({
            "order": order, "val_nats": val, "test_nats": test,
            "val_bits": val / np.log(2), "test_bits": test / np.log(2),
            "fit_s": fit_s, "total_s": time.perf_counter() - start,
        })
    return {
        "model": "interpolated Witten-Bell character n-gram (uniform base)",
        "characters": int(len(data.train) + len(data.val) + len(data.test)),
        "vocab_size": vocab_size,
        "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "orders": rows,
    }


# ---------------------------------------------------------------------------------------------------------
# stock


def stock_baseline(mirror: str | None) -> dict[str, Any]:
    """Persistence and linear regression on the seed's date split; R^2 / MAE / MAPE on val and test.

    Linear regression is fit twice: on the chapter's train (everything up to 2022-12-31) for the test figure
    the chapter compares with, and on train-minus-validation (rnnlab's default split) for the val figure.
    """
    from sklearn.linear_model import LinearRegression

    from rnnlab.data import stock
    from rnnlab.data.sources import resolve

    features = stock.make_features(stock.read_prices(resolve("stock", mirror=mirror)))
    out: dict[str, Any] = {"features": len(stock.FEATURE_NAMES), "rows": {}, "metrics": {"val": {}, "test": {}}}
    for label, val_days in (("chapter split (no val)", 0), ("rnnlab split (val = last 252 days)", 252)):
        parts = stock.split_by_date(features, val_days=val_days)
        scaler = stock.Scaler.fit(parts["train"], stock.FEATURE_NAMES)
        lr = LinearRegression().fit(scaler.transform(parts["train"]), parts["train"][stock.TARGET_COLUMN])
        out["rows"][label] = {name: len(part) for name, part in parts.items()}
        for split in ("val", "test"):
            part = parts[split]
            if part.empty or (split == "test" and val_days):  # the test figures come from the chapter split
                continue
            truth = part[stock.TARGET_COLUMN].to_numpy()
            out["metrics"][split] = {
                "close = same-day open": stock.regression_metrics(truth, stock.naive_same_day_open(part)),
                "close = previous close": stock.regression_metrics(truth, stock.naive_previous_close(part)),
                "linear regression (37 scaled features)": stock.regression_metrics(
                    truth, lr.predict(scaler.transform(part))),
            }
    return out


# ---------------------------------------------------------------------------------------------------------
# report


def print_table(results: dict[str, Any]) -> None:
    print(f"\nmachine: {results['machine']}")
    if "sentiment" in results:
        s = results["sentiment"]
        print(f"\nsentiment (IMDb, 25k train / 25k test; reading the archive {s['read_s']:.1f} s)")
        for name in ("tfidf_lr", "nbsvm_bi"):
            m = s[name]
            print(f"  {m['model']}\n    test accuracy {100 * m['test_accuracy']:.2f} %   ROC-AUC "
                  f"{m['test_roc_auc']:.4f}   fit+predict {m['fit_predict_s']:.1f} s wall, "
                  f"{m['fit_predict_cpu_s']:.1f} s CPU, {m['features']:,} features")
    if "charlm" in results:
        c = results["charlm"]
        print(f"\ncharlm (War and Peace lowercased, {c['characters']:,} chars, {c['vocab_size']} symbols, "
              f"split {c['split_sizes']})")
        print(f"  {'order':>5}  {'val nats':>8}  {'test nats':>9}  {'val bpc':>7}  {'test bpc':>8}  {'time s':>6}")
        for row in c["orders"]:
            print(f"  {row['order']:>5}  {row['val_nats']:8.4f}  {row['test_nats']:9.4f}  {row['val_bits']:7.4f}  "
                  f"{row['test_bits']:8.4f}  {row['total_s']:6.1f}")
    if "stock" in results:
        s = results["stock"]
        print(f"\nstock (DJIA, rows per split: {s['rows']})")
        print(f"  {'split':<5} {'model':<40} {'R^2':>7} {'MAE':>8} {'MAPE %':>7}")
        for split, models in s["metrics"].items():
            for name, m in models.items():
                print(f"  {split:<5} {name:<40} {m['r2']:7.4f} {m['mae']:8.2f} {100 * m['mape']:7.3f}")
    print(f"\ntotal wall time {results['wall_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=BASELINES, default=list(BASELINES), help="which baselines to run")
    parser.add_argument("--data-mirror", default=None, help="folder with the data files (else RNNLAB_DATA_MIRROR)")
    parser.add_argument("--orders", nargs="+", type=int, default=[5, 6, 7], help="n-gram orders for charlm")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_description()}
    if "sentiment" in args.only:
        results["sentiment"] = sentiment_baseline(args.data_mirror)
    if "charlm" in args.only:
        results["charlm"] = charlm_baseline(args.data_mirror, orders=tuple(args.orders))
    if "stock" in args.only:
        results["stock"] = stock_baseline(args.data_mirror)
    results["wall_s"] = time.perf_counter() - started
    print_table(results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
