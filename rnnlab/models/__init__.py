"""The models; ``build_model`` makes the one a job names (rnnlab/registry.py says which)."""

from __future__ import annotations

from typing import Any

from torch import nn

from rnnlab import registry


def build_model(job: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised model for ``job`` from a plain dict (unknown keys -> ConfigError)."""
    spec = registry.job(job)
    return spec.load("model")(spec.load("model_config").from_dict(config))
