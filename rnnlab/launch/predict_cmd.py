"""``rnnlab evaluate | classify | forecast | generate``: thin wrappers over bundles and ``rnnlab.inference``."""

from __future__ import annotations

import argparse
import datetime
import json


def add_parser(subparsers) -> None:
    from rnnlab.launch.cli import add_common_flags

    p = subparsers.add_parser(
        "evaluate", help="score a bundle on its job's test split, or on any data in its job's format (--data)",
        description="Score a bundle. Without --data: the test split of the bundle's job, rebuilt from its training "
        "config. With --data PATH: any data in the job's format, read with the bundle's own vocabulary or scaler -- "
        "sentiment: a folder with pos/ and neg/ text files or a CSV with text,label columns (accuracy, ROC AUC, "
        "unknown tokens); charlm: any text file (nats and bits per character; characters outside the vocabulary are "
        "skipped, counted and named); stock: a Yahoo-layout daily CSV, optionally cut with --from/--to (MAE, R^2 "
        "beside close = open and close = previous close).")
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (e.g. runs/sentiment-default/bundle)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--source", metavar="PATH", help="data file to rebuild the job's test split from")
    where.add_argument("--data", metavar="PATH", help="data in the job's format to score (see above)")
    p.add_argument("--from", dest="start", type=_date, metavar="YYYY-MM-DD", help="stock: first day to score")
    p.add_argument("--to", dest="end", type=_date, metavar="YYYY-MM-DD", help="stock: last day to score")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    add_common_flags(p)
    p.set_defaults(func=run_evaluate)

    p = subparsers.add_parser("classify", help="sentiment of one or more texts with a sentiment bundle")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("texts", metavar="TEXT", nargs="+", help="review text(s) to classify")
    add_common_flags(p)
    p.set_defaults(func=run_classify)

    p = subparsers.add_parser("forecast", help="next close from a price history with a stock bundle")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--csv", required=True, metavar="FILE", help="Yahoo-layout daily prices (Date,Open,High,Low,Close,Volume)")
    add_common_flags(p)
    p.set_defaults(func=run_forecast)

    p = subparsers.add_parser("generate", help="sample text from a charlm bundle")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--prompt", default="the emperor", help="text to continue (default: %(default)r)")
    p.add_argument("--length", type=int, default=500, help="characters to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    add_common_flags(p)
    p.set_defaults(func=run_generate)


def _predictor(path: str, kind: str):
    from rnnlab.errors import InputError
    from rnnlab.inference import load_predictor

    predictor = load_predictor(path)
    if type(predictor).__name__ != kind:
        raise InputError(f"The bundle {path} is not for this command (it loads as a {type(predictor).__name__}).")
    return predictor


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date of the form YYYY-MM-DD") from None


def run_evaluate(args: argparse.Namespace) -> int:
    from rnnlab.errors import InputError

    if args.data is None:
        if args.start is not None or args.end is not None:
            raise InputError("--from/--to select days of the data given with --data; add --data PRICES.csv.")
        from rnnlab.trainers.evaluate import evaluate_bundle

        scores = evaluate_bundle(args.bundle, source=args.source)
    else:
        from rnnlab.scoring import score_data

        scores = score_data(args.bundle, args.data, start=args.start, end=args.end)
    print(json.dumps(scores, indent=1, ensure_ascii=False) if args.json else _lines(scores))
    return 0


def _lines(scores: dict, indent: str = "") -> str:
    """``key: value`` lines, nested mappings indented under their key; floats to 4 significant places."""
    lines = []
    for key, value in scores.items():
        key = key if key.isprintable() and key.strip() == key and key else repr(key)  # a tab or a space shows quoted
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:" + ("" if value else " none"))
            if value:
                lines.append(_lines(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {f'{value:.4g}' if isinstance(value, float) else value}")
    return "\n".join(lines)


def run_classify(args: argparse.Namespace) -> int:
    predictor = _predictor(args.bundle, "SentimentClassifier")
    for text, answer in zip(args.texts, predictor.predict(list(args.texts))):
        print(json.dumps({"text": text[:60], **answer}))
    return 0


def run_forecast(args: argparse.Namespace) -> int:
    from rnnlab.data.stock import read_prices

    predictor = _predictor(args.bundle, "StockForecaster")
    # The forecast needs the last few hundred days only (252-day features + a window); a full file is longer
    # than the service limit, so keep its tail.
    history = read_prices(args.csv).iloc[-1000:]
    print(json.dumps(predictor.predict([history])[0], default=str))
    return 0


# SamplingParams field -> the flag that sets it, so an error names what the user typed
_SAMPLING_FLAGS = {"max_new_tokens": "--length", "temperature": "--temperature", "top_k": "--top-k",
                   "top_p": "--top-p", "seed": "--seed"}


def run_generate(args: argparse.Namespace) -> int:
    from rnnlab.errors import InputError
    from rnnlab.sampling import sampling_params

    try:  # the one definition of the ranges (the service's schema uses it too), checked before the bundle loads
        params = sampling_params(max_new_tokens=args.length, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed)
    except InputError as error:
        field, _, rest = str(error).partition(":")
        raise InputError(f"{_SAMPLING_FLAGS.get(field, field)}:{rest}") from None
    predictor = _predictor(args.bundle, "TextGenerator")
    # stream() checks the prompt before it returns, so a bad one is refused before anything is printed; then the
    # characters come as they are sampled, so a long --length shows progress.
    characters = predictor.stream(args.prompt, **params.model_dump())
    print(args.prompt, end="", flush=True)
    for char in characters:
        print(char, end="", flush=True)
    print()
    return 0
