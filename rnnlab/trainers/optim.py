"""The optimizer and the learning-rate schedule a config names (``train.optimizer``, ``train.scheduler``)."""

from __future__ import annotations

import math

import torch

from rnnlab.config import TrainSettings


def make_optimizer(model: torch.nn.Module, train: TrainSettings) -> torch.optim.Optimizer:
    lr, wd = train.lr, train.weight_decay
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)


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
