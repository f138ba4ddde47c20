"""Writing a file so that no reader and no crash ever sees half of it (the one copy; stdlib only, a leaf).

:func:`atomic_write` writes into a temporary ``.part-*`` file beside the target and renames it into place: a
reader sees the old file or the new one, whole. ``durable=True`` also flushes the bytes to the disk before
the rename and the folder's entry after it, so a power cut cannot leave a renamed file whose bytes never
landed (what checkpoints and their pointers need; caches and downloads can be rebuilt, so they skip it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PART_PREFIX = ".part-"  # temporary files are named .part-*; a crash may leave one, never a half target


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's bytes (a folder: its entries, i.e. renames into it) to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike, mode: str = "wb", *, durable: bool = False, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Yield a handle to write ``target``'s new contents into; on a clean exit it replaces ``target``.

    On an exception the temporary file is removed and ``target`` is left as it was. The temporary file's
    path is ``handle.name`` (e.g. to check a download before it is kept). Missing parent folders are made.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', not {mode!r}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{PART_PREFIX}{target.name}.{secrets.token_hex(6)}.tmp")
    # "x": a fresh file with the usual permissions (umask), never one another writer has open
    handle = open(part, mode.replace("w", "x"), encoding=None if "b" in mode else (encoding or "utf-8"))
    try:
        with handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(target.parent)
