"""Progress where no one watches a terminal (a log file, a pipe, Ray Tune's trial logs): a line per tenth or per
minute, not one per update; on a terminal, tqdm's bar as before."""

from __future__ import annotations

import io

import pytest

from rnnlab.progress import ProgressLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """time.monotonic for rnnlab.progress, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("rnnlab.progress.time.monotonic", clock)
    return clock


def test_a_log_gets_a_line_per_tenth_and_one_at_the_end(clock):
    log = io.StringIO()
    with progress_bar(total=1000, desc="train stock", file=log) as bar:
        for step in range(1000):
            clock.now += 0.01
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in log.getvalue()
    assert lines[0].startswith("train stock:  10% 100/1000 [00:01<00:09, 100.00it/s")
    assert lines[-1].startswith("train stock: 100% 1000/1000") and lines[-1].endswith("loss=0.0010]")


def test_without_a_total_a_line_per_minute_and_one_at_the_end(clock):
    log = io.StringIO()
    with progress_bar(total=None, desc="djia.csv", unit="B", unit_scale=True, leave=False, file=log) as bar:
        for _ in range(1200):  # 150 s of 1 MiB blocks
            clock.now += 0.125
            bar.update(1 << 20)
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and lines[0] == "djia.csv: 503MB [01:00, 8.39MB/s]"
    assert lines[-1] == "djia.csv: 1.26GB [02:30, 8.39MB/s]"


def test_iterating_writes_its_lines_and_a_resumed_count_starts_where_it_was(clock):
    log = io.StringIO()
    assert list(progress_bar(range(25), desc="labels", unit="k reviews", file=log)) == list(range(25))
    lines = log.getvalue().splitlines()
    assert len(lines) == 9 and lines[-1] == "labels: 100% 25/25 [00:00<?, ?k reviews/s]"
    log = io.StringIO()
    bar = progress_bar(total=100, initial=90, desc="train stock", file=log)
    bar.update(5)
    bar.close()
    bar.close()
    assert log.getvalue().splitlines() == ["train stock:  95% 95/100 [00:00<?, ?it/s]"]


def test_a_terminal_keeps_tqdms_bar_and_disabled_writes_nothing():
    from tqdm.auto import tqdm

    terminal = Terminal()
    bar = progress_bar(total=10, desc="train stock", file=terminal)
    assert isinstance(bar, tqdm)
    bar.close()
    log = io.StringIO()
    bar = progress_bar(total=10, desc="train stock", file=log, disable=True)
    assert not isinstance(bar, ProgressLines)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""


def test_a_training_run_into_a_log_writes_a_few_progress_lines(tmp_path, capsys):
    from tiny_datasets import make_stock_csv

    from rnnlab.config import load_config
    from rnnlab.trainers.loop import train

    csv = make_stock_csv(tmp_path)
    config = load_config("stock", "smoke", overrides=[f"data.source={csv}", "tracking.wandb=false",
                                                      "train.progress=true", "train.epochs=4"])
    train(config, tmp_path / "run")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train stock:")]
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("train stock: 100% 32/32")
