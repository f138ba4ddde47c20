"""Several bundles per job and swapping one in place (rnnlab/serve/versions.py).

Without Ray: model ids and defaults from a bundles folder, and a deployment's model set swapping (a bad bundle
leaves the old one serving). With Ray (slow, one `rnnlab serve` in a subprocess): every bundle served under its
id, `model` choosing one, /v1/models listing all, `rnnlab swap` refusing bad bundles in one sentence, and a short
version of benchmarks/serve_swap.py (clients while both ids are swapped) with zero failed requests.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tiny_models import make_bundles


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """imdb-small, djia-small, wp-small (test_serve's) plus a second sentiment model, imdb-b, and a run folder
    runs-c/bundle (a third one, served as runs-c)."""
    root = make_bundles(tmp_path_factory.mktemp("bundles"))
    shutil.copytree(root / "imdb-small", root / "imdb-b")
    (root / "runs-c").mkdir()
    shutil.copytree(root / "imdb-small", root / "runs-c" / "bundle")
    return root


def test_every_bundle_is_served_under_its_folder_name_and_the_first_is_the_default(bundles):
    from rnnlab.errors import BundleError, ConfigError
    from rnnlab.serve.bundles import check_defaults, default_model, find_bundles, find_models

    found = find_models(bundles)
    assert list(found["sentiment"]) == ["imdb-b", "imdb-small", "runs-c"]  # name order; a run folder by its name
    assert list(found["stock"]) == ["djia-small"] and list(found["charlm"]) == ["wp-small"]
    assert found["sentiment"]["runs-c"] == bundles / "runs-c" / "bundle"
    assert default_model("sentiment", found["sentiment"]) == "imdb-b"
    assert default_model("sentiment", found["sentiment"], ["imdb-small", "wp-small"]) == "imdb-small"
    assert find_bundles(bundles, defaults=["runs-c"])["sentiment"] == bundles / "runs-c" / "bundle"
    with pytest.raises(ConfigError, match="two sentiment models"):
        default_model("sentiment", found["sentiment"], ["imdb-b", "runs-c"])
    with pytest.raises(ConfigError, match="not a served model"):
        check_defaults(found, ["nope"])
    other = bundles.parent / "elsewhere" / "imdb-b"
    shutil.copytree(bundles / "imdb-b", other)
    with pytest.raises(BundleError, match="served as model 'imdb-b'"):
        find_models(bundles, explicit={"sentiment": other})


def _fake_loader(loaded: list):
    def load(path: str):
        if "bad" in path:
            from rnnlab.errors import BundleError

            raise BundleError(f"Bundle {path} was edited after export (model.safetensors checksum differs).")
        loaded.append(path)
        return f"predictor:{path}", {"version": Path(path).name, "job": "sentiment"}

    return load


def test_a_model_set_swaps_one_id_and_keeps_the_old_model_when_the_new_bundle_is_bad():
    from rnnlab.serve.versions import ModelSet, UnknownModel

    loaded = []
    models = ModelSet("sentiment", {"a": "/m/a1", "b": "/m/b1"}, "b", _fake_loader(loaded))
    assert models.pick(None)[0] == "predictor:/m/b1" and models.pick("a")[1]["id"] == "a"
    with pytest.raises(UnknownModel, match="use one of a, b"):
        models.pick("c")
    old = models.pick("a")
    assert asyncio.run(models.update({"a": "/m/a2", "b": "/m/b1"})) == ["a"]  # b unchanged: not reloaded
    assert loaded == ["/m/a1", "/m/b1", "/m/a2"]
    assert models.pick("a")[1]["version"] == "a2" and old[1]["version"] == "a1"  # a batch holding `old` finishes on it
    assert asyncio.run(models.update({"a": "/m/bad"})) == []
    assert models.pick("a")[1]["version"] == "a2"  # still serving
    described = {info["id"]: info for info in models.describe()}
    assert "checksum differs" in described["a"]["swap_error"] and "keeps serving version a2" in described["a"]["swap_error"]
    assert described["b"]["default"] and not described["a"]["default"] and "swap_error" not in described["b"]
    assert asyncio.run(models.update({"z": "/m/z"})) == [] and "not a model this deployment serves" in models.errors["z"]
    assert asyncio.run(models.update({"a": "/m/a3"})) == ["a"] and "a" not in models.errors  # a good one clears it


def test_swap_refuses_a_bad_bundle_before_asking_ray(bundles, tmp_path):
    from rnnlab.errors import BundleError
    from rnnlab.serve.versions import check_new_bundle

    tampered = tmp_path / "tampered"
    shutil.copytree(bundles / "imdb-small", tampered)
    with open(tampered / "model.safetensors", "r+b") as weights:
        weights.seek(-4, 2)
        weights.write(b"\0\0\0\0")
    for bundle, words in [(tampered, "model.safetensors"), (bundles / "wp-small", "charlm bundle"),
                          (tmp_path / "missing", "does not exist")]:
        with pytest.raises(BundleError, match=words) as refused:
            check_new_bundle(bundle, "sentiment")
        assert "\n" not in str(refused.value)


# --- a running service: rnnlab serve in a subprocess ---------------------------------------------------------------
def _other_version(source: Path, target: Path, seed: int) -> Path:
    """The bundle at ``source`` with its weights nudged: the same model, another version (another digest)."""
    import torch

    from rnnlab.bundle import load_bundle, save_bundle

    bundle = load_bundle(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            finite = torch.isfinite(parameter)
            parameter[finite] += 0.01 * torch.randn(parameter.shape, generator=generator)[finite]
    return save_bundle(target, job=bundle.job, model=bundle.model, assets=bundle.assets, metrics=bundle.metrics,
                       config=bundle.config)


@pytest.mark.slow
def test_served_versions_are_chosen_by_model_and_swapped_under_load_with_no_failed_request(bundles, tmp_path):
    import os
    import subprocess
    import sys
    import tempfile

    import httpx

    from benchmarks.serve_swap import run_load, summarize
    from rnnlab.serve.local import LocalService

    served = tmp_path / "served"
    shutil.copytree(bundles, served)
    shutil.rmtree(served / "imdb-b")
    _other_version(bundles / "imdb-small", served / "imdb-b", seed=1)  # a second sentiment model, its own weights
    versions = {"imdb-small": [served / "imdb-small", _other_version(bundles / "imdb-small", tmp_path / "v2" / "imdb",
                                                                     seed=2)],
                "wp-small": [served / "wp-small", _other_version(bundles / "wp-small", tmp_path / "v2" / "wp", seed=3)]}
    ray_tmp = tempfile.mkdtemp(prefix="rv-", dir="/tmp")  # short: Ray's socket paths live under it
    # a Ray of its own, in the suite's one authentication mode (conftest), which the swapping process shares
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_AUTH_MODE"} | {
        "RAY_TMPDIR": ray_tmp}
    service = LocalService(served, ["--default-model", "imdb-small"], env=env, kill_after_s=600)  # a hang fails
    base = service.url
    try:
        ready = service.start()
        address = service.ray_address
        assert "/v1/sentiment (imdb-b, imdb-small, runs-c; default imdb-small)" in ready

        # every bundle under its id; `model` picks one; the default answers without it; an unknown id is a 404
        listed = {m["id"]: m for m in httpx.get(f"{base}/v1/models", timeout=60).json()["data"]}
        assert set(listed) == {"imdb-b", "imdb-small", "runs-c", "djia-small", "wp-small", "ndx-horizon"}
        assert [m for m in listed if listed[m]["default"]] == ["imdb-small", "djia-small", "wp-small", "ndx-horizon"]
        assert listed["imdb-b"]["version"] != listed["imdb-small"]["version"]
        for model, expected in [(None, "imdb-small"), ("imdb-b", "imdb-b"), ("runs-c", "runs-c")]:
            body = {"texts": ["a fine film", "a dull one"]} | ({"model": model} if model else {})
            answer = httpx.post(f"{base}/v1/sentiment", json=body, timeout=60)
            assert answer.status_code == 200 and answer.json()["model"] == f"{expected}@{listed[expected]['version']}"
        unknown = httpx.post(f"{base}/v1/sentiment", json={"texts": ["a film"], "model": "nope"}, timeout=60)
        assert unknown.status_code == 404 and unknown.json()["detail"][0]["loc"] == ["body", "model"]
        unknown = httpx.post(f"{base}/v1/charlm", json={"prompt": "the", "model": "imdb-b"}, timeout=60)
        assert unknown.status_code == 404 and "wp-small" in unknown.json()["detail"][0]["msg"]

        # a bad bundle is refused in one sentence and the old one keeps serving
        tampered = tmp_path / "tampered"
        shutil.copytree(versions["imdb-small"][1], tampered)
        (tampered / "metrics.json").write_text('{"test": {"accuracy": 0.99}}')
        for bundle, words in [(tampered, "metrics.json"), (served / "wp-small", "charlm bundle"),
                              (tmp_path / "nowhere", "does not exist")]:
            refused = subprocess.run([sys.executable, "-m", "rnnlab.launch.cli", "swap", "--address", address,
                                      "imdb-small", str(bundle)], env=env, capture_output=True, text=True,
                                     timeout=300)
            assert refused.returncode == 2 and words in refused.stderr, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        now = {m["id"]: m for m in httpx.get(f"{base}/v1/models", timeout=60).json()["data"]}
        assert now["imdb-small"]["version"] == listed["imdb-small"]["version"]

        # clients on both ids while each is swapped to its other version and back: no request fails
        records, swaps = run_load(base, address, versions, clients=8, seconds=24, every=7, timeout=60,
                                  reviews=["a fine film", "a dull and long one", "moving"],
                                  targets={"sentiment": "imdb-small", "stream": "wp-small"})
        report = summarize(records, swaps, 24)
        assert report["failed"] == 0, report["failures"][:5]
        assert len(swaps) >= 2 and all("error" not in done for _, _, done in swaps), swaps
        seen = {(kind, version) for _, _, kind, outcome, version in records if outcome == "ok"}
        for kind, model_id in [("sentiment", "imdb-small"), ("stream", "wp-small")]:
            assert {version for k, version in seen if k == kind} >= {swaps[0][2][model_id], swaps[1][2][model_id]}
    finally:
        service.stop()
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
