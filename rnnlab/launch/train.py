"""``rnnlab train JOB`` (a job of rnnlab/registry.py): one training run from a preset, a YAML file and overrides.

Also runnable as a module, which is what ``accelerate launch`` needs::

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m rnnlab.launch.train sentiment --preset default
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rnnlab.registry import JOBS, presets


def add_parser(subparsers) -> argparse.ArgumentParser:
    from rnnlab.launch.cli import add_common_flags

    parser = subparsers.add_parser(
        "train",
        help=f"train a model ({', '.join(JOBS)}) and export a bundle",
        description="Train one job with the one Accelerate loop. Checkpoints, metrics.jsonl, the W&B run "
        "(offline unless WANDB_API_KEY is set) and the bundle all go under --output. Run it under "
        "'accelerate launch -m rnnlab.launch.train ...' for several processes or GPUs.",
    )
    configure(parser)
    add_common_flags(parser)
    parser.set_defaults(func=run)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", choices=JOBS, help="what to train")
    parser.add_argument("--preset", choices=presets(), default="default",
                        help="recipe to start from (configs/presets/JOB.yaml); default: %(default)s")
    parser.add_argument("--config", metavar="YAML", help="a YAML file merged on top of the preset")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one setting, e.g. --set train.lr=1e-3 (repeatable; value parsed as YAML)")
    parser.add_argument("--source", metavar="PATH", help="train on this file/folder instead of the default data set")
    parser.add_argument("--output", metavar="DIR", help="where everything goes (default: runs/JOB-PRESET)")
    parser.add_argument("--json", action="store_true",
                        help="print the run's result as JSON (every figure, as in metrics.json) instead of a table")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|CHECKPOINT",
                        help="continue the run in --output from its last good checkpoint, or start it when it has "
                        "none ('auto', the default when the flag is bare: the same command line then works for a "
                        "first start and every restart, as elastic launchers and schedulers need); or from the "
                        "checkpoint folder given")


def run(args: argparse.Namespace) -> int:
    from rnnlab.config import load_config
    from rnnlab.trainers.loop import train

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-save INFO lines drown ours
    overrides = list(args.overrides)
    if args.source:
        overrides.append(f"data.source={json.dumps(str(Path(args.source).expanduser()))}")
    config = load_config(args.job, args.preset, args.config, overrides)
    output = Path(args.output or f"runs/{args.job}-{args.preset}")
    resume = {None: False, "auto": True}.get(args.resume, Path(args.resume) if args.resume else False)
    result = train(config, output, resume=resume)
    from accelerate import PartialState

    if PartialState().is_main_process:
        if args.json:
            print(json.dumps({"output": str(output), "best_step": result["best_step"], "steps": result["steps"],
                              "val": result["val"], "test": result["test"]}, indent=1, default=str))
        else:
            print(f"rnnlab: {args.job} trained for {result['steps']} steps (best step {result['best_step']}); "
                  f"bundle and figures in {output}")
            print(result_table(args.job, result))
    return 0


def result_table(job: str, result: dict) -> str:
    """The job's ranked metrics (the registry's) on validation and test, a row each: what a finished run prints
    (every other figure -- per horizon, baselines -- is in metrics.json, the bundle and ``--json``)."""
    splits = [split for split in ("val", "test") if result.get(split)]
    names = [name for name in JOBS[job].metrics if any(name in result[split] for split in splits)]
    width = {name: max(10, len(name) + 2) for name in names}
    lines = [f"{'':6s}" + "".join(f"{name:>{width[name]}s}" for name in names)]
    for split in splits:
        cells = (result[split].get(name) for name in names)
        lines.append(f"{split:6s}" + "".join(f"{'-' if v is None else format(v, '.4g'):>{width[n]}s}"
                                             for n, v in zip(names, cells)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m rnnlab.launch.train JOB ...``: the same flags as ``rnnlab train``, errors as one sentence."""
    from rnnlab.launch.cli import add_common_flags, main as cli_main

    parser = argparse.ArgumentParser(prog="python -m rnnlab.launch.train")
    configure(parser)
    add_common_flags(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.parse_args(argv)  # --help and usage errors under this program's name
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
