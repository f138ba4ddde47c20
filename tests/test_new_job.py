"""A job from another package, proven: tests/newjob (where sentences end in a text) is registered the way a user
registers theirs, ``RNNLAB_JOBS=newjob:SPEC``, with no file of rnnlab touched; then trained, loaded, scored, served
beside rnnlab's jobs and searched with Ray Tune, each through the ``rnnlab`` command in a process of its own, which
finds the job by importing the registry afresh (as Serve's replicas and Tune's trials do: they inherit the
variable). Everything is written under tmp_path and the checkout is left as it was."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tiny_datasets import make_text
from tiny_models import make_bundles
from rnnlab import registry
from rnnlab.config import load_config
from rnnlab.errors import ConfigError, InputError
from rnnlab.serve.local import LocalService

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
HOOK = "newjob:SPEC"
JOB = "sentence_end"


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=TESTS, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module", autouse=True)
def checkout_left_as_it_was():
    before = git_status()
    yield
    assert git_status() == before, "the new job's tests left files in the checkout"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """What a user's shell has: the hook, and the job's package on the path (nothing else names it)."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "RNNLAB_JOBS": HOOK, "PYTHONPATH": path, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "RNNLAB_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


def rnnlab(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnlab.launch.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture()
def registered(monkeypatch):
    """This process's registry with the job in it, as RNNLAB_JOBS gives it to a process that starts with it."""
    for spec in registry.plugged_in(HOOK):
        monkeypatch.setitem(registry.JOBS, spec.name, spec)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return make_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def trained(env, text, tmp_path_factory) -> Path:
    """``rnnlab train sentence_end --preset smoke`` on the tiny text: its bundle."""
    folder = tmp_path_factory.mktemp("train")
    result = rnnlab(env, folder, "train", JOB, "--preset", "smoke", "--source", str(text), "--output",
                    str(folder / "run"), "--set", "tracking.wandb=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run" / "bundle"


def test_the_cli_trains_it_and_its_bundle_answers(trained, registered):
    from rnnlab.bundle import load_bundle
    from rnnlab.inference import load_predictor

    bundle = load_bundle(trained)
    assert bundle.job == JOB and set(bundle.metrics["test"]) >= set(registry.job(JOB).metrics)
    predictor = load_predictor(trained)
    answers = predictor.predict(["and prince andrew said to natasha", "the emperor  "])
    assert [set(a) for a in answers] == [{"ends_sentence", "probability"}] * 2
    assert all(0 < a["probability"] < 1 and a["ends_sentence"] == (a["probability"] >= 0.5) for a in answers)
    with pytest.raises(InputError, match=r"^Text 1: The text must end with a word") as refused:
        predictor.predict(["the emperor", "he said."])
    assert str(refused.value).count(". ") == 0


def test_rnnlab_evaluate_scores_any_text_with_it(env, trained, text, tmp_path):
    result = rnnlab(env, tmp_path, "evaluate", str(trained), "--data", str(text), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout)
    window = json.loads((trained / "config.json").read_text())["config"]["data"]["window"]
    book = text.read_text().lower()
    words = [m.end() for m in re.finditer(r"[^\W\d_]+", book) if window <= m.end() < len(book)]
    assert scores["job"] == JOB and scores["word_ends"] == len(words)  # every word end after the first window
    assert scores["sentence_ends"] == sum(book[end] in ".!?" for end in words)
    assert scores["unknown_characters"] == 0 and 0 <= scores["f1"] <= 1 and scores["loss"] > 0
    assert scores["baseline_accuracy"] == pytest.approx(1 - scores["sentence_ends"] / scores["word_ends"])


def test_the_service_serves_it_beside_rnnlabs_jobs(env, trained, registered, tmp_path):
    """make_bundles follows the registry (it trains a sentence_end bundle of its own for a job it has no hand-made
    bundle for); the CLI's bundle is served beside it as a second model of the job."""
    from rnnlab.inference import load_predictor

    bundles = make_bundles(tmp_path / "bundles")
    shutil.copytree(trained, bundles / "wp-sentence-end")
    texts = ["and prince andrew said to natasha", "natasha"]
    with LocalService(bundles, env=env) as service, httpx.Client(base_url=service.url, timeout=120) as http:
        assert sorted(http.get("/healthz").json()["serving"]) == sorted(registry.served())
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"] if m["endpoint"] == f"/v1/{JOB}"}
        assert set(models) == {JOB, "wp-sentence-end"}
        answer = http.post(f"/v1/{JOB}", json={"texts": texts, "model": "wp-sentence-end"})
        assert answer.status_code == 200, answer.text
        refused = http.post(f"/v1/{JOB}", json={"texts": ["the emperor", "he said."]})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "texts", 1]
        assert http.post("/v1/sentiment", json={"texts": ["a fine film"]}).status_code == 200
    assert answer.json()["model"].startswith("wp-sentence-end@")
    expected = load_predictor(trained).predict(texts)
    for served, local in zip(answer.json()["results"], expected, strict=True):
        assert served["probability"] == pytest.approx(local["probability"], abs=1e-6)


def test_a_two_trial_search_tunes_it(env, text, tmp_path, registered):
    from rnnlab.bundle import load_bundle

    result = rnnlab(env, tmp_path, "tune", JOB, "--preset", "smoke", "--num-samples", "2", "--max-epochs", "1",
                    "--scheduler", "fifo", "--num-cpus", "2", "--source", str(text), "--output",
                    str(tmp_path / "search"), "--name", "newjob", "--quiet")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with open(tmp_path / "search" / "results.csv", newline="") as rows:
        trials = list(csv.DictReader(rows))
    assert [trial["status"] for trial in trials] == ["completed", "completed"]
    assert {trial["model.cell"] for trial in trials} <= {"lstm", "gru", "rnn"}  # the job's own space was searched
    assert load_bundle(tmp_path / "search" / "best_bundle").job == JOB


def test_an_installed_packages_entry_point_adds_it_too(env, tmp_path):
    """The other hook: a package installed with an entry point in the group rnnlab.jobs (a dist-info folder on the
    path is what pip leaves), no RNNLAB_JOBS."""
    dist = tmp_path / "newjob-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: newjob\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{JOB} = {HOOK}\n")
    plain = {key: value for key, value in env.items() if key != "RNNLAB_JOBS"}
    plain["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = rnnlab(plain, tmp_path, "train", "--help")
    assert result.returncode == 0 and f"horizon,{JOB}}}" in result.stdout, result.stdout + result.stderr


def test_a_job_that_cannot_load_is_one_sentence_saying_what_to_fix(env, tmp_path):
    result = rnnlab({**env, "RNNLAB_JOBS": "newjob:SPECS"}, tmp_path, "--help")
    assert result.returncode == 2 and result.stderr == ("rnnlab: RNNLAB_JOBS names 'newjob:SPECS', but module newjob "
                                                        "has no 'SPECS'; fix the name after the colon.\n")
    faults = {"newjob": "write it as module:attribute", "no_such_package:SPEC": "put its folder on PYTHONPATH",
              "newjob:Path": "not a rnnlab.registry.JobSpec"}
    for hook, fix in faults.items():
        with pytest.raises(ConfigError, match=fix) as refused:
            registry.plugged_in(hook)
        assert str(refused.value).count(". ") == 0, refused.value
    spec = registry.plugged_in(HOOK)[0]
    with pytest.raises(ConfigError, match="'stock', which job 'stock' has already; give it another name"):
        registry.add([dataclasses.replace(spec, name="stock")], registry.JOBS)
    with pytest.raises(ConfigError, match="'generate', which job 'charlm' has already"):  # charlm's older route
        registry.add([dataclasses.replace(spec, name="generate")], registry.JOBS)
    with pytest.raises(ConfigError, match="lowercase letters, digits and '_'"):
        dataclasses.replace(spec, name="sentence-end")


def test_a_preset_file_without_a_required_preset_says_which_and_what_needs_it(tmp_path, monkeypatch):
    spec = dataclasses.replace(registry.plugged_in(HOOK)[0], configs_dir=tmp_path)
    monkeypatch.setitem(registry.JOBS, JOB, spec)
    with pytest.raises(ConfigError, match="write one with the sections default, smoke, demo"):
        load_config(JOB, "smoke")
    spec.presets_file.parent.mkdir()
    spec.presets_file.write_text("default:\n  train: {epochs: 1}\nsmoke:\n  train: {epochs: 1}\n")
    assert load_config(JOB, "smoke")["train"]["epochs"] == 1
    with pytest.raises(ConfigError) as refused:
        load_config(JOB, "demo")
    message = str(refused.value)
    assert "no 'demo' preset" in message and "make demo" in message and message.count(". ") == 0, message
