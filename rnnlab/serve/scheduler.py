"""Iteration-level batching for character generation (the Orca / vLLM idea, for an LSTM).

One asyncio task decodes every active sequence together, one ``CharLSTM.step`` call per step for all of them.
Each sequence keeps its own temperature / top-k / top-p, length and ``torch.Generator``; a sequence that is done
leaves after the step that finished it, and a request that arrives joins before the next step: its prompt is run
through ``forward`` (the prefill) and its (h, c) is concatenated onto the slot tensors. An LSTM's state is a
fixed-size (h, c) per sequence, so a slot costs ``2 * layers * hidden`` floats and joining or leaving is one
``torch.cat`` / index.

Determinism: a sequence's tokens depend only on its prompt, its parameters and its own generator (one uniform
draw per step, ``rnnlab.inference.sample_next``), never on which other sequences share the batch; decoding is
the same as ``TextGenerator.generate``, so the CLI and the service agree for a seed. (Up to float rounding of
the batched matmul, which can in principle differ by batch size; it would have to flip a sampled token to show.)

The scheduler knows nothing about Ray or HTTP; ``rnnlab.serve.app`` wraps it in a deployment.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from rnnlab.inference import sample_next

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    queue: asyncio.Queue  # chunks of new token ids; None marks the end
    next_id: int = -1  # the token fed at the next step
    produced: int = 0
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)


class GenerationScheduler:
    """Decodes all active sequences one step at a time; see the module docstring.

    ``model`` is a CharLSTM: ``forward(ids[B, T], state) -> (logits[B, T, V], (h, c))`` and
    ``step(ids[B], state) -> (logits[B, V], (h, c))``. ``max_batch_size`` bounds the sequences decoded together;
    further requests wait (FIFO) for a free slot. ``max_batch_size=1`` is "one request at a time".
    """

    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 64, device: str | torch.device = "cpu"):
        self.model = model
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None  # (h, c), each [layers, B, hidden]
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        # statistics, exposed by /v1/models
        self.step_sizes: collections.Counter[int] = collections.Counter()
        self.counts = collections.Counter(joined=0, finished=0, cancelled=0, tokens=0)

    # --- public ------------------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[list[int]]:
        """Yield the new token ids in chunks as they are produced. Closing the iterator (a client that went
        away) frees the slot before the next step."""
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        sequence = _Sequence(list(prompt_ids), params, generator, asyncio.Queue())
        self._waiting.append(sequence)
        self._ensure_running()
        self._wakeup.set()
        try:
            while True:
                chunk = await sequence.queue.get()
                # coalesce: a slow consumer gets everything produced since its last read in one chunk
                ended = chunk is None
                tokens = [] if ended else list(chunk)
                while not ended and not sequence.queue.empty():
                    more = sequence.queue.get_nowait()
                    ended = more is None
                    tokens.extend(more or [])
                if tokens:
                    yield tokens
                if ended:
                    return
        finally:
            if sequence.produced < params.max_new_tokens and not sequence.cancelled:
                sequence.cancelled = True
                self._wakeup.set()

    def set_max_batch_size(self, value: int) -> None:
        self.max_batch_size = int(value)

    def stats(self) -> dict:
        sizes = self.step_sizes
        steps = sum(sizes.values())
        return {
            "max_batch_size": self.max_batch_size,
            "active": len(self._active),
            "waiting": sum(not s.cancelled for s in self._waiting),
            "steps": steps,
            "batch_size_histogram": {str(k): sizes[k] for k in sorted(sizes)},
            "batch_size_max": max(sizes, default=0),
            "batch_size_mean": (sum(k * n for k, n in sizes.items()) / steps) if steps else 0.0,
            **dict(self.counts),
        }

    # --- the loop ----------------------------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._drop_cancelled()
            self._admit()
            if not self._active:
                self._wakeup.clear()
                if not self._waiting:
                    await self._wakeup.wait()
                continue
            try:
                self._step()
            except Exception:  # a bug, not bad input (input was validated before joining): fail the sequences
                logger.exception("generation step failed; ending the %d active sequences", len(self._active))
                for sequence in self._active:
                    sequence.queue.put_nowait(None)
                self._active, self._state = [], None
            # let consumers read, new requests arrive and cancellations land before the next step
            await asyncio.sleep(0)

    def _admit(self) -> None:
        joined = []
        while self._waiting and len(self._active) + len(joined) < self.max_batch_size:
            sequence = self._waiting.popleft()
            if not sequence.cancelled:
                joined.append(sequence)
        if not joined:
            return
        states = [self._prefill(sequence) for sequence in joined]
        h = torch.cat([s[0] for s in states], dim=1)
        c = torch.cat([s[1] for s in states], dim=1)
        if self._state is not None:
            h = torch.cat([self._state[0], h], dim=1)
            c = torch.cat([self._state[1], c], dim=1)
        self._state = (h, c)
        self._active.extend(joined)
        self.counts["joined"] += len(joined)

    @torch.inference_mode()
    def _prefill(self, sequence: _Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt except its last character through forward(); the last one is the first step's input,
        so every sequence, new or old, advances by exactly one step() per iteration."""
        *context, last = sequence.prompt_ids
        sequence.next_id = last
        if context:
            ids = torch.tensor([context], dtype=torch.long, device=self.device)
            _, (h, c) = self.model.forward(ids)
            return h, c
        return self.model.init_state(1, self.device)

    @torch.inference_mode()
    def _step(self) -> None:
        active = self._active
        ids = torch.tensor([s.next_id for s in active], dtype=torch.long, device=self.device)
        logits, self._state = self.model.step(ids, self._state)
        params = [s.params for s in active]
        # the inference layer's sampler: one uniform draw per row from that row's own generator, exactly as
        # TextGenerator does for one sequence, so the CLI and the service give the same text for a seed
        new_ids = sample_next(
            logits,
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [s.generator for s in active],
        ).tolist()

        self.step_sizes[len(active)] += 1
        self.counts["tokens"] += len(active)
        keep = []
        for index, (sequence, token) in enumerate(zip(active, new_ids)):
            sequence.next_id = token
            sequence.produced += 1
            sequence.queue.put_nowait([token])
            if sequence.produced >= sequence.params.max_new_tokens:
                sequence.queue.put_nowait(None)
                self.counts["finished"] += 1
            else:
                keep.append(index)
        self._retain(keep)

    def _drop_cancelled(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not s.cancelled]
        dropped = len(self._active) - len(keep)
        if dropped:
            self.counts["cancelled"] += dropped
            self._retain(keep)
        before = len(self._waiting)
        self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        self.counts["cancelled"] += before - len(self._waiting)

    def _retain(self, keep: list[int]) -> None:
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._state = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._state = (self._state[0].index_select(1, index), self._state[1].index_select(1, index))

