"""Scores of multi-step quantile forecasts, per horizon and overall, as forecasters compute them.

Arrays: ``actual`` [N, H] (N rolling origins, H steps ahead), ``quantiles`` [N, H, Q] at the levels ``taus``
(increasing), ``median`` the forecast at tau = 0.5. ``scale`` is MASE's denominator: the mean absolute one-step
change of the training part (the in-sample naive forecast's error), in the same units as ``actual``.

- pinball (quantile) loss at tau: ``max(tau * (y - q), (tau - 1) * (y - q))``, averaged over the taus;
- CRPS from quantiles: twice the mean pinball loss over the taus (the quantile-grid approximation of the CRPS
  integral ``2 * int_0^1 pinball_tau d tau`` that GluonTS and NeuralForecast report);
- scaled pinball / scaled CRPS: divided by ``scale``;
- MASE of the median: mean |y - median| / ``scale``;
- sMAPE: mean of 200 |y - f| / (|y| + |f|) (percent, 0..200);
- coverage of the central 80 % and 90 % intervals: the share of actuals within [q_0.1, q_0.9] and
  [q_0.05, q_0.95] (inclusive), and its distance from nominal.

``plot_fan`` draws what a forecaster looks at: one origin's fan of intervals after the recent closes, and every
origin's intervals beside what happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

INTERVALS = {80: (0.1, 0.9), 90: (0.05, 0.95)}


def _tau_index(taus: Sequence[float], tau: float) -> int | None:
    hits = np.flatnonzero(np.isclose(np.asarray(taus, dtype=np.float64), tau))
    return int(hits[0]) if len(hits) else None


def pinball(actual: np.ndarray, quantiles: np.ndarray, taus: Sequence[float]) -> np.ndarray:
    """Pinball loss per (origin, step, tau): [N, H, Q]."""
    y = np.asarray(actual, dtype=np.float64)[..., None]
    q = np.asarray(quantiles, dtype=np.float64)
    t = np.asarray(taus, dtype=np.float64)
    diff = y - q
    return np.maximum(t * diff, (t - 1.0) * diff)


def crps_from_quantiles(actual: np.ndarray, quantiles: np.ndarray, taus: Sequence[float]) -> np.ndarray:
    """[N, H]: 2 x the mean pinball loss over the taus."""
    return 2.0 * pinball(actual, quantiles, taus).mean(axis=-1)


def coverage(actual: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """[N, H] booleans: the actual within [lower, upper]."""
    y = np.asarray(actual, dtype=np.float64)
    return (y >= lower) & (y <= upper)


def smape(actual: np.ndarray, forecast: np.ndarray) -> np.ndarray:
    y, f = np.asarray(actual, dtype=np.float64), np.asarray(forecast, dtype=np.float64)
    denom = np.abs(y) + np.abs(f)
    return np.where(denom > 0, 200.0 * np.abs(y - f) / np.where(denom > 0, denom, 1.0), 0.0)


def median_of(quantiles: np.ndarray, taus: Sequence[float]) -> np.ndarray:
    k = _tau_index(taus, 0.5)
    if k is None:  # interpolate between the levels around 0.5
        t = np.asarray(taus, dtype=np.float64)
        return np.apply_along_axis(lambda q: np.interp(0.5, t, q), -1, quantiles)
    return np.asarray(quantiles, dtype=np.float64)[..., k]


def forecast_metrics(actual: np.ndarray, quantiles: np.ndarray, taus: Sequence[float], scale: float,
                     *, per_horizon: bool = True) -> dict[str, float]:
    """Every score overall (``crps``, ``pinball``, ``scaled_crps``, ``scaled_pinball``, ``mase``, ``smape``,
    ``coverage_80``, ``coverage_90``, ``coverage_80_error``, ``coverage_90_error``) and, with ``per_horizon``,
    each again per step as ``<name>_h<k>`` (k = 1..H)."""
    y = np.asarray(actual, dtype=np.float64)
    q = np.asarray(quantiles, dtype=np.float64)
    if y.ndim != 2 or q.shape[:2] != y.shape or q.shape[-1] != len(taus):
        raise ValueError(f"need actual [N, H] and quantiles [N, H, {len(taus)}], got {y.shape} and {q.shape}")
    if len(y) == 0:
        raise ValueError("no forecasts to score")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    loss = pinball(y, q, taus).mean(axis=-1)  # [N, H]
    median = median_of(q, taus)
    per = {  # name -> [N, H] values whose mean is the metric
        "pinball": loss,
        "crps": 2.0 * loss,
        "scaled_pinball": loss / scale,
        "scaled_crps": 2.0 * loss / scale,
        "mase": np.abs(y - median) / scale,
        "smape": smape(y, median),
    }
    for level, (lo, hi) in INTERVALS.items():
        i, j = _tau_index(taus, lo), _tau_index(taus, hi)
        if i is not None and j is not None:
            per[f"coverage_{level}"] = coverage(y, q[..., i], q[..., j]).astype(np.float64)
    out: dict[str, float] = {name: float(values.mean()) for name, values in per.items()}
    for level in INTERVALS:
        if f"coverage_{level}" in out:
            out[f"coverage_{level}_error"] = abs(out[f"coverage_{level}"] - level / 100)
    if per_horizon:
        for name, values in per.items():
            for h, value in enumerate(values.mean(axis=0), start=1):
                out[f"{name}_h{h}"] = float(value)
    return out


def relative(metrics: dict[str, float], baseline: dict[str, float], names=("crps", "mase", "pinball")) -> dict:
    """``<name>_vs_<baseline>``-style ratios: the model's figure over the baseline's (below 1 = better)."""
    return {name: metrics[name] / baseline[name] for name in names if baseline.get(name)}


def plot_fan(closes, details: dict, path, *, recent: int = 60) -> Path:
    """Two panels: the last test origin's recent closes and its fan of intervals; over every test origin, the
    t+H forecast's intervals as % changes with the changes that happened."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus, q = list(details["taus"]), details["quantiles"]
    origins, actual = details["origins"], details["actual"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    last = len(origins) - 1
    origin = origins[last]
    past = closes[closes.index <= origin].iloc[-recent:]
    future = closes[closes.index > origin].iloc[: q.shape[1]]
    left.plot(past.index, past.to_numpy(), color="black", linewidth=1.3, label="close")
    fan_dates = [origin, *future.index]
    _fan(left, fan_dates, np.vstack([np.full(len(taus), details["close"][last]), q[last]]), taus)
    left.plot(future.index, actual[last][: len(future)], "o", color="tab:red", markersize=4, label="actual")
    left.set_title(f"Forecast from {origin.date()}: median and 50/80/90 % intervals")
    left.legend(loc="upper left")
    H = q.shape[1]
    base = np.asarray(details["close"])[:, None]
    _fan(right, origins, 100 * (q[:, H - 1, :] / base - 1), taus)
    right.plot(origins, 100 * (actual[:, H - 1] / base[:, 0] - 1), ".", color="black", markersize=2,
               label=f"actual {H}-day change")
    right.axhline(0, color="gray", linewidth=0.6)
    right.set_ylabel("% change from the origin's close")
    right.set_title(f"Every test origin: the t+{H} forecast's intervals and what happened")
    right.legend(loc="upper right", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _fan(ax, dates, q: np.ndarray, taus: list) -> None:
    """Shade the central intervals (90, 80, 50 %) and draw the median."""
    for level, alpha in ((0.90, 0.15), (0.80, 0.25), (0.50, 0.35)):
        lo, hi = _index(taus, (1 - level) / 2), _index(taus, 1 - (1 - level) / 2)
        if lo is not None and hi is not None:
            ax.fill_between(dates, q[:, lo], q[:, hi], color="tab:blue", alpha=alpha, linewidth=0,
                            label=f"{int(level * 100)} % interval")
    mid = _index(taus, 0.5)
    if mid is not None:
        ax.plot(dates, q[:, mid], color="tab:blue", linewidth=1.2, label="median")


def _index(taus: list, tau: float) -> int | None:
    hits = [i for i, t in enumerate(taus) if abs(t - tau) < 1e-9]
    return hits[0] if hits else None
