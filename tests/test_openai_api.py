"""The OpenAI-compatible completions without Ray or HTTP: the request schema and its 400s, OpenAI's error and list
shapes (checked with the ``openai`` package's own types), stop strings, logprobs in the scheduler, and the driver
that runs a request's choices on a real GenerationScheduler."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
import torch

from rnnlab.bundle import Bundle
from rnnlab.data.vocab import Vocab
from rnnlab.jobs.charlm import CharLMPredictor as TextGenerator
from rnnlab.models import build_model
from rnnlab.sampling import SamplingParams, token_logprobs
from rnnlab.serve import completions, openai as oa
from rnnlab.serve.scheduler import GenerationScheduler

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generator() -> TextGenerator:
    torch.manual_seed(0)
    model = build_model("charlm", {"vocab_size": len(CHARS), "embed_dim": 8, "hidden_size": 16})
    bundle = Bundle(path="memory", job="charlm", model=model.eval(), model_config=model.config.to_dict(),
                    config={"data": {"lowercase": True}}, assets={"vocab": Vocab(list(CHARS)).to_json()}, metrics={})
    return TextGenerator(bundle)


def _refused(body: dict) -> oa.OpenAIError:
    with pytest.raises(oa.OpenAIError) as caught:
        oa.parse_request({"model": "m", "prompt": "the "} | body)
    assert caught.value.status == 400
    return caught.value


# --- the request ---------------------------------------------------------------------------------------------------
def test_defaults_follow_openai_and_a_token_is_a_character():
    request = oa.parse_request(b'{"model": "wp", "prompt": "the "}')
    params = request.sampling()
    assert request.max_tokens == 16 and request.n == 1 and request.prompts == ["the "] and request.stops == []
    assert params.max_new_tokens == 16 and params.temperature == 1.0 and params.top_k is None and params.top_p is None
    assert params.seed is not None  # always chosen, and returned with the choice


def test_choice_k_samples_with_seed_plus_k_and_top_k_minus_one_is_off():
    request = oa.parse_request({"model": "m", "prompt": ["a", "b"], "n": 3, "seed": 7, "top_k": -1, "top_p": 1.0,
                                "temperature": 0, "stop": "x"})
    assert [request.sampling(k).seed for k in range(3)] == [7, 8, 9]
    assert request.sampling().top_k is None and request.sampling().top_p is None
    assert request.sampling().temperature == 0.0 and request.stops == ["x"]
    assert oa.parse_request({"model": "m", "prompt": "a", "top_k": 5}).sampling().top_k == 5


@pytest.mark.parametrize("body, param, words", [
    ({"suffix": "end"}, "suffix", "suffix is not supported"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "logit_bias is not supported"),
    ({"best_of": 3}, "best_of", "best_of other than n"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"frequency_penalty": 1}, "frequency_penalty", "not supported"),
    ({"functions": []}, "functions", "Unrecognized request argument supplied: functions"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": 5000}, "max_tokens", "less than or equal to 2000"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop strings"),
    ({"stop": [""]}, "stop", "1 to 100 characters"),
    ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"prompt": [1, 2, 3]}, "prompt", "token-id prompts are not supported"),
    ({"prompt": ["a", None]}, "prompt", "prompt 1 is not a string"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": ["a"] * 10, "n": 16}, "n", "at most 64"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", "Unrecognized request argument supplied: stream_options.x"),
])
def test_unsupported_or_bad_fields_are_a_400_naming_them(body, param, words):
    error = _refused(body)
    assert error.param == param and words in error.message, error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_neutral_values_of_unsupported_fields_are_accepted():
    request = oa.parse_request({"model": "m", "prompt": "a", "n": 2, "best_of": 2, "presence_penalty": 0,
                                "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None, "user": "someone"})
    assert request.n == 2


# --- OpenAI's shapes, read back with the openai package's own types ---------------------------------------------------
def test_errors_have_openais_shape_status_and_retry_after():
    error = oa.OpenAIError(503, "busy", code="overloaded", retry_after=2)
    assert error.body() == {"error": {"message": "busy", "type": "server_error", "param": None, "code": "overloaded"}}
    response = error.response()
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    missing = oa.unknown_model("gpt-4", ["wp-small"])
    assert missing.status == 404 and missing.param == "model" and "wp-small" in missing.message
    chat = oa.chat_not_supported()
    assert chat.status == 400 and "/v1/completions" in chat.message


def test_a_failed_grpc_call_to_the_generator_is_a_json_500_or_an_error_event():
    """The Gateway calls generation replicas over gRPC; a call that fails there (not a replica that is gone: Serve
    makes that a RayActorError, a 503) is the service's JSON 500 on both routes, not Starlette's plain-text one,
    and ends a stream whose headers are out with an ``error`` event."""
    import grpc
    from starlette.requests import Request

    from rnnlab.serve import http

    failed = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                  details="Received message larger than max")
    request = Request({"type": "http", "method": "POST", "path": "/v1/charlm", "headers": [], "query_string": b""})
    response = asyncio.run(http.api.exception_handlers[grpc.aio.AioRpcError](request, failed))
    assert response.status_code == 500 and b'"loc":["service"]' in response.body
    assert completions.service_error(failed, "/v1/completions").status == 500

    class FailingStream:  # the replica's stream: one chunk, then the call fails
        def __init__(self):
            self.chunks, self.cancelled = [{"text": "the"}], False

        async def __anext__(self):
            if self.chunks:
                return self.chunks.pop()
            raise failed

        def cancel(self):
            self.cancelled = True

    async def read_events(stream) -> str:
        return "".join([chunk async for chunk in http.events({"model": "m"}, stream, time.monotonic() + 30,
                                                             asyncio.Event())])

    stream = FailingStream()
    sent = asyncio.run(read_events(stream))
    assert "event: error" in sent and "replica_failed" in sent and stream.cancelled


def _failed_model_calls():
    import grpc
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    return [BackPressureError(num_queued_requests=8, max_queued_requests=8), RayActorError(), asyncio.TimeoutError(),
            grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())]


@pytest.mark.parametrize("error", _failed_model_calls(), ids=lambda error: type(error).__name__)
def test_a_failed_model_call_gets_the_same_answer_on_the_services_routes_and_openais(error):
    """Clients of /v1/charlm and of /v1/completions see the same status, the same error code and the same advice
    to retry (Retry-After) for the same fault, each in its own shape."""
    from starlette.requests import Request

    from rnnlab.serve import http

    request = Request({"type": "http", "method": "POST", "path": "/v1/charlm", "headers": [], "query_string": b""})
    handler = next(http.api.exception_handlers[kind] for kind in type(error).__mro__
                   if kind in http.api.exception_handlers)
    ours = asyncio.run(handler(request, error))
    theirs = completions.service_error(error, "/v1/completions").response()
    assert ours.status_code == theirs.status_code >= 500
    assert b'"type":"' + json.loads(theirs.body)["error"]["code"].encode() + b'"' in ours.body
    assert ours.headers.get("retry-after") == theirs.headers.get("retry-after")
    assert (ours.headers.get("retry-after") is None) == (ours.status_code == 500)


def test_model_list_and_completion_parse_as_the_clients_types():
    openai_types = pytest.importorskip("openai.types")
    listed = oa.model_list([oa.model_entry("wp-small", {"job": "charlm", "digest": "sha256:ab", "metrics": {}},
                                           created=1)])
    assert listed["object"] == "list"
    model = openai_types.Model.model_validate(listed["data"][0])
    assert model.id == "wp-small" and model.owned_by == "rnnlab" and model.job == "charlm"  # extras kept
    state = oa.ChoiceState(0, 5, [], 1, list(CHARS))
    delta = state.feed("ab", [(-0.5, [(0, -0.5)]), (float("-inf"), [(0, -0.1)])])
    answer = oa.completion(oa.completion_id("x"), 1, "wp-small", [oa.join_deltas([delta, state.finish()])],
                           oa.usage(4, 2))
    parsed = openai_types.Completion.model_validate(answer)
    assert parsed.choices[0].text == "ab" and parsed.choices[0].finish_reason == "length"
    assert parsed.choices[0].logprobs.token_logprobs == [-0.5, oa.LOGPROB_FLOOR]
    assert parsed.choices[0].logprobs.top_logprobs[1] == {"a": -0.1, "b": oa.LOGPROB_FLOOR}
    assert parsed.usage.total_tokens == 6
    assert oa.sse({"a": 1}) == 'data: {"a":1}\n\n' and oa.SSE_DONE == "data: [DONE]\n\n"


# --- stop strings ----------------------------------------------------------------------------------------------
def _fed(stops, pieces):
    matcher = oa.StopMatcher(stops)
    sent = [matcher.feed(piece) for piece in pieces]
    return sent, matcher.flush(), matcher.stopped


def test_stop_string_ends_the_text_before_it_even_split_across_chunks():
    assert _fed(["\n\n"], ["hello\n", "\nworld"]) == (["hello", ""], "", "\n\n")
    assert _fed(["end"], ["the e", "n", "d of it"]) == (["the ", "", ""], "", "end")
    assert _fed(["xyz", "b"], ["aab", "xyz"]) == (["aa", ""], "", "b")  # the earliest stop wins


def test_a_partial_match_is_held_back_only_until_settled():
    assert _fed(["end"], ["the e", "ntry", "!"]) == (["the ", "entry", "!"], "", None)
    assert _fed(["end"], ["we en"]) == (["we "], "en", None)  # the generation ended: the held text goes out


def test_choice_logprobs_and_offsets_follow_the_text_with_echo_and_stop():
    state = oa.ChoiceState(3, 1, ["c"], 0, list(CHARS))
    echoed = state.echo("ab", [None, (-1.0, [])])
    assert echoed["text"] == "ab" and echoed["logprobs"]["token_logprobs"] == [None, -1.0]
    assert echoed["logprobs"]["top_logprobs"] == [None, {"b": -1.0}]
    delta = state.feed("bcd", [(-0.1, []), (-0.2, []), (-0.3, [])])
    assert delta["text"] == "b" and delta["logprobs"]["text_offset"] == [2] and delta["logprobs"]["tokens"] == ["b"]
    assert state.generated == 2  # "b" and the stop string "c"
    final = state.finish()
    assert final == {"index": 3, "text": "", "finish_reason": "stop",
                     "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}}


# --- logprobs in the generation path -------------------------------------------------------------------------------
def test_scheduler_logprobs_are_the_models_own_and_leave_the_text_unchanged(generator):
    params = SamplingParams(max_new_tokens=40, temperature=0.8, top_k=6, seed=11)

    async def run():
        scheduler = GenerationScheduler(generator.model, max_batch_size=4)
        ids = generator.encode_prompt("the ")
        plain, scored = await asyncio.gather(_chunks(scheduler, ids, params, None),
                                             _chunks(scheduler, ids, params, 3))
        return plain, scored

    plain, scored = asyncio.run(run())
    text = generator.generate("the ", **params.model_dump())
    assert "".join(CHARS[i] for c in plain for i in c.ids) == text
    assert "".join(CHARS[i] for c in scored for i in c.ids) == text
    assert all(c.logprobs is None for c in plain)
    entries = [entry for c in scored for entry in c.logprobs]
    assert len(entries) == len(text)
    # the same numbers by hand: teacher-force the text through the model, one step at a time
    ids = generator.encode_prompt("the " + text)
    with torch.inference_mode():
        logits, _ = generator.model(torch.tensor([ids[:-1]]))
    expected = logits[0, 3:].log_softmax(-1)
    for position, (chosen, top) in enumerate(entries):
        row = expected[position]
        assert math.isclose(chosen, float(row[ids[position + 4]]), abs_tol=1e-4)
        assert [i for i, _ in top] == row.topk(3).indices.tolist()
        assert top[0][1] == pytest.approx(float(row.max()), abs=1e-4)


async def _chunks(scheduler, ids, params, logprobs):
    return [chunk async for chunk in scheduler.generate(ids, params, logprobs=logprobs)]


def test_token_logprobs_top_zero_gives_only_the_chosen():
    chosen, values, ids = token_logprobs(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([0]), 0)
    assert values.shape == (1, 0) and chosen.item() == pytest.approx(float(torch.tensor([0.0, 1, 2]).log_softmax(0)[0]))


# --- a whole request on a real scheduler ------------------------------------------------------------------------------
def _run(generator, body: dict, *, stream: bool = False, **scheduling):
    request = oa.parse_request({"model": "wp"} | body)

    async def run():
        scheduler = GenerationScheduler(generator.model, max_batch_size=8, **scheduling)
        encoded = completions.encode_prompts(request, generator.encode_prompt)
        batches = [batch async for batch in completions.run_completion(
            scheduler, request, encoded, generator.vocab.itos, request_id="t", stream=stream,
            score_prompt=completions.prompt_scorer(generator.model, "cpu"))]
        return batches, scheduler.stats()

    batches, stats = asyncio.run(run())
    items = [item for batch in batches for item in batch]
    assert "usage" in items[-1] and all("usage" not in item for item in items[:-1])
    by_choice: dict[int, list] = {}
    for item in items[:-1]:
        by_choice.setdefault(item["index"], []).append(item)
    return [oa.join_deltas(by_choice[i]) for i in sorted(by_choice)], items[-1]["usage"], stats


def test_choices_of_a_list_prompt_match_the_cli_for_seed_plus_k(generator):
    choices, used, stats = _run(generator, {"prompt": ["the ", "a"], "n": 2, "seed": 3, "max_tokens": 25})
    expected = [generator.generate(prompt, max_new_tokens=25, seed=3 + k) for prompt in ("the ", "a") for k in range(2)]
    assert [c["text"] for c in choices] == expected and [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["seed"] for c in choices] == [3, 4, 3, 4]
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in choices)
    assert used == {"prompt_tokens": 5, "completion_tokens": 100, "total_tokens": 105}
    # the choices share the decoding batch (one may join a block after the others: the thread is already running)
    assert stats["joined"] == 4 and stats["batch_size_max"] >= 2


def test_stop_and_stream_give_the_same_choice_as_plain_and_the_sequence_leaves_early(generator):
    full = generator.generate("the ", max_new_tokens=2000, seed=5)
    stop = full[40:42]  # a stop string the text certainly meets, at its first occurrence
    cut = full[: full.index(stop)]
    for stream in (False, True):
        # blocks of a few steps and a chunk after each, so the stop is seen long before 2,000 characters
        choices, used, stats = _run(generator, {"prompt": "the ", "seed": 5, "max_tokens": 2000,
                                                "stop": [stop, "@@"], "logprobs": 2}, stream=stream,
                                    block_s=0.0005, stream_interval_s=0.0)
        (choice,) = choices
        assert choice["text"] == cut and choice["finish_reason"] == "stop"
        assert choice["logprobs"]["tokens"] == list(cut) and choice["logprobs"]["text_offset"] == list(range(len(cut)))
        assert all(len(top) in (2, 3) for top in choice["logprobs"]["top_logprobs"])
        assert used["completion_tokens"] == len(cut) + len(stop)
        assert stats["tokens"] < 1000  # it left the batch long before its 2,000 characters


def test_echo_with_logprobs_scores_the_prompt(generator):
    (choice,), used, _ = _run(generator, {"prompt": "The ", "echo": True, "logprobs": 1, "max_tokens": 5, "seed": 1})
    assert choice["text"] == "The " + generator.generate("the ", max_new_tokens=5, seed=1)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"][:4] == list("The ") and logprobs["token_logprobs"][0] is None
    assert all(isinstance(v, float) for v in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"] == list(range(9)) and used["prompt_tokens"] == 4


def test_a_prompt_outside_the_vocabulary_is_a_400_naming_it_before_anything_runs(generator):
    with pytest.raises(oa.OpenAIError) as caught:
        _run(generator, {"prompt": ["fine", "caf\u00e9 #1"]})
    assert caught.value.status == 400 and caught.value.param == "prompt" and "prompt 1" in caught.value.message
    with pytest.raises(oa.OpenAIError) as caught:
        _run(generator, {"prompt": "x" * 2001})
    assert caught.value.param == "prompt" and "limit of 2,000" in caught.value.message


def test_a_stream_chunk_carries_one_delta_per_choice():
    deltas = [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": None, "seed": 4},
              {"index": 1, "text": "x", "logprobs": None, "finish_reason": None},
              {"index": 0, "text": "c", "logprobs": None, "finish_reason": "length"}]
    assert oa.chunk_choices(deltas) == [
        {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length", "seed": 4}, deltas[1]]


def test_a_choice_failing_in_the_scheduler_fails_its_request_only():
    from rnnlab.serve.scheduler import GenerationFailed

    chars = CHARS + "'"
    torch.manual_seed(0)
    model = build_model("charlm", {"vocab_size": len(chars), "embed_dim": 8, "hidden_size": 16}).eval()
    with torch.no_grad():  # an apostrophe in a prompt turns the scores NaN: a model fault inside the step
        model.embedding.weight[chars.index("'")] = float("nan")
        model.output.bias[chars.index("'")] = float("-inf")
    bundle = Bundle(path="memory", job="charlm", model=model, model_config=model.config.to_dict(),
                    config={"data": {"lowercase": True}}, assets={"vocab": Vocab(list(chars)).to_json()}, metrics={})
    generator = TextGenerator(bundle)

    async def request(scheduler, prompts):
        body = oa.parse_request({"model": "m", "prompt": prompts, "n": 2, "max_tokens": 50, "seed": 1})
        items = []
        async for batch in completions.run_completion(scheduler, body, completions.encode_prompts(
                body, generator.encode_prompt), generator.vocab.itos, request_id="r", stream=False):
            items += batch
        return items

    async def run():
        scheduler = GenerationScheduler(model, max_batch_size=8)
        return await asyncio.gather(request(scheduler, ["the ", "it's "]), request(scheduler, ["the "]),
                                    return_exceptions=True)

    failed, fine = asyncio.run(run())
    assert isinstance(failed, GenerationFailed) and failed.request_id.startswith("r-")
    texts = ["".join(item["text"] for item in fine[:-1] if item["index"] == index) for index in (0, 1)]
    assert texts == [generator.generate("the ", max_new_tokens=50, seed=seed) for seed in (1, 2)]
