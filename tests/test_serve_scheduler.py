"""The generation scheduler on its own (no Ray, no HTTP): joining, leaving, determinism, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from rnnlab.bundle import Bundle
from rnnlab.data.vocab import Vocab
from rnnlab.jobs.charlm import CharLMPredictor
from rnnlab.models import build_model
from rnnlab.models.charlm import CharLSTM
from rnnlab.serve.scheduler import GenerationScheduler, SamplingParams

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generator() -> CharLMPredictor:
    torch.manual_seed(0)
    model = build_model("charlm", {"vocab_size": len(CHARS), "embed_dim": 8, "hidden_size": 16, "num_layers": 2})
    bundle = Bundle(path="memory", job="charlm", model=model.eval(), model_config=model.config.to_dict(),
                    config={"data": {"lowercase": True}}, assets={"vocab": Vocab(list(CHARS)).to_json()}, metrics={})
    return CharLMPredictor(bundle)


async def _collect(scheduler: GenerationScheduler, generator: CharLMPredictor, prompt: str, params: SamplingParams,
                   done: list | None = None) -> str:
    ids, marks = [], []
    async for chunk in scheduler.generate(generator.encode_prompt(prompt), params):
        ids.extend(chunk.ids)
        marks.append(chunk.last)
    assert marks and marks[-1] and not any(marks[:-1])  # exactly the final chunk says it is the last
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
        long = asyncio.create_task(_collect(scheduler, generator, "long", SamplingParams(max_new_tokens=500, seed=1), done))
        while scheduler.stats()["steps"] < 10:  # the long one is decoding
            await asyncio.sleep(0)
        await _collect(scheduler, generator, "short", SamplingParams(max_new_tokens=5, seed=2), done)
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
        await asyncio.gather(*(_collect(scheduler, generator, "a", SamplingParams(max_new_tokens=10, seed=i)) for i in range(3)))
        return scheduler.stats()

    stats = asyncio.run(run())
    assert stats["batch_size_histogram"] == {"1": 30}


def test_closing_the_stream_frees_the_slot_after_the_running_block(generator):
    async def run():
        scheduler = GenerationScheduler(generator.model, max_batch_size=4)
        stream = scheduler.generate(generator.encode_prompt("the"), SamplingParams(max_new_tokens=2_000, seed=3))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):  # the slot is freed at the end of the running block (~20 ms of steps)
            await asyncio.sleep(0.01)
            if scheduler.stats()["active"] == 0:
                break
        return scheduler.stats()

    stats = asyncio.run(run())
    assert stats["active"] == 0 and stats["cancelled"] == 1
    assert stats["tokens"] < 2_000


def test_greedy_decoding_ignores_the_seed(generator):
    async def run(seed):
        scheduler = GenerationScheduler(generator.model)
        return await _collect(scheduler, generator, "war", SamplingParams(max_new_tokens=25, temperature=0.0, seed=seed))

    assert asyncio.run(run(1)) == asyncio.run(run(2))


class FaultyModel(torch.nn.Module):
    """The generator's model, except that a step fed ``step_fault`` raises and a prompt holding ``prefill_fault``
    raises in the prefill; nothing ever samples either character, so only the requests that carry one fail."""

    def __init__(self, model: torch.nn.Module, step_fault: int, prefill_fault: int) -> None:
        super().__init__()
        self.model, self.step_fault, self.prefill_fault = model, step_fault, prefill_fault

    def init_state(self, *args):
        return self.model.init_state(*args)

    def forward(self, ids, state=None):
        if bool((ids == self.prefill_fault).any()):
            raise RuntimeError("injected prefill fault")
        return self._masked(*self.model.forward(ids, state))

    def step(self, ids, state):
        if bool((ids == self.step_fault).any()):
            raise RuntimeError("injected step fault")
        return self._masked(*self.model.step(ids, state))

    decode = CharLSTM.decode  # a step as above, then the sampler

    def _masked(self, logits, state):
        logits = logits.clone()
        logits[..., [self.step_fault, self.prefill_fault]] = float("-inf")
        return logits, state


def test_a_failing_step_or_prefill_fails_only_its_own_sequence(generator, caplog):
    from rnnlab.serve.scheduler import GenerationFailed

    stoi = generator.vocab.stoi
    model = FaultyModel(generator.model, step_fault=stoi["q"], prefill_fault=stoi["z"])
    good = [(f"the {c}", SamplingParams(max_new_tokens=60, temperature=0.9, seed=i)) for i, c in enumerate("abc")]

    async def run(requests):
        scheduler = GenerationScheduler(model, max_batch_size=8)

        async def one(index, prompt, params):
            try:
                return await _collect(scheduler, generator, prompt, params)
            except GenerationFailed as error:
                return error

        return await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(requests))), scheduler.stats()

    alone, _ = asyncio.run(run(good))
    faulty = [("the q", SamplingParams(max_new_tokens=60, seed=7)), ("zebra", SamplingParams(max_new_tokens=60))]
    with caplog.at_level("ERROR", logger="rnnlab.serve.scheduler"):
        answers, stats = asyncio.run(run([good[0], faulty[0], good[1], faulty[1], good[2]]))
    step_failure, prefill_failure = answers[1], answers[3]
    assert [answers[0], answers[2], answers[4]] == alone  # full length, same text as without the faulty ones
    assert all(len(text) == 60 for text in alone)
    assert isinstance(step_failure, GenerationFailed) and "injected step fault" in step_failure.reason
    assert isinstance(prefill_failure, GenerationFailed) and "injected prefill fault" in prefill_failure.reason
    for failure in (step_failure, prefill_failure):  # one log line each, carrying the request id
        assert sum(failure.request_id in record.getMessage() for record in caplog.records) == 1
    assert stats["failed"] == 2 and stats["finished"] == 3 and stats["active"] == 0


class PrefillCounter(torch.nn.Module):
    """The generator's model, counting the prompts its prefill runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.prefilled = model, []

    def init_state(self, *args):
        return self.model.init_state(*args)

    def forward(self, ids, state=None):
        self.prefilled += [tuple(row) for row in ids.tolist()]
        return self.model.forward(ids, state)

    def step(self, ids, state):
        return self.model.step(ids, state)

    decode = CharLSTM.decode  # a step as above, then the sampler


def test_a_repeated_prompt_reuses_its_state_with_the_same_text_and_the_kept_states_are_bounded(generator, monkeypatch):
    from rnnlab.serve import scheduler as scheduling

    monkeypatch.setattr(scheduling, "PROMPT_STATES", 2)
    model = PrefillCounter(generator.model)
    prompts = ["the emperor", "the emperor", "natasha", "the emperor", "pierre", "andrew", "the emperor"]

    async def run():
        scheduler = GenerationScheduler(model, max_batch_size=8)
        return [await _collect(scheduler, generator, prompt, SamplingParams(max_new_tokens=40, seed=i))
                for i, prompt in enumerate(prompts)]

    texts = asyncio.run(run())
    for seed, (prompt, text) in enumerate(zip(prompts, texts)):  # as if each prompt had been run afresh
        assert text == generator.generate(prompt, max_new_tokens=40, temperature=1.0, seed=seed)
    # "the emperor" runs once until two other prompts have pushed its state out of the two kept
    prefilled = ["".join(generator.vocab.itos[i] for i in ids) for ids in model.prefilled]
    assert prefilled == ["the empero", "natash", "pierr", "andre", "the empero"]


def test_same_seed_same_text_whatever_the_batch_neighbours(generator):
    params = SamplingParams(max_new_tokens=80, temperature=1.0, top_p=0.95, seed=11)

    async def run(neighbours: int, max_batch_size: int = 16):
        scheduler = GenerationScheduler(generator.model, max_batch_size=max_batch_size)
        others = [_collect(scheduler, generator, "a", SamplingParams(max_new_tokens=10 + 13 * i, seed=100 + i))
                  for i in range(neighbours)]
        texts = await asyncio.gather(_collect(scheduler, generator, "the war", params), *others)
        return texts[0]

    alone = asyncio.run(run(0))
    assert asyncio.run(run(7)) == asyncio.run(run(12, max_batch_size=4)) == alone
    assert alone == generator.generate("the war", **params.model_dump())


class HeldModel(torch.nn.Module):
    """The generator's model, except that the step for which ``hold(sizes)`` first says so waits until the test
    releases it (``sizes``: the batch size of every step so far, this one's last): the decoding thread stands still
    in the middle of a block, so a test can see what happens before that block ends."""

    def __init__(self, model: torch.nn.Module, hold) -> None:
        super().__init__()
        self.model, self.hold = model, hold
        self.held, self.release = threading.Event(), threading.Event()
        self.sizes: list[int] = []

    def init_state(self, *args):
        return self.model.init_state(*args)

    def forward(self, ids, state=None):
        return self.model.forward(ids, state)

    def step(self, ids, state):
        self.sizes.append(len(ids))
        if not self.held.is_set() and self.hold(self.sizes):
            self.held.set()
            self.release.wait(timeout=60)  # a safety net only: every test releases it
        return self.model.step(ids, state)

    decode = CharLSTM.decode  # a step as above, then the sampler


async def _wait_for(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.001)


def test_a_finished_sequence_is_answered_before_its_block_ends(generator):
    # blocks of 64 steps; the decoding thread stands still two steps after the short request's last one: the short
    # answer must arrive meanwhile (its client's next request can take the slot), not at the block's end
    model = HeldModel(generator.model, hold=lambda sizes: 2 in sizes and len(sizes) == sizes.index(2) + 7)

    async def run():
        scheduler = GenerationScheduler(model, max_batch_size=4, block_s=60.0)
        long = asyncio.create_task(_collect(scheduler, generator, "long", SamplingParams(max_new_tokens=100, seed=1)))
        try:
            short = await asyncio.wait_for(
                _collect(scheduler, generator, "short", SamplingParams(max_new_tokens=5, seed=2)), timeout=30)
            steps_when_answered = len(model.sizes)  # the thread cannot pass the held step before the release
        finally:
            model.release.set()
        await long
        return short, steps_when_answered

    short, steps_when_answered = asyncio.run(run())
    joined = model.sizes.index(2)
    assert len(short) == 5 and model.sizes[joined : joined + 5] == [2] * 5
    assert steps_when_answered <= joined + 7


def test_a_request_joins_at_the_next_step_not_at_the_block_end(generator):
    model = HeldModel(generator.model, hold=lambda sizes: len(sizes) == 10)

    async def run():
        scheduler = GenerationScheduler(model, max_batch_size=4, block_s=60.0)
        long = asyncio.create_task(_collect(scheduler, generator, "long", SamplingParams(max_new_tokens=200, seed=1)))
        try:
            await _wait_for(model.held)  # the long one is in the middle of a 64-step block
            short = asyncio.create_task(_collect(scheduler, generator, "late", SamplingParams(max_new_tokens=5, seed=2)))
            while scheduler.stats()["waiting"] == 0:
                await asyncio.sleep(0)
        finally:
            model.release.set()
        await asyncio.gather(long, short)

    asyncio.run(run())
    assert model.sizes[:10] == [1] * 10
    assert model.sizes[10:15] == [2] * 5  # joined at the step right after the one it arrived during


def test_a_stream_gets_characters_while_its_sequence_is_still_decoding(generator):
    """Streaming hands over what is decoded as it goes: the first chunk reaches its consumer while the decoding
    thread stands still at the sequence's 100th step, whatever the machine's load (test_serve checks over HTTP that
    the chunks add up to the plain answer)."""
    model = HeldModel(generator.model, hold=lambda sizes: len(sizes) == 100)
    params = SamplingParams(max_new_tokens=300, seed=1)

    async def run():
        scheduler = GenerationScheduler(model, max_batch_size=4)
        stream = scheduler.generate(generator.encode_prompt("the "), params)
        try:
            first = await asyncio.wait_for(stream.__anext__(), timeout=30)
        finally:
            model.release.set()
        return first, [chunk async for chunk in stream]

    first, rest = asyncio.run(run())
    assert first.ids and not first.last and len(first.ids) < 100
    text = "".join(generator.vocab.itos[i] for chunk in (first, *rest) for i in chunk.ids)
    assert text == generator.generate("the ", max_new_tokens=300, seed=1)
