"""Where data comes from: mirror, cache, a real HTTP download with checksums, and the offline sentence."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from dataclasses import replace
from functools import partial

import pytest

from rnnlab.data import sources
from rnnlab.errors import DataError
from rnnlab.files import atomic_write

PAYLOAD = b"Date,Open\n2020-01-02,1.0\n"


@pytest.fixture
def tiny_spec(tmp_path, monkeypatch):
    """Swap the 'stock' entry for a small file whose checksum we know, with an empty cache of its own."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    spec = replace(sources.DATASETS["stock"], filename="tiny.csv", sha256=(hashlib.sha256(PAYLOAD).hexdigest(),))
    monkeypatch.setitem(sources.DATASETS, "stock", spec)
    return spec


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on loopback serving a folder; yields (folder, base_url)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_mirror_file_is_used_and_verified(tmp_path, tiny_spec, monkeypatch):
    (tmp_path / "tiny.csv").write_bytes(PAYLOAD)
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path))
    assert sources.locate("stock") == tmp_path / "tiny.csv"


def test_flag_beats_environment(tmp_path, tiny_spec, monkeypatch):
    flagged = tmp_path / "flag"
    flagged.mkdir()
    (flagged / "tiny.csv").write_bytes(PAYLOAD)
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path / "nowhere"))
    assert sources.locate("stock", mirror=flagged) == flagged / "tiny.csv"


def test_corrupt_mirror_file_is_refused(tmp_path, tiny_spec):
    (tmp_path / "tiny.csv").write_bytes(PAYLOAD + b"tampered")
    with pytest.raises(DataError, match="fails its checksum"):
        sources.locate("stock", mirror=tmp_path)


def test_download_goes_to_cache_and_is_reused(http_folder, tiny_spec, monkeypatch):
    folder, base = http_folder
    (folder / "tiny.csv").write_bytes(PAYLOAD)
    monkeypatch.setitem(sources.DATASETS, "stock", replace(tiny_spec, url=f"{base}/tiny.csv"))
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    path = sources.locate("stock")
    assert path == sources.cache_dir() / "tiny.csv"
    assert path.read_bytes() == PAYLOAD
    (folder / "tiny.csv").unlink()  # the second call must not need the server
    assert sources.locate("stock") == path


def test_download_with_wrong_checksum_keeps_nothing(http_folder, tiny_spec, monkeypatch):
    folder, base = http_folder
    (folder / "tiny.csv").write_bytes(b"not the file we expect")
    monkeypatch.setitem(sources.DATASETS, "stock", replace(tiny_spec, url=f"{base}/tiny.csv"))
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    with pytest.raises(DataError, match="fails its checksum"):
        sources.locate("stock")
    assert list(sources.cache_dir().glob("*tiny*")) == []
    assert list(sources.cache_dir().glob(".part-*")) == []


def test_offline_without_mirror_says_what_to_fetch(tiny_spec, monkeypatch):
    # Port 9 on loopback: nothing listens, so the connection is refused at once, as offline.
    monkeypatch.setitem(sources.DATASETS, "stock", replace(tiny_spec, url="http://127.0.0.1:9/tiny.csv"))
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    with pytest.raises(DataError) as caught:
        sources.locate("stock")
    message = str(caught.value)
    assert "http://127.0.0.1:9/tiny.csv" in message and str(sources.cache_dir()) in message
    assert sources.MIRROR_ENV in message


def test_unknown_dataset_and_missing_source():
    with pytest.raises(DataError, match="Unknown data set"):
        sources.locate("mnist")
    with pytest.raises(DataError, match="does not exist"):
        sources.resolve("stock", "/no/such/file.csv")


@pytest.mark.mirror
def test_real_mirror_checksums(mirror):
    for name in sources.DATASETS:
        assert sources.locate(name, mirror=mirror, download=False).parent == mirror


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    """The one helper behind caches, downloads, vocabularies and checkpoint pointers."""
    target = tmp_path / "new" / "vocab.json"
    with atomic_write(target, "w") as handle:  # parent folders made, text is UTF-8
        handle.write("é")
    assert target.read_text(encoding="utf-8") == "é"
    with pytest.raises(RuntimeError), atomic_write(target, "w", durable=True) as handle:
        handle.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text(encoding="utf-8") == "é"  # the old file, whole; no temporary left
    with atomic_write(target, "wb", durable=True) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["vocab.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # the usual permissions, not 0600


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
