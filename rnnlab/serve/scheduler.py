"""Iteration-level batching for character generation (the Orca / vLLM idea, for an LSTM).

One asyncio task decodes every active sequence together, one ``CharLSTM.step`` call per step for all of them.
Each sequence keeps its own temperature / top-k / top-p, length and seeded draws; a sequence that is done leaves
after the step that finished it, and a request that arrives joins at the next block boundary: its prompt is run
through ``forward`` (the prefill) and its (h, c) is concatenated onto the slot tensors. An LSTM's state is a
fixed-size (h, c) per sequence, so a slot costs ``2 * layers * hidden`` floats and joining or leaving is one
``torch.cat`` / index.

Speed: decoding runs in blocks of steps (about ``block_s`` of compute) in a worker thread, so the event loop
(new requests, streaming to clients) runs while torch computes; between blocks the loop admits new requests and
drops cancelled ones. Per step there is one model call, one vectorised sampling call and no Python work per
sequence: the per-row sampling settings are tensors built when the batch changes, each sequence's uniform draws
are made when it joins, and finished rows are known in advance from their lengths. Tokens reach a consumer in
chunks: a streaming one is woken at most every ``stream_interval_s`` (a few events per second is all a reader
needs; one event per character cost more than the decoding), a non-streaming one once, at the end.

Determinism: a sequence's tokens depend only on its prompt, its parameters and its seed (one uniform draw per
step from its own generator, drawn ahead in one call, which gives the same numbers), never on which other
sequences share the batch; decoding is the same as ``TextGenerator.generate``, so the CLI and the service agree
for a seed. (Up to float rounding of the batched matmul, which can in principle differ by batch size; it would
have to flip a sampled token to show.)

Isolation: if a step raises, the rows at fault are found (rows with non-finite scores are named by the sampler;
otherwise each row is stepped alone) and only those sequences fail -- their consumer gets ``GenerationFailed``
with the request id, the log one line with it -- and the step is retried without them. Admission and prefill are
guarded per sequence the same way.

The scheduler knows nothing about Ray or HTTP; ``rnnlab.serve.app`` wraps it in a deployment.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from rnnlab.sampling import NonFiniteScores, SamplingParams, per_row_params, sample_next

logger = logging.getLogger(__name__)

MAX_STEPS_PER_BLOCK = 64


class GenerationFailed(RuntimeError):
    """A sequence failed inside the scheduler (a model or code fault, never bad input, which is refused before
    joining). ``request_id`` is the id the scheduler's log line carries."""

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"generation failed for request {request_id}: {reason}")
        self.request_id = request_id
        self.reason = reason


@dataclass(eq=False)
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams  # with a seed
    request_id: str
    streaming: bool
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[int] = field(default_factory=list)
    uniforms: torch.Tensor | None = None  # all of the sequence's draws, made when it joins
    next_id: int = -1  # the token fed at the next step (set by the prefill)
    done: bool = False
    error: str | None = None
    cancelled: bool = False
    last_wake: float = 0.0

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)


class GenerationScheduler:
    """Decodes all active sequences together; see the module docstring.

    ``model`` is a CharLSTM: ``forward(ids[B, T], state) -> (logits[B, T, V], (h, c))`` and
    ``step(ids[B], state) -> (logits[B, V], (h, c))``. ``max_batch_size`` bounds the sequences decoded together;
    further requests wait (FIFO) for a free slot. ``max_batch_size=1`` is "one request at a time".
    """

    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 64, device: str | torch.device = "cpu",
                 block_s: float = 0.02, stream_interval_s: float = 0.1, log: logging.Logger = logger) -> None:
        self.model = model
        self.log = log  # the Serve deployment passes Serve's logger, whose lines land in the replica's log file
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.block_s = block_s
        self.stream_interval_s = stream_interval_s
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        # the batch, row i = self._active[i]
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None  # (h, c), each [layers, B, hidden]
        self._ids: torch.Tensor | None = None  # [B] the tokens fed at the next step
        self._sampling: tuple[torch.Tensor, ...] = ()  # per-row temperature, top_k, top_p
        self._step_s = 0.0  # running estimate of one step's time, to size blocks
        self._unexplained = 0  # step failures in a row that no single row reproduced
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        # statistics, exposed by /v1/models
        self.step_sizes: collections.Counter[int] = collections.Counter()
        self.counts = collections.Counter(joined=0, finished=0, cancelled=0, failed=0, tokens=0)

    # --- public ------------------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, request_id: str | None = None,
                       stream: bool = True) -> AsyncIterator[list[int]]:
        """Yield the new token ids in chunks: with ``stream`` every ``stream_interval_s`` or so, else all at once
        at the end. Raises GenerationFailed if the sequence failed. Closing the iterator (a client that went
        away) frees the slot before the next block."""
        sequence = _Sequence(list(prompt_ids), params.with_seed(), request_id or secrets.token_hex(8), stream)
        self._waiting.append(sequence)
        self._ensure_running()
        self._wakeup.set()
        sent = 0
        try:
            while True:
                await sequence.wake.wait()
                sequence.wake.clear()
                if len(sequence.tokens) > sent:
                    chunk, sent = sequence.tokens[sent:], len(sequence.tokens)
                    yield chunk
                if sequence.error is not None:
                    raise GenerationFailed(sequence.request_id, sequence.error)
                if sequence.done:
                    return
        finally:
            if not sequence.done:
                sequence.cancelled = True
                self._wakeup.set()

    def set_max_batch_size(self, value: int) -> None:
        self.max_batch_size = int(value)

    def stats(self) -> dict:
        sizes = dict(self.step_sizes)  # one atomic copy: the decoding thread may be counting
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
            touched = list(self._active)
            # in a worker thread: torch releases the GIL, so the loop streams and takes requests meanwhile
            await asyncio.to_thread(self._decode_block)
            self._notify(touched)

    def _notify(self, sequences: list[_Sequence]) -> None:
        now = time.perf_counter()
        for sequence in sequences:
            if sequence.done or (sequence.streaming and now - sequence.last_wake >= self.stream_interval_s):
                sequence.last_wake = now
                sequence.wake.set()

    def _fail(self, sequence: _Sequence, reason: str) -> None:
        """Mark one sequence failed and log one line with its request id. Its consumer is woken by the loop
        (``_notify``; an asyncio.Event must not be set from the decoding thread)."""
        self.log.error("rnnlab generate: request %s failed: %s", sequence.request_id, reason)
        sequence.error, sequence.done = reason, True
        self.counts["failed"] += 1

    # --- joining -----------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        joined, states = [], []
        while self._waiting and len(self._active) + len(joined) < self.max_batch_size:
            sequence = self._waiting.popleft()
            if sequence.cancelled:
                continue
            try:  # one sequence's prefill failing fails that sequence only
                states.append(self._prefill(sequence))
                joined.append(sequence)
            except Exception as error:  # noqa: BLE001 -- a fault of this sequence, reported to its client
                self._fail(sequence, _reason(error))
                sequence.wake.set()
        if not joined:
            return
        h = torch.cat([s[0] for s in states], dim=1)
        c = torch.cat([s[1] for s in states], dim=1)
        ids = torch.tensor([s.next_id for s in joined], dtype=torch.long, device=self.device)
        if self._state is not None:
            h = torch.cat([self._state[0], h], dim=1)
            c = torch.cat([self._state[1], c], dim=1)
            ids = torch.cat([self._ids, ids])
        self._state, self._ids = (h, c), ids
        self._active.extend(joined)
        self._sampling = per_row_params([s.params for s in self._active], self.device)
        self.counts["joined"] += len(joined)

    @torch.inference_mode()
    def _prefill(self, sequence: _Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt except its last character through forward(); the last one is the first step's input,
        so every sequence, new or old, advances by exactly one step() per iteration."""
        generator = torch.Generator(device="cpu").manual_seed(sequence.params.seed)
        sequence.uniforms = torch.rand(sequence.params.max_new_tokens, generator=generator)
        *context, last = sequence.prompt_ids
        sequence.next_id = last
        if context:
            ids = torch.tensor([context], dtype=torch.long, device=self.device)
            _, (h, c) = self.model.forward(ids)
            return h, c
        return self.model.init_state(1, self.device)

    # --- decoding ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode_block(self) -> None:
        """About ``block_s`` of steps for the active batch (runs in a worker thread while the loop waits)."""
        steps = max(1, min(MAX_STEPS_PER_BLOCK, int(self.block_s / self._step_s) if self._step_s else 1))
        uniforms = self._block_uniforms(steps)
        segment: list[torch.Tensor] = []  # sampled ids per step since the batch last changed
        # rows finish at known steps (their lengths), so no per-row check is needed at each step
        until_finish = min(s.remaining for s in self._active)
        step = 0
        started = time.perf_counter()
        while step < steps and self._active:
            try:
                logits, state = self.model.step(self._ids, self._state)
                ids = sample_next(logits, *self._sampling, uniforms=uniforms[:, step])
            except Exception as error:  # noqa: BLE001 -- isolate the rows at fault, retry without them
                self._flush(segment)
                keep = self._rows_not_at_fault(error, uniforms[:, step])
                self._retain(keep)
                uniforms = uniforms[keep]
                until_finish = min((s.remaining for s in self._active), default=0)
                continue
            self._unexplained = 0
            self._state, self._ids = state, ids
            segment.append(ids)
            self.step_sizes[len(self._active)] += 1
            self.counts["tokens"] += len(self._active)
            step += 1
            if len(segment) == until_finish:
                self._flush(segment)
                keep = []
                for row, sequence in enumerate(self._active):
                    if sequence.remaining:
                        keep.append(row)
                    else:
                        sequence.done = True
                        self.counts["finished"] += 1
                self._retain(keep)
                uniforms = uniforms[keep]
                until_finish = min((s.remaining for s in self._active), default=0)
        self._flush(segment)
        if step:
            elapsed = (time.perf_counter() - started) / step
            self._step_s = elapsed if not self._step_s else 0.8 * self._step_s + 0.2 * elapsed

    def _block_uniforms(self, steps: int) -> torch.Tensor:
        """[B, steps]: row i's next ``steps`` draws (zeros past its end; it leaves before using them)."""
        block = torch.zeros(len(self._active), steps)
        for row, sequence in enumerate(self._active):
            drawn = sequence.uniforms[len(sequence.tokens) : len(sequence.tokens) + steps]
            block[row, : len(drawn)] = drawn
        return block

    def _flush(self, segment: list[torch.Tensor]) -> None:
        """Hand the segment's sampled ids to their sequences (one tensor-to-list per segment, not per step)."""
        if not segment:
            return
        for sequence, tokens in zip(self._active, torch.stack(segment, dim=1).tolist()):
            sequence.tokens.extend(tokens)
        segment.clear()

    def _rows_not_at_fault(self, error: Exception, uniforms: torch.Tensor) -> list[int]:
        """After a failed step: fail the sequences at fault, return the rows to go on with."""
        if isinstance(error, NonFiniteScores):
            at_fault = set(error.rows)
        else:  # find them: step each row alone (rare, so the cost does not matter)
            at_fault = set()
            for row in range(len(self._active)):
                try:
                    logits, _ = self.model.step(self._ids[row : row + 1], _rows(self._state, [row]))
                    sample_next(logits, *(t[row : row + 1] for t in self._sampling), uniforms=uniforms[row : row + 1])
                except Exception:  # noqa: BLE001
                    at_fault.add(row)
            if not at_fault:  # no single row reproduces it: retry the whole step once, then give up on all
                self._unexplained += 1
                if self._unexplained == 1:
                    self.log.warning("rnnlab generate: a decoding step failed (%s); retrying it", _reason(error))
                    return list(range(len(self._active)))
                at_fault = set(range(len(self._active)))
        reason = _reason(error)
        for row in sorted(at_fault):
            self._fail(self._active[row], reason)
        return [row for row in range(len(self._active)) if row not in at_fault]

    # --- leaving -----------------------------------------------------------------------------------------------
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
            self._state, self._ids, self._sampling = None, None, ()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._state = _rows(self._state, index)
        self._ids = self._ids.index_select(0, index)
        self._sampling = tuple(t.index_select(0, index) for t in self._sampling)


def _rows(state: tuple[torch.Tensor, torch.Tensor], rows) -> tuple[torch.Tensor, torch.Tensor]:
    index = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.long, device=state[0].device)
    return state[0].index_select(1, index), state[1].index_select(1, index)


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
