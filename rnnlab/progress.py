"""Progress of a long loop (training steps, a download, a teacher labelling reviews): tqdm's bar on a terminal,
a plain line now and then anywhere else.

tqdm redraws its bar in place, up to ten times a second, with carriage returns: one line on a terminal, but a
log file or a pipe (``make demo > log``, Ray Tune's trial logs, CI) keeps every redraw. Where the stream is not
a terminal, :func:`progress_bar` writes a line when another tenth of the total is done or ``every_s`` seconds
have passed, and one at the end, with tqdm's own figures (done, rate, time left, the postfix).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

LINE_EVERY_S = 60.0
LINE_EVERY_FRACTION = 0.1


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
                 unit_scale: bool = False, initial: int = 0, disable: bool = False, file: TextIO | None = None,
                 every_s: float = LINE_EVERY_S, **bar_options: Any):
    """A tqdm bar on a terminal or in a notebook (``bar_options`` go to it: ``leave``, ``dynamic_ncols``...), else
    :class:`ProgressLines`. Either takes ``update(n)``, ``set_postfix(**values)`` and ``close()``, iterates over
    ``iterable`` and works as a with-block. ``file``: where it writes (default: stderr, as tqdm)."""
    from tqdm.auto import tqdm

    stream = file if file is not None else sys.stderr
    if disable or _interactive(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, initial=initial,
                    disable=disable, file=file, **bar_options)
    return ProgressLines(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, initial=initial,
                         stream=stream, every_s=every_s)


def _interactive(stream: TextIO) -> bool:
    # a notebook's streams are no terminal, but tqdm.auto draws its widget there
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class ProgressLines:
    """tqdm's figures as whole lines, a few per run: see the module docstring."""

    def __init__(self, iterable: Iterable | None, *, desc: str, total: float | None, unit: str, unit_scale: bool,
                 initial: int, stream: TextIO, every_s: float) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit, self.unit_scale = iterable, desc, total, unit, unit_scale
        self.stream, self.every_s = stream, every_s
        self.initial = self.n = self.written = initial
        self.started = self.last_line = time.monotonic()
        self.postfix = ""
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        tenth = self.total * LINE_EVERY_FRACTION if self.total else None
        if now - self.last_line >= self.every_s or (tenth and self.n - self.written >= tenth):
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def close(self) -> None:
        if not self.closed and self.n != self.written:
            self._write(time.monotonic())
        self.closed = True

    def _write(self, now: float) -> None:
        from tqdm import tqdm

        shape = ("{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
                 if self.total else "{desc}: {n_fmt}" + (self.unit if self.unit_scale else "")
                 + " [{elapsed}, {rate_fmt}{postfix}]")
        line = tqdm.format_meter(self.n, self.total, now - self.started, prefix=self.desc, unit=self.unit,
                                 unit_scale=self.unit_scale, postfix=self.postfix or None, initial=self.initial,
                                 bar_format=shape)
        print(line, file=self.stream, flush=True)
        self.written, self.last_line = self.n, now
