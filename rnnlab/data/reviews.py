"""Review files: the IMDb archive or folder (read once, never extracted) and a user's labelled reviews.

* :func:`read_imdb` streams ``aclImdb_v1.tar.gz`` once with :mod:`tarfile` (the 100k small files are never
  extracted to disk) or reads a folder in the aclImdb layout.
* :func:`read_labelled_reviews` reads a folder of ``pos/`` and ``neg/`` text files or a ``text,label`` CSV
  (``rnnlab evaluate --data``).
* :func:`source_fingerprint` identifies a source cheaply (path, size, mtime): the key of the token caches.

Tokenizing and caching are :mod:`rnnlab.data.imdb`'s.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlab.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "unsup")
# split -> (folder in aclImdb, class folder, label)
_FOLDERS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "train": (("train", "neg", 0), ("train", "pos", 1)),
    "test": (("test", "neg", 0), ("test", "pos", 1)),
    "unsup": (("train", "unsup", -1),),
}
_REVIEW_NAME = re.compile(r"(\d+)_(\d+)\.txt")


@dataclass(frozen=True)
class Review:
    text: str
    label: int  # 1 positive, 0 negative, -1 unlabelled (unsup)
    rating: int  # the star rating from the file name (0 for unsup)
    id: int  # the number before the underscore in the file name


# --------------------------------------------------------------------------------------------- reading


def read_imdb(path: str | os.PathLike, splits: Sequence[str] = ("train", "test")) -> dict[str, list[Review]]:
    """Reviews per split from ``aclImdb_v1.tar.gz`` (streamed, never extracted) or an aclImdb folder.

    The folder may be ``aclImdb`` itself or its parent. ``"unsup"`` (train/unsup) is read only when asked.
    Order is deterministic: sorted by the member name inside aclImdb (``train/neg/0_3.txt`` ...).
    Empty reviews are skipped and counted in the log.
    """
    records, _ = read_splits(Path(path), splits)
    return records


def read_splits(path: Path, splits: Sequence[str]) -> tuple[dict[str, list[Review]], Counter]:
    """:func:`read_imdb` and what it skipped, counted by reason."""
    unknown = [split for split in splits if split not in _FOLDERS]
    if unknown:
        raise ConfigError(f"Unknown IMDb split {unknown[0]!r}; choose from {', '.join(SPLITS)}.")
    wanted = {(folder, cls): label for split in splits for folder, cls, label in _FOLDERS[split]}
    started = time.perf_counter()
    if path.is_dir():
        files = _read_folder(path, wanted)
    elif path.is_file():
        files = _read_archive(path, wanted)
    else:
        raise DataError(f"The IMDb source {path} does not exist; pass aclImdb_v1.tar.gz or an aclImdb folder.")
    for folder, cls in wanted:
        if (folder, cls) not in files:
            raise DataError(
                f"{path} has no aclImdb/{folder}/{cls} folder; pass the aclImdb_v1.tar.gz archive "
                f"or a folder in its layout."
            )

    skipped: Counter = Counter()
    records: dict[str, list[Review]] = {}
    for split in splits:
        reviews = []
        for folder, cls, label in _FOLDERS[split]:
            for name, raw in sorted(files[folder, cls]):
                review = _review(name, raw, label, skipped)
                if review is not None:
                    reviews.append(review)
        records[split] = reviews
    log_skipped(path, skipped)
    log.info(
        "read %s reviews from %s in %.1fs",
        ", ".join(f"{len(v):,} {k}" for k, v in records.items()),
        path,
        time.perf_counter() - started,
    )
    return records, skipped


def _review(name: str, raw: bytes, label: int, skipped: Counter) -> Review | None:
    match = _REVIEW_NAME.fullmatch(name)
    if match is None:
        skipped["files not named <id>_<rating>.txt"] += 1
        return None
    text = _decode(raw, skipped)
    if not text.strip():
        skipped["empty reviews"] += 1
        return None
    return Review(text=text, label=label, rating=int(match.group(2)), id=int(match.group(1)))


def _decode(raw: bytes, skipped: Counter) -> str:
    """A review file's text; bytes that are not UTF-8 are replaced (and counted), the review kept."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped["reviews not valid UTF-8 (kept, bad bytes replaced)"] += 1
        return raw.decode("utf-8", errors="replace")


def log_skipped(path: Path, skipped: Counter) -> None:
    for what, count in sorted(skipped.items()):
        log.warning("%s: skipped %d %s", path, count, what)


def _read_archive(path: Path, wanted: dict[tuple[str, str], int]) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
    """One pass over the gzip stream; only the wanted members are read into memory."""
    files: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = _inside_aclimdb(member.name)
                if parts is None or (parts[0], parts[1]) not in wanted:
                    continue
                handle = archive.extractfile(member)
                files.setdefault((parts[0], parts[1]), []).append((parts[2], handle.read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise DataError(
            f"{path} is not a readable .tar.gz archive ({error}); fetch aclImdb_v1.tar.gz again."
        ) from None
    return files


def _inside_aclimdb(name: str) -> tuple[str, str, str] | None:
    """``aclImdb/train/pos/0_9.txt`` -> ("train", "pos", "0_9.txt"); other members -> None."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if parts and parts[0] == "aclImdb":
        parts = parts[1:]
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def _dataset_root(path: Path) -> Path:
    """Accept the aclImdb folder itself or the folder that holds it."""
    if not (path / "train").is_dir() and not (path / "test").is_dir() and (path / "aclImdb").is_dir():
        return path / "aclImdb"
    return path


def _read_folder(path: Path, wanted: dict[tuple[str, str], int]) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
    root = _dataset_root(path)
    files: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    for folder, cls in wanted:
        directory = root / folder / cls
        if not directory.is_dir():
            continue  # reported by the caller, with the same sentence as for an archive
        with os.scandir(directory) as entries:
            files[folder, cls] = [
                (entry.name, Path(entry.path).read_bytes()) for entry in entries if entry.is_file()
            ]
    return files


def source_fingerprint(path: Path) -> dict:
    """What identifies the source cheaply: resolved path, size and mtime (of every review file for a folder)."""
    path = path.resolve()
    if path.is_file():
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    root = _dataset_root(path)
    size = newest = count = 0
    for folder, cls, _ in _FOLDERS["train"] + _FOLDERS["test"]:
        directory = root / folder / cls
        if directory.is_dir():
            with os.scandir(directory) as entries:
                for entry in entries:
                    stat = entry.stat()
                    size, newest, count = size + stat.st_size, max(newest, stat.st_mtime_ns), count + 1
    return {"path": str(path), "size": size, "mtime_ns": newest, "files": count}


# --------------------------------------------------------------------------------------------- user data

# Label spellings a CSV may use (compared lowercased, stripped).
_LABEL_WORDS = {"1": 1, "positive": 1, "pos": 1, "0": 0, "negative": 0, "neg": 0}


@dataclass
class LabelledTexts:
    """Reviews of any source with their labels (1 positive, 0 negative), in a stable order."""

    texts: list[str]
    labels: np.ndarray  # int8
    skipped: dict[str, int]  # what was left out, and how many


def read_labelled_reviews(path: str | os.PathLike) -> LabelledTexts:
    """Labelled reviews from a folder holding ``pos/`` and ``neg/`` text files (one review per file, as in
    aclImdb's train/ and test/) or from a CSV with ``text`` and ``label`` columns (label 1/0, positive/negative
    or pos/neg; header names in any case). A malformed source is a DataError naming what to fix."""
    path = Path(path)
    if path.is_dir():
        return _read_review_folder(path)
    if path.is_file():
        return _read_review_csv(path)
    raise DataError(
        f"{path} does not exist; pass a folder with pos/ and neg/ text files or a CSV with text,label columns."
    )


def _read_review_folder(path: Path) -> LabelledTexts:
    folders = {label: path / name for name, label in (("neg", 0), ("pos", 1))}
    missing = [folder.name for folder in folders.values() if not folder.is_dir()]
    if missing:
        raise DataError(
            f"{path} has no {' and no '.join(f'{name}/' for name in missing)} folder; pass a folder with pos/ and "
            "neg/ text files (one review per file) or a CSV with text,label columns."
        )
    texts, labels, skipped = [], [], Counter()
    for label, folder in folders.items():
        for file in sorted(entry for entry in folder.iterdir() if entry.is_file()):
            texts.append(_decode(file.read_bytes(), skipped))
            labels.append(label)
    if not texts:
        raise DataError(f"{path}/pos and {path}/neg hold no files; put one review per text file in them.")
    return LabelledTexts(texts, np.asarray(labels, dtype=np.int8), dict(skipped))


def _read_review_csv(path: Path) -> LabelledTexts:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        raise DataError(
            f"{path} is not a readable UTF-8 CSV ({first_line(error)}); pass a CSV with text,label columns or a "
            "folder with pos/ and neg/ text files."
        ) from None
    columns = {str(name).strip().lower(): name for name in frame.columns}
    if "text" not in columns or "label" not in columns:
        raise DataError(
            f"{path} has columns {', '.join(map(str, frame.columns)) or 'none'} but needs text and label; "
            "write a header line text,label."
        )
    if frame.empty:
        raise DataError(f"{path} has a header but no reviews; add rows of text,label.")
    labels = []
    for row, value in enumerate(frame[columns["label"]], start=2):  # line 1 is the header
        label = _LABEL_WORDS.get(value.strip().lower())
        if label is None:
            raise DataError(
                f"{path} line {row}: the label {value!r} is not one of 1/0, positive/negative, pos/neg; fix that row."
            )
        labels.append(label)
    return LabelledTexts(list(frame[columns["text"]]), np.asarray(labels, dtype=np.int8), {})
