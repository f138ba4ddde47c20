"""Tiny stand-ins for the three data sets, built in a test's tmp_path, and the smoke config of any registered job
over them: what the tests that loop over every job (the registry's) train on."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from rnnlab.config import load_config
from rnnlab.registry import JOBS

_POSITIVE = ["great", "wonderful", "loved", "superb", "brilliant", "fun", "moving", "best"]
_NEGATIVE = ["awful", "boring", "hated", "terrible", "dull", "worst", "waste", "bad"]
_FILLER = ["the", "movie", "film", "plot", "actor", "was", "and", "a", "it", "this", "story", "scene"]


def make_imdb_tar(directory: Path, per_class: int = 40, seed: int = 0, unsup: int = 0) -> Path:
    """An aclImdb_v1.tar.gz-shaped archive: train/test x pos/neg, reviews whose words give away the label, and
    ``unsup`` unlabelled reviews in train/unsup."""
    rng = np.random.default_rng(seed)
    path = Path(directory) / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for split in ("train", "test"):
            for label, words in (("pos", _POSITIVE), ("neg", _NEGATIVE)):
                for i in range(per_class):
                    n = int(rng.integers(5, 40))
                    tokens = [str(rng.choice(_FILLER if rng.random() < 0.6 else words)) for _ in range(n)]
                    text = " ".join(tokens).capitalize() + ". <br /><br />" + str(rng.choice(words)) + "!"
                    rating = int(rng.integers(7, 11)) if label == "pos" else int(rng.integers(1, 5))
                    data = text.encode("utf-8")
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{rating}.txt")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        for i in range(unsup):
            words = _POSITIVE if i % 2 else _NEGATIVE
            data = " ".join(str(rng.choice(_FILLER if rng.random() < 0.6 else words)) for _ in range(20)).encode()
            info = tarfile.TarInfo(f"aclImdb/train/unsup/{i}_0.txt")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def make_stock_csv(directory: Path, start: str = "2019-01-01", end: str = "2023-06-30", seed: int = 0) -> Path:
    """A Yahoo-layout daily CSV with a random-walk price, long enough for the 252-day features and the
    default date split (train to 2022-12-31, test 2023-01-01..2023-06-30)."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range(start, end)
    close = 1000 * np.exp(np.cumsum(rng.normal(0, 0.01, len(dates))))
    open_ = close * np.exp(rng.normal(0, 0.004, len(dates)))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.003, len(dates))))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.003, len(dates))))
    volume = rng.integers(1_000_000, 5_000_000, len(dates))
    frame = pd.DataFrame({"Date": dates.strftime("%Y-%m-%d"), "Open": open_, "High": high, "Low": low,
                          "Close": close, "Adj Close": close, "Volume": volume})
    path = Path(directory) / "prices.csv"
    frame.to_csv(path, index=False)
    return path


def make_text(directory: Path, characters: int = 30_000, seed: int = 0) -> Path:
    """A UTF-8 text of simple repeated sentences (so a tiny model learns something)."""
    rng = np.random.default_rng(seed)
    words = ["the", "emperor", "and", "prince", "andrew", "said", "to", "natasha", "in", "moscow", "war", "peace"]
    out, size = [], 0
    while size < characters:
        sentence = " ".join(rng.choice(words, size=int(rng.integers(4, 10)))).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    path = Path(directory) / "text.txt"
    path.write_text("".join(out)[:characters], encoding="utf-8")
    return path


# data set (the registry's ``data_set``) -> its tiny stand-in; a job whose data set has none here is left out of the
# loops over every job (lm trains on the labelled and the unlabelled reviews)
MAKERS = {"imdb": lambda folder: make_imdb_tar(folder, unsup=60), "stock": make_stock_csv, "text": make_text}


def tiny_sources(directory: Path) -> dict[str, Path]:
    """Every registered job whose data set has a tiny stand-in -> that stand-in (one file per data set)."""
    made = {data_set: make(directory) for data_set, make in MAKERS.items()}
    return {name: made[spec.data_set] for name, spec in JOBS.items() if spec.data_set in made}


def smoke_config(job: str, source: Path, *overrides: str) -> dict:
    """The job's smoke preset over ``source``, W&B off, then ``overrides``."""
    return load_config(job, "smoke", overrides=[f"data.source={source}", "tracking.wandb=false", *overrides])
