"""Short texts cut from IMDb reviews (``rnnlab data short-texts``): sentences split on the raw text, windows of the
asked length, every text from its own review with its label, the same files for the same seed, read back by
``rnnlab evaluate --data``; bad output folders and splits refused in one sentence."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from rnnlab.data.imdb import load_sentiment_data, review_splits, tokenize
from rnnlab.data.reviews import Review
from rnnlab.data.short_texts import (
    SENTENCE_SLICES,
    SLICES,
    WINDOWS,
    cut_slices,
    sentences,
    split_sentences,
    write_short_texts,
)
from rnnlab.errors import DataError
from rnnlab.launch.cli import main
from tiny_datasets import make_imdb_tar

LONG = " ".join(f"word{i}" for i in range(100))
REVIEWS = [
    Review("Loved it.<br /><br />The cast is superb and the plot moves! Why? Mr. Smith steals every scene...",
           label=1, rating=9, id=3),
    Review("Dull. I want my two hours back.It was boring, and far too long " + LONG + ".", label=0, rating=2, id=7),
    Review("Too short", label=1, rating=8, id=11),  # no sentence of three words; windows take it whole
]


def test_sentences_split_at_line_breaks_and_end_marks_of_the_raw_text():
    assert split_sentences("Great film.<br /><br />I loved it! Was it long? No.<br/>The end") == [
        "Great film.", "I loved it!", "Was it long?", "No.", "The end"]
    # an ellipsis, a title, an initial and an acronym do not end a sentence; a capital right after a period does
    assert split_sentences("It was... fine. Mr. Smith met J. R. R. Tolkien and E.T. there.Then \"Wow!\" he said") \
        == ["It was... fine.", "Mr. Smith met J. R. R. Tolkien and E.T. there.", "Then \"Wow!\"", "he said"]
    assert split_sentences("a  score of 7.5/10 \n for   this") == ["a score of 7.5/10", "for this"]
    # fragments of fewer than three words are no sentence
    assert sentences("Why? Because it is good. 10/10.") == ["Because it is good."]


def test_each_slice_holds_texts_of_its_own_review_with_its_label():
    slices = cut_slices(REVIEWS, "test", seed=0)
    assert set(slices) == set(SLICES)
    by_name = {f"test/{'pos' if r.label else 'neg'}/{r.id}_{r.rating}": r for r in REVIEWS}
    for name, texts in slices.items():
        for text in texts:
            review = by_name[text.review]
            assert text.label == review.label
            if name in SENTENCE_SLICES:
                assert text.text in " ".join(review.text.replace("<br />", " ").split())
            elif name != "whole":
                tokens, window = tokenize(review.text), text.text.split()
                assert any(tokens[i : i + len(window)] == window for i in range(len(tokens)))
    first, last = REVIEWS[0], REVIEWS[1]
    assert [t.text for t in slices["first_sentence"]] == ["The cast is superb and the plot moves!",
                                                          "I want my two hours back."]
    assert slices["last_sentence"][0].text == "Mr. Smith steals every scene..."
    assert slices["last_sentence"][1].text.startswith("It was boring")
    assert last.text.endswith(slices["last_sentence"][1].text)
    assert [t.text for t in slices["whole"]] == [r.text for r in REVIEWS]
    for name in SENTENCE_SLICES:  # the review with no three-word sentence has none in the sentence slices
        assert [t.review for t in slices[name]] == ["test/pos/3_9", "test/neg/7_2"]
    assert slices["random_sentence"][0].text in sentences(first.text)


def test_windows_have_the_asked_length_or_the_whole_short_review():
    slices = cut_slices(REVIEWS, "test", seed=0)
    for size in WINDOWS:
        lengths = [len(tokenize(t.text)) for t in slices[f"window_{size}"]]
        assert lengths == [min(size, len(tokenize(r.text))) for r in REVIEWS]


def test_slices_are_the_same_for_a_seed_and_another_seed_moves_the_windows():
    assert cut_slices(REVIEWS, "test", seed=5) == cut_slices(REVIEWS, "test", seed=5)
    starts = {cut_slices(REVIEWS, "test", seed=seed)["window_10"][1].text for seed in range(5)}
    assert len(starts) > 1


def tiny_sentiment_bundle(path):
    from rnnlab.bundle import save_bundle
    from rnnlab.data.vocab import build_vocab
    from rnnlab.models import build_model

    torch.manual_seed(0)
    vocab = build_vocab([["great", "wonderful", "awful", "boring", "the", "movie", "film"]])
    model = build_model("sentiment", {"vocab_size": len(vocab), "embed_dim": 4, "hidden_size": 5, "fc_size": 3})
    return save_bundle(path, job="sentiment", model=model, assets={"vocab": vocab.to_json()}, metrics={},
                       config={"job": "sentiment"})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_imdb_tar(tmp_path_factory.mktemp("imdb"), per_class=30)


def test_validation_slices_are_the_reviews_a_run_holds_out(archive):
    data = load_sentiment_data(archive, val_fraction=0.2, seed=4, cache=False)
    raw = review_splits(archive, val_fraction=0.2, seed=4)
    for split in ("train", "val", "test"):
        assert [len(tokenize(r.text)) for r in raw[split]] == getattr(data, split).lengths.tolist()
        assert [r.label for r in raw[split]] == getattr(data, split).labels.tolist()


def test_written_csvs_are_deterministic_and_read_back_by_evaluate(archive, tmp_path, capsys):
    assert main(["data", "short-texts", "--source", str(archive), "--output", str(tmp_path / "a"), "--seed", "2"]) == 0
    write_short_texts(tmp_path / "b", archive, seed=2)
    for name in SLICES:
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    manifest = json.loads((tmp_path / "a" / "slices.json").read_text())
    assert (manifest["split"], manifest["seed"], manifest["reviews"]) == ("test", 2, 60)
    with open(tmp_path / "a" / "window_20.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 60 and all(row["review"].startswith("test/") for row in rows)
    assert {row["label"] for row in rows if "/pos/" in row["review"]} == {"1"}

    bundle = tiny_sentiment_bundle(tmp_path / "bundle")
    capsys.readouterr()
    assert main(["evaluate", str(bundle), "--data", str(tmp_path / "a" / "first_sentence.csv"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["reviews"] == manifest["slices"]["first_sentence"]["texts"] and scores["positive"] == 30

    write_short_texts(tmp_path / "val", archive, split="val", val_fraction=0.2, val_seed=4)
    with open(tmp_path / "val" / "whole.csv", newline="") as handle:
        held_out = [row["text"] for row in csv.DictReader(handle)]
    assert held_out == [r.text for r in review_splits(archive, val_fraction=0.2, seed=4)["val"]]


def test_bad_output_or_split_is_one_sentence_and_nonzero(archive, tmp_path, capsys):
    def refused(*args: str) -> str:
        assert main(["data", "short-texts", "--source", str(archive), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rnnlab: ") and err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "does not exist" in refused("--output", str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused("--output", str(tmp_path / "file"))
    (tmp_path / "taken" / "whole.csv").mkdir(parents=True)  # a folder where a CSV must go: cannot be written
    assert "Cannot write" in refused("--output", str(tmp_path / "taken"))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "short-texts", "--output", str(tmp_path / "out"), "--split", "train"])
    assert exit_info.value.code == 2 and "--split: invalid choice" in capsys.readouterr().err
    with pytest.raises(DataError, match="Unknown split 'train'"):
        write_short_texts(tmp_path / "out", archive, split="train")
    assert not (tmp_path / "out").exists()


def test_the_benchmarks_paired_bootstrap_pairs_models_on_the_same_reviews():
    from benchmarks.short_texts import bootstrap_accuracies, compare

    rng = np.random.default_rng(0)
    reviews = np.array([f"test/pos/{i}_9" for i in range(400)])
    right = rng.random(400) < 0.8
    better = right | (rng.random(400) < 0.5)  # right wherever the baselines are, and on about half of the rest
    cuts = {"whole": slice(None), "window_10": slice(0, 300), "window_20": slice(100, None)}  # overlapping reviews
    per_slice = {name: {"reviews": reviews[keep],
                        "correct": {"tfidf_lr": right[keep], "nbsvm_bi": right[keep], "better": better[keep]}}
                 for name, keep in cuts.items()}
    resampled = bootstrap_accuracies(per_slice, 300, seed=1)
    again = bootstrap_accuracies(per_slice, 300, seed=1)
    assert np.array_equal(resampled["window_10"]["better"], again["window_10"]["better"])
    pairs = compare(per_slice, resampled, ["runs/better/bundle"])
    assert pairs["better - tfidf_lr"] == pairs["better - nbsvm_bi"]
    rows = pairs["better - tfidf_lr"]
    assert rows["whole"]["difference"] == pytest.approx(better.mean() - right.mean())
    assert rows["mean_over_short_slices"]["difference"] == pytest.approx(
        (rows["window_10"]["difference"] + rows["window_20"]["difference"]) / 2)
    for row in rows.values():  # never worse on any review: every resample gains, within the interval
        low, high = row["ci95"]
        assert 0 < low <= row["difference"] <= high


def test_calibration_error_is_small_for_honest_probabilities_and_large_for_overconfident_ones():
    from benchmarks.short_texts import calibration

    rng = np.random.default_rng(0)
    honest = rng.uniform(0, 1, 20_000)
    labels = (rng.random(20_000) < honest).astype(int)  # each text positive with the probability said
    overconfident = np.where(honest >= 0.5, 0.99, 0.01)  # the same labels said with 99 % every time
    assert calibration(honest, labels)["ece"] < 0.02
    assert calibration(overconfident, labels)["ece"] > 0.2
    assert calibration(overconfident, labels)["log_loss"] > calibration(honest, labels)["log_loss"]
