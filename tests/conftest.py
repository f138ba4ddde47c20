"""Shared fixtures: the data mirror (skipped when absent) and an isolated cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _mirror_path() -> Path | None:
    named = os.environ.get("RNNLAB_DATA_MIRROR")
    candidate = Path(named) if named else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The data mirror folder; tests that need the real data skip when there is none."""
    path = _mirror_path()
    if path is None:
        pytest.skip("no data mirror (set RNNLAB_DATA_MIRROR or provide ../shared/data)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own download/token cache, so tests never depend on a user's ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "rnnlab-cache"
    monkeypatch.setenv("RNNLAB_CACHE_DIR", str(cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: a second OpenMP thread costs more than it saves, and on a busy 2-core machine two threads
    thrash (steps 10x slower). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stock_setup(tmp_path_factory):
    """A tiny stock bundle (random weights, hidden 4) over a fixture CSV: (bundle path, csv, StockData, model)."""
    from tiny_datasets import make_stock_csv
    from rnnlab.bundle import save_bundle
    from rnnlab.data.stock import load_stock_data
    from rnnlab.models import build_model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("stock")
    csv = make_stock_csv(directory)
    data = load_stock_data(csv, window=5, target="log_return", train_end="2022-06-30", test_start="2022-07-01",
                           test_end="2023-06-30", val_days=50)
    model = build_model("stock", {"num_features": data.num_features, "hidden_size": 4})
    path = save_bundle(directory / "bundle", job="stock", model=model, metrics={},
                       assets={"scaler": data.scaler.to_json(), "target_scaler": data.target_scaler.to_json()},
                       config={"job": "stock", "data": {"window": 5, "target": "log_return"}})
    return path, csv, data, model
