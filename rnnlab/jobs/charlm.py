"""The charlm job: truncated BPTT over contiguous rows (hidden state carried, detached), or the chapter's random
chunks; cross-entropy per character, reported as nats, bits per character and perplexity. Its predictor (a prompt
-> its continuation), the service's request and answer (POST /v1/charlm, alias /v1/generate, answered by the
generation deployment), the scorer of any text (``rnnlab evaluate --data``) and the ``rnnlab generate`` verb."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rnnlab.config import (
    DataSettings, JobConfig, NonNegativeNumber, Number, PositiveInt, TrackingSettings, TrainSettings, model_section,
)  # fmt: skip
from rnnlab.bundle import Bundle
from rnnlab.errors import ConfigError, DataError, InputError, RnnlabError
from rnnlab.inference import device_of, expect_job
from rnnlab.models.cells import detach_state
from rnnlab.models.charlm import CharConfig
from rnnlab.runtime import GraphSpec
from rnnlab.sampling import NonFiniteScores, SamplingParams, draws, per_row_params, sample_rows, sampling_params
from rnnlab.trainers.evaluate import score_with_job
from rnnlab.trainers.job import Batch, EvalResult, Job, gather

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2_000
SHOWN_UNKNOWN = 10  # characters outside the vocabulary listed by name by the scorer, most frequent first


class CharLMDataSettings(DataSettings):  # the limits count characters
    lowercase: bool = True
    fractions: Annotated[list[Annotated[NonNegativeNumber, Field(le=1)]], Field(min_length=3, max_length=3)] = [
        0.9, 0.05, 0.05]  # train / val / test shares of the text, in order
    seq_len: PositiveInt = 40
    sampler: Literal["tbptt", "random_chunks"] = "tbptt"  # tbptt: contiguous rows, carried state


class CharLMTrainSettings(TrainSettings):
    batch_size: PositiveInt = 64


class CharLMTrackingSettings(TrackingSettings):
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
    def _samplable(self) -> CharLMTrackingSettings:
        try:
            self.sample_params(0)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return self


CharLMModelSettings = model_section(CharConfig)


class CharLMJobConfig(JobConfig):
    job: Literal["charlm"] = "charlm"
    data: CharLMDataSettings = Field(default_factory=CharLMDataSettings)
    model: CharLMModelSettings = Field(default_factory=CharLMModelSettings)
    train: CharLMTrainSettings = Field(default_factory=CharLMTrainSettings)
    tracking: CharLMTrackingSettings = Field(default_factory=CharLMTrackingSettings)


class CharLMJob(Job):
    Config = CharLMJobConfig

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

    def load_data_to_score(self, path, assets: dict) -> dict:
        from rnnlab.data import text
        from rnnlab.data.vocab import Vocab

        self.vocab, self._text, self.seq_len = Vocab.from_json(assets["vocab"]), text, self.config.data.seq_len
        content = text.read_text(path, lowercase=self.config.data.lowercase)
        ids, skipped = text.encode_known(content, self.vocab)
        if len(ids) < 2:
            raise DataError(
                f"{path} has {len(ids)} character(s) the model knows; scoring needs at least 2 (one to predict from)."
            )
        self.streams = {"test": ids}
        return {"characters": len(content), "out_of_vocabulary": {
            "policy": "skipped: left out of the text before scoring",
            "characters": sum(skipped.values()),
            "most_frequent": {char: count for char, count in skipped.most_common(SHOWN_UNKNOWN)},
            "distinct": len(skipped),
        }}

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
            self.carry = detach_state(new_state)  # (h, c) or (h,): whatever the cell
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
        prompt = prompt.lower() if self.config.data.lowercase else prompt
        known = "".join(ch for ch in prompt if ch in self.vocab.stoi) or self.vocab.itos[0]
        device = next(model.parameters()).device
        ids = torch.tensor([self.vocab.stoi[ch] for ch in known], device=device).unsqueeze(0)
        uniforms = draws(params).to(device)
        settings = per_row_params([params], device)
        with torch.no_grad():
            logits, state = model(ids, None)
            logits = logits[:, -1]
            out = []
            for step in range(params.max_new_tokens):
                nxt = sample_rows(logits, settings, uniforms[step : step + 1])
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


# ------------------------------------------------------------------------------------------------ predictor


class CharLMPredictor:
    """Continue a prompt with a character model, one character per step.

    The prompt is lowercased when the model was trained on lowercased text; characters outside the vocabulary
    are an InputError naming them. ``generate`` returns the continuation only (not the prompt); ``stream``
    yields it character by character. The same prompt, parameters and seed give the same text (here and in the
    service, which decodes the same way: prompt minus its last character through ``forward``, then one
    ``step`` per character, each sampled with one draw from the request's own generator).
    """

    def __init__(self, bundle: Bundle) -> None:
        from rnnlab.data.vocab import Vocab

        expect_job(bundle, "charlm")
        self.model = bundle.model.eval()
        self.vocab = Vocab.from_json(bundle.assets["vocab"])
        self.lowercase = bool(bundle.config.get("data", {}).get("lowercase", True))
        self.device = device_of(self.model)

    def encode_prompt(self, prompt: Any) -> list[int]:
        """Validated prompt -> character ids (what the model reads)."""
        from rnnlab.data.text import encode_text

        if not isinstance(prompt, str):
            raise InputError(f"The prompt must be a string, got {type(prompt).__name__}.")
        if not prompt:
            raise InputError("The prompt is empty; send at least one character to continue.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(
                f"The prompt has {len(prompt):,} characters, more than the limit of {MAX_PROMPT_CHARS:,}; shorten it."
            )
        text = prompt.lower() if self.lowercase else prompt
        try:
            return encode_text(text, self.vocab).tolist()
        except InputError as error:
            raise InputError(str(error).replace("The text", "The prompt", 1)) from None

    def validate_prompt(self, prompt: Any) -> None:
        self.encode_prompt(prompt)

    def validate_sampling(self, **values: Any) -> SamplingParams:
        """The checked ``SamplingParams`` (InputError of one sentence naming the first field out of range)."""
        return sampling_params(**values)

    def generate(self, prompt: str, **sampling: Any) -> str:
        """The continuation of ``prompt``; ``sampling`` are the ``SamplingParams`` fields (max_new_tokens=200,
        temperature=1.0, top_k, top_p, seed). Deterministic for a given seed."""
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Like ``generate`` but yields each character as soon as it is sampled. Input is checked up front,
        before the first character."""
        ids = self.encode_prompt(prompt)
        params = self.validate_sampling(**sampling).with_seed()
        return self._decode(ids, params)

    def _decode(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        # the whole request's draws up front, as the service draws them; the settings as tensors once, not once
        # per character
        uniforms, settings = draws(params).to(self.device), per_row_params([params], self.device)
        *context, next_id = ids
        with torch.inference_mode():
            if context:
                _, state = self.model(torch.tensor([context], device=self.device))
            else:
                state = self.model.init_state(1, self.device)
        for step in range(params.max_new_tokens):
            with torch.inference_mode():
                try:
                    ids, state, _ = self.model.decode(torch.tensor([next_id], device=self.device), state, settings,
                                                      uniforms[step : step + 1])
                    next_id = int(ids[0])
                except NonFiniteScores:
                    raise RnnlabError(
                        f"The model produced NaN or infinite scores after {step} characters; the bundle's weights "
                        "are broken, retrain or re-export it."
                    ) from None
            yield self.vocab.itos[next_id]


# ------------------------------------------------------------------------------------------------ ONNX graph

# text the parity check reads (the characters the bundle's vocabulary knows)
GRAPH_TEXT = "the emperor spoke to the prince. the prince said nothing, and the army marched on."
INT8_MAX_RELATIVE = 0.01  # int8's validation nats/char may differ from fp32's by 1 % (relative)


def graph_examples(bundle: Bundle) -> list[tuple]:
    """Prompts of real text (batch 1 and 3, from the zero state), then decoding steps (batch 3 and 1) from the
    state they left: what ``rnnlab generate`` and the scheduler run."""
    from rnnlab.data.text import encode_known
    from rnnlab.data.vocab import Vocab

    vocab = Vocab.from_json(bundle.assets["vocab"])
    ids = torch.from_numpy(encode_known(GRAPH_TEXT, vocab)[0])
    ids = ids if len(ids) >= 12 else torch.arange(12) % len(vocab)
    prompts = torch.stack([ids[:12].roll(shift) for shift in range(3)])
    with torch.no_grad():
        _, state = bundle.model(prompts)
    return [(prompts[:1], None), (prompts, None), (prompts[:, -1:], state),
            (prompts[:1, -1:], tuple(t[:, :1] for t in state))]


def int8_gate(fp32: EvalResult, int8: EvalResult) -> tuple[dict, str | None]:
    """int8 is kept when its validation nats/char are within 1 % (relative) of the fp32 graph's."""
    before, after = fp32.metrics["loss"], int8.metrics["loss"]
    change = (after - before) / before
    figures = {"val_nats_per_char_fp32": before, "val_nats_per_char_int8": after, "relative_change": change}
    if abs(change) > INT8_MAX_RELATIVE:
        return figures, (f"validation nats/char {after:.4f} int8 vs {before:.4f} fp32 differ by {change:+.2%}, more "
                         f"than {INT8_MAX_RELATIVE:.0%}")
    return figures, None


# ids [B, T] and the state in, logits [B, T, V] and the new state out: T = 1 is a decoding step, T > 1 a prompt;
# and the id sampled from the last step's scores (a step and its sampling in one call)
GRAPH = GraphSpec(inputs=("ids",), outputs=("logits",), stateful=True, examples=graph_examples, int8_gate=int8_gate,
                  dynamic_axes={"ids": {0: "batch", 1: "steps"}, "logits": {0: "batch", 1: "steps"}}, sampler=True)

# ------------------------------------------------------------------------------------------------ service


class CharLMRequest(SamplingParams):
    """The prompt and whether to stream, plus the sampling fields of ``rnnlab.sampling.SamplingParams`` (the one
    definition of their ranges, shared with the CLI, the scheduler and training's samples)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["the emperor"])
    stream: bool = Field(False, description="Send characters as they are produced (server-sent events).")

    def sampling(self) -> SamplingParams:
        return SamplingParams(**self.model_dump(include=set(SamplingParams.model_fields)))


class CharLMResponse(BaseModel):
    model: str
    text: str = Field(description="The generated continuation (without the prompt).")
    seed: int
    tokens: int


# ------------------------------------------------------------------------------------------------ scorer


def score(bundle: Bundle, path: str | Path) -> dict[str, Any]:
    """Any UTF-8 text file -> the test figures of training on it: nats (``loss``) and bits per character,
    perplexity. Characters outside the bundle's vocabulary are SKIPPED (left out of the text before scoring),
    counted and named in the result; the text is lowercased first when the model was trained lowercased."""
    return score_with_job(bundle, path)


# ------------------------------------------------------------------------------------------------ CLI verb and demo

# SamplingParams field -> the flag that sets it, so an error names what the user typed
_SAMPLING_FLAGS = {"max_new_tokens": "--length", "temperature": "--temperature", "top_k": "--top-k",
                   "top_p": "--top-p", "seed": "--seed"}


class CLI:
    """``rnnlab generate BUNDLE --prompt TEXT``: the prompt and its continuation, printed as it is sampled."""

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--prompt", default="the emperor", help="text to continue (default: %(default)r)")
        parser.add_argument("--length", type=int, default=500, help="characters to generate (default: %(default)s)")
        parser.add_argument("--temperature", type=float, default=1.0)
        parser.add_argument("--top-k", type=int, default=None)
        parser.add_argument("--top-p", type=float, default=None)
        parser.add_argument("--seed", type=int, default=None, help="same seed, same text")

    @staticmethod
    def run(args, load_predictor) -> int:
        try:  # the one definition of the ranges (the service's schema uses it too), checked before the bundle loads
            params = sampling_params(max_new_tokens=args.length, temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, seed=args.seed)
        except InputError as error:
            field, _, rest = str(error).partition(":")
            raise InputError(f"{_SAMPLING_FLAGS.get(field, field)}:{rest}") from None
        predictor = load_predictor()
        # stream() checks the prompt before it returns, so a bad one is refused before anything is printed; then
        # the characters come as they are sampled, so a long --length shows progress.
        characters = predictor.stream(args.prompt, **params.model_dump())
        print(args.prompt, end="", flush=True)
        for char in characters:
            print(char, end="", flush=True)
        print()
        return 0


def demo(post) -> None:
    """``make demo``: 200 characters after "the emperor" through ``post(body)`` (POST /v1/charlm), at temperature 0.5
    (a small model sampled at 1.0 spells badly), and the share of its words that are words of War and Peace."""
    import re

    from rnnlab.data.sources import locate
    from rnnlab.data.text import read_text

    text = "the emperor" + post({"prompt": "the emperor", "max_new_tokens": 200, "temperature": 0.5, "seed": 1})["text"]
    print("  " + text.replace("\n", "\n  "))
    book = set(re.findall(r"[a-z]+", read_text(locate("text")).lower()))
    print(f"  {share_of_known_words(text, book):.0%} of its {len(re.findall(r'[a-z]+', text.lower()))} words are "
          "words of War and Peace")


def share_of_known_words(text: str, vocabulary: set[str]) -> float:
    """The fraction of the words of ``text`` (lowercase runs of letters) in ``vocabulary`` (0.0 for none)."""
    import re

    words = re.findall(r"[a-z]+", text.lower())
    return sum(word in vocabulary for word in words) / len(words) if words else 0.0
