"""The official ``openai`` client against a real rnnlab service (Ray Serve, real HTTP): models, completions plain,
with n and a list prompt, with stop and logprobs, streamed (sync and async) with usage, the errors it maps to its
exceptions, and a 503 with Retry-After that it retries by itself.

One Ray instance and one Serve application (with an API key and a cap of one stream) serve the module. Its
character model is bigger than test_serve's (hidden 384, 2 layers), so that a long stream takes seconds and can
hold the one stream slot while the overload test runs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from conftest import serving, skip_or_fail
from tiny_models import CHARS, make_bundles

try:
    import openai
except ImportError:  # a test dependency: the tests skip on a laptop without it and fail under CI=true
    openai = None
pytestmark = pytest.mark.slow

KEY = "test-key-0123456789abcdef"
MODEL = "wp-small"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    from rnnlab.bundle import save_bundle
    from rnnlab.data.vocab import Vocab
    from rnnlab.models import build_model

    directory = make_bundles(tmp_path_factory.mktemp("bundles"))
    shutil.rmtree(directory / MODEL)
    torch.manual_seed(1)
    charlm = build_model("charlm", {"vocab_size": len(CHARS), "embed_dim": 16, "hidden_size": 384, "num_layers": 2})
    save_bundle(directory / MODEL, job="charlm", model=charlm, assets={"vocab": Vocab(list(CHARS)).to_json()},
                metrics={"val": {"nats_per_char": 3.4}}, config={"job": "charlm", "data": {"lowercase": True}})
    return directory


@pytest.fixture(scope="module")
def base(bundles, tmp_path_factory) -> str:
    if openai is None:
        skip_or_fail("the openai package is not installed (pip install -e '.[test]')")
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(KEY + "\n")
    with serving({"bundles": str(bundles), "api_key_file": str(key_file), "max_streams": 1, "retry_after_s": 1}) as url:
        yield url


@pytest.fixture()
def client(base):
    with openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def local(bundles):
    """The CLI's generator on the same bundle: what `rnnlab generate --seed S` prints."""
    from rnnlab.inference import load_predictor

    return load_predictor(bundles / MODEL)


def test_models_list_gives_every_bundle_with_rnnlabs_facts(client, bundles):
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {folder.name for folder in bundles.iterdir()}  # every bundle make_bundles wrote
    charlm = models[MODEL]
    assert charlm.object == "model" and charlm.owned_by == "rnnlab" and charlm.created > 1_600_000_000
    assert charlm.job == "charlm" and charlm.endpoint == "/v1/charlm" and charlm.digest.startswith("sha256:")
    assert charlm.metrics == {"val": {"nats_per_char": 3.4}} and "max_batch_size" in charlm.batching
    assert client.models.retrieve(MODEL).digest == charlm.digest
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_a_plain_completion_is_the_cli_text_for_its_seed_and_v1_charlm_agrees(client, base, local):
    answer = client.completions.create(model=MODEL, prompt="The ", max_tokens=30, seed=7, temperature=0.8,
                                       extra_body={"top_k": 10})
    (choice,) = answer.choices
    expected = local.generate("The ", max_new_tokens=30, seed=7, temperature=0.8, top_k=10)
    assert choice.text == expected and choice.finish_reason == "length" and choice.index == 0
    assert answer.object == "text_completion" and answer.model == MODEL and answer.id.startswith("cmpl-")
    assert answer.system_fingerprint.startswith("rnnlab-") and choice.seed == 7
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (4, 30, 34)
    generated = httpx.post(f"{base}/v1/charlm", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, json={
        "prompt": "The ", "max_new_tokens": 30, "seed": 7, "temperature": 0.8, "top_k": 10}).json()
    assert generated["text"] == expected
    default = client.completions.create(model=MODEL, prompt="a")
    assert len(default.choices[0].text) == 16  # OpenAI's default max_tokens; a token is a character


def test_n_and_a_list_prompt_give_a_choice_each_seeded_seed_plus_k(client, local):
    answer = client.completions.create(model=MODEL, prompt=["the ", "once "], n=2, max_tokens=12, seed=3)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    expected = [local.generate(p, max_new_tokens=12, seed=3 + k) for p in ("the ", "once ") for k in range(2)]
    assert [c.text for c in answer.choices] == expected
    assert answer.usage.prompt_tokens == 9 and answer.usage.completion_tokens == 48


def test_stop_ends_the_text_before_it_and_logprobs_come_per_character(client, local):
    full = local.generate("the ", max_new_tokens=60, seed=11)
    stop = full[20:22]
    cut = full[: full.index(stop)]
    answer = client.completions.create(model=MODEL, prompt="the ", max_tokens=60, seed=11, stop=[stop, "@@"],
                                       logprobs=3)
    (choice,) = answer.choices
    assert choice.text == cut and choice.finish_reason == "stop"
    logprobs = choice.logprobs
    assert logprobs.tokens == list(cut) and logprobs.text_offset == list(range(len(cut)))
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(3 <= len(top) <= 4 and top[token] == lp
               for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs))
    assert answer.usage.completion_tokens == len(cut) + len(stop)


def test_a_sync_stream_ends_with_usage_and_matches_the_plain_answer(client):
    plain = client.completions.create(model=MODEL, prompt="the ", max_tokens=80, seed=5).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="the ", max_tokens=80, seed=5, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 80


def test_an_async_stream_with_echo_and_stop(base, local):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0) as client:
            stream = await client.completions.create(model=MODEL, prompt="The ", max_tokens=40, seed=2, echo=True,
                                                     stop="zz", stream=True, stream_options={"include_usage": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = local.generate("The ", max_new_tokens=40, seed=2)
    expected = expected.split("zz")[0]
    assert text == "The " + expected
    assert chunks[-1].usage.prompt_tokens == 4


def test_a_wrong_key_raises_authentication_error(base):
    with openai.OpenAI(base_url=f"{base}/v1", api_key="wrong-key-0123456789", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as caught:
            stranger.completions.create(model=MODEL, prompt="the ")
    assert caught.value.status_code == 401 and "API key" in caught.value.message


@pytest.mark.parametrize("extra, param, words", [
    ({"suffix": "end"}, "suffix", "suffix is not supported"),
    ({"logit_bias": {"3": 5}}, "logit_bias", "logit_bias is not supported"),
    ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty", "Unrecognized request argument"),
    ({"max_tokens": 9999}, "max_tokens", "less than or equal to 2000"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
])
def test_a_bad_field_raises_bad_request_naming_it(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="the ", **extra)
    assert caught.value.status_code == 400 and caught.value.param == param and words in caught.value.message


def test_unknown_model_chat_and_bad_prompt_errors_in_openais_shape(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="the ")
    assert caught.value.code == "model_not_found" and MODEL in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=["fine", "caf\u00e9 #"])
    assert caught.value.param == "prompt" and "prompt 1" in caught.value.message


def test_an_overloaded_service_answers_503_with_retry_after_and_the_client_retries(base):
    """The one stream slot is held by a long stream; the client's stream gets 503 + Retry-After, and the hook
    that sees that 503 lets the long stream go, so the client's own retry (max_retries) is served."""
    seen = []
    with httpx.Client(timeout=60) as holder, holder.stream(
            "POST", f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "prompt": "the ", "max_tokens": 2000, "stream": True}) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped line iterator would close the stream
        assert next(lines).startswith("data: {")  # the long stream is open: it holds the slot

        def on_response(response: httpx.Response) -> None:
            seen.append((response.status_code, response.headers.get("retry-after")))
            if response.status_code == 503:
                response.read()
                seen.append(json.loads(response.text)["error"]["code"])
                held.close()  # frees the slot; the client waits Retry-After and tries again

        with openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=3,
                           http_client=httpx.Client(event_hooks={"response": [on_response]})) as client:
            chunks = list(client.completions.create(model=MODEL, prompt="the ", max_tokens=10, seed=1, stream=True))
    assert seen[0] == (503, "1") and seen[1] == "overloaded" and seen[-1][0] == 200
    assert sum(len(c.choices[0].text) for c in chunks if c.choices) == 10
