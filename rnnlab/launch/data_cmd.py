"""``rnnlab data {imdb,stock,text}``: summarise a data set before training on it; ``rnnlab data short-texts``: cut
short texts from IMDb reviews (rnnlab.data.short_texts)."""

from __future__ import annotations

import argparse
import json

from rnnlab.registry import JOBS

# data set -> its job (the registry names each job's data set and summary function, imported when asked for)
SUMMARIES = {spec.data_set: spec for spec in JOBS.values() if spec.data_summary}


def add_parser(subparsers) -> None:
    from rnnlab.launch.cli import add_common_flags

    parser = subparsers.add_parser(
        "data",
        help="summarise a data set (counts, vocabulary, lengths, rows, features, date span), or cut short texts",
        description="Print what you are about to train on: the default data set (mirror or download cache) "
        "or your own file with --source. 'rnnlab data short-texts' writes short texts cut from IMDb reviews.",
    )
    add_common_flags(parser)
    verbs = parser.add_subparsers(title="data sets", metavar="DATASET", dest="dataset", required=True)
    for name in sorted(SUMMARIES):
        jobs = ", ".join(job for job, spec in JOBS.items() if spec.data_set == name)
        summary = verbs.add_parser(name, help=f"summarise the data of {jobs}",
                                   description=f"Summarise the data set of {jobs}.")
        summary.add_argument(
            "--source",
            metavar="PATH",
            help="your own data instead of the default: an aclImdb archive or folder, a Yahoo-layout CSV, a text file",
        )
        summary.add_argument("--json", action="store_true", help="print the summary as JSON")
        add_common_flags(summary)
        summary.set_defaults(func=run)
    _add_short_texts(verbs)


def _add_short_texts(verbs) -> None:
    from rnnlab.data.short_texts import MIN_WORDS, SLICES, SPLITS, WINDOWS
    from rnnlab.launch.cli import add_common_flags

    parser = verbs.add_parser(
        "short-texts",
        help="write short texts cut from IMDb reviews (sentences, token windows), each with its review's label",
        description="Cut short texts from the sentiment job's IMDb test or validation reviews, each keeping its "
        "review's label, and write one text,label,review CSV per slice into --output (score one with "
        "'rnnlab evaluate BUNDLE --data OUTPUT/first_sentence.csv'), with slices.json (settings, sizes). "
        f"Slices: {', '.join(SLICES)}. Sentences are split on the raw text (at <br /> and at . ! ? before a "
        f"space), fragments of fewer than {MIN_WORDS} words left out; windows are {', '.join(map(str, WINDOWS))} "
        "consecutive tokens at a random start (a shorter review whole). The same --seed writes the same files.",
    )
    parser.add_argument("--output", metavar="DIR", required=True,
                        help="folder to write the CSVs into (made if missing; its parent must exist)")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="test: the 25,000 test reviews (default); val: the training reviews a sentiment run "
                        "holds out for validation (see --val-fraction, --val-seed), to choose recipes on")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random sentence and windows (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                        help="with --split val: the run's data.val_fraction (default 0.1)")
    parser.add_argument("--val-seed", type=int, default=0, metavar="S",
                        help="with --split val: the run's train.seed, which picks the held-out reviews (default 0)")
    parser.add_argument("--source", metavar="PATH",
                        help="an aclImdb archive or folder instead of the default IMDb data set")
    add_common_flags(parser)
    parser.set_defaults(func=run_short_texts)


def run(args: argparse.Namespace) -> int:
    from rnnlab.data.sources import resolve

    path = resolve(args.dataset, args.source)
    summary = SUMMARIES[args.dataset].load("data_summary")(path)
    summary = {"dataset": args.dataset, "source": str(path), **summary}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
    return 0


def run_short_texts(args: argparse.Namespace) -> int:
    from rnnlab.data.short_texts import write_short_texts
    from rnnlab.data.sources import resolve

    manifest = write_short_texts(args.output, resolve("imdb", args.source), split=args.split, seed=args.seed,
                                 val_fraction=args.val_fraction, val_seed=args.val_seed)
    print(f"{manifest['reviews']:,} {args.split} reviews -> {args.output}")
    print(format_summary(manifest["slices"], indent=2))
    return 0


def format_summary(summary: dict, indent: int = 0) -> str:
    """Nested dicts as an indented two-column listing."""
    width = max(len(str(key)) for key in summary) if summary else 0
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(f"{' ' * indent}{key}:")
            lines.append(format_summary(value, indent + 2))
        else:
            if isinstance(value, float):
                value = f"{value:,.4g}"
            elif isinstance(value, int):
                value = f"{value:,}"
            lines.append(f"{' ' * indent}{str(key).ljust(width)}  {value}")
    return "\n".join(lines)
