"""Training configurations as plain data.

A config is a nested dict with four sections (``data``, ``model``, ``train``, ``tracking``) plus ``job``.
It is assembled in layers, each merged on top of the one before:

1. :data:`SCHEMA` -- every key a job accepts, with a neutral default (this is also the list of legal keys);
2. the preset (``configs/presets/{job}.yaml``, top-level keys ``chapter`` / ``default`` / ``smoke``);
3. the user's YAML file (``--config``), either a bare config or one with the same preset keys;
4. ``--set key.sub=value`` overrides, values parsed as YAML (``--set train.lr=1e-3``).

A key that is not in the schema is a :class:`~rnnlab.errors.ConfigError` naming it, so a typo never
silently trains with the default.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from rnnlab.errors import ConfigError

JOBS = ("sentiment", "stock", "charlm")
PRESETS = ("chapter", "default", "smoke", "demo")
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"

# Keys every job shares. ``0`` means "off" / "all" where a number would otherwise be needed.
_TRAIN = {
    "epochs": 10,
    "max_steps": 0,  # optimizer steps; >0 caps (or, with epochs=0, defines) the run length
    "batch_size": 32,  # the GLOBAL batch: split evenly across processes
    "eval_batch_size": 0,  # 0 = same as batch_size
    "lr": 3e-3,
    "optimizer": "adam",  # adam | adamw | sgd
    "weight_decay": 0.0,
    "scheduler": "none",  # none | cosine | onecycle | linear
    "warmup_steps": 0,
    "min_lr_ratio": 0.0,  # cosine decays to lr * min_lr_ratio
    "grad_clip": 0.0,  # max global grad norm; 0 = no clipping
    "grad_accum": 1,
    "mixed_precision": "no",  # no | fp16 | bf16
    "seed": 0,
    "deterministic": False,  # deterministic GPU kernels (slower): bit-identical reruns and resumes on a GPU
    "eval_every": 0,  # optimizer steps between validations; 0 = once per epoch
    "log_every": 10,  # optimizer steps between train-loss log lines
    "early_stopping_patience": 0,  # validations without improvement before stopping; 0 = never stop early
    "monitor": "loss",  # validation metric for best checkpoint / early stopping
    "num_workers": 0,
    "progress": True,  # tqdm bar (main process only)
}
_TRACKING = {
    "wandb": True,
    "project": "rnnlab",
    "group": None,
    "run_name": None,
}
_DATA_COMMON = {"source": None, "mirror": None, "limit_train": 0, "limit_val": 0, "limit_test": 0}

SCHEMA: dict[str, dict[str, Any]] = {
    "sentiment": {
        "job": "sentiment",
        "data": {
            **_DATA_COMMON,
            "val_fraction": 0.1,
            "min_freq": 1,
            "max_vocab": None,
            "max_length": None,
            "bucket_size_multiplier": 100,
        },
        "model": {
            "embed_dim": 32,
            "hidden_size": 50,
            "num_layers": 1,
            "bidirectional": False,
            "dropout": 0.0,
            "fc_size": 32,
            "pooling": "last",  # last | max_mean (rnnlab/models/sentiment.py)
            "embed_dropout": 0.0,
        },
        "train": dict(_TRAIN),
        "tracking": dict(_TRACKING),
    },
    "stock": {
        "job": "stock",
        "data": {
            **_DATA_COMMON,
            "window": 5,
            "target": "close",  # close | log_return
            "train_end": "2022-12-31",
            "test_start": "2023-01-01",
            "test_end": "2023-06-30",
            "val_days": 252,
            "scale_target": True,  # false: train on the raw target (the chapter's raw close)
        },
        "model": {"hidden_size": 16, "num_layers": 2, "fc_size": 16, "dropout": 0.0},
        # loss: mse | l1 | huber, on the scaled target (huber_delta in those units); val_days: 0 = no
        # validation split (the chapter's protocol: no selection, the final weights are the bundle's)
        "train": {**_TRAIN, "batch_size": 128, "monitor": "mae", "loss": "mse", "huber_delta": 1.0},
        "tracking": dict(_TRACKING),
    },
    "charlm": {
        "job": "charlm",
        "data": {
            **_DATA_COMMON,  # limits count characters
            "lowercase": True,
            "fractions": [0.9, 0.05, 0.05],
            "seq_len": 40,
            "sampler": "tbptt",  # tbptt (contiguous rows, carried state) | random_chunks (the chapter's)
        },
        "model": {"embed_dim": 256, "hidden_size": 512, "num_layers": 1, "dropout": 0.0},
        "train": {**_TRAIN, "batch_size": 64},
        "tracking": {**_TRACKING, "sample_prompt": "the emperor", "sample_length": 200, "sample_temperature": 0.8},
    },
}

_CHOICES = {
    ("train", "optimizer"): ("adam", "adamw", "sgd"),
    ("train", "scheduler"): ("none", "cosine", "onecycle", "linear"),
    ("train", "mixed_precision"): ("no", "fp16", "bf16"),
    ("data", "target"): ("close", "log_return"),
    ("train", "loss"): ("mse", "l1", "huber"),
    ("data", "sampler"): ("tbptt", "random_chunks"),
}


def load_config(
    job: str,
    preset: str = "default",
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> dict:
    """The full config for ``job``: schema defaults <- preset <- user YAML <- ``--set`` overrides."""
    if job not in JOBS:
        raise ConfigError(f"Unknown job {job!r}; choose one of {', '.join(JOBS)}.")
    config = copy.deepcopy(SCHEMA[job])
    config = merge(config, preset_config(job, preset), where=f"preset {preset!r}")
    if config_path is not None:
        config = merge(config, _read_user_yaml(Path(config_path), preset), where=str(config_path))
    for item in overrides:
        key, value = parse_override(item)
        config = merge(config, _nest(key, value), where=f"--set {item}")
    config["job"] = job
    validate(config)
    return config


def preset_config(job: str, preset: str) -> dict:
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    path = PRESETS_DIR / f"{job}.yaml"
    presets = _read_yaml(path)
    if preset not in presets:
        raise ConfigError(f"The preset file {path} has no {preset!r} section.")
    return presets[preset] or {}


def _read_yaml(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"The config file {path} does not exist.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"The config file {path} is not valid YAML{where}; fix its syntax.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"The config file {path} must hold a mapping of sections, not a {type(loaded).__name__}.")
    return loaded


def _read_user_yaml(path: Path, preset: str) -> dict:
    """A user file is either a bare config or, like a preset file, keyed by preset name."""
    loaded = _read_yaml(path)
    if loaded and set(loaded) <= set(PRESETS):
        return loaded.get(preset) or {}
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"The override {item!r} is not of the form key.sub=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"The value in --set {item!r} is not valid YAML.") from None
    return key, _number_if_numeric(value)


def _number_if_numeric(value: Any) -> Any:
    # YAML 1.1 reads "1e-4" (no dot) as a string; a user writing it means the number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def merge(base: dict, update: Mapping, *, where: str, prefix: str = "") -> dict:
    """``update`` merged into a copy of ``base``; keys unknown to ``base`` are a ConfigError."""
    merged = dict(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(str(k) for k in base))
            raise ConfigError(f"Unknown config key {dotted!r} in {where}; known keys here: {known}.")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"Config key {dotted!r} in {where} must be a mapping of sub-keys.")
            merged[key] = merge(base[key], value, where=where, prefix=f"{dotted}.")
        else:
            merged[key] = _number_if_numeric(copy.deepcopy(value)) if isinstance(base[key], float) else copy.deepcopy(value)
            if isinstance(base[key], str) and isinstance(value, datetime.date):
                merged[key] = value.isoformat()  # YAML reads 2022-06-30 as a date; the config stays JSON-able
    return merged


def validate(config: dict) -> None:
    """Choices and ranges that would otherwise fail deep inside training."""
    # YAML 1.1 reads a bare ``no`` as False: ``--set train.mixed_precision=no`` means the choice "no".
    if config.get("train", {}).get("mixed_precision") is False:
        config["train"]["mixed_precision"] = "no"
    for (section, key), choices in _CHOICES.items():
        if key in config.get(section, {}) and config[section][key] not in choices:
            raise ConfigError(
                f"{section}.{key} is {config[section][key]!r}; choose one of {', '.join(choices)}."
            )
    train = config["train"]
    for key in ("batch_size", "grad_accum"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, not {train[key]!r}.")
    for key in ("epochs", "max_steps", "eval_every", "early_stopping_patience", "warmup_steps", "log_every"):
        if not isinstance(train[key], int) or train[key] < 0:
            raise ConfigError(f"train.{key} must be a non-negative integer, not {train[key]!r}.")
    if train["epochs"] == 0 and train["max_steps"] == 0:
        raise ConfigError("Set train.epochs or train.max_steps to a positive number; both are 0.")
    if not isinstance(train["lr"], (int, float)) or train["lr"] <= 0:
        raise ConfigError(f"train.lr must be a positive number, not {train['lr']!r}.")
    if "huber_delta" in train and (not isinstance(train["huber_delta"], (int, float)) or train["huber_delta"] <= 0):
        raise ConfigError(f"train.huber_delta must be a positive number, not {train['huber_delta']!r}.")
    if not isinstance(train["deterministic"], bool):
        raise ConfigError(f"train.deterministic must be true or false, not {train['deterministic']!r}.")
    if not isinstance(config["data"].get("scale_target", True), bool):
        raise ConfigError(f"data.scale_target must be true or false, not {config['data']['scale_target']!r}.")
    val_days = config["data"].get("val_days", 0)
    if not isinstance(val_days, int) or isinstance(val_days, bool) or val_days < 0:
        raise ConfigError(f"data.val_days must be a non-negative integer (0 = no validation split), not {val_days!r}.")
    if "val_days" in config["data"] and val_days == 0 and train["early_stopping_patience"]:
        raise ConfigError(
            "train.early_stopping_patience needs a validation split and data.val_days=0 has none; "
            "set train.early_stopping_patience=0 or data.val_days to a positive number."
        )


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
