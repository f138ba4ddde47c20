"""A token vocabulary: id <-> token, sorted by frequency, saved as plain JSON.

The same class serves words (IMDb: ``<pad>`` = 0, ``<unk>`` = 1) and characters (charlm: no specials,
``unk_index`` None, so an unknown character is an :class:`InputError` naming it rather than a silent ``<unk>``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from rnnlab.errors import ConfigError, DataError, InputError
from rnnlab.files import atomic_write

_SHOWN_UNKNOWNS = 10  # an error message lists at most this many unknown items


class Vocab:
    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, itos: list[str], unk_index: int | None = None) -> None:
        itos = list(itos)
        stoi = {token: index for index, token in enumerate(itos)}
        if len(stoi) != len(itos):
            duplicates = sorted(token for token, count in Counter(itos).items() if count > 1)
            raise ValueError(f"vocabulary items must be distinct; repeated: {_preview(duplicates)}")
        if unk_index is not None and not 0 <= unk_index < len(itos):
            raise ValueError(f"unk_index {unk_index} is outside a vocabulary of {len(itos)} items")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = stoi
        self.unk_index: int | None = unk_index

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, unk_index={self.unk_index})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos and self.unk_index == other.unk_index

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; unknown ones map to ``unk_index``, or raise InputError when there is none."""
        if self.unk_index is not None:
            get, unk = self.stoi.get, self.unk_index
            return [get(token, unk) for token in tokens]
        tokens = list(tokens)
        try:
            return [self.stoi[token] for token in tokens]
        except KeyError:
            raise InputError(
                f"The input holds items outside the vocabulary ({_preview(self.unknown(tokens))}); "
                f"remove or replace them."
            ) from None

    def decode(self, ids: Iterable[int]) -> list[str]:
        itos, size = self.itos, len(self.itos)
        tokens = []
        for index in ids:
            index = int(index)
            if not 0 <= index < size:
                raise InputError(f"Token id {index} is outside the vocabulary of {size} items.")
            tokens.append(itos[index])
        return tokens

    def unknown(self, tokens: Iterable[str]) -> list[str]:
        """The distinct tokens not in the vocabulary, sorted (for error messages)."""
        return sorted({token for token in tokens if token not in self.stoi})

    def to_json(self) -> dict:
        return {"itos": list(self.itos), "unk_index": self.unk_index}

    @classmethod
    def from_json(cls, d: dict) -> Vocab:
        if not isinstance(d, Mapping) or not isinstance(d.get("itos"), list):
            raise DataError("The vocabulary JSON has no 'itos' list; rebuild the vocabulary or the bundle.")
        unk_index = d.get("unk_index")
        if unk_index is not None and not isinstance(unk_index, int):
            raise DataError("The vocabulary JSON's 'unk_index' is not an integer or null; rebuild the vocabulary.")
        try:
            return cls([str(token) for token in d["itos"]], unk_index)
        except ValueError as error:
            raise DataError(f"The vocabulary JSON is inconsistent ({error}); rebuild the vocabulary.") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file + rename), so a crash never leaves half a vocabulary."""
        path = Path(path)
        with atomic_write(path, "w") as handle:
            handle.write(json.dumps(self.to_json(), ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"The vocabulary file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"The vocabulary file {path} is not readable JSON ({error}); rebuild it.") from None
        try:
            return cls.from_json(data)
        except DataError as error:
            raise DataError(f"{path}: {error}") from None


def vocab_from_counts(
    counts: Mapping[str, int],
    *,
    min_freq: int = 1,
    max_size: int | None = None,
    specials: Iterable[str] = (Vocab.PAD, Vocab.UNK),
) -> Vocab:
    """A vocabulary from token counts: specials first, then by frequency desc, ties alphabetical.

    ``max_size`` counts the specials. Tokens rarer than ``min_freq`` are left out (they encode as ``<unk>``).
    """
    specials = list(specials)
    if min_freq < 1:
        raise ConfigError(f"min_freq must be at least 1, got {min_freq}.")
    if max_size is not None and max_size < len(specials):
        raise ConfigError(f"max_size {max_size} is smaller than the {len(specials)} special tokens; raise it.")
    special_set = set(specials)
    kept = [(token, count) for token, count in counts.items() if count >= min_freq and token not in special_set]
    # Sorting on (-count, token) makes the order independent of the order tokens were seen in.
    kept.sort(key=lambda item: (-item[1], item[0]))
    itos = specials + [token for token, _ in kept]
    if max_size is not None:
        itos = itos[:max_size]
    unk_index = specials.index(Vocab.UNK) if Vocab.UNK in special_set else None
    return Vocab(itos, unk_index)


def build_vocab(
    token_lists: Iterable[Iterable[str]],
    *,
    min_freq: int = 1,
    max_size: int | None = None,
    specials: Iterable[str] = (Vocab.PAD, Vocab.UNK),
) -> Vocab:
    """Count tokens over ``token_lists`` and build a :class:`Vocab` (see :func:`vocab_from_counts`).

    For characters pass strings: ``build_vocab([text], specials=())``.
    """
    counts: Counter[str] = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    return vocab_from_counts(counts, min_freq=min_freq, max_size=max_size, specials=specials)


def _preview(items: list[str]) -> str:
    shown = ", ".join(repr(item) for item in items[:_SHOWN_UNKNOWNS])
    more = len(items) - _SHOWN_UNKNOWNS
    return shown + (f" and {more} more" if more > 0 else "")
