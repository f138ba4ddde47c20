"""rnnlab on a real multi-node Ray cluster on one machine: a head and a worker node, both on 127.0.0.1
(``ray.cluster_utils.Cluster``, as Ray's own tests do), shared by the module.

- ``rnnlab tune --address 127.0.0.1:PORT`` spreads its trials over both nodes (read from each trial's node id);
- ``rnnlab serve --address`` places its replicas on both nodes and answers HTTP on the head;
- a worker node removed mid-search: every trial still finishes (failed trials resume from their checkpoint);
- an address where no cluster answers is one sentence within seconds (no cluster needed).

- a trial of two gloo workers (Ray Train's TorchTrainer) trains across the nodes and reports with checkpoints;

The head has 2 CPUs and the worker 1, so three 1-CPU trials run at once. Ray's temp folder follows RAY_TMPDIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rnnlab import registry
from rnnlab.serve.local import LocalService
from rnnlab.serve.service import free_port
from tiny_datasets import make_stock_csv
from rnnlab.launch.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def _one_sentence(err: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(".") and "Traceback" not in err, err
    return err


# --- no cluster ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["tune", "serve"])
def test_an_address_where_no_cluster_answers_is_one_sentence_within_seconds(command, tmp_path, capsys):
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there: a stopped cluster's stale address
    argv = {"tune": ["tune", "stock", "--preset", "smoke", "--source", str(make_stock_csv(tmp_path)),
                     "--output", str(tmp_path / "out")],
            "serve": ["serve", "--bundles", str(_bundles(tmp_path / "bundles")), "--port", str(free_port())]}[command]
    unreachable = f"The Ray cluster at --address {closed} cannot be reached (nothing listens on port"
    for address, expected in ((closed, unreachable),
                              ("my-head", "--address 'my-head' is not HOST:PORT")):
        started = time.perf_counter()
        assert main([*argv, "--address", address]) == 2
        assert time.perf_counter() - started < 60
        assert expected in _one_sentence(capsys.readouterr().err)


def _bundles(directory: Path) -> Path:
    from tiny_models import make_bundles

    directory.mkdir(parents=True, exist_ok=True)
    return make_bundles(directory)


# --- a two-node cluster ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A head (2 CPUs) and one worker node (1 CPU), both on 127.0.0.1 (loopback only: the case Ray's own address
    rewriting got wrong). Yields the Cluster; ``cluster.address`` is ``127.0.0.1:PORT``."""
    from ray.cluster_utils import Cluster

    from rnnlab.cluster import set_worker_priority

    set_worker_priority()  # as docs/cluster.md tells operators: replicas and trials not at Ray's nice 15
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "include_dashboard": False})
    cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


HEAD = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
WORKER = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


def _node_ids(cluster) -> set[str]:
    return {node.node_id for node in [cluster.head_node, *cluster.worker_nodes]}


SPACE = {"inherit": False, "params": {"data.target": "log_return", "train.lr": {"grid": [0.03, 0.02, 0.01, 0.005]}}}


def _tune_argv(tmp_path: Path, cluster, name: str, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return ["tune", "stock", "--preset", "smoke", "--source", str(make_stock_csv(tmp_path)), "--space", str(space),
            "--num-samples", "1", "--scheduler", "fifo", "--cpus-per-trial", "1", "--address", cluster.address,
            "--output", str(tmp_path / "search"), "--name", name, "--quiet", "--set", "tracking.wandb=false",
            *extra]


def _trial_reports(search: Path) -> dict[str, list[dict]]:
    """Each trial's reports so far (Tune's result.json: one JSON line per report, node_id included)."""
    reports = {}
    for trial in sorted(search.glob("trial_*")):
        path = trial / "result.json"
        lines = path.read_text().splitlines() if path.is_file() else []
        reports[trial.name] = [json.loads(line) for line in lines if line.endswith("}")]
    return reports


@pytest.mark.slow
def test_tune_address_spreads_trials_over_both_nodes(cluster, tmp_path, capsys):
    assert cluster.address.startswith("127.0.0.1:")
    started = time.perf_counter()
    code = main(_tune_argv(tmp_path, cluster, "spread", "--max-epochs", "1"))
    wall = time.perf_counter() - started
    out = capsys.readouterr().out
    assert code == 0, out
    reports = _trial_reports(tmp_path / "search" / "spread")
    where = {name: {r["node_id"] for r in rows} for name, rows in reports.items()}
    print(f"2-node search, 4 trials x 1 epoch: {wall:.1f} s; trials per node: "
          f"{ {node[:8]: sum(node in nodes for nodes in where.values()) for node in _node_ids(cluster)} }")
    assert len(where) == 4 and all(len(nodes) == 1 for nodes in where.values())
    assert set().union(*where.values()) == _node_ids(cluster)  # both nodes ran trials
    assert all(row["status"] == "completed" for row in _csv(tmp_path / "search" / "results.csv"))


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_serve_address_places_replicas_on_both_nodes(cluster, tmp_path):
    import httpx
    import ray

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with LocalService(_bundles(tmp_path / "bundles"), ["--address", cluster.address], env=env) as service:
        answer = httpx.post(f"{service.url}/v1/sentiment", json={"texts": ["the movie was great"]}, timeout=30)
        assert answer.status_code == 200, answer.text
        from rnnlab.cluster import connect

        connect(cluster.address, log_to_driver=False)
        try:
            replicas = [actor for actor in ray._private.state.actors().values()
                        if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith("ServeReplica:rnnlab:")]
        finally:
            ray.shutdown()
        placed = {actor["ActorClassName"].split(":")[-1]: actor["Address"]["NodeID"] for actor in replicas}
        print(f"serve replicas by node: {placed}")
        assert set(placed) == {"Gateway", *registry.served()}
        assert set(placed.values()) == _node_ids(cluster)


@pytest.mark.slow
def test_a_search_that_loses_a_worker_node_finishes_every_trial(cluster, tmp_path):
    """The worker node is killed (no graceful shutdown) once a trial running there has reported a checkpoint;
    Tune retries that trial (--max-failures) on the head from its last checkpoint, and all four finish."""
    worker = next(iter(cluster.worker_nodes))
    search = tmp_path / "search" / "node-loss"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "rnnlab.launch.cli", *_tune_argv(tmp_path, cluster, "node-loss", "--max-epochs", "3",
                                                                 "--max-failures", "2")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert process.poll() is None, process.stdout.read()[-3000:]
            reports = _trial_reports(search) if search.is_dir() else {}
            on_worker = [name for name, rows in reports.items() if any(r["node_id"] == worker.node_id for r in rows)]
            if on_worker:
                break
            time.sleep(0.2)
        assert on_worker, "no trial reported from the worker node"
        cluster.remove_node(worker, allow_graceful=False)
        removed_at = time.perf_counter() - started
        output, _ = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
        if not cluster.worker_nodes:
            cluster.add_node(**WORKER)  # the module's other tests want two nodes
    wall = time.perf_counter() - started
    assert process.returncode == 0, output[-3000:]
    rows = {row["trial"]: row for row in _csv(tmp_path / "search" / "results.csv")}
    print(f"node-loss search: worker removed at {removed_at:.1f} s, {len(rows)} trials, "
          f"{sum(int(r['retries']) for r in rows.values())} retries, "
          f"{sum(r['status'] == 'completed' for r in rows.values())} completed, wall {wall:.1f} s")
    assert len(rows) == 4 and all(row["status"] == "completed" and row["epochs"] == "3" for row in rows.values()), rows
    for name in on_worker:
        assert int(rows[name]["retries"]) >= 1
        starts = [json.loads(line) for line in (search / name / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["event"] == "config"]
        assert len(starts) >= 2 and "checkpoint_" in starts[-1]["resumed_from"], starts  # not from scratch


@pytest.mark.slow
def test_a_trial_of_two_cpu_workers_trains_over_gloo_and_reports_with_checkpoints(cluster, tmp_path):
    """--workers-per-trial 2: the trial is a Ray Train TorchTrainer of two gloo processes; rank 0's validations
    reach Tune through the trial's driver (tune.report with a checkpoint each epoch)."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"inherit": False, "params": {"train.lr": {"choice": [0.01]}}}))
    out = tmp_path / "search"
    assert main(["tune", "stock", "--preset", "smoke", "--source", str(make_stock_csv(tmp_path)), "--space",
                 str(space), "--num-samples", "1", "--max-epochs", "2", "--scheduler", "fifo",
                 "--workers-per-trial", "2", "--cpus-per-trial", "2", "--address", cluster.address, "--output",
                 str(out), "--name", "workers", "--quiet", "--set", "tracking.wandb=false"]) == 0
    [row] = _csv(out / "results.csv")
    assert row["status"] == "completed" and row["epochs"] == "2"
    trial = next((out / "workers").glob("trial_*"))
    config = next(json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["event"] == "config")
    assert config["world_size"] == 2  # one process group of two
    reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    assert len(reports) == 2 and all("val/mae" in r for r in reports)
    assert len(list(trial.glob("checkpoint_*"))) >= 1  # Tune took the checkpoints
    assert (trial / "bundle" / "config.json").is_file()


def test_workers_of_a_ray_instance_rnnlab_starts_run_at_normal_priority(monkeypatch):
    """Ray's default (nice 15) starves Serve replicas and Tune trials beside any other work on the machine."""
    import ray

    from rnnlab.cluster import connect

    def niceness() -> int:  # defined here: Ray ships it by value (workers cannot import this test module)
        return os.nice(0)

    # set, then removed: monkeypatch records the variable's absence and takes back what connect exports
    monkeypatch.setenv("RAY_worker_niceness", "")
    monkeypatch.delenv("RAY_worker_niceness")
    connect(None, num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        assert ray.get(ray.remote(niceness).remote()) == os.nice(0)
    finally:
        ray.shutdown()
