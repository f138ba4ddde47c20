"""What the loop asks of a job: batches, the loss and the metrics. One file per job implements it
(``rnnlab/jobs/<name>.py``, listed in rnnlab/registry.py); ``loop.py`` does everything else.

Sharding rule (why a 2-process run follows the 1-process loss curve): every process builds the SAME global
batch for micro-batch ``k`` of epoch ``e`` (seeded by ``(seed, e)``; no global RNG) and keeps only its share
(rows ``rank::world_size``, or the batcher's row block for charlm). A job returns the SUM of the per-unit losses
of its share and the number of units in the GLOBAL batch; the loop scales the sum by ``world_size / global_units``
so DDP's gradient average equals the gradient of the global mean loss, whatever the split. Batches are never
passed through ``accelerator.prepare`` (that would shard them a second time); evaluation shards the split the
same way and collects the pieces with ``accelerator.gather_for_metrics``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rnnlab import registry
from rnnlab.config import JobConfig, validate

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """This process's share of one global micro-batch."""

    inputs: tuple  # positional arguments of the model (tensors already on the right device)
    targets: torch.Tensor
    global_units: int  # loss units (samples or tokens) in the GLOBAL batch
    samples: int  # samples in this process's share
    tokens: int  # tokens (time steps) in this process's share


@dataclass
class EvalResult:
    metrics: dict[str, float]  # identical on every process
    details: dict[str, Any] = field(default_factory=dict)  # arrays for plots/tables (every process)


class Job:
    """The interface the loop relies on. Subclasses fill in the data, the model, the loss and the metrics."""

    Config: ClassVar[type[JobConfig]]  # the job's config keys (its data section, extra train keys)

    def __init__(self, config: JobConfig, *, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.spec = registry.job(config.job)
        self.rank, self.world_size = rank, world_size
        self.seed = config.train.seed
        self.batch_size = config.train.batch_size
        self.eval_batch_size = config.train.eval_batch_size or self.batch_size
        self.device = torch.device("cpu")

    # -- data -------------------------------------------------------------------------------------------------
    def source_path(self):
        from rnnlab.data.sources import resolve

        return resolve(self.spec.data_set, self.config.data.source, mirror=self.config.data.mirror)

    def load_data(self) -> None:
        raise NotImplementedError

    def load_data_to_score(self, path, assets: dict, **span) -> dict:
        """Instead of ``load_data``, for the job's scorer (``rnnlab evaluate --data``): the data at ``path``, any in
        the job's format (``span``: ``start``/``end`` days of dated data), as the test split, read with a bundle's
        ``assets`` (vocabulary, scaler: never refit), so ``evaluate`` scores it as it scores training's test split.
        Returns what the data holds beside the figures (rows read, words the vocabulary lacks)."""
        raise NotImplementedError

    def add_training_data(self) -> None:
        """After ``load_data``, what only training reads (scoring a bundle skips it): more training examples."""

    def steps_per_epoch(self) -> int:
        """Global micro-batches in one epoch."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, start: int) -> None:
        """Called before ``batches``; ``start > 0`` means resuming mid-epoch (state restored by the loop)."""

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """This process's share of micro-batches ``start, start+1, ...`` of ``epoch``."""
        raise NotImplementedError

    def has_validation(self) -> bool:
        """False when there is nothing to validate on (the loop then validates and selects nothing)."""
        return True

    # -- model ------------------------------------------------------------------------------------------------
    def data_model_config(self) -> dict:
        """The model config keys the data decides (vocabulary size, feature count)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        from rnnlab.models import build_model

        return build_model(self.spec.name, {**self.config.model.to_dict(), **self.data_model_config()})

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Sum of the per-unit losses of this process's share (float32)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, accelerator) -> EvalResult:
        raise NotImplementedError

    def figures(self, result: EvalResult) -> dict:
        """The figures of a scored split beyond ``result.metrics`` (which the loop logs at every validation): the
        bundle's test figures and ``rnnlab evaluate`` hold both; {} for none."""
        return {}

    def predictions(self, result: EvalResult) -> dict:
        """After ``load_data_to_score`` and ``evaluate``: each item's answer in the order the data was read (for
        comparing models item by item); a job whose scorer offers none leaves it out."""
        raise NotImplementedError

    def fit_on_validation(self, model: nn.Module, accelerator) -> dict:
        """After training, with the best weights in: settle what the job picks on the validation split (its
        model config may change; the bundle keeps it). Returns the choices for the run's summary; {} for none."""
        return {}

    def monitor(self) -> tuple[str, str]:
        """The validation metric that picks the best checkpoint, and whether lower or higher is better."""
        name = self.config.train.monitor
        return name, self.spec.mode(name)

    # -- outputs ----------------------------------------------------------------------------------------------
    def assets(self) -> dict[str, dict]:
        """JSON assets for the bundle (vocab.json, scaler.json, ...)."""
        return {}

    def example(self) -> dict | None:
        """A request body for the job's route to try the model with (the bundle keeps it as example.json, the
        service answers it at GET /v1/<job>/example); None: the job gives none."""
        return None

    def report(self, model: nn.Module, val: dict, test: EvalResult, output_dir, tracker) -> dict:
        """Main process, after the test: figures/tables for W&B and beside the bundle. Returns extra metrics."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-process state the checkpoint must hold beyond the model (e.g. a carried hidden state)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    # -- helpers ----------------------------------------------------------------------------------------------
    def shuffled_batches(self, inputs: torch.Tensor, targets: torch.Tensor, epoch: int, start: int) -> Iterator[Batch]:
        """Micro-batches ``start, start+1, ...`` of an epoch over examples of one shape (windows of days): the
        examples shuffled by ``(seed, epoch)``, this process's share of each global batch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(targets))
        for k in range(start, math.ceil(len(targets) / self.batch_size)):
            global_batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            if len(global_batch) < self.world_size:
                continue
            mine = torch.from_numpy(self._share(global_batch))
            x = inputs[mine]
            yield Batch(inputs=(x.to(self.device),), targets=targets[mine].to(self.device),
                        global_units=len(global_batch), samples=len(mine), tokens=len(mine) * x.shape[1])

    @torch.no_grad()
    def predict_examples(self, model, inputs: torch.Tensor, accelerator, output_shape: tuple = ()) -> np.ndarray:
        """The model's output for every example of ``inputs`` (windows of days), in order, as float64: each process
        predicts its share in eval batches and the shares are gathered (an empty share is [0, *output_shape])."""
        mine = self._share(np.arange(len(inputs)))
        preds = []
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = torch.from_numpy(mine[start : start + self.eval_batch_size])
            with accelerator.autocast():
                preds.append(model(inputs[chunk].to(self.device)).float().cpu().numpy())
        local = np.concatenate(preds) if preds else np.zeros((0, *output_shape), np.float32)
        pieces = gather(accelerator, (mine, local))
        out = np.empty((len(inputs), *output_shape), dtype=np.float64)
        out[np.concatenate([p[0] for p in pieces])] = np.concatenate([p[1] for p in pieces])
        return out

    def _share(self, indices: np.ndarray) -> np.ndarray:
        return indices[self.rank :: self.world_size]

    def _limit(self, n: int, key: str) -> np.ndarray:
        """Indices 0..n-1, or a seeded random subset of data.<key> of them (kept in order)."""
        limit = getattr(self.config.data, key)
        if not limit or limit >= n:
            return np.arange(n)
        chosen = np.sort(np.random.default_rng(self.seed).permutation(n)[:limit])
        log.info("data.%s=%d: using %d of %d examples", key, limit, limit, n)
        return chosen


def gather(accelerator, item: Any) -> list:
    """Objects from every process, in rank order (a list with one entry per process)."""
    return accelerator.gather_for_metrics([item], use_gather_object=True)


def make_job(config: JobConfig | Mapping, *, rank: int = 0, world_size: int = 1) -> Job:
    """The job a config names (a plain dict is checked first), built for process ``rank`` of ``world_size``."""
    if not isinstance(config, JobConfig):
        config = validate(config)
    return registry.job(config.job).load("job")(config, rank=rank, world_size=world_size)
