"""Models: shapes, exact variable-length handling, config round trips and refusals."""

from __future__ import annotations

import pytest
import torch

from tiny_models import small_model_settings
from rnnlab.errors import ConfigError
from rnnlab.registry import JOBS
from rnnlab.models import build_model
from rnnlab.models.charlm import CharConfig, CharLSTM
from rnnlab.models.sentiment import SentimentConfig, SentimentLSTM, masked_max_mean
from rnnlab.models.stock import StockConfig, StockLSTM


def padded_batch(lengths: list[int], vocab_size: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (len(lengths), max(lengths)), generator=g)
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return ids, torch.tensor(lengths)


@pytest.mark.parametrize("pooling", ["last", "max_mean"])
@pytest.mark.parametrize("strategy", ["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_sentiment_logit_is_the_same_alone_or_padded_in_a_batch(strategy, bidirectional, num_layers, pooling):
    torch.manual_seed(0)
    config = SentimentConfig(vocab_size=40, embed_dim=6, hidden_size=5, num_layers=num_layers,
                             bidirectional=bidirectional, dropout=0.5, fc_size=4, pooling=pooling,
                             embed_dropout=0.5)
    model = SentimentLSTM(config, length_strategy=strategy).eval()
    lengths = [9, 3, 1, 6]
    ids, lens = padded_batch(lengths)
    # extra trailing padding beyond the longest sequence must not matter either
    ids = torch.cat([ids, torch.zeros(len(lengths), 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        batched = model(ids, lens)
        alone = torch.stack([model(ids[i : i + 1, :n], lens[i : i + 1])[0] for i, n in enumerate(lengths)])
    assert batched.shape == (4,)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_sentiment_padded_and_packed_strategies_agree_including_gradients(bidirectional):
    torch.manual_seed(1)
    model = SentimentLSTM(SentimentConfig(vocab_size=40, embed_dim=6, hidden_size=5, num_layers=2,
                                          bidirectional=bidirectional, fc_size=4))
    ids, lens = padded_batch([7, 2, 5])
    results = {}
    for strategy in ("padded", "packed"):
        model.length_strategy = strategy
        model.zero_grad()
        out = model(ids, lens)
        out.sum().backward()
        results[strategy] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["padded"][0], results["packed"][0], rtol=0, atol=1e-6)
    for a, b in zip(results["padded"][1], results["packed"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_masked_max_mean_ignores_pads_even_when_every_real_value_is_negative():
    # Pads hold 0 (packed) or real LSTM outputs (padded); both must be invisible to the max and the mean.
    x = torch.tensor([[[-3.0, -1.0], [-2.0, -5.0], [0.0, 9.0]],
                      [[-4.0, -6.0], [7.0, 7.0], [7.0, 7.0]]])
    pooled = masked_max_mean(x, torch.tensor([2, 1]))
    expected = torch.tensor([[-2.0, -1.0, -2.5, -3.0],
                             [-4.0, -6.0, -4.0, -6.0]])
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_sentiment_max_mean_pooling_agrees_across_strategies_and_sees_every_token(bidirectional):
    torch.manual_seed(4)
    model = SentimentLSTM(SentimentConfig(vocab_size=40, embed_dim=6, hidden_size=5, num_layers=2,
                                          bidirectional=bidirectional, fc_size=4, pooling="max_mean")).eval()
    ids, lens = padded_batch([7, 2, 5])
    with torch.no_grad():
        padded = model(ids, lens)
        model.length_strategy = "packed"
        torch.testing.assert_close(padded, model(ids, lens), rtol=0, atol=1e-6)
        changed = ids.clone()
        changed[0, 3] = (ids[0, 3] % 39) + 1  # a middle token of the first review
        assert not torch.equal(padded[0], model(changed, lens)[0])
    assert model.head[0].in_features == 5 * (2 if bidirectional else 1) * 2


def test_sentiment_backward_direction_reads_the_whole_review():
    # With a bidirectional model the first token must still influence the result through the backward direction
    # and the last token through the forward one: both directions start where they should.
    torch.manual_seed(2)
    model = SentimentLSTM(SentimentConfig(vocab_size=40, embed_dim=6, hidden_size=5, bidirectional=True)).eval()
    ids, lens = padded_batch([6])
    changed_first, changed_last = ids.clone(), ids.clone()
    changed_first[0, 0] = (ids[0, 0] % 39) + 1
    changed_last[0, 5] = (ids[0, 5] % 39) + 1
    with torch.no_grad():
        base = model(ids, lens)
        assert not torch.equal(base, model(changed_first, lens))
        assert not torch.equal(base, model(changed_last, lens))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_sentiment_padding_embedding_is_zero_and_stays_untrained(optimizer):
    """A few steps of rnnlab's own optimizer (with weight decay) on padded batches move every other embedding
    row and leave the padding row at zero."""
    from rnnlab.config import TrainSettings
    from rnnlab.trainers.optim import make_optimizer

    torch.manual_seed(0)
    model = SentimentLSTM(SentimentConfig(vocab_size=10, embed_dim=6, hidden_size=5, fc_size=4))
    assert model.embedding.padding_idx == 0
    assert torch.count_nonzero(model.embedding.weight[0]) == 0
    before = model.embedding.weight.detach().clone()
    step = make_optimizer(model, TrainSettings(optimizer=optimizer, lr=0.05, weight_decay=0.01))
    for seed in range(5):
        ids, lens = padded_batch([7, 3, 5, 2], vocab_size=10, seed=seed)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids, lens), (lens > 3).float())
        step.zero_grad()
        loss.backward()
        step.step()
    after = model.embedding.weight.detach()
    assert torch.count_nonzero(after[0]) == 0
    assert all(not torch.equal(before[row], after[row]) for row in range(1, 10))  # it did train


def test_ngram_branch_counts_each_distinct_ngram_once_and_ignores_pads():
    from rnnlab.models.sentiment import BIGRAM_HASH, distinct_ngrams

    vocab, buckets = 10, 1000
    ids = torch.tensor([[5, 6, 5, 6, 0, 0], [7, 7, 7, 0, 0, 0]])
    indices, weights = distinct_ngrams(ids, torch.tensor([4, 2]), vocab, buckets)
    bigram = lambda a, b: vocab + (a * BIGRAM_HASH + b) % (buckets - vocab)  # noqa: E731
    # review 0: unigrams {5, 6}, bigrams {(5,6), (6,5)} -> 4 distinct, each weighted 1/sqrt(4)
    assert {int(i): float(w) for i, w in zip(indices[0], weights[0]) if w > 0} == {
        5: 0.5, 6: 0.5, bigram(5, 6): 0.5, bigram(6, 5): 0.5}
    # review 1 (length 2): unigram 7 and bigram (7, 7); the pads and the bigrams into them do not count
    assert {int(i): pytest.approx(float(w)) for i, w in zip(indices[1], weights[1]) if w > 0} == {
        7: pytest.approx(2 ** -0.5), bigram(7, 7): pytest.approx(2 ** -0.5)}


def test_ngram_branch_adds_a_linear_logit_that_padding_does_not_change():
    torch.manual_seed(0)
    config = SentimentConfig(vocab_size=40, embed_dim=6, hidden_size=5, bidirectional=True, fc_size=4,
                             pooling="max_mean", ngram_buckets=500)
    model = SentimentLSTM(config).eval()
    torch.nn.init.normal_(model.ngrams.weight)
    lengths = [9, 3, 1, 6]
    ids, lens = padded_batch(lengths)
    with torch.no_grad():
        lstm, ngrams = model(ids, lens, branches=True)
        batched = model(ids, lens)
        alone = torch.stack([model(ids[i : i + 1, :n], lens[i : i + 1])[0] for i, n in enumerate(lengths)])
    torch.testing.assert_close(batched, lstm + ngrams)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)
    assert ngrams.abs().min() > 0  # the branch is live, not a zero added on
    with pytest.raises(ConfigError, match=r"ngram_buckets \(40\) must exceed the vocabulary size \(40\)"):
        SentimentConfig(vocab_size=40, ngram_buckets=40)


def test_sentiment_refuses_empty_sequences():
    model = SentimentLSTM(SentimentConfig(vocab_size=10))
    with pytest.raises(ValueError):
        model(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 0]))


def test_stock_output_shape():
    model = StockLSTM(StockConfig(num_features=37, hidden_size=4, num_layers=2, fc_size=3, dropout=0.1))
    assert model(torch.randn(5, 7, 37)).shape == (5,)


def test_charlm_window_equals_step_by_step_and_carries_state():
    torch.manual_seed(3)
    model = CharLSTM(CharConfig(vocab_size=11, embed_dim=5, hidden_size=7, num_layers=2)).eval()
    ids = torch.randint(0, 11, (3, 8))
    with torch.no_grad():
        logits, (h, c) = model(ids)
        assert logits.shape == (3, 8, 11) and h.shape == c.shape == (2, 3, 7)
        # two half windows with the carried state = one whole window
        first, state = model(ids[:, :4])
        second, state2 = model(ids[:, 4:], state)
        torch.testing.assert_close(torch.cat([first, second], 1), logits)
        # step-by-step decoding from init_state matches the window
        state = model.init_state(3)
        for t in range(8):
            step_logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(step_logits, logits[:, t])
        torch.testing.assert_close(state[0], h)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_models_config_rebuilds_the_same_model_from_its_bundle(job, tmp_path):
    """What every bundle relies on: the model's config keeps each setting it was built with, goes through
    config.json and rebuilds a model of the same class and config that takes the saved weights exactly."""
    from rnnlab.bundle import load_bundle, save_bundle

    settings = small_model_settings(job)
    model = build_model(job, settings)
    assert isinstance(model, JOBS[job].load("model"))
    assert {key: model.config.to_dict()[key] for key in settings} == settings
    loaded = load_bundle(save_bundle(tmp_path / "bundle", job=job, model=model, assets={}, metrics={},
                                     config={"job": job})).model
    assert type(loaded) is type(model) and loaded.config == model.config
    weights = loaded.state_dict()
    assert weights.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name


def test_config_refuses_unknown_and_missing_keys_and_bad_values():
    with pytest.raises(ConfigError, match="hiden_size"):
        SentimentConfig.from_dict({"vocab_size": 10, "hiden_size": 3})
    with pytest.raises(ConfigError, match="vocab_size"):
        CharConfig.from_dict({"hidden_size": 3})
    with pytest.raises(ConfigError, match="dropout"):
        StockConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="hidden_size"):
        StockConfig(hidden_size=0)
    with pytest.raises(ConfigError, match="pooling"):
        SentimentConfig(vocab_size=10, pooling="attention")
    with pytest.raises(ConfigError, match="embed_dropout"):
        SentimentConfig(vocab_size=10, embed_dropout=1.0)
    with pytest.raises(ConfigError, match="unknown job|Unknown job"):
        build_model("translation", {})


@pytest.mark.parametrize("job", ["charlm", "stock"])
def test_a_bundle_from_before_the_recurrent_module_was_renamed_still_loads(job, tmp_path):
    """Such a bundle holds the recurrent module's weights as ``lstm.*`` (it was ``self.lstm``, even for a GRU):
    they load into ``model.recurrent``, every weight as it was."""
    import json

    from safetensors.torch import save_file

    from rnnlab.bundle import _manifest_digest, load_bundle, save_bundle
    from rnnlab.data.sources import sha256_of

    torch.manual_seed(0)
    model = build_model(job, {**small_model_settings(job), "cell": "gru"})
    path = save_bundle(tmp_path / "bundle", job=job, model=model, assets={}, metrics={}, config={"job": job})
    old = {name.replace("recurrent.", "lstm.", 1): tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert any(name.startswith("lstm.") for name in old)
    save_file(old, str(path / "model.safetensors"))
    manifest = json.loads((path / "config.json").read_text())
    manifest["files"]["model.safetensors"] = sha256_of(path / "model.safetensors")
    manifest["config_sha256"] = _manifest_digest(manifest)
    (path / "config.json").write_text(json.dumps(manifest))
    loaded = load_bundle(path).model
    assert isinstance(loaded.recurrent, torch.nn.GRU)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
