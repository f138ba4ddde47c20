"""Tiny models and bundles of every job (the registry's): the model settings a test builds any job's model with,
and a folder holding a bundle of every served job, for the modules that start a service."""

from __future__ import annotations

from pathlib import Path

import torch

from rnnlab.config import load_config
from rnnlab.registry import JOBS, served

CHARS = "abcdefghijklmnopqrstuvwxyz .,'\n"
# The charlm bundle's apostrophe has a NaN embedding: a request whose prompt holds one fails inside the decoding
# step (the model's scores turn NaN), the way a broken model or a bug would, while every other request is fine.
FAULT_CHAR = "'"
WORDS = ["<pad>", "<unk>", "the", "movie", "was", "great", "awful", "plot", "and", "a"]


def small_model_settings(job: str) -> dict:
    """The model keys of the job's smoke preset, two layers where the model has them, and the keys the data
    decides (vocabulary size, feature count) set to 300."""
    config_class = JOBS[job].load("model_config")
    preset = load_config(job, "smoke")["model"]
    settings = {key: value for key, value in preset.items() if key in config_class.model_fields}
    if "num_layers" in config_class.model_fields:
        settings |= {"num_layers": 2, "dropout": 0.2}
    return settings | {name: 300 for name, field in config_class.model_fields.items()
                       if field.is_required() and name not in settings}


def make_bundles(directory: Path) -> Path:
    """A tiny bundle of every served job. rnnlab's own jobs' come from randomly initialised models (the service
    never needs a trained one) with the contents the service tests lean on: their names, metrics, vocabularies,
    charlm's one faulty character and the forecasters' example requests. Any other job's is trained from its smoke preset on the tiny stand-in of its
    data set (tests/tiny_datasets.py), so a job added to the registry is served by every service test as it is."""
    import numpy as np

    torch.manual_seed(0)
    rng = np.random.default_rng(0)  # the scalers' draws
    for job in served():
        HAND_MADE.get(job, _smoke_trained)(directory, job, rng)
    return directory


def _sentiment(directory: Path, job: str, rng) -> None:
    from rnnlab.bundle import save_bundle
    from rnnlab.data.vocab import Vocab
    from rnnlab.models import build_model

    vocab = Vocab(WORDS, unk_index=1)
    save_bundle(directory / "imdb-small", job=job,
                model=build_model(job, {"vocab_size": len(vocab), "embed_dim": 8, "hidden_size": 8, "fc_size": 8}),
                assets={"vocab": vocab.to_json()}, metrics={"test": {"accuracy": 0.5}}, config={"job": job})


def _stock(directory: Path, job: str, rng) -> None:
    from rnnlab.bundle import save_bundle
    from rnnlab.data.stock import FEATURE_NAMES, Scaler
    from rnnlab.models import build_model

    scaler = Scaler.fit(rng.normal(size=(32, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))
    target_scaler = Scaler.fit(rng.normal(1000, 50, size=(32, 1)), columns=["close"])
    save_bundle(directory / "djia-small", job=job,
                model=build_model(job, {"num_features": len(FEATURE_NAMES), "hidden_size": 4, "num_layers": 1,
                                        "fc_size": 4}),
                assets={"scaler": scaler.to_json(), "target_scaler": target_scaler.to_json()},
                metrics={"test": {"r2": 0.0}}, config={"job": job, "data": {"window": 5, "target": "close"}},
                example=_example(5))


def _charlm(directory: Path, job: str, rng) -> None:
    from rnnlab.bundle import save_bundle
    from rnnlab.data.vocab import Vocab
    from rnnlab.models import build_model

    charlm = build_model(job, {"vocab_size": len(CHARS), "embed_dim": 8, "hidden_size": 32})
    with torch.no_grad():  # a model fault only an apostrophe in a prompt reaches (see FAULT_CHAR)
        charlm.embedding.weight[CHARS.index(FAULT_CHAR)] = float("nan")
        charlm.output.bias[CHARS.index(FAULT_CHAR)] = float("-inf")  # never sampled, so no other text reaches it
    save_bundle(directory / "wp-small", job=job, model=charlm, assets={"vocab": Vocab(list(CHARS)).to_json()},
                metrics={"val": {"nats_per_char": 3.4}}, config={"job": job, "data": {"lowercase": True}})


def _horizon(directory: Path, job: str, rng) -> None:
    from rnnlab.bundle import save_bundle
    from rnnlab.data.horizon import FEATURE_SETS
    from rnnlab.data.stock import Scaler
    from rnnlab.models import build_model

    names = FEATURE_SETS["scale_free"]
    save_bundle(directory / "ndx-horizon", job=job,
                model=build_model(job, {"num_features": len(names), "hidden_size": 4, "fc_size": 4}),
                assets={"scaler": Scaler.fit(rng.normal(size=(32, len(names))), columns=list(names)).to_json(),
                        "target_scaler": Scaler.fit(rng.normal(size=(32, 5)), columns=[f"h{h}" for h in range(1, 6)]
                                                    ).to_json()},
                metrics={"test": {"crps": 0.0}}, config={"job": job, "data": {"window": 21}},
                example=_example(21))


def _example(window: int) -> dict:
    """The example request training keeps in a forecaster's bundle: the last rows of a fixture price file."""
    import tempfile

    from tiny_datasets import make_stock_csv
    from rnnlab.data.stock import example_request

    with tempfile.TemporaryDirectory() as prices:
        return example_request(make_stock_csv(Path(prices)), window)


def _smoke_trained(directory: Path, job: str, rng) -> None:
    """A smoke run of ``job`` on its tiny data, served from its run folder as model ``job``."""
    from tiny_datasets import MAKERS, smoke_config
    from rnnlab.trainers.loop import train

    data_set = JOBS[job].data_set
    assert data_set in MAKERS, f"the served job {job} trains on {data_set}, which has no tiny stand-in in " \
                               "tests/tiny_datasets.py's MAKERS; add one there"
    data = directory.parent / f"{directory.name}-{job}-data"
    data.mkdir(exist_ok=True)
    train(smoke_config(job, MAKERS[data_set](data)), directory / job)


# rnnlab's jobs: the bundles the service tests are written against (by name, vocabulary and fault)
HAND_MADE = {"sentiment": _sentiment, "stock": _stock, "charlm": _charlm, "horizon": _horizon}
