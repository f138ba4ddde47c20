"""The training loop: smoke runs of each job, exact resume, W&B offline files, precisions, CLI errors, and a
2-process run that follows the 1-process loss curve. All on tiny fixtures made in tmp_path."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from processes import Processes
from rnnlab.serve.service import free_port
from tiny_datasets import MAKERS, smoke_config, tiny_sources
from wandb_files import read_finished_wandb_run
from rnnlab.errors import ConfigError
from rnnlab.config import load_config
from rnnlab.registry import JOBS
from rnnlab.trainers.job import make_job
from rnnlab.trainers.loop import train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return tiny_sources(tmp_path_factory.mktemp("data"))


def smoke(job: str, data: dict, *overrides: str) -> dict:
    return smoke_config(job, data[job], *overrides)


def events(output: Path, kind: str) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def latest_weights(output: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((output / "checkpoints" / "latest.json").read_text())
    return load_file(str(output / "checkpoints" / pointer["checkpoint"] / "model.safetensors"))


@pytest.mark.parametrize("job", [
    pytest.param(name, marks=pytest.mark.skipif(spec.data_set not in MAKERS, reason=f"no tiny {spec.data_set} data"))
    for name, spec in JOBS.items()])
def test_smoke_run_writes_metrics_checkpoints_and_bundle(job, data, tmp_path):
    result = train(smoke(job, data), tmp_path)
    assert set(result) >= {"val", "test", "best_step"} and math.isfinite(result["test"]["loss"])
    train_lines, val_lines = events(tmp_path, "train"), events(tmp_path, "val")
    assert train_lines and val_lines and len(events(tmp_path, "test")) == 1  # test scored once
    assert events(tmp_path, "test")[0]["loss"] == result["test"]["loss"]  # the file records what the run returns
    assert {"loss", "lr", "samples_per_s", "tokens_per_s", "peak_memory_mb"} <= set(train_lines[0])
    assert (tmp_path / "bundle" / "config.json").is_file()
    # the bundle travels and a service shows its metrics: no path of this machine in them
    assert str(tmp_path) not in (tmp_path / "bundle" / "metrics.json").read_text() and "bundle" in result
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert 1 <= len(kept) <= 2  # last + best only
    if job == "stock":
        assert (tmp_path / "predicted_vs_actual.png").stat().st_size > 1000
        assert "baseline_same_day_open_mae" in result["test"]
    if job == "charlm":
        assert {"loss", "bpc"} <= set(result["val"])
    if job == "sentiment":
        assert {"accuracy", "roc_auc"} <= set(result["test"])
    # the registry's metrics (what Tune ranks by and which direction is better) are what the job reports (beside
    # baselines, and what sentiment fits on validation after training: its figures before, the weight and temperature)
    fitted = {"before_fit", "lstm_weight", "temperature"}
    assert set(JOBS[job].metrics) == {k for k in result["val"] if not k.startswith("baseline_") and k not in fitted}


def _flatten_like_cudnn(module: torch.nn.Module) -> None:
    """Make every parameter a view of one flat buffer, as cuDNN does with an LSTM's weights on a GPU."""
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


@pytest.mark.parametrize(
    "job, extra",
    [
        # dropout (global RNG), 2 layers, carried TBPTT state, accumulation, clipping, cosine schedule
        ("charlm", ["model.num_layers=2", "model.dropout=0.3", "train.max_steps=9", "train.eval_every=3",
                    "train.grad_accum=2", "train.grad_clip=0.5", "train.scheduler=cosine", "train.log_every=1"]),
        ("stock", ["model.num_layers=2", "model.dropout=0.2", "train.epochs=3", "train.eval_every=5",
                   "train.optimizer=adamw", "train.log_every=1"]),
    ],
)
@pytest.mark.parametrize("one_buffer", [False, True], ids=["", "cudnn-layout"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(job, extra, one_buffer, data, tmp_path,
                                                                  monkeypatch):
    """``one_buffer``: the LSTM's weights are views of one flat buffer, as cuDNN keeps them on a GPU. safetensors
    refuses to save or load such a model through Accelerate (seen on an H200); the loop's state hooks must cope."""
    # On a GPU some kernels (the embedding's backward, cuDNN) vary run to run: exactness needs deterministic ones.
    config = smoke(job, data, *extra, *(["train.deterministic=true"] if torch.cuda.is_available() else []))
    if one_buffer:
        job_class = type(make_job(config))
        build = job_class.build_model

        def build_in_one_buffer(self):
            model = build(self)
            _flatten_like_cudnn(model.recurrent)
            return model

        monkeypatch.setattr(job_class, "build_model", build_in_one_buffer)
    train(config, tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def crash_at_second_eval(metrics, checkpoint):
        if metrics["step"] >= 2 * int(config["train"]["eval_every"]):
            raise Interrupt  # mid-epoch, after the checkpoint of this step is on disk

    with pytest.raises(Interrupt):
        train(config, tmp_path / "resumed", on_eval=crash_at_second_eval)
    result = train(config, tmp_path / "resumed", resume=True)

    straight, resumed = latest_weights(tmp_path / "straight"), latest_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() >= {"recurrent.weight_ih_l0", "recurrent.weight_hh_l0",
                                                 "recurrent.bias_hh_l0"}
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    losses = {r["step"]: r["loss"] for r in events(tmp_path / "straight", "train")}
    for r in events(tmp_path / "resumed", "train"):
        assert r["loss"] == losses[r["step"]]
    assert result["steps"] == max(losses)


def test_wandb_offline_run_on_disk_holds_config_and_metrics(data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = smoke("charlm", data, "tracking.wandb=true", "tracking.run_name=smoke-run", "tracking.group=g1")
    train(config, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history, run_config, summary, run_info = read_finished_wandb_run(next(runs[0].glob("*.wandb")))
    assert run_config["data"]["sampler"] == "tbptt" and run_config["train"]["batch_size"] == 8
    assert any("train/loss" in row for row in history)
    assert any("val/bpc" in row for row in history)
    assert any("test/loss" in row for row in history)
    assert any(row.get("samples/_type") == "table-file" for row in history)  # the generated-samples table
    # the summary holds the last value logged: metrics.jsonl's last train record
    assert summary["train/loss"] == pytest.approx(events(tmp_path, "train")[-1]["loss"], rel=1e-6)
    assert (run_info["group"], run_info["name"]) == ("g1", "smoke-run")


def test_deterministic_kernels_are_switched_on_for_the_run_that_asks_and_off_again(data, tmp_path):
    seen = []

    def record(metrics, checkpoint):
        seen.append(torch.are_deterministic_algorithms_enabled())

    train(smoke("charlm", data, "train.deterministic=true", "train.max_steps=2", "train.eval_every=1"),
          tmp_path / "on", on_eval=record)
    train(smoke("charlm", data, "train.max_steps=2", "train.eval_every=1"), tmp_path / "off", on_eval=record)
    assert seen == [True, True, False, False]
    with pytest.raises(ConfigError, match="train.deterministic must be true or false"):
        smoke("charlm", data, "train.deterministic=sometimes")


def cpu_builds_a_bf16_lstm() -> bool:
    """Whether this CPU runs an LSTM in bf16 under autocast, asked of torch directly (not through rnnlab): oneDNN
    builds the bf16 LSTM primitive only on CPUs with AVX-512 (BF16/AMX); on AVX2-only CPUs (e.g. a 2-core AMD EPYC)
    it cannot, and rnnlab must fall back to fp32."""
    lstm = torch.nn.LSTM(4, 4, batch_first=True)
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out, _ = lstm(torch.randn(1, 2, 4))
        out.float().sum().backward()
    except RuntimeError:
        return False
    return out.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU cuDNN decides (benchmarks/gpu_probe.py)")
def test_bf16_on_cpu_trains_in_bf16(data, tmp_path, caplog):
    """Where the CPU runs a bf16 LSTM, autocast trains in bf16: the run records bf16, and its losses differ from
    fp32's (rounding) while staying close (the same model learns the same thing). Where it cannot, the run says so
    in one warning, records "no" and trains exactly as fp32 does."""
    sets = ("train.max_steps=6", "train.log_every=1")
    bf16 = train(smoke("charlm", data, "train.mixed_precision=bf16", *sets), tmp_path / "bf16")
    fp32 = train(smoke("charlm", data, "train.mixed_precision=no", *sets), tmp_path / "fp32")
    half = [r["loss"] for r in events(tmp_path / "bf16", "train")]
    full = [r["loss"] for r in events(tmp_path / "fp32", "train")]
    assert len(half) == len(full) == 6
    if cpu_builds_a_bf16_lstm():
        assert events(tmp_path / "bf16", "config")[0]["precision"] == "bf16"
        assert half != full and half == pytest.approx(full, rel=0.05)
        assert torch.isfinite(torch.tensor(bf16["test"]["loss"])) and bf16["test"]["loss"] != fp32["test"]["loss"]
    else:
        assert events(tmp_path / "bf16", "config")[0]["precision"] == "no"
        assert "LSTM in bf16 on cpu is not supported here" in caplog.text and "training in fp32" in caplog.text
        assert half == full and bf16["test"]["loss"] == fp32["test"]["loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real cuDNN answers (benchmarks/gpu_probe.py)")
def test_bf16_falls_back_to_fp32_where_the_lstm_would_compute_in_another_dtype(monkeypatch, caplog):
    """On an H200, bf16 autocast ran cuDNN's LSTM in float16 (no loss scaling): the trainer must not train so.
    The mock computes in fp32 and hands back float16, so it takes the same path on a CPU with or without bf16."""
    from rnnlab.trainers.precision import resolve_precision

    forward = torch.nn.LSTM.forward

    def forward_in_float16(self, input, hx=None):
        with torch.autocast(device_type="cpu", enabled=False):
            out, state = forward(self, input.float(), hx)
        return out.to(torch.float16), state

    assert resolve_precision("bf16") == ("bf16" if cpu_builds_a_bf16_lstm() else "no")
    caplog.clear()
    monkeypatch.setattr(torch.nn.LSTM, "forward", forward_in_float16)
    assert resolve_precision("bf16") == "no"
    assert "computes in float16" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_fp16_without_gpu_is_a_clear_error_before_training(data, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(smoke("stock", data, "train.mixed_precision=fp16"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "stock", "--preset", "smoke", "--set", "train.bogus=1"], "Unknown config key 'train.bogus'"),
        (["train", "stock", "--preset", "smoke", "--set", "train.mixed_precision=fp16"], "fp16"),
        (["train", "stock", "--preset", "smoke", "--source", "/nonexistent.csv"], "does not exist"),
    ],
)
def test_cli_errors_are_one_sentence_with_nonzero_exit(argv, fragment, tmp_path, capsys):
    from rnnlab.launch.cli import main

    if fragment == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is refused only where there is no GPU")
    code = main([*argv, "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_config_layers_and_unknown_keys(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("train: {lr: 1e-4, epochs: 3}\nmodel: {hidden_size: 7}\n")
    config = load_config("sentiment", "chapter", user, ["train.epochs=5", "data.max_length=100"])
    assert config["train"]["lr"] == 1e-4 and config["train"]["epochs"] == 5  # --set beats the file
    assert config["model"]["hidden_size"] == 7 and config["model"]["embed_dim"] == 32  # file beats preset
    user.write_text("model: {hiden_size: 7}\n")
    with pytest.raises(ConfigError, match="model.hiden_size"):
        load_config("sentiment", "default", user)


@pytest.mark.parametrize("setting, message", [
    ("model.dropout=1.5", "model.dropout must be a number in [0, 1), not 1.5."),  # model keys are checked too
    ("model.hidden_size=0", "model.hidden_size must be a positive integer, not 0."),
    ("train.batch_size=2.5", "train.batch_size must be a positive integer, not 2.5."),
    ("train.lr=fast", "train.lr must be a positive number, not 'fast'."),
    ("train.deterministic=1", "train.deterministic must be true or false, not 1."),
    ("train.monitor=accuracy", "train.monitor is 'accuracy'; choose one of loss, r2, mae, mape."),
    ("data.window=0", "data.window must be a positive integer, not 0."),
])
def test_every_section_refuses_a_bad_value_in_one_sentence_naming_the_key(setting, message):
    with pytest.raises(ConfigError) as error:
        load_config("stock", "smoke", None, [setting])
    assert str(error.value) == message


def test_a_config_file_may_name_its_job_and_hold_retired_keys(tmp_path):
    """best.yaml (rnnlab tune) names its job; configs written before train.num_workers went still hold it."""
    user = tmp_path / "best.yaml"
    user.write_text("job: stock\ntrain: {lr: 0.01, num_workers: 0}\n")
    config = load_config("stock", "smoke", user)
    assert config["train"]["lr"] == 0.01 and "num_workers" not in config["train"]
    with pytest.raises(ConfigError, match="is a config for job 'stock', not 'charlm'"):
        load_config("charlm", "smoke", user)


def test_a_bare_no_for_mixed_precision_means_no(tmp_path):
    """YAML 1.1 reads ``no`` as False; users write ``mixed_precision: no`` as Accelerate's own configs do."""
    assert load_config("stock", "smoke", None, ["train.mixed_precision=no"])["train"]["mixed_precision"] == "no"
    user = tmp_path / "user.yaml"
    user.write_text("train: {mixed_precision: no}\n")
    assert load_config("stock", "smoke", user)["train"]["mixed_precision"] == "no"
    with pytest.raises(ConfigError, match="mixed_precision is True"):
        load_config("stock", "smoke", None, ["train.mixed_precision=yes"])


def _train_argv(data: dict) -> list[str]:
    return ["charlm", "--preset", "smoke", "--source", str(data["charlm"]), "--set", "tracking.wandb=false",
            "--set", "train.log_every=1", "--set", "train.max_steps=15", "--set", "train.eval_every=5"]


def _quiet_env(tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RNNLAB_CACHE_DIR": str(tmp / "cache")}


@pytest.fixture(scope="module")
def one_process_run(data, tmp_path_factory) -> Path:
    """The 1-process charlm smoke run that the multi-process runs must follow."""
    out = tmp_path_factory.mktemp("one-process")
    one = subprocess.run([sys.executable, "-m", "rnnlab.launch.train", *_train_argv(data), "--output", str(out)],
                         env=_quiet_env(out), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    return out


def _assert_follows(one: Path, many: Path) -> None:
    """Same global batch (8 rows) split 4+4 over two gloo processes vs one process: the per-step train loss
    agrees to 1e-4 relative (float summation order differs; dropout is 0 so no RNG stream differs)."""
    assert events(many, "config")[0]["world_size"] == 2
    curve_one = [r["loss"] for r in events(one, "train")]
    curve_two = [r["loss"] for r in events(many, "train")]
    assert len(curve_one) == len(curve_two) == 15
    assert curve_one == pytest.approx(curve_two, rel=1e-4)
    assert events(one, "val")[-1]["loss"] == pytest.approx(events(many, "val")[-1]["loss"], rel=1e-4)


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-process (gloo) run: the curve to follow and the weights the elastic run must end with."""
    out = tmp_path_factory.mktemp("two-processes")
    with Processes(out / "logs") as launcher:
        launcher.start("launcher", [*LAUNCH, "--num_machines", "1", "--main_process_port", str(free_port()),
                                    "-m", "rnnlab.launch.train", *_train_argv(data), "--output", str(out)],
                       env=_quiet_env(out), cwd=REPO)
        launcher.wait(timeout=300)
    return out


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(one_process_run, two_process_run):
    _assert_follows(one_process_run, two_process_run)


def _rank_process(launcher: subprocess.Popen, rank: int):
    """The training process of one rank under ``accelerate launch`` (torchrun sets RANK in its environment)."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "rnnlab.launch.train" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
def test_elastic_run_survives_a_killed_rank_and_ends_with_the_uninterrupted_weights(data, two_process_run,
                                                                                      tmp_path):
    """``accelerate launch --max_restarts 1``: rank 1 is SIGKILLed once the first checkpoint is written; torchrun
    stops the group and starts it again with the same command line, whose ``--resume auto`` continues from the
    last checkpoint. The run ends with the same weights as the uninterrupted 2-process run, bit for bit."""
    out = tmp_path / "elastic"
    with Processes(tmp_path / "logs") as group:
        launcher = group.start("launcher", [
            *LAUNCH, "--num_machines", "1", "--main_process_port", str(free_port()), "--max_restarts", "1",
            "--monitor_interval", "0.5", "-m", "rnnlab.launch.train", *_train_argv(data), "--output", str(out),
            "--resume", "auto"], env=_quiet_env(tmp_path), cwd=REPO)
        deadline = time.time() + 240
        while not (out / "checkpoints" / "latest.json").is_file():
            assert launcher.poll() is None and time.time() < deadline, group.report("no checkpoint written")
            time.sleep(0.05)
        victim = _rank_process(launcher, 1)
        assert victim is not None, group.report("no process of rank 1")
        killed_at_step = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
        victim.kill()  # SIGKILL
        group.wait(timeout=300)
    starts = events(out, "config")
    assert len(starts) == 2 and starts[1]["resumed_from"], starts  # restarted once, from a checkpoint
    assert killed_at_step < 15
    straight = load_file(str(two_process_run / "bundle" / "model.safetensors"))
    resumed = load_file(str(out / "bundle" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def _wait_until_listening(launcher: subprocess.Popen, port: int, group: Processes, timeout: float = 240) -> None:
    """Until a process of ``launcher``'s tree listens on ``port``; fails naming whoever else holds it."""
    import psutil

    deadline = time.time() + timeout
    while True:
        assert launcher.poll() is None and time.time() < deadline, group.report(f"nothing listens on {port}")
        tree = {launcher.pid, *(child.pid for child in psutil.Process(launcher.pid).children(recursive=True))}
        # pid None: a socket psutil has not matched to a process yet (its /proc scan races new processes)
        holders = {c.pid for c in psutil.net_connections("tcp")
                   if c.laddr.port == port and c.status == "LISTEN" and c.pid is not None}
        assert holders <= tree, group.report(f"port {port} is held by another process: "
                                             f"{[psutil.Process(pid).cmdline() for pid in holders - tree]}")
        if holders:
            return
        time.sleep(0.1)  # polling the socket table, not synchronising on an event


@pytest.mark.slow
def test_two_machines_of_one_process_follow_the_one_process_loss_curve(data, one_process_run, tmp_path):
    """``--num_machines 2``: one launcher per "machine" (machine ranks 0 and 1), meeting at 127.0.0.1 over gloo,
    as two nodes would at the main node's address (configs/accelerate/multi_node.yaml)."""
    port = free_port()
    with Processes(tmp_path / "logs") as machines:
        def start(rank: int):
            return machines.start(f"machine-{rank}", [
                *LAUNCH, "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), "-m", "rnnlab.launch.train", *_train_argv(data),
                "--output", str(tmp_path / "two")], env=_quiet_env(tmp_path), cwd=REPO)

        # Rank 0's store listens before rank 1 dials it, and it is rank 0's: another process on the port (taken
        # between free_port() and the launch) would otherwise meet rank 1 in its place.
        _wait_until_listening(start(0), port, machines)
        start(1)
        machines.wait(timeout=300)
    _assert_follows(one_process_run, tmp_path / "two")


def test_ngram_branch_trains_beside_the_lstm_at_its_own_learning_rate(data, tmp_path):
    from rnnlab.bundle import load_bundle
    from rnnlab.trainers.optim import make_optimizer

    config = smoke("sentiment", data, "model.ngram_buckets=5000", "train.lr_multipliers={ngrams: 5}")
    job = make_job(config, rank=0, world_size=1)
    job.load_data()
    lr = job.config.train.lr
    rates = {len(g["params"]): g["lr"] for g in make_optimizer(job.build_model(), job.config.train).param_groups}
    assert sorted(rates.values()) == [pytest.approx(lr), pytest.approx(5 * lr)]
    assert rates[1] == pytest.approx(5 * lr)  # the one n-gram table, at 5x

    result = train(config, tmp_path)
    model = load_bundle(tmp_path / "bundle").model
    assert model.ngrams.weight.abs().max() > 0  # the zero-initialised table learned
    assert {"accuracy", "roc_auc"} <= set(result["test"])


def test_fit_on_validation_picks_the_weight_and_temperature_of_least_loss_and_the_bundle_answers_with_them(
        data, tmp_path):
    from rnnlab.bundle import load_bundle
    from rnnlab.jobs.sentiment import LSTM_WEIGHTS, TEMPERATURES, sentiment_metrics

    config = smoke("sentiment", data, "model.ngram_buckets=5000", "train.lr_multipliers={ngrams: 20}",
                   "model.fit_lstm_weight=true", "train.epochs=3")
    result = train(config, tmp_path)
    bundle = load_bundle(tmp_path / "bundle")
    weight, temperature = bundle.model_config["lstm_weight"], bundle.model_config["temperature"]
    assert (weight, temperature) == (result["val"]["lstm_weight"], result["val"]["temperature"])
    assert weight in LSTM_WEIGHTS and temperature in TEMPERATURES

    # the same choice made here from the bundle's two branches on the validation reviews and their windows
    job = make_job(bundle.config, rank=0, world_size=1)
    job.load_data()
    branches, labels = {}, {}
    for split in ("val", "val_short"):
        ids, labels[split] = job.splits[split]
        x, lengths, _ = job._collate(split, range(len(ids)))
        with torch.no_grad():
            branches[split] = [branch.double().numpy() for branch in bundle.model(x, lengths, branches=True)]
            if split == "val":
                answered = bundle.model(x, lengths).double().numpy()

    def loss(w, t):
        return np.mean([sentiment_metrics(labels[s], (w * lstm + ngrams) / t)["loss"]
                        for s, (lstm, ngrams) in branches.items()])

    losses = {(w, t): loss(w, t) for w in LSTM_WEIGHTS for t in TEMPERATURES}
    assert losses[weight, temperature] == pytest.approx(min(losses.values()), abs=1e-9)
    lstm, ngrams = branches["val"]
    np.testing.assert_allclose(answered, (weight * lstm + ngrams) / temperature, rtol=1e-5, atol=1e-5)  # served
    assert result["val"]["loss"] == pytest.approx(sentiment_metrics(labels["val"], answered)["loss"], rel=1e-4)
    assert losses[weight, temperature] <= loss(1.0, 1.0)  # untouched was among the choices
    assert [(e["lstm_weight"], e["temperature"]) for e in events(tmp_path, "val_fitted")] == [(weight, temperature)]


def test_sentiment_without_a_validation_split_trains_on_every_review_and_scores_test(data, tmp_path):
    from rnnlab.errors import ConfigError

    result = train(smoke("sentiment", data, "data.val_fraction=0", "model.ngram_buckets=5000"), tmp_path)
    assert result["best_step"] is None and not result["val"]  # nothing selected or fitted on
    assert {"accuracy", "short_accuracy"} <= set(result["test"])
    with pytest.raises(ConfigError, match="early_stopping_patience needs a validation split"):
        smoke("sentiment", data, "data.val_fraction=0", "train.early_stopping_patience=2")


def test_training_reviews_gain_random_windows_drawn_anew_each_epoch_and_the_same_after_a_resume(data):
    config = smoke("sentiment", data, "data.crops_per_review=2", "data.crop_tokens=[3, 9]")
    job = make_job(config, rank=0, world_size=1)
    job.load_data()
    reviews, labels = job.splits["train"]
    texts, text_labels = job._with_crops(epoch=0)
    assert len(texts) == 3 * len(reviews) and job.steps_per_epoch() == -(-len(texts) // job.batch_size)
    for index, window in enumerate(texts[len(reviews):]):
        review = index % len(reviews)
        assert 1 <= len(window) <= min(9, len(reviews[review]))
        assert text_labels[len(reviews) + index] == labels[review]
        assert any(np.array_equal(window, reviews[review][s : s + len(window)]) for s in range(len(reviews[review])))
    again = make_job(config, rank=0, world_size=1)
    again.load_data()
    assert all(np.array_equal(a, b) for a, b in zip(texts, again._with_crops(epoch=0)[0]))  # a resumed epoch
    assert not all(np.array_equal(a, b) for a, b in zip(texts, job._with_crops(epoch=1)[0]))  # a new epoch


def test_fit_lstm_weight_needs_an_ngram_branch(data, tmp_path):
    from rnnlab.errors import ConfigError

    with pytest.raises(ConfigError, match="model.fit_lstm_weight weighs the LSTM against the n-gram branch"):
        train(smoke("sentiment", data, "model.fit_lstm_weight=true"), tmp_path)


def test_lr_multipliers_must_name_parameters_of_the_model():
    from rnnlab.errors import ConfigError
    from rnnlab.models.sentiment import SentimentConfig, SentimentLSTM
    from rnnlab.trainers.optim import parameter_groups

    model = SentimentLSTM(SentimentConfig(vocab_size=20, num_layers=2))
    groups = parameter_groups(model, 0.01, {"layers": 0.5, "layers.1": 2.0})
    by_lr = {round(g["lr"], 9): sum(p.numel() for p in g["params"]) for g in groups}
    layer = lambda i: sum(p.numel() for p in model.layers[i].parameters())  # noqa: E731
    everything = sum(p.numel() for p in model.parameters())
    assert by_lr == {0.005: layer(0), 0.02: layer(1), 0.01: everything - layer(0) - layer(1)}
    with pytest.raises(ConfigError, match="no parameter of the model is named 'ngram'.*embedding, head, layers"):
        parameter_groups(model, 0.01, {"ngram": 5})


def test_pseudo_labels_from_teachers_add_the_unlabelled_reviews_with_their_mean_probability(data, tmp_path):
    from rnnlab.data import imdb
    from rnnlab.inference import load_predictor
    from rnnlab.trainers.evaluate import evaluate_bundle

    train(smoke("sentiment", data), tmp_path / "teacher")
    teacher = tmp_path / "teacher" / "bundle"
    train(smoke("sentiment", data, "model.hidden_size=4"), tmp_path / "other")  # a second teacher
    other = tmp_path / "other" / "bundle"
    config = smoke("sentiment", data, f"data.pseudo_labels_from=[{teacher}, {other}]", "data.limit_unlabelled=40")
    job = make_job(config, rank=0, world_size=1)
    job.load_data()
    job.add_training_data()
    labelled = make_job(smoke("sentiment", data), rank=0, world_size=1)
    labelled.load_data()
    ids, labels = job.splits["train"]
    n = len(labelled.splits["train"][0])
    assert len(ids) == n + 40 and np.array_equal(labels[:n], labelled.splits["train"][1])

    # the added reviews are unlabelled ones, read with this run's vocabulary and labelled with what the teacher
    # answers for their text
    texts = {tuple(job.vocab.encode(imdb.tokenize(r.text))): r.text
             for r in imdb.read_imdb(data["sentiment"], ("unsup",))["unsup"]}
    added = [texts[tuple(review.tolist())] for review in ids[n:]]
    answers = np.mean([[p["probability"] for p in load_predictor(b).predict(added)] for b in (teacher, other)], 0)
    np.testing.assert_allclose(labels[n:], answers, rtol=1e-5, atol=1e-6)  # the teachers' mean
    assert 0 < labels[n:].min() and labels[n:].max() < 1  # soft targets, not rounded

    result = train(config, tmp_path / "student")
    shutil.rmtree(tmp_path / "teacher")
    shutil.rmtree(tmp_path / "other")  # scoring the student's bundle needs only the test reviews
    scores = evaluate_bundle(tmp_path / "student" / "bundle")
    assert scores["accuracy"] == pytest.approx(result["test"]["accuracy"])


def test_pseudo_labels_need_a_sentiment_teacher_with_this_runs_validation_reviews(data, tmp_path):
    train(smoke("sentiment", data, "data.val_fraction=0.2"), tmp_path / "teacher")
    config = smoke("sentiment", data, f"data.pseudo_labels_from={tmp_path / 'teacher' / 'bundle'}")  # one path
    with pytest.raises(ConfigError, match="the teacher .* held out other validation reviews"):
        train(config, tmp_path / "student")
    train(smoke("charlm", data), tmp_path / "charlm")
    config = smoke("sentiment", data, f"data.pseudo_labels_from={tmp_path / 'charlm' / 'bundle'}")
    with pytest.raises(ConfigError, match="is a charlm bundle; give a sentiment bundle"):
        train(config, tmp_path / "student")
