"""The optimizer and the learning-rate schedule a config names (``train.optimizer``, ``train.scheduler``)."""

from __future__ import annotations

import math

import torch

from rnnlab.config import TrainSettings
from rnnlab.errors import ConfigError


def make_optimizer(model: torch.nn.Module, train: TrainSettings) -> torch.optim.Optimizer:
    lr, wd = train.lr, train.weight_decay
    groups = parameter_groups(model, lr, train.lr_multipliers)
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)


def parameter_groups(model: torch.nn.Module, lr: float, multipliers: dict[str, float]) -> list[dict]:
    """One optimizer group per learning rate: each parameter takes the multiplier of the longest prefix of
    ``multipliers`` its name starts with (1 where none does). The scheduler scales every group alike."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in multipliers:
        if not any(_under(name, prefix) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise ConfigError(f"train.lr_multipliers: no parameter of the model is named {prefix!r} or under "
                              f"it; its top-level names are {', '.join(tops)}.")
    by_scale: dict[float, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        matches = [prefix for prefix in multipliers if _under(name, prefix)]
        scale = multipliers[max(matches, key=len)] if matches else 1.0
        by_scale.setdefault(scale, []).append(parameter)
    return [{"params": params, "lr": lr * scale} for scale, params in by_scale.items()]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def make_scheduler(optimizer, train: TrainSettings, total_steps: int):
    """Stepped once per optimizer step: linear warmup over ``warmup_steps``, then flat, cosine or linear decay
    to ``lr * min_lr_ratio``; or PyTorch's OneCycleLR."""
    name, warmup, floor = train.scheduler, train.warmup_steps, train.min_lr_ratio
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=max(total_steps, 2))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if name == "none":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress
        return floor + (1 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
