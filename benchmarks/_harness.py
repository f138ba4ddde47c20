"""Shared by the serving benchmarks: request bodies (real reviews and price rows from the data mirror), chapter-sized
bundles of randomly initialised models, deploying the service in-process, and what one request came to. Starting
and stopping a service is rnnlab.serve.local's (the demo and the tests use it too)."""

from __future__ import annotations

import os
import random
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("RNNLAB_DATA_MIRROR") or REPO.parent / "shared" / "data")


def repo_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH: the processes a benchmark starts (`rnnlab serve`,
    a swapper) import this checkout's rnnlab."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


# --- request bodies --------------------------------------------------------------------------------------------
def imdb_reviews(limit: int = 512) -> list[str]:
    archive = MIRROR / "aclImdb_v1.tar.gz"
    if archive.is_file():
        texts = []
        with tarfile.open(archive, "r:gz") as tar:  # the test split comes first in the archive: stop early
            for member in tar:
                if member.name.startswith("aclImdb/test/") and member.name.endswith(".txt") and member.isfile():
                    texts.append(tar.extractfile(member).read().decode("utf-8"))
                    if len(texts) == limit:
                        break
        if texts:
            return texts
    rng = random.Random(0)
    words = "the a film movie good bad great plot acting story was is and but not very really one".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(50, 500))) for _ in range(limit)]


def price_rows(count: int = 300) -> list[dict]:
    csv = MIRROR / "19900101_20230630.csv"
    if csv.is_file():
        import pandas as pd

        frame = pd.read_csv(csv).tail(count)
        return [{"date": r.Date, "open": r.Open, "high": r.High, "low": r.Low, "close": r.Close,
                 "volume": float(r.Volume)} for r in frame.itertuples()]
    return synthetic_rows(count)


def synthetic_rows(count: int, seed: int = 0) -> list[dict]:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, count)))
    open_ = close * np.exp(rng.normal(0, 0.003, count))
    dates = pd.bdate_range("2020-01-01", periods=count)
    return [{"date": d.date().isoformat(), "open": float(o), "high": float(max(o, c) * 1.005),
             "low": float(min(o, c) * 0.995), "close": float(c), "volume": float(rng.integers(1e6, 1e7))}
            for d, o, c in zip(dates, open_, close)]


# --- the service -------------------------------------------------------------------------------------------------
def random_bundles(directory: Path, preset: str = "chapter", seed: int = 0, jobs: Iterable[str] | None = None) -> Path:
    """A bundle of every served job (the registry's; or of ``jobs``) under ``directory/<job>``, its model built at
    ``preset``'s size and randomly initialised: the compute of a trained one, in seconds. The job's own data (the
    mirror, else the download cache) gives the vocabulary or scalers, as training would. Another ``seed``, other
    weights: another version of the same models (benchmarks/serve_swap.py)."""
    import torch

    from rnnlab.bundle import save_bundle
    from rnnlab.config import load_config
    from rnnlab.registry import served
    from rnnlab.trainers.job import make_job

    for name in jobs or served():
        job = make_job(load_config(name, preset))
        job.load_data()
        torch.manual_seed(seed)
        save_bundle(directory / name, job=name, model=job.build_model(), assets=job.assets(), metrics={},
                    config=job.config.to_dict())
    return directory


def deploy(bundles: Path, max_batch_size: int | None = None, batch_wait_timeout_s: float | None = None,
           **options) -> None:
    """The service over ``bundles`` into the in-process Serve (rnnlab.serve.local.in_process): batching, limits
    and other ``build_app`` arguments (replicas, runtime) where given, else the service's defaults. Deploying again
    restarts every replica."""
    from rnnlab.serve.local import deploy as deploy_app

    args = {"bundles": str(bundles), **options}
    if max_batch_size is not None:
        args["max_batch_size"] = max_batch_size
    if batch_wait_timeout_s is not None:
        args["batch_wait_timeout_s"] = batch_wait_timeout_s
    deploy_app(args)


# --- what one request came to ------------------------------------------------------------------------------------
def stream_outcome(last_event: str | None) -> str:
    """A /v1/generate stream's outcome from its last ``event:``: "ok" for done, else what went wrong."""
    return {"done": "ok", "error": "sse error"}.get(last_event, "stream cut")


async def post_outcome(http, url: str, body: dict, *, stream: bool, timeout: float, headers: dict | None = None,
                       answered: Callable[[dict], bool] | None = None, timeout_outcome: str = "timeout") -> str:
    """What one POST to the service came to: "ok"; "http N" for a refusal; a stream's ``stream_outcome``; "empty
    answer" when ``answered(body)`` is false; ``timeout_outcome`` past ``timeout`` s; "connection <error>"."""
    import asyncio

    import aiohttp

    async def send() -> str:
        async with http.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                await response.read()
                return f"http {response.status}"
            if not stream:
                payload = await response.json() if answered else await response.read()
                return "ok" if answered is None or answered(payload) else "empty answer"
            last_event = None
            async for line in response.content:
                if line.startswith(b"event: "):
                    last_event = line[7:].strip().decode()
            return stream_outcome(last_event)

    try:
        return await asyncio.wait_for(send(), timeout)
    except asyncio.TimeoutError:
        return timeout_outcome
    except aiohttp.ClientError as error:
        return f"connection {type(error).__name__}"
