"""What a run records: ``metrics.jsonl`` (one JSON object per event), the W&B run (offline unless
``WANDB_API_KEY`` is set; ``WANDB_DIR`` overrides its folder) and the train-loss / throughput window."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from rnnlab.config import JobConfig
from rnnlab.errors import first_line
from rnnlab.trainers import durable

log = logging.getLogger(__name__)


class MetricsLog:
    """``metrics.jsonl`` on the main process: one JSON object per event, appended (a resumed run continues it).
    A line a killed run left half-written is cut off first, so every line stays whole JSON."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            with durable.storage("metrics.jsonl", path.parent):
                _drop_partial_line(path)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with durable.storage("metrics.jsonl", self.path.parent), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=_jsonable) + "\n")


def _drop_partial_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Tracking:
    """Every record of a run goes through here: to W&B (when ``tracking.wandb``) and to metrics.jsonl."""

    def __init__(self, accelerator, config: JobConfig, output_dir: Path) -> None:
        self.accelerator = accelerator
        self.log_file = MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process)
        self.tracker = None  # the wandb run, on the main process (jobs log figures and tables to it)
        self._warned = False
        if config.tracking.wandb:
            self._start_wandb(config, output_dir)

    def _start_wandb(self, config: JobConfig, output_dir: Path) -> None:
        """W&B failing to start (a bad key, no network) never stops training: offline, else no W&B at all."""
        accelerator = self.accelerator
        init_kwargs = wandb_settings(config, output_dir) if accelerator.is_main_process else {}
        try:
            accelerator.init_trackers(config.tracking.project, config=config.to_dict(),
                                      init_kwargs={"wandb": init_kwargs})
        except Exception as error:  # W&B raises its own errors, and anything its service does
            log.warning("W&B could not start (%s); logging this run offline under %s instead.", first_line(error),
                        init_kwargs.get("dir", output_dir))
            os.environ["WANDB_MODE"] = "offline"
            accelerator.trackers = []
            try:
                accelerator.init_trackers(config.tracking.project, config=config.to_dict(),
                                          init_kwargs={"wandb": {**init_kwargs, "mode": "offline"}})
            except Exception as again:
                log.warning("W&B could not start offline either (%s); this run logs to metrics.jsonl only.",
                            first_line(again))
                accelerator.trackers = []
                return
        if accelerator.is_main_process:
            self.tracker = accelerator.get_tracker("wandb", unwrap=True)

    def log(self, event: str, metrics: dict, *, step: int, **fields: Any) -> None:
        """``metrics`` as ``event/name`` to W&B at ``step``, and one ``event`` line (with ``fields``) to the file.
        A W&B failure is a warning (once): the run, its checkpoints and metrics.jsonl go on."""
        try:
            self.accelerator.log({f"{event}/{k}": v for k, v in metrics.items()}, step=step)
        except Exception as error:
            if not self._warned:
                log.warning("W&B logging failed (%s); metrics.jsonl keeps every record.", first_line(error))
                self._warned = True
        self.log_file.write(event, step=step, **fields, **metrics)

    def write(self, event: str, **fields: Any) -> None:
        """A line in metrics.jsonl only (the run's config, its summary)."""
        self.log_file.write(event, **fields)


def wandb_settings(config: JobConfig, output_dir: Path) -> dict:
    """init_kwargs for accelerate's W&B tracker; offline unless an API key is set."""
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    run_id_file = output_dir / "wandb_run_id.txt"
    if run_id_file.is_file():  # a resumed run continues the same W&B run
        run_id = run_id_file.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)  # W&B's own ids are 8 random characters too
        run_id_file.write_text(run_id)
    return {
        "name": config.tracking.run_name,
        "group": config.tracking.group,
        "dir": os.environ.get("WANDB_DIR") or str(output_dir),
        "id": run_id,
        "resume": "allow",
        "job_type": config.job,
    }


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class TrainWindow:
    """Train-loss and throughput accumulators between two log lines (reduced across processes at log time)."""

    def __init__(self, device) -> None:
        self.device = device
        self.grad_norm = None
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.units = 0
        self.samples = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self.started = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, batch) -> None:
        self.loss += loss_sum.double()
        self.units += batch.global_units
        self.samples += batch.samples
        self.tokens += batch.tokens

    def flush(self, accelerator, lr: float) -> dict:
        totals = accelerator.reduce(torch.stack([self.loss, self.samples, self.tokens]), reduction="sum")
        seconds = max(time.perf_counter() - self.started, 1e-9)
        record = {
            "loss": float(totals[0]) / max(1, self.units),
            "lr": float(lr),
            "samples_per_s": float(totals[1]) / seconds,
            "tokens_per_s": float(totals[2]) / seconds,
            "peak_memory_mb": round(_peak_memory_mb(), 1),
        }
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        self._reset()
        return record
