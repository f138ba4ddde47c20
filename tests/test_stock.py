"""Stock pipeline: features checked by hand, no look-ahead, splits, scaler, windows, targets, bad input, parity."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rnnlab.data import stock
from rnnlab.errors import DataError, InputError
from stock_reference import chapter_features

N_DAYS = 320


def synthetic_prices(n: int = N_DAYS, seed: int = 0, start: str = "2020-01-01") -> pd.DataFrame:
    """A Yahoo-layout frame (Date column, capitalised names) with a random-walk close."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = close * np.exp(rng.normal(0, 0.005, n))
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.01, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.01, n))
    volume = rng.integers(1_000_000, 5_000_000, n)
    return pd.DataFrame({
        "Date": pd.bdate_range(start, periods=n).strftime("%Y-%m-%d"),
        "Open": open_, "High": high, "Low": low, "Close": close, "Adj Close": close, "Volume": volume,
    })  # fmt: skip


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def prices_csv(tmp_path) -> Path:
    return write_csv(synthetic_prices(), tmp_path / "prices.csv")


# --- independent reference: plain Python over the raw columns, one day at a time ------------------------------


def expected_features(raw: pd.DataFrame, t: int) -> dict[str, float]:
    """The chapter's features at positional day t, computed with explicit slices (data up to t-1, plus Open[t])."""
    O, H, L, C, V = (raw[c].astype(float).tolist() for c in ("Open", "High", "Low", "Close", "Volume"))
    days = {"5": 5, "30": 21, "365": 252}

    def ret(s: int, n: int) -> float:  # return over n days ending at day s
        return (C[s] - C[s - n]) / C[s - n]

    f = {"open": O[t], "open_1": O[t - 1], "close_1": C[t - 1], "high_1": H[t - 1], "low_1": L[t - 1],
         "volume_1": V[t - 1]}  # fmt: skip
    for kind, series in (("price", C), ("volume", V)):
        for label, n in days.items():
            past = series[t - n : t]
            f[f"avg_{kind}_{label}"] = statistics.fmean(past)
            f[f"std_{kind}_{label}"] = statistics.stdev(past)
        for stat in ("avg", "std"):
            for a, b in (("5", "30"), ("5", "365"), ("30", "365")):
                f[f"ratio_{stat}_{kind}_{a}_{b}"] = f[f"{stat}_{kind}_{a}"] / f[f"{stat}_{kind}_{b}"]
    f["return_1"] = ret(t - 1, 1)
    for label, n in days.items():
        f[f"return_{label}"] = ret(t - 1, n)
        # return_1 as known on days t-n .. t-1, i.e. one-day returns ending at t-n-1 .. t-2
        f[f"moving_avg_{label}"] = statistics.fmean(ret(s - 1, 1) for s in range(t - n, t))
    return f


def test_feature_names_are_the_chapters_37():
    assert len(stock.FEATURE_NAMES) == 37 == len(set(stock.FEATURE_NAMES))
    assert stock.FEATURE_NAMES[:6] == ["open", "open_1", "close_1", "high_1", "low_1", "volume_1"]
    assert stock.FEATURE_NAMES[-7:] == ["return_1", "return_5", "return_30", "return_365",
                                        "moving_avg_5", "moving_avg_30", "moving_avg_365"]  # fmt: skip


def test_features_match_an_independent_computation(prices_csv):
    raw = pd.read_csv(prices_csv)
    features = stock.make_features(stock.read_prices(prices_csv))
    assert list(features.columns) == stock.FEATURE_NAMES + ["close"]
    # 254 warm-up days: moving_avg_365 needs 252 one-day returns, each known a day late.
    assert len(features) == N_DAYS - 254
    assert features.index[0] == pd.Timestamp(raw["Date"][254])
    for t in (254, 255, 287, N_DAYS - 1):
        row = features.loc[pd.Timestamp(raw["Date"][t])]
        for name, value in expected_features(raw, t).items():
            assert math.isclose(row[name], value, rel_tol=1e-9, abs_tol=1e-12), (t, name, row[name], value)
        assert row["close"] == raw["Close"][t]


def test_no_look_ahead_features_at_day_t_ignore_day_t_onwards(prices_csv):
    raw = pd.read_csv(prices_csv)
    base = stock.make_features(stock.read_prices(prices_csv))
    for t in (254, 290, N_DAYS - 1):
        perturbed = raw.astype({"Volume": float})
        for column in ("Open", "High", "Low", "Close", "Volume"):
            perturbed.loc[t:, column] = perturbed.loc[t:, column] * 1.7
        changed = stock.make_features(stock.read_prices(write_csv(perturbed, prices_csv.parent / f"p{t}.csv")))
        day = pd.Timestamp(raw["Date"][t])
        before, after = base.loc[day], changed.loc[day]
        differs = {name for name in stock.FEATURE_NAMES if not math.isclose(before[name], after[name], rel_tol=1e-12)}
        assert differs == {"open"}, (t, differs)
        # and every earlier day is untouched
        pd.testing.assert_frame_equal(base.loc[: day - pd.Timedelta(days=1)], changed.loc[: day - pd.Timedelta(days=1)])


def test_make_windows_shapes_and_targets():
    features = np.arange(10 * 3, dtype=np.float64).reshape(10, 3)
    targets = np.arange(10, dtype=np.float64) * 10
    X, y = stock.make_windows(features, targets, length=4)
    assert X.shape == (7, 4, 3) and y.shape == (7,) and X.dtype == np.float32
    for i in range(7):
        np.testing.assert_array_equal(X[i], features[i : i + 4])
        assert y[i] == targets[i + 3]
    X, y = stock.make_windows(features[:2], targets[:2], length=4)
    assert X.shape == (0, 4, 3) and y.shape == (0,)


def split_kwargs(raw: pd.DataFrame) -> dict:
    """Dates for a small split: test = the last 20 days, val = the 15 days before, train the rest."""
    dates = pd.to_datetime(raw["Date"])
    return {"train_end": str(dates.iloc[-21].date()), "test_start": str(dates.iloc[-20].date()),
            "test_end": str(dates.iloc[-1].date()), "val_days": 15}  # fmt: skip


def test_split_by_date(prices_csv):
    raw = pd.read_csv(prices_csv)
    features = stock.make_features(stock.read_prices(prices_csv))
    parts = stock.split_by_date(features, **split_kwargs(raw))
    assert [len(parts[k]) for k in ("train", "val", "test")] == [len(features) - 35, 15, 20]
    assert parts["train"].index[-1] < parts["val"].index[0] and parts["val"].index[-1] < parts["test"].index[0]
    whole = stock.split_by_date(features, **{**split_kwargs(raw), "val_days": 0})
    assert len(whole["train"]) == len(features) - 20 and whole["val"].empty


@pytest.mark.parametrize("target", stock.TARGETS)
def test_load_stock_data_windows_every_val_and_test_day(prices_csv, target):
    raw = pd.read_csv(prices_csv)
    data = stock.load_stock_data(prices_csv, window=5, target=target, **split_kwargs(raw))
    features = stock.make_features(stock.read_prices(prices_csv))
    parts = stock.split_by_date(features, **split_kwargs(raw))
    X, y, rows = data.splits["train"]
    assert X.shape == (len(parts["train"]) - 4, 5, 37) and len(y) == len(rows) == len(X)
    for name in ("val", "test"):
        X, y, rows = data.splits[name]
        assert X.shape == (len(parts[name]), 5, 37)
        assert list(rows.index) == list(parts[name].index)
        np.testing.assert_allclose(y, stock.target_values(parts[name], target), rtol=1e-6)
        # window of the first day ends on that day and starts with 4 days of context before it
        first = features.index.get_loc(rows.index[0])
        np.testing.assert_allclose(X[0], data.scaler.transform(features.iloc[first - 4 : first + 1]), rtol=1e-5)
    # the last test window's last step is the last test day's scaled features
    np.testing.assert_allclose(data.splits["test"][0][-1, -1], data.scaler.transform(features.iloc[[-1]])[0], rtol=1e-5)


def test_scaler_is_fit_on_train_only(prices_csv):
    raw = pd.read_csv(prices_csv)
    kwargs = split_kwargs(raw)
    data = stock.load_stock_data(prices_csv, **kwargs)
    parts = stock.split_by_date(stock.make_features(stock.read_prices(prices_csv)), **kwargs)
    train = parts["train"][stock.FEATURE_NAMES].to_numpy()
    np.testing.assert_allclose(data.scaler.mean, train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(data.scaler.scale, train.std(axis=0), rtol=1e-12)
    # wild prices in val/test change nothing in the scaler
    wild = raw.copy()
    wild.loc[len(raw) - 35 :, ["Open", "High", "Low", "Close"]] *= 5
    wild_data = stock.load_stock_data(write_csv(wild, prices_csv.parent / "wild.csv"), **kwargs)
    np.testing.assert_array_equal(wild_data.scaler.mean, data.scaler.mean)
    np.testing.assert_array_equal(wild_data.target_scaler.mean, data.target_scaler.mean)


def test_scaler_matches_standard_scaler_and_round_trips_json():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    values = rng.normal(5, 3, (50, 4))
    values[:, 2] = 7.0  # a constant column keeps scale 1, as in sklearn
    scaler = stock.Scaler.fit(values, ["a", "b", "c", "d"])
    reference = StandardScaler().fit(values)
    np.testing.assert_allclose(scaler.transform(values), reference.transform(values), atol=1e-12)
    again = stock.Scaler.from_json(json.loads(json.dumps(scaler.to_json())))
    assert again.columns == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(again.transform(values), scaler.transform(values))
    np.testing.assert_allclose(again.inverse_transform(again.transform(values)), values, atol=1e-12)
    with pytest.raises(DataError, match="different lengths"):
        stock.Scaler.from_json({"columns": ["a"], "mean": [0.0, 1.0], "scale": [1.0, 1.0]})


def test_log_return_target_maps_back_to_prices(prices_csv):
    features = stock.make_features(stock.read_prices(prices_csv))
    log_returns = stock.target_values(features, "log_return")
    np.testing.assert_allclose(log_returns, np.log(features["close"] / features["open"]))
    np.testing.assert_allclose(stock.to_price(log_returns, features, "log_return"), features["close"], rtol=1e-12)
    # predicting a zero return is the same-day-open baseline
    np.testing.assert_allclose(stock.to_price(np.zeros(len(features)), features, "log_return"),
                               stock.naive_same_day_open(features))  # fmt: skip
    np.testing.assert_array_equal(stock.to_price(features["close"].to_numpy(), features, "close"), features["close"])


def test_baselines_and_metrics():
    frame = pd.DataFrame({"open": [10.0, 11.0, 12.0], "close_1": [9.0, 10.0, 13.0], "close": [10.0, 12.0, 12.0]})
    np.testing.assert_array_equal(stock.naive_same_day_open(frame), [10.0, 11.0, 12.0])
    np.testing.assert_array_equal(stock.naive_previous_close(frame), [9.0, 10.0, 13.0])
    metrics = stock.regression_metrics(frame["close"], stock.naive_same_day_open(frame))
    # residuals 0, 1, 0; mean close 34/3 so SS_tot = 8/3
    assert metrics["mae"] == pytest.approx(1 / 3)
    assert metrics["r2"] == pytest.approx(1 - 1 / (8 / 3))
    assert metrics["mape"] == pytest.approx((1 / 12) / 3)


# --- bad input ---------------------------------------------------------------------------------------------


def _break(kind: str, frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.astype({"Open": object})
    if kind == "missing column":
        return frame.drop(columns=["Volume"])
    if kind == "unparseable date":
        frame.loc[100, "Date"] = "yesterday"
    elif kind == "unsorted":
        frame.loc[[100, 101], "Date"] = frame.loc[[101, 100], "Date"].to_numpy()
    elif kind == "duplicate":
        frame.loc[101, "Date"] = frame.loc[100, "Date"]
    elif kind == "non-numeric":
        frame.loc[100, "Open"] = "12,5x"
    elif kind == "too few rows":
        return frame.iloc[:200]
    return frame


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing column", r"lacks the column\(s\) Volume"),
        ("unparseable date", r"unparseable date 'yesterday' at row 101"),
        ("unsorted", r"unsorted dates"),
        ("duplicate", r"duplicate dates"),
        ("non-numeric", r"non-numeric Open value '12,5x' at row 101"),
        ("too few rows", r"200 usable rows but the 252-day features need at least 255"),
    ],
)
def test_bad_files_raise_one_sentence_naming_file_and_fault(tmp_path, kind, message):
    path = write_csv(_break(kind, synthetic_prices()), tmp_path / "bad.csv")
    with pytest.raises(DataError, match=message) as info:
        stock.read_prices(path)
    text = str(info.value)
    assert str(path) in text and text.count(". ") == 0 and text.endswith(".")


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        stock.read_prices(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="not a readable CSV"):
        stock.read_prices(tmp_path / "empty.csv")


def test_rows_with_missing_values_are_dropped_and_counted(tmp_path, caplog):
    frame = synthetic_prices().astype({"Close": object, "Volume": object})
    frame.loc[50, "Close"] = "null"  # Yahoo's marker for a day without a quote
    frame.loc[60, "Volume"] = ""
    path = write_csv(frame, tmp_path / "gaps.csv")
    with caplog.at_level(logging.INFO, logger="rnnlab.data"):  # prices.py reads, stock.py featurizes
        prices = stock.read_prices(path)
        stock.make_features(prices)
    assert len(prices) == N_DAYS - 2
    assert "dropped 2 of 320 rows with a missing value" in caplog.text
    assert "dropped 254 warm-up rows" in caplog.text


def test_adj_close_is_optional_and_columns_are_case_insensitive(tmp_path):
    frame = synthetic_prices().drop(columns=["Adj Close"])
    frame.columns = [c.lower() for c in frame.columns]
    prices = stock.read_prices(write_csv(frame, tmp_path / "lower.csv"))
    assert list(prices.columns) == ["Open", "High", "Low", "Close", "Volume"] and prices.index.name == "Date"


# --- inference helper ----------------------------------------------------------------------------------------


def request_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows as the server receives them: JSON records with lowercase keys."""
    records = json.loads(frame.drop(columns=["Adj Close"]).rename(columns=str.lower).to_json(orient="records"))
    return pd.DataFrame(records)


def served_features(history, window: int) -> np.ndarray:
    """What the forecaster computes for one request: read_history's rows -> forecast_features [window, 37]."""
    return stock.forecast_features(stock.read_history(history, window=window).values[None], window)[0]


def test_a_request_gets_the_training_features_to_the_bit_and_states_the_minimum(prices_csv):
    raw = pd.read_csv(prices_csv)
    reference = stock.make_features(stock.read_prices(prices_csv))
    window = 5
    assert stock.min_history_rows(window) == 259
    history = raw.iloc[-stock.min_history_rows(window) :].drop(columns=["Adj Close"]).rename(columns=str.lower)
    np.testing.assert_array_equal(served_features(history, window), reference[stock.FEATURE_NAMES].iloc[-window:])
    as_json = request_rows(raw.iloc[-stock.min_history_rows(window) :])  # JSON keeps 10 decimals
    np.testing.assert_allclose(served_features(as_json, window), reference[stock.FEATURE_NAMES].iloc[-window:],
                               rtol=1e-9)
    with pytest.raises(InputError, match="258 rows but one prediction with windows of 5 days needs at least 259"):
        stock.read_history(history.iloc[1:], window=window)


def test_a_request_may_give_only_the_open_of_its_last_row(prices_csv):
    raw = pd.read_csv(prices_csv)
    history = raw.drop(columns=["Adj Close"]).rename(columns=str.lower)
    history.loc[len(history) - 1, ["high", "low", "close", "volume"]] = None
    every_day = N_DAYS - stock.WARMUP_ROWS
    read = stock.read_history(history, window=every_day)
    assert np.isnan(read.values[-1, 1:]).all() and not np.isnan(read.values[-1, 0])
    reference = stock.make_features(stock.read_prices(prices_csv))
    np.testing.assert_array_equal(served_features(history, every_day), reference[stock.FEATURE_NAMES])
    history.loc[100, "close"] = None
    with pytest.raises(InputError, match="no Close value at row 101"):
        stock.read_history(history, window=5)


def test_a_request_with_bad_rows_is_refused(prices_csv):
    history = request_rows(pd.read_csv(prices_csv))
    unsorted = history.iloc[::-1].reset_index(drop=True)
    with pytest.raises(InputError, match="unsorted dates"):
        stock.read_history(unsorted, window=1)
    with pytest.raises(InputError, match="lacks the column"):
        stock.read_history(history.drop(columns=["open"]), window=1)
    bad = history.astype({"open": object})
    bad.loc[3, "open"] = "abc"
    with pytest.raises(InputError, match="non-numeric Open"):
        stock.read_history(bad, window=1)


def test_rows_that_cannot_be_real_prices_are_refused_naming_the_day_and_field_unless_trusted(prices_csv):
    history = request_rows(pd.read_csv(prices_csv))
    last, day, before = len(history) - 1, history["date"].iloc[-1], history["date"].iloc[-2]
    previous_close = history["close"].iloc[-2]
    high_under_low = history.copy()
    high_under_low.loc[last, "high"] = 1.0
    fifty_fold = history.copy()
    fifty_fold.loc[last, "close"] = 50 * previous_close
    halved = history.copy()  # a fall past the bound, every field of the row consistent
    halved.loc[last, ["open", "high", "low", "close"]] = 0.4 * previous_close
    open_only = history.astype({c: float for c in ("high", "low", "close", "volume")})
    open_only.loc[last, ["open", "high", "low", "close", "volume"]] = [1.6 * previous_close] + [None] * 4
    refused = [(high_under_low, rf"its high \(1\) is under its low \("),
               (fifty_fold, rf"its close \([\d,.]+\) is 50x the close of {before} \("),
               (halved, rf"its close \([\d,.]+\) is 0.4x the close of {before} .* beyond the 50%"),
               (open_only, rf"its open \([\d,.]+\) is 1.6x the close of {before}")]  # the stock forecast day's open
    for rows, fault in refused:
        with pytest.raises(InputError, match=rf"^The price history's row for {day} cannot be real: {fault}") as error:
            stock.read_history(rows, window=5)
        assert "--trust-prices" in str(error.value) and str(error.value).count(". ") == 0
        read = stock.read_history(rows, window=5, trust_prices=True)  # the sender says they are real: used as sent
        np.testing.assert_array_equal(read.values[-1, :4], rows.loc[last, ["open", "high", "low", "close"]].to_numpy(float))
    inside = history.copy()  # 45 % in a day: a crash, not a typo
    inside.loc[last, ["high", "close"]] = 1.45 * previous_close
    assert stock.read_history(inside, window=5).values[-1, 3] == 1.45 * previous_close
    early = high_under_low.copy()  # of several faulty rows the forecast reads, the earliest is named
    early.loc[last - 100, "low"] = history.loc[last - 100, "high"]
    with pytest.raises(InputError, match=rf"row for {history['date'].iloc[-101]} cannot be real: its low .* is over "
                                         r"its (open|close)"):
        stock.read_history(early, window=5)


def test_a_request_body_refuses_a_row_that_cannot_be_real_unless_it_trusts_its_prices(stock_setup):
    """POST /v1/stock's body -> its item -> the deployment's ``prepare`` of that item alone: the InputError is the
    request's 422 (naming the row and field), and only its own; ``"trust_prices": true`` lets the row through."""
    from rnnlab.inference import load_predictor
    from rnnlab.jobs.stock import StockRequest

    path, csv, _, _ = stock_setup
    forecaster = load_predictor(path)
    rows = request_rows(pd.read_csv(csv).tail(300)).to_dict(orient="records")
    rows[-1] = {"date": rows[-1]["date"], "open": 50 * rows[-2]["close"]}  # the day to forecast: its open 50x
    [item] = StockRequest.model_validate_json(json.dumps({"rows": rows})).items()
    with pytest.raises(InputError, match=rf"row for {rows[-1]['date']} cannot be real: its open .* is 50x the close"):
        forecaster.prepare(item)
    [trusted] = StockRequest.model_validate_json(json.dumps({"rows": rows, "trust_prices": True})).items()
    [answer] = forecaster.predict_prepared([forecaster.prepare(trusted)])
    assert answer["date"] == rows[-1]["date"] and answer["baseline_open"] == rows[-1]["open"]
    assert StockRequest.model_json_schema()["properties"]["trust_prices"]["default"] is False


# --- one feature path: serving reads the bits training read; both against the chapter's pandas features -------

# No rolling sums behind these: the same float operations in pandas and numpy, so the same bits.
EXACT_FEATURES = ["open", "open_1", "close_1", "high_1", "low_1", "volume_1",
                  "return_1", "return_5", "return_30", "return_365"]  # fmt: skip


def assert_forecast_features_match_training(prices: pd.DataFrame, window: int = 5) -> None:
    """``forecast_features`` on every history a forecast could be asked for (min_history_rows rows ending on each
    day) against ``make_features`` over the whole file: the same bits. Both against the chapter's pandas
    features (``stock_reference``): equal to rounding, and as the model reads them (scaled, float32)."""
    trained_frame = stock.make_features(prices)
    reference = trained_frame[stock.FEATURE_NAMES].to_numpy()
    values = prices[stock.VALUE_COLUMNS].to_numpy()
    histories = np.lib.stride_tricks.sliding_window_view(values, stock.min_history_rows(window), axis=0)
    served = stock.forecast_features(histories.transpose(0, 2, 1), window)  # [days, window, 37]
    trained = np.lib.stride_tricks.sliding_window_view(reference, window, axis=0).transpose(0, 2, 1)
    assert served.shape == trained.shape and np.isfinite(served).all()
    np.testing.assert_array_equal(served, trained)  # one computation: training and serving see the same bits

    chapter = chapter_features(prices).loc[trained_frame.index, stock.FEATURE_NAMES].to_numpy()
    exact = [stock.FEATURE_NAMES.index(name) for name in EXACT_FEATURES]
    np.testing.assert_array_equal(reference[:, exact], chapter[:, exact])
    # pandas' rolling std drifts by up to ~1e-9 of its value over a long series (Welford updates); ours is exact
    np.testing.assert_allclose(reference, chapter, rtol=1e-8, atol=1e-15)
    scaler = stock.Scaler.fit(reference[: len(reference) // 2])
    ours32, chapter32 = (scaler.transform(f).astype(np.float32) for f in (reference, chapter))
    differ = ours32 != chapter32
    assert differ.mean() < 1e-4, f"{differ.sum()} of {differ.size} float32 model inputs differ"
    # one float32 step, or (for a value next to its feature's mean, where steps are tiny) a billionth of a std
    step = np.maximum(np.spacing(np.abs(chapter32)), np.spacing(np.abs(ours32)))
    assert (np.abs(ours32 - chapter32) <= np.maximum(step, 1e-9)).all()


def test_forecast_features_match_the_training_pipeline(prices_csv):
    assert_forecast_features_match_training(stock.read_prices(prices_csv))


def test_training_features_are_computed_in_blocks_without_a_seam(prices_csv, monkeypatch):
    prices = stock.read_prices(prices_csv)
    whole = stock.make_features(prices)
    monkeypatch.setattr(stock, "_FEATURE_BLOCK", 7)  # 66 feature rows: 9 blocks of 7 and one of 3
    pd.testing.assert_frame_equal(stock.make_features(prices), whole, check_exact=True)


def test_forecast_features_match_an_independent_computation(prices_csv):
    raw = pd.read_csv(prices_csv)
    values = raw[stock.VALUE_COLUMNS].to_numpy(dtype=float)[None]  # one history: the whole file
    served = stock.forecast_features(values, window=N_DAYS - stock.WARMUP_ROWS)[0]
    for t in (254, 255, 287, N_DAYS - 1):
        for name, value in expected_features(raw, t).items():
            got = served[t - stock.WARMUP_ROWS, stock.FEATURE_NAMES.index(name)]
            assert math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-15), (t, name, got, value)


def test_forecast_features_read_only_the_rows_the_windows_need(prices_csv):
    values = stock.read_prices(prices_csv)[stock.VALUE_COLUMNS].to_numpy()[None]
    needed = stock.min_history_rows(5)
    older = values.copy()
    older[:, :-needed] *= 3.0  # rows before the 259 read: no effect, to the bit
    np.testing.assert_array_equal(stock.forecast_features(older, 5), stock.forecast_features(values, 5))
    assert stock.forecast_features(values, 5).shape == (1, 5, 37)
    with pytest.raises(ValueError, match="259"):
        stock.forecast_features(values[:, -needed + 1 :], 5)


def test_forecast_features_mark_undefined_ratios_nan(prices_csv):
    values = stock.read_prices(prices_csv)[stock.VALUE_COLUMNS].to_numpy()
    zero_volume = values.copy()
    zero_volume[-30:, 4] = 0.0  # 21-day average volume of 0 -> a 0/0 ratio
    features = stock.forecast_features(np.stack([values, zero_volume]), 5)
    assert np.isfinite(features[0]).all() and np.isnan(features[1]).any()


# --- real data -------------------------------------------------------------------------------------------------

DJIA = "19900101_20230630.csv"


@pytest.mark.slow
@pytest.mark.mirror
def test_djia_parity(mirror):
    path = mirror / DJIA
    features = stock.make_features(stock.read_prices(path))
    assert len(stock.FEATURE_NAMES) == 37
    chapter = stock.split_by_date(features, val_days=0)
    assert len(chapter["train"]) == 8061 and len(chapter["test"]) == 124
    test = chapter["test"]
    same_open = stock.regression_metrics(test["close"], stock.naive_same_day_open(test))
    previous = stock.regression_metrics(test["close"], stock.naive_previous_close(test))
    assert round(same_open["r2"], 3) == 0.977 and round(same_open["mae"], 1) == 97.6
    assert round(previous["r2"], 3) == 0.968


@pytest.mark.slow
@pytest.mark.mirror
def test_djia_summary_and_windows(mirror):
    path = mirror / DJIA
    summary = stock.summarize_stock(path)
    assert summary["rows"] == 8439 and summary["features"] == 37
    assert (summary["first_date"], summary["last_date"]) == ("1990-01-02", "2023-06-30")
    assert summary["train_period_rows"] == 8061 and summary["test_rows"] == 124
    assert summary["train_rows"] + summary["val_rows"] == 8061 and summary["val_rows"] == 252
    assert round(summary["baselines"]["test"]["same_day_open"]["r2"], 3) == 0.977
    data = stock.load_stock_data(path, target="log_return")
    X, y, rows = data.splits["test"]
    assert X.shape == (124, 5, 37) and len(rows) == 124  # every test day gets a prediction
    np.testing.assert_allclose(data.to_price(y, "test"), rows["close"], rtol=1e-5)


@pytest.mark.mirror
def test_the_index_file_has_no_row_that_cannot_be_real_prices(mirror):
    """Forecast histories are refused such rows; the training file is read unchecked, and needs no check: over its
    whole 1990-2023 history no high is under its day's prices and no price is 50 % from the day before's close."""
    from rnnlab.data.prices import unreal_row

    prices = stock.read_prices(mirror / DJIA)
    assert len(prices) == 8439
    everything = stock.PriceHistory(dates=prices.index.to_numpy().astype("datetime64[D]"),
                                    values=prices[stock.VALUE_COLUMNS].to_numpy())
    assert unreal_row(everything) is None
    assert prices["Close"].pct_change().abs().max() < 0.15  # its largest move, 2001-01-03, is 14.2 %


@pytest.mark.mirror
def test_djia_forecast_features_match_the_training_pipeline(mirror):
    assert_forecast_features_match_training(stock.read_prices(mirror / DJIA))
