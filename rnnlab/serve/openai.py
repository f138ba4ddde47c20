"""OpenAI-compatible completions for the character models: the request schema, the answer and stream shapes,
OpenAI's error and model-list shapes, stop strings and logprobs (no Ray and no model here:
``rnnlab.serve.completions`` runs requests with them).

``POST /v1/completions`` takes OpenAI's legacy completions request, so the official ``openai`` client, UIs and load
tools work against ``rnnlab serve`` unchanged (``base_url=http://host:port/v1``). A **token is a character** here:
``max_tokens`` (default 16, as OpenAI's), ``usage`` and ``logprobs`` all count characters. Supported: ``model``,
``prompt`` (a string, or a list of strings, each its own choices), ``max_tokens``, ``temperature``, ``top_p``,
``top_k`` (the extra field clients send in ``extra_body``; -1 or 0 mean off), ``n``, ``stop`` (up to 4 strings),
``seed``, ``logprobs`` (0 to 5), ``echo``, ``stream``, ``stream_options.include_usage`` and ``user`` (ignored).
Refused with a 400 naming the field: ``suffix``, ``logit_bias``, ``best_of`` other than ``n``, presence and
frequency penalties other than 0, token-id prompts, and any field OpenAI's API does not have.

Sampling is ``rnnlab.sampling``'s, with the same ranges: choice k of a prompt samples with ``seed + k``, so choice
0 is the text ``rnnlab generate --seed S`` and ``/v1/charlm`` give for that seed. Each choice carries its seed.
``logprobs`` are the model's own log-probabilities (before temperature, top-k and top-p), in the legacy shape:
``tokens``, ``token_logprobs``, ``top_logprobs`` (the N most likely characters and the chosen one) and
``text_offset``. A stop string ends the text before it (``finish_reason: "stop"``, else ``"length"``); a stream
holds back text that could be the start of a stop string until it is known not to be.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator,
                      model_validator)

from rnnlab.sampling import MAX_LOGPROBS, MAX_NEW_TOKENS, MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K, SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default; a token is a character
MAX_STOP = 4
MAX_STOP_CHARS = 100
MAX_N = 16
MAX_PROMPTS = 64
MAX_CHOICES = 64  # prompts x n
LOGPROB_FLOOR = -9999.0  # what a character the model rules out (-inf) is reported as: JSON has no infinity
_NOT_SUPPORTED = "not supported by rnnlab's character models"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """OpenAI's legacy ``/v1/completions`` request (see the module docstring for what is supported)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="A served model id (GET /v1/models).")
    prompt: Union[str, list[str]] = Field(
        description=f"Text to continue, or a list of up to {MAX_PROMPTS} texts (each gets its own n choices).")
    max_tokens: StrictInt | None = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_NEW_TOKENS,
                                         description="Characters to generate per choice (a token is a character).")
    temperature: StrictFloat | None = Field(None, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=-1, le=MAX_TOP_K, description="-1 or 0: off (extra_body).")
    n: StrictInt | None = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = Field(None, description=f"Up to {MAX_STOP} strings that end a choice.")
    seed: StrictInt | None = Field(None, ge=0, lt=MAX_SEED)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool | None = False
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    # OpenAI fields with no meaning here: accepted only at their neutral values, else a 400 naming them
    best_of: StrictInt | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    suffix: str | None = None
    logit_bias: dict | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("the prompt list is empty; send at least one prompt")
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
            if any(isinstance(item, (int, list)) for item in value):
                raise ValueError(f"token-id prompts are {_NOT_SUPPORTED} (a token is a character); send text")
            wrong = next((i for i, item in enumerate(value) if not isinstance(item, str)), None)
            if wrong is not None:
                raise ValueError(f"prompt {wrong} is not a string; send a list of strings")
        texts = value if isinstance(value, list) else [value]
        for position, text in enumerate(texts):
            where = f"prompt {position}" if isinstance(value, list) else "the prompt"
            if isinstance(text, str) and not text:  # the model's predictor checks the rest (length, characters)
                raise ValueError(f"{where} is empty; send at least one character to continue")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        stops = value if isinstance(value, list) else [value] if value is not None else []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(isinstance(s, str) and not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return value

    @field_validator("suffix", "logit_bias")
    @classmethod
    def _refused(cls, value: Any, info) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is {_NOT_SUPPORTED}; leave it out")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None, info) -> float | None:
        if value:
            raise ValueError(f"{info.field_name} is {_NOT_SUPPORTED}; leave it out or send 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        n = self.n or 1
        if self.best_of is not None and self.best_of != n:
            raise _field_error("best_of", f"best_of other than n is {_NOT_SUPPORTED} (it needs ranking by "
                               "probability); leave it out")
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "stream_options is only allowed when stream is true")
        if len(self.prompts) * n > MAX_CHOICES:
            raise _field_error("n", f"prompts x n must be at most {MAX_CHOICES}, got {len(self.prompts)} x {n}")
        return self

    @property
    def prompts(self) -> list[str]:
        return self.prompt if isinstance(self.prompt, list) else [self.prompt]

    @property
    def stops(self) -> list[str]:
        return self.stop if isinstance(self.stop, list) else [self.stop] if self.stop else []

    def sampling(self, sample: int = 0) -> SamplingParams:
        """The sampling parameters of a prompt's choice ``sample``: seed + sample (a fresh seed without one)."""
        return SamplingParams(
            max_new_tokens=self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_k=self.top_k if self.top_k and self.top_k > 0 else None,
            top_p=self.top_p if self.top_p is not None and self.top_p < 1 else None,
            seed=None if self.seed is None else (self.seed + sample) % MAX_SEED,
        ).with_seed()


class _FieldError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _field_error(param: str, message: str) -> ValueError:
    return _FieldError(param, message)


# --- errors in OpenAI's shape ------------------------------------------------------------------------------------
class OpenAIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
             504: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(math.ceil(max(0.0, self.retry_after)))} if self.retry_after is not None else {}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers())


def from_detail(status: int, item: dict) -> dict:
    """OpenAI's ``{"error": ...}`` for one of rnnlab's error items (``loc``, ``msg``, ``type``)."""
    loc = [str(part) for part in item.get("loc", [])]
    return OpenAIError(status, item["msg"], param=loc[-1] if loc else None, code=item.get("type")).body()


def request_error(error: ValidationError) -> OpenAIError:
    """A 400 naming the first field at fault (``param``), in words a user can act on."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    cause = (first.get("ctx") or {}).get("error")
    if first["type"] == "extra_forbidden":
        name = ".".join(loc)
        takes = ", ".join(_SUPPORTED) if len(loc) == 1 else ", ".join(StreamOptions.model_fields)
        where = "/v1/completions" if len(loc) == 1 else loc[0]
        message = f"Unrecognized request argument supplied: {name}. rnnlab's {where} takes {takes}."
        return OpenAIError(400, message, param=name, code="unsupported_parameter")
    if isinstance(cause, _FieldError):
        code = "unsupported_parameter" if _NOT_SUPPORTED in str(cause) else "invalid_value"
        return OpenAIError(400, f"{cause}.", param=cause.param, code=code)
    param = loc[0] if loc else None
    loc = [part for part in loc[:1] + [p for p in loc[1:] if p.isdigit()]]  # not union tags such as "list[str]"
    words = str(cause) if cause is not None else first["msg"][0].lower() + first["msg"][1:]
    got = first.get("input")
    shown = f", got {got!r}" if cause is None and not isinstance(got, (dict, list)) and loc else ""
    code = "unsupported_parameter" if _NOT_SUPPORTED in words else "invalid_value"
    where = ".".join(loc) or "body"
    text = f"{words}{shown}." if words.startswith(where) else f"{where}: {words}{shown}."
    return OpenAIError(400, text, param=param, code=code)


_SUPPORTED = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs",
              "echo", "stream", "stream_options", "user"]


def parse_request(raw: bytes | dict) -> CompletionRequest:
    """Validate a body (raw JSON or a dict); OpenAIError 400 naming the field otherwise."""
    try:
        if isinstance(raw, (bytes, str)):
            return CompletionRequest.model_validate_json(raw)
        return CompletionRequest.model_validate(raw)
    except ValidationError as error:
        raise request_error(error) from None


def chat_not_supported() -> OpenAIError:
    return OpenAIError(400, "rnnlab's models are character models that continue text; they have no chat format. "
                       "Send the text to POST /v1/completions (client.completions.create) instead.",
                       param="messages", code="chat_not_supported")


def unknown_model(requested: str, served: Sequence[str]) -> OpenAIError:
    return OpenAIError(404, f"The model {requested!r} does not exist here; this service generates with "
                       f"{', '.join(served) or 'no model'} (GET /v1/models lists them).",
                       param="model", code="model_not_found")


# --- /v1/models -----------------------------------------------------------------------------------------------
def model_entry(model_id: str, info: dict, *, created: int | None = None) -> dict:
    """One model in OpenAI's list shape; rnnlab's facts about it (job, version, digest, metrics, batching, ...)
    stay as extra fields (clients keep them: the entries allow extra keys)."""
    extra = {key: value for key, value in info.items() if key not in ("id", "object", "created", "owned_by")}
    return {"id": model_id, "object": "model", "created": int(created if created is not None else time.time()),
            "owned_by": "rnnlab"} | extra


def model_list(entries: list[dict], **extra: Any) -> dict:
    return {"object": "list", "data": entries} | extra


# --- stop strings and one choice's text ---------------------------------------------------------------------------
class StopMatcher:
    """Cuts generated text before the first stop string. ``feed`` returns the text that is safe to send: never
    the start of a possible stop string (held back until more text settles it) and never anything after a stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped: str | None = None  # the stop string found

    def feed(self, text: str) -> str:
        if self.stopped is not None:
            return ""
        buffer = self.held + text
        found = [(buffer.find(stop), stop) for stop in self.stops if stop in buffer]
        if found:
            position, self.stopped = min(found, key=lambda hit: hit[0])
            self.held = ""
            return buffer[:position]
        hold = max((k for stop in self.stops for k in range(1, min(len(stop) - 1, len(buffer)) + 1)
                    if buffer.endswith(stop[:k])), default=0)
        self.held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """At the end of the generation: the held-back text was not a stop string after all."""
        rest, self.held = self.held, ""
        return rest


def _lp(value: float | None) -> float | None:
    return None if value is None else max(float(value), LOGPROB_FLOOR)


class ChoiceState:
    """One choice under way: its text after stop strings, its log-probabilities aligned with that text, and the
    deltas (``{"index", "text", "logprobs", "finish_reason"}``) a stream sends or a plain answer joins."""

    def __init__(self, index: int, seed: int, stops: Sequence[str], logprobs: int | None,
                 itos: Sequence[str]) -> None:
        self.index, self.seed, self.top_n, self.itos = index, seed, logprobs, itos
        self.matcher = StopMatcher(stops)
        self.offset = 0  # characters of this choice's text sent so far (the echo included)
        self.sent = 0  # generated characters sent so far
        self.scores: list = []  # per generated character not yet sent: (log-probability, alternatives)

    def echo(self, prompt: str, scores: list | None) -> dict:
        """The prompt as the first delta (``echo``); ``scores`` are its characters' (None for the first one)."""
        return self._delta(prompt, scores if self.top_n is not None else None)

    def feed(self, text: str, scores: list | None) -> dict | None:
        """New generated characters; the delta to send, or None while everything is held back or stopped."""
        if self.matcher.stopped is not None:
            return None
        if scores is not None:
            self.scores.extend(scores)
        sent = self.matcher.feed(text)
        return self._send(sent) if sent else None

    @property
    def generated(self) -> int:
        """Characters the model generated for this choice, as ``usage`` counts them: the text and its stop
        string."""
        return self.sent + len(self.matcher.stopped or "") + len(self.matcher.held)

    def finish(self) -> dict:
        reason = "stop" if self.matcher.stopped is not None else "length"
        delta = self._send(self.matcher.flush())
        delta["finish_reason"] = reason
        return delta

    def _send(self, text: str) -> dict:
        scores, self.scores = self.scores[: len(text)], self.scores[len(text):]
        self.sent += len(text)
        return self._delta(text, scores if self.top_n is not None else None)

    def _delta(self, text: str, scores: list | None) -> dict:
        logprobs = None
        if scores is not None:
            tokens, token_lps, tops, offsets = [], [], [], []
            for position, (char, score) in enumerate(zip(text, scores)):
                tokens.append(char)
                offsets.append(self.offset + position)
                if score is None:  # the prompt's first character: nothing before it to predict it
                    token_lps.append(None)
                    tops.append(None)
                    continue
                chosen, alternatives = score
                token_lps.append(_lp(chosen))
                tops.append({self.itos[i]: _lp(v) for i, v in alternatives} | {char: _lp(chosen)})
            logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
        self.offset += len(text)
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": None}


def join_deltas(deltas: list[dict]) -> dict:
    """One choice's deltas joined (texts and logprobs lists concatenated): a plain answer's choice, or what a
    stream chunk carries for it."""
    choice = {"index": deltas[0]["index"], "text": "", "logprobs": None, "finish_reason": None}
    for delta in deltas:
        choice["text"] += delta["text"]
        choice["finish_reason"] = delta["finish_reason"] or choice["finish_reason"]
        if "seed" in delta:
            choice["seed"] = delta["seed"]
        if delta["logprobs"] is not None:
            if choice["logprobs"] is None:
                choice["logprobs"] = {key: [] for key in delta["logprobs"]}
            for key, values in delta["logprobs"].items():
                choice["logprobs"][key].extend(values)
    return choice


# --- answers and streams ---------------------------------------------------------------------------------------
def completion_id(request_id: str | None = None) -> str:
    return f"cmpl-{request_id or secrets.token_hex(12)}"


def usage(prompt_chars: int, completion_chars: int) -> dict:
    return {"prompt_tokens": prompt_chars, "completion_tokens": completion_chars,
            "total_tokens": prompt_chars + completion_chars}


def completion(cid: str, created: int, model: str, choices: list[dict], used: dict | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": used}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chunk_choices(deltas: list[dict]) -> list[dict]:
    """A stream chunk's choices: the deltas that settled together, one per choice (as clients expect)."""
    by_index: dict[int, list[dict]] = {}
    for delta in deltas:
        by_index.setdefault(delta["index"], []).append(delta)
    return [join_deltas(group) if len(group) > 1 else group[0] for group in by_index.values()]
