"""Shared fixtures: the data mirror (skipped when absent) and an isolated cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
