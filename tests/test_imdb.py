"""IMDb pipeline: tokenizer, reading archive and folder, bad input, token cache, bucketing sampler, collate."""

from __future__ import annotations

import io
import logging
import random
import re
import tarfile
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rnnlab.data import imdb
from rnnlab.data.imdb import (
    BucketBatchSampler,
    EncodedReviews,
    collate_reviews,
    load_sentiment_data,
    read_imdb,
    summarize_imdb,
    tokenize,
)
from rnnlab.data.vocab import build_vocab
from rnnlab.errors import DataError

# (folder, class) -> {file name: text}; a tiny corpus in the aclImdb layout.
REVIEWS = {
    ("train", "pos"): {
        "0_9.txt": "A great film :) loved it.<br /><br />Great acting!",
        "1_8.txt": "Wonderful, wonderful movie. Great!",
        "2_10.txt": "Best film of the year; great cast ;-)",
        "3_7.txt": "Good fun, good story.",
        "10_9.txt": "I loved the music and the great ending.",
        "4_9.txt": "   \n",  # empty: skipped and counted
    },
    ("train", "neg"): {
        "0_1.txt": "Awful film :( boring.",
        "1_2.txt": "Terrible <i>acting</i>, terrible plot.",
        "2_3.txt": "Boring. Boring. Bad ending.",
        "3_4.txt": "Not good; the worst film this year =(",
        "5_1.txt": "Bad bad bad.",
    },
    ("test", "pos"): {"0_10.txt": "Great great film.", "1_7.txt": "A lovely story, great."},
    ("test", "neg"): {"0_2.txt": "Bad film, awful xylophone.", "1_1.txt": "Boring and bad."},
    ("train", "unsup"): {"0_0.txt": "Some film.", "1_0.txt": "Another film I saw."},
}


def write_folder(root, reviews=REVIEWS):
    for (folder, cls), files in reviews.items():
        directory = root / "aclImdb" / folder / cls
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")
    return root


def write_archive(path, reviews=REVIEWS):
    with tarfile.open(path, "w:gz") as archive:
        for (folder, cls), files in sorted(reviews.items()):
            for name, text in sorted(files.items(), reverse=True):  # member order must not matter
                data = text.encode("utf-8")
                info = tarfile.TarInfo(f"aclImdb/{folder}/{cls}/{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("aclImdb/README")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"hello"))
    return path


@pytest.fixture
def archive(tmp_path):
    return write_archive(tmp_path / "aclImdb_v1.tar.gz")


# ----------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_strips_html_lowercases_and_splits_on_punctuation():
    assert tokenize("This is <br /><br />GREAT, really... great!") == ["this", "is", "great", "really", "great"]
    assert tokenize("<a href='x'>Link</a> don't") == ["link", "don", "t"]


def test_tokenizer_keeps_emoticons_as_the_chapter_does():
    assert tokenize("nice :)") == ["nice", ":)"]
    assert tokenize("sad ;-(") == ["sad", ";("]  # the nose is dropped
    assert tokenize("meh =( ok :)") == ["meh", "ok", "=(", ":)"]  # emoticons are appended at the end
    # Chapter quirks kept for parity: emoticons are matched in lowercased text, so =D and :-P are not kept...
    assert tokenize("wow =D") == ["wow", "d"]
    assert tokenize("ha :-P") == ["ha", "p"]
    # ...and a review ending in a word fuses with the first emoticon (no separating space).
    assert tokenize(":) great") == ["great:)"]


def test_tokenizer_empty_and_punctuation_only_give_no_tokens():
    assert tokenize("") == []
    assert tokenize("  <br /> ...!!! ") == []
    assert tokenize("don't_stop 42") == ["don", "t_stop", "42"]  # \W keeps underscores and digits


# The chapter's tag pattern, the reference the linear strip_tags must match exactly.
CHAPTER_TAG = re.compile(r"<[^>]*>")


def test_strip_tags_matches_the_chapter_regex_on_random_strings():
    rng = random.Random(0)
    alphabet = "<>ab /\n:)"  # brackets dense enough that nested, unclosed and empty tags all turn up
    for _ in range(5_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert imdb.strip_tags(text) == CHAPTER_TAG.sub("", text), text
    for text in ["<", ">", "<>", "a<b", "a<b>c<d", "<<a>>", "x<a\nb>y", "<" * 50 + ">" + "<" * 50]:
        assert imdb.strip_tags(text) == CHAPTER_TAG.sub("", text), text


def test_tokenizer_is_linear_on_unclosed_brackets():
    # the regex took ~7 s on 100 KB of "<" (quadratic: hours on 1 MB); a stranger's 1 MB must not hold a replica.
    # CPU time, not wall time: the shared CI box can be loaded many times over (about 0.1 s of CPU each here).
    for text in ("<" * 1_000_000, "a<" * 500_000, "<" * 999_999 + ">"):
        start = time.process_time()
        tokenize(text)
        assert time.process_time() - start < 0.5


# ----------------------------------------------------------------------------------------- reading


def test_archive_and_folder_give_the_same_records(tmp_path, archive):
    splits = ("train", "test", "unsup")
    from_archive = read_imdb(archive, splits)
    from_parent = read_imdb(write_folder(tmp_path / "parent"), splits)
    from_aclimdb = read_imdb(tmp_path / "parent" / "aclImdb", splits)
    assert from_archive == from_parent == from_aclimdb
    assert [len(from_archive[s]) for s in splits] == [10, 4, 2]  # one empty train review skipped


def test_records_are_labelled_sorted_and_carry_rating_and_id(archive):
    records = read_imdb(archive)
    assert set(records) == {"train", "test"}  # unsup only when asked
    train = records["train"]
    assert [r.label for r in train] == [0] * 5 + [1] * 5  # neg folder sorts before pos
    assert [r.id for r in train[5:]] == [0, 10, 1, 2, 3]  # sorted by member name ("10_9" < "1_8")
    first = train[5]
    assert (first.rating, first.label) == (9, 1) and first.text.startswith("A great film")
    assert read_imdb(archive, ("unsup",))["unsup"][0].label == -1


def test_empty_reviews_are_skipped_and_counted_in_the_log(archive, caplog):
    with caplog.at_level(logging.WARNING, logger="rnnlab.data.imdb"):
        read_imdb(archive)
    assert "skipped 1 empty reviews" in caplog.text


def test_missing_folder_names_the_source_and_the_folder(tmp_path):
    reviews = {key: value for key, value in REVIEWS.items() if key != ("test", "neg")}
    path = write_archive(tmp_path / "partial.tar.gz", reviews)
    with pytest.raises(DataError, match=r"partial\.tar\.gz has no aclImdb/test/neg folder"):
        read_imdb(path)
    folder = write_folder(tmp_path / "partial", reviews)
    with pytest.raises(DataError, match=r"partial has no aclImdb/test/neg folder"):
        read_imdb(folder)
    assert len(read_imdb(path, ("train",))["train"]) == 10  # only the splits asked for are required


def test_missing_unsup_is_required_only_when_asked(tmp_path):
    reviews = {key: value for key, value in REVIEWS.items() if key != ("train", "unsup")}
    path = write_archive(tmp_path / "a.tar.gz", reviews)
    read_imdb(path)
    with pytest.raises(DataError, match="aclImdb/train/unsup"):
        read_imdb(path, ("train", "unsup"))


def test_corrupt_or_non_gzip_archive_is_a_data_error(tmp_path, archive):
    text = tmp_path / "notes.tar.gz"
    text.write_text("this is not an archive")
    with pytest.raises(DataError, match="notes.tar.gz is not a readable"):
        read_imdb(text)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated.tar.gz is not a readable"):
        read_imdb(truncated)
    with pytest.raises(DataError, match="does not exist"):
        read_imdb(tmp_path / "nowhere.tar.gz")


# ----------------------------------------------------------------------------------------- load + cache


def test_load_sentiment_data_splits_and_vocab(archive):
    data = load_sentiment_data(archive, val_fraction=0.2, seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 4)
    assert sorted(data.val.labels.tolist()) == [0.0, 1.0]  # stratified by label
    assert data.vocab.itos[:2] == ["<pad>", "<unk>"]
    # The vocabulary comes from train-minus-val only: "xylophone" (test only) is unknown.
    assert "xylophone" not in data.vocab.stoi
    # seed 3 holds out "Bad bad bad." and a positive review, so the one training review with "awful"
    # (train/neg/0_1.txt) stays in train: "awful" is known and the test review reads it back
    assert ["bad", "bad", "bad"] in [data.vocab.decode(ids) for ids in data.val.ids]
    assert "awful" in data.vocab.stoi
    test_tokens = [data.vocab.decode(ids) for ids in data.test.ids]
    assert ["bad", "film", "awful", "<unk>"] in test_tokens
    ids, label = data.train[0]
    assert ids.dtype.kind == "i" and isinstance(label, float)
    assert data.train.lengths.tolist() == [len(x) for x in data.train.ids]


def test_val_split_is_seeded(archive):
    def val_ids(seed):
        return sorted(tuple(x.tolist()) for x in load_sentiment_data(archive, val_fraction=0.4, seed=seed).val.ids)

    assert val_ids(1) == val_ids(1)
    assert any(val_ids(1) != val_ids(s) for s in (2, 3, 4))


def test_vocab_matches_build_vocab_on_the_same_reviews(archive):
    data = load_sentiment_data(archive, val_fraction=0.0, min_freq=2)
    reviews = read_imdb(archive)["train"]
    assert data.vocab == build_vocab((tokenize(r.text) for r in reviews), min_freq=2)
    assert len(load_sentiment_data(archive, val_fraction=0.0, max_vocab=5).vocab) == 5


def test_max_length_keeps_the_last_tokens(archive):
    full = load_sentiment_data(archive, val_fraction=0.0)
    cut = load_sentiment_data(archive, val_fraction=0.0, max_length=3)
    assert cut.train.lengths.max() == 3
    for long, short in zip(full.train.ids, cut.train.ids):
        assert short.tolist() == long[-3:].tolist()


def test_cache_is_reused_and_keyed_on_source_and_tokenizer(tmp_path, monkeypatch, archive):
    monkeypatch.setenv("RNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = imdb.tokenize
    monkeypatch.setattr(imdb, "tokenize", lambda text: calls.append(1) or real(text))

    first = load_sentiment_data(archive)
    assert len(calls) == 14 and len(list((tmp_path / "cache" / "imdb").glob("*.npz"))) == 1
    calls.clear()
    second = load_sentiment_data(archive, val_fraction=0.3, min_freq=2)  # vocab settings: no re-tokenizing
    again = load_sentiment_data(archive)
    assert calls == []
    assert [x.tolist() for x in again.train.ids] == [x.tolist() for x in first.train.ids]
    assert again.vocab == first.vocab and second.vocab != first.vocab
    assert not list((tmp_path / "cache" / "imdb").glob(".part-*"))  # no temp file left behind

    monkeypatch.setattr(imdb, "TOKENIZER_VERSION", "something-else")
    load_sentiment_data(archive)
    assert len(calls) == 14  # another tokenizer version: tokenized again, into a new cache file
    calls.clear()
    other = write_archive(tmp_path / "other.tar.gz")
    load_sentiment_data(other)
    assert len(calls) == 14  # another source: tokenized again
    calls.clear()
    load_sentiment_data(archive, cache=False)
    assert len(calls) == 14
    assert len(list((tmp_path / "cache" / "imdb").glob("*.npz"))) == 3


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, archive):
    monkeypatch.setenv("RNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    expected = load_sentiment_data(archive)
    (cached,) = (tmp_path / "cache" / "imdb").glob("*.npz")
    cached.write_bytes(b"garbage")
    rebuilt = load_sentiment_data(archive)
    assert rebuilt.vocab == expected.vocab
    with np.load(cached, allow_pickle=False) as npz:  # rewritten, readable without pickle
        assert "train_ids" in npz


def test_folder_source_is_cached_too(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "data")
    first = load_sentiment_data(folder)
    (folder / "aclImdb" / "train" / "pos" / "11_9.txt").write_text("A new great review.")
    assert len(load_sentiment_data(folder, val_fraction=0.0).train) == len(first.train) + len(first.val) + 1


# ----------------------------------------------------------------------------------------- batching


def make_lengths(n=1000, seed=0):
    return np.random.default_rng(seed).integers(5, 500, size=n)


def test_sampler_yields_every_index_once_per_epoch():
    lengths = make_lengths(1003)
    sampler = BucketBatchSampler(lengths, 32, bucket_size_multiplier=5)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 32
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(1003))
        assert all(len(b) == 32 for b in batches[:-1]) and len(batches[-1]) == 1003 % 32  # short batch last
    dropped = BucketBatchSampler(lengths, 32, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 31 and all(len(b) == 32 for b in dropped)


def test_sampler_batches_are_length_homogeneous():
    lengths = make_lengths(3200)
    sampler = BucketBatchSampler(lengths, 32, bucket_size_multiplier=100)
    padded = sum(len(b) * lengths[b].max() for b in sampler)
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(3200), 100)
    padded_random = sum(len(b) * lengths[b].max() for b in random_batches)
    assert padded < 0.6 * padded_random
    assert padded < 1.05 * lengths.sum()  # near-zero padding with one big bucket


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths = make_lengths()
    a, b = BucketBatchSampler(lengths, 16, seed=7), BucketBatchSampler(lengths, 16, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(BucketBatchSampler(lengths, 16, seed=8)) != first
    a.set_epoch(0)
    assert list(a) == first
    ordered = BucketBatchSampler(lengths, 16, shuffle=False)
    assert list(ordered) == list(BucketBatchSampler(lengths, 16, shuffle=False))


def test_sampler_shards_across_processes_like_accelerate():
    """Accelerate wraps a batch sampler in BatchSamplerShard: the shards must cover every index, and the
    prepared loader's set_epoch must reach our sampler."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard

    lengths = make_lengths(1003)
    sampler = BucketBatchSampler(lengths, 32, seed=1)
    sampler.set_epoch(2)
    seen = []
    for rank in range(2):
        shard = BatchSamplerShard(sampler, num_processes=2, process_index=rank)
        batches = list(shard)
        assert len(batches) == len(shard)
        seen += [i for batch in batches for i in batch]
    assert set(seen) == set(range(1003))  # even_batches repeats a few from the start, drops none

    dataset = EncodedReviews([np.arange(1, n + 1) for n in lengths], np.zeros(len(lengths)))
    shard = BatchSamplerShard(BucketBatchSampler(lengths, 32, seed=1), num_processes=2, process_index=0)
    loader = DataLoaderShard(dataset, batch_sampler=shard, collate_fn=collate_reviews)
    loader.set_epoch(5)
    assert shard.batch_sampler.epoch == 5


def test_collate_pads_right_with_zero_and_returns_lengths_and_labels():
    batch = [(np.array([5, 6, 7]), 1.0), (np.array([8]), 0.0), (np.array([9, 10]), 1.0)]
    ids, lengths, labels = collate_reviews(batch)
    assert ids.dtype == torch.long and lengths.dtype == torch.long and labels.dtype == torch.float32
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert lengths.tolist() == [3, 1, 2] and labels.tolist() == [1.0, 0.0, 1.0]


def test_dataloader_end_to_end(archive):
    data = load_sentiment_data(archive, val_fraction=0.0)
    sampler = BucketBatchSampler(data.train.lengths, 4, bucket_size_multiplier=2)
    loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=collate_reviews)
    total = 0
    for ids, lengths, labels in loader:
        assert ids.shape == (len(lengths), int(lengths.max()))
        assert (ids[torch.arange(len(lengths)), lengths - 1] != 0).all()  # true ends are real tokens
        total += len(labels)
    assert total == len(data.train)


def test_summarize_imdb(archive):
    summary = summarize_imdb(archive)
    assert summary["splits"] == {
        "train": {"reviews": 10, "pos": 5, "neg": 5},
        "test": {"reviews": 4, "pos": 2, "neg": 2},
        "unsup": {"reviews": 2},
    }
    assert summary["skipped"] == {"empty reviews": 1}
    assert summary["vocab_size"] == summary["distinct_tokens"] + 2
    assert summary["train_tokens"]["min"] == 3  # "Bad bad bad."


# ----------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def mirror_archive(mirror):
    return mirror / "aclImdb_v1.tar.gz"


@pytest.mark.slow
@pytest.mark.mirror
def test_mirror_parity(mirror_archive):
    summary = summarize_imdb(mirror_archive)
    assert summary["splits"] == {
        "train": {"reviews": 25_000, "pos": 12_500, "neg": 12_500},
        "test": {"reviews": 25_000, "pos": 12_500, "neg": 12_500},
        "unsup": {"reviews": 50_000},
    }
    assert summary["distinct_tokens"] == 75_977
    assert (summary["train_tokens"]["min"], summary["train_tokens"]["max"]) == (10, 2_498)


@pytest.mark.slow
@pytest.mark.mirror
def test_mirror_strip_tags_matches_the_chapter_regex_on_every_train_review(mirror_archive):
    reviews = read_imdb(mirror_archive, ("train",))["train"]
    assert len(reviews) == 25_000
    assert all(imdb.strip_tags(r.text) == CHAPTER_TAG.sub("", r.text) for r in reviews)


@pytest.mark.slow
@pytest.mark.mirror
def test_mirror_sentiment_data(mirror_archive):
    data = load_sentiment_data(mirror_archive, val_fraction=0.0)
    assert len(data.vocab) == 75_977 + 2
    assert (len(data.train), len(data.test)) == (25_000, 25_000)
    assert (data.train.lengths.min(), data.train.lengths.max()) == (10, 2_498)
    assert data.train.labels.sum() == data.test.labels.sum() == 12_500
    split = load_sentiment_data(mirror_archive)  # from the cache, default 10 % validation
    assert (len(split.train), len(split.val)) == (22_500, 2_500)
    assert split.val.labels.sum() == 1_250
