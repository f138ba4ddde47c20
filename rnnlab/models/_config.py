"""Model configs are plain dataclasses; this is the one place that turns them to and from dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from rnnlab.errors import ConfigError

C = TypeVar("C")


class ConfigMixin:
    """``to_dict`` / ``from_dict`` for a model config dataclass.

    ``from_dict`` refuses unknown or missing keys with a ConfigError naming them, so a typo in a YAML file or a
    search space never silently trains the default model.
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__} expects a mapping of settings, got {type(d).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(
                f"Unknown {cls.__name__} key(s) {', '.join(map(repr, unknown))}; "
                f"known keys are {', '.join(fields)}."
            )
        missing = [
            name
            for name, f in fields.items()
            if name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{cls.__name__} needs the key(s) {', '.join(map(repr, missing))}.")
        return cls(**d)


def check_positive_int(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")


def check_dropout(config: object, name: str = "dropout") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{type(config).__name__}.{name} must be a number in [0, 1), got {value!r}.")
