"""The review language model: its data (train + unlabelled reviews, never test), its output layers, its job and
bundle, and a sentiment model starting from it (model.init_from, vocabulary checked)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny_datasets import make_imdb_tar
from rnnlab.config import load_config
from rnnlab.errors import ConfigError
from rnnlab.models.wordlm import OUTPUTS, WordLSTM
from rnnlab.registry import JOBS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_imdb_tar(tmp_path_factory.mktemp("imdb"), per_class=20, unsup=60)


@pytest.fixture(scope="module")
def lm_run(archive, tmp_path_factory):
    from rnnlab.trainers.loop import train

    config = load_config("lm", "smoke", overrides=[f"data.source={archive}", "tracking.wandb=false",
                                                   "data.heldout_reviews=5", "data.limit_train=0"])
    return train(config, tmp_path_factory.mktemp("lm") / "run")


def sentiment_job(archive, *overrides):
    from rnnlab.trainers.job import make_job

    config = load_config("sentiment", "smoke", overrides=[
        f"data.source={archive}", "tracking.wandb=false", "data.min_freq=2", "data.max_vocab=30000",
        "model.embed_dim=8", "model.hidden_size=8", "model.bidirectional=false", *overrides])
    job = make_job(config)
    job.load_data()
    return job


@pytest.mark.parametrize("output", OUTPUTS)
def test_every_output_layer_gives_the_nll_of_its_own_distribution(output):
    torch.manual_seed(0)
    config = SimpleNamespace(vocab_size=300, embed_dim=6, hidden_size=10, num_layers=2, dropout=0.0, output=output,
                             cutoffs=[20, 100], cell="lstm", forget_bias=None)
    model = WordLSTM(config).eval()
    ids = torch.randint(1, 300, (3, 9))
    hidden, state = model(ids[:, :-1])
    log_probs = model.log_probs(hidden)
    assert log_probs.shape == (3, 8, 300) and len(state) == 2
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 8))
    expected = -log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).sum()
    torch.testing.assert_close(model.loss_sum(hidden, ids[:, 1:]), expected, rtol=1e-4, atol=1e-3)


def test_the_streams_hold_train_and_unlabelled_reviews_never_test(archive):
    from rnnlab.data.imdb import load_sentiment_data
    from rnnlab.data.review_lm import END_OF_REVIEW, load_review_lm_data

    data = load_review_lm_data(archive, min_freq=2, heldout_reviews=5)
    sentiment = load_sentiment_data(archive, min_freq=2)
    assert data.vocab == sentiment.vocab
    # 40 train reviews less the 10 % validation hold-out, 60 unlabelled less 2 x 5 held out
    assert data.reviews == {"train": 36 + 50, "val": 5, "test": 5}
    for split in ("train", "val", "test"):
        stream = getattr(data, split)
        assert (stream == END_OF_REVIEW).sum() == data.reviews[split] and stream[-1] == END_OF_REVIEW
    train_tokens = sum(len(r) for r in sentiment.train.ids) + 50 * 20
    assert len(data.train) == train_tokens + data.reviews["train"]


def test_lm_trains_to_a_bundle_with_perplexity(lm_run):
    from rnnlab.bundle import load_bundle

    assert math.isfinite(lm_run["test"]["perplexity"])
    assert lm_run["test"]["perplexity"] == pytest.approx(math.exp(lm_run["test"]["loss"]))
    bundle = load_bundle(lm_run["bundle"])
    assert bundle.job == "lm" and "vocab" in bundle.assets
    assert set(JOBS["lm"].metrics) == set(lm_run["val"])  # what Tune would rank by is what the job reports


def test_sentiment_starts_from_the_lm_weights(archive, lm_run):
    from rnnlab.bundle import load_bundle

    lm = load_bundle(lm_run["bundle"]).model
    model = sentiment_job(archive, f"model.init_from={lm_run['bundle']}").build_model()
    torch.testing.assert_close(model.embedding.weight, lm.embedding.weight)
    torch.testing.assert_close(model.layers[0][0].weight_hh_l0, lm.layers[0].weight_hh_l0)
    fresh = sentiment_job(archive).build_model()
    assert not torch.equal(fresh.embedding.weight, lm.embedding.weight)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.max_vocab=10"], "vocabulary"),  # another vocabulary than the LM's
        (["model.hidden_size=12"], "hidden_size"),
        (["model.num_layers=2"], "num_layers=1"),
    ],
)
def test_a_mismatched_start_is_one_sentence(archive, lm_run, overrides, match):
    with pytest.raises(ConfigError, match=match):
        sentiment_job(archive, f"model.init_from={lm_run['bundle']}", *overrides).build_model()


def test_an_lm_bundle_answers_no_requests(lm_run):
    from rnnlab.errors import BundleError
    from rnnlab.inference import load_predictor

    with pytest.raises(BundleError, match="starting point"):
        load_predictor(lm_run["bundle"])
    assert np.isfinite(lm_run["val"]["loss"])


@pytest.mark.slow
@pytest.mark.mirror
def test_mirror_unlabelled_reviews_are_the_50000_in_file_order_read_with_any_vocabulary(mirror):
    from rnnlab.data import imdb
    from rnnlab.data.review_lm import unlabelled_reviews
    from rnnlab.data.vocab import build_vocab

    archive = mirror / "aclImdb_v1.tar.gz"
    texts = [review.text for review in imdb.read_imdb(archive, ("unsup",))["unsup"]]
    vocab = build_vocab([imdb.tokenize(text) for text in texts[:200]], min_freq=2)  # most words unknown to it
    reviews = unlabelled_reviews(archive, vocab)
    assert len(reviews) == len(texts) == 50_000
    for i in (0, 1, 12_345, 49_999):
        assert reviews[i].tolist() == vocab.encode(imdb.tokenize(texts[i]))
    assert [r.tolist() for r in unlabelled_reviews(archive, vocab, max_length=5)[:3]] == \
        [r[-5:].tolist() for r in reviews[:3]]
