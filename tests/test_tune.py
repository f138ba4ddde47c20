"""rnnlab tune: search spaces and bad input (fast, no Ray), and real local Ray searches on a tiny price CSV (slow).

The Ray tests start a local Ray instance of 2 CPUs (this machine's size) without the dashboard, on the stock
job's smoke preset with a price CSV made in tmp_path: a trial trains in a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from rnnlab.config import load_config, validate
from rnnlab.errors import ConfigError
from rnnlab import registry
from rnnlab.registry import JOBS
from rnnlab.launch.cli import main
from rnnlab.tuning import SearchSettings, flatten_metrics, load_space, plan_search, run_search
from tiny_datasets import make_stock_csv
from wandb_files import read_finished_wandb_run

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


# --- search spaces (no Ray) ------------------------------------------------------------------------------


@pytest.mark.parametrize("job", JOBS)
def test_default_space_is_valid_for_every_preset(job, tmp_path):
    defaults = load_space(job)
    for preset in registry.job(job).presets():
        # a preset without a validation split (stock's chapter protocol) has nothing to rank trials by
        if not validate(load_config(job, preset)).has_validation_split:
            continue
        plan = plan_search(job, SearchSettings(num_cpus=2), preset=preset, output=tmp_path)
        keys = plan.space.params
        assert keys == defaults.params  # no preset changes the job's space
        (low, high), = keys["train.lr"].values()  # a single distribution: loguniform over a real range
        assert list(keys["train.lr"]) == ["loguniform"] and 0 < low < high <= 1
        assert {"train.batch_size", "model.hidden_size", "model.num_layers", "model.dropout"} <= set(keys)
        # the metric defaults to the monitor the loop picks its best checkpoint by
        assert plan.space.metric == f"val/{plan.base_config['train']['monitor']}"
        assert plan.base_config["train"]["eval_every"] == 0 and plan.base_config["train"]["epochs"] == 5
        # every key of the job's own space file is searched
        assert set(yaml.safe_load(registry.job(job).tune_space_file.read_text())["params"]) <= set(keys)


def test_user_space_merges_over_defaults(tmp_path):
    space = write_yaml(tmp_path / "space.yaml", {
        "metric": "val/r2", "params": {"train.lr": {"uniform": [0.001, 0.002]}, "data.window": None,
                                       "train.optimizer": "adamw"}})
    merged = load_space("stock", space)
    assert merged.params["train.lr"] == {"uniform": [0.001, 0.002]}  # replaced
    assert "data.window" not in merged.params  # removed with null
    assert "model.hidden_size" in merged.params  # kept from the defaults
    assert merged.searched_keys[0] == "train.lr" and "train.optimizer" not in merged.searched_keys
    only = load_space("stock", {"inherit": False, "params": {"train.lr": {"choice": [0.1]}}})
    assert list(only.params) == ["train.lr"]
    plan = plan_search("stock", SearchSettings(num_cpus=2), space=space, output=tmp_path)
    assert (plan.space.metric, plan.space.mode) == ("val/r2", "max")  # r2: higher is better


def test_space_becomes_tune_distributions_with_inclusive_integer_ends():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = load_space("stock", {"inherit": False, "params": {
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "model.num_layers": {"int": [1, 3]},
        "model.hidden_size": {"logint": [8, 64]}, "train.batch_size": {"choice": [32, 64]}}})
    tune_space = space.to_tune()
    assert isinstance(tune_space["train.lr"], Float) and isinstance(tune_space["train.batch_size"], Categorical)
    layers = tune_space["model.num_layers"]
    assert isinstance(layers, Integer) and (layers.lower, layers.upper) == (1, 4)  # Tune's upper end is exclusive
    assert {layers.sample() for _ in range(200)} == {1, 2, 3}


def test_flatten_metrics_keeps_numbers_under_slash_names():
    flat = flatten_metrics({"step": 8, "epoch": 1.0, "val": {"mae": 2.5, "loss": 1.0}, "monitor": "mae",
                            "best_value": None, "is_best": True})
    assert flat == {"step": 8, "epoch": 1.0, "val/mae": 2.5, "val/loss": 1.0, "is_best": 1}


BAD_INPUT = {
    "unknown job": (["tune", "weather"], "Unknown job 'weather'"),
    "empty space": (["tune", "stock", "--space", "{empty}"], "is empty"),
    "malformed space": (["tune", "stock", "--space", "{malformed}"], "not valid YAML"),
    "space not a mapping": (["tune", "stock", "--space", "{listing}"], "must be a mapping"),
    "missing space": (["tune", "stock", "--space", "{missing}"], "does not exist"),
    "unknown parameter": (["tune", "stock", "--space", "{unknown}"], "unknown parameter 'model.hiden_size'"),
    "unknown distribution": (["tune", "stock", "--space", "{baddist}"], "unknown distribution 'normal'"),
    "float range for an integer": (["tune", "stock", "--space", "{floatint}"], "whole number in the config"),
    "value the config refuses": (["tune", "stock", "--space", "{badvalue}"], "which the config refuses"),
    # model keys are checked like every other section: a dropout of 1.5 would fail inside a trial
    "model value out of range": (["tune", "stock", "--space", "{baddropout}"],
                                 "'model.dropout' can take 1.5, which the config refuses (model.dropout must be a "
                                 "number in [0, 1), not 1.5)"),
    "unknown metric": (["tune", "stock", "--space", "{badmetric}"], "report no metric 'val/accuracy'"),
    "reserved key": (["tune", "stock", "--space", "{reserved}"], "set by rnnlab tune itself"),
    "grid with optuna": (["tune", "stock", "--space", "{grid}", "--search", "optuna"], "optuna cannot"),
    "too many CPUs": (["tune", "stock", "--cpus-per-trial", "{too_many_cpus}"], "more than this machine's"),
    "GPUs the machine lacks": (["tune", "stock", "--gpus-per-trial", "{too_many_gpus}"], "{gpu_refusal}"),
    "1.5 GPUs": (["tune", "stock", "--gpus-per-trial", "1.5"], "neither a fraction"),
    "no samples": (["tune", "stock", "--num-samples", "0"], "--num-samples"),
    "resume of no search": (["tune", "stock", "--resume"], "holds no search to resume"),
    "no validation split": (["tune", "stock", "--preset", "chapter"], "holds none (data.val_days=0"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_sentence_before_ray_starts(case, tmp_path, capsys, monkeypatch):
    import ray
    import torch

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(ray, "init", no_ray)
    files = {
        "empty": write_yaml(tmp_path / "empty.yaml", "\n"),
        "malformed": write_yaml(tmp_path / "malformed.yaml", "params: {train.lr: [\n"),
        "listing": write_yaml(tmp_path / "listing.yaml", "- train.lr\n"),
        "missing": tmp_path / "nowhere.yaml",
        "unknown": write_yaml(tmp_path / "unknown.yaml", {"params": {"model.hiden_size": {"choice": [8]}}}),
        "baddist": write_yaml(tmp_path / "baddist.yaml", {"params": {"train.lr": {"normal": [0, 1]}}}),
        "floatint": write_yaml(tmp_path / "floatint.yaml", {"params": {"model.hidden_size": {"uniform": [4, 8]}}}),
        "badvalue": write_yaml(tmp_path / "badvalue.yaml", {"params": {"train.optimizer": {"choice": ["adam", "rmsprop"]}}}),
        "badmetric": write_yaml(tmp_path / "badmetric.yaml", {"metric": "val/accuracy", "params": {}}),
        "baddropout": write_yaml(tmp_path / "baddropout.yaml", {"params": {"model.dropout": {"uniform": [0, 1.5]}}}),
        "reserved": write_yaml(tmp_path / "reserved.yaml", {"params": {"train.epochs": {"int": [1, 3]}}}),
        "grid": write_yaml(tmp_path / "grid.yaml", {"params": {"train.lr": {"grid": [0.1, 0.01]}}}),
    }
    values = {**{k: str(v) for k, v in files.items()}, "too_many_cpus": str((os.cpu_count() or 1) + 1),
              "too_many_gpus": str(torch.cuda.device_count() + 1),
              "gpu_refusal": (f"is more than this machine's {torch.cuda.device_count()} GPUs" if torch.cuda.is_available()
                              else "asks for a GPU but this machine has none")}
    argv, expected = BAD_INPUT[case]
    argv = [arg.format(**values) for arg in argv] + ["--output", str(tmp_path / "out")]
    expected = expected.format(**values)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1 and err.endswith(".") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_search_is_not_overwritten(tmp_path):
    (tmp_path / "out" / "s1").mkdir(parents=True)
    plan = plan_search("stock", SearchSettings(num_cpus=2), output=tmp_path / "out", name="s1")
    with pytest.raises(ConfigError, match="already holds a search; pass --resume"):
        run_search(plan)


# --- real searches on a local Ray instance ---------------------------------------------------------------

# Trials 0 and 1 learn; trials 2 and 3 have a learning rate too small to move the weights. With 2 CPUs the
# first two run (and reach epoch 1) before the others start, so at ASHA's first rung (epoch 1, keep the top
# half) each tiny-lr trial is compared with a trial that learned, and is stopped.
ASHA_SPACE = {
    "inherit": False,
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "params": {"data.target": "log_return", "train.lr": {"grid": [0.03, 0.01, 1.0e-9, 1.0e-10]}},
}


@pytest.fixture
def prices(tmp_path):
    return make_stock_csv(tmp_path)


@pytest.mark.slow
def test_asha_search_stops_weak_trials_and_its_best_config_retrains(tmp_path, prices, capsys):
    space = write_yaml(tmp_path / "space.yaml", ASHA_SPACE)
    out = tmp_path / "search"
    started = time.perf_counter()
    code = main(["tune", "stock", "--preset", "smoke", "--source", str(prices), "--space", str(space),
                 "--num-samples", "1", "--max-epochs", "3", "--scheduler", "asha", "--cpus-per-trial", "1",
                 "--num-cpus", "2", "--output", str(out), "--name", "asha-test", "--quiet"])
    wall = time.perf_counter() - started
    printed = capsys.readouterr().out
    print(f"4-trial ASHA search wall time: {wall:.1f} s")
    assert code == 0
    # The wall time is a figure for the notes (about 25 s on a quiet 2-core box), not an assertion: a timed
    # test fails on a loaded machine. This bound only catches a hung search.
    assert wall < 900

    rows = {row["train.lr"]: row for row in _read_csv(out / "results.csv")}
    assert len(rows) == 4
    for tiny in ("1e-09", "1e-10"):
        assert rows[tiny]["status"] == "stopped early" and int(rows[tiny]["epochs"]) == 1
    assert rows["0.03"]["status"] == "completed" and int(rows["0.03"]["epochs"]) == 3
    assert rows["0.03"]["best"] == "1"
    # the table on the terminal: trial, the searched params, the metric, epochs run, status
    assert "trial" in printed and "train.lr" in printed and "val/mae" in printed and "stopped early" in printed

    # the best bundle is the best trial's, and loads
    from rnnlab.bundle import load_bundle

    bundle = load_bundle(out / "best_bundle")
    assert bundle.job == "stock" and bundle.config["train"]["lr"] == 0.03
    best_val = json.loads((out / "best_bundle" / "metrics.json").read_text())["val"]["mae"]
    assert best_val == pytest.approx(float(rows["0.03"]["val/mae"]))

    # W&B: every trial an offline run, all grouped under the search's name
    runs = sorted((out / "asha-test").glob("trial_*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 4
    records = [read_finished_wandb_run(run)[3] for run in runs]  # the run info: group and name
    assert {record["group"] for record in records} == {"asha-test"}
    assert sorted(record["name"] for record in records) == sorted(p.name for p in (out / "asha-test").glob("trial_*"))

    # the best configuration trains as it is, and gives the same model (same seed, same data)
    retrain = tmp_path / "retrain"
    assert main(["train", "stock", "--config", str(out / "best.yaml"), "--output", str(retrain)]) == 0
    again = json.loads((retrain / "bundle" / "metrics.json").read_text())["val"]["mae"]
    assert again == pytest.approx(best_val, rel=1e-5)


def _results_recorded(trial: Path) -> int:
    results = trial / "result.json"
    return len(results.read_text().splitlines()) if results.is_file() else 0


def _params(trial: Path) -> dict:
    """The trial's params.json; {} until Tune has written it whole."""
    try:
        return json.loads((trial / "params.json").read_text())
    except (OSError, ValueError):
        return {}


def _finished_and_checkpointed(experiment: Path) -> bool:
    """Both quick trials have their bundle and the slow one (batch 1) has 1 or 2 of its 4 epochs recorded."""
    trials = list(experiment.glob("trial_*"))
    slow = [t for t in trials if _params(t).get("train.batch_size") == 1]
    quick_done = [t for t in trials if (t / "bundle" / "config.json").is_file()]
    return len(quick_done) == 2 and bool(slow) and 1 <= _results_recorded(slow[0]) <= 2


def _terminated_in_tune_state(ray_tmp: Path, name: str) -> set[str]:
    """Trial ids Tune's controller has marked TERMINATED in the experiment state it saves on the driver (with
    TUNE_GLOBAL_CHECKPOINT_S=0, after every step of its loop); a file caught mid-write reads as none."""
    done = set()
    for state in ray_tmp.glob(f"ray/session_*/artifacts/*/{name}/driver_artifacts/experiment_state-*.json"):
        try:
            trials = [json.loads(entry[0]) for entry in json.loads(state.read_text())["trial_data"]]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
        done |= {trial["trial_id"] for trial in trials if trial.get("status") == "TERMINATED"}
    return done


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_resume_after_interrupt_skips_finished_trials(tmp_path, prices):
    space = write_yaml(tmp_path / "space.yaml", {
        "inherit": False, "params": {"data.target": "log_return", "train.batch_size": {"grid": [64, 32, 1]}}})
    # the third trial starts last (2 run at once) and is slow (512 steps an epoch at batch 1): the interrupt below
    # catches it mid-way even on a quiet machine, where the two quick trials finish 4 epochs in a second or two
    out = tmp_path / "search"
    argv = ["tune", "stock", "--preset", "smoke", "--source", str(prices), "--space", str(space),
            "--num-samples", "1", "--max-epochs", "4", "--scheduler", "fifo", "--num-cpus", "2",
            "--output", str(out), "--name", "resume-test", "--quiet", "--set", "tracking.wandb=false"]
    # Ray's temporary folder of our own (short: Ray's socket paths live under it), so the controller's saved
    # experiment state can be read while it runs; saved after every step of its loop instead of every 10 s or more
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_TMPDIR": str(ray_tmp), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    process = subprocess.Popen([sys.executable, "-m", "rnnlab.launch.cli", *argv], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # interrupt once one trial has finished AND another has a result (with its checkpoint) recorded by Tune's
        # controller, so the resume below is tested on both: a finished trial kept, a checkpointed one continued.
        # "Finished" is the controller's word, not the bundle's: a bundle is written before the trial returns.
        deadline = time.time() + 300
        while time.time() < deadline and not (
                _finished_and_checkpointed(out / "resume-test")
                and {t.name for t in (out / "resume-test").glob("trial_*") if (t / "bundle" / "config.json").is_file()}
                <= {f"trial_{i}" for i in _terminated_in_tune_state(ray_tmp, "resume-test")}):
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.1)
        assert time.time() < deadline, "the search never reached two finished trials and a checkpointed one"
        process.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert process.returncode == 130, output
    assert "--resume" in output
    first = {row["trial"]: row for row in _read_csv(out / "results.csv")}
    finished = [name for name, row in first.items() if row["status"] == "completed"]
    unfinished = [name for name, row in first.items() if row["status"] == "unfinished"]
    assert finished and unfinished, first
    before = {name: (out / "resume-test" / name / "metrics.jsonl").read_text() for name in finished}
    # a trial interrupted after Tune recorded one of its checkpoints continues from it (tune.get_checkpoint), not
    # from scratch. "Recorded" is read from the controller's own result.json (each report carries a checkpoint):
    # a checkpoint_* folder alone can be written in the instant before the interrupt, unseen by the controller.
    checkpointed = [name for name in unfinished if _results_recorded(out / "resume-test" / name)]
    assert checkpointed, first

    assert main(["tune", "stock", "--output", str(out), "--resume", "--num-cpus", "2", "--quiet"]) == 0
    second = {row["trial"]: row for row in _read_csv(out / "results.csv")}
    assert set(second) == set(first)
    assert all(row["status"] == "completed" and row["epochs"] == "4" for row in second.values()), second
    for name in finished:  # not trained again
        assert (out / "resume-test" / name / "metrics.jsonl").read_text() == before[name]
        assert second[name]["val/mae"] == first[name]["val/mae"]
    assert (out / "best.yaml").is_file() and (out / "best_bundle" / "config.json").is_file()
    for name in checkpointed:
        events = [json.loads(line) for line in (out / "resume-test" / name / "metrics.jsonl").read_text().splitlines()]
        starts = [event for event in events if event["event"] == "config"]
        assert len(starts) == 2 and "checkpoint_" in starts[-1]["resumed_from"], starts
