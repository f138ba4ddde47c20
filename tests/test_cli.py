"""The `rnnlab` command as a user meets it: help, data summaries, one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rnnlab.launch.cli import SUBCOMMAND_MODULES


def rnnlab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rnnlab.launch.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_help_lists_every_subcommand_with_a_line_each():
    result = rnnlab("--help")
    assert result.returncode == 0
    for module in SUBCOMMAND_MODULES:
        command = module.rsplit(".", 1)[1].removesuffix("_cmd")
        if command == "predict":
            for name in ("evaluate", "classify", "forecast", "generate"):
                assert f"    {name}" in result.stdout
        else:
            assert f"    {command}" in result.stdout


def test_bad_source_is_one_sentence_and_nonzero(tmp_path):
    bad = tmp_path / "prices.csv"
    bad.write_text("Date,Open,Close\n2020-01-02,1,2\n")
    result = rnnlab("data", "stock", "--source", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("rnnlab: ") and str(bad) in message


def test_forecast_help_states_what_trust_prices_lets_through():
    result = rnnlab("forecast", "--help")
    assert result.returncode == 0, result.stderr
    assert "--trust-prices" in result.stdout and "more than 50% from the day before's close" in " ".join(
        result.stdout.split())


def test_generate_refuses_an_out_of_range_sampling_flag_in_one_sentence(tmp_path):
    from rnnlab.bundle import save_bundle
    from rnnlab.data.vocab import Vocab
    from rnnlab.models import build_model

    chars = "abcdefghijklmnopqrstuvwxyz "
    bundle = save_bundle(tmp_path / "charlm", job="charlm", metrics={}, config={"job": "charlm"},
                         model=build_model("charlm", {"vocab_size": len(chars), "embed_dim": 4, "hidden_size": 8}),
                         assets={"vocab": Vocab(list(chars)).to_json()})
    result = rnnlab("generate", str(bundle), "--top-k", "100000000000000000000")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("rnnlab: --top-k:"), result.stderr
    result = rnnlab("generate", str(bundle), "--prompt", "the", "--length", "12", "--top-k", "1000", "--seed", "3")
    assert result.returncode == 0 and len(result.stdout.rstrip("\n")) == len("the") + 12, result.stderr


def test_missing_source_file():
    result = rnnlab("data", "text", "--source", "/no/such/book.txt")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_text_summary_of_own_file(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("\ufeff" + "The Emperor smiled.\nThe emperor left.\n" * 50, encoding="utf-8")
    result = rnnlab("data", "text", "--source", str(book), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dataset"] == "text" and summary["source"] == str(book)
    assert summary["characters"] == len(("The Emperor smiled.\nThe emperor left.\n" * 50))
    assert summary["distinct"] == len(set(("the emperor smiled.\nthe emperor left.\n")))


@pytest.mark.slow
@pytest.mark.mirror
def test_stock_summary_on_mirror(mirror):
    result = rnnlab("--data-mirror", str(mirror), "data", "stock", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["source"].endswith("19900101_20230630.csv")
    assert (summary["features"], summary["train_period_rows"], summary["test_rows"]) == (37, 8061, 124)


def test_forecast_answers_with_the_bundles_own_job(tmp_path, capsys):
    """`forecast` is the verb of two jobs, stock (the next close) and horizon (the next days as quantiles): the
    bundle given picks whose answer the same price file gets; a bundle of neither is one sentence."""
    from tiny_datasets import make_stock_csv
    from tiny_models import make_bundles
    from rnnlab.launch.cli import main

    bundles = make_bundles(tmp_path / "bundles")
    csv = str(make_stock_csv(tmp_path))
    assert main(["forecast", str(bundles / "djia-small"), "--csv", csv]) == 0
    stock = json.loads(capsys.readouterr().out)
    assert set(stock) == {"date", "close", "baseline_open", "actual_close"} and stock["close"] > 0
    assert main(["forecast", str(bundles / "ndx-horizon"), "--csv", csv, "--json"]) == 0
    horizon = json.loads(capsys.readouterr().out)
    assert {"origin", "quantiles", "steps"} <= set(horizon) and [s["step"] for s in horizon["steps"]] == [1, 2, 3, 4, 5]
    assert horizon["origin"] == stock["date"]  # the same last day, answered two ways
    assert main(["forecast", str(bundles / "imdb-small"), "--csv", csv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("rnnlab: ") and error.count("\n") == 1 and "imdb-small" in error, error
