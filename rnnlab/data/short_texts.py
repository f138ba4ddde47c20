"""Short texts cut from IMDb reviews, each keeping its review's label: what users of the sentiment service send
(a line, a sentence) rather than the whole reviews the models train and are scored on.

:func:`write_short_texts` writes one ``text,label,review`` CSV per slice (what ``rnnlab evaluate BUNDLE --data``
reads; ``review`` names the file the text comes from, e.g. ``test/pos/12_8``) and ``slices.json``, once, the
same for the same seed:

* ``whole``: the review itself, the reference the short slices are compared with;
* ``first_sentence``, ``last_sentence``, ``random_sentence``: sentences of the RAW text, before the tokenizer
  drops what marks them (``<br />``, and ``.`` ``!`` ``?`` followed by a space), fragments of fewer than
  :data:`MIN_WORDS` words left out; a review with no such sentence has none in these slices;
* ``window_10``, ``window_20``, ``window_40``: that many consecutive tokens (rnnlab's tokenizer, joined by spaces)
  from a seeded random start; a shorter review whole.

The reviews are the sentiment job's test split, or its validation split (the training reviews a run with
``data.val_fraction`` and ``train.seed`` holds out: :func:`rnnlab.data.imdb.review_splits`), where recipes are
chosen without looking at test.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlab.data.imdb import review_splits, tokenize
from rnnlab.data.reviews import Review
from rnnlab.errors import DataError
from rnnlab.files import atomic_write

MIN_WORDS = 3  # a shorter fragment ("Why?", "10/10.", "Mr.") says too little to carry the review's label
WINDOWS = (10, 20, 40)
SENTENCE_SLICES = ("first_sentence", "last_sentence", "random_sentence")
SLICES = ("whole", *SENTENCE_SLICES, *(f"window_{n}" for n in WINDOWS))
SPLITS = ("test", "val")
MANIFEST = "slices.json"

_BREAK = re.compile(r"<br\s*/?>|\n", re.IGNORECASE)  # a line break in a review ends its sentence
# a run of end marks, any closing quotes or brackets, then a space, the end of the line or a capital letter
# (reviewers often leave out the space: "a sequel.The first one")
_END = re.compile(r"""([.!?]+)["')\]]*(?=\s|$|[A-Z])""")
# a period after these is part of the sentence (titles, "vs."), as after an initial ("J. R. R. Tolkien") or in an
# acronym ("E.T.", "U.S.")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "prof", "mt"})
_ACRONYM = re.compile(r"(?:[a-z]\.)*[a-z]")


@dataclass(frozen=True)
class ShortText:
    text: str
    label: int  # its review's: 1 positive, 0 negative
    review: str  # the review's file inside aclImdb, without .txt: "test/pos/12_8"


def split_sentences(text: str) -> list[str]:
    """The sentences of a raw review, in order, whitespace collapsed: it breaks at ``<br />`` and new lines, and
    after ``.`` ``!`` ``?`` (and closing quotes) followed by a space or a capital letter, but not after an
    ellipsis, an initial, an acronym (``E.T.``) or a title such as ``Mr.``. Fragments of any length are kept;
    :func:`sentences` drops the short ones."""
    pieces = []
    for line in _BREAK.split(text):
        start = 0
        for match in _END.finditer(line):
            if _ends_sentence(match.group(1), line[start : match.start()]):
                pieces.append(line[start : match.end()])
                start = match.end()
        pieces.append(line[start:])
    return [" ".join(piece.split()) for piece in pieces if piece.strip()]


def _ends_sentence(marks: str, before: str) -> bool:
    if marks != "." and "!" not in marks and "?" not in marks:  # "..." pauses within a sentence
        return False
    if marks == ".":
        words = before.split()
        last = words[-1].lower().lstrip("\"'([") if words else ""
        return not (_ACRONYM.fullmatch(last) or last in _ABBREVIATIONS)
    return True


def sentences(text: str) -> list[str]:
    """:func:`split_sentences` without fragments of fewer than :data:`MIN_WORDS` words (tokens, as models read)."""
    return [sentence for sentence in split_sentences(text) if len(tokenize(sentence)) >= MIN_WORDS]


def cut_slices(reviews: Sequence[Review], split: str, seed: int) -> dict[str, list[ShortText]]:
    """Every slice of :data:`SLICES` cut from ``reviews`` (of the aclImdb folder ``split``: "test" or "train"),
    in the reviews' order. Each slice draws from its own generator (``seed``, its place in SLICES), so each is
    the same for the same seed whatever the others hold."""
    rngs = {name: np.random.default_rng([seed, index]) for index, name in enumerate(SLICES)}
    slices: dict[str, list[ShortText]] = {name: [] for name in SLICES}
    for review in reviews:
        name = f"{split}/{'pos' if review.label == 1 else 'neg'}/{review.id}_{review.rating}"
        found = sentences(review.text)
        cuts = {"whole": review.text}
        if found:
            cuts |= {"first_sentence": found[0], "last_sentence": found[-1],
                     "random_sentence": found[rngs["random_sentence"].integers(len(found))]}
        tokens = tokenize(review.text)
        for size in WINDOWS:
            start = rngs[f"window_{size}"].integers(len(tokens) - size + 1) if len(tokens) > size else 0
            cuts[f"window_{size}"] = " ".join(tokens[start : start + size])
        for slice_name, text in cuts.items():
            slices[slice_name].append(ShortText(text, review.label, name))
    return slices


def write_short_texts(
    output: str | os.PathLike, source: str | os.PathLike, *, split: str = "test", seed: int = 0,
    val_fraction: float = 0.1, val_seed: int = 0,
) -> dict:
    """Cut the slices of the sentiment job's ``split`` ("test", or "val": the reviews held out of train by
    ``val_fraction`` and ``val_seed``) of the IMDb ``source``, and write ``output/<slice>.csv`` and ``slices.json``
    (the settings and each slice's size). ``output``'s parent must exist. Returns what slices.json holds."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; choose test (the test reviews) or val (the validation reviews).")
    output = Path(output).expanduser()
    _make_folder(output)
    reviews = review_splits(source, val_fraction=val_fraction, seed=val_seed)[split]
    slices = cut_slices(reviews, "test" if split == "test" else "train", seed)
    manifest = {
        "source": str(source), "split": split, "seed": seed, "min_words": MIN_WORDS,
        **({"val_fraction": val_fraction, "val_seed": val_seed} if split == "val" else {}),
        "reviews": len(reviews),
        "slices": {name: _describe(texts) for name, texts in slices.items()},
    }
    try:
        for name, texts in slices.items():
            with atomic_write(output / f"{name}.csv", "w") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(("text", "label", "review"))
                writer.writerows((text.text, text.label, text.review) for text in texts)
        with atomic_write(output / MANIFEST, "w") as handle:
            handle.write(json.dumps(manifest, indent=2) + "\n")
    except OSError as error:
        raise DataError(f"Cannot write the slices into {output} ({error.strerror}); pick a folder you can write.") \
            from None
    return manifest


def _make_folder(output: Path) -> None:
    if not output.parent.is_dir():
        raise DataError(f"The folder {output.parent} does not exist; create it or pick another --output.")
    try:
        output.mkdir(exist_ok=True)
    except FileExistsError:
        raise DataError(f"{output} is a file, not a folder; pick another --output.") from None
    except OSError as error:
        raise DataError(f"Cannot create {output} ({error.strerror}); pick a folder you can write.") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise DataError(f"Cannot write into {output} (permission denied); pick a folder you can write.")


def _describe(texts: list[ShortText]) -> dict:
    lengths = np.array([len(tokenize(text.text)) for text in texts], dtype=np.int64)
    return {
        "texts": len(texts),
        "positive": sum(text.label for text in texts),
        "median_tokens": float(np.median(lengths)) if len(lengths) else 0.0,
    }


def read_short_texts(folder: str | os.PathLike) -> dict:
    """``slices.json`` of a folder :func:`write_short_texts` wrote (a DataError naming the command otherwise)."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{folder} holds no readable {MANIFEST}; write the slices with "
                        "`rnnlab data short-texts --output FOLDER`.") from None
