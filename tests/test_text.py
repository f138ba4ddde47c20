"""The charlm text pipeline: reading, vocabulary policy, contiguous splits, TBPTT and random-chunk batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnlab.data.text import (
    TBPTTBatcher,
    build_char_vocab,
    decode_ids,
    encode_text,
    load_text_data,
    random_chunks,
    read_text,
    split_contiguous,
    summarize_text,
)
from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError, DataError, InputError

SAMPLE = "Well, Prince, so Genoa and Lucca are now just family estates.\nBut I warn you!\n" * 20


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"\xef\xbb\xbf" + SAMPLE.encode("utf-8"))  # with a BOM, as War and Peace has
    return path


# --- reading -----------------------------------------------------------------------------------------------------


def test_read_text_strips_bom_and_lowercases(text_file):
    text = read_text(text_file)
    assert text == SAMPLE.lower()
    assert not text.startswith("\ufeff")


def test_read_text_can_keep_case_and_bom(text_file):
    assert read_text(text_file, lowercase=False) == SAMPLE
    assert read_text(text_file, lowercase=False, strip_bom=False) == "\ufeff" + SAMPLE


def test_read_text_normalizes_line_ends(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"one\r\ntwo\rthree\n")
    assert read_text(path) == "one\ntwo\nthree\n"


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b" \r\n\t\n"])
def test_empty_text_is_a_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        read_text(path)


def test_invalid_utf8_is_a_data_error_naming_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        read_text(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "nope.txt")


# --- vocabulary and the unknown-character policy -----------------------------------------------------------------


def test_char_vocab_is_sorted_by_frequency_without_specials():
    vocab = build_char_vocab("abbccc")
    assert vocab.itos == ["c", "b", "a"]
    assert vocab.unk_index is None


def test_encode_decode_round_trip_and_json(tmp_path):
    text = SAMPLE.lower()
    vocab = build_char_vocab(text)
    ids = encode_text(text, vocab)
    assert ids.dtype == np.int64 and len(ids) == len(text)
    assert decode_ids(ids, vocab) == text
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json").itos == vocab.itos


def test_unknown_characters_are_an_input_error_naming_them():
    vocab = build_char_vocab("hello world")
    with pytest.raises(InputError, match=r"2 character\(s\) outside.*'!', 'Z'"):
        encode_text("hello Z world!!", vocab)


# --- contiguous splits -------------------------------------------------------------------------------------------


def test_split_is_contiguous_and_covers_the_stream():
    ids = np.arange(1000)
    parts = split_contiguous(ids)
    assert [len(parts[name]) for name in ("train", "val", "test")] == [900, 50, 50]
    assert np.array_equal(np.concatenate([parts["train"], parts["val"], parts["test"]]), ids)


def test_split_rejects_bad_fractions():
    with pytest.raises(ConfigError, match="fractions"):
        split_contiguous(np.arange(100), (0.9, 0.2, 0.1))


def test_load_text_data_builds_vocab_on_whole_text(text_file):
    data = load_text_data(text_file)
    assert len(data.vocab) == len(set(SAMPLE.lower()))
    joined = np.concatenate([data.train, data.val, data.test])
    assert decode_ids(joined, data.vocab) == SAMPLE.lower()


def test_summarize_text(text_file):
    summary = summarize_text(text_file)
    assert summary["characters"] == len(SAMPLE)
    assert summary["distinct"] == len(set(SAMPLE.lower()))
    assert sum(summary["splits"].values()) == len(SAMPLE)
    assert next(iter(summary["most_common"].items())) == ("' '", SAMPLE.count(" "))


# --- truncated-BPTT batcher --------------------------------------------------------------------------------------


def test_tbptt_windows_continue_rows_and_targets_are_shifted():
    stream = np.arange(1003)
    batcher = TBPTTBatcher(stream, batch_size=4, seq_len=10)
    row_len = 1002 // 4
    assert len(batcher) == row_len // 10
    windows = list(batcher)
    assert len(windows) == len(batcher)
    for x, y in windows:
        assert x.shape == y.shape == (4, 10) and x.dtype == torch.long
        assert torch.equal(y, x + 1)  # y is x shifted by one character
    for (x0, _), (x1, _) in zip(windows, windows[1:]):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # window k+1 of a row starts where window k ended
    assert torch.equal(windows[0][0][:, 0], torch.arange(4) * row_len)  # row r is the r-th contiguous slice


def test_tbptt_keeps_the_ragged_end_when_asked():
    batcher = TBPTTBatcher(np.arange(101), batch_size=2, seq_len=15, drop_last=False)
    shapes = [tuple(x.shape) for x, _ in batcher]
    assert shapes == [(2, 15)] * 3 + [(2, 5)]
    assert batcher.dropped == 0


def test_tbptt_window_k_equals_kth_iterated_window():
    batcher = TBPTTBatcher(np.random.default_rng(0).integers(0, 50, 5000), batch_size=8, seq_len=16)
    for k, (x, y) in enumerate(batcher):
        wx, wy = batcher.window(k)
        assert torch.equal(x, wx) and torch.equal(y, wy)
    with pytest.raises(IndexError):
        batcher.window(len(batcher))


def test_tbptt_shards_across_ranks_concatenate_to_one_process_batch():
    stream = np.random.default_rng(1).integers(0, 50, 7919)
    whole = TBPTTBatcher(stream, batch_size=6, seq_len=12)
    shards = [TBPTTBatcher(stream, batch_size=6, seq_len=12, rank=r, world_size=2) for r in range(2)]
    assert all(len(shard) == len(whole) for shard in shards)
    for k in range(len(whole)):
        x, y = whole.window(k)
        parts = [shard.window(k) for shard in shards]
        assert parts[0][0].shape == (3, 12)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_tbptt_rejects_indivisible_batch_and_short_stream():
    with pytest.raises(ConfigError, match="batch_size"):
        TBPTTBatcher(np.arange(1000), batch_size=5, seq_len=10, world_size=2)
    with pytest.raises(DataError, match="too short"):
        TBPTTBatcher(np.arange(50), batch_size=8, seq_len=10)


# --- the chapter's random-chunk sampler --------------------------------------------------------------------------


def test_random_chunks_shapes_targets_and_determinism():
    stream = np.arange(10_000)
    x, y = random_chunks(stream, 64, generator=torch.Generator().manual_seed(7))
    assert x.shape == y.shape == (64, 40) and x.dtype == torch.long
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each chunk is contiguous text
    assert int(y.max()) <= 9_999
    again, _ = random_chunks(stream, 64, generator=torch.Generator().manual_seed(7))
    other, _ = random_chunks(stream, 64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_random_chunks_reaches_both_ends_of_a_short_stream():
    gen = torch.Generator().manual_seed(0)
    starts = torch.cat([random_chunks(np.arange(12), 32, seq_len=10, generator=gen)[0][:, 0] for _ in range(10)])
    assert set(starts.tolist()) == {0, 1}


# --- parity on the real data -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.mirror
def test_war_and_peace_parity(mirror):
    path = mirror / "warpeace_input.txt"
    # The chapter's figures count the file's BOM as a character (it read with a plain open().read()).
    chapter = read_text(path, strip_bom=False)
    assert (len(chapter), len(set(chapter))) == (3_196_213, 57)
    data = load_text_data(path)
    assert len(data.vocab) == 56
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 3_196_212
    assert sizes == [2_876_591, 159_810, 159_811]
    summary = summarize_text(path)
    assert (summary["characters"], summary["distinct"]) == (3_196_212, 56)
    assert next(iter(summary["most_common"].items())) == ("' '", 511_279)
