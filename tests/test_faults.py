"""Training that survives faults: damaged checkpoints, changed settings, used folders, non-finite numbers, a full
disk, tracking failures, and (slow) kill -9 inside training. Stock smoke runs on a tiny CSV made in tmp_path."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_datasets import make_stock_csv
from rnnlab.errors import ConfigError, RnnlabError
from rnnlab.config import load_config
from rnnlab.trainers.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 3 epochs x 8 steps, validated every 4 steps: checkpoints at 4, 8, ..., 24
EXTRA = ["train.epochs=3", "train.eval_every=4", "train.log_every=1", "data.limit_train=512"]


@pytest.fixture(scope="module")
def prices(tmp_path_factory) -> Path:
    return make_stock_csv(tmp_path_factory.mktemp("prices"))


def smoke(prices: Path, *overrides: str) -> dict:
    return load_config("stock", "smoke", overrides=[f"data.source={prices}", "tracking.wandb=false", *EXTRA,
                                                    *overrides])


@pytest.fixture(scope="module")
def straight(prices, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must match."""
    out = tmp_path_factory.mktemp("straight")
    train(smoke(prices), out)
    return out


class Crash(Exception):
    pass


def crash_after(step: int):
    def on_eval(metrics, checkpoint):
        if metrics["step"] >= step:
            raise Crash

    return on_eval


def interrupted(prices, out: Path, step: int = 12, *overrides: str) -> Path:
    with pytest.raises(Crash):
        train(smoke(prices, *overrides), out, on_eval=crash_after(step))
    return out


def bundle_weights(out: Path) -> dict:
    return load_file(str(out / "bundle" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = bundle_weights(a), bundle_weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def pointer(out: Path, name: str = "latest") -> dict:
    return json.loads((out / "checkpoints" / f"{name}.json").read_text())


# --- damaged checkpoints ---------------------------------------------------------------------------------------


def _empty_pointer(out: Path) -> str:
    (out / "checkpoints" / "latest.json").write_text("")
    return "latest.json"


def _missing_folder(out: Path) -> str:
    import shutil

    shutil.rmtree(out / "checkpoints" / pointer(out)["checkpoint"])
    return "is missing"


def _truncated_weights(out: Path) -> str:
    weights = out / "checkpoints" / pointer(out)["checkpoint"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "truncated"


def _flipped_byte(out: Path) -> str:
    weights = out / "checkpoints" / pointer(out)["checkpoint"] / "optimizer.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return "checksum"


@pytest.mark.parametrize("damage", [_empty_pointer, _missing_folder, _truncated_weights, _flipped_byte],
                         ids=["empty latest.json", "missing step folder", "truncated weights", "corrupted optimizer"])
def test_resume_falls_back_to_the_other_kept_checkpoint_and_says_why(damage, prices, straight, tmp_path, caplog):
    out = interrupted(prices, tmp_path / "run")
    damaged_step = pointer(out)["step"]
    what = damage(out)
    result = train(smoke(prices), out, resume=True)
    warning = next(r.getMessage() for r in caplog.records if "falling back" in r.getMessage())
    assert what in warning and len(warning.splitlines()) == 1
    starts = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "config"]
    # the newest whole checkpoint: the pointer's own folder when only the pointer broke, else the one before it
    expected = damaged_step if damage is _empty_pointer else damaged_step - 4
    assert starts[-1]["resumed_step"] == expected
    assert result["steps"] == 24
    assert_same_weights(straight, out)


def test_checkpoints_carry_a_manifest_and_the_previous_one_is_kept(prices, tmp_path):
    out = interrupted(prices, tmp_path / "run")
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert len(kept) >= 2 and pointer(out)["checkpoint"] == kept[-1]
    manifest = json.loads((out / "checkpoints" / kept[-1] / "manifest.json").read_text())
    assert {"model.safetensors", "optimizer.bin", "loop_state.json"} <= set(manifest["files"])
    assert not list((out / "checkpoints").glob(".*"))  # no temporaries left


def test_temporaries_left_by_a_crash_are_cleaned_up(prices, straight, tmp_path):
    out = interrupted(prices, tmp_path / "run")
    (out / "checkpoints" / ".tmp-step-0000016").mkdir()
    (out / "checkpoints" / ".tmp-step-0000016" / "model.safetensors").write_bytes(b"half")
    (out / "checkpoints" / ".latest.json.tmp").write_text('{"checkp')
    with open(out / "metrics.jsonl", "a") as handle:  # killed halfway through a line
        handle.write('{"event": "train", "st')
    train(smoke(prices), out, resume=True)
    assert not list((out / "checkpoints").glob(".*"))
    [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert_same_weights(straight, out)


# --- one run per folder -------------------------------------------------------------------------------------------


def test_resume_under_other_settings_is_refused_naming_the_keys(prices, tmp_path):
    out = interrupted(prices, tmp_path / "run")
    with pytest.raises(ConfigError) as refused:
        train(smoke(prices, "model.hidden_size=8", "train.batch_size=32"), out, resume=True)
    message = str(refused.value)
    assert "model.hidden_size (4 -> 8)" in message and "train.batch_size (64 -> 32)" in message
    assert len(message.splitlines()) == 1 and message.endswith(".")
    # settings that do not shape the weights may change
    train(smoke(prices, "train.log_every=2", "train.progress=false"), out, resume=True)


def test_a_fresh_run_into_a_used_output_is_refused(prices, tmp_path, capsys):
    from rnnlab.launch.cli import main

    out = interrupted(prices, tmp_path / "run")
    before = (out / "metrics.jsonl").read_text()
    argv = ["train", "stock", "--preset", "smoke", "--source", str(prices), "--set", "tracking.wandb=false",
            "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--resume auto" in err and len(err.splitlines()) == 1
    assert (out / "metrics.jsonl").read_text() == before  # nothing written


# --- non-finite numbers ---------------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(prices, tmp_path, monkeypatch):
    from rnnlab.trainers.job import make_job

    job_class = type(make_job(smoke(prices)))
    loss_sum = job_class.loss_sum
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss = loss_sum(self, model, batch)
        return loss * float("nan") if calls["n"] > 10 else loss

    monkeypatch.setattr(job_class, "loss_sum", poisoned)
    out = tmp_path / "run"
    with pytest.raises(RnnlabError) as stopped:
        train(smoke(prices), out)
    message = str(stopped.value)
    assert "not finite" in message and "step-0000008" in message and len(message.splitlines()) == 1
    assert pointer(out)["checkpoint"] == "step-0000008"  # nothing written after the loss went bad
    weights = load_file(str(out / "checkpoints" / "step-0000008" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "bundle").exists()


def test_a_nan_first_validation_is_never_the_best(prices, tmp_path, monkeypatch):
    from rnnlab.trainers.job import make_job

    job_class = type(make_job(smoke(prices)))
    evaluate = job_class.evaluate
    seen = {"n": 0}

    def nan_first(self, model, split, accelerator):
        result = evaluate(self, model, split, accelerator)
        if split == "val":
            seen["n"] += 1
            if seen["n"] == 1:  # every metric but the loss (a NaN loss stops the run)
                result.metrics = {key: value if key == "loss" else float("nan")
                                  for key, value in result.metrics.items()}
        return result

    monkeypatch.setattr(job_class, "evaluate", nan_first)
    result = train(smoke(prices, "train.epochs=1"), tmp_path / "run")
    assert pointer(tmp_path / "run", "best")["step"] == 8 and result["best_step"] == 8


# --- storage and tracking -------------------------------------------------------------------------------------


def test_a_full_disk_is_one_sentence(prices, tmp_path, capsys, monkeypatch):
    from rnnlab.launch.cli import main

    real_replace = __import__("os").replace

    def full(src, dst, *args, **kwargs):
        if "step-" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr("os.replace", full)
    assert main(["train", "stock", "--preset", "smoke", "--source", str(prices), "--set", "tracking.wandb=false",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the disk is full" in err and "--resume auto" in err and len(err.splitlines()) == 1


def test_tracking_never_costs_the_model(prices, tmp_path, monkeypatch, caplog):
    """W&B failing to start falls back to an offline run; a report failing at the end is a warning, after the
    bundle is already saved."""
    import wandb

    from rnnlab.trainers.job import make_job

    real_init = wandb.init

    def refused_online(*args, **kwargs):
        if kwargs.get("mode", "online") != "offline" and __import__("os").environ.get("WANDB_MODE") != "offline":
            raise wandb.errors.CommError("network unreachable")
        return real_init(*args, **kwargs)

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", refused_online)
    job_class = type(make_job(smoke(prices)))

    def broken_report(self, *args, **kwargs):
        raise RuntimeError("plotting backend missing")

    monkeypatch.setattr(job_class, "report", broken_report)
    out = tmp_path / "run"
    train(smoke(prices, "tracking.wandb=true", "train.epochs=1"), out)
    assert (out / "bundle" / "model.safetensors").is_file()
    text = caplog.text
    assert "offline" in text and "network unreachable" in text
    assert "plotting backend missing" in text
    assert list((out / "wandb").glob("offline-run-*"))


# --- kill -9 ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_inside_training_then_resume_ends_with_the_uninterrupted_weights(prices, tmp_path):
    """benchmarks/kill_resume.py with one kill, as soon as metrics.jsonl records step 12 of 16 (after the
    step-8 checkpoint): the process must die mid-training, and the resumed run must end bit for bit where the
    uninterrupted one did (the benchmark draws 20 steps)."""
    from benchmarks.kill_resume import kill_loop

    report = kill_loop(tmp_path, job="stock", extra=["--source", str(prices), "--set", "tracking.wandb=false"],
                       kills=1, steps=[12])
    run = report.runs[0]
    assert report.steps == 16, report
    assert run["killed"] and run["in_training"], run
    assert 12 <= run["steps_before_kill"] < 16, run
    assert run["resumed_from"].endswith("step-0000008"), run
    assert report.identical == 1, report.runs
