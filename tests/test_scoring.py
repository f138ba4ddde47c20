"""``rnnlab evaluate BUNDLE --data PATH``: any data in the job's format, read with the bundle's own vocabulary
or scaler, scored the way the training pipeline would score it; malformed data refused in one sentence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rnnlab import registry
from rnnlab.bundle import save_bundle
from rnnlab.data.stock import naive_same_day_open, regression_metrics, to_price
from rnnlab.data.vocab import build_vocab
from rnnlab.errors import DataError, InputError
from rnnlab.launch.cli import main
from rnnlab.models import build_model
from rnnlab.scoring import score_data

CORPUS = "the emperor spoke to the prince. the prince said nothing, and the army marched on.\n"
REVIEWS = [("A great film, great plot", 1), ("awful and bad", 0), ("The film was good", 1), ("bad plot, awful", 0)]


@pytest.fixture(scope="module")
def sentiment_bundle(tmp_path_factory):
    torch.manual_seed(0)
    vocab = build_vocab([["good", "great", "film", "bad", "awful", "plot", "the", "a"]])
    model = build_model("sentiment", {"vocab_size": len(vocab), "embed_dim": 4, "hidden_size": 5, "fc_size": 3})
    path = tmp_path_factory.mktemp("sentiment") / "bundle"
    save_bundle(path, job="sentiment", model=model, assets={"vocab": vocab.to_json()}, metrics={},
                config={"job": "sentiment", "data": {"max_length": 6}})
    return path


@pytest.fixture(scope="module")
def charlm_bundle(tmp_path_factory):
    torch.manual_seed(0)
    vocab = build_vocab([CORPUS], specials=())
    model = build_model("charlm", {"vocab_size": len(vocab), "embed_dim": 8, "hidden_size": 16})
    path = tmp_path_factory.mktemp("charlm") / "bundle"
    save_bundle(path, job="charlm", model=model, assets={"vocab": vocab.to_json()}, metrics={},
                config={"job": "charlm", "data": {"lowercase": True, "seq_len": 16}})
    return path


def write_folder(root, reviews):
    for i, (text, label) in enumerate(reviews):
        folder = root / ("pos" if label else "neg")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    return root


def write_csv(path, reviews, labels=("negative", "positive")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Text", "Label"])
        writer.writerows([text, labels[label]] for text, label in reviews)
    return path


# --------------------------------------------------------------------------------------------- sentiment


def test_predictions_give_each_rows_probability_in_order_and_none_for_a_row_without_words(sentiment_bundle, tmp_path,
                                                                                       charlm_bundle):
    from rnnlab.inference import load_predictor

    reviews = [*REVIEWS[:2], ("!!! ...", 1), *REVIEWS[2:]]
    scores = score_data(sentiment_bundle, write_csv(tmp_path / "reviews.csv", reviews), predictions=True)
    expected = [answer["probability"] for answer in load_predictor(sentiment_bundle).predict([t for t, _ in REVIEWS])]
    assert scores["probabilities"][2] is None
    assert [p for p in scores["probabilities"] if p is not None] == pytest.approx(expected)
    right = [(p >= 0.5) == bool(label) for p, (_, label) in zip(scores["probabilities"], reviews) if p is not None]
    assert scores["accuracy"] == pytest.approx(np.mean(right))
    assert "probabilities" not in score_data(sentiment_bundle, write_csv(tmp_path / "reviews.csv", reviews))
    with pytest.raises(InputError, match="no answer per item"):
        score_data(charlm_bundle, tmp_path / "reviews.csv", predictions=True)


def test_reviews_score_the_same_from_a_folder_and_from_a_csv(sentiment_bundle, tmp_path):
    from rnnlab.inference import load_predictor

    reviews = [*REVIEWS, ("zorglub blorp film", 1)]
    folder = score_data(sentiment_bundle, write_folder(tmp_path / "reviews", reviews))
    table = score_data(sentiment_bundle, write_csv(tmp_path / "reviews.csv", reviews))
    numbers = write_csv(tmp_path / "numbers.csv", reviews, labels=("0", "1"))
    # the folder is read neg/ first: the same figures, the mean loss summed in another order
    for mean in ("loss", "short_loss"):
        assert folder.pop(mean) == pytest.approx(table.pop(mean))
    assert {k: v for k, v in folder.items() if k != "data"} == {k: v for k, v in table.items() if k != "data"}
    assert score_data(sentiment_bundle, numbers)["accuracy"] == table["accuracy"]
    assert table["reviews"] == 5 and table["positive"] == 3
    unknown = {"and": 1, "was": 1, "zorglub": 1, "blorp": 1}  # words the bundle's vocabulary lacks
    assert table["unknown_tokens"] == 4 and table["most_frequent_unknown"] == unknown
    assert table["tokens"] == 18 and table["unknown_share"] == pytest.approx(4 / 18)
    # the figures are those of the serving predictor on the same texts
    answers = load_predictor(sentiment_bundle).predict([text for text, _ in reviews])
    right = [(a["label"] == "positive") == bool(label) for a, (_, label) in zip(answers, reviews)]
    assert table["accuracy"] == pytest.approx(np.mean(right))
    assert 0.0 <= table["roc_auc"] <= 1.0


def test_counts_of_more_than_127_reviews_are_right(sentiment_bundle, tmp_path):
    table = score_data(sentiment_bundle, write_csv(tmp_path / "many.csv", REVIEWS * 100))
    assert (table["reviews"], table["positive"]) == (400, 200)  # labels are read as int8: a sum of them wraps


@pytest.mark.parametrize(
    "content, match",
    [
        ("text\nhello\n", "needs text and label"),
        ("text,label\ngreat film,maybe\n", "line 2: the label 'maybe'"),
        ("text,label\n", "no reviews"),
        ("", "not a readable UTF-8 CSV"),
    ],
)
def test_a_malformed_review_csv_is_one_sentence(sentiment_bundle, tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        score_data(sentiment_bundle, path)


def test_a_folder_without_neg_is_refused(sentiment_bundle, tmp_path):
    write_folder(tmp_path / "only_pos", [("great film", 1)])
    with pytest.raises(DataError, match="no neg/ folder"):
        score_data(sentiment_bundle, tmp_path / "only_pos")


# --------------------------------------------------------------------------------------------- charlm


def test_text_characters_outside_the_vocabulary_are_skipped_counted_and_named(charlm_bundle, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("The Emperor spoke: “peace”, said the prince.\n", encoding="utf-8")
    clean = tmp_path / "clean.txt"
    clean.write_text("the emperor spoke peace, said the prince.\n", encoding="utf-8")  # what is left of it
    scores = score_data(charlm_bundle, path)
    oov = scores["out_of_vocabulary"]
    assert oov["characters"] == 3 and oov["distinct"] == 3  # ':' and the two curly quotes
    assert set(oov["most_frequent"]) == {":", "“", "”"} and oov["policy"].startswith("skipped")
    assert scores["loss"] == pytest.approx(score_data(charlm_bundle, clean)["loss"])  # nats per character
    assert scores["bpc"] == pytest.approx(scores["loss"] / math.log(2))


def test_text_nats_are_the_mean_cross_entropy_of_next_characters(charlm_bundle, tmp_path):
    from rnnlab.bundle import load_bundle
    from rnnlab.data.text import encode_text
    from rnnlab.data.vocab import Vocab

    bundle = load_bundle(charlm_bundle)
    ids = encode_text(CORPUS * 3, Vocab.from_json(bundle.assets["vocab"]))
    with torch.no_grad():
        logits, _ = bundle.model(torch.from_numpy(ids[:-1]).unsqueeze(0))
        expected = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(ids[1:])).item()
    # one row (eval batches of one), state carried across windows of 7
    one_row = save_bundle(tmp_path / "bundle", job="charlm", model=bundle.model, assets=bundle.assets, metrics={},
                          config={"job": "charlm", "data": {"seq_len": 7}, "train": {"eval_batch_size": 1}})
    (tmp_path / "book.txt").write_text(CORPUS * 3, encoding="utf-8")
    assert score_data(one_row, tmp_path / "book.txt", runtime="torch")["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_text_with_no_known_character_is_refused(charlm_bundle, tmp_path):
    path = tmp_path / "digits.txt"
    path.write_text("12345 67890", encoding="utf-8")
    with pytest.raises(DataError, match="at least 2"):
        score_data(charlm_bundle, path)


# --------------------------------------------------------------------------------------------- stock


def test_prices_between_dates_score_like_the_training_pipeline(stock_setup):
    bundle, csv, data, model = stock_setup
    scores = score_data(bundle, csv, start="2022-07-01", end="2023-06-30")
    X, _, rows = data.splits["test"]
    with torch.no_grad():
        scaled = model(torch.from_numpy(X)).numpy().astype(np.float64)
    predicted = to_price(data.target_scaler.inverse_transform(scaled), rows, "log_return")
    actual = rows["close"].to_numpy()
    assert scores["days"] == len(rows) and scores["first_day"] == rows.index[0].date().isoformat()
    assert {k: scores[k] for k in ("r2", "mae", "mape")} == pytest.approx(regression_metrics(actual, predicted))
    baseline = {k: scores[f"baseline_same_day_open_{k}"] for k in ("r2", "mae", "mape")}
    assert baseline == pytest.approx(regression_metrics(actual, naive_same_day_open(rows)))
    one_day = score_data(bundle, csv, start="2023-06-30", end="2023-06-30")
    assert one_day["days"] == 1 and one_day["r2"] is None  # R^2 of one day is undefined, not NaN


def test_dates_outside_the_data_or_on_another_job_are_refused(stock_setup, sentiment_bundle, tmp_path):
    bundle, csv, _, _ = stock_setup
    with pytest.raises(DataError, match="choose dates inside that span"):
        score_data(bundle, csv, start="2030-01-01")
    with pytest.raises(InputError, match="comes after"):
        score_data(bundle, csv, start="2023-02-01", end="2023-01-01")
    with pytest.raises(InputError, match="leave out --from/--to"):
        score_data(sentiment_bundle, write_csv(tmp_path / "r.csv", REVIEWS), start="2023-01-01")


# --------------------------------------------------------------------------------------------- the command


def test_evaluate_data_prints_json_or_lines_and_refuses_bad_data_in_one_line(stock_setup, sentiment_bundle,
                                                                             tmp_path, capsys):
    bundle, csv, _, _ = stock_setup
    assert main(["evaluate", str(bundle), "--data", str(csv), "--from", "2023-01-01", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["job"] == "stock" and scores["first_day"] >= "2023-01-01"
    assert {"loss", "mae", "r2", "mape", "baseline_previous_close_mae"} <= set(scores)

    assert main(["evaluate", str(sentiment_bundle), "--data", str(write_csv(tmp_path / "r.csv", REVIEWS))]) == 0
    assert "accuracy: " in capsys.readouterr().out

    assert main(["evaluate", str(bundle), "--data", str(write_csv(tmp_path / "r.csv", REVIEWS))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnlab: ") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(bundle), "--data", str(csv), "--from", "2023-02-30"])
    assert exit_info.value.code == 2 and "is not a date" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- one pipeline


def split_as_data(job: str, config: dict, tmp_path) -> list[str]:
    """The ``--data`` arguments that give the job's test split as data in its format: the price file with the test
    dates, the test reviews in pos/ and neg/ folders, the test part of the text in a file."""
    from rnnlab.data.imdb import read_imdb
    from rnnlab.data.text import read_text, split_contiguous

    source, data = config["data"]["source"], config["data"]
    if job in ("stock", "horizon"):
        return ["--data", source, "--from", data["test_start"], "--to", data["test_end"]]
    if job == "sentiment":
        test = read_imdb(source, splits=("test",))["test"]
        return ["--data", str(write_folder(tmp_path / "test", [(review.text, review.label) for review in test]))]
    text = read_text(source, lowercase=data["lowercase"])
    part = split_contiguous(np.arange(len(text)), data["fractions"])["test"]
    (tmp_path / "test.txt").write_text(text[part[0] : part[-1] + 1], encoding="utf-8")
    return ["--data", str(tmp_path / "test.txt")]


@pytest.mark.parametrize("job", ["stock", "horizon", "sentiment", "charlm"])
def test_evaluate_gives_training_test_figures_from_the_split_and_from_the_same_data(job, tmp_path, capsys):
    """``rnnlab evaluate BUNDLE`` prints the test figures training kept in the bundle, and ``--data`` with the test
    split's own data prints them again, figure for figure: one pipeline, whichever way the data comes."""
    from rnnlab.trainers.loop import train
    from tiny_datasets import MAKERS, smoke_config

    source = MAKERS[registry.job(job).data_set](tmp_path)
    config = smoke_config(job, source, "data.limit_test=0")  # the whole test split, which --data gets
    train(config, tmp_path / "run")
    capsys.readouterr()  # the run's own table
    bundle = str(tmp_path / "run" / "bundle")
    kept = json.loads((tmp_path / "run" / "bundle" / "metrics.json").read_text(encoding="utf-8"))["test"]

    def evaluate(*args: str) -> dict:
        assert main(["evaluate", bundle, "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    split = evaluate()  # the bundle's default runtime (ONNX Runtime: it holds a graph)
    assert split == pytest.approx(kept, rel=1e-5)
    assert evaluate("--runtime", "torch") == pytest.approx(kept, rel=1e-5)
    scored = evaluate(*split_as_data(job, config, tmp_path))
    assert {name: scored[name] for name in split} == pytest.approx(split, rel=1e-5)


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.mirror
def test_mirror_stock_bundle_scores_its_test_half_year_as_training_did(mirror, tmp_path):
    from rnnlab.config import load_config
    from rnnlab.trainers.loop import train

    config = load_config("stock", "smoke", overrides=["tracking.wandb=false"])
    result = train(config, tmp_path / "run")
    prices = mirror / "19900101_20230630.csv"
    scores = score_data(result["bundle"], prices, start=config["data"]["test_start"], end=config["data"]["test_end"])
    test = result["test"]
    assert scores["days"] == 124  # the trading days of 2023-H1
    assert {k: scores[k] for k in test} == pytest.approx(test, rel=1e-5)


@pytest.mark.slow
@pytest.mark.mirror
def test_mirror_book_scores_with_no_unknown_character(mirror, tmp_path):
    from rnnlab.data.text import build_char_vocab, read_text

    book = mirror / "warpeace_input.txt"
    text = read_text(book)[:200_000]  # seconds, not the minutes of the whole book
    path = tmp_path / "part.txt"
    path.write_text(text.upper(), encoding="utf-8")  # the bundle lowercases, as in training
    vocab = build_char_vocab(read_text(book))
    torch.manual_seed(0)
    model = build_model("charlm", {"vocab_size": len(vocab), "embed_dim": 8, "hidden_size": 8})
    bundle = save_bundle(tmp_path / "bundle", job="charlm", model=model, assets={"vocab": vocab.to_json()},
                         metrics={}, config={"job": "charlm", "data": {"lowercase": True, "seq_len": 100}})
    scores = score_data(bundle, path)
    assert scores["out_of_vocabulary"]["characters"] == 0
    assert abs(scores["loss"] - math.log(len(vocab))) < 0.5  # an untrained model: about uniform


@pytest.mark.slow
@pytest.mark.mirror
def test_mirror_imdb_test_reviews_in_folders_score_with_a_bundle_vocabulary(mirror, tmp_path):
    from rnnlab.data.imdb import read_imdb, tokenize

    test = read_imdb(mirror / "aclImdb_v1.tar.gz", splits=("test",))["test"]
    chosen = test[:50] + test[-50:]  # sorted neg/ then pos/
    write_folder(tmp_path / "reviews", [(review.text, review.label) for review in chosen])
    vocab = build_vocab([tokenize(review.text) for review in chosen[::2]])  # knows half the reviews' words
    model = build_model("sentiment", {"vocab_size": len(vocab), "embed_dim": 4, "hidden_size": 4, "fc_size": 2})
    bundle = save_bundle(tmp_path / "bundle", job="sentiment", model=model, assets={"vocab": vocab.to_json()},
                         metrics={}, config={"job": "sentiment", "data": {"max_length": 400}})
    scores = score_data(bundle, tmp_path / "reviews")
    tokens = [token for review in chosen for token in tokenize(review.text)]
    assert scores["reviews"] == 100 and scores["positive"] == 50
    assert scores["tokens"] == len(tokens)
    assert scores["unknown_tokens"] == sum(token not in vocab.stoi for token in tokens) > 0
