"""Token streams for the review language model: the labelled TRAINING reviews and the 50,000 unlabelled ones.

* The vocabulary is the sentiment job's, built by :func:`rnnlab.data.imdb.load_sentiment_data` with the same
  ``val_fraction``, ``seed``, ``min_freq`` and ``max_vocab``: so a sentiment model can start from the LM's
  embedding, and the sentiment validation reviews stay out of both.
* train: the sentiment training reviews (minus its validation hold-out) and the unlabelled reviews minus two
  held-out blocks; val / test: those blocks of ``heldout_reviews`` unlabelled reviews each (perplexity on text
  the LM never read). The TEST reviews of IMDb are never read here.
* Reviews are shuffled (seeded) and concatenated into one stream per split, each review followed by ``<pad>``
  (id 0) as an end-of-review mark, so the model learns where one review stops and state never needs resetting.

The unlabelled reviews are tokenized once and cached under ``cache_dir()/imdb`` like the labelled ones
(vocabulary-independent ids, so a new vocabulary never makes the cache stale).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlab.data import imdb
from rnnlab.data.reviews import source_fingerprint
from rnnlab.data.sources import cache_dir
from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError
from rnnlab.files import atomic_write

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1
END_OF_REVIEW = 0  # <pad>: never inside a review, so it can mark where one ends


@dataclass
class ReviewLMData:
    vocab: Vocab  # the sentiment vocabulary (same settings -> the same vocabulary)
    train: np.ndarray  # int64 token ids, reviews concatenated, each ended by END_OF_REVIEW
    val: np.ndarray
    test: np.ndarray
    reviews: dict[str, int]  # reviews per split


def load_review_lm_data(
    path: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_freq: int = 1,
    max_vocab: int | None = None,
    heldout_reviews: int = 1000,
    cache: bool = True,
) -> ReviewLMData:
    if heldout_reviews < 1:
        raise ConfigError(f"data.heldout_reviews must be a positive number of reviews, got {heldout_reviews}.")
    sentiment = imdb.load_sentiment_data(path, val_fraction=val_fraction, seed=seed, min_freq=min_freq,
                                         max_vocab=max_vocab, max_length=None, cache=cache)
    vocab = sentiment.vocab
    unsup = unlabelled_reviews(path, vocab, cache=cache)
    if 2 * heldout_reviews >= len(unsup):
        raise ConfigError(f"data.heldout_reviews={heldout_reviews} leaves no unlabelled review to train on "
                          f"({len(unsup)} in all); choose fewer.")
    order = np.random.default_rng(seed).permutation(len(unsup))
    val = [unsup[i] for i in order[:heldout_reviews]]
    test = [unsup[i] for i in order[heldout_reviews : 2 * heldout_reviews]]
    train = [unsup[i] for i in order[2 * heldout_reviews :]] + [np.asarray(r, np.int64) for r in sentiment.train.ids]
    train = [train[i] for i in np.random.default_rng([seed, 1]).permutation(len(train))]
    data = ReviewLMData(vocab=vocab, train=_stream(train), val=_stream(val), test=_stream(test),
                        reviews={"train": len(train), "val": len(val), "test": len(test)})
    log.info("review LM: %s reviews, %s tokens (train/val/test); vocabulary %d",
             "/".join(str(n) for n in data.reviews.values()),
             "/".join(f"{len(s):,}" for s in (data.train, data.val, data.test)), len(vocab))
    return data


def unlabelled_reviews(path: str | os.PathLike, vocab: Vocab, *, max_length: int | None = None,
                       cache: bool = True) -> list[np.ndarray]:
    """The 50,000 unlabelled reviews as int64 ids of ``vocab`` (unknown words -> ``<unk>``), in file order;
    ``max_length`` keeps a longer review's LAST tokens, as the sentiment splits do."""
    tokens, ids, offsets = _unsup_corpus(Path(path), cache=cache)
    lookup = np.array([vocab.stoi.get(token, vocab.unk_index) for token in tokens], dtype=np.int64)
    reviews = np.split(lookup[ids], offsets[1:-1])
    return reviews if max_length is None else [review[-max_length:] for review in reviews]


def _stream(reviews: list[np.ndarray]) -> np.ndarray:
    ended = [piece for review in reviews for piece in (review, np.array([END_OF_REVIEW], np.int64))]
    return np.concatenate(ended).astype(np.int64)


# --------------------------------------------------------------------------------------------- unsup cache


def _unsup_corpus(path: Path, *, cache: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(distinct tokens, corpus ids int32, offsets int64) of the unlabelled reviews, tokenized once ever."""
    key = {"source": source_fingerprint(path), "tokenizer": imdb.TOKENIZER_VERSION, "format": _CACHE_FORMAT,
           "split": "unsup"}
    target = cache_dir() / "imdb" / f"unsup-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.npz"
    if cache and target.is_file():
        try:
            with np.load(target, allow_pickle=False) as archive:
                tokens = archive["tokens"].tobytes().decode("utf-8").split("\n")
                return tokens, archive["ids"], archive["offsets"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            log.warning("token cache %s is unreadable (%s); rebuilding it", target, error)
    reviews = imdb.read_imdb(path, splits=("unsup",))["unsup"]
    index: dict[str, int] = {}
    flat, lengths = [], []
    for review in reviews:
        words = imdb.tokenize(review.text)
        flat.extend(index.setdefault(word, len(index)) for word in words)
        lengths.append(len(words))
    tokens = list(index)
    ids = np.array(flat, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if cache:
        with atomic_write(target) as handle:
            np.savez(handle, tokens=np.frombuffer("\n".join(tokens).encode("utf-8"), dtype=np.uint8), ids=ids,
                     offsets=offsets)
    return tokens, ids, offsets
