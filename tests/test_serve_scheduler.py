"""The generation scheduler on its own (no Ray, no HTTP): joining, leaving, determinism, cancellation."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rnnlab.bundle import Bundle
from rnnlab.data.vocab import Vocab
from rnnlab.inference import TextGenerator
from rnnlab.models import build_model
from rnnlab.serve.scheduler import GenerationScheduler, SamplingParams

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generator() -> TextGenerator:
    torch.manual_seed(0)
    model = build_model("charlm", {"vocab_size": len(CHARS), "embed_dim": 8, "hidden_size": 16, "num_layers": 2})
    bundle = Bundle(path="memory", job="charlm", model=model.eval(), model_config=model.config.to_dict(),
                    config={"data": {"lowercase": True}}, assets={"vocab": Vocab(list(CHARS)).to_json()}, metrics={})
    return TextGenerator(bundle)


async def _collect(scheduler: GenerationScheduler, generator: TextGenerator, prompt: str, params: SamplingParams,
                   done: list | None = None) -> str:
    ids = []
    async for chunk in scheduler.generate(generator.encode_prompt(prompt), params):
        ids.extend(chunk)
    if done is not None:
        done.append(prompt)
    return "".join(generator.vocab.itos[i] for i in ids)


def test_batched_text_equals_the_single_sequence_generator_for_each_seed(generator):
    requests = [("the ", SamplingParams(max_new_tokens=30 + 7 * i, temperature=0.5 + 0.1 * i, top_k=[None, 5][i % 2],
                                        top_p=[None, 0.9][i // 2 % 2], seed=i)) for i in range(6)]

    async def run():
        scheduler = GenerationScheduler(generator.model, max_batch_size=8)
        texts = await asyncio.gather(*(_collect(scheduler, generator, p, s) for p, s in requests))
        return texts, scheduler.stats()

    texts, stats = asyncio.run(run())
    for text, (prompt, params) in zip(texts, requests):
        assert text == generator.generate(prompt, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                          top_k=params.top_k, top_p=params.top_p, seed=params.seed)
    assert stats["batch_size_max"] == 6
    assert stats["finished"] == 6 and stats["active"] == 0
    assert stats["tokens"] == sum(p.max_new_tokens for _, p in requests)


def test_a_late_short_request_joins_and_leaves_before_a_long_one(generator):
    async def run():
        scheduler = GenerationScheduler(generator.model, max_batch_size=8)
        done: list[str] = []
        long = asyncio.create_task(_collect(scheduler, generator, "long", SamplingParams(500, seed=1), done))
        while scheduler.stats()["steps"] < 10:  # the long one is decoding
            await asyncio.sleep(0)
        await _collect(scheduler, generator, "short", SamplingParams(5, seed=2), done)
        steps_when_short_finished = scheduler.stats()["steps"]
        await long
        return done, steps_when_short_finished, scheduler.stats()

    done, steps_at_short, stats = asyncio.run(run())
    assert done == ["short", "long"]
    assert steps_at_short < 500
    assert stats["batch_size_histogram"]["2"] == 5  # shared exactly the short request's 5 steps


def test_max_batch_size_one_decodes_one_request_at_a_time(generator):
    async def run():
        scheduler = GenerationScheduler(generator.model, max_batch_size=1)
        await asyncio.gather(*(_collect(scheduler, generator, "a", SamplingParams(10, seed=i)) for i in range(3)))
        return scheduler.stats()

    stats = asyncio.run(run())
    assert stats["batch_size_histogram"] == {"1": 30}


def test_closing_the_stream_frees_the_slot_before_the_next_step(generator):
    async def run():
        scheduler = GenerationScheduler(generator.model, max_batch_size=4)
        stream = scheduler.generate(generator.encode_prompt("the"), SamplingParams(10_000, seed=3))
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.01)
        return scheduler.stats()

    stats = asyncio.run(run())
    assert stats["active"] == 0 and stats["cancelled"] == 1
    assert stats["tokens"] < 10_000


def test_greedy_decoding_ignores_the_seed(generator):
    async def run(seed):
        scheduler = GenerationScheduler(generator.model)
        return await _collect(scheduler, generator, "war", SamplingParams(25, temperature=0.0, seed=seed))

    assert asyncio.run(run(1)) == asyncio.run(run(2))
