"""rnnlab.serve.memory: a traced replica's dumps, and the report that names the allocation site that grew."""

from __future__ import annotations

import itertools
import tracemalloc

from rnnlab.serve import memory

HELD: list = []


def hold_a_megabyte() -> None:
    HELD.append([bytes(1024) for _ in range(1024)])  # the site the report must name


def test_the_report_names_the_allocation_site_that_grew_between_two_dumps(tmp_path, capsys):
    tracemalloc.start(memory.FRAMES)
    try:
        memory.write_dump(tmp_path, "Gateway", 0, 0.0)
        hold_a_megabyte()
        memory.write_dump(tmp_path, "Gateway", 1, 120.0)
    finally:
        tracemalloc.stop()
        HELD.clear()

    assert memory.main([str(tmp_path)]) == 0
    report = capsys.readouterr().out
    lines = report.splitlines()
    assert lines[1].startswith("t=0s rss=") and "traced=" in lines[1] and lines[2].startswith("t=120s rss=")
    grown = report.split("-- grown from", 1)[1].splitlines()[1:]
    assert float(grown[0].split()[0]) >= 1024  # the top site: "+1040.2 KiB ...", a megabyte and more
    first_traceback = list(itertools.takewhile(lambda text: "KiB" not in text, grown[1:]))
    line = hold_a_megabyte.__code__.co_firstlineno + 1
    assert f"{__file__}:{line}" in "\n".join(first_traceback)

def test_malloc_counters_are_megabytes_in_use_free_and_mmapped():
    counters = memory.malloc_counters()
    assert counters is not None and set(counters) == {"in_use_mb", "free_mb", "mmapped_mb"}
    assert counters["in_use_mb"] > 0
