"""``rnnlab data {imdb,stock,text}``: summarise a data set before training on it."""

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
        help="summarise a data set (counts, vocabulary, lengths, rows, features, date span)",
        description="Print what you are about to train on: the default data set (mirror or download cache) "
        "or your own file with --source.",
    )
    parser.add_argument("dataset", choices=sorted(SUMMARIES), help="; ".join(
        f"{name}: the data of {', '.join(job for job, spec in JOBS.items() if spec.data_set == name)}"
        for name in sorted(SUMMARIES)))
    parser.add_argument(
        "--source",
        metavar="PATH",
        help="your own data instead of the default: an aclImdb archive or folder, a Yahoo-layout CSV, a text file",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_common_flags(parser)
    parser.set_defaults(func=run)


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
