"""The review language model job: a word-level LSTM over the training and unlabelled IMDb reviews with the
sentiment vocabulary (rnnlab/data/review_lm.py), truncated BPTT over contiguous rows with the state carried,
reported as nats per token and perplexity on held-out unlabelled reviews. Its bundle is what a sentiment run
starts from with ``model.init_from``."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from rnnlab.config import DataSettings, JobConfig, PositiveInt, Probability, TrainSettings, model_section
from rnnlab.errors import ConfigError
from rnnlab.models.cells import detach_state
from rnnlab.models.wordlm import WordLMConfig
from rnnlab.trainers.job import Batch, EvalResult, Job, gather

log = logging.getLogger(__name__)


class LMDataSettings(DataSettings):  # the limits count tokens
    # the sentiment vocabulary's settings: keep them equal to the sentiment preset that will start from this LM
    val_fraction: Probability = 0.1
    min_freq: PositiveInt = 2
    max_vocab: PositiveInt | None = 30000
    heldout_reviews: PositiveInt = 1000  # unlabelled reviews held out for validation, as many for test
    seq_len: PositiveInt = 64


class LMTrainSettings(TrainSettings):
    batch_size: PositiveInt = 32


LMModelSettings = model_section(WordLMConfig)


class LMJobConfig(JobConfig):
    job: Literal["lm"] = "lm"
    data: LMDataSettings = Field(default_factory=LMDataSettings)
    model: LMModelSettings = Field(default_factory=LMModelSettings)
    train: LMTrainSettings = Field(default_factory=LMTrainSettings)


class LMJob(Job):
    Config = LMJobConfig

    def load_data(self) -> None:
        from rnnlab.data import review_lm, text

        d = self.config.data
        data = review_lm.load_review_lm_data(self.source_path(), val_fraction=d.val_fraction, seed=self.seed,
                                             min_freq=d.min_freq, max_vocab=d.max_vocab,
                                             heldout_reviews=d.heldout_reviews)
        self.vocab = data.vocab
        self.streams = {}
        for split in ("train", "val", "test"):
            stream = getattr(data, split)
            limit = getattr(d, f"limit_{split}")
            if limit and limit < len(stream):  # a prefix of the shuffled reviews
                log.info("data.limit_%s=%d: using the first %d of %d tokens", split, limit, limit, len(stream))
                stream = stream[:limit]
            self.streams[split] = np.ascontiguousarray(stream, dtype=np.int64)
        if self.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be a multiple of the number of processes "
                              f"({self.world_size}) for lm.")
        self._text = text
        self.seq_len = d.seq_len
        self.batcher = text.TBPTTBatcher(self.streams["train"], self.batch_size, self.seq_len,
                                         rank=self.rank, world_size=self.world_size)
        self.carry: list[tuple[torch.Tensor, ...]] | None = None

    def steps_per_epoch(self) -> int:
        return len(self.batcher)

    def start_epoch(self, epoch: int, start: int) -> None:
        if start == 0:
            self.carry = None

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        for k in range(start, self.steps_per_epoch()):
            x, y = self.batcher.window(k)
            yield Batch(inputs=(x.to(self.device),), targets=y.to(self.device),
                        global_units=self.batch_size * x.shape[1], samples=x.shape[0], tokens=x.numel())

    def data_model_config(self) -> dict:
        return {"vocab_size": len(self.vocab)}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        hidden, state = model(*batch.inputs, self.carry)
        self.carry = [detach_state(layer) for layer in state]  # truncated BPTT; (h, c) or (h,)
        return _unwrap(model).loss_sum(hidden, batch.targets)

    @torch.no_grad()
    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        stream = self.streams[split]
        rows = max(self.world_size, (min(self.eval_batch_size, max(1, (len(stream) - 1) // self.seq_len))
                                     // self.world_size) * self.world_size)
        batcher = self._text.TBPTTBatcher(stream, rows, self.seq_len, rank=self.rank, world_size=self.world_size,
                                          drop_last=False)
        state, total, count = None, 0.0, 0
        for x, y in batcher:
            with accelerator.autocast():
                hidden, state = model(x.to(self.device), state)
            total += float(_unwrap(model).loss_sum(hidden, y.to(self.device)))
            count += y.numel()
        pieces = gather(accelerator, (total, count))
        nats = sum(p[0] for p in pieces) / max(1, sum(p[1] for p in pieces))
        return EvalResult({"loss": nats, "perplexity": math.exp(nats)})

    def assets(self) -> dict[str, dict]:
        return {"vocab": self.vocab.to_json()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.carry is None:
            return {}
        return {f"carry_{kind}_{i}": t.detach().cpu().contiguous()
                for i, pair in enumerate(self.carry) for kind, t in zip("hc", pair)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        layers = sum(key.startswith("carry_h_") for key in state)  # carry_c_<i> too for an LSTM
        self.carry = [tuple(state[f"carry_{kind}_{i}"].to(self.device) for kind in "hc" if f"carry_{kind}_{i}" in state)
                      for i in range(layers)] if state else None


def _unwrap(model):
    """The WordLSTM inside a DDP wrapper (its loss_sum is a method, not part of forward)."""
    return getattr(model, "module", model)
