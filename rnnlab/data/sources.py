"""Where the three data sets come from: a local mirror, the download cache, or their canonical address.

Resolution order for a data set:
1. a mirror folder (``--data-mirror`` flag, else ``RNNLAB_DATA_MIRROR``) holding the file under its usual name;
2. the download cache (``RNNLAB_CACHE_DIR``, default ``~/.cache/rnnlab``) from an earlier download;
3. a download from the canonical address into the cache.

Every file is checked against its SHA-256 before use. A missing file with no network ends in one
sentence that says what to fetch and where to put it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rnnlab.errors import DataError
from rnnlab.files import atomic_write

log = logging.getLogger(__name__)

MIRROR_ENV = "RNNLAB_DATA_MIRROR"
CACHE_ENV = "RNNLAB_CACHE_DIR"


@dataclass(frozen=True)
class DatasetFile:
    name: str
    filename: str
    url: str
    # Accepted checksums: the canonical file, and documented re-packs of it (the IMDb mirror
    # drops the bag-of-words *.feat files, so its archive hashes differently).
    sha256: tuple[str, ...]
    description: str


DATASETS: dict[str, DatasetFile] = {
    "imdb": DatasetFile(
        name="imdb",
        filename="aclImdb_v1.tar.gz",
        url="https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
        sha256=(
            "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",  # official archive
            "630400f7e77f38a660084b23b451f00a2c187926ebac25d89f2f06418f0eb581",  # mirror, without *.feat
        ),
        description="Large Movie Review Dataset v1.0 (IMDb reviews)",
    ),
    "stock": DatasetFile(
        name="stock",
        filename="19900101_20230630.csv",
        url="https://raw.githubusercontent.com/PacktPublishing/"
        "Python-Machine-Learning-by-Example-Fourth-Edition/main/ch5/19900101_20230630.csv",
        sha256=("8ac0665fc7a006826506964a6b3fd9bc09491a5bcc6141b7549c4e56187efa22",),
        description="The book's daily index prices 1990-2023 (NASDAQ Composite values)",
    ),
    "text": DatasetFile(
        name="text",
        filename="warpeace_input.txt",
        url="https://cs.stanford.edu/people/karpathy/char-rnn/warpeace_input.txt",
        sha256=("fb66ba999dafe24017cdd59e04c56d385a9c8466993d374fd4c6f08b2142985e",),
        description="Tolstoy, War and Peace (English)",
    ),
}


def cache_dir() -> Path:
    """The download cache; also where derived artefacts (token-id caches) live."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rnnlab")


def mirror_dir(mirror: str | os.PathLike | None = None) -> Path | None:
    """The mirror folder from the flag, else the environment, else None."""
    chosen = mirror or os.environ.get(MIRROR_ENV)
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"The data mirror {path} is not a folder; point --data-mirror or {MIRROR_ENV} at one.")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, spec: DatasetFile) -> Path:
    actual = sha256_of(path)
    if actual not in spec.sha256:
        raise DataError(
            f"{path} fails its checksum (sha256 {actual[:12]}..., expected {spec.sha256[0][:12]}...); "
            f"delete it and fetch {spec.url} again."
        )
    return path


def locate(name: str, *, mirror: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of a verified local copy of data set ``name`` ('imdb', 'stock' or 'text')."""
    if name not in DATASETS:
        raise DataError(f"Unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    spec = DATASETS[name]
    folder = mirror_dir(mirror)
    if folder is not None:
        candidate = folder / spec.filename
        if candidate.is_file():
            return _verified(candidate, spec)
        log.warning("mirror %s has no %s; trying the cache", folder, spec.filename)
    cached = cache_dir() / spec.filename
    if cached.is_file():
        return _verified(cached, spec)
    if not download:
        raise DataError(_missing_sentence(spec, "nothing is cached"))
    return _download(spec, cached)


def _missing_sentence(spec: DatasetFile, reason: str) -> str:
    return (
        f"{spec.description} is not available ({reason}): fetch {spec.url} and put {spec.filename} in "
        f"{cache_dir()} or in a folder named by --data-mirror / {MIRROR_ENV}."
    )


def _download(spec: DatasetFile, target: Path) -> Path:
    log.info("downloading %s from %s", spec.filename, spec.url)
    # Download beside the target and rename, so an interrupted or corrupt download never looks complete.
    with atomic_write(target) as part:
        try:
            with urllib.request.urlopen(spec.url, timeout=30) as response:
                _copy_with_progress(response, part, int(response.headers.get("Content-Length") or 0), spec.filename)
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            reason = f"download failed: {getattr(error, 'reason', error)}"
            raise DataError(_missing_sentence(spec, reason)) from None
        part.flush()
        try:
            _verified(Path(part.name), spec)
        except DataError:
            raise DataError(
                f"The download of {spec.url} fails its checksum; nothing was kept, try again or use a mirror."
            ) from None
    return target


def _copy_with_progress(source, sink, total: int, label: str) -> None:
    from rnnlab.progress import progress_bar

    with progress_bar(total=total or None, unit="B", unit_scale=True, desc=label, leave=False) as bar:
        for block in iter(lambda: source.read(1 << 20), b""):
            sink.write(block)
            bar.update(len(block))


def resolve(name: str, source: str | os.PathLike | None = None, *, mirror: str | os.PathLike | None = None) -> Path:
    """The user's own ``source`` if given (checked to exist), else the default data set via :func:`locate`."""
    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"The source {path} does not exist.")
        return path
    return locate(name, mirror=mirror)

