"""Sampling for character generation: ONE definition of the parameters and ONE sampler.

``SamplingParams`` is the single place where the sampling settings and their ranges are defined. The HTTP schema
(``GenerateRequest`` extends it), the generation scheduler, ``rnnlab generate`` / ``CharLMPredictor`` and the
training loop's sample table all take it, so a value refused in one place is refused everywhere, with the same
words. ``sample_rows`` is the one sampler all of them call, with the settings as tensors (``per_row_params``:
once per request, or per batch change in the scheduler), so the same seed gives the same text everywhere;
``sample_next`` is the same sampler for settings given as plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from rnnlab.errors import InputError

MAX_NEW_TOKENS = 2_000
MAX_TEMPERATURE = 5.0
MAX_SEED = 2**63  # seeds are 0 <= seed < MAX_SEED
# top_k only has to fit the sampler's integers: any value at or above the model's vocabulary keeps every character
MAX_TOP_K = 100_000

PerRow = Union[float, int, None, Sequence[Union[float, int, None]], torch.Tensor]


class SamplingParams(BaseModel):
    """How to sample a continuation. Every field has a checked range; ``extra="forbid"`` makes a misspelt field
    (``max_tokens``) an error naming it instead of a silently ignored option."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict types: true / "5" / 5.5 are refused rather than read as 1 / 5 / 5 (an integer is a valid float)
    max_new_tokens: StrictInt = Field(200, ge=1, le=MAX_NEW_TOKENS, description="Characters to generate.")
    temperature: StrictFloat = Field(
        1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 means greedy decoding."
    )
    top_k: StrictInt | None = Field(
        None, ge=1, le=MAX_TOP_K,
        description="Sample from the k most likely characters only; k at or above the vocabulary keeps them all.",
    )
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling threshold.")
    seed: StrictInt | None = Field(
        None, ge=0, lt=MAX_SEED, description="Same request and seed give the same text; chosen and returned if absent."
    )

    def with_seed(self) -> SamplingParams:
        """These parameters with a seed: the given one, or a fresh random one (returned to the user, so any text
        can be reproduced)."""
        if self.seed is not None:
            return self
        import secrets

        return self.model_copy(update={"seed": secrets.randbits(63)})


def sampling_params(**values: Any) -> SamplingParams:
    """``SamplingParams(**values)`` with a violation as an InputError of one sentence naming the field (what the CLI
    prints and the Python API raises)."""
    try:
        return SamplingParams(**values)
    except ValidationError as error:
        raise InputError(describe_error(error)) from None


def describe_error(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "sampling"
    got = first.get("input")
    shown = f", got {got!r}" if not isinstance(got, dict) else ""
    return f"{field}: {first['msg'][0].lower()}{first['msg'][1:]}{shown}."


class NonFiniteScores(RuntimeError):
    """The model produced NaN or +inf scores for some rows (a model fault, not bad input); ``rows`` names them, so
    a batch can fail exactly those sequences and go on with the others."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"the model produced non-finite scores for row(s) {rows}")
        self.rows = rows


class RowSampling(NamedTuple):
    """Per-row sampling settings of a batch as tensors, with what every step would otherwise recompute from them
    (the divisor, whether any row is greedy or filtered): built once per batch change (``per_row_params``), not once
    per step -- at a fraction of a millisecond per step on a CPU, each small tensor operation counts."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    divisor: torch.Tensor  # [B, 1] the scores' divisor: the temperature, 1 for greedy rows
    greedy: torch.Tensor | None  # [B] bool, None when no row is greedy
    smallest_top_k: int  # the smallest top-k any row asks (0: none asks)
    nucleus: bool  # some row has top-p below 1

    @classmethod
    def of(cls, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> RowSampling:
        greedy = temperature <= 0
        asked = top_k[top_k > 0]
        return cls(temperature, top_k, top_p, torch.where(greedy, 1.0, temperature).unsqueeze(1),
                   greedy if bool(greedy.any()) else None, int(asked.min()) if asked.numel() else 0,
                   bool((top_p < 1).any()))

    def filters(self, vocab: int) -> bool:
        """Whether some row drops tokens (top-k below the vocabulary, or top-p): only then is sorting needed."""
        return self.nucleus or 0 < self.smallest_top_k < vocab

    def own_rows(self, vocab: int) -> torch.Tensor | None:
        """The rows ``sample_plain`` does not serve -- greedy ones and those that filter (top-k below the
        vocabulary, top-p below 1) -- by each row's own settings; None when there are none (then no tensor work)."""
        if self.greedy is None and not self.filters(vocab):
            return None
        own = (self.temperature <= 0) | ((self.top_k > 0) & (self.top_k < vocab)) | (self.top_p < 1)
        return own.nonzero().flatten()

    def rows(self, index: torch.Tensor) -> RowSampling:
        """The settings of the rows at ``index``, in that order."""
        return RowSampling.of(*(t.index_select(0, index) for t in (self.temperature, self.top_k, self.top_p)))


def sample_next(
    logits: torch.Tensor,
    temperature: PerRow = 1.0,
    top_k: PerRow = None,
    top_p: PerRow = None,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    *,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one token id per row of ``logits[B, V]``; returns LongTensor[B] on the logits' device.

    Each parameter is one value for every row or one per row (list or tensor; None entries mean "off"):
    ``temperature`` 0 = greedy (argmax); ``top_k`` None/0 = off, values above V are V (keep everything);
    ``top_p`` None/1.0 = off (nucleus: keep the most likely tokens until their mass reaches top_p; the top token
    always stays). Ranges are checked by ``SamplingParams``, not here (this runs once per decoding step).

    Randomness: exactly one uniform draw per row per call, inverse-CDF over the vocabulary in its own order with
    the filtered-out tokens' probability set to 0 (sorting is needed only to find them, so batches without top-k
    or top-p skip it; either way a row's token depends only on its own scores, settings and draw).
    ``uniforms[B]`` gives the draws directly; else with a list of generators (CPU ``torch.Generator``s) row i draws
    from ``generator[i]`` only, so a sequence's tokens depend on its own seed and never on what else shares the
    batch; one generator draws B numbers in row order; None uses torch's global RNG. ``torch.rand(n, generator=g)``
    gives the same numbers as n calls of ``torch.rand(1, generator=g)``, so a caller may draw a sequence's uniforms
    ahead in one call and get the same text.

    Raises NonFiniteScores naming the rows whose logits hold NaN or +inf (they cannot be sampled).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    device = logits.device
    settings = RowSampling.of(_per_row(temperature, rows, default=1.0, dtype=torch.float32, device=device),
                              _per_row(top_k, rows, default=0, dtype=torch.long, device=device),
                              _per_row(top_p, rows, default=1.0, dtype=torch.float32, device=device))
    if uniforms is None:
        uniforms = _uniforms(rows, generator)
    return sample_rows(logits, settings, uniforms.to(device=device, dtype=torch.float32))


def sample_rows(logits: torch.Tensor, settings: RowSampling, uniforms: torch.Tensor) -> torch.Tensor:
    """``sample_next`` for settings already in tensors (``per_row_params``) and draws ``uniforms[B]`` (float32, on
    the logits' device): what the generation scheduler calls at every step, and what ``sample_next`` calls."""
    vocab = logits.shape[1]
    scores = logits.float()
    probs = (scores / settings.divisor).softmax(dim=-1)
    if settings.filters(vocab):
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab, device=probs.device).unsqueeze(0)
        drop = ranks >= torch.where(settings.top_k > 0, settings.top_k, vocab).unsqueeze(1)
        drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= settings.top_p.unsqueeze(1)  # mass before: top_p
        drop[:, 0] = False  # the most likely token always stays
        probs = probs.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), 0.0)
    choice, total = inverse_cdf(probs, uniforms)
    if not bool(torch.isfinite(total).all()):  # NaN or +inf anywhere in a row's scores makes its softmax NaN
        raise NonFiniteScores((~torch.isfinite(total)).nonzero().flatten().tolist())
    return choice if settings.greedy is None else torch.where(settings.greedy, scores.argmax(dim=-1), choice)


def sample_plain(logits: torch.Tensor, divisor: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``sample_rows`` for rows sampled by their temperature alone (``divisor[B, 1]``; no top-k, top-p or greedy):
    (ids[B], each row's probability total[B], NaN or inf where its scores were not finite). The charlm graph
    carries this function (rnnlab/export.py traces it), so that under ONNX Runtime a decoding step and its
    sampling are one call; the rows it does not serve are sampled again by ``sample_rows``
    (``RowSampling.own_rows``)."""
    return inverse_cdf((logits.float() / divisor).softmax(dim=-1), uniforms)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's token: the first whose cumulative probability passes ``uniforms[i]`` times the row's total, counted
    as the CDF values at or below it (``torch.searchsorted(right=True)`` in ops that every ONNX runtime has).
    Returns (ids[B], totals[B])."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    choice = (cdf <= (uniforms * total).unsqueeze(1)).sum(dim=-1).clamp(max=probs.shape[1] - 1)
    return choice, total


MAX_LOGPROBS = 5  # alternatives per character a request may ask for (OpenAI's limit for completions)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_n: int) -> tuple[torch.Tensor, ...]:
    """For ``logits[B, V]`` and the ids ``chosen[B]`` sampled from them: the chosen ids' log-probabilities [B] and
    the ``top_n`` most likely ids with theirs ([B, top_n] values and ids, most likely first; [B, 0] for 0).

    The distribution is the model's own (log-softmax of its scores), before temperature, top-k and top-p reshape
    it for sampling: what OpenAI's and vLLM's ``logprobs`` report, and the same whatever sampling settings a
    request uses. Called only for rows that ask, so a request without ``logprobs`` pays nothing."""
    logp = logits.float().log_softmax(dim=-1)
    chosen_lp = logp.gather(1, chosen.view(-1, 1).to(logp.device)).squeeze(1)
    values, ids = logp.topk(min(int(top_n), logp.shape[1]), dim=-1)
    return chosen_lp, values, ids


def draws(params: SamplingParams) -> torch.Tensor:
    """A sequence's uniform draws from its seed, one per character to generate (float32, on the CPU): what
    ``sample_rows`` takes at each step. Every decoder -- the scheduler, ``rnnlab generate``, training's samples --
    draws them here, so a seed gives the same text everywhere (one call gives the same numbers as one draw per
    step)."""
    return torch.rand(params.max_new_tokens, generator=torch.Generator(device="cpu").manual_seed(params.seed))


def per_row_params(params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> RowSampling:
    """A batch of sequences' settings for ``sample_rows``, built once per batch change rather than once per
    step."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k or 0 for p in params], dtype=torch.long, device=device)
    top_p = torch.tensor([1.0 if p.top_p is None else p.top_p for p in params], dtype=torch.float32, device=device)
    return RowSampling.of(temperature, top_k, top_p)


def _per_row(value: PerRow, rows: int, *, default: float, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        out = value.to(device=device, dtype=dtype).reshape(-1)
        return out.expand(rows) if out.numel() == 1 else out
    if value is None or isinstance(value, (int, float)):
        return torch.full((rows,), default if value is None else value, dtype=dtype, device=device)
    values = [default if v is None else v for v in value]
    if len(values) != rows:
        raise ValueError(f"got {len(values)} per-row values for {rows} rows")
    return torch.tensor(values, dtype=dtype, device=device)


def _uniforms(rows: int, generator) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(rows, generator=generator)
    if len(generator) != rows:
        raise ValueError(f"got {len(generator)} generators for {rows} rows")
    return torch.cat([torch.rand(1, generator=g) for g in generator])
