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
    from rnnlab.trainers.job import make_job

    bundle = load_bundle(bundle_dir)
    config = copy.deepcopy(bundle.config)
    if source is not None:
        config["data"]["source"] = str(source)
    accelerator = Accelerator(cpu=True)
    job = make_job(config)
    job.load_data()
    if job.assets() != bundle.assets:
        names = ", ".join(sorted(set(job.assets()) | set(bundle.assets)))
        raise BundleError(
            f"The data rebuilt from {config['data']['source'] or 'the default data set'} gives another {names} "
            f"than the bundle {bundle_dir} holds; evaluate on the data the bundle was trained on."
        )
    result = job.evaluate(bundle.model, "test", accelerator)
    return dict(result.metrics)
