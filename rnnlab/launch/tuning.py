"""Ray Tune searches over the one training loop: the Python API behind ``rnnlab tune``.

    from rnnlab.launch.tuning import run_search
    result = run_search("stock", num_samples=8, max_epochs=10, output="runs/tune/stock")
    result.best.params, result.best.metric, result.best_config_path, result.best_bundle_path

What a search does:

1. **Plan, before Ray starts** (:func:`plan_search`): the job's config (preset, ``--config``, ``--set``), the
   search space (``configs/tune/{job}.yaml`` with the user's ``--space`` merged over it) checked against that
   config, and the resources checked against this machine. Any fault is one :class:`ConfigError` sentence.
2. **Trials**: each trial is :func:`rnnlab.trainers.loop.train` itself on the base config with the trial's
   params set, writing into its own folder ``OUTPUT/NAME/trial_<id>/`` (checkpoints, metrics.jsonl, W&B run
   files, bundle). After every validation the loop calls ``on_eval``, which reports the metrics with the
   checkpoint through ``ray.tune.report(..., checkpoint=ray.tune.Checkpoint.from_directory(...))``; a
   restarted trial resumes from ``ray.tune.get_checkpoint()``. ASHA stops weak trials at its rungs.
3. **Results** (:func:`summarize_search`): a table on the terminal, ``OUTPUT/results.csv``, the best trial's
   full config as ``OUTPUT/best.yaml`` (``rnnlab train JOB --config OUTPUT/best.yaml`` retrains it) and its
   bundle copied to ``OUTPUT/best_bundle/``.

Scale: ``address`` connects to a running cluster (``auto`` or ``ray://host:port``); OUTPUT must then be on a
filesystem every node sees (NFS), as Ray itself requires for a multi-node Tune run. ``gpus_per_trial`` below 1
packs trials onto one GPU (0.25 = four trials per GPU). Above 1 (a whole number), a trial becomes the driver
of a Ray Train ``TorchTrainer`` with that many GPU workers, each running the same ``train`` (Accelerate picks
up the process group Ray Train sets up); see :func:`_distributed_trial`.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rnnlab.errors import ConfigError
from rnnlab.launch.tune_space import (
    SearchSpace,
    apply_params,
    check_against_config,
    check_job,
    check_values,
    load_space,
    resolve_metric,
)

log = logging.getLogger(__name__)

SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
SETTINGS_FILE = "search.yaml"
# Environment the trials need on every node; Ray workers on a running cluster do not inherit the driver's.
FORWARDED_ENV = (
    "WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_DIR",
    "WANDB_SILENT", "WANDB_CONSOLE", "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "RNNLAB_DATA_MIRROR",
    "RNNLAB_CACHE_DIR",
)


@dataclass
class SearchPlan:
    """Everything a search needs, checked, before Ray starts. Saved as OUTPUT/search.yaml for --resume."""

    job: str
    name: str
    output: Path
    base_config: dict
    space: SearchSpace
    num_samples: int
    max_epochs: int
    scheduler: str
    search: str
    cpus_per_trial: float
    gpus_per_trial: float
    preset: str
    address: str | None = None
    num_cpus: int | None = None  # for a local Ray instance; None = every core

    @property
    def experiment_dir(self) -> Path:
        return self.output / self.name

    def to_dict(self) -> dict:
        return {
            "job": self.job,
            "name": self.name,
            "preset": self.preset,
            "num_samples": self.num_samples,
            "max_epochs": self.max_epochs,
            "scheduler": self.scheduler,
            "search": self.search,
            "cpus_per_trial": self.cpus_per_trial,
            "gpus_per_trial": self.gpus_per_trial,
            "space": self.space.to_dict(),
            "base_config": self.base_config,
        }


@dataclass
class TrialSummary:
    name: str
    status: str  # completed | stopped early | error | unfinished
    params: dict[str, Any]
    metric: float | None  # the best validation value the trial reached
    last_metric: float | None
    epochs: int
    trial_dir: Path
    error: str = ""

    @property
    def bundle_dir(self) -> Path | None:
        bundle = self.trial_dir / "bundle"
        return bundle if (bundle / "config.json").is_file() else None


@dataclass
class SearchResult:
    job: str
    name: str
    output: Path
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    csv_path: Path
    best_config_path: Path | None
    best_bundle_path: Path | None
    wall_s: float = 0.0
    interrupted: bool = False
    searched_keys: list[str] = field(default_factory=list)

    def table(self) -> str:
        return format_table(self)


# --- planning (no Ray) ----------------------------------------------------------------------------------


def plan_search(
    job: str,
    space: str | Path | dict | None = None,
    *,
    num_samples: int = 8,
    max_epochs: int = 5,
    scheduler: str = "asha",
    search: str = "random",
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    address: str | None = None,
    name: str | None = None,
    preset: str = "default",
    config_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    output: str | Path | None = None,
    num_cpus: int | None = None,
) -> SearchPlan:
    """Check every input and build the plan; raises ConfigError (one sentence) on the first fault."""
    from rnnlab.trainers.config import load_config

    check_job(job)
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"Unknown scheduler '{scheduler}'; choose one of {', '.join(SCHEDULERS)}.")
    if search not in SEARCHERS:
        raise ConfigError(f"Unknown search '{search}'; choose one of {', '.join(SEARCHERS)}.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"--num-samples must be a whole number of at least 1, not {num_samples!r}.")
    if not isinstance(max_epochs, int) or max_epochs < 1:
        raise ConfigError(f"--max-epochs must be a whole number of at least 1, not {max_epochs!r}.")
    if search == "optuna":
        _require_optuna()
    base_config = load_config(job, preset, config_path, list(overrides))
    if base_config["data"].get("val_days") == 0:  # stock's chapter protocol: nothing held out to rank trials on
        raise ConfigError("Tune ranks trials on a validation split and this config holds none (data.val_days=0, "
                          "as the stock chapter preset); add --set data.val_days=252 or tune another preset.")
    base_config = trial_base_config(base_config, max_epochs)
    search_space = resolve_metric(load_space(job, space), base_config)
    check_against_config(search_space, base_config, preset)
    check_values(search_space, base_config)
    if search == "optuna" and search_space.has_grid:
        raise ConfigError(f"{search_space.source} uses grid, which optuna cannot sample; "
                          "use choice or --search random.")
    check_resources(cpus_per_trial, gpus_per_trial, address=address, num_cpus=num_cpus)
    name = name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--name '{name}' may hold only letters, digits, '-', '_' and '.'.")
    output_dir = Path(output) if output is not None else Path("runs") / "tune" / name
    return SearchPlan(
        job=job, name=name, output=output_dir.resolve(), base_config=base_config, space=search_space,
        num_samples=num_samples, max_epochs=max_epochs, scheduler=scheduler, search=search,
        cpus_per_trial=float(cpus_per_trial), gpus_per_trial=float(gpus_per_trial), preset=preset,
        address=address, num_cpus=num_cpus,
    )


def trial_base_config(config: dict, max_epochs: int) -> dict:
    """The config every trial starts from: one validation per epoch (one Tune iteration = one epoch, which
    ASHA's rungs count), no step cap, no progress bars, and data paths made absolute (trials run elsewhere)."""
    config = copy.deepcopy(config)
    train = config["train"]
    train.update(epochs=max_epochs, max_steps=0, eval_every=0, progress=False)
    for key in ("source", "mirror"):
        if config["data"].get(key):
            config["data"][key] = str(Path(config["data"][key]).expanduser().resolve())
    return config


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("--search optuna needs the optuna package; pip install 'rnnlab[optuna]'.") from None


def check_resources(
    cpus_per_trial: float, gpus_per_trial: float, *, address: str | None = None, num_cpus: int | None = None
) -> None:
    """Refuse a per-trial request no node can meet. Local runs compare with this machine; cluster runs are
    checked again against the cluster once connected (:func:`check_cluster_resources`)."""
    if not _is_number(cpus_per_trial) or cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be a positive number, not {cpus_per_trial!r}.")
    if not _is_number(gpus_per_trial) or gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial must be zero or a positive number, not {gpus_per_trial!r}.")
    if gpus_per_trial > 1 and not float(gpus_per_trial).is_integer():
        raise ConfigError(
            f"--gpus-per-trial {gpus_per_trial} is neither a fraction of one GPU (at most 1) nor a whole number "
            "of GPUs; use e.g. 0.5 to share a GPU or 2 for a two-GPU trial."
        )
    if address is not None:
        return
    cores = num_cpus or os.cpu_count() or 1
    if cpus_per_trial > cores:
        raise ConfigError(
            f"--cpus-per-trial {cpus_per_trial:g} is more than this machine's {cores} CPUs; "
            f"ask for at most {cores} (or pass --address to use a cluster)."
        )
    if gpus_per_trial > 0:
        gpus = _local_gpu_count()
        if gpus == 0:
            raise ConfigError(
                f"--gpus-per-trial {gpus_per_trial:g} asks for a GPU but this machine has none; "
                "use --gpus-per-trial 0, or --address to use a cluster with GPUs."
            )
        if gpus_per_trial > gpus:
            raise ConfigError(
                f"--gpus-per-trial {gpus_per_trial:g} is more than this machine's {gpus} GPUs; "
                f"ask for at most {gpus} (or pass --address to use a cluster)."
            )


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_cluster_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Against a running cluster: one node must fit a single-process trial; a multi-GPU trial needs that
    many GPUs in the cluster (its workers may sit on different nodes)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    most_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    if gpus_per_trial > 1:
        if gpus_per_trial > total_gpus:
            raise ConfigError(
                f"--gpus-per-trial {gpus_per_trial:g} is more than the cluster's {total_gpus:g} GPUs."
            )
        return
    if cpus_per_trial > most_cpus:
        raise ConfigError(
            f"--cpus-per-trial {cpus_per_trial:g} is more than the largest node's {most_cpus:g} CPUs."
        )
    if gpus_per_trial > most_gpus:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} is more than the largest node's {most_gpus:g} GPUs.")


# --- saving / loading a plan for --resume ----------------------------------------------------------------


def save_plan(plan: SearchPlan) -> Path:
    plan.output.mkdir(parents=True, exist_ok=True)
    path = plan.output / SETTINGS_FILE
    text = "# The search as planned by rnnlab tune; --resume reads it back.\n" + yaml.safe_dump(
        plan.to_dict(), sort_keys=False
    )
    path.write_text(text, encoding="utf-8")
    return path


def load_plan(output: str | Path, *, address: str | None = None, num_cpus: int | None = None) -> SearchPlan:
    output = Path(output).resolve()
    path = output / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"{output} holds no search to resume ({SETTINGS_FILE} is missing); check --output.")
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    space_data = saved["space"]
    space = SearchSpace(
        job=saved["job"], metric=space_data["metric"], mode=space_data["mode"], params=space_data["params"],
        seed=space_data.get("seed"), asha=space_data["asha"], source=f"Search space in {path}",
    )
    return SearchPlan(
        job=saved["job"], name=saved["name"], output=output, base_config=saved["base_config"], space=space,
        num_samples=saved["num_samples"], max_epochs=saved["max_epochs"], scheduler=saved["scheduler"],
        search=saved["search"], cpus_per_trial=saved["cpus_per_trial"], gpus_per_trial=saved["gpus_per_trial"],
        preset=saved["preset"], address=address, num_cpus=num_cpus,
    )


# --- running ---------------------------------------------------------------------------------------------


def run_search(
    job: str,
    space: str | Path | dict | None = None,
    *,
    num_samples: int = 8,
    max_epochs: int = 5,
    scheduler: str = "asha",
    search: str = "random",
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    address: str | None = None,
    name: str | None = None,
    preset: str = "default",
    config_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    output: str | Path | None = None,
    resume: bool = False,
    num_cpus: int | None = None,
    verbose: int = 1,
) -> SearchResult:
    """Run (or with ``resume=True`` continue) a search and write its results; see the module docstring.

    On resume the saved plan (``output/search.yaml``) is used as it was, so finished trials stay comparable;
    only ``address`` and ``num_cpus`` are taken from this call.
    """
    if resume:
        if output is None and name is None:
            raise ConfigError("--resume needs the --output folder (or --name) of the search to continue.")
        check_job(job)
        plan = load_plan(output if output is not None else Path("runs") / "tune" / name,
                         address=address, num_cpus=num_cpus)
        if plan.job != job:
            raise ConfigError(f"The search in {plan.output} is a {plan.job} search, not {job}; check --output.")
    else:
        plan = plan_search(
            job, space, num_samples=num_samples, max_epochs=max_epochs, scheduler=scheduler, search=search,
            cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, address=address, name=name,
            preset=preset, config_path=config_path, overrides=overrides, output=output, num_cpus=num_cpus,
        )
        if plan.experiment_dir.exists():
            raise ConfigError(
                f"{plan.experiment_dir} already holds a search; pass --resume to continue it, or another --name."
            )
    return execute(plan, resume=resume, verbose=verbose)


def execute(plan: SearchPlan, *, resume: bool = False, verbose: int = 1) -> SearchResult:
    """Start (or connect to) Ray, run the planned search, and summarise it."""
    import ray
    from ray import tune

    # Tune warns each time a checkpoint forces a state snapshot (every epoch here); that is intended.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started_here = not ray.is_initialized()
    env_vars = worker_env()
    if started_here:
        if plan.address:
            ray.init(address=plan.address, runtime_env={"env_vars": env_vars}, log_to_driver=verbose > 0)
        else:
            ray.init(num_cpus=plan.num_cpus or os.cpu_count(), include_dashboard=False,
                     runtime_env={"env_vars": env_vars}, log_to_driver=verbose > 0)
    start = time.perf_counter()
    try:
        if plan.address:
            check_cluster_resources(plan.cpus_per_trial, plan.gpus_per_trial)
        trainable = make_trainable(plan)
        if resume:
            if not tune.Tuner.can_restore(str(plan.experiment_dir)):
                raise ConfigError(f"{plan.experiment_dir} holds no Tune state to resume; start a new search.")
            # Unfinished trials continue from their last checkpoint; errored ones too (resume_errored), with
            # their progress kept rather than restarted; finished trials are never run again.
            tuner = tune.Tuner.restore(
                str(plan.experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            save_plan(plan)
            tuner = build_tuner(plan, trainable, verbose=verbose)
        tuner.fit()
        wall_s = time.perf_counter() - start
    finally:
        if started_here:
            ray.shutdown()
    result = summarize_search(plan)
    result.wall_s = wall_s
    return result


def worker_env() -> dict[str, str]:
    """Environment for every Ray worker: W&B mode (offline when no API key is set), data mirror and cache."""
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    if "WANDB_MODE" not in env and "WANDB_API_KEY" not in env:
        env["WANDB_MODE"] = "offline"
    # ASHA stops a trial by ending its process, before W&B finishes the run; W&B writes a run's file only every
    # 15 s by default, so a trial stopped after its first epoch would leave an empty run. Writing every 0.2 s
    # keeps all but the last fraction of a second of what a stopped trial logged.
    env.setdefault("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "0.2")
    return env


def make_trainable(plan: SearchPlan):
    from ray import tune

    settings = {"name": plan.name, "experiment_dir": str(plan.experiment_dir), "job": plan.job}
    if plan.gpus_per_trial > 1:
        workers = int(plan.gpus_per_trial)
        settings.update(workers=workers, cpus_per_worker=max(1.0, plan.cpus_per_trial // workers))
        function = tune.with_parameters(_distributed_trial, base_config=plan.base_config, settings=settings)
        # The trial is only the driver; Ray Train reserves the workers' GPUs itself.
        return tune.with_resources(function, {"cpu": 1})
    function = tune.with_parameters(_trial, base_config=plan.base_config, settings=settings)
    return tune.with_resources(function, {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial})


def build_tuner(plan: SearchPlan, trainable, *, verbose: int = 1):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space = plan.space
    if plan.scheduler == "asha":
        grace = min(space.asha["grace_period"], plan.max_epochs)
        scheduler = ASHAScheduler(
            time_attr="training_iteration",  # one report per epoch
            # Rungs only before the last epoch, and no stop at max_t: a trial that reaches its last epoch
            # is let finish, so the loop scores test and exports its bundle (stopping it there saves nothing).
            max_t=max(grace, plan.max_epochs - 1),
            grace_period=grace,
            reduction_factor=space.asha["reduction_factor"],
            stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    if plan.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=space.seed)
    else:
        searcher = BasicVariantGenerator(random_state=space.seed)
    max_concurrent = None
    if plan.gpus_per_trial > 1:
        # Tune sees only the drivers' CPU; cap the trials so their Ray Train workers fit the GPUs.
        import ray

        max_concurrent = max(1, int(ray.cluster_resources().get("GPU", 0) // plan.gpus_per_trial))
    return tune.Tuner(
        trainable,
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=plan.num_samples,
            max_concurrent_trials=max_concurrent,
            trial_name_creator=trial_dirname,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(plan.output),
            # The loop keeps its own checkpoints in the trial folder; Tune needs only the latest to resume.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=verbose,
        ),
    )


def trial_dirname(trial) -> str:
    """Short, stable names (the default packs every param into the folder name)."""
    return f"trial_{trial.trial_id}"


# --- inside a trial --------------------------------------------------------------------------------------


def _trial(params: dict, *, base_config: dict, settings: dict) -> None:
    """One trial: the training loop itself on the base config with this trial's params."""
    from ray import tune

    from rnnlab.trainers.loop import train

    context = tune.get_context()
    trial_dir = Path(settings["experiment_dir"]) / f"trial_{context.get_trial_id()}"
    config = trial_config(base_config, params, settings["name"], trial_dir.name)

    def on_eval(metrics: dict, checkpoint_dir: Path) -> None:
        tune.report(flatten_metrics(metrics), checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        train(config, trial_dir, on_eval=on_eval)
        return
    # A restored trial (--resume, or a retry) continues from the checkpoint Tune last took, not the loop's own
    # latest one: that keeps Tune's iteration count equal to the epochs trained, which ASHA's rungs rely on.
    with checkpoint.as_directory() as saved:
        train(config, trial_dir, resume=Path(saved), on_eval=on_eval)


def trial_config(base_config: dict, params: dict, search_name: str, run_name: str) -> dict:
    config = apply_params(base_config, params)
    # Every trial is a W&B run, grouped under the search's name.
    config["tracking"].update(group=search_name, run_name=run_name)
    return config


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> ``{"val/loss": ...}``; only numbers are kept (Tune ranks and plots numbers)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, bool):
            flat[name] = int(value)
        elif isinstance(value, (int, float)):
            flat[name] = value
        elif hasattr(value, "item") and getattr(value, "size", 2) == 1:
            flat[name] = value.item()
    return flat


def _distributed_trial(params: dict, *, base_config: dict, settings: dict) -> None:
    """A trial with several GPUs: this function is the driver of a Ray Train ``TorchTrainer`` whose workers
    each run the same ``train`` (one process per GPU; Accelerate uses the process group Ray Train set up).

    The loop calls ``on_eval`` on its main process only, while ``ray.train.report`` is a barrier every worker
    must reach; so rank 0 sends each validation to this driver through a queue and waits for the driver's
    ``tune.report`` to take the checkpoint before training on. Needs a shared filesystem for the trial folder
    (as multi-node Tune does anyway). Not exercised by the CPU test suite.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    context = tune.get_context()
    trial_dir = Path(settings["experiment_dir"]) / f"trial_{context.get_trial_id()}"
    config = trial_config(base_config, params, settings["name"], trial_dir.name)
    checkpoint = tune.get_checkpoint()
    # Workers read the checkpoint from the shared trial folder (Tune keeps it under the trial's storage path).
    resume = Path(checkpoint.path) if checkpoint is not None else False
    reports, acks = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})

    def worker(_: dict) -> None:
        import ray.train

        from rnnlab.trainers.loop import train

        def on_eval(metrics: dict, checkpoint_dir: Path) -> None:
            reports.put((flatten_metrics(metrics), str(checkpoint_dir)))
            acks.get()  # the driver has copied the checkpoint

        train(config, trial_dir, resume=resume, on_eval=on_eval)
        if ray.train.get_context().get_world_rank() == 0:
            reports.put(None)  # training is over: the driver stops listening

    trainer = TorchTrainer(
        worker,
        scaling_config=ScalingConfig(
            num_workers=settings["workers"], use_gpu=True,
            resources_per_worker={"CPU": settings["cpus_per_worker"], "GPU": 1},
        ),
        run_config=RunConfig(name=f"{trial_dir.name}-train", storage_path=str(trial_dir / "ray_train")),
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        fit = pool.submit(trainer.fit)
        while True:
            try:
                item = reports.get(timeout=5)
            except Empty:
                if fit.done():
                    fit.result()  # raises the workers' error
                    break
                continue
            if item is None:
                break
            metrics, checkpoint_dir = item
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
            acks.put(True)
        fit.result()


# --- results ---------------------------------------------------------------------------------------------


def summarize_search(plan: SearchPlan) -> SearchResult:
    """Read the search back from disk (works for finished, stopped and interrupted searches alike) and write
    results.csv, best.yaml and best_bundle/."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(plan.experiment_dir))
    metric, mode = plan.space.metric, plan.space.mode
    trials = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        frame = analysis.trial_dataframes.get(trial.trial_id)
        values = []
        if frame is not None and metric in frame:
            values = [float(v) for v in frame[metric].dropna().tolist()]
        epochs = int(frame["training_iteration"].max()) if frame is not None and len(frame) else 0
        best = (min(values) if mode == "min" else max(values)) if values else None
        trial_dir = plan.experiment_dir / f"trial_{trial.trial_id}"
        summary = TrialSummary(
            name=trial_dir.name, status="", params=dict(trial.config), metric=best,
            last_metric=values[-1] if values else None, epochs=epochs, trial_dir=trial_dir,
        )
        summary.status = _status(trial, summary)
        if summary.status == "error":
            summary.error = _first_error_line(trial)
        trials.append(summary)
    interrupted = any(t.status == "unfinished" for t in trials)
    best = pick_best(trials, mode)
    result = SearchResult(
        job=plan.job, name=plan.name, output=plan.output, metric=metric, mode=mode, trials=trials, best=best,
        csv_path=plan.output / "results.csv", best_config_path=None, best_bundle_path=None,
        interrupted=interrupted, searched_keys=plan.space.searched_keys,
    )
    write_csv(result)
    if best is not None:
        result.best_config_path = write_best_config(plan, best)
        result.best_bundle_path = export_best_bundle(plan, best)
    return result


def _status(trial, summary: TrialSummary) -> str:
    if trial.status == "ERROR":
        return "error"
    if trial.status != "TERMINATED":
        return "unfinished"  # PENDING / RUNNING / PAUSED: the search was interrupted
    return "completed" if summary.bundle_dir is not None else "stopped early"


def _first_error_line(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(encoding="utf-8") if path else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "failed (see the trial's error.txt)"


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    """The best trial that finished training (and so has a bundle), ranked by the best validation value it
    reached, which is the checkpoint its bundle holds. A stopped trial has no bundle, and ASHA only stops a
    trial that a running one beats at the same epoch."""
    candidates = [t for t in trials if t.bundle_dir is not None and t.metric is not None]
    if not candidates:
        return None
    return (min if mode == "min" else max)(candidates, key=lambda t: t.metric)


def write_csv(result: SearchResult) -> Path:
    result.output.mkdir(parents=True, exist_ok=True)
    keys = _param_columns(result)
    with open(result.csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "status", "epochs", result.metric, f"last_{result.metric}", *keys,
                         "best", "trial_dir", "error"])
        for trial in result.trials:
            writer.writerow([
                trial.name, trial.status, trial.epochs, _blank(trial.metric), _blank(trial.last_metric),
                *[_blank(trial.params.get(key)) for key in keys],
                int(trial is result.best), str(trial.trial_dir), trial.error,
            ])
    return result.csv_path


def _blank(value: Any) -> Any:
    return "" if value is None else value


def _param_columns(result: SearchResult) -> list[str]:
    keys = list(result.searched_keys)
    for trial in result.trials:
        keys.extend(key for key in trial.params if key not in keys)
    return keys


def write_best_config(plan: SearchPlan, best: TrialSummary) -> Path:
    """The best trial's full config, as ``rnnlab train JOB --config best.yaml`` reads it."""
    config = apply_params(plan.base_config, best.params)
    config["tracking"].update(group=None, run_name=None)
    config["train"]["progress"] = True
    header = (
        f"# Best trial of search '{plan.name}' ({plan.job}): {best.name}, {plan.space.metric} = {best.metric:.6g}"
        f" after {best.epochs} epochs.\n"
        f"# Retrain with: rnnlab train {plan.job} --config {plan.output / 'best.yaml'}\n"
    )
    path = plan.output / "best.yaml"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def export_best_bundle(plan: SearchPlan, best: TrialSummary) -> Path | None:
    if best.bundle_dir is None:
        return None
    target = plan.output / "best_bundle"
    staging = plan.output / ".best_bundle.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(best.bundle_dir, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def format_table(result: SearchResult) -> str:
    """Trial, params, metric (best reached), epochs run and status, best first; a '*' marks the best."""
    keys = _param_columns(result)
    reverse = result.mode == "max"

    def order(trial: TrialSummary):
        missing = trial.metric is None
        value = trial.metric if trial.metric is not None else 0.0
        return (missing, -value if reverse else value)

    header = ["trial", *keys, result.metric, "epochs", "status"]
    rows = []
    for trial in sorted(result.trials, key=order):
        mark = "*" if trial is result.best else " "
        rows.append([f"{mark}{trial.name}", *[_fmt(trial.params.get(key)) for key in keys],
                     _fmt(trial.metric), str(trial.epochs), trial.status])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
