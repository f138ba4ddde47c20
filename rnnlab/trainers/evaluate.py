"""Score a bundle with its job's own ``evaluate``, the code training scores its test split with: on that test split
rebuilt from the bundle's training config (``rnnlab evaluate BUNDLE``), or on any data in the job's format read
with the bundle's vocabulary or scaler (``rnnlab evaluate BUNDLE --data PATH``: each job's scorer calls
:func:`score_with_job`). One pipeline, so the two cannot give different figures for the same days."""

from __future__ import annotations

import copy
from pathlib import Path

from rnnlab.errors import BundleError


def evaluate_bundle(bundle_dir: str | Path, *, source: str | Path | None = None, runtime: str | None = None) -> dict:
    """Test figures of a bundle, its model run by ``runtime`` (rnnlab/runtime.py; None: the bundle's default): the
    data is rebuilt from the bundle's training config (``source`` replaces the data file) and must give the same
    vocabulary / scaler the bundle holds."""
    from rnnlab.bundle import load_bundle
    from rnnlab.inference import for_inference

    bundle = load_bundle(bundle_dir)
    return test_figures(rebuild_job(bundle, source), for_inference(bundle, runtime).model)


def score_with_job(bundle, path: str | Path, *, predictions: bool = False, **span) -> dict:
    """What a job's scorer returns for the data at ``path`` (``span``: the ``start``/``end`` days of dated data):
    what the data holds (``Job.load_data_to_score``), then the test figures of the bundle's model on it, and with
    ``predictions`` each item's answer (``Job.predictions``)."""
    from rnnlab.trainers.job import make_job

    job = make_job(bundle.config)
    read = job.load_data_to_score(path, bundle.assets, **span)
    return {**read, **test_figures(job, bundle.model, predictions=predictions)}


def test_figures(job, model, *, predictions: bool = False) -> dict:
    """``job.evaluate`` of its test split on the CPU, with the job's further figures: what training's bundle keeps
    as its test figures (and with ``predictions``, ``job.predictions``)."""
    from accelerate import Accelerator

    result = job.evaluate(model, "test", Accelerator(cpu=True))
    return {**result.metrics, **job.figures(result), **(job.predictions(result) if predictions else {})}


def rebuild_job(bundle, source: str | Path | None = None):
    """The bundle's job with its data loaded from the bundle's training config (``source`` replacing the data
    file); BundleError if that data gives another vocabulary or scaler than the bundle holds."""
    from rnnlab.trainers.job import make_job

    config = copy.deepcopy(bundle.config)
    if source is not None:
        config["data"]["source"] = str(source)
    job = make_job(config)
    job.load_data()
    if job.assets() != bundle.assets:
        names = ", ".join(sorted(set(job.assets()) | set(bundle.assets)))
        raise BundleError(
            f"The data rebuilt from {config['data']['source'] or 'the default data set'} gives another {names} "
            f"than the bundle {bundle.path} holds; use the data the bundle was trained on."
        )
    return job
