"""``rnnlab evaluate`` and one verb per predicting job (``classify``, ``forecast``, ``generate``; the registry's
``verb``): thin wrappers over bundles and each job's predictor.

A verb's arguments and what it prints are its job's (``rnnlab/jobs/<name>.py``: ``CLI.add_arguments`` and
``CLI.run``); they are added when the verb is used, so ``rnnlab --help`` imports no job. Several jobs may answer
one verb: it dispatches on the bundle's job.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    from rnnlab.launch.cli import add_common_flags
    from rnnlab.registry import JOBS, verbs

    scored = "; ".join(f"{name}: see {spec.scorer.replace(':', '.')}" for name, spec in JOBS.items() if spec.scorer)
    p = subparsers.add_parser(
        "evaluate", help="score a bundle on its job's test split, or on any data in its job's format (--data)",
        description="Score a bundle with its job's own test scoring (the figures training reports for its test "
        "split). Without --data: the test split of the bundle's job, rebuilt from its training config. With --data "
        f"PATH: any data in the job's format, read with the bundle's own vocabulary or scaler -- {scored}. "
        "--from/--to cut dated data (prices) to a span of days.")
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (e.g. runs/sentiment-default/bundle)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--source", metavar="PATH", help="data file to rebuild the job's test split from")
    where.add_argument("--data", metavar="PATH", help="data in the job's format to score (see above)")
    p.add_argument("--from", dest="start", type=_date, metavar="YYYY-MM-DD", help="dated data: first day to score")
    p.add_argument("--to", dest="end", type=_date, metavar="YYYY-MM-DD", help="dated data: last day to score")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    add_runtime_flag(p)
    add_common_flags(p)
    p.set_defaults(func=run_evaluate)

    for verb, specs in verbs().items():
        # a verb several jobs answer says what it does for each (forecast: stock's next close, horizon's quantiles)
        p = subparsers.add_parser(verb, help="; or ".join(dict.fromkeys(s.verb_help for s in specs if s.verb_help)),
                                  conflict_handler="resolve")
        p.__class__ = _VerbParser  # its jobs' arguments are added when it parses (``rnnlab --help`` imports none)
        p.specs = specs
        p.add_argument("bundle", metavar="BUNDLE")
        add_runtime_flag(p)
        add_common_flags(p)
        p.set_defaults(func=run_verb, verb=verb)


def add_runtime_flag(parser) -> None:
    parser.add_argument("--runtime", metavar="auto|torch|onnx", default=None,
                        help="what runs the model: onnx (ONNX Runtime on the CPU, from the bundle's graph), torch, or "
                        "auto (onnx where the bundle holds a graph, else torch); default: the bundle's own default, "
                        "else auto")


class _VerbParser(argparse.ArgumentParser):
    """A verb's parser: its jobs' ``CLI.add_arguments`` run the first time it parses (a flag two jobs declare is
    declared once: ``conflict_handler="resolve"``)."""

    specs: tuple = ()

    def parse_known_args(self, args=None, namespace=None):
        if not getattr(self, "_jobs_added", False):
            self._jobs_added = True
            for spec in self.specs:
                spec.load("cli").add_arguments(self)
        return super().parse_known_args(args, namespace)


def run_verb(args: argparse.Namespace) -> int:
    """The verb's job's ``CLI.run``: the one job that answers the verb, or the bundle's job when several do."""
    from rnnlab.registry import verbs

    specs = verbs()[args.verb]
    spec = next((s for s in specs if s.name == _job_of(args.bundle)), specs[0])
    return spec.load("cli").run(args, lambda: _predictor(args.bundle, specs, args.runtime))


def _job_of(path: str) -> str | None:
    """The job a bundle's config.json names (None if it cannot be read: loading the bundle then says why)."""
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def _predictor(path: str, specs, runtime: str | None):
    from rnnlab.errors import InputError
    from rnnlab.inference import load_predictor

    predictor = load_predictor(path, runtime=runtime)
    if not any(type(predictor).__name__ == spec.predictor.rpartition(":")[2] for spec in specs):
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

        scores = evaluate_bundle(args.bundle, source=args.source, runtime=args.runtime)
    else:
        from rnnlab.scoring import score_data

        scores = score_data(args.bundle, args.data, start=args.start, end=args.end, runtime=args.runtime)
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
