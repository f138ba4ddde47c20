"""``rnnlab tune JOB`` (a job of rnnlab/registry.py): a Ray Tune search over the one training loop.

    rnnlab tune stock --num-samples 16 --max-epochs 20 --scheduler asha --search random \\
        --cpus-per-trial 1 --output runs/tune/stock --name stock-asha
    rnnlab tune stock --output runs/tune/stock --resume          # continue an interrupted search
    rnnlab tune sentiment --space my_space.yaml --gpus-per-trial 0.25   # four trials share each GPU
    rnnlab tune charlm --address auto --gpus-per-trial 2          # each trial drives a 2-GPU Ray Train run

Everything is checked before Ray starts (job, space, resources); results go under --output: results.csv,
best.yaml (``rnnlab train JOB --config DIR/best.yaml`` retrains the winner), best_bundle/, and one folder per
trial under DIR/NAME/. The search itself lives in rnnlab/tuning/ (its Python API).
"""

from __future__ import annotations

import argparse
import logging

from rnnlab.registry import JOBS, presets


def add_parser(subparsers) -> argparse.ArgumentParser:
    from rnnlab.launch.cli import add_common_flags

    parser = subparsers.add_parser(
        "tune",
        help="search hyperparameters with Ray Tune (ASHA or FIFO, random or Optuna), export the best bundle",
        description="Run a Ray Tune search: each trial is the same training loop as 'rnnlab train', reporting "
        "its validation metric every epoch with a checkpoint. Search spaces live in configs/tune/JOB.yaml; "
        "--space merges your own file over them. Results, best.yaml and best_bundle/ go under --output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("job", help=f"what to tune: {', '.join(JOBS)}")
    parser.add_argument("--num-samples", type=int, default=8, help="trials to run (times each grid value)")
    parser.add_argument("--max-epochs", type=int, default=5, help="epochs a trial may train (ASHA's max_t)")
    parser.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                        help="asha stops weak trials at its rungs; fifo runs every trial to the end")
    parser.add_argument("--search", choices=("random", "optuna"), default="random", help="how trials are sampled")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs reserved by each trial")
    parser.add_argument("--gpus-per-trial", type=float, default=0,
                        help="GPUs per trial: a fraction packs trials on one GPU (0.5 = two per GPU); a whole "
                        "number above 1 runs each trial through Ray Train's TorchTrainer on that many GPUs")
    parser.add_argument("--address", metavar="auto|HOST:PORT|ray://HOST:PORT", default=None,
                        help="run on an existing Ray cluster: its head's HOST:PORT as `ray start --head` printed "
                        "it, or auto (RAY_ADDRESS, else the cluster started on this machine); --output must "
                        "then be on storage every node sees. Default: a local Ray instance")
    parser.add_argument("--space", metavar="SPACE.yaml", help="your search space, merged over configs/tune/JOB.yaml")
    parser.add_argument("--name", help="the search's name: its folder under --output and its W&B group "
                        "(default: JOB-DATE-TIME)")
    parser.add_argument("--preset", choices=presets(), default="default", help="config every trial starts from")
    parser.add_argument("--config", metavar="YAML", help="a YAML file merged on top of the preset")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one setting of the base config, e.g. --set data.limit_train=2000")
    parser.add_argument("--source", metavar="PATH", help="train on this file/folder instead of the default data set")
    parser.add_argument("--output", metavar="DIR", help="where results go (default: runs/tune/NAME)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted search in --output: unfinished and errored trials go on "
                        "from their last checkpoint, finished ones are kept as they are")
    parser.add_argument("--workers-per-trial", type=int, default=1,
                        help="training processes per trial: above 1, each trial runs as a Ray Train TorchTrainer of "
                        "that many workers (gloo on CPUs; with --gpus-per-trial, one GPU each), plus a driver "
                        "that reports to Tune; --cpus-per-trial is split over the workers, at least 1 each")
    parser.add_argument("--max-failures", type=int, default=None,
                        help="times a failed trial (its process or node died) is retried, each time from its last "
                        "checkpoint; 0 gives up at once (default: 3)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--quiet", action="store_true", help="hide Ray's progress output; print only the results")
    add_common_flags(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rnnlab.errors import ConfigError
    from rnnlab.tuning import SearchSettings, load_plan, plan_search, run_search
    from rnnlab.tuning.plan import DEFAULT_MAX_FAILURES

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    settings = SearchSettings(
        num_samples=args.num_samples, max_epochs=args.max_epochs, scheduler=args.scheduler, search=args.search,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, address=args.address,
        workers_per_trial=args.workers_per_trial,
        num_cpus=args.num_cpus, max_failures=DEFAULT_MAX_FAILURES if args.max_failures is None else args.max_failures,
    )  # fmt: skip
    if args.resume:  # the saved plan as it was, so finished trials stay comparable; only where it runs is new
        if args.output is None and args.name is None:
            raise ConfigError("--resume needs the --output folder (or --name) of the search to continue.")
        plan = load_plan(args.output or Path("runs") / "tune" / args.name, address=args.address,
                         num_cpus=args.num_cpus, max_failures=args.max_failures)
        if plan.job != args.job:
            raise ConfigError(f"The search in {plan.output} is a {plan.job} search, not {args.job}; check --output.")
    else:
        overrides = list(args.overrides)
        if args.source:
            overrides.append(f"data.source={json.dumps(str(Path(args.source).expanduser().resolve()))}")
        plan = plan_search(args.job, settings, space=args.space, preset=args.preset, config_path=args.config,
                           overrides=overrides, name=args.name, output=args.output)
    result = run_search(plan, resume=args.resume, verbose=0 if args.quiet else 1)
    report(result)
    if result.interrupted:
        print(f"the search was interrupted; continue it with: rnnlab tune {result.job} --output {result.output} "
              "--resume")
        return 130
    return 1 if result.best is None else 0


def report(result) -> None:
    print()
    print(f"search '{result.name}' ({result.job}): {len(result.trials)} trials in {result.wall_s:.1f} s, "
          f"ranked by {result.metric} ({result.mode})")
    print(result.table())
    print(f"results: {result.csv_path}")
    if result.best is not None:
        print(f"best: {result.best.name} {result.metric}={result.best.metric:.6g}")
        print(f"best config: {result.best_config_path}  (rnnlab train {result.job} --config {result.best_config_path})")
        if result.best_bundle_path is not None:
            print(f"best bundle: {result.best_bundle_path}")
    else:
        print("no trial finished training, so there is no best configuration yet.")
    failed = [trial for trial in result.trials if trial.status == "error"]
    if failed:
        print(f"{len(failed)} trial(s) failed; first error ({failed[0].name}): {failed[0].error}")
        print(f"  full tracebacks: {result.output / result.name}/trial_*/error.txt")
