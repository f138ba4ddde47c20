"""Vocabulary: specials, frequency order, unknowns, limits, JSON round trip."""

from __future__ import annotations

import json

import pytest

from rnnlab.data.vocab import Vocab, build_vocab
from rnnlab.errors import ConfigError, DataError, InputError

TOKENS = [["b", "a", "c", "a"], ["a", "b", "d"]]  # a:3, b:2, c:1, d:1


def test_specials_first_then_frequency_then_alphabetical():
    vocab = build_vocab(TOKENS)
    assert vocab.itos == ["<pad>", "<unk>", "a", "b", "c", "d"]
    assert vocab.stoi["<pad>"] == 0 and vocab.stoi["<unk>"] == 1 and vocab.unk_index == 1


def test_unknown_tokens_encode_to_unk_and_are_listed():
    vocab = build_vocab(TOKENS)
    assert vocab.encode(["a", "zzz", "d"]) == [2, 1, 5]
    assert vocab.unknown(["zzz", "a", "yyy", "zzz"]) == ["yyy", "zzz"]
    assert vocab.decode([2, 3, 0]) == ["a", "b", "<pad>"]


def test_decode_out_of_range_is_an_input_error():
    with pytest.raises(InputError, match="outside"):
        build_vocab(TOKENS).decode([99])


def test_min_freq_and_max_size():
    assert build_vocab(TOKENS, min_freq=2).itos == ["<pad>", "<unk>", "a", "b"]
    assert build_vocab(TOKENS, max_size=3).itos == ["<pad>", "<unk>", "a"]  # max_size counts the specials
    assert build_vocab(TOKENS, min_freq=2).encode(["c"]) == [1]
    with pytest.raises(ConfigError):
        build_vocab(TOKENS, max_size=1)
    with pytest.raises(ConfigError):
        build_vocab(TOKENS, min_freq=0)


def test_specials_in_the_data_are_not_duplicated():
    vocab = build_vocab([["<unk>", "x", "<pad>"]])
    assert vocab.itos == ["<pad>", "<unk>", "x"]


def test_char_vocab_without_unk_rejects_unknown_characters_by_name():
    vocab = build_vocab(["hello"], specials=())
    assert vocab.unk_index is None
    assert vocab.itos == ["l", "e", "h", "o"]
    assert vocab.decode(vocab.encode("hole")) == list("hole")
    with pytest.raises(InputError, match=r"'\?'.*'z'|'z'.*'\?'") as caught:
        vocab.encode("hez?")
    assert "'z'" in str(caught.value) and "'?'" in str(caught.value)


def test_unknown_error_shows_at_most_ten_items():
    vocab = build_vocab(["ab"], specials=())
    with pytest.raises(InputError, match="and 3 more"):
        vocab.encode("0123456789abcde")


def test_json_round_trip(tmp_path):
    vocab = build_vocab(TOKENS, min_freq=1)
    path = vocab.save(tmp_path / "sub" / "vocab.json")
    assert json.loads(path.read_text()) == {"itos": vocab.itos, "unk_index": 1}
    loaded = Vocab.load(path)
    assert loaded == vocab and loaded.stoi == vocab.stoi
    assert Vocab.from_json(build_vocab(["ab"], specials=()).to_json()).unk_index is None


def test_bad_vocab_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Vocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        Vocab.load(tmp_path / "bad.json")
    (tmp_path / "dup.json").write_text(json.dumps({"itos": ["a", "a"], "unk_index": None}))
    with pytest.raises(DataError, match="dup.json"):
        Vocab.load(tmp_path / "dup.json")
