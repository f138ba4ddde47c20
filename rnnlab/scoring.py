"""Score a bundle on any data in its job's format, read with the bundle's OWN vocabulary or scaler.

``rnnlab evaluate BUNDLE --data PATH`` comes here. Each job's scorer lives in its module (the registry's
``scorer``, ``score(bundle, path)``; one that also takes ``start``/``end`` can cut its data to a span of days) and
says what it accepts and reports. rnnlab's jobs score the data with their own ``Job.evaluate``, as training and
``rnnlab evaluate BUNDLE`` score the test split (``rnnlab.trainers.evaluate``): the same figures, the same names.

Each scorer returns a plain JSON-able dict (non-finite figures become None). Malformed data is a DataError,
a bundle of another job an InputError: one sentence each.
"""

from __future__ import annotations

import datetime
import inspect
import math
from pathlib import Path
from typing import Any

from rnnlab import registry
from rnnlab.bundle import load_bundle
from rnnlab.errors import InputError
from rnnlab.inference import for_inference


def score_data(
    bundle_dir: str | Path,
    data: str | Path,
    *,
    start: datetime.date | str | None = None,
    end: datetime.date | str | None = None,
    runtime: str | None = None,
    predictions: bool = False,
) -> dict[str, Any]:
    """The scores of the bundle at ``bundle_dir`` on ``data`` (a path in the bundle's job's format), its model run
    by ``runtime`` (rnnlab/runtime.py; None: the bundle's default). With ``predictions``, also each item's answer
    (for paired comparisons of models on the same items), from the scorers that give them."""
    bundle = load_bundle(bundle_dir)
    spec = registry.job(bundle.job)
    if spec.scorer is None:  # a job this module does not know yet
        raise InputError(f"Scoring data for {bundle.job} bundles is not supported.")
    scorer = spec.load("scorer")
    options = inspect.signature(scorer).parameters
    dated = "start" in options  # the scorer can cut its data to a span of days
    if predictions and "predictions" not in options:
        raise InputError(f"Scoring {bundle.job} bundles gives no answer per item; score them without predictions.")
    if (start is not None or end is not None) and not dated:
        raise InputError(f"Dates select days of a price file; {bundle_dir} is a {bundle.job} bundle, which scores "
                         "all of its data: leave out --from/--to.")
    if start is not None and end is not None and str(start) > str(end):
        raise InputError(f"The start date {start} comes after the end date {end}; swap them.")
    bundle = for_inference(bundle, runtime)
    extra = {"predictions": True} if predictions else {}
    result = scorer(bundle, data, start=start, end=end, **extra) if dated else scorer(bundle, data, **extra)
    return _finite({"job": bundle.job, "bundle": str(bundle_dir), "data": str(data), **result})


# ------------------------------------------------------------------------------------------------ helpers


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN; R^2 of one day is undefined)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
