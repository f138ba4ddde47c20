"""Iteration-level batching for character generation (the Orca / vLLM idea, for a recurrent model).

One thread decodes every active sequence together, one ``decode`` call (a step and its sampling, ``CharLSTM.decode``
as the runtime runs it: under ONNX Runtime one graph call) per step for all of them.
Each sequence keeps its own temperature / top-k / top-p, length and seeded draws; a sequence that is done leaves
after the step that finished it, and a request that arrives while a slot is free ends the running block, so it
joins at the next step: its prompt is run through ``forward`` (the prefill) and its state is concatenated onto the
slot tensors. A recurrent model's state is a fixed-size tuple of tensors per sequence -- an LSTM's (h, c), a GRU's
or plain RNN's (h,), each ``[layers, B, hidden]`` -- so a slot costs ``len(state) * layers * hidden`` floats and
joining or leaving is one ``torch.cat`` / index per member. The scheduler only ever handles the tuple as a whole
(``_cat_rows``, ``_split_rows``, ``_rows``), never which cell made it.

Speed: one thread decodes in a tight loop -- admit, a block of steps (about ``block_s`` of compute), hand the new
tokens to their consumers, again -- and never waits for an event loop, so the model is busy whenever there is work;
torch releases the GIL while it computes, so the replica's event loop streams to clients and takes requests
meanwhile. Per step there is one model call that also samples and no Python work per sequence: the
per-row sampling settings are tensors built when the batch changes, each sequence's uniform draws are made when it
joins, and the steps at which rows finish are known from their lengths. Prompts joining together are prefilled in
one forward per prompt length, and the state after each of the last PROMPT_STATES prompts is kept, so a repeated
prompt joins with no forward at all (with 32 clients sending the same prompt, 4-6 % more characters/s). Consumers
are woken with one ``call_soon_threadsafe`` per block: a streaming one at most every ``stream_interval_s``,
stretched so that all streams together make about ``stream_events_per_s`` chunks (each is an event through Ray and
HTTP; one per character cost more than the decoding), a plain one once, at the end -- at the step that finished it,
not at the block's end, so that its client's next request finds the slot free (with 32 clients on 2 cores, up to a
block's 20 ms per request left slots empty).

Determinism: a sequence's tokens depend only on its prompt, its parameters and its seed (one uniform draw per
step from its own generator, drawn ahead in one call, which gives the same numbers), never on which other
sequences share the batch; decoding is the same as ``CharLMPredictor.generate``, so the CLI and the service agree
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
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from rnnlab.sampling import (NonFiniteScores, RowSampling, SamplingParams, draws, per_row_params,
                             token_logprobs)

logger = logging.getLogger(__name__)

MAX_STEPS_PER_BLOCK = 64
IDLE_EXIT_S = 10.0  # the decoding thread ends after this long with nothing to do (the next request restarts it)


class Chunk(NamedTuple):
    ids: list[int]
    last: bool  # no more chunks follow: the sequence is complete
    # with ``generate(logprobs=N)``: per id, (its log-probability, [(alternative id, log-probability)] * N)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


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
    loop: asyncio.AbstractEventLoop  # the consumer's: woken from the decoding thread with call_soon_threadsafe
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[int] = field(default_factory=list)
    uniforms: torch.Tensor | None = None  # all of the sequence's draws, made when it joins
    next_id: int = -1  # the token fed at the next step (set by the prefill)
    done: bool = False
    error: str | None = None
    cancelled: bool = False
    last_wake: float = 0.0
    told_done: bool = False  # its consumer was woken after it finished (once is enough)
    logprobs: int | None = None  # alternatives asked per token; None: no log-probabilities at all
    logprob_out: list = field(default_factory=list)  # per token: (log-probability, [(id, log-probability)])

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)


# Prompts whose state after the prefill is kept: clients repeat prompts (a playground's, an application's fixed
# prefix), and a kept state is a fraction of a prompt's forward pass to reuse (an LSTM of 2 x 512: 8 KB a prompt).
PROMPT_STATES = 256


class GenerationScheduler:
    """Decodes all active sequences together; see the module docstring.

    ``model`` is a CharLSTM of any cell, as a runtime runs it (rnnlab/runtime.py: torch or ONNX Runtime):
    ``forward(ids[B, T], state) -> (logits[B, T, V], state)``,
    ``step(ids[B], state) -> (logits[B, V], state)`` and ``init_state(B, device)``, the state a tuple of
    ``[layers, B, hidden]`` tensors. ``max_batch_size`` bounds the sequences decoded together;
    further requests wait (FIFO) for a free slot. ``max_batch_size=1`` is "one request at a time".
    """

    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 64, device: str | torch.device = "cpu",
                 block_s: float = 0.02, stream_interval_s: float = 0.1, stream_events_per_s: float = 100.0,
                 log: logging.Logger = logger) -> None:
        self.model = model
        self.log = log  # the Serve deployment passes Serve's logger, whose lines land in the replica's log file
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.block_s = block_s
        self.stream_interval_s = stream_interval_s
        self.stream_events_per_s = stream_events_per_s
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        # the batch, row i = self._active[i]
        self._state: tuple[torch.Tensor, ...] | None = None  # (h, c) or (h,), each [layers, B, hidden]
        self._ids: torch.Tensor | None = None  # [B] the tokens fed at the next step
        self._sampling: RowSampling | None = None  # per-row temperature, top_k, top_p
        self._step_s = 0.0  # running estimate of one step's time, to size blocks
        self._unexplained = 0  # step failures in a row that no single row reproduced
        # the state after each of the last PROMPT_STATES prompts (all but their last character), most recent last
        self._prompt_states: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, ...]] = \
            collections.OrderedDict()
        self._wakeup = threading.Event()  # set when a request arrives or leaves
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # starting the thread
        # statistics, exposed by /v1/models
        self.step_sizes: collections.Counter[int] = collections.Counter()
        self.counts = collections.Counter(joined=0, finished=0, cancelled=0, failed=0, tokens=0)
        self.decode_s = 0.0  # time spent decoding (steps, sampling, bookkeeping): busy time, vs wall-clock

    # --- public ------------------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, request_id: str | None = None,
                       stream: bool = True, logprobs: int | None = None) -> AsyncIterator[Chunk]:
        """Yield the new token ids in chunks: with ``stream`` every ``stream_interval_s`` or so, else all at once
        at the end; the final chunk says so (``last``), so that a consumer can end its answer in the same message.
        With ``logprobs`` (0 or more alternatives) each chunk also carries every token's log-probability and the
        ``logprobs`` most likely tokens at that step (``rnnlab.sampling.token_logprobs``); sampling is unchanged.
        Raises GenerationFailed if the sequence failed. Closing the iterator (a client that went away) frees the
        slot before the next block."""
        sequence = _Sequence(list(prompt_ids), params.with_seed(), request_id or secrets.token_hex(8), stream,
                             asyncio.get_running_loop(), logprobs=logprobs)
        self._waiting.append(sequence)
        self._ensure_running()
        self._wakeup.set()
        sent = 0
        try:
            while True:
                await sequence.wake.wait()
                sequence.wake.clear()
                if len(sequence.tokens) > sent:
                    chunk = sequence.tokens[sent:]
                    # logprob_out is extended before tokens (_flush), so it covers every token seen here
                    scores = sequence.logprob_out[sent : sent + len(chunk)] if logprobs is not None else None
                    sent += len(chunk)
                    last = sequence.done and sequence.error is None and sent == len(sequence.tokens)
                    yield Chunk(chunk, last, scores)
                    if last:
                        return
                if sequence.error is not None:
                    raise GenerationFailed(sequence.request_id, sequence.error)
                if sequence.done and sent == len(sequence.tokens):
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
            "waiting": sum(not s.cancelled for s in list(self._waiting)),  # list(): one atomic copy
            "steps": steps,
            "batch_size_histogram": {str(k): sizes[k] for k in sorted(sizes)},
            "batch_size_max": max(sizes, default=0),
            "batch_size_mean": (sum(k * n for k, n in sizes.items()) / steps) if steps else 0.0,
            "decode_s": round(self.decode_s, 3),
            **dict(self.counts),
        }

    # --- the loop ----------------------------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="rnnlab-decode", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        """The decoding thread: admit, decode a block, hand chunks to the consumers' loops, again. It never waits
        for an event loop, so the model is busy whenever there is work (torch releases the GIL while it
        computes, so the loops stream to clients and take requests meanwhile)."""
        while True:
            touched: list[_Sequence] = []
            try:
                self._drop_cancelled()
                touched += self._admit()
                if self._active:
                    touched += self._active
                    self._decode_block()
            except Exception as error:  # noqa: BLE001 -- a bug outside a step: fail what is in flight, keep serving
                self.log.exception("rnnlab generate: the decoding loop failed; failing the requests in flight")
                for sequence in [*self._active, *list(self._waiting)]:
                    self._fail(sequence, _reason(error))
                    touched.append(sequence)
                self._active, self._state, self._ids, self._sampling = [], None, None, None
                self._waiting.clear()
            self._notify(touched)
            if not self._active:
                self._wakeup.clear()
                if not self._waiting and not self._wakeup.wait(IDLE_EXIT_S):
                    with self._lock:  # idle: end the thread unless a request arrived just now
                        if not self._waiting:
                            self._thread = None
                            return

    def _notify(self, sequences: list[_Sequence]) -> None:
        """Wake the consumers that have something for their client: finished sequences, and streams whose last
        chunk is older than the interval. Every chunk is an event through Ray and HTTP to a client (about a
        millisecond of CPU on the way), so the interval grows with the number of streams to keep the total near
        ``stream_events_per_s``: 10 chunks a second each for a few streams, fewer and longer ones for many.
        One ``call_soon_threadsafe`` per consumer loop (a replica has one), not one per sequence."""
        now = time.perf_counter()
        streams = sum(s.streaming for s in self._active)
        interval = max(self.stream_interval_s, streams / self.stream_events_per_s)
        due: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
        for sequence in dict.fromkeys(sequences):  # unique, in order
            if sequence.done:
                if sequence.told_done:
                    continue
                sequence.told_done = True
            elif not (sequence.streaming and now - sequence.last_wake >= interval):
                continue
            sequence.last_wake = now
            due.setdefault(sequence.loop, []).append(sequence.wake)
        for loop, events in due.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                pass

    def _fail(self, sequence: _Sequence, reason: str) -> None:
        """Mark one sequence failed and log one line with its request id (its consumer is woken by ``_notify``)."""
        self.log.error("rnnlab generate: request %s failed: %s", sequence.request_id, reason)
        sequence.error, sequence.done = reason, True
        self.counts["failed"] += 1

    # --- joining -----------------------------------------------------------------------------------------------
    def _admit(self) -> list[_Sequence]:
        """Move waiting requests into free slots; returns those that failed on the way."""
        joined, failed = [], []
        while self._waiting and len(self._active) + len(joined) < self.max_batch_size:
            sequence = self._waiting.popleft()
            if sequence.cancelled:
                self.counts["cancelled"] += 1
            else:
                joined.append(sequence)
        if not joined:
            return failed
        states = {}
        # one forward per prompt length for the prompts joining together, not one per request
        by_length: dict[int, list[_Sequence]] = collections.defaultdict(list)
        for sequence in joined:
            by_length[len(sequence.prompt_ids)].append(sequence)
        for group in by_length.values():
            try:
                states.update(zip(group, self._prefill(group)))
            except Exception:  # noqa: BLE001 -- find the one at fault: each alone
                for sequence in group:
                    try:  # one sequence's prefill failing fails that sequence only
                        states.update(zip([sequence], self._prefill([sequence])))
                    except Exception as error:  # noqa: BLE001 -- a fault of this sequence, reported to its client
                        self._fail(sequence, _reason(error))
                        failed.append(sequence)
        joined = [s for s in joined if s in states]
        if not joined:
            return failed
        state = _cat_rows([states[s] for s in joined])
        ids = torch.tensor([s.next_id for s in joined], dtype=torch.long, device=self.device)
        if self._state is not None:
            state = _cat_rows([self._state, state])
            ids = torch.cat([self._ids, ids])
        self._state, self._ids = state, ids
        self._active.extend(joined)
        self._sampling = per_row_params([s.params for s in self._active], self.device)
        self.counts["joined"] += len(joined)
        return failed

    @torch.inference_mode()
    def _prefill(self, group: list[_Sequence]) -> list[tuple[torch.Tensor, ...]]:
        """Run prompts of one length except their last character through forward(); the last one is the first
        step's input, so every sequence, new or old, advances by exactly one step() per iteration. Also makes each
        sequence's draws. Returns each one's state: a prompt seen lately takes its state from the cache."""
        for sequence in group:
            sequence.uniforms = draws(sequence.params)
            sequence.next_id = sequence.prompt_ids[-1]
        if len(group[0].prompt_ids) == 1:
            return _split_rows(self.model.init_state(len(group), self.device))
        keys = [tuple(s.prompt_ids[:-1]) for s in group]
        states = [self._prompt_states.get(key) for key in keys]
        missing = [row for row, state in enumerate(states) if state is None]
        if missing:
            ids = torch.tensor([keys[row] for row in missing], dtype=torch.long, device=self.device)
            _, state = self.model.forward(ids)
            for row, computed in zip(missing, _split_rows(state)):
                states[row] = self._prompt_states[keys[row]] = tuple(t.clone() for t in computed)
        for key in keys:
            self._prompt_states.move_to_end(key)
        while len(self._prompt_states) > PROMPT_STATES:
            self._prompt_states.popitem(last=False)
        return states

    # --- decoding ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode_block(self) -> None:
        """About ``block_s`` of steps for the active batch (runs in a worker thread while the loop waits)."""
        steps = max(1, min(MAX_STEPS_PER_BLOCK, int(self.block_s / self._step_s) if self._step_s else 1))
        uniforms = self._block_uniforms(steps)
        segment: list[torch.Tensor] = []  # sampled ids per step since the batch last changed
        scored: list[tuple[torch.Tensor, ...]] = []  # per step, for the rows asking for log-probabilities
        asking = self._asking_logprobs()
        # rows finish at known steps (their lengths), so no per-row check is needed at each step
        until_finish = min(s.remaining for s in self._active)
        step = 0
        started = time.perf_counter()
        while step < steps and self._active:
            if self._waiting and len(self._active) < self.max_batch_size:
                break  # a request waits for a free slot: end the block so that it joins at the next step
            try:
                ids, state, logits = self.model.decode(self._ids, self._state, self._sampling, uniforms[step])
            except Exception as error:  # noqa: BLE001 -- isolate the rows at fault, retry without them
                self._flush(segment, scored, asking)
                keep = self._rows_not_at_fault(error, uniforms[step])
                self._retain(keep)
                uniforms = uniforms[:, keep]
                asking = self._asking_logprobs()
                until_finish = min((s.remaining for s in self._active), default=0)
                continue
            self._unexplained = 0
            self._state, self._ids = state, ids
            segment.append(ids)
            if asking is not None:
                rows, top_n = asking
                scored.append(token_logprobs(logits.index_select(0, rows), ids.index_select(0, rows), top_n))
            self.step_sizes[len(self._active)] += 1
            self.counts["tokens"] += len(self._active)
            step += 1
            if len(segment) == until_finish:
                self._flush(segment, scored, asking)
                keep, finished = [], []
                for row, sequence in enumerate(self._active):
                    if sequence.remaining:
                        keep.append(row)
                    else:
                        sequence.done = True
                        finished.append(sequence)
                self.counts["finished"] += len(finished)
                self._retain(keep)
                self._notify(finished)  # now, not at the block's end: its client's next request can take the slot
                uniforms = uniforms[:, keep]
                asking = self._asking_logprobs()
                until_finish = min((s.remaining for s in self._active), default=0)
        self._flush(segment, scored, asking)
        self.decode_s += time.perf_counter() - started
        if step:
            elapsed = (time.perf_counter() - started) / step
            self._step_s = elapsed if not self._step_s else 0.8 * self._step_s + 0.2 * elapsed

    def _block_uniforms(self, steps: int) -> torch.Tensor:
        """[steps, B]: column i holds row i's next ``steps`` draws (zeros past its end; it leaves before using them),
        so that a step's draws are one contiguous row."""
        block = torch.zeros(steps, len(self._active))
        for row, sequence in enumerate(self._active):
            drawn = sequence.uniforms[len(sequence.tokens) : len(sequence.tokens) + steps]
            block[: len(drawn), row] = drawn
        return block

    def _flush(self, segment: list[torch.Tensor], scored: list | None = None, asking=None) -> None:
        """Hand the segment's sampled ids to their sequences (one tensor-to-list per segment, not per step), and
        the log-probabilities of the rows that asked, before their ids (a consumer reading ``tokens`` meanwhile
        finds the log-probabilities of all of them)."""
        if not segment:
            return
        if scored:
            rows, _ = asking
            chosen, values, ids = (torch.stack(parts, dim=1).tolist() for parts in zip(*scored))
            for row, lps, top_lps, top_ids in zip(rows.tolist(), chosen, values, ids):
                n = self._active[row].logprobs
                self._active[row].logprob_out.extend(
                    (lp, list(zip(i[:n], v[:n]))) for lp, v, i in zip(lps, top_lps, top_ids))
            scored.clear()
        for sequence, tokens in zip(self._active, torch.stack(segment, dim=1).tolist()):
            sequence.tokens.extend(tokens)
        segment.clear()

    def _asking_logprobs(self) -> tuple[torch.Tensor, int] | None:
        """(rows of the active batch that asked for log-probabilities, the most alternatives any asked), or None
        when none did: then a step computes nothing for them (looked at once per block and batch change)."""
        rows = [row for row, sequence in enumerate(self._active) if sequence.logprobs is not None]
        if not rows:
            return None
        top_n = max(self._active[row].logprobs for row in rows)
        return torch.tensor(rows, dtype=torch.long, device=self.device), top_n

    def _rows_not_at_fault(self, error: Exception, uniforms: torch.Tensor) -> list[int]:
        """After a failed step: fail the sequences at fault, return the rows to go on with."""
        if isinstance(error, NonFiniteScores):
            at_fault = set(error.rows)
        else:  # find them: step each row alone (rare, so the cost does not matter)
            at_fault = set()
            for row in range(len(self._active)):
                try:
                    self.model.decode(self._ids[row : row + 1], _rows(self._state, [row]),
                                      self._sampling.rows(torch.tensor([row])), uniforms[row : row + 1])
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
        """Drop the active sequences whose client left (nobody to notify)."""
        keep = [i for i, s in enumerate(self._active) if not s.cancelled]
        dropped = len(self._active) - len(keep)
        if dropped:
            self.counts["cancelled"] += dropped
            self._retain(keep)
        # waiting ones that were cancelled are skipped by _admit (the deque is shared with the loops: not rebuilt)

    def _retain(self, keep: list[int]) -> None:
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._state, self._ids, self._sampling = None, None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._state = _rows(self._state, index)
        self._ids = self._ids.index_select(0, index)
        self._sampling = self._sampling.rows(index)


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


# A state is a tuple of [layers, B, hidden] tensors ((h, c) for an LSTM, (h,) for a GRU or RNN); rows are dim 1.
def _rows(state: tuple[torch.Tensor, ...], rows) -> tuple[torch.Tensor, ...]:
    """The state of the given rows (a list or an index tensor), in that order."""
    index = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.long, device=state[0].device)
    return tuple(t.index_select(1, index) for t in state)


def _split_rows(state: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """One state per row (views, each with a batch of one)."""
    return [tuple(t[:, i : i + 1] for t in state) for i in range(state[0].size(1))]


def _cat_rows(states: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The states' rows one after the other: the inverse of ``_split_rows``."""
    return tuple(torch.cat(parts, dim=1) for parts in zip(*states, strict=True))


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
