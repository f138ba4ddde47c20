"""Shared by the benchmark scripts: a throughput timer, precision contexts and a machine description; for the serving
benchmarks a free port, a service's stop and a stream's outcome."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
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


# --- serving benchmarks ----------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_service(service: subprocess.Popen) -> None:
    """Ctrl-C to an `rnnlab serve` started in its own session (it drains and stops Ray), SIGKILL after 2 minutes."""
    if service.poll() is None:
        os.killpg(service.pid, signal.SIGINT)
        try:
            service.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)


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
