"""The charlm job: truncated BPTT over contiguous rows (hidden state carried, detached), or the chapter's random
chunks; cross-entropy per character, reported as nats, bits per character and perplexity."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from rnnlab.config import (
    DataSettings, JobConfig, NonNegativeNumber, Number, PositiveInt, TrackingSettings, TrainSettings, model_section,
)  # fmt: skip
from rnnlab.errors import ConfigError
from rnnlab.models.charlm import CharConfig
from rnnlab.trainers.job import Batch, EvalResult, Job, gather

log = logging.getLogger(__name__)


class CharData(DataSettings):  # the limits count characters
    lowercase: bool = True
    fractions: Annotated[list[Annotated[NonNegativeNumber, Field(le=1)]], Field(min_length=3, max_length=3)] = [
        0.9, 0.05, 0.05]  # train / val / test shares of the text, in order
    seq_len: PositiveInt = 40
    sampler: Literal["tbptt", "random_chunks"] = "tbptt"  # tbptt: contiguous rows, carried state


class CharTrain(TrainSettings):
    batch_size: PositiveInt = 64


class CharTracking(TrackingSettings):
    # the samples the run logs at its end; their ranges are SamplingParams' (rnnlab/sampling.py), checked below
    sample_prompt: str = "the emperor"
    sample_length: int = 200
    sample_temperature: Number = 0.8

    def sample_params(self, seed: int):
        """The sample_* settings as SamplingParams (ConfigError naming the keys if one is out of range)."""
        from rnnlab.errors import InputError
        from rnnlab.sampling import sampling_params

        try:
            return sampling_params(max_new_tokens=self.sample_length, temperature=self.sample_temperature, seed=seed)
        except InputError as error:
            raise ConfigError(f"tracking.sample_length / sample_temperature: {error}") from None

    @model_validator(mode="after")
    def _samplable(self) -> CharTracking:
        try:
            self.sample_params(0)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return self


CharModel = model_section(CharConfig)


class CharJobConfig(JobConfig):
    job: Literal["charlm"] = "charlm"
    data: CharData = Field(default_factory=CharData)
    model: CharModel = Field(default_factory=CharModel)
    train: CharTrain = Field(default_factory=CharTrain)
    tracking: CharTracking = Field(default_factory=CharTracking)


class CharLMJob(Job):
    Config = CharJobConfig

    def load_data(self) -> None:
        from rnnlab.data import text

        d = self.config.data
        data = text.load_text_data(self.source_path(), lowercase=d.lowercase, fractions=d.fractions)
        self.vocab = data.vocab
        self.streams = {}
        for split in ("train", "val", "test"):
            stream = getattr(data, split)
            limit = getattr(d, f"limit_{split}")
            if limit and limit < len(stream):  # a contiguous prefix: the text's order is the data
                log.info("data.limit_%s=%d: using the first %d of %d characters", split, limit, limit, len(stream))
                stream = stream[:limit]
            self.streams[split] = np.ascontiguousarray(stream, dtype=np.int64)
        self._text = text
        self.seq_len = d.seq_len
        self.sampler = d.sampler
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of the number of processes "
                f"({self.world_size}) for charlm."
            )
        self.batcher = text.TBPTTBatcher(self.streams["train"], self.batch_size, self.seq_len,
                                         rank=self.rank, world_size=self.world_size)
        self.carry: tuple[torch.Tensor, ...] | None = None

    def steps_per_epoch(self) -> int:
        # random_chunks: an "epoch" is as many random batches as one contiguous pass has windows
        return len(self.batcher)

    def start_epoch(self, epoch: int, start: int) -> None:
        if start == 0:
            self.carry = None  # each epoch starts every row from a zero state

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        local = self.batch_size // self.world_size
        rows = slice(self.rank * local, (self.rank + 1) * local)
        for k in range(start, self.steps_per_epoch()):
            if self.sampler == "tbptt":
                x, y = self.batcher.window(k)
            else:
                # Stateless per batch: the generator is seeded by (seed, epoch, k), so resuming needs no RNG state.
                generator = torch.Generator().manual_seed(hash_seed(self.seed, epoch, k))
                x, y = self._text.random_chunks(self.streams["train"], self.batch_size, self.seq_len,
                                                generator=generator)
                x, y = x[rows], y[rows]
            yield Batch(inputs=(x.to(self.device),), targets=y.to(self.device),
                        global_units=self.batch_size * x.shape[1], samples=x.shape[0], tokens=x.numel())

    def data_model_config(self) -> dict:
        return {"vocab_size": len(self.vocab)}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        state = self.carry if self.sampler == "tbptt" else None
        logits, new_state = model(*batch.inputs, state)
        if self.sampler == "tbptt":
            # Truncated BPTT: the next window starts from this state, but gradients stop here.
            self.carry = tuple(t.detach() for t in new_state)  # (h, c) or (h,): whatever the cell
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.targets.reshape(-1),
                               reduction="sum")

    @torch.no_grad()
    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        # Contiguous rows, state carried, every character scored once (drop_last=False).
        stream = self.streams[split]
        rows = max(self.world_size, (min(self.eval_batch_size, max(1, (len(stream) - 1) // self.seq_len))
                                     // self.world_size) * self.world_size)
        batcher = self._text.TBPTTBatcher(stream, rows, self.seq_len, rank=self.rank,
                                          world_size=self.world_size, drop_last=False)
        state = None
        total, count = 0.0, 0
        for x, y in batcher:
            with accelerator.autocast():
                logits, state = model(x.to(self.device), state)
            total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                           y.to(self.device).reshape(-1), reduction="sum"))
            count += y.numel()
        pieces = gather(accelerator, (total, count))
        nats = sum(p[0] for p in pieces) / max(1, sum(p[1] for p in pieces))
        return EvalResult({"loss": nats, "bpc": nats / math.log(2), "perplexity": math.exp(nats)})

    def assets(self) -> dict[str, dict]:
        return {"vocab": self.vocab.to_json()}

    def sample(self, model, prompt: str, params) -> str:
        """A sample for the run's table, drawn as ``rnnlab generate`` draws (the same SamplingParams and sampler),
        from the params' own seed (never the global RNG: resume stays exact)."""
        from rnnlab.sampling import sample_next

        prompt = prompt.lower() if self.config.data.lowercase else prompt
        known = "".join(ch for ch in prompt if ch in self.vocab.stoi) or self.vocab.itos[0]
        device = next(model.parameters()).device
        ids = torch.tensor([self.vocab.stoi[ch] for ch in known], device=device).unsqueeze(0)
        uniforms = torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(params.seed))
        with torch.no_grad():
            logits, state = model(ids, None)
            logits = logits[:, -1]
            out = []
            for step in range(params.max_new_tokens):
                nxt = sample_next(logits, params.temperature, params.top_k, params.top_p,
                                  uniforms=uniforms[step : step + 1])
                out.append(int(nxt))
                logits, state = model.step(nxt, state)
        return known + "".join(self.vocab.decode(out))

    def report(self, model, val: dict, test: EvalResult, output_dir, tracker) -> dict:
        t = self.config.tracking
        samples = [self.sample(model, t.sample_prompt, t.sample_params(seed)) for seed in range(3)]
        (output_dir / "samples.txt").write_text("\n\n---\n\n".join(samples) + "\n", encoding="utf-8")
        if tracker is not None:
            import wandb

            table = wandb.Table(columns=["seed", "prompt", "temperature", "text"])
            for seed, sample in enumerate(samples):
                table.add_data(seed, t.sample_prompt, t.sample_temperature, sample)
            tracker.log({"samples": table})
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.carry is None:
            return {}
        # carry_h, and carry_c for an LSTM
        return {f"carry_{kind}": t.detach().cpu().contiguous() for kind, t in zip("hc", self.carry)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.carry = tuple(state[f"carry_{kind}"].to(self.device) for kind in "hc" if f"carry_{kind}" in state) or None


def hash_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (Python's hash() of ints is not mixed enough)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)
