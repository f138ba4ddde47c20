"""Running a planned search on Ray Tune: the trainable (the training loop itself), the Tuner, and inside a trial.

Each trial is :func:`rnnlab.trainers.loop.train` on the plan's base config with the trial's params set, writing
into its own folder ``OUTPUT/NAME/trial_<id>/`` (checkpoints, metrics.jsonl, W&B run files, bundle). After every
validation the loop calls ``on_eval``, which reports the metrics with the checkpoint through
``ray.tune.report(..., checkpoint=ray.tune.Checkpoint.from_directory(...))``; a restarted trial resumes from
``ray.tune.get_checkpoint()``. ASHA stops weak trials at its rungs.

Scale: ``settings.address`` connects to a running cluster (``auto`` or ``ray://host:port``); OUTPUT must then be
on a filesystem every node sees (NFS), as Ray itself requires for a multi-node Tune run. ``gpus_per_trial`` below 1
packs trials onto one GPU (0.25 = four trials per GPU). Above 1 (a whole number), a trial becomes the driver of a
Ray Train ``TorchTrainer`` with that many GPU workers, each running the same ``train`` (Accelerate picks up the
process group Ray Train sets up); see :func:`_distributed_trial`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rnnlab.config import with_values
from rnnlab.errors import ConfigError
from rnnlab.tuning.plan import SearchPlan, check_cluster_resources
from rnnlab.tuning.results import SearchResult, summarize_search

# How long a multi-worker trial's rank 0 waits for its driver to take a checkpoint: generous (a slow shared
# filesystem), but bounded, so a dead driver fails the trial (and Tune retries it) instead of hanging it.
ACK_TIMEOUT_S = 600

# Environment the trials need on every node; Ray workers on a running cluster do not inherit the driver's.
FORWARDED_ENV = (
    "WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_DIR",
    "WANDB_SILENT", "WANDB_CONSOLE", "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "RNNLAB_DATA_MIRROR",
    "RNNLAB_CACHE_DIR", "RNNLAB_JOBS",  # RNNLAB_JOBS: a job from another package, which every trial imports
)


def run_search(plan: SearchPlan, *, resume: bool = False, verbose: int = 1) -> SearchResult:
    """Start (or connect to) Ray, run the planned search (or with ``resume`` continue it), and summarise it.

    A new search refuses an experiment folder that exists already; a resumed one continues the trials Tune
    recorded: unfinished and errored ones from their last checkpoint, finished ones are kept as they are.
    """
    import ray
    from ray import tune

    # Tune warns each time a checkpoint forces a state snapshot (every epoch here); that is intended.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not resume and plan.experiment_dir.exists():
        raise ConfigError(
            f"{plan.experiment_dir} already holds a search; pass --resume to continue it, or another --name."
        )
    started_here = not ray.is_initialized()
    env_vars = worker_env()
    if started_here:
        from rnnlab.cluster import connect

        if plan.settings.address:  # an unreachable or stale address is one sentence within seconds
            connect(plan.settings.address, runtime_env={"env_vars": env_vars}, log_to_driver=verbose > 0)
        else:
            connect(None, num_cpus=plan.settings.num_cpus or os.cpu_count(), include_dashboard=False,
                    runtime_env={"env_vars": env_vars}, log_to_driver=verbose > 0)
    start = time.perf_counter()
    try:
        if plan.settings.address:
            check_cluster_resources(plan.settings)
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
            plan.save()
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
    if plan.settings.workers > 1:
        settings.update(workers=plan.settings.workers, cpus_per_worker=plan.settings.cpus_per_worker,
                        use_gpu=plan.settings.gpus_per_trial > 0)
        function = tune.with_parameters(_distributed_trial, base_config=plan.base_config, settings=settings)
        # The trial is only the driver; Ray Train reserves the workers' CPUs and GPUs itself.
        return tune.with_resources(function, {"cpu": 1})
    function = tune.with_parameters(_trial, base_config=plan.base_config, settings=settings)
    return tune.with_resources(function, {"cpu": plan.settings.cpus_per_trial, "gpu": plan.settings.gpus_per_trial})


def build_tuner(plan: SearchPlan, trainable, *, verbose: int = 1):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space = plan.space
    if plan.settings.scheduler == "asha":
        grace = min(space.asha["grace_period"], plan.settings.max_epochs)
        scheduler = ASHAScheduler(
            time_attr="training_iteration",  # one report per epoch
            # Rungs only before the last epoch, and no stop at max_t: a trial that reaches its last epoch
            # is let finish, so the loop scores test and exports its bundle (stopping it there saves nothing).
            max_t=max(grace, plan.settings.max_epochs - 1),
            grace_period=grace,
            reduction_factor=space.asha["reduction_factor"],
            stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    max_concurrent = None
    if plan.settings.workers > 1:
        # Tune sees only the drivers' CPU: cap the trials so that their Ray Train workers fit too (else drivers
        # would hold the CPUs their own workers wait for).
        import ray

        resources = ray.cluster_resources()
        max_concurrent = max(1, int(resources.get("CPU", 0) // plan.settings.cpus_reserved))
        if plan.settings.gpus_per_trial > 0:
            max_concurrent = min(max_concurrent, max(1, int(resources.get("GPU", 0) // plan.settings.workers)))
    # The cap goes to the searcher itself: Tune ignores max_concurrent_trials for a BasicVariantGenerator.
    if plan.settings.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=space.seed)
        if max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    else:
        searcher = BasicVariantGenerator(random_state=space.seed, max_concurrent=max_concurrent or 0)
    return tune.Tuner(
        trainable,
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=plan.settings.num_samples,
            trial_name_creator=trial_dirname,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(plan.output),
            # The loop keeps its own checkpoints in the trial folder; Tune needs only the latest to resume.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # A trial whose process or node dies starts again from its last checkpoint (tune.get_checkpoint).
            failure_config=tune.FailureConfig(max_failures=plan.settings.max_failures),
            verbose=verbose,
        ),
    )


def trial_dirname(trial) -> str:
    """Short, stable names (the default packs every param into the folder name)."""
    return f"trial_{trial.trial_id}"


# --- inside a trial --------------------------------------------------------------------------------------


def _trial(params: dict, *, base_config: dict, settings: dict) -> None:
    """One trial: the training loop itself on the base config with this trial's params."""
    import ray
    from ray import tune

    from rnnlab.trainers.loop import train

    context = tune.get_context()
    trial_dir = Path(settings["experiment_dir"]) / f"trial_{context.get_trial_id()}"
    config = trial_config(base_config, params, settings["name"], trial_dir.name)

    node_id = ray.get_runtime_context().get_node_id()  # where the trial ran, in its result.json

    def on_eval(metrics: dict, checkpoint_dir: Path) -> None:
        tune.report({**flatten_metrics(metrics), "node_id": node_id},
                    checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        from rnnlab.trainers.durable import clear_run_files

        clear_run_files(trial_dir)  # a retry that failed before its first checkpoint starts over, cleanly
        train(config, trial_dir, on_eval=on_eval)
        return
    # A restored trial (--resume, or a retry) continues from the checkpoint Tune last took, not the loop's own
    # latest one: that keeps Tune's iteration count equal to the epochs trained, which ASHA's rungs rely on.
    with checkpoint.as_directory() as saved:
        train(config, trial_dir, resume=Path(saved), on_eval=on_eval)


def trial_config(base_config: dict, params: dict, search_name: str, run_name: str) -> dict:
    config = with_values(base_config, params)
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
    """A trial of several processes (``--workers-per-trial``, or several GPUs): this function is the driver of a
    Ray Train ``TorchTrainer`` whose workers each run the same ``train`` (gloo on CPUs, NCCL with one GPU each;
    Accelerate uses the process group Ray Train set up).

    The loop calls ``on_eval`` on its main process only, while ``ray.train.report`` is a barrier every worker
    must reach; so rank 0 sends each validation to this driver through a queue and waits (boundedly) for the
    driver's ``tune.report`` to take the checkpoint before training on. Needs a shared filesystem for the trial
    folder (as multi-node Tune does anyway). tests/test_tune.py runs one with 2 CPU workers.
    """
    from concurrent.futures import ThreadPoolExecutor

    import ray
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
    if checkpoint is None:
        from rnnlab.trainers.durable import clear_run_files

        clear_run_files(trial_dir)  # a retry that failed before its first checkpoint starts over, cleanly
    node_id = ray.get_runtime_context().get_node_id()
    reports, acks = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})

    def worker(_: dict) -> None:
        import ray.train

        from rnnlab.trainers.loop import train

        def on_eval(metrics: dict, checkpoint_dir: Path) -> None:
            reports.put((flatten_metrics(metrics), str(checkpoint_dir)))
            try:
                acks.get(timeout=ACK_TIMEOUT_S)  # the driver has taken the checkpoint
            except Empty:
                raise RuntimeError(f"The trial's driver did not take the checkpoint {checkpoint_dir} within "
                                   f"{ACK_TIMEOUT_S} s (it died or hangs); the trial stops so Tune can retry "
                                   "it.") from None

        train(config, trial_dir, resume=resume, on_eval=on_eval)
        if ray.train.get_context().get_world_rank() == 0:
            reports.put(None)  # training is over: the driver stops listening

    trainer = TorchTrainer(
        worker,
        scaling_config=ScalingConfig(
            num_workers=settings["workers"], use_gpu=settings["use_gpu"],
            resources_per_worker={"CPU": settings["cpus_per_worker"], **({"GPU": 1} if settings["use_gpu"] else {})},
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
            tune.report({**metrics, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
            acks.put(True)
        fit.result()
