"""Score a bundle on the test split of its job, with the same Job code the training loop used."""

from __future__ import annotations

import copy
from pathlib import Path

from rnnlab.errors import BundleError


def evaluate_bundle(bundle_dir: str | Path, *, source: str | Path | None = None) -> dict:
    """Test metrics of a bundle: the data is rebuilt from the bundle's training config (``source`` replaces the
    data file) and must give the same vocabulary / scaler the bundle holds."""
    from accelerate import Accelerator

    from rnnlab.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    job = rebuild_job(bundle, source)
    result = job.evaluate(bundle.model, "test", Accelerator(cpu=True))
    return dict(result.metrics)


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
