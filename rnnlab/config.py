"""Every configuration key, declared once: its type, default, choices and range (pydantic v2 models).

A training config has five parts: ``job`` and the sections ``data``, ``model``, ``train``, ``tracking``. The
sections every job shares are declared here; each job declares its own ``data`` keys (and any extra ``train``
or ``tracking`` keys) in its job file (``rnnlab/trainers/JOB.py``), and its ``model`` keys are those of its
model's config (``rnnlab/models/JOB.py``) less the ones the data decides (vocabulary size, feature count).

A config is assembled in layers, each merged on top of the one before:

1. the declared defaults;
2. the preset (the job's preset file, ``configs/presets/{job}.yaml`` for rnnlab's jobs; top-level keys are preset
   names: ``default``, ``smoke`` and, for a served job, ``demo`` are required, rnnlab/registry.py says why);
3. the user's YAML file (``--config``), either a bare config or one keyed by preset name like a preset file;
4. ``--set key.sub=value`` overrides, values parsed as YAML (``--set train.lr=1e-3``).

The first fault is a :class:`~rnnlab.errors.ConfigError` of one sentence naming the key (and, for an unknown
key, the layer it came from), so a typo never silently trains with the default. Why pydantic rather than
dataclasses: the ranges and choices are part of each declaration, the error names the key's full path, and
``strict`` mode refuses ``"3"`` for a number or ``1`` for a boolean without a hand-written check per key.
"""

from __future__ import annotations

import datetime
import functools
import math
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator

from rnnlab import registry
from rnnlab.errors import ConfigError

# Keys that once existed and do nothing now. Configs and bundles written before they went still hold them, so
# they are dropped rather than refused. train.num_workers: nothing read it (batches are built in the process).
RETIRED_KEYS = ("train.num_workers",)


# --- value types ----------------------------------------------------------------------------------------------


def _number_if_numeric(value: Any) -> Any:
    # YAML 1.1 reads "1e-4" (no dot) as a string; a user writing it means the number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _iso_date(value: Any) -> Any:
    # YAML reads 2022-06-30 as a date; the config stays JSON-able as the string the user wrote.
    return value.isoformat() if isinstance(value, datetime.date) else value


Number = Annotated[float, BeforeValidator(_number_if_numeric)]
PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]  # 0 means "off" / "all" where a number would otherwise be needed
PositiveNumber = Annotated[Number, Field(gt=0)]
NonNegativeNumber = Annotated[Number, Field(ge=0)]
Probability = Annotated[Number, Field(ge=0, lt=1)]  # dropout rates
Date = Annotated[str, BeforeValidator(_iso_date)]


class Settings(BaseModel):
    """Base of every config model: unknown keys refused, no silent casts, checked again on assignment."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Any, *, prefix: str | None = None):
        """``data`` checked against the declaration; the first fault is a ConfigError naming the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} expects a mapping of settings, got {type(data).__name__}.")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as error:
            raise ConfigError(first_error(error, cls, cls.__name__ if prefix is None else prefix)) from None


# --- the sections every job shares ----------------------------------------------------------------------------


class DataSettings(Settings):
    source: str | None = None  # a file/folder instead of the default data set
    mirror: str | None = None
    limit_train: Count = 0
    limit_val: Count = 0
    limit_test: Count = 0


class TrainSettings(Settings):
    epochs: Count = 10
    max_steps: Count = 0  # optimizer steps; >0 caps (or, with epochs=0, defines) the run length
    batch_size: PositiveInt = 32  # the GLOBAL batch: split evenly across processes
    eval_batch_size: Count = 0  # 0 = same as batch_size
    lr: PositiveNumber = 3e-3
    # parameter-name prefix -> multiple of ``lr`` for those parameters (discriminative learning rates), e.g.
    # ``{ngrams: 5, embedding: 0.3}``; the longest matching prefix wins, the rest train at ``lr``
    lr_multipliers: dict[str, PositiveNumber] = Field(default_factory=dict)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: NonNegativeNumber = 0.0
    scheduler: Literal["none", "cosine", "onecycle", "linear"] = "none"
    warmup_steps: Count = 0
    min_lr_ratio: Annotated[Number, Field(ge=0, le=1)] = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: NonNegativeNumber = 0.0  # max global grad norm; 0 = no clipping
    grad_accum: PositiveInt = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: Count = 0
    deterministic: bool = False  # deterministic GPU kernels (slower): bit-identical reruns and resumes on a GPU
    eval_every: Count = 0  # optimizer steps between validations; 0 = once per epoch
    log_every: Count = 10  # optimizer steps between train-loss log lines
    early_stopping_patience: Count = 0  # validations without improvement before stopping; 0 = never
    monitor: str = "loss"  # validation metric for the best checkpoint / early stopping (the job's metrics)
    progress: bool = True  # a progress bar (main process only; a line now and then when not on a terminal)

    @model_validator(mode="before")
    @classmethod
    def _read_as_meant(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # YAML 1.1 reads a bare ``no`` as False: ``mixed_precision: no`` (as Accelerate's own configs write it)
        # means the choice "no".
        if data.get("mixed_precision") is False:
            data = {**data, "mixed_precision": "no"}
        return {key: value for key, value in data.items() if f"train.{key}" not in RETIRED_KEYS}


class TrackingSettings(Settings):
    wandb: bool = True
    project: str = "rnnlab"
    group: str | None = None
    run_name: str | None = None


class JobConfig(Settings):
    """A whole training config. Each job subclasses it, naming its own section types."""

    job: str
    data: DataSettings
    model: Settings
    train: TrainSettings = Field(default_factory=TrainSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)

    @property
    def spec(self) -> registry.JobSpec:
        return registry.job(self.job)

    @property
    def has_validation_split(self) -> bool:
        """False where the config holds nothing out to validate on (stock's ``data.val_days=0``)."""
        return True

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        train = self.train
        if train.epochs == 0 and train.max_steps == 0:
            raise ValueError("Set train.epochs or train.max_steps to a positive number; both are 0.")
        metrics = self.spec.metrics
        if train.monitor not in metrics:
            raise ValueError(f"train.monitor is {train.monitor!r}; choose one of {', '.join(metrics)}.")
        if not self.has_validation_split and train.early_stopping_patience:
            raise ValueError(
                "train.early_stopping_patience needs a validation split and this config has none; "
                "set train.early_stopping_patience=0 or give the job a validation split."
            )
        return self


@functools.cache
def model_section(config_class: type[Settings]) -> type[Settings]:
    """The ``model`` section of a training config: the model config's keys, less those the data decides."""
    fields = {name: (field.annotation, field) for name, field in config_class.model_fields.items()
              if name not in config_class.FROM_DATA}
    return create_model(f"{config_class.__name__}Section", __base__=Settings, **fields)


class ModelSettings(Settings):
    """Base of the models' configs (``rnnlab/models``): ``FROM_DATA`` keys are set by the job from the data."""

    FROM_DATA: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(first_error(error, type(self), type(self).__name__)) from None


# --- loading ----------------------------------------------------------------------------------------------


def config_class(job: str) -> type[JobConfig]:
    return registry.job(job).load("job").Config


def load_config(
    job: str,
    preset: str = "default",
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> dict:
    """The full config for ``job`` as plain data: defaults <- preset <- user YAML <- ``--set`` overrides."""
    cls = config_class(job)
    config: dict = {"job": job}  # a layer may name the job too (best.yaml does), but only this one
    config = merge(config, preset_config(job, preset), cls, where=f"preset {preset!r}")
    if config_path is not None:
        config = merge(config, read_user_yaml(Path(config_path), preset), cls, where=str(config_path))
    for item in overrides:
        key, value = parse_override(item)
        config = merge(config, nest(key, value), cls, where=f"--set {item}")
    return validate({**config, "job": job}).to_dict()


def validate(config: Mapping) -> JobConfig:
    """``config`` (a dict from YAML, a bundle's config.json or a Tune trial) checked and typed."""
    cls = config_class(config.get("job")) if isinstance(config, Mapping) else JobConfig
    return cls.from_dict(config, prefix="")


def preset_config(job: str, preset: str) -> dict:
    spec = registry.job(job)
    path, required = spec.presets_file, spec.required_presets()
    presets = read_yaml(path, what=f"preset file of job {job}",
                        missing_hint=f"; write one with the sections {', '.join(required)} (rnnlab/registry.py "
                        "says what each is for)")
    if not isinstance(presets, dict):
        raise ConfigError(f"The preset file {path} must hold a mapping of preset name -> settings; give it the "
                          f"sections {', '.join(required)}.")
    if preset in required and preset not in presets:  # a preset rnnlab's tools load by name: say which needs it
        raise ConfigError(f"The {job} job has no {preset!r} preset in {path}; add a {preset!r} section there "
                          f"({required[preset]}).")
    if preset not in presets:
        raise ConfigError(f"The {job} job has no {preset!r} preset ({path}); choose one of {', '.join(presets)}.")
    return presets[preset] or {}


def read_yaml(path: Path, *, what: str = "config file", missing_hint: str = "") -> Any:
    """A YAML file's content; a missing file or a syntax error is one sentence (with the line number)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The {what} {path} does not exist{missing_hint}.")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"The {what} {path} is not valid YAML{where}; fix its syntax.") from None
    return loaded


def read_user_yaml(path: Path, preset: str) -> dict:
    """A user file is either a bare config or, like a preset file, keyed by preset name."""
    loaded = read_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"The config file {path} must hold a mapping of sections, not a {type(loaded).__name__}.")
    if loaded and set(loaded) <= set(registry.presets()):
        return loaded.get(preset) or {}
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", "1e-3")``; the value is parsed as YAML (numbers typed later)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"The override {item!r} is not of the form key.sub=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"The value in --set {item!r} is not valid YAML.") from None
    return key, value


# --- dotted keys ----------------------------------------------------------------------------------------------


def nest(dotted: str, value: Any) -> dict:
    """``nest("train.lr", 1e-3)`` -> ``{"train": {"lr": 1e-3}}``."""
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def get_path(config: Mapping, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def with_values(config: Mapping, values: Mapping[str, Any]) -> dict:
    """A copy of ``config`` with each dotted key set (numpy scalars made plain, so it stays JSON-able)."""
    out = dict(config)
    for key, value in values.items():
        if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
            value = value.item()
        out = _deep_update(out, nest(key, value))
    return out


def _deep_update(base: Mapping, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge(base: Mapping, update: Mapping, cls: type[BaseModel], *, where: str, prefix: str = "") -> dict:
    """``update`` deep-merged over ``base``; a key ``cls`` does not declare is a ConfigError naming its layer."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if dotted in RETIRED_KEYS:
            continue
        fields = cls.model_fields
        if key == "job" and not prefix:
            if value != base.get("job", value):
                raise ConfigError(f"{where} is a config for job {value!r}, not {base['job']!r}; check the file.")
            continue
        if key not in fields:
            known = ", ".join(name for name in fields if name != "job")
            raise ConfigError(f"Unknown config key {dotted!r} in {where}; known keys here: {known}.")
        section = _model_of(fields[key].annotation)
        if section is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"Config key {dotted!r} in {where} must be a mapping of sub-keys.")
            merge({}, value, section, where=where, prefix=f"{dotted}.")
    return _deep_update(base, update)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


# --- one sentence per fault -------------------------------------------------------------------------------


def first_error(error: ValidationError, cls: type[BaseModel], prefix: str) -> str:
    """The first fault of a validation as one sentence naming the key (``train.lr must be ...``)."""
    fault = error.errors(include_url=False)[0]
    loc = [str(part) for part in fault["loc"]]
    key = ".".join(([prefix] if prefix else []) + loc)
    kind, value = fault["type"], fault.get("input")
    if kind == "value_error":  # a rule across keys (a model_validator): its message is the sentence
        return str(fault["ctx"]["error"])
    parent, field = _field_at(cls, loc)
    if kind == "extra_forbidden":
        known = ", ".join(parent.model_fields) if parent is not None else ""
        return f"Unknown config key {key!r}; known keys here: {known}."
    if field is None:
        return f"{key or cls.__name__}: {fault['msg']}."
    if kind == "missing":
        return f"{key} is missing; set it to {expectation(field)}."
    if kind == "literal_error":
        return f"{key} is {value!r}; choose one of {', '.join(map(str, _choices(field.annotation)))}."
    return f"{key} must be {expectation(field)}, not {value!r}."


def _field_at(cls: type[BaseModel], loc: list[str]):
    parent, field = cls, None
    for index, part in enumerate(loc):
        if parent is None or part not in parent.model_fields:
            return parent, None
        field = parent.model_fields[part]
        if index < len(loc) - 1:
            parent = _model_of(field.annotation)
    return parent, field


def _choices(annotation: Any) -> tuple:
    for arg in (annotation, *get_args(annotation)):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()


def expectation(field) -> str:
    """What a declared field accepts, in words: "a positive integer", "one of adam, adamw, sgd", ..."""
    annotation, optional = field.annotation, False
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        optional, annotation = len(args) < len(get_args(annotation)), args[0]
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower(), None) for m in field.metadata}
    if get_origin(annotation) is Literal:
        words = f"one of {', '.join(map(str, get_args(annotation)))}"
    elif annotation is bool:
        words = "true or false"
    elif annotation in (int, float):
        noun = "integer" if annotation is int else "number"
        low = bounds.get("Ge", bounds.get("Gt"))
        if "Lt" in bounds or "Le" in bounds:
            words = f"a {noun} in [{low:g}, {bounds.get('Lt', bounds.get('Le')):g}{')' if 'Lt' in bounds else ']'}"
        elif bounds.get("Gt") == 0 or bounds.get("Ge") == 1:
            words = f"a positive {noun}"
        elif bounds.get("Ge") == 0:
            words = f"a non-negative {noun}"
        else:
            words = "a whole number" if annotation is int else "a number"
    else:
        words = f"a {getattr(annotation, '__name__', str(annotation))}"
    return f"{words} or null" if optional else words


def is_number(value: Any) -> bool:
    """A real, finite number (not a bool): what a range end or a resource count must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
