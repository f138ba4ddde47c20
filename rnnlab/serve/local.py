"""A local service for the demo, the tests and the benchmarks: started, waited for, stopped.

    with LocalService(bundles, ["--max-streams", "4"]) as service:   # `rnnlab serve` in a subprocess, as users start it
        httpx.get(f"{service.url}/healthz")
    with in_process() as url:                                       # Ray and Serve in this process
        deploy({"bundles": str(bundles)})

:class:`LocalService` waits for the service's ready line (rnnlab/serve/service.py prints it once every deployment is
up) within a deadline, and fails with what the process printed when it exits or the deadline passes first. The
process runs in a session of its own: stopping it sends Ctrl-C's SIGINT to its process group (the service drains
and stops Ray), SIGKILL after a grace period, and then kills whatever of the session is left, so no Ray process
outlives it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from rnnlab.serve.service import free_port


class ServiceFailed(RuntimeError):
    """The service exited, or did not say it was serving in time; the message ends with what it printed."""


class LocalService:
    """``rnnlab serve --bundles BUNDLES --port PORT ARGS...`` on 127.0.0.1 (``port``: a free one by default), in
    its own session. ``env``: its environment (default: this process's). Its output is kept (:attr:`output`),
    and also printed as it comes with ``echo``, and written to ``log`` when given. ``kill_after_s``: a watchdog
    that kills it that long after it started, so a hang fails a test instead of stalling it."""

    def __init__(self, bundles: str | Path, args: Sequence[str] = (), *, port: int | None = None,
                 env: dict | None = None, echo: bool = False, log: str | Path | None = None,
                 kill_after_s: float | None = None) -> None:
        self.port = port or free_port()
        self.command = [sys.executable, "-m", "rnnlab.launch.cli", "serve", "--bundles", str(bundles),
                        "--port", str(self.port), *args]
        self.env, self.echo, self.log, self.kill_after_s = env, echo, log, kill_after_s
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.ready_line: str | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def ray_address(self) -> str:
        """The Ray address the ready line gives for ``rnnlab swap``, read from the whole output: Ray's processes
        write to the same pipe, and a line of theirs landing inside the ready line (a test once saw it cut short)
        moves the rest of it to a line of its own."""
        return re.search(r"rnnlab swap --address (\S+)", self.output).group(1)

    def start(self, timeout_s: float = 600) -> str:
        """Start it and wait until it serves; returns its ready line. ServiceFailed (the process stopped) when it
        exits first or is not serving within ``timeout_s``."""
        from rnnlab.serve.service import READY

        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(READY,), daemon=True)
        self._reader.start()
        self._watchdog = threading.Timer(self.kill_after_s, self._kill) if self.kill_after_s else None
        if self._watchdog is not None:
            self._watchdog.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
        if self.ready_line is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)  # its output ended first, or the deadline passed
            code = self.process.poll()
            self.stop(grace_s=10)
            why = f"exited with code {code}" if code is not None else f"was not serving within {timeout_s:.0f} s"
            printed = "" if self.echo else f"; it printed:\n{self.output[-5000:]}"  # echoed: on screen already
            raise ServiceFailed(f"rnnlab serve {why}{printed}")
        return self.ready_line

    def stop(self, grace_s: float = 120) -> int | None:
        """Ctrl-C (SIGINT to its process group), SIGKILL after ``grace_s``, then any process of its session that
        is left; returns its exit code (None if it was never started)."""
        if self.process is None:
            return None
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.process.poll() is None:
            self._signal_group(signal.SIGINT)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._kill()
        for pid in self.session_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(timeout=30)  # the pipe ends once the last process holding it is gone
        return self.process.wait()

    def session_processes(self) -> list[int]:
        """The live processes of its session (the service and the Ray processes it started; Linux /proc)."""
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[3]) == self.process.pid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
        return alive

    def __enter__(self) -> LocalService:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _read(self, ready: str) -> None:
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(open(self.log, "w", encoding="utf-8")) if self.log else None
            for line in self.process.stdout:
                self.lines.append(line)
                if self.echo:
                    print(line, end="", flush=True)
                if log is not None:
                    log.write(line)
                    log.flush()
                if self.ready_line is None and line.startswith(ready):
                    self.ready_line = line
                    self._ready.set()
        self._ready.set()  # the output ended: the process is gone

    def _kill(self) -> None:
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


@contextlib.contextmanager
def in_process(port: int | None = None, *, direct: bool = False, http_options: dict | None = None,
               **ray_init) -> Iterator[str]:
    """A new local Ray instance in this process (2 CPUs, no dashboard, quiet; ``ray_init`` adds to or overrides
    that) with Serve's HTTP entry at 127.0.0.1:``port`` (a free one by default): yields the base URL, and shuts
    Serve and Ray down after. ``direct``: the Gateway replica takes the port itself, as ``rnnlab serve`` does by
    default; else Ray's proxy. :func:`deploy` puts the application there."""
    import ray
    from ray import serve

    from rnnlab.cluster import connect
    from rnnlab.serve.service import choose_ingress, set_ray_environment

    port = port or free_port()
    proxy_port = choose_ingress(direct, "127.0.0.1", port)
    set_ray_environment()
    # always a new instance, never a cluster some `ray start` on this machine left running (rnnlab/cluster.py)
    connect(None, **({"num_cpus": 2, "include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
                     | ray_init))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port, **(http_options or {})})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(args: dict) -> None:
    """``build_app(args)`` deployed from Python (``serve.run``) into the Serve of :func:`in_process`; deploying
    again with other arguments restarts every replica (``rnnlab serve`` deploys from a config instead, which
    ``rnnlab swap`` can update in place)."""
    from ray import serve

    from rnnlab.serve.app import build_app
    from rnnlab.serve.service import APP_NAME

    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
