"""The chapter's ``generate_features`` in pandas (rolling windows over the whole series): the tests' independent
reference for :func:`rnnlab.data.stock.forecast_features`, which training, scoring and serving all use.

It was rnnlab's training path until the one numpy computation replaced it; the two agree to ~1e-9 of a value
(pandas' rolling sums carry rounding from every earlier row) and the tests bound that difference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rnnlab.data.stock import FEATURE_NAMES, PERIODS, TARGET_COLUMN, VALUE_COLUMNS, WARMUP_ROWS


def chapter_features(prices: pd.DataFrame) -> pd.DataFrame:
    """FEATURE_NAMES + "close" for every day past the warm-up of a price frame (as ``read_prices`` gives it);
    a ratio with a zero denominator is NaN. No rows are dropped past the warm-up."""
    open_, high, low, close, volume = (prices[c] for c in VALUE_COLUMNS)
    out: dict[str, pd.Series] = {
        "open": open_,
        "open_1": open_.shift(1),
        "close_1": close.shift(1),
        "high_1": high.shift(1),
        "low_1": low.shift(1),
        "volume_1": volume.shift(1),
    }
    for stat, series, kind in (
        ("avg", close, "price"), ("avg", volume, "volume"), ("std", close, "price"), ("std", volume, "volume")
    ):
        names = {}
        for label, days in PERIODS.items():
            rolling = series.rolling(days)
            names[label] = f"{stat}_{kind}_{label}"
            out[names[label]] = (rolling.mean() if stat == "avg" else rolling.std()).shift(1)
        for short, long in (("5", "30"), ("5", "365"), ("30", "365")):
            out[f"ratio_{stat}_{kind}_{short}_{long}"] = out[names[short]] / out[names[long]]
    for label, days in (("1", 1), *PERIODS.items()):
        out[f"return_{label}"] = ((close - close.shift(days)) / close.shift(days)).shift(1)
    for label, days in PERIODS.items():
        out[f"moving_avg_{label}"] = out["return_1"].rolling(days).mean().shift(1)
    frame = pd.DataFrame({name: out[name] for name in FEATURE_NAMES})
    frame[TARGET_COLUMN] = close
    return frame.iloc[WARMUP_ROWS:].replace([np.inf, -np.inf], np.nan)
