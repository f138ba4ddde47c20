"""The three models and a registry so trainers, bundles and inference build them by job name."""

from __future__ import annotations

from typing import Any

from torch import nn

from rnnlab.errors import ConfigError
from rnnlab.models.charlm import CharConfig, CharLSTM
from rnnlab.models.sentiment import SentimentConfig, SentimentLSTM
from rnnlab.models.stock import StockConfig, StockLSTM

# job name -> (config dataclass, model class)
MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "sentiment": (SentimentConfig, SentimentLSTM),
    "stock": (StockConfig, StockLSTM),
    "charlm": (CharConfig, CharLSTM),
}


def build_model(job: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised model for ``job`` from a plain dict (unknown keys -> ConfigError)."""
    if job not in MODELS:
        raise ConfigError(f"Unknown job {job!r}; choose one of {', '.join(MODELS)}.")
    config_class, model_class = MODELS[job]
    return model_class(config_class.from_dict(config))


__all__ = [
    "MODELS",
    "build_model",
    "CharConfig",
    "CharLSTM",
    "SentimentConfig",
    "SentimentLSTM",
    "StockConfig",
    "StockLSTM",
]
