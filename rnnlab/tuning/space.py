"""Search spaces as plain data: reading, merging and checking them before Ray starts.

A space file is YAML (defaults in ``configs/tune/{job}.yaml``)::

    metric: val/loss          # what the trials are ranked by: a key of the training loop's validation metrics
    mode: min                 # min | max
    seed: 0                   # seeds the sampler, so a search can be repeated
    asha: {grace_period: 1, reduction_factor: 2}
    params:                   # dotted config paths (see configs/presets/{job}.yaml), one distribution each
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      train.batch_size: {choice: [32, 64, 128]}
      model.num_layers: {int: [1, 3]}        # both ends included
      model.hidden_size: {logint: [16, 256]} # both ends included, log-spaced
      model.dropout: {uniform: [0.0, 0.5]}
      model.bidirectional: {grid: [false, true]}   # every value, num_samples times each (random search only)
      train.optimizer: adamw                       # a plain value: fixed for every trial

A user's ``--space`` file is merged over the job's defaults: its ``params`` replace the defaults' entries
of the same key, ``null`` removes a default entry (the preset's value is then used), and ``inherit: false``
drops the defaults' params altogether. Every key must name a setting the preset has, and every value a
setting the config accepts, or the search is refused with one sentence before Ray starts.

This module never imports Ray, so checking a space is instant.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnlab import registry
from rnnlab.config import get_path, is_number, read_yaml, validate, with_values
from rnnlab.errors import ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice", "grid")
TOP_LEVEL_KEYS = ("metric", "mode", "seed", "asha", "params", "inherit")
ASHA_KEYS = ("grace_period", "reduction_factor")
# Set by `rnnlab tune` itself; a space that searched them would fight the scheduler or the search's grouping.
RESERVED_KEYS = ("train.epochs", "train.eval_every", "tracking.group", "tracking.run_name", "job")


@dataclass
class SearchSpace:
    """A job's search space: the metric and its direction, the sampler seed, ASHA settings and the params."""

    job: str
    metric: str | None  # None until resolve_metric: val/<train.monitor>
    mode: str | None  # None until resolve_metric: from the metric's direction
    params: dict[str, Any]  # dotted key -> {distribution: args} or a fixed value
    seed: int | None = None
    asha: dict[str, int] = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    source: str = ""  # where it came from, for messages

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "seed": self.seed,
            "asha": dict(self.asha),
            "params": copy.deepcopy(self.params),
        }

    @property
    def searched_keys(self) -> list[str]:
        """The keys that vary between trials (fixed values excluded), in file order."""
        return [key for key, spec in self.params.items() if _distribution(spec) is not None]

    @property
    def has_grid(self) -> bool:
        return any(_distribution(spec) == "grid" for spec in self.params.values())

    def to_tune(self) -> dict:
        """The param_space for ``tune.Tuner``: flat, keyed by dotted config paths."""
        from ray import tune

        space: dict[str, Any] = {}
        for key, spec in self.params.items():
            kind = _distribution(spec)
            if kind is None:
                space[key] = spec
                continue
            args = spec[kind]
            if kind == "loguniform":
                space[key] = tune.loguniform(float(args[0]), float(args[1]))
            elif kind == "uniform":
                space[key] = tune.uniform(float(args[0]), float(args[1]))
            elif kind == "int":
                space[key] = tune.randint(int(args[0]), int(args[1]) + 1)  # Tune's upper end is exclusive
            elif kind == "logint":
                space[key] = tune.lograndint(int(args[0]), int(args[1]) + 1)
            elif kind == "choice":
                space[key] = tune.choice(list(args))
            elif kind == "grid":
                space[key] = tune.grid_search(list(args))
        return space

    def corner_values(self) -> dict[str, list[Any]]:
        """Values each param can take at its extremes (every value of a choice or grid): enough to let the
        config's own checks refuse a bad range before any trial runs."""
        corners: dict[str, list[Any]] = {}
        for key, spec in self.params.items():
            kind = _distribution(spec)
            if kind is None:
                corners[key] = [spec]
            elif kind in ("choice", "grid"):
                corners[key] = list(spec[kind])
            elif kind in ("int", "logint"):
                corners[key] = [int(spec[kind][0]), int(spec[kind][1])]
            else:
                corners[key] = [float(spec[kind][0]), float(spec[kind][1])]
        return corners


def read_space_file(path: Path) -> dict:
    """The raw mapping in a space file; ConfigError for a missing, empty or malformed file."""
    data = read_yaml(Path(path), what="search space file", missing_hint="; pass an existing YAML file to --space")
    if data is None:
        raise ConfigError(f"The search space file {path} is empty; give it a 'params:' mapping of dotted keys.")
    if not isinstance(data, dict):
        raise ConfigError(
            f"The search space file {path} must be a mapping with a 'params:' section, not a {type(data).__name__}."
        )
    return data


def load_space(job: str, space: str | Path | dict | None = None) -> SearchSpace:
    """The job's default space, with a user's space (a file or a mapping) merged over it."""
    default_path = registry.job(job).tune_space_file
    defaults = read_space_file(default_path)
    _check_shape(defaults, f"Search space {default_path}")
    if space is None:
        return _build(job, defaults, f"Search space {default_path}")
    if isinstance(space, dict):
        user, where = copy.deepcopy(space), "The search space"
    else:
        user, where = read_space_file(Path(space)), f"Search space {space}"
    _check_shape(user, where)
    if not user.get("params") and user.get("inherit", True) is False:
        raise ConfigError(f"{where} has 'inherit: false' but no params; list at least one parameter to search.")
    if "params" in user and not user["params"] and set(user) <= {"params"}:
        raise ConfigError(f"{where} has an empty 'params:' section; list at least one parameter to search.")
    merged = {key: value for key, value in defaults.items() if key != "params"}
    merged.update({key: value for key, value in user.items() if key not in ("params", "asha", "inherit")})
    merged["asha"] = {**(defaults.get("asha") or {}), **(user.get("asha") or {})}
    params = {} if user.get("inherit", True) is False else dict(defaults.get("params") or {})
    for key, spec in (user.get("params") or {}).items():
        if spec is None:
            params.pop(key, None)
        else:
            params[key] = spec
    merged["params"] = params
    return _build(job, merged, where)


def _check_shape(data: dict, where: str) -> None:
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"{where} has unknown top-level key '{unknown[0]}'; allowed keys are {', '.join(TOP_LEVEL_KEYS)}."
        )
    if "params" in data and data["params"] is not None and not isinstance(data["params"], dict):
        raise ConfigError(f"{where}: 'params' must map dotted config keys to distributions.")
    if "asha" in data and data["asha"] is not None and not isinstance(data["asha"], dict):
        raise ConfigError(f"{where}: 'asha' must be a mapping with grace_period and reduction_factor.")


def _build(job: str, data: dict, where: str) -> SearchSpace:
    params = data.get("params") or {}
    if not params:
        raise ConfigError(f"{where} defines no params; list at least one dotted config key to search.")
    for key, spec in params.items():
        _check_spec(str(key), spec, where)
    mode = data.get("mode")
    if mode not in (None, "min", "max"):
        raise ConfigError(f"{where}: mode must be 'min' or 'max', not {mode!r}.")
    metric = data.get("metric")
    if metric is not None and (not isinstance(metric, str) or not metric.startswith("val/") or metric == "val/"):
        raise ConfigError(f"{where}: 'metric' must name a validation metric such as val/loss, not {metric!r}.")
    asha = {"grace_period": 1, "reduction_factor": 2, **(data.get("asha") or {})}
    for key, value in asha.items():
        if key not in ASHA_KEYS:
            raise ConfigError(f"{where}: asha has unknown key '{key}'; allowed: {', '.join(ASHA_KEYS)}.")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: asha.{key} must be a whole number of at least 1, not {value!r}.")
    if asha["reduction_factor"] < 2:
        raise ConfigError(f"{where}: asha.reduction_factor must be at least 2.")
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"{where}: seed must be a whole number or null, not {seed!r}.")
    metrics = registry.job(job).metrics
    if metric is not None and metric.split("/", 1)[1] not in metrics:
        known = ", ".join(f"val/{name}" for name in metrics)
        raise ConfigError(f"{where}: {job} trials report no metric {metric!r}; use one of {known}.")
    return SearchSpace(
        job=job, metric=metric, mode=mode, params=dict(params), seed=seed, asha=asha, source=where
    )


def _distribution(spec: Any) -> str | None:
    """The distribution name of a spec, or None for a fixed value."""
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        return next(iter(spec))
    return None


def _check_spec(key: str, spec: Any, where: str) -> None:
    if key in RESERVED_KEYS:
        raise ConfigError(
            f"{where}: '{key}' is set by rnnlab tune itself (use --max-epochs for the epochs); remove it."
        )
    if isinstance(spec, dict) and _distribution(spec) is None:
        if len(spec) == 1:
            raise ConfigError(
                f"{where}: '{key}' uses unknown distribution '{next(iter(spec))}'; "
                f"use one of {', '.join(DISTRIBUTIONS)}."
            )
        raise ConfigError(f"{where}: '{key}' must be one distribution such as {{loguniform: [1e-4, 1e-2]}}.")
    kind = _distribution(spec)
    if kind is None:
        return
    args = spec[kind]
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: '{key}' {kind} needs a non-empty list of values.")
        return
    if not isinstance(args, list) or len(args) != 2 or not all(is_number(arg) for arg in args):
        raise ConfigError(f"{where}: '{key}' {kind} needs [low, high] as two numbers, not {args!r}.")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: '{key}' {kind} needs low < high, not [{low}, {high}].")
    if kind in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"{where}: '{key}' {kind} needs a positive low end, not {low}.")
    if kind in ("int", "logint") and not all(float(arg).is_integer() for arg in args):
        raise ConfigError(f"{where}: '{key}' {kind} needs whole-number ends, not [{low}, {high}].")


# --- checking a space against the job's config --------------------------------------------------------


def resolve_metric(space: SearchSpace, base_config: dict) -> SearchSpace:
    """Fill in the metric (val/<train.monitor>) and mode (from the metric's direction) when the space left
    them out, so trials are ranked the way each trial picks its own best checkpoint."""
    if space.metric is None:
        space.metric = f"val/{base_config['train']['monitor']}"
    if space.mode is None:
        space.mode = registry.job(space.job).mode(space.metric.split("/", 1)[1])
    return space


def check_against_config(space: SearchSpace, base_config: dict, preset: str) -> None:
    """Refuse params the preset does not have, and values whose type cannot fit the setting."""
    for key, spec in space.params.items():
        if not _has_path(base_config, key) or isinstance(get_path(base_config, key), dict):
            section = key.split(".")[0]
            known = sorted(_leaf_keys(base_config.get(section, {}), section)) if isinstance(
                base_config.get(section), dict
            ) else sorted(k for k in base_config if isinstance(base_config[k], dict))
            hint = f"; settings under '{section}' are {', '.join(known)}" if known else ""
            raise ConfigError(
                f"{space.source}: unknown parameter '{key}' (not in the {space.job} '{preset}' "
                f"preset){hint}."
            )
        current = get_path(base_config, key)
        kind = _distribution(spec)
        if kind in ("uniform", "loguniform") and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(
                f"{space.source}: '{key}' is a whole number in the config; use int, logint or "
                f"choice instead of {kind}."
            )
        if kind in ("uniform", "loguniform", "int", "logint") and isinstance(current, (bool, str)):
            raise ConfigError(
                f"{space.source}: '{key}' is a {type(current).__name__} in the config; "
                f"use choice or grid instead of {kind}."
            )


def check_values(space: SearchSpace, base_config: dict) -> None:
    """Every extreme value of every param goes through the config's own validation, model keys included, so a
    range the trainer would refuse (lr <= 0, an unknown optimizer, a dropout of 1.5) is refused now, not in a
    trial minutes later."""
    for key, values in space.corner_values().items():
        for value in values:
            try:
                validate(with_values(base_config, {key: value}))
            except ConfigError as error:
                reason = str(error).rstrip(".")
                raise ConfigError(
                    f"{space.source}: '{key}' can take {value!r}, which the config refuses ({reason})."
                ) from None


def _leaf_keys(node: dict, prefix: str) -> list[str]:
    keys = []
    for name, value in node.items():
        path = f"{prefix}.{name}"
        keys.extend(_leaf_keys(value, path) if isinstance(value, dict) else [path])
    return keys


def _has_path(config: dict, key: str) -> bool:
    try:
        get_path(config, key)
    except (KeyError, TypeError):
        return False
    return True
