"""Shared fixtures and helpers: the data mirror, an isolated cache per test session, a running service over tiny
bundles, and what a missing requirement does (skip on a laptop, fail under CI=true)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every Ray the tests start (local instances, the two-node cluster, `rnnlab serve`/`swap` subprocesses) runs in one
# authentication mode: Ray 2.60 turns token auth on for the first local ray.init() and leaves RAY_AUTH_MODE=token in
# this process's environment, and a two-node cluster started after that hung its driver's connect. Loopback only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """End the test process with pytest's exit status once pytest has written everything, skipping the
    interpreter's finalization: after all 658 tests had passed, one CI run of the suite died there with
    "Segmentation fault" (native teardown of the libraries the process loaded -- Ray's driver, ONNX Runtime,
    torch -- not reproduced in the next run with faulthandler on), and its exit status turned CI red for a
    crash no test or user sees. A Ray this process still holds is shut down first (its atexit hook would have)."""
    status = config.stash.get(EXIT_STATUS, None)
    if status is None:  # pytest ended before its session did (a usage error): let it exit its own way
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def in_ci() -> bool:
    """CI sets CI=true (.ci/run does, as GitHub Actions and most CI services do)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str):
    """Skip, saying why; under CI=true fail instead: there the data mirror and every dependency the package and
    its test extra declare must be present, and a skip would turn a test green that never ran."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this is required in CI, so the test fails rather than skips)",
                    pytrace=False)
    pytest.skip(reason)


def require(module: str, reason: str | None = None):
    """``pytest.importorskip`` for a required dependency (ray, schemathesis, selenium): fails under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        skip_or_fail(reason or f"{module} is not installed ({error})")


@contextlib.contextmanager
def serving(options: dict, *, http_options: dict | None = None, from_config: bool = False,
            **ray_init) -> Iterator[str]:
    """A local Ray instance (2 CPUs) serving ``build_app(options)`` at 127.0.0.1 on a free port: yields the base
    URL, and stops Serve and Ray after. ``ray_init`` goes to ``ray.init`` (e.g. a metrics export port).
    ``from_config``: deployed from a config as ``rnnlab serve`` does (``options`` are its args), so
    ``rnnlab.serve.versions.swap`` swaps its models in place, from this process."""
    require("ray")
    from rnnlab.serve.local import deploy, in_process
    from rnnlab.serve.service import deploy_config

    with in_process(http_options=http_options, **ray_init) as base:
        if from_config:
            port = int(base.rsplit(":", 1)[1])
            deploy_config(options, port, "127.0.0.1", (http_options or {}).get("request_timeout_s"))
        else:
            deploy(options)
        yield base


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """A tiny bundle of every served job (tiny_models.make_bundles), for a module's service."""
    from tiny_models import make_bundles

    return make_bundles(tmp_path_factory.mktemp("bundles"))


def _mirror_path() -> Path | None:
    named = os.environ.get("RNNLAB_DATA_MIRROR")
    candidate = Path(named) if named else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The data mirror folder; tests that need the real data skip when there is none (fail under CI=true)."""
    path = _mirror_path()
    if path is None:
        skip_or_fail("no data mirror (set RNNLAB_DATA_MIRROR or provide ../shared/data)")
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
