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


class _AnswersForecast:
    """A stand-in CLI of a second job answering ``forecast``: says which job ran."""

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--csv", required=True)

    @staticmethod
    def run(args, load_predictor) -> int:
        print(f"ran the second job's verb on {args.csv}")
        return 0


def test_a_verb_two_jobs_answer_dispatches_on_the_bundle_job(tmp_path, monkeypatch, capsys):
    """`forecast` is answered by every job whose registry entry names it (stock, and a multi-step forecaster next):
    the bundle's job picks which job's CLI runs."""
    import dataclasses
    import json

    from rnnlab import registry
    from rnnlab.launch.cli import main

    second = dataclasses.replace(registry.JOBS["stock"], name="second", cli=f"{__name__}:_AnswersForecast")
    monkeypatch.setitem(registry.JOBS, "second", second)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"job": "second"}))
    assert main(["forecast", str(bundle), "--csv", "prices.csv"]) == 0
    assert capsys.readouterr().out.strip() == "ran the second job's verb on prices.csv"
