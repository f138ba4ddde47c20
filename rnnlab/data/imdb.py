"""The IMDb sentiment pipeline: reviews -> tokens -> cached ids -> length-bucketed padded batches.

* :mod:`rnnlab.data.reviews` reads ``aclImdb_v1.tar.gz`` (or an aclImdb folder) and a user's labelled reviews.
* :func:`tokenize` is the chapter's tokenizer, kept byte-for-byte because the parity figures depend on its quirks.
* :func:`load_sentiment_data` tokenizes train and test once ever and caches the ids (``np.savez``, no pickle)
  under ``cache_dir()/imdb``; the cache is vocabulary-independent, so the validation split, ``min_freq`` and
  ``max_vocab`` are applied on load in well under a second and can never make it stale.
* :class:`BucketBatchSampler` + :func:`collate_reviews` give batches of similar length, so little padding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

# Reading the files is reviews.py's; read_imdb, Review, LabelledTexts and read_labelled_reviews stay importable here.
from rnnlab.data.reviews import SPLITS, LabelledTexts, Review, read_imdb, read_labelled_reviews  # noqa: F401
from rnnlab.data.reviews import log_skipped, read_splits, source_fingerprint
from rnnlab.data.sources import cache_dir
from rnnlab.data.vocab import Vocab, vocab_from_counts
from rnnlab.errors import ConfigError, DataError
from rnnlab.files import atomic_write

log = logging.getLogger(__name__)

# Bump when tokenize() changes: the version is part of the cache key, so old token ids are never reused.
TOKENIZER_VERSION = "pmlbe4-chapter-1"
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------- tokenizer

_EMOTICON = re.compile(r"(?::|;|=)(?:-)?(?:\)|\(|D|P)")
_NON_WORD = re.compile(r"[\W]+")


def strip_tags(text: str) -> str:
    """``re.sub(r"<[^>]*>", "", text)`` in linear time.

    The regex is quadratic on a ``<`` with no ``>`` after it (each such ``<`` scans to the end of the text:
    1 MB of ``<`` takes hours), and reviews come from strangers. Same result: from each ``<``, drop everything up
    to and including the next ``>``; once no ``>`` follows, the rest of the text stays as it is.
    """
    pieces, position = [], 0
    while (start := text.find("<", position)) >= 0:
        end = text.find(">", start + 1)
        if end < 0:  # no closing bracket anywhere after here: no later "<" can open a tag either
            break
        pieces.append(text[position:start])
        position = end + 1
    pieces.append(text[position:])
    return "".join(pieces)


def tokenize(text: str) -> list[str]:
    """The chapter's tokenizer: strip HTML tags, lowercase, split on non-word characters, append emoticons.

    Kept exactly as the chapter (and Raschka's classic) wrote it, quirks included, because the parity figures
    (75,977 distinct tokens, lengths 10..2,498 on the 25k train reviews) depend on them:
    emoticons are searched in the *lowercased* text, so ``:)`` ``;-(`` ``=(`` are kept (nose dropped: ``;(``)
    while ``=D`` / ``:-P`` are not (they become the words ``d`` / ``p``); and the emoticons are appended without
    a separating space, so a review ending in a word fuses it with the first emoticon (``"great :)"`` is fine,
    ``":) great"`` gives ``"great:)"``). Fixing either quirk changes the distinct count (75,955..75,994).
    """
    text = strip_tags(text)
    lowered = text.lower()
    emoticons = _EMOTICON.findall(lowered)
    text = _NON_WORD.sub(" ", lowered) + " ".join(emoticons).replace("-", "")
    return text.split()


# --------------------------------------------------------------------------------------------- datasets


@dataclass
class EncodedReviews:
    """Token ids and labels; indexable, so usable directly as a torch Dataset (no torch inside)."""

    ids: list[np.ndarray]  # int32 token ids per review (views into one flat array)
    labels: np.ndarray  # float32, 1.0 positive / 0.0 negative

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float32)
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{len(self.ids)} id sequences but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[np.ndarray, float]:
        return self.ids[index], float(self.labels[index])

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.ids), dtype=np.int64, count=len(self.ids))


@dataclass
class SentimentData:
    vocab: Vocab
    train: EncodedReviews
    val: EncodedReviews
    test: EncodedReviews


@dataclass
class _Split:
    """One split of the cached corpus: ids into the corpus token table, concatenated, plus offsets."""

    ids: np.ndarray  # int32, all reviews concatenated
    offsets: np.ndarray  # int64, len = reviews + 1
    labels: np.ndarray  # int8
    ratings: np.ndarray  # int8
    review_ids: np.ndarray  # int32

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class _Corpus:
    tokens: list[str]  # every distinct token of train + test, in order of first appearance
    splits: dict[str, _Split]
    skipped: dict[str, int]


def load_sentiment_data(
    path: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_freq: int = 1,
    max_vocab: int | None = None,
    max_length: int | None = None,
    cache: bool = True,
) -> SentimentData:
    """Train / validation / test ids and the vocabulary, ready for :class:`BucketBatchSampler`.

    The validation split is held out of train (stratified by label, seeded); the vocabulary is built on
    train-minus-validation only, so neither validation nor test influences it. ``max_length`` keeps the LAST
    ``max_length`` tokens of a longer review: reviews tend to end with the verdict. ``max_vocab`` counts
    ``<pad>`` and ``<unk>``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
    if max_length is not None and max_length < 1:
        raise ConfigError(f"data.max_length must be a positive number of tokens or null, got {max_length}.")
    corpus = _load_corpus(Path(path), cache=cache)
    train = corpus.splits["train"]
    in_val = validation_mask(train.labels, val_fraction, seed)

    # Count tokens of train-minus-val straight from the cached ids (bincount), then sort like build_vocab.
    counts = np.bincount(train.ids[np.repeat(~in_val, train.lengths)], minlength=len(corpus.tokens))
    seen = np.flatnonzero(counts)
    vocab = vocab_from_counts(
        {corpus.tokens[i]: int(counts[i]) for i in seen}, min_freq=min_freq, max_size=max_vocab
    )
    # corpus token id -> vocabulary id (unknown / too rare -> <unk>), one lookup table for all splits.
    lookup = np.full(len(corpus.tokens), vocab.unk_index, dtype=np.int32)
    for corpus_id in seen:
        vocab_id = vocab.stoi.get(corpus.tokens[corpus_id])
        if vocab_id is not None:
            lookup[corpus_id] = vocab_id

    test = corpus.splits["test"]
    data = SentimentData(
        vocab=vocab,
        train=_encode_split(train, lookup, ~in_val, max_length),
        val=_encode_split(train, lookup, in_val, max_length),
        test=_encode_split(test, lookup, np.ones(len(test.labels), dtype=bool), max_length),
    )
    log.info(
        "IMDb: %d train, %d val, %d test reviews; vocabulary %d (min_freq %d, max %s)",
        len(data.train), len(data.val), len(data.test), len(vocab), min_freq, max_vocab,
    )
    return data


def validation_mask(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A seeded, label-stratified hold-out of train (the same reviews for the same seed on every machine)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        mask[rng.permutation(members)[: round(len(members) * val_fraction)]] = True
    return mask


def review_splits(path: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[Review]]:
    """The reviews behind :func:`load_sentiment_data`'s train, val and test as raw text, in the same order and with
    the same hold-out (``val_fraction``, ``seed``): for what needs the text itself, such as cutting short texts
    at their sentences or fitting a baseline on exactly the reviews a run trained on."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
    records, _ = read_splits(Path(path), ("train", "test"))
    # the token cache leaves out reviews with no tokens: so must the raw splits, or the hold-out would shift
    kept = {name: [review for review in reviews if tokenize(review.text)] for name, reviews in records.items()}
    in_val = validation_mask(np.array([review.label for review in kept["train"]], dtype=np.int8), val_fraction, seed)
    return {
        "train": [review for review, held in zip(kept["train"], in_val) if not held],
        "val": [review for review, held in zip(kept["train"], in_val) if held],
        "test": kept["test"],
    }


def _encode_split(split: _Split, lookup: np.ndarray, select: np.ndarray, max_length: int | None) -> EncodedReviews:
    pieces = np.split(lookup[split.ids], split.offsets[1:-1])
    ids = [pieces[i] for i in np.flatnonzero(select)]
    if max_length is not None:
        ids = [piece[-max_length:] for piece in ids]
    return EncodedReviews(ids=ids, labels=split.labels[select].astype(np.float32))


# --------------------------------------------------------------------------------------------- token cache


def _cache_path(path: Path) -> Path:
    key = {"source": source_fingerprint(path), "tokenizer": TOKENIZER_VERSION, "format": _CACHE_FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "imdb" / f"{digest}.npz"


def _load_corpus(path: Path, *, cache: bool) -> _Corpus:
    if not path.exists():
        raise DataError(f"The IMDb source {path} does not exist; pass aclImdb_v1.tar.gz or an aclImdb folder.")
    target = _cache_path(path) if cache else None
    if target is not None and target.is_file():
        corpus = _read_cache(target)
        if corpus is not None:
            log_skipped(path, Counter(corpus.skipped))
            return corpus
    corpus = _tokenize_corpus(path)
    if target is not None:
        _write_cache(target, corpus)
    return corpus


def _tokenize_corpus(path: Path) -> _Corpus:
    records, skipped = read_splits(path, ("train", "test"))
    started = time.perf_counter()
    index: dict[str, int] = {}
    splits = {}
    for name in ("train", "test"):
        flat: list[int] = []
        lengths, kept = [], []
        for review in records[name]:
            tokens = tokenize(review.text)
            if not tokens:  # e.g. a review of only markup: nothing for the model to read
                skipped["reviews with no tokens"] += 1
                continue
            flat.extend([index.setdefault(token, len(index)) for token in tokens])
            lengths.append(len(tokens))
            kept.append(review)
        splits[name] = _Split(
            ids=np.array(flat, dtype=np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
            labels=np.array([review.label for review in kept], dtype=np.int8),
            ratings=np.array([review.rating for review in kept], dtype=np.int8),
            review_ids=np.array([review.id for review in kept], dtype=np.int32),
        )
    if skipped["reviews with no tokens"]:
        log.warning("%s: skipped %d reviews with no tokens", path, skipped["reviews with no tokens"])
    log.info("tokenized %d reviews in %.1fs", sum(len(s.labels) for s in splits.values()),
             time.perf_counter() - started)
    return _Corpus(tokens=list(index), splits=splits, skipped=dict(+skipped))


def _write_cache(target: Path, corpus: _Corpus) -> None:
    """np.savez to a temp file beside the target, then rename: readers never see half a cache."""
    arrays = {
        # Tokens never contain whitespace (they come from str.split), so newline-joined UTF-8 is unambiguous.
        "tokens": np.frombuffer("\n".join(corpus.tokens).encode("utf-8"), dtype=np.uint8),
        "meta": np.frombuffer(
            json.dumps({"format": _CACHE_FORMAT, "tokenizer": TOKENIZER_VERSION, "skipped": corpus.skipped})
            .encode("utf-8"),
            dtype=np.uint8,
        ),
    }
    for name, split in corpus.splits.items():
        for field in ("ids", "offsets", "labels", "ratings", "review_ids"):
            arrays[f"{name}_{field}"] = getattr(split, field)
    with atomic_write(target) as handle:
        np.savez(handle, **arrays)
    log.info("cached IMDb token ids in %s", target)


def _read_cache(target: Path) -> _Corpus | None:
    """The cached corpus, or None (and a log line) when the file is unreadable or of another format."""
    try:
        with np.load(target, allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes().decode("utf-8"))
            if meta.get("format") != _CACHE_FORMAT or meta.get("tokenizer") != TOKENIZER_VERSION:
                log.info("token cache %s is of another version; rebuilding it", target)
                return None
            tokens = archive["tokens"].tobytes().decode("utf-8").split("\n")
            splits = {
                name: _Split(**{field: archive[f"{name}_{field}"]
                                for field in ("ids", "offsets", "labels", "ratings", "review_ids")})
                for name in ("train", "test")
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        log.warning("token cache %s is unreadable (%s); rebuilding it", target, error)
        return None
    log.info("loaded IMDb token ids from %s", target)
    return _Corpus(tokens=tokens, splits=splits, skipped=meta.get("skipped", {}))


# --------------------------------------------------------------------------------------------- batching


class _EpochState:
    """Holds the epoch. Exposed as ``BucketBatchSampler.sampler`` because that is where Accelerate's
    DataLoaderShard looks for ``set_epoch`` once it has wrapped a batch sampler in BatchSamplerShard."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length reviews, reshuffled deterministically per epoch.

    Each epoch: shuffle all indices (seed, epoch), cut them into chunks of ``batch_size * bucket_size_multiplier``,
    sort each chunk by length, cut batches, shuffle the order of the full batches. The one short batch (when
    ``len % batch_size``) always comes last: Accelerate's BatchSamplerShard expects a short batch only at the end
    and would otherwise drop a round of batches. Same seed and epoch -> same batches on every process.
    Pass it as ``DataLoader(dataset, batch_sampler=...)``; call ``set_epoch`` each epoch (an Accelerate-prepared
    loader does this itself).
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size_multiplier: int = 100,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        if bucket_size_multiplier < 1:
            raise ConfigError(f"bucket_size_multiplier must be at least 1, got {bucket_size_multiplier}.")
        if seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed}.")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.bucket_size_multiplier = int(bucket_size_multiplier)
        self.drop_last = drop_last
        self.sampler = _EpochState()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        count = len(self.lengths)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self):
        for batch in self._batches():
            yield batch.tolist()

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        count = len(self.lengths)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        chunk = self.batch_size * self.bucket_size_multiplier
        full, short = [], []
        for start in range(0, count, chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            for begin in range(0, len(part), self.batch_size):
                batch = part[begin : begin + self.batch_size]
                (full if len(batch) == self.batch_size else short).append(batch)
        if self.shuffle:
            full = [full[i] for i in rng.permutation(len(full))]
        return full if self.drop_last else full + short


def collate_reviews(batch: list[tuple[np.ndarray, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids LongTensor[B, T] right-padded with 0 = <pad>, lengths LongTensor[B], labels FloatTensor[B])."""
    lengths = np.fromiter((len(ids) for ids, _ in batch), dtype=np.int64, count=len(batch))
    padded = np.zeros((len(batch), int(lengths.max(initial=0))), dtype=np.int64)
    for row, (ids, _) in enumerate(batch):
        padded[row, : len(ids)] = ids
    labels = np.fromiter((label for _, label in batch), dtype=np.float32, count=len(batch))
    return torch.from_numpy(padded), torch.from_numpy(lengths), torch.from_numpy(labels)


# --------------------------------------------------------------------------------------------- summary


def summarize_imdb(path: str | os.PathLike) -> dict:
    """Counts per split and label, the train vocabulary size and train review lengths in tokens."""
    path = Path(path)
    records, skipped = read_splits(path, SPLITS)
    splits = {}
    for name, reviews in records.items():
        labels = Counter(review.label for review in reviews)
        if name == "unsup":
            splits[name] = {"reviews": len(reviews)}
        else:
            splits[name] = {"reviews": len(reviews), "pos": labels[1], "neg": labels[0]}
    counts: Counter = Counter()
    lengths = []
    for review in records["train"]:
        tokens = tokenize(review.text)
        counts.update(tokens)
        lengths.append(len(tokens))
    lengths = np.asarray(lengths, dtype=np.int64)
    return {
        "source": str(path),
        "splits": splits,
        "distinct_tokens": len(counts),
        "vocab_size": len(counts) + 2,  # with <pad> and <unk>, min_freq 1, no cap, before the val hold-out
        "train_tokens": {
            "min": int(lengths.min()) if len(lengths) else 0,
            "median": float(np.median(lengths)) if len(lengths) else 0.0,
            "mean": round(float(lengths.mean()), 1) if len(lengths) else 0.0,
            "max": int(lengths.max()) if len(lengths) else 0,
            "total": int(lengths.sum()),
        },
        "skipped": dict(skipped),
    }


__all__ = [
    "TOKENIZER_VERSION",
    "BucketBatchSampler",
    "EncodedReviews",
    "LabelledTexts",
    "Review",
    "SentimentData",
    "collate_reviews",
    "load_sentiment_data",
    "read_imdb",
    "read_labelled_reviews",
    "review_splits",
    "summarize_imdb",
    "tokenize",
    "validation_mask",
]

