"""Inference: raw input -> predictions, per-item validation, and the sampler's guarantees."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rnnlab.bundle import load_bundle, save_bundle
from rnnlab.data.prices import validate_prices
from rnnlab.data.stock import FEATURE_NAMES, read_prices, to_price
from rnnlab.data.vocab import build_vocab
from rnnlab.errors import BundleError, InputError
from rnnlab.inference import load_predictor
from rnnlab.jobs.charlm import CharLMPredictor
from rnnlab.jobs.sentiment import MAX_TEXT_CHARS
from rnnlab.jobs.sentiment import SentimentPredictor
from rnnlab.jobs.price_history import MAX_HISTORY_ROWS
from rnnlab.jobs.stock import StockPredictor
from rnnlab.sampling import sample_next
from rnnlab.models import build_model
from stock_reference import chapter_features

CORPUS = "the emperor spoke to the prince. the prince said nothing, and the army marched on.\n"


@pytest.fixture(scope="module")
def sentiment_bundle(tmp_path_factory):
    torch.manual_seed(0)
    vocab = build_vocab([["good", "great", "film", "bad", "awful", "plot", "the", "a"]])
    model = build_model("sentiment", {"vocab_size": len(vocab), "embed_dim": 4, "hidden_size": 5,
                                      "bidirectional": True, "fc_size": 3})
    path = tmp_path_factory.mktemp("sentiment") / "bundle"
    save_bundle(path, job="sentiment", model=model, assets={"vocab": vocab.to_json()}, metrics={},
                config={"job": "sentiment", "data": {"max_length": 6}})
    return path


@pytest.fixture(scope="module")
def charlm_bundle(tmp_path_factory):
    torch.manual_seed(0)
    vocab = build_vocab([CORPUS], specials=())
    model = build_model("charlm", {"vocab_size": len(vocab), "embed_dim": 8, "hidden_size": 16, "num_layers": 2})
    path = tmp_path_factory.mktemp("charlm") / "bundle"
    save_bundle(path, job="charlm", model=model, assets={"vocab": vocab.to_json()}, metrics={},
                config={"job": "charlm", "data": {"lowercase": True}})
    return path


# --------------------------------------------------------------------------------------------- sentiment


def test_sentiment_predictions_do_not_depend_on_the_batch(sentiment_bundle):
    classifier = load_predictor(sentiment_bundle)
    assert isinstance(classifier, SentimentPredictor)
    texts = ["A <b>great</b> film!", "bad", "The plot was awful, awful, awful and the film bad :(", "unseen words"]
    batched = classifier.predict(texts)
    alone = [classifier.predict([t])[0] for t in texts]
    assert [r["label"] for r in batched] == [r["label"] for r in alone]
    np.testing.assert_allclose([r["probability"] for r in batched], [r["probability"] for r in alone], atol=1e-6)
    for result in batched:
        sign = "positive" if result["probability"] >= 0.5 else "negative"
        assert result["label"] == (sign if result["known_tokens"] else "unknown")
        assert 0.0 <= result["probability"] <= 1.0

    # a server encodes each text once as it arrives and runs the batch later: same answers, any chunk size
    encoded = [classifier.prepare(t) for t in texts]
    assert classifier.predict_prepared(encoded, batch_size=1) == classifier.predict_prepared(encoded)
    np.testing.assert_allclose([r["probability"] for r in classifier.predict_prepared(encoded)],
                               [r["probability"] for r in batched], atol=1e-6)


def test_sentiment_answers_say_how_many_tokens_the_model_knows_and_give_no_guess_when_none(sentiment_bundle):
    classifier = load_predictor(sentiment_bundle)
    texts = ["The film was great", "qwxz blorfle zzyzx", "bad plot", "zzyzx " * 8 + "great", "great " + "zzyzx " * 8]
    batched = classifier.predict(texts)
    assert batched[1] == {"label": "unknown", "probability": 0.5, "tokens": 3, "known_tokens": 0}
    assert batched[0]["label"] != "unknown" and (batched[0]["tokens"], batched[0]["known_tokens"]) == (4, 3)  # "was"
    # a long review is counted as the model reads it: its last 6 tokens (the bundle's max_length)
    assert [(a["tokens"], a["known_tokens"], a["label"] == "unknown") for a in batched[3:]] == [(6, 1, False),
                                                                                             (6, 0, True)]
    # the review of unknown words leaves its neighbours' answers as they are alone
    for text, answer in zip(texts, batched):
        alone = classifier.predict([text])[0]
        assert answer == {**alone, "probability": pytest.approx(alone["probability"], abs=1e-6)}


def test_reviews_are_cut_into_passes_of_similar_length_each_review_once():
    from rnnlab.jobs.sentiment import MAX_PADDING, similar_lengths

    lengths = [400, 45, 84, 120, 400, 123, 3, 351, 241, 133, 2, 205] * 6
    passes = list(similar_lengths(lengths, batch_size=8))
    assert sorted(i for chunk in passes for i in chunk) == list(range(len(lengths)))
    for chunk in passes:
        sizes = [lengths[i] for i in chunk]
        assert len(chunk) <= 8 and sizes == sorted(sizes)
        assert max(sizes) * len(sizes) <= (1 + MAX_PADDING) * sum(sizes)
    assert len(passes) < len(lengths)  # reviews of one length still share a pass


@pytest.mark.parametrize("text, match", [
    ("", "empty"), ("   \n", "empty"), ("<br /><br />...", "no words"), (123, "string"),
    ("x" * (MAX_TEXT_CHARS + 1), "limit"),
])  # fmt: skip
def test_sentiment_rejects_bad_reviews_one_at_a_time(sentiment_bundle, text, match):
    classifier = load_predictor(sentiment_bundle)
    with pytest.raises(InputError, match=match):
        classifier.validate(text)
    with pytest.raises(InputError, match="Review 1"):
        classifier.predict(["good film", text])


# --------------------------------------------------------------------------------------------- stock


def test_stock_forecast_matches_the_training_pipeline(stock_setup):
    path, csv, data, _ = stock_setup
    forecaster = load_predictor(path)
    assert isinstance(forecaster, StockPredictor)
    prices = read_prices(csv)
    [result] = forecaster.predict([prices])
    assert forecaster.predict_prepared([forecaster.prepare(prices)], batch_size=1) == [result]  # prepared once
    X, _, rows = data.splits["test"]
    with torch.no_grad():
        scaled = forecaster.model(torch.from_numpy(X[-1:])).numpy()
    expected = to_price(data.target_scaler.inverse_transform(scaled), rows.iloc[-1:], "log_return")[0]
    assert result["date"] == str(prices.index[-1].date())
    assert result["close"] == pytest.approx(expected, rel=1e-9)
    assert result["baseline_open"] == pytest.approx(prices["Open"].iloc[-1])
    assert result["actual_close"] == pytest.approx(prices["Close"].iloc[-1])


def test_stock_last_row_needs_only_date_and_open(stock_setup):
    path, csv, _, _ = stock_setup
    forecaster = load_predictor(path)
    prices = read_prices(csv)
    open_only = prices.copy()
    open_only.iloc[-1, open_only.columns.get_indexer(["High", "Low", "Close", "Volume"])] = np.nan
    rows = [{"date": str(d.date()), "open": r.Open, "high": r.High, "low": r.Low, "close": r.Close,
             "volume": r.Volume} for d, r in open_only.iterrows()]
    rows[-1].update(high=None, low=None, close=None, volume=None)
    full, frame, as_rows = forecaster.predict([prices, open_only, rows])
    assert frame["close"] == full["close"] == as_rows["close"]
    assert frame["actual_close"] is None


def test_stock_rejects_short_long_and_broken_histories(stock_setup):
    path, csv, _, _ = stock_setup
    forecaster = load_predictor(path)
    prices = read_prices(csv)
    with pytest.raises(InputError, match=str(forecaster.min_rows)):
        forecaster.validate(prices.iloc[: forecaster.min_rows - 1])
    forecaster.validate(prices.iloc[: forecaster.min_rows])
    too_long = pd_concat_repeated(prices, MAX_HISTORY_ROWS + 1)
    with pytest.raises(InputError, match="limit"):
        forecaster.validate(too_long)
    broken = prices.copy()
    broken.iloc[-10, 0] = np.nan  # a missing open in the middle of the history
    with pytest.raises(InputError, match="History 1"):
        forecaster.predict([prices, broken])


def pandas_path_forecasts(forecaster: StockPredictor, histories: list) -> list[float]:
    """The forecasts as the forecaster made them before its vectorised features: the chapter's pandas features
    over each whole request (tests/stock_reference.py), then the same batches through the model (the CPU LSTM's
    last bits depend on the batch it runs in)."""
    features = [chapter_features(history) for history in histories]
    windows = np.stack([forecaster.scaler.transform(f[FEATURE_NAMES].iloc[-forecaster.window :]) for f in features])
    with torch.no_grad():
        outputs = [forecaster.model(torch.from_numpy(windows[start : start + 64].astype(np.float32))).numpy()
                   for start in range(0, len(windows), 64)]
    target = forecaster.target_scaler.inverse_transform(np.concatenate(outputs).astype(np.float64))
    return [float(close) for close in to_price(target, pd.concat([f.iloc[[-1]] for f in features]), forecaster.target)]


def test_stock_forecasts_equal_the_pandas_path_to_the_last_digit(stock_setup):
    path, csv, _, _ = stock_setup
    forecaster = load_predictor(path)
    prices = read_prices(csv)
    histories = [prices.iloc[end - 300 : end] for end in range(len(prices) - 60, len(prices) + 1)]
    served = forecaster.predict(histories)  # one batch: features for all 61 histories in one pass
    assert [result["close"] for result in served] == pandas_path_forecasts(forecaster, histories)


def service_columns(prices) -> dict:
    """A history as the service's Gateway hands it over: datetime64 days and float64 columns, NaN for nulls."""
    return {"date": prices.index.to_numpy().astype("datetime64[D]"),
            **{name.lower(): prices[name].to_numpy(dtype=np.float64, copy=True) for name in prices.columns}}


def test_stock_history_forms_give_the_same_forecast(stock_setup):
    path, csv, _, _ = stock_setup
    forecaster = load_predictor(path)
    prices = read_prices(csv).iloc[-400:]
    rows = [{"date": str(d.date()), "open": r.Open, "high": r.High, "low": r.Low, "close": r.Close,
             "volume": r.Volume} for d, r in prices.iterrows()]
    strings = pd.DataFrame(rows).astype(str)  # numeric strings take the general (pandas) checks
    forms = [prices, service_columns(prices), rows, pd.DataFrame(rows), strings]
    answers = forecaster.predict(forms)
    assert all(answer == answers[0] for answer in answers), answers


@pytest.mark.parametrize("break_it", [
    lambda c: c["date"].__setitem__(10, c["date"][20]),  # duplicate date
    lambda c: c["date"].__setitem__(slice(None), c["date"][::-1].copy()),  # unsorted
    lambda c: c["close"].__setitem__(100, np.nan),  # missing value mid-history
    lambda c: c["open"].__setitem__(-1, np.nan),  # the forecast day without its open
    lambda c: c["high"].__setitem__(5, np.inf),
    lambda c: c["low"].__setitem__(7, 0.0),
    lambda c: c["volume"].__setitem__(9, -1.0),
    lambda c: c.pop("volume"),
])  # fmt: skip
def test_stock_service_columns_fail_with_the_pandas_checks_words(stock_setup, break_it):
    path, csv, _, _ = stock_setup
    forecaster = load_predictor(path)
    columns = service_columns(read_prices(csv).iloc[-300:])
    break_it(columns)
    with pytest.raises(InputError) as fast:
        forecaster.prepare(columns)
    with pytest.raises(InputError) as general:
        validate_prices(pd.DataFrame(columns), "The price history", InputError, last_row_may_be_open_only=True)
    assert str(fast.value) == str(general.value)


def test_stock_undefined_features_fail_only_their_history(stock_setup):
    path, csv, _, _ = stock_setup
    forecaster = load_predictor(path)
    prices = read_prices(csv).iloc[-300:]
    flat = prices.copy()
    flat.iloc[-30:, flat.columns.get_indexer(["Volume"])] = 0.0  # a 21-day average volume of 0: a 0/0 ratio
    good, bad = forecaster.predict_prepared([forecaster.prepare(prices), forecaster.prepare(flat)])
    assert "close" in good and "undefined features" in bad["error"]
    with pytest.raises(InputError, match="History 1: .*undefined features"):
        forecaster.predict([prices, flat])


def pd_concat_repeated(prices, rows):
    import pandas as pd

    dates = pd.bdate_range("1990-01-01", periods=rows, name="Date")
    values = np.resize(prices.to_numpy(), (rows, prices.shape[1]))
    return pd.DataFrame(values, index=dates, columns=prices.columns)


# --------------------------------------------------------------------------------------------- sampler


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.randn(8, 20, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, temperature=0.0), argmax)
    for seed in range(5):
        generators = [torch.Generator().manual_seed(seed * 8 + i) for i in range(8)]
        assert torch.equal(sample_next(logits, temperature=1.5, top_k=1, generator=generators), argmax)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6), argmax)


def test_sampling_is_deterministic_per_seed_and_independent_of_the_batch():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    temperature, top_k, top_p = [0.7, 1.0, 1.3, 2.0], [None, 5, 3, None], [None, None, 0.8, 0.95]

    def draw(rows: list[int], seeds: list[int], steps: int = 20) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        pick = lambda values: [values[r] for r in rows]  # noqa: E731
        return torch.stack([sample_next(logits[rows], pick(temperature), pick(top_k), pick(top_p), generators)
                            for _ in range(steps)])

    together = draw([0, 1, 2, 3], [10, 11, 12, 13])
    assert torch.equal(together, draw([0, 1, 2, 3], [10, 11, 12, 13]))  # same seeds, same tokens
    for row in range(4):  # each row alone, with its own seed and parameters, gets what it got in the batch
        assert torch.equal(draw([row], [10 + row])[:, 0], together[:, row])
    assert torch.equal(draw([3, 1], [13, 11]), together[:, [3, 1]])  # neighbours and order do not matter
    assert not torch.equal(draw([0], [99])[:, 0], together[:, 0])


def test_top_k_and_top_p_restrict_the_support_per_row():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(2)).repeat(200, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(400)]
    top_k = torch.tensor([3, 0]).repeat(200)
    ids = sample_next(logits, 1.0, top_k=top_k, top_p=[None, 0.5] * 200, generator=generators)
    allowed_k = set(logits[0].topk(3).indices.tolist())
    assert set(ids[0::2].tolist()) <= allowed_k
    probs = logits[1].softmax(-1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    allowed_p = set(order[mass_before < 0.5].tolist())
    assert set(ids[1::2].tolist()) <= allowed_p
    assert len(set(ids[1::2].tolist())) > 1  # still sampling, not greedy


# --------------------------------------------------------------------------------------------- generation


def test_generation_is_deterministic_for_a_seed_and_streams_the_same_text(charlm_bundle):
    generator = load_predictor(charlm_bundle)
    assert isinstance(generator, CharLMPredictor)
    text = generator.generate("the emperor", max_new_tokens=40, temperature=1.0, seed=7)
    assert len(text) == 40 and set(text) <= set(CORPUS)
    assert generator.generate("the emperor", max_new_tokens=40, temperature=1.0, seed=7) == text
    assert "".join(generator.stream("the emperor", max_new_tokens=40, seed=7)) == text
    assert generator.generate("The Emperor", max_new_tokens=40, seed=7) == text  # trained lowercased
    assert generator.generate("the emperor", max_new_tokens=40, seed=8) != text
    greedy = generator.generate("the", max_new_tokens=20, temperature=0.0, seed=1)
    assert generator.generate("the", max_new_tokens=20, temperature=0.0, seed=2) == greedy
    assert generator.generate("the", max_new_tokens=20, top_k=1, seed=3) == greedy


def test_generation_in_a_batch_equals_generation_alone(charlm_bundle):
    """Decoding several prompts together (as the service does) gives each the text it gets alone."""
    generator = load_predictor(charlm_bundle)
    model, vocab = generator.model, generator.vocab
    requests = [("the emperor", 1.0, None, None, 5), ("a", 0.8, 4, None, 6), ("prince said", 1.2, None, 0.9, 7)]
    states, next_ids = [], []
    with torch.no_grad():
        for prompt, *_ in requests:
            *context, last = generator.encode_prompt(prompt)
            states.append(model(torch.tensor([context]))[1] if context else model.init_state(1))
            next_ids.append(last)
        state = (torch.cat([s[0] for s in states], 1), torch.cat([s[1] for s in states], 1))
        generators = [torch.Generator().manual_seed(r[4]) for r in requests]
        out: list[list[int]] = [[] for _ in requests]
        ids = torch.tensor(next_ids)
        for _ in range(30):
            logits, state = model.step(ids, state)
            ids = sample_next(logits, [r[1] for r in requests], [r[2] for r in requests], [r[3] for r in requests],
                              generators)
            for row, token in enumerate(ids.tolist()):
                out[row].append(token)
    for (prompt, temperature, top_k, top_p, seed), tokens in zip(requests, out):
        alone = generator.generate(prompt, max_new_tokens=30, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed)
        assert "".join(vocab.decode(tokens)) == alone


def test_prompt_errors_name_the_problem(charlm_bundle):
    generator = load_predictor(charlm_bundle)
    with pytest.raises(InputError) as info:
        generator.validate_prompt("the emperor € zebra")
    assert "'€'" in str(info.value) and "'z'" in str(info.value)
    with pytest.raises(InputError, match="empty"):
        generator.validate_prompt("")
    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": 10**6}, {"temperature": -1.0}, {"top_k": 0},
                {"top_p": 1.5}, {"seed": -1}):
        name = next(iter(bad))
        with pytest.raises(InputError, match=name):
            generator.generate("the", **bad)


def test_sampling_settings_are_checked_by_one_definition_in_one_sentence(charlm_bundle):
    from rnnlab.sampling import MAX_TOP_K, SamplingParams

    generator = load_predictor(charlm_bundle)
    with pytest.raises(InputError) as info:  # was an OverflowError traceback from torch.full
        generator.generate("the", top_k=10**20)
    assert str(info.value).startswith("top_k:") and str(info.value).count(". ") == 0
    for bad in ({"temperature": float("nan")}, {"top_p": float("inf")}, {"top_k": True}, {"max_tokens": 5}):
        with pytest.raises(InputError, match=next(iter(bad))):
            generator.generate("the", **bad)
    # top_k at or above the vocabulary keeps every character: the same text as no top_k
    vocab = len(generator.vocab.itos)
    plain = generator.generate("the", max_new_tokens=30, seed=4)
    assert generator.generate("the", max_new_tokens=30, seed=4, top_k=vocab) == plain
    assert generator.generate("the", max_new_tokens=30, seed=4, top_k=MAX_TOP_K) == plain
    assert SamplingParams(seed=3).with_seed().seed == 3 and SamplingParams().with_seed().seed is not None


def test_sampler_names_the_rows_with_non_finite_scores():
    from rnnlab.sampling import NonFiniteScores

    logits = torch.randn(4, 10)
    logits[2, 3] = float("nan")
    logits[0, 1] = float("inf")
    logits[1, 5] = float("-inf")  # a masked token is fine
    with pytest.raises(NonFiniteScores) as info:
        sample_next(logits)
    assert info.value.rows == [0, 2]


def test_predictor_for_the_wrong_job_is_refused(sentiment_bundle):
    with pytest.raises(BundleError, match="not a charlm"):
        CharLMPredictor(load_bundle(sentiment_bundle))
