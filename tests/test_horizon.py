"""The horizon job: metrics against hand-worked examples, quantiles that never cross, rolling origins that never read
the future, smoke runs of both decoders through the loop and a bundle."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rnnlab.bundle import load_bundle
from rnnlab.config import load_config
from rnnlab.data.horizon import (
    PROTOCOLS, future_log_returns, load_horizon_data, random_walk_quantiles, recent_volatility, rolling_origins,
    window_for_history,
)  # fmt: skip
from rnnlab.data.stock import read_prices
from rnnlab.errors import ConfigError
from rnnlab.forecasting import coverage, crps_from_quantiles, forecast_metrics, pinball, smape
from rnnlab.models import build_model
from rnnlab.models.horizon import HorizonConfig, ordered_quantiles
from rnnlab.trainers.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TAUS = [0.1, 0.5, 0.9]
DATES = {"train_end": "2020-12-31", "val_end": "2021-12-31", "test_start": "2022-01-01", "test_end": "2023-06-30"}


@pytest.fixture(scope="module")
def prices_csv(tmp_path_factory) -> Path:
    from tiny_datasets import make_stock_csv

    return make_stock_csv(tmp_path_factory.mktemp("horizon"), start="2016-01-01", end="2023-06-30", seed=3)


# --- metrics, by hand -----------------------------------------------------------------------------------------


def test_pinball_crps_coverage_smape_match_a_hand_worked_example():
    # two origins, one step, quantiles (0.1, 0.5, 0.9)
    actual = np.array([[10.0], [20.0]])
    q = np.array([[[8.0, 9.0, 11.0]], [[18.0, 22.0, 23.0]]])
    # origin 1, y=10: tau .1 at 8: .1*2=.2; tau .5 at 9: .5*1=.5; tau .9 at 11: (.9-1)*(-1)=.1 -> mean .8/3
    # origin 2, y=20: tau .1 at 18: .1*2=.2; tau .5 at 22: .5*2=1; tau .9 at 23: .1*3=.3 -> mean 1.5/3
    np.testing.assert_allclose(pinball(actual, q, TAUS)[:, 0], [[0.2, 0.5, 0.1], [0.2, 1.0, 0.3]])
    np.testing.assert_allclose(crps_from_quantiles(actual, q, TAUS)[:, 0], [2 * 0.8 / 3, 2 * 1.5 / 3])
    # 80 % interval [q.1, q.9]: [8, 11] holds 10, [18, 23] holds 20 -> 1.0; a miss below
    assert coverage(actual, q[..., 0], q[..., 2]).all()
    assert not coverage(np.array([[7.9]]), np.array([[8.0]]), np.array([[11.0]])).any()
    # sMAPE: 200*|10-9|/19, 200*|20-22|/42
    np.testing.assert_allclose(smape(actual, q[..., 1])[:, 0], [200 / 19, 400 / 42])
    m = forecast_metrics(actual, q, TAUS, scale=2.0)
    assert m["pinball"] == pytest.approx((0.8 + 1.5) / 6)
    assert m["crps"] == pytest.approx((0.8 + 1.5) / 3)
    assert m["scaled_crps"] == pytest.approx((0.8 + 1.5) / 6)
    assert m["mase"] == pytest.approx((1 + 2) / 2 / 2.0)  # |10-9|, |20-22| over the naive scale 2
    assert m["coverage_80"] == 1.0 and "coverage_90" not in m  # no 0.05/0.95 levels
    assert m["coverage_80_error"] == pytest.approx(0.2)
    assert m["crps_h1"] == m["crps"]


def test_coverage_per_horizon_and_the_90_interval():
    taus = [0.05, 0.1, 0.5, 0.9, 0.95]
    actual = np.array([[0.0, 5.0], [0.0, -5.0], [0.0, 0.0], [3.0, 0.0]])
    band = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    q = np.broadcast_to(band, (4, 2, 5))
    m = forecast_metrics(actual, q, taus, scale=1.0)
    # step 1: 0, 0, 0 inside both; 3 outside both -> 3/4. step 2: 5, -5 outside; 0, 0 inside -> 2/4
    assert (m["coverage_80_h1"], m["coverage_80_h2"], m["coverage_90_h1"], m["coverage_90_h2"]) == (
        0.75, 0.5, 0.75, 0.5)
    assert m["coverage_80"] == pytest.approx(0.625) and m["coverage_90_error"] == pytest.approx(0.275)


def test_crps_from_a_dense_quantile_grid_approaches_the_gaussian_closed_form():
    taus = np.linspace(0.005, 0.995, 199)
    from scipy.stats import norm

    y = 0.7
    q = norm.ppf(taus)[None, None, :]
    closed = y * (2 * norm.cdf(y) - 1) + 2 * norm.pdf(y) - 1 / np.sqrt(np.pi)
    assert crps_from_quantiles(np.array([[y]]), q, taus)[0, 0] == pytest.approx(closed, rel=0.02)


# --- the model ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["seq2seq", "direct"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("median", ["learned", "zero"])
def test_quantiles_never_cross(decoder, cell, median):
    torch.manual_seed(0)
    model = build_model("horizon", {"num_features": 6, "horizon": 4, "decoder": decoder, "cell": cell,
                                    "hidden_size": 8, "fc_size": 4, "median": median})
    with torch.no_grad():
        for p in model.parameters():  # wild weights: the ordering is by construction, not by training
            p.mul_(25)
    out = model(torch.randn(64, 9, 6) * 10)
    assert out.shape == (64, 4, 7)
    assert (out.diff(dim=-1) >= 0).all()  # softplus may underflow to an exact tie, never below
    if median == "zero":
        assert (out[..., 3] == 0).all()
    raw = torch.randn(5, 3, 7) * 100
    assert (ordered_quantiles(raw, 3).diff(dim=-1) >= 0).all()


def test_quantile_levels_must_increase_inside_0_1():
    with pytest.raises(ConfigError, match="model.quantiles"):
        HorizonConfig(quantiles=[0.5, 0.1])
    with pytest.raises(ConfigError, match="model.quantiles"):
        HorizonConfig(quantiles=[0.0, 0.5])


# --- rolling origins never read the future -------------------------------------------------------------------


def _shift_future(csv: Path, after: str, out: Path) -> Path:
    frame = pd.read_csv(csv)
    later = pd.to_datetime(frame["Date"]) > pd.Timestamp(after)
    for column in ("Open", "High", "Low", "Close", "Adj Close"):
        frame.loc[later, column] *= 1.5  # a very different future
    frame.loc[later, "Volume"] *= 3
    frame.to_csv(out, index=False)
    return out


def test_rolling_origins_never_read_a_day_after_the_origin(prices_csv, tmp_path):
    data = load_horizon_data(prices_csv, window=10, horizon=3, **DATES)
    test = data.splits["test"]
    cut = 40
    origin = test.origins[cut]
    shifted = load_horizon_data(_shift_future(prices_csv, str(origin.date()), tmp_path / "shifted.csv"),
                                window=10, horizon=3, **DATES)
    other = shifted.splits["test"]
    assert (other.origins[: cut + 1] == test.origins[: cut + 1]).all()
    # every window, close and volatility up to the origin is the same; its targets (the future) are not
    np.testing.assert_array_equal(other.X[: cut + 1], test.X[: cut + 1])
    np.testing.assert_array_equal(other.close[: cut + 1], test.close[: cut + 1])
    np.testing.assert_array_equal(other.origin_scale[: cut + 1], test.origin_scale[: cut + 1])
    assert not np.allclose(other.future_close[cut], test.future_close[cut])
    # so the model's forecast from that origin is the same
    model = build_model("horizon", {"num_features": data.num_features, "horizon": 3, "hidden_size": 8})
    with torch.no_grad():
        torch.testing.assert_close(model(torch.from_numpy(other.X[: cut + 1])), model(torch.from_numpy(test.X[: cut + 1])))
    # and the random walk's quantiles too
    rw = random_walk_quantiles(data.closes, test.origins[: cut + 1], 3, TAUS)
    rw_shifted = random_walk_quantiles(shifted.closes, other.origins[: cut + 1], 3, TAUS)
    np.testing.assert_allclose(rw, rw_shifted)
    # a history cut at the origin gives the same window as the whole file (what the predictor sees)
    prices = read_prices(prices_csv)
    X, day, close, scale = window_for_history(prices[prices.index <= origin], data.scaler, window=10,
                                              feature_set="scale_free", vol_days=32)
    assert day == origin and close == pytest.approx(test.close[cut])
    np.testing.assert_allclose(X, test.X[cut], rtol=1e-5, atol=1e-5)
    assert scale == pytest.approx(test.origin_scale[cut])


def test_targets_and_splits(prices_csv):
    np.testing.assert_allclose(future_log_returns(np.array([1.0, 2.0, 4.0]), 2),
                               [[np.log(2), np.log(4)], [np.log(2), np.nan], [np.nan, np.nan]])
    data = load_horizon_data(prices_csv, window=10, horizon=3, **DATES)
    train, val, test = (data.splits[s] for s in ("train", "val", "test"))
    # a training target never reaches into validation, nor a validation one into the test period
    all_dates = data.closes.index
    last_train_target = all_dates[all_dates.get_loc(train.origins[-1]) + 3]
    last_val_target = all_dates[all_dates.get_loc(val.origins[-1]) + 3]
    assert last_train_target <= pd.Timestamp(DATES["train_end"]) < val.origins[0]
    assert last_val_target <= pd.Timestamp(DATES["val_end"]) < test.origins[0]
    # every test day with 3 days after it in the file is an origin
    assert test.origins[-1] == all_dates[-4]
    np.testing.assert_allclose(test.future_close[:, 0], data.closes.shift(-1).reindex(test.origins).to_numpy())
    # the random walk's median is the origin's close
    rw = random_walk_quantiles(data.closes, test.origins, 3, TAUS)
    np.testing.assert_allclose(rw[..., 1], np.repeat(test.close[:, None], 3, axis=1))
    assert (np.diff(rw, axis=-1) >= 0).all()
    # the scorer's origins over the test dates are the job's test origins
    again = rolling_origins(read_prices(prices_csv), data.scaler, window=10, horizon=3, feature_set="scale_free",
                            vol_days=32, start=DATES["test_start"], end=DATES["test_end"])
    assert (again.origins == test.origins).all()
    np.testing.assert_array_equal(again.X, test.X)
    np.testing.assert_allclose(again.future_close, test.future_close)
    np.testing.assert_allclose(again.origin_scale, test.origin_scale)
    vol = recent_volatility(np.exp(np.cumsum(np.r_[0.0, np.tile([0.01, -0.01], 20)])), 4, "std")
    np.testing.assert_allclose(vol[10:], 0.01)


# --- through the loop and a bundle ----------------------------------------------------------------------------


def smoke_config(csv: Path, *overrides: str) -> dict:
    dates = [f"data.{k}={v}" for k, v in DATES.items()]
    return load_config("horizon", "smoke", overrides=[f"data.source={csv}", "tracking.wandb=false",
                                                      "data.limit_train=0", "train.epochs=3", *dates, *overrides])


@pytest.mark.parametrize("decoder", ["seq2seq", "direct"])
def test_smoke_run_beats_a_constant_forecast_and_round_trips_through_a_bundle(decoder, prices_csv, tmp_path):
    from rnnlab.jobs.horizon import HorizonJob, pinball_sum, to_prices

    config = smoke_config(prices_csv, f"model.decoder={decoder}")
    result = train(config, tmp_path)
    assert result["test"]["crps"] > 0 and 0 <= result["test"]["coverage_80"] <= 1
    assert "baseline_rw_crps" in result["test"] and "crps_h3" in result["test"]
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.job == "horizon" and bundle.model_config["decoder"] == decoder
    job = HorizonJob(HorizonJob.Config.from_dict(bundle.config))
    job.load_data()
    taus = torch.tensor(job.taus)
    with torch.no_grad():
        out = bundle.model(job.X["train"])
        model_loss = float(pinball_sum(out, job.y_scaled["train"], taus)) / len(out)
        constant = float(pinball_sum(torch.zeros_like(out), job.y_scaled["train"], taus)) / len(out)
        assert model_loss < 0.8 * constant  # far better than one constant forecast on its own training windows
        # the bundle answers what the run scored: the same test CRPS from the reloaded weights
        scaled = bundle.model(job.X["test"]).double().numpy()
    part = job.data.splits["test"]
    prices = to_prices(scaled, part.close, part.origin_scale, np.asarray(bundle.assets["target_scaler"]["scale"]))
    again = forecast_metrics(part.future_close, prices, job.taus, job.data.naive_scale)
    assert again["crps"] == pytest.approx(result["test"]["crps"], rel=1e-5)
    assert (tmp_path / "fan_chart.png").stat().st_size > 1000
    # the bundle keeps the last rows one forecast reads as its example request, and answers it
    from rnnlab.data.horizon import history_rows
    from rnnlab.jobs.horizon import HorizonPredictor

    rows = bundle.example["rows"]
    assert len(rows) == history_rows(job.config.data.window)
    assert rows[-1]["date"] == str(job.data.closes.index[-1].date())
    assert HorizonPredictor(bundle).predict([rows])[0]["origin"] == rows[-1]["date"]
    # the run ends with a table of the ranked metrics, not the per-horizon figures (those are in --json)
    from rnnlab.launch.train import result_table

    table = result_table("horizon", result).splitlines()
    assert [line.split()[0] for line in table[1:]] == ["val", "test"] and table[0].split()[:2] == ["loss", "crps"]
    assert len(table[2].split()) == 1 + len(table[0].split()) == 1 + 7 and "_h1" not in table[0]
    summary = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "test" for r in summary) == 1


def test_rnnlab_train_prints_a_table_and_the_whole_result_with_json(monkeypatch, tmp_path, capsys):
    from rnnlab.launch.cli import main

    per_horizon = {f"{name}_h{h}": 0.5 for name in ("crps", "mase", "coverage_80", "coverage_90") for h in range(1, 6)}
    figures = {"loss": 0.2, "crps": 30.1, "pinball": 3.5, "mase": 1.1, "smape": 0.02, "coverage_80_error": 0.05,
               "coverage_90_error": 0.04}
    result = {"val": figures, "test": figures | per_horizon, "best_step": 40, "steps": 50}
    monkeypatch.setattr("rnnlab.trainers.loop.train", lambda config, output, resume: result)
    assert main(["train", "horizon", "--preset", "smoke", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 4 and "best step 40" in printed[0] and str(tmp_path) in printed[0]
    assert printed[1].split() == list(figures) and printed[3].split() == ["test", "0.2", "30.1", "3.5", "1.1", "0.02",
                                                                         "0.05", "0.04"]
    assert main(["train", "horizon", "--preset", "smoke", "--output", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["crps_h3"] == 0.5


def test_the_wandb_run_holds_the_fan_chart_and_the_coverage_table(prices_csv, tmp_path, monkeypatch):
    from wandb_files import read_finished_wandb_run

    monkeypatch.delenv("WANDB_DIR", raising=False)
    result = train(smoke_config(prices_csv, "tracking.wandb=true", "model.decoder=direct"), tmp_path)
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    history, _, summary, _ = read_finished_wandb_run(next(run.glob("*.wandb")))
    assert any(row.get("test/fan_chart/_type") == "image-file" for row in history)
    assert any(row.get("test/coverage_table/_type") == "table-file" for row in history)
    table = json.loads(next(run.glob("files/media/table/test/coverage_table_*.table.json")).read_text())
    assert table["columns"] == ["horizon", "coverage_80", "coverage_90", "crps", "mase"]
    assert [r[0] for r in table["data"]] == ["t+1", "t+2", "t+3", "t+4", "t+5", "all"]
    assert table["data"][-1][1] == pytest.approx(result["test"]["coverage_80"], abs=1e-4)
    assert summary["test/coverage_90_h2"] == pytest.approx(result["test"]["coverage_90_h2"])


# --- the predictor, the CLI, the scorer and the route ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(prices_csv, tmp_path_factory) -> Path:
    """A horizon bundle over the fixture CSV: random weights (hidden 8), the data's own scalers."""
    from rnnlab.bundle import save_bundle

    data = load_horizon_data(prices_csv, window=10, horizon=3, **DATES)
    torch.manual_seed(0)
    model = build_model("horizon", {"num_features": data.num_features, "horizon": 3, "hidden_size": 8,
                                    "fc_size": 4})
    config = {"job": "horizon", "data": {"window": 10, "features": "scale_free", "vol": "ewma", "vol_days": 32,
                                         **DATES}, "model": {"horizon": 3, "hidden_size": 8, "fc_size": 4}}
    return save_bundle(tmp_path_factory.mktemp("horizon-bundle") / "bundle", job="horizon", model=model,
                       assets={"scaler": data.scaler.to_json(), "target_scaler": data.target_scaler.to_json()},
                       metrics={}, config=config)


def _rows(csv: Path, n: int = 300) -> list[dict]:
    frame = pd.read_csv(csv).tail(n)
    return [{"date": r.Date, "open": r.Open, "high": r.High, "low": r.Low, "close": r.Close, "volume": r.Volume}
            for r in frame.itertuples()]


def test_the_predictor_answers_what_the_job_scores_and_refuses_bad_histories(tiny_bundle, prices_csv):
    from rnnlab.errors import InputError
    from rnnlab.inference import load_predictor
    from rnnlab.jobs.horizon import HorizonPredictor, to_prices

    predictor = load_predictor(tiny_bundle)
    assert isinstance(predictor, HorizonPredictor)
    data = load_horizon_data(prices_csv, window=10, horizon=3, **DATES)
    test = data.splits["test"]
    prices = read_prices(prices_csv)
    origin = test.origins[-1]  # the last test origin: its history ends there
    answer = predictor.predict([prices[prices.index <= origin]])[0]
    with torch.no_grad():
        expected = to_prices(predictor.model(torch.from_numpy(test.X[-1:])).double().numpy(), test.close[-1:],
                             test.origin_scale[-1:], data.target_scaler.scale)[0]
    assert answer["origin"] == str(origin.date()) and answer["close"] == pytest.approx(test.close[-1])
    assert len(answer["steps"]) == 3 and answer["quantiles"] == [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    np.testing.assert_allclose([s["values"] for s in answer["steps"]], expected, rtol=1e-6)
    for step in answer["steps"]:
        assert step["values"] == sorted(step["values"])
        assert step["lower_90"] <= step["lower_80"] <= step["median"] <= step["upper_80"] <= step["upper_90"]
    # the same from rows (what the service sends) and from a list of row dicts
    assert predictor.predict([_rows(prices_csv)])[0]["steps"] == predictor.predict([prices.tail(300)])[0]["steps"]
    rows = _rows(prices_csv)
    rows[-1]["close"] = None
    with pytest.raises(InputError, match="History 0: .*close"):
        predictor.predict([rows])
    with pytest.raises(InputError, match="264"):  # 254 warm-up days + the window of 10
        predictor.predict([_rows(prices_csv, 100)])


def test_forecast_and_evaluate_from_the_command_line(tiny_bundle, prices_csv, capsys):
    from rnnlab.launch.cli import main

    assert main(["forecast", str(tiny_bundle), "--csv", str(prices_csv)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("origin 2023-06-30") and [line.split()[0] for line in table[2:]] == ["t+1", "t+2", "t+3"]
    assert main(["forecast", str(tiny_bundle), "--csv", str(prices_csv), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["origin"] == "2023-06-30" and len(answer["steps"]) == 3
    assert main(["evaluate", str(tiny_bundle), "--data", str(prices_csv), "--from", "2022-01-01", "--to",
                 "2023-06-30", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    data = load_horizon_data(prices_csv, window=10, horizon=3, **DATES)
    assert scores["origins"] == len(data.splits["test"].y) and scores["first_origin"] == "2022-01-03"
    assert {"loss", "crps", "mase", "coverage_80", "coverage_90", "crps_h3", "baseline_rw_crps"} <= set(scores)


def test_forecast_refuses_rows_that_cannot_be_real_unless_told_they_are(tiny_bundle, prices_csv, tmp_path, capsys):
    """The index file's tail with one field changed in its last row: one sentence naming the day and the field,
    exit 2; with --trust-prices the forecast, its table's columns aligned whatever the prices' size."""
    from rnnlab.launch.cli import main

    frame = pd.read_csv(prices_csv).tail(300)
    close = frame["Close"].iloc[-2]
    for change, fault in (({"High": 1.0}, r"its high \(1\) is under its low \([\d,.]+\)"),
                          ({"Close": 50 * close}, r"its close \([\d,.]+\) is 50x the close of 2023-06-29")):
        changed = frame.copy()
        changed.loc[changed.index[-1], list(change)] = list(change.values())
        changed.to_csv(tmp_path / "changed.csv", index=False)
        command = ["forecast", str(tiny_bundle), "--csv", str(tmp_path / "changed.csv")]
        assert main(command) == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(rf"^rnnlab: .*row for 2023-06-30 cannot be real: {fault}.*; .* --trust-prices\)\.$", message)
        assert main([*command, "--trust-prices"]) == 0
        table = capsys.readouterr().out.strip().splitlines()
        assert table[0].startswith("origin 2023-06-30") and [line.split()[0] for line in table[2:]] == ["t+1", "t+2", "t+3"]
        assert len({len(line) for line in table[1:]}) == 1, table  # 50x the close: cells of 1.341e+06 beside cents


def test_the_forecast_table_keeps_its_columns_for_prices_of_any_size():
    from rnnlab.jobs.horizon import forecast_table

    values = [5e-05, 0.5, 13716.164, 999_999.99, 12_345_678.0, 1e300, 1.7e308]
    answer = {"origin": "2023-06-30", "close": 1e300, "quantiles": [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95],
              "steps": [{"step": 1, "values": values}, {"step": 2, "values": values[::-1]}]}
    table = forecast_table(answer).splitlines()
    assert table[0] == "origin 2023-06-30, close 1e+300: the next 2 trading days"
    assert table[2].split() == ["t+1", "5e-05", "0.50", "13,716.16", "999,999.99", "1.235e+07", "1e+300", "1.7e+308"]
    assert len({len(line) for line in table[1:]}) == 1  # every row as wide as the header: 5 + 7 cells of 11


def test_a_forecast_past_the_largest_float_fails_only_its_own_history(tiny_bundle, prices_csv):
    """Trusted prices of 1e300 can give quantiles past the largest float, which JSON cannot carry: that history's
    error, not the batch's."""
    from rnnlab.inference import load_predictor

    predictor = load_predictor(tiny_bundle)
    X, origin, close, scale = prepared = predictor.prepare(_rows(prices_csv))
    good, huge = predictor.predict_prepared([prepared, (X, origin, 1e300, 1000 * scale)])  # a jump to 1e300
    assert good["close"] == close and "steps" in good
    assert huge == {"error": "The forecast from the close of 1e+300 on 2023-06-30 passes the largest number a float "
                             "holds; send prices in a smaller unit."}


def test_a_history_with_no_defined_feature_is_that_requests_error(tiny_bundle, prices_csv):
    from rnnlab.errors import InputError
    from rnnlab.inference import load_predictor

    rows = _rows(prices_csv)
    for row in rows:
        row["volume"] = 0  # every volume ratio 0/0: no feature row at all
    with pytest.raises(InputError, match="undefined features"):  # a DataError here would fail the whole batch
        load_predictor(tiny_bundle).prepare(rows)


@pytest.fixture(scope="module")
def horizon_service(tiny_bundle) -> str:
    """A real local Ray Serve instance serving the tiny horizon bundle (POST /v1/horizon)."""
    from conftest import serving

    with serving({"horizon": str(tiny_bundle), "batch_wait_timeout_s": 0.05}) as base:
        yield base


@pytest.mark.slow
def test_the_route_answers_batched_and_refuses_bad_rows_naming_the_field(horizon_service, tiny_bundle, prices_csv):
    import asyncio

    import httpx

    from rnnlab.inference import load_predictor

    url, rows = horizon_service, _rows(prices_csv)
    expected = load_predictor(tiny_bundle).predict([rows])[0]
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/healthz").json()["serving"] == ["horizon"]
        answer = http.post("/v1/horizon", json={"rows": rows})
        assert answer.status_code == 200, answer.text
        forecast = answer.json()["forecast"]
        assert forecast["origin"] == expected["origin"]
        np.testing.assert_allclose([s["values"] for s in forecast["steps"]],
                                   [s["values"] for s in expected["steps"]], rtol=1e-5)
        bad = [dict(row) for row in rows]
        bad[5]["close"] = -1
        refused = http.post("/v1/horizon", json={"rows": bad})
        assert refused.status_code == 422 and "close" in json.dumps(refused.json()["detail"])
        missing = [dict(row) for row in rows]
        del missing[-1]["volume"]
        refused = http.post("/v1/horizon", json={"rows": missing})
        assert refused.status_code == 422 and "volume" in json.dumps(refused.json()["detail"])
        short = http.post("/v1/horizon", json={"rows": rows[-50:]})
        assert short.status_code == 422 and "264" in short.text
        unreal = [dict(row) for row in rows]
        unreal[-1]["high"] = 1.0
        refused = http.post("/v1/horizon", json={"rows": unreal})
        assert refused.status_code == 422, refused.text
        [error] = refused.json()["detail"]
        assert error["loc"] == ["body", "rows"]
        assert f"row for {rows[-1]['date']} cannot be real: its high (1) is under its low (" in error["msg"]
        assert http.post("/v1/horizon", json={"rows": unreal, "trust_prices": True}).status_code == 200

    async def many() -> list:  # one request that cannot be real among good ones, gathered into the same batches
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/horizon", json={"rows": rows}) for _ in range(8)),
                                        client.post("/v1/horizon", json={"rows": unreal}))

    *good, bad = asyncio.run(many())
    assert all(r.status_code == 200 for r in good) and bad.status_code == 422 and "cannot be real" in bad.text
    with httpx.Client(base_url=url, timeout=60) as http:
        model = next(m for m in http.get("/v1/models").json()["data"] if m["endpoint"] == "/v1/horizon")
        assert model["batching"]["items"] >= 9 and model["batching"]["batch_size_max"] >= 2


@pytest.mark.slow
def test_the_playground_draws_the_quantiles_and_a_fan(horizon_service, prices_csv, tmp_path):
    """The playground's horizon panel in headless Chromium: the table shows the API's medians, the chart a fan of
    three intervals and the median line after the recent closes."""
    import httpx

    from conftest import require, skip_or_fail

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                  None)
    if binary is None or shutil.which("chromedriver") is None:
        skip_or_fail("no Chromium and chromedriver installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = require("selenium.webdriver", "Selenium is not installed (the test extra has it)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from test_playground import CHROMIUM_FLAGS

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                              options=options)
    try:
        driver.get(f"{horizon_service}/")
        WebDriverWait(driver, 60).until(lambda d: "horizon" in d.find_element(By.ID, "serving").text)
        driver.execute_script("document.getElementById('horizon-csv').value = arguments[0]", Path(prices_csv).read_text())
        driver.find_element(By.ID, "run-horizon").click()
        table = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "horizon-table"))[0]
        medians = [float(cell.text.replace(",", "")) for cell in table.find_elements(By.CSS_SELECTOR, "td.median")]
        rows = _rows(prices_csv, 400)
        expected = httpx.post(f"{horizon_service}/v1/horizon", json={"rows": rows}, timeout=60).json()["forecast"]
        assert medians == pytest.approx([s["median"] for s in expected["steps"]], abs=0.006)
        chart = driver.find_element(By.ID, "fan-chart")
        assert len(chart.find_elements(By.CSS_SELECTOR, "polygon.fan")) == 3
        assert chart.find_elements(By.ID, "fan-median") and chart.find_elements(By.TAG_NAME, "polyline")
    finally:
        driver.quit()


@pytest.mark.mirror
def test_the_recipe_folds_never_read_the_backtests_test_period(mirror):
    """benchmarks/horizon_folds.py chooses the recipe on folds before 2020: no fold's scored origin may look at a
    close from the backtest's test period, through its own target days or the random walk's."""
    from benchmarks import horizon_folds as folds

    test_start = pd.Timestamp(PROTOCOLS["backtest"]["test_start"])
    for name, dates in folds.FOLDS.items():
        data = load_horizon_data(mirror / "19900101_20230630.csv", window=21, horizon=5, **dates)
        origins = data.splits["test"].origins
        last_target = data.closes.index[data.closes.index.get_indexer(origins) + 5].max()
        assert len(origins) > 400 and last_target < test_start, name
        assert pd.Timestamp(dates["val_end"]) < origins[0]  # each fold early-stops on the year before its scores
