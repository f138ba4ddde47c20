r"""The charlm pipeline: a text file -> character ids -> contiguous splits -> batches.

Reading. ``read_text`` decodes UTF-8 (strictly: a non-UTF-8 file is a ``DataError``), strips a leading
byte-order mark, turns ``\r\n`` and lone ``\r`` into ``\n`` (as Python's text mode does; War and Peace has CRLF
line ends, which would otherwise add a ``\r`` character to every line) and lowercases by default.
*War and Peace* starts with a BOM; the chapter read it with a plain ``open().read()``, which keeps the BOM as a
character, so its figures (3,196,213 characters, 57 distinct) count U+FEFF once. With the BOM stripped (our
default) the lowercased text has 3,196,212 characters, 56 distinct; ``strip_bom=False`` reproduces the chapter's
reading exactly.

Vocabulary. ``build_char_vocab`` returns a ``Vocab`` of single characters sorted by frequency (ties
alphabetically), with no specials and ``unk_index=None``. It is built on the WHOLE text, so validation and test
contain no unknown characters. It is saved as JSON with ``Vocab.save``.

Policy for characters outside the vocabulary (prompts at inference): they are never mapped to a stand-in and
never dropped. ``encode_text`` raises ``InputError`` naming the unknown characters (deduplicated, sorted, shown
with ``repr`` so whitespace and control characters are visible). Callers that want to check first use
``unknown_chars``. A model trained on lowercased text knows no capitals: lowercase a prompt the same way as the
training text (the training config records ``lowercase``) before encoding it.

Splits. ``split_contiguous`` cuts the id stream into train / val / test at fixed positions (default 90/5/5),
never shuffling across the boundaries: the boundaries are ``round(n * cumsum(fractions))``.

Batches. Two samplers:

* ``TBPTTBatcher`` (truncated backpropagation through time): the stream is laid out once as ``B`` parallel rows
  (row ``r`` holds the ``r``-th contiguous ``1/B`` of the stream) and window ``k`` is the column slice
  ``[k*T, (k+1)*T)`` of every row, so row ``r`` of window ``k+1`` continues exactly where row ``r`` of window
  ``k`` ended and the hidden state can be carried (detached) from one window to the next. Targets are the inputs
  shifted by one character. Windows are views, never copies; ``window(k)`` gives random access for resuming
  mid-epoch.

  Distributed training: pass ``rank`` and ``world_size`` (e.g. ``accelerator.process_index`` and
  ``accelerator.num_processes``) and keep ``batch_size`` GLOBAL. The global ``[B, N]`` layout is the same on
  every process and process ``rank`` takes rows ``[rank*B/W, (rank+1)*B/W)``, so concatenating the processes'
  windows along dim 0 gives the 1-process window at batch ``B``, and every process has the same number of windows
  (DDP stays in lockstep). With a per-row mean loss, DDP's gradient averaging then equals the 1-process gradient.
  Do not pass the batcher through ``accelerator.prepare``: it is already sharded, and a carried hidden state
  belongs to fixed rows.

* ``random_chunks``: the chapter's sampler for parity runs, ``B`` chunks of ``seq_len + 1`` characters starting at
  uniformly random positions (a ``torch.Generator`` makes it reproducible); no state is carried between batches.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnnlab.data.vocab import Vocab, build_vocab
from rnnlab.errors import ConfigError, DataError, InputError

log = logging.getLogger(__name__)

BOM = "\ufeff"
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
_MAX_SHOWN = 10  # unknown characters named in one error message


# ---------------------------------------------------------------------------------------------------------------
# Reading and encoding


def read_text(path: str | Path, *, lowercase: bool = True, strip_bom: bool = True) -> str:
    """The file's text: strict UTF-8, leading BOM removed (unless ``strip_bom=False``), universal newlines,
    lowercased by default."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"Text file {path} does not exist; check the path given to --source.") from None
    except OSError as error:
        raise DataError(f"Text file {path} cannot be read ({error.strerror}); pass a readable text file.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"Text file {path} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "re-save it as UTF-8."
        ) from None
    if strip_bom and text.startswith(BOM):
        text = text[1:]
    # Universal newlines, as Python's text mode (and so the chapter) reads: War and Peace has CRLF line ends.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip(BOM).strip():
        raise DataError(f"Text file {path} is empty (no characters besides whitespace); pass a file with text in it.")
    return text.lower() if lowercase else text


def build_char_vocab(text: str) -> Vocab:
    """Characters sorted by frequency (ties alphabetically), no specials, ``unk_index=None``."""
    return build_vocab([text], specials=())


def unknown_chars(text: str, vocab: Vocab) -> list[str]:
    """The distinct characters of ``text`` that are not in ``vocab``, sorted."""
    return sorted(set(text) - vocab.stoi.keys())


def encode_text(text: str, vocab: Vocab) -> np.ndarray:
    """Character ids (int64) of ``text``; characters outside the vocabulary raise ``InputError`` naming them.

    Vectorized through a code-point lookup table, so the 3.2M characters of War and Peace take milliseconds.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = _lookup_table(vocab)
    ids = np.full(codes.shape, -1, dtype=np.int64)
    in_range = codes < len(table)
    ids[in_range] = table[codes[in_range]]
    if (ids < 0).any():
        unknown = unknown_chars(text, vocab)
        shown = ", ".join(repr(c) for c in unknown[:_MAX_SHOWN])
        more = f" and {len(unknown) - _MAX_SHOWN} more" if len(unknown) > _MAX_SHOWN else ""
        raise InputError(
            f"The text contains {len(unknown)} character(s) outside the model's vocabulary ({shown}{more}); "
            "remove or replace them."
        )
    return ids


def encode_known(text: str, vocab: Vocab) -> tuple[np.ndarray, Counter]:
    """Character ids of ``text`` with the characters outside ``vocab`` left out, and how often each of those
    occurred (for scoring any text: the skipped characters are reported, not guessed)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = _lookup_table(vocab)
    ids = np.full(codes.shape, -1, dtype=np.int64)
    in_range = codes < len(table)
    ids[in_range] = table[codes[in_range]]
    known = ids >= 0
    skipped = Counter() if known.all() else Counter(ch for ch in text if ch not in vocab.stoi)
    return ids[known], skipped


def decode_ids(ids: Sequence[int] | np.ndarray | torch.Tensor, vocab: Vocab) -> str:
    """The text for a sequence of character ids (the inverse of ``encode_text``)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return "".join(vocab.decode(ids))


def _lookup_table(vocab: Vocab) -> np.ndarray:
    # code point -> id, -1 where the character is unknown. The char vocab holds single characters only.
    items = [(ord(ch), i) for i, ch in enumerate(vocab.itos) if len(ch) == 1]
    table = np.full(max((code for code, _ in items), default=-1) + 1, -1, dtype=np.int64)
    for code, i in items:
        table[code] = i
    return table


# ---------------------------------------------------------------------------------------------------------------
# Splits


def split_contiguous(
    ids: np.ndarray, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[str, np.ndarray]:
    """Cut the stream into contiguous ``train``/``val``/``test`` parts (views), in that order, never shuffled."""
    ids = np.asarray(ids)
    fractions = _checked_fractions(fractions)
    n = len(ids)
    bounds = [0, *(int(round(n * c)) for c in np.cumsum(fractions)[:-1]), n]
    parts = {name: ids[start:end] for name, start, end in zip(SPLITS, bounds[:-1], bounds[1:])}
    for name, fraction in zip(SPLITS, fractions):
        if fraction > 0 and len(parts[name]) < 2:  # one character has no next character to predict
            raise DataError(
                f"The text ({n} characters) is too short for a {name} split of {fraction:g}; "
                "use a longer text or other data.fractions."
            )
    return parts


def _checked_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"data.fractions must be three non-negative numbers (train, val, test) summing to 1, got {list(fractions)}."
        )
    if values[0] == 0:
        raise ConfigError("data.fractions must give the train split a positive share.")
    return values  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Batches


class TBPTTBatcher:
    """Consecutive ``(x, y)`` windows of ``seq_len`` over ``batch_size`` parallel rows of one stream.

    The stream of ``n`` ids is laid out once as ``[batch_size, N]`` with ``N = (n - 1) // batch_size`` (targets
    need one id beyond each input); window ``k`` is columns ``[k*seq_len, (k+1)*seq_len)``. The final partial
    window is dropped by default (constant shapes) or yielded shorter with ``drop_last=False`` (evaluation, so every
    character is scored). What is left out is logged.

    ``rank``/``world_size`` shard the rows across processes: ``batch_size`` is global and must divide by
    ``world_size``; this process yields rows ``[rank*b, (rank+1)*b)``, ``b = batch_size // world_size``, of the
    same global layout (see the module docstring).
    """

    def __init__(
        self,
        ids: np.ndarray | torch.Tensor,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if int(value) != value or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size ({batch_size}) must be a multiple of the number of processes ({world_size}), "
                "since every process takes an equal share of the rows."
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}.")
        stream = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(-1)
        row_len = (len(stream) - 1) // batch_size
        if row_len < (seq_len if drop_last else 1):
            raise DataError(
                f"A stream of {len(stream)} characters is too short for {batch_size} rows of windows of "
                f"{seq_len}; use a smaller train.batch_size or seq_len."
            )
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.drop_last = drop_last
        self.row_len = row_len
        self.num_windows = row_len // seq_len if drop_last else math.ceil(row_len / seq_len)
        self.local_batch_size = batch_size // world_size
        rows = slice(rank * self.local_batch_size, (rank + 1) * self.local_batch_size)
        # Views of the one stream: targets are the same layout shifted by one id. No copies.
        self._inputs = stream[: batch_size * row_len].view(batch_size, row_len)[rows]
        self._targets = stream[1 : batch_size * row_len + 1].view(batch_size, row_len)[rows]
        # (input, target) pairs of the stream that no window covers: the ragged end.
        self.dropped = len(stream) - 1 - batch_size * min(row_len, self.num_windows * seq_len)
        if rank == 0 and self.dropped:
            log.info(
                "TBPTT batcher: %d of %d (input, target) pairs left out (the stream does not divide into "
                "%d rows x windows of %d).", self.dropped, len(stream) - 1, batch_size, seq_len,
            )

    def __len__(self) -> int:
        """Windows per epoch (the same on every rank)."""
        return self.num_windows

    def window(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ``k``: ``x, y`` of shape ``[batch_size // world_size, seq_len]`` (int64), ``y`` = ``x`` shifted."""
        if not 0 <= k < self.num_windows:
            raise IndexError(f"window {k} out of range for {self.num_windows} windows")
        cols = slice(k * self.seq_len, min((k + 1) * self.seq_len, self.row_len))
        return self._inputs[:, cols], self._targets[:, cols]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.window(k) for k in range(self.num_windows))


def random_chunks(
    ids: np.ndarray | torch.Tensor, batch_size: int, seq_len: int = 40, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chapter's sampler: ``batch_size`` chunks of ``seq_len + 1`` ids from uniformly random start positions.

    Returns ``x = chunk[:, :-1]`` and ``y = chunk[:, 1:]``, both ``[batch_size, seq_len]`` int64. Starts are drawn
    with replacement (the chapter's ``DataLoader(shuffle=True)`` draws a batch without replacement; with millions of
    starts the difference is immaterial and this avoids a permutation per batch). Same generator state, same batch.
    """
    stream = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).reshape(-1)
    num_starts = len(stream) - seq_len  # valid starts: 0 .. len - (seq_len + 1)
    if num_starts < 1:
        raise DataError(
            f"A stream of {len(stream)} characters is too short for chunks of {seq_len + 1}; use a shorter seq_len."
        )
    starts = torch.randint(0, num_starts, (batch_size,), generator=generator)
    chunks = stream[starts[:, None] + torch.arange(seq_len + 1)].long()
    return chunks[:, :-1], chunks[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# Loading and summary


@dataclass
class TextData:
    """The vocabulary and the three contiguous id streams (int64)."""

    vocab: Vocab
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def load_text_data(
    path: str | Path,
    *,
    lowercase: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    strip_bom: bool = True,
) -> TextData:
    """Read, build the vocabulary on the whole text, encode, split contiguously."""
    text = read_text(path, lowercase=lowercase, strip_bom=strip_bom)
    vocab = build_char_vocab(text)
    parts = split_contiguous(encode_text(text, vocab), fractions)
    log.info(
        "%s: %d characters, %d distinct; train/val/test %d/%d/%d.",
        path, len(text), len(vocab), *(len(parts[name]) for name in SPLITS),
    )
    return TextData(vocab=vocab, **parts)


def summarize_text(
    path: str | Path,
    *,
    lowercase: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    strip_bom: bool = True,
    top: int = 10,
) -> dict:
    """What ``rnnlab data text`` prints: size, distinct characters, split sizes, the most frequent characters."""
    text = read_text(path, lowercase=lowercase, strip_bom=strip_bom)
    counts = Counter(text)
    fractions = _checked_fractions(fractions)
    sizes = {name: len(part) for name, part in split_contiguous(np.empty(len(text), np.int8), fractions).items()}
    return {
        "characters": len(text),
        "distinct": len(counts),
        "case": "lowercased" if lowercase else "as written",
        "lines": text.count("\n"),
        "splits": sizes,
        # repr() keys make spaces and newlines visible in both the listing and the JSON
        "most_common": {repr(char): count for char, count in counts.most_common(top)},
    }
