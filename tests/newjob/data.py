"""Examples of where sentences end: a text -> character ids -> one example per word end.

An example is the window of the last ``window`` characters up to and including a word's last letter; its label is
1 when the next character ends a sentence (``.``, ``!`` or ``?``), else 0. Word ends too early in the text for a
whole window are left out. The text is read as rnnlab's charlm reads it (``rnnlab.data.text.read_text``).
"""

from __future__ import annotations

import re

import numpy as np

from rnnlab.data.vocab import Vocab
from rnnlab.errors import DataError

END_MARKS = ".!?"
WORD = re.compile(r"[^\W\d_]+")  # a run of letters


def pad_id(vocab: Vocab) -> int:
    """What fills a window before the text starts: a space, as if the text followed a blank."""
    return vocab.stoi.get(" ", 0)


def encode(text: str, vocab: Vocab) -> tuple[np.ndarray, int]:
    """Character ids (int16) of ``text``, characters outside ``vocab`` read as the pad; and how many there were."""
    if len(vocab) > np.iinfo(np.int16).max:
        raise DataError(f"The text has {len(vocab):,} distinct characters, more than a window stores; use a text "
                        "of fewer (lowercase it).")
    lookup, pad = vocab.stoi, pad_id(vocab)
    ids = np.fromiter((lookup.get(ch, -1) for ch in text), dtype=np.int16, count=len(text))
    unknown = int((ids < 0).sum())
    ids[ids < 0] = pad
    return ids, unknown


def examples(text: str, vocab: Vocab, window: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every word end's window ``[n, window]`` (int16 ids) and label ``[n]`` (float32, 1 = a sentence ends after
    it), in text order; and how many characters ``vocab`` did not know."""
    ids, unknown = encode(text, vocab)
    ends = np.array([m.end() for m in WORD.finditer(text) if window <= m.end() < len(text)], dtype=np.int64)
    if len(ends) == 0:
        raise DataError(f"The text has no word after its first {window} characters; pass a longer text.")
    labels = np.fromiter((text[end] in END_MARKS for end in ends), dtype=np.float32, count=len(ends))
    windows = np.lib.stride_tricks.sliding_window_view(ids, window)[ends - window]
    return windows, labels, unknown


def split(count: int, val_fraction: float, test_fraction: float) -> dict[str, slice]:
    """Contiguous train / val / test ranges of ``count`` examples in text order (the text is never shuffled across
    them: neighbouring windows overlap)."""
    val_start = round(count * (1 - val_fraction - test_fraction))
    test_start = round(count * (1 - test_fraction))
    if not 0 < val_start < test_start < count:
        raise DataError(f"{count} examples leave a split empty at data.val_fraction={val_fraction} and "
                        f"data.test_fraction={test_fraction}; pass a longer text.")
    return {"train": slice(0, val_start), "val": slice(val_start, test_start), "test": slice(test_start, count)}
