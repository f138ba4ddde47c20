"""The Witten-Bell n-gram baseline (benchmarks/ngram.py): a proper distribution, and sensible scores."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import ngram

TEXT = "the cat sat on the mat. the cat ate the rat!"


def _encode(text: str) -> tuple[np.ndarray, dict[str, int]]:
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    return np.array([stoi[c] for c in text], dtype=np.int64), stoi


@pytest.mark.parametrize("order", [1, 2, 3, 6])
@pytest.mark.parametrize("context", ["", "t", "the", "the c", "at", "zz"])
def test_distribution_sums_to_one_over_the_vocab(order, context):
    ids, stoi = _encode(TEXT)
    vocab_size = len(stoi) + 1  # one symbol never seen in training still gets probability mass
    model = ngram.WittenBellNgram(order, vocab_size).fit(ids)
    ctx = [stoi.get(c, vocab_size - 1) for c in context]
    dist = model.distribution(ctx)
    assert dist.shape == (vocab_size,)
    assert np.all(dist > 0)
    assert dist.sum() == pytest.approx(1.0, abs=1e-12)


def test_seen_continuations_are_likelier_and_match_the_formula():
    ids, stoi = _encode(TEXT)
    model = ngram.WittenBellNgram(2, len(stoi)).fit(ids)
    dist = model.distribution([stoi["h"]])
    # "h" is always followed by "e" in TEXT: c(h,e)=4, c(h)=4, T(h)=1.
    unigram = model.distribution([])
    expected = (4 + 1 * unigram[stoi["e"]]) / (4 + 1)
    assert dist[stoi["e"]] == pytest.approx(expected)
    assert dist.argmax() == stoi["e"]
    # the unigram level interpolates counts with the uniform distribution
    n, types, v = len(ids), len(stoi), len(stoi)
    assert unigram[stoi["t"]] == pytest.approx((TEXT.count("t") + types / v) / (n + types))


def test_log_probs_agree_with_distribution_and_history_is_used():
    ids, stoi = _encode(TEXT)
    model = ngram.WittenBellNgram(3, len(stoi)).fit(ids[:30])
    held_out = ids[30:]
    scores = model.log_probs(held_out, history=ids[:30])
    for t in (0, 1, 5):
        context = np.concatenate([ids[:30], held_out[:t]])
        assert scores[t] == pytest.approx(np.log(model.distribution(context)[held_out[t]]))
    # a model of the text itself beats the uniform distribution on it
    assert model.nats_per_symbol(ids[:30]) < np.log(len(stoi))
