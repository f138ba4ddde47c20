"""Shared by the benchmark scripts: a throughput timer, precision contexts, a machine description and the JSON report
(the serving benchmarks' own shared code is in _harness.py)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Throughput:
    """``units`` (characters or tokens) trained on in ``seconds`` over ``steps`` optimizer steps."""

    units: int = 0
    seconds: float = 0.0
    steps: int = 0

    @property
    def per_second(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else float("nan")

    def add(self, other: Throughput) -> Throughput:
        return Throughput(self.units + other.units, self.seconds + other.seconds, self.steps + other.steps)

    def as_dict(self, unit: str) -> dict[str, float]:
        return {f"{unit}_per_s": self.per_second, unit: self.units, "seconds": self.seconds, "steps": self.steps,
                "s_per_step": self.seconds / self.steps if self.steps else float("nan")}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], int], *, device: torch.device, seconds: float, max_steps: int | None = None,
            warmup_steps: int = 2) -> Throughput:
    """Run ``step`` (one optimizer step; returns the units it trained on) for about ``seconds`` of wall time.

    The first ``warmup_steps`` are not timed (allocator, cuDNN plans, lazy imports). The clock stops after the
    step that crosses ``seconds`` or after ``max_steps``, with the device synchronized before each reading.
    """
    for _ in range(warmup_steps):
        step()
    synchronize(device)
    result = Throughput()
    start = time.perf_counter()
    while True:
        result.units += step()
        result.steps += 1
        if max_steps is not None and result.steps >= max_steps:
            break
        # Synchronizing every step would serialize a GPU; check the clock every few steps there instead.
        if device.type != "cuda" or result.steps % 10 == 0:
            synchronize(device)
            if time.perf_counter() - start >= seconds:
                break
    synchronize(device)
    result.seconds = time.perf_counter() - start
    return result


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """fp32 (nothing) or bf16/fp16 autocast on the device, as the rnnlab trainer's mixed precision does."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def machine_description(device: torch.device | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    try:  # the CPU model name is in /proc/cpuinfo on Linux
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), python {platform.python_version()}")
    if device is not None and device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}, cuDNN {torch.backends.cudnn.version()}"
    return text


def write_json(path, report: dict) -> None:
    """Save a benchmark's report (``--json``), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
