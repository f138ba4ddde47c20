"""Where a Serve replica's memory goes, for long runs (``benchmarks/soak.py --trace-memory DIR``).

With ``RNNLAB_TRACE_MEMORY=DIR`` in the environment Ray's processes inherit, a replica that calls
:func:`trace_from_env` starts tracemalloc and, every ``RNNLAB_TRACE_MEMORY_S`` seconds (default 120), writes to DIR
one line to ``<name>-<pid>.txt`` (its RSS; the bytes tracemalloc holds, i.e. Python's allocations; glibc's malloc
counters, every arena together: in use, free inside the arenas, in mmapped blocks; its threads; its most numerous
object types) and its tracemalloc snapshot (``<name>-<pid>-<n>.snapshot``). Comparing snapshots is left to
another process (``python -m rnnlab.serve.memory DIR``: the allocation sites that grew most, by traceback), since
tracemalloc's comparison is pure Python and would take minutes of the traced replica's own time.

How to read it: Python bytes flat while RSS grows points at native code or at the allocator (free bytes growing
inside the arenas: fragmentation); a growing site names the structure that holds the memory. Tracing costs a few
times the allocation time, so it is off unless asked for.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import itertools
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

ENV_DIR = "RNNLAB_TRACE_MEMORY"
ENV_INTERVAL = "RNNLAB_TRACE_MEMORY_S"
FRAMES = 12  # traceback depth kept per allocation: enough to reach rnnlab's or Serve's frame from the stdlib's


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_counters() -> dict[str, float] | None:
    """glibc's heap in MiB, every arena together: in use, free inside the arenas, in mmapped blocks (None off
    glibc)."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"in_use_mb": round(info.uordblks / 2**20, 1), "free_mb": round(info.fordblks / 2**20, 1),
            "mmapped_mb": round(info.hblkhd / 2**20, 1)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_dump(directory: Path, name: str, n: int, seconds: float) -> None:
    """One dump of a traced process: its line appended to ``<name>-<pid>.txt`` (``seconds`` since tracing began)
    and snapshot ``n``."""
    snapshot = tracemalloc.take_snapshot()
    snapshot.dump(str(directory / f"{name}-{os.getpid()}-{n:04d}.snapshot"))
    traced, _ = tracemalloc.get_traced_memory()
    types = collections.Counter(type(thing).__qualname__ for thing in gc.get_objects())
    line = (f"t={seconds:.0f}s rss={_rss_mb():.1f}MiB traced={traced / 2**20:.1f}MiB malloc={malloc_counters()} "
            f"threads={threading.active_count()} objects={dict(types.most_common(12))}")
    with (directory / f"{name}-{os.getpid()}.txt").open("a") as handle:
        handle.write(line + "\n")


def _watch(directory: Path, name: str, interval_s: float) -> None:
    began = time.monotonic()
    for n in itertools.count():
        time.sleep(interval_s)
        write_dump(directory, name, n, time.monotonic() - began)


def trace_from_env(name: str) -> None:
    """Start tracing this process's memory if ``RNNLAB_TRACE_MEMORY`` names a folder (see the module docstring)."""
    directory = os.environ.get(ENV_DIR)
    if not directory or tracemalloc.is_tracing():
        return
    tracemalloc.start(FRAMES)
    Path(directory).mkdir(parents=True, exist_ok=True)
    interval_s = float(os.environ.get(ENV_INTERVAL) or 120)
    threading.Thread(target=_watch, args=(Path(directory), name, interval_s), name="rnnlab-trace-memory",
                     daemon=True).start()


def growth(first: Path, last: Path, top: int = 15) -> str:
    """The ``top`` allocation sites (by traceback) whose bytes grew most from snapshot ``first`` to ``last``."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    then = tracemalloc.Snapshot.load(str(first)).filter_traces(ignore)
    now = tracemalloc.Snapshot.load(str(last)).filter_traces(ignore)
    lines = []
    for diff in now.compare_to(then, "traceback")[:top]:
        lines.append(f"{diff.size_diff / 2**10:+10.1f} KiB {diff.count_diff:+7d} blocks (now {diff.size / 2**10:.1f} "
                     f"KiB in {diff.count})")
        lines.extend(f"      {frame.filename}:{frame.lineno}" for frame in diff.traceback)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m rnnlab.serve.memory DIR [FROM]``: per traced process, what grew from its snapshot number FROM
    (default: its first) to its last."""
    directory, start = Path(argv[0]), int(argv[1]) if len(argv) > 1 else 0
    for summary in sorted(directory.glob("*.txt")):
        snapshots = sorted(directory.glob(f"{summary.stem}-*.snapshot"))
        print(f"== {summary.stem}\n{summary.read_text()}")
        if len(snapshots) > start + 1:
            print(f"-- grown from {snapshots[start].name} to {snapshots[-1].name}\n"
                  f"{growth(snapshots[start], snapshots[-1])}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
