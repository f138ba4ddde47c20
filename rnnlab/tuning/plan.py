"""A search, planned and checked before Ray starts: the settings, the trials' base config, the space, the
resources. Saved as ``OUTPUT/search.yaml`` so ``--resume`` continues the search exactly as it was planned."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from rnnlab import registry
from rnnlab.config import is_number, load_config, read_yaml, validate
from rnnlab.errors import ConfigError
from rnnlab.tuning.space import SearchSpace, check_against_config, check_values, load_space, resolve_metric

SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
PLAN_FILE = "search.yaml"
# A trial whose process or node dies is retried this many times, from its last checkpoint (one per epoch), so
# losing a node costs at most an epoch of each trial it ran; a trial that fails deterministically (a bug, a bad
# value) fails this many more times, which on these small trials costs seconds.
DEFAULT_MAX_FAILURES = 3


@dataclass
class SearchSettings:
    """How a search runs, as ``rnnlab tune``'s flags set it."""

    num_samples: int = 8  # trials (times each grid value)
    max_epochs: int = 5  # epochs a trial may train (ASHA's max_t)
    scheduler: str = "asha"  # asha | fifo
    search: str = "random"  # random | optuna
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0  # a fraction shares a GPU; a whole number > 1 runs a Ray Train trial
    workers_per_trial: int = 1  # > 1: a Ray Train TorchTrainer of that many processes (gloo on CPUs)
    address: str | None = None  # a running cluster (auto | ray://host:port); None = a local Ray instance
    num_cpus: int | None = None  # CPUs of the local Ray instance; None = every core
    max_failures: int = DEFAULT_MAX_FAILURES  # retries of a failed trial, each from its last checkpoint

    def check(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"Unknown scheduler '{self.scheduler}'; choose one of {', '.join(SCHEDULERS)}.")
        if self.search not in SEARCHERS:
            raise ConfigError(f"Unknown search '{self.search}'; choose one of {', '.join(SEARCHERS)}.")
        for flag, value, least in (("--num-samples", self.num_samples, 1), ("--max-epochs", self.max_epochs, 1),
                                   ("--max-failures", self.max_failures, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{flag} must be a whole number of at least {least}, not {value!r}.")
        if self.search == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ConfigError("--search optuna needs the optuna package; pip install 'rnnlab[optuna]'.") from None
        if not isinstance(self.workers_per_trial, int) or isinstance(self.workers_per_trial, bool) \
                or self.workers_per_trial < 1:
            raise ConfigError(f"--workers-per-trial must be a whole number of at least 1, not "
                              f"{self.workers_per_trial!r}.")
        if self.workers_per_trial > 1 and self.gpus_per_trial and self.gpus_per_trial != self.workers_per_trial:
            raise ConfigError(f"--workers-per-trial {self.workers_per_trial} with --gpus-per-trial "
                              f"{self.gpus_per_trial:g}: each worker takes one whole GPU, so give both the same "
                              "number.")
        check_resources(self)

    @property
    def workers(self) -> int:
        """Training processes per trial: --workers-per-trial, or one per GPU when a trial has several GPUs."""
        return max(self.workers_per_trial, int(self.gpus_per_trial) if self.gpus_per_trial > 1 else 1)

    @property
    def cpus_per_worker(self) -> float:
        """A multi-worker trial's CPUs split over its workers, at least one each."""
        return max(1.0, float(self.cpus_per_trial) / self.workers)

    @property
    def cpus_reserved(self) -> float:
        """CPUs one trial holds: itself, or its workers plus the driver that reports for them."""
        return self.cpus_per_trial if self.workers == 1 else self.workers * self.cpus_per_worker + 1


@dataclass
class SearchPlan:
    """Everything a search needs, checked."""

    job: str
    name: str
    output: Path
    preset: str
    base_config: dict  # every trial's config before its params are set
    space: SearchSpace
    settings: SearchSettings = field(default_factory=SearchSettings)

    @property
    def experiment_dir(self) -> Path:
        return self.output / self.name

    def save(self) -> Path:
        self.output.mkdir(parents=True, exist_ok=True)
        saved = {"job": self.job, "name": self.name, "preset": self.preset,
                 **{k: v for k, v in asdict(self.settings).items() if k not in ("address", "num_cpus")},
                 "space": self.space.to_dict(), "base_config": self.base_config}
        path = self.output / PLAN_FILE
        path.write_text("# The search as planned by rnnlab tune; --resume reads it back.\n"
                        + yaml.safe_dump(saved, sort_keys=False), encoding="utf-8")
        return path


def plan_search(
    job: str,
    settings: SearchSettings | None = None,
    *,
    space: str | Path | dict | None = None,
    preset: str = "default",
    config_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    name: str | None = None,
    output: str | Path | None = None,
) -> SearchPlan:
    """Check every input and build the plan; raises ConfigError (one sentence) on the first fault."""
    registry.job(job)
    settings = settings or SearchSettings()
    settings.check()
    base_config = load_config(job, preset, config_path, list(overrides))
    if not validate(base_config).has_validation_split:  # stock's chapter protocol: nothing to rank trials on
        raise ConfigError("Tune ranks trials on a validation split and this config holds none (data.val_days=0, "
                          "as the stock chapter preset); add --set data.val_days=252 or tune another preset.")
    base_config = trial_base_config(base_config, settings.max_epochs)
    search_space = resolve_metric(load_space(job, space), base_config)
    check_against_config(search_space, base_config, preset)
    check_values(search_space, base_config)
    if settings.search == "optuna" and search_space.has_grid:
        raise ConfigError(f"{search_space.source} uses grid, which optuna cannot sample; "
                          "use choice or --search random.")
    name = name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--name '{name}' may hold only letters, digits, '-', '_' and '.'.")
    output_dir = Path(output) if output is not None else Path("runs") / "tune" / name
    return SearchPlan(job=job, name=name, output=output_dir.resolve(), preset=preset, base_config=base_config,
                      space=search_space, settings=settings)


def load_plan(output: str | Path, *, address: str | None = None, num_cpus: int | None = None,
              max_failures: int | None = None) -> SearchPlan:
    """The plan a search saved, to resume it; only where it runs (``address``, ``num_cpus``) and how often a
    failed trial is retried (``max_failures``) may be new."""
    output = Path(output).resolve()
    path = output / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{output} holds no search to resume ({PLAN_FILE} is missing); check --output.")
    saved = read_yaml(path, what="search plan")
    space_data = saved["space"]
    space = SearchSpace(
        job=saved["job"], metric=space_data["metric"], mode=space_data["mode"], params=space_data["params"],
        seed=space_data.get("seed"), asha=space_data["asha"], source=f"Search space in {path}",
    )
    settings = SearchSettings(**{key: saved[key] for key in ("num_samples", "max_epochs", "scheduler", "search",
                                                             "cpus_per_trial", "gpus_per_trial")},
                              workers_per_trial=saved.get("workers_per_trial", 1),
                              address=address, num_cpus=num_cpus,
                              max_failures=saved.get("max_failures", DEFAULT_MAX_FAILURES)
                              if max_failures is None else max_failures)
    return SearchPlan(job=saved["job"], name=saved["name"], output=output, preset=saved["preset"],
                      base_config=saved["base_config"], space=space, settings=settings)


def trial_base_config(config: dict, max_epochs: int) -> dict:
    """The config every trial starts from: one validation per epoch (one Tune iteration = one epoch, which
    ASHA's rungs count), no step cap, no progress bars, and data paths made absolute (trials run elsewhere)."""
    config = copy.deepcopy(config)
    config["train"].update(epochs=max_epochs, max_steps=0, eval_every=0, progress=False)
    for key in ("source", "mirror"):
        if config["data"].get(key):
            config["data"][key] = str(Path(config["data"][key]).expanduser().resolve())
    return config


def check_resources(settings: SearchSettings) -> None:
    """Refuse a per-trial request no node can meet. Local runs compare with this machine; cluster runs are
    checked again against the cluster once connected (:func:`check_cluster_resources`)."""
    cpus, gpus = settings.cpus_per_trial, settings.gpus_per_trial
    if not is_number(cpus) or cpus <= 0:
        raise ConfigError(f"--cpus-per-trial must be a positive number, not {cpus!r}.")
    if not is_number(gpus) or gpus < 0:
        raise ConfigError(f"--gpus-per-trial must be zero or a positive number, not {gpus!r}.")
    if gpus > 1 and not float(gpus).is_integer():
        raise ConfigError(
            f"--gpus-per-trial {gpus} is neither a fraction of one GPU (at most 1) nor a whole number "
            "of GPUs; use e.g. 0.5 to share a GPU or 2 for a two-GPU trial."
        )
    if settings.address is not None:
        return
    cores = settings.num_cpus or os.cpu_count() or 1
    if cpus > cores:
        raise ConfigError(
            f"--cpus-per-trial {cpus:g} is more than this machine's {cores} CPUs; "
            f"ask for at most {cores} (or pass --address to use a cluster)."
        )
    if settings.workers > 1 and settings.cpus_reserved > cores:
        raise ConfigError(
            f"A trial of {settings.workers} workers needs {settings.cpus_reserved:g} CPUs (one per worker at least, "
            f"and one for its driver) and this machine has {cores}; pass --num-cpus or --address to use a cluster."
        )
    if gpus > 0:
        import torch

        available = torch.cuda.device_count()
        if available == 0:
            raise ConfigError(
                f"--gpus-per-trial {gpus:g} asks for a GPU but this machine has none; "
                "use --gpus-per-trial 0, or --address to use a cluster with GPUs."
            )
        if gpus > available:
            raise ConfigError(
                f"--gpus-per-trial {gpus:g} is more than this machine's {available} GPUs; "
                f"ask for at most {available} (or pass --address to use a cluster)."
            )


def check_cluster_resources(settings: SearchSettings) -> None:
    """Against a running cluster: one node must fit a single-process trial; a multi-GPU trial needs that
    many GPUs in the cluster (its workers may sit on different nodes)."""
    import ray

    cpus, gpus = settings.cpus_per_trial, settings.gpus_per_trial
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    most_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    if settings.workers > 1:  # its workers may sit on different nodes
        total_cpus = sum(node.get("CPU", 0) for node in nodes)
        if settings.cpus_reserved > total_cpus:
            raise ConfigError(f"A trial of {settings.workers} workers needs {settings.cpus_reserved:g} CPUs and the "
                              f"cluster has {total_cpus:g}.")
        if gpus > total_gpus:
            raise ConfigError(f"--gpus-per-trial {gpus:g} is more than the cluster's {total_gpus:g} GPUs.")
        return
    if cpus > most_cpus:
        raise ConfigError(f"--cpus-per-trial {cpus:g} is more than the largest node's {most_cpus:g} CPUs.")
    if gpus > most_gpus:
        raise ConfigError(f"--gpus-per-trial {gpus:g} is more than the largest node's {most_gpus:g} GPUs.")
