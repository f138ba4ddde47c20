"""Processes a test starts and waits for together (the ranks of a multi-process run): each writes its output to a
file, never to a pipe nobody drains, and when any of them fails or the deadline passes, the rest are stopped and the
test fails with every process's output, so a hang or a crash on a busy CI machine says what each process did."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

TAIL = 4000  # characters of each process's output in a failure message


class Processes:
    """``with Processes(folder) as group: group.start("rank0", argv, env=...)``; ``group.wait(timeout)`` returns
    each one's output once all exit 0. On leaving the block every process still running is killed with its
    children (a launcher's workers included)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], **popen) -> subprocess.Popen:
        log = open(self.log(name), "w")  # noqa: SIM115 -- the process holds it; closed after it exits
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                   **popen)
        log.close()  # the child has its own copy of the descriptor
        self.started[name] = process
        return process

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def output(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")

    def report(self, why: str) -> str:
        parts = [why]
        for name, process in self.started.items():
            parts.append(f"----- {name} (pid {process.pid}, exit {process.poll()}), last {TAIL} characters -----\n"
                         + self.output(name)[-TAIL:])
        return "\n".join(parts)

    def wait(self, timeout: float) -> dict[str, str]:
        """Until every process has exited 0; fails at once when one exits non-zero, or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            codes = {name: process.poll() for name, process in self.started.items()}
            failed = {name: code for name, code in codes.items() if code not in (None, 0)}
            if failed:
                raise AssertionError(self.report(f"exited non-zero: {failed}"))
            if all(code == 0 for code in codes.values()):
                return {name: self.output(name) for name in self.started}
            if time.monotonic() > deadline:
                running = [name for name, code in codes.items() if code is None]
                raise AssertionError(self.report(f"still running after {timeout:g} s: {running}"))
            time.sleep(0.1)  # polling exit codes, not synchronising on an event

    def stop(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # its own session: the launcher and its workers
                process.wait()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

