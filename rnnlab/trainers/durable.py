"""What makes a run's folder safe to crash in: durable writes, checkable checkpoints, and a config fingerprint.

- **Durable:** a file is fsynced before it is renamed into place, and the folder after, so a power cut or a
  killed node never leaves a pointer (``latest.json``) naming a checkpoint whose bytes never reached the disk.
- **Checkable:** every checkpoint carries ``manifest.json`` (each file's size and SHA-256, the config
  fingerprint); :func:`checkpoint_problem` says in one sentence what is wrong with one, so resume can skip it.
- **One run per folder:** the fingerprint covers every setting that shapes the weights; a resume under other
  settings is refused naming the keys that differ, and a fresh run never writes into a used folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from rnnlab.data.sources import sha256_of
from rnnlab.errors import ConfigError, RnnlabError
from rnnlab.files import PART_PREFIX, atomic_write, fsync_path

MANIFEST = "manifest.json"
TEMPORARY_PREFIXES = (".tmp-", PART_PREFIX, ".latest.json.tmp", ".best.json.tmp")  # the last two: older runs'
# Settings that never change the weights a run ends with: where it logs, how chatty it is, where data is cached.
NOT_SHAPING = ("train.progress", "train.log_every", "tracking", "data.mirror")
# What a used --output holds: a fresh run into it would mix two runs' checkpoints, metrics and W&B run.
RUN_FILES = ("checkpoints", "metrics.jsonl", "bundle", "wandb_run_id.txt")


class StorageError(RnnlabError):
    """Writing the run's files failed (disk full, read-only, quota, a vanished mount)."""


# --- durable writes ---------------------------------------------------------------------------------------------


def fsync_tree(folder: Path) -> None:
    """Every file under ``folder``, then every folder bottom-up."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def write_json(path: Path, payload: Mapping) -> None:
    """Replace ``path`` with ``payload`` so that a crash at any moment leaves the old or the new file, whole."""
    with atomic_write(path, "w", durable=True) as handle:
        handle.write(json.dumps(payload, indent=1))


def publish(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place: its bytes first, then the rename, then the parent's entry."""
    fsync_tree(tmp)
    if final.exists():  # the same step written again after an interruption
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def remove_temporaries(root: Path) -> list[str]:
    """Half-written checkpoint folders and pointer files a crash left behind; returns their names."""
    removed = []
    for path in root.glob(".*") if root.is_dir() else []:
        if path.name.startswith(TEMPORARY_PREFIXES):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


@contextlib.contextmanager
def storage(what: str, where: Path) -> Iterator[None]:
    """Turn an OSError while writing ``what`` into one sentence (ENOSPC and friends are the user's to fix)."""
    try:
        yield
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error)).lower()
        raise StorageError(f"Could not write {what} under {where} ({reason}); free space or pick another "
                           "--output, then rerun with --resume auto (the last complete checkpoint is kept).") from None


# --- checkable checkpoints -------------------------------------------------------------------------------------


def write_manifest(folder: Path, config: Mapping) -> None:
    """``manifest.json``: each file's size and SHA-256, and the fingerprint of the config that wrote them."""
    files = {str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}
    fingerprint, shaping = config_fingerprint(config)
    (folder / MANIFEST).write_text(json.dumps({"files": files, "config_fingerprint": fingerprint,
                                               "config": shaping}, indent=1))


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def checkpoint_problem(folder: Path) -> str | None:
    """None when ``folder`` is a whole checkpoint; otherwise what is wrong with it, as a clause."""
    if not folder.is_dir():
        return f"{folder.name} is missing"
    try:
        manifest = read_manifest(folder)
        files = manifest["files"]
    except FileNotFoundError:
        return f"{folder.name} has no {MANIFEST} (it was never finished)"
    except (ValueError, KeyError, TypeError):
        return f"{folder.name}/{MANIFEST} is not valid JSON"
    if "loop_state.json" not in files:
        return f"{folder.name} lists no loop_state.json"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{folder.name}/{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{folder.name}/{name} has {size} bytes, not {expected['bytes']} (truncated)"
        if sha256_of(path) != expected["sha256"]:
            return f"{folder.name}/{name} does not match its checksum (corrupted)"
    return None


# --- one run per folder ----------------------------------------------------------------------------------------


def shaping_config(config: Mapping) -> dict:
    """The config without the settings in NOT_SHAPING, flattened to dotted keys."""
    flat = _flatten(config)
    return {key: value for key, value in flat.items()
            if not any(key == skip or key.startswith(skip + ".") for skip in NOT_SHAPING)}


def config_fingerprint(config: Mapping) -> tuple[str, dict]:
    shaping = shaping_config(config)
    text = json.dumps(shaping, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], shaping


def differing_keys(saved: Mapping, current: Mapping) -> list[str]:
    """Dotted keys whose value differs between two shaping configs (or that only one has)."""
    return sorted(key for key in set(saved) | set(current) if saved.get(key, _ABSENT) != current.get(key, _ABSENT))


# Settings added after runs were already checkpointed, with the value those runs trained under: a checkpoint whose
# config lacks one resumes when the run asks for that value (a pre-`model.cell` run is an LSTM run).
ADDED_SETTINGS = {"model.cell": "lstm", "model.forget_bias": None}


def check_same_config(folder: Path, config: Mapping) -> None:
    """Refuse to resume ``folder`` under settings that would train another model."""
    manifest = read_manifest(folder)
    fingerprint, shaping = config_fingerprint(config)
    if manifest.get("config_fingerprint") in (None, fingerprint):
        return
    saved = manifest.get("config", {})
    keys = [key for key in differing_keys(saved, shaping)
            if key in saved or ADDED_SETTINGS.get(key, _ABSENT) != shaping.get(key)]
    if not keys:
        return
    shown = ", ".join(f"{key} ({_short(manifest.get('config', {}).get(key))} -> {_short(shaping.get(key))})"
                      for key in keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    raise ConfigError(f"The checkpoint {folder} was written under other settings: {shown}; resume with the "
                      "run's own settings, or start a new run in another --output.")


def refuse_used_output(output_dir: Path) -> None:
    """A fresh run (no --resume) never writes into a folder that holds another run."""
    used = [name for name in RUN_FILES if (output_dir / name).exists()
            and not (name == "checkpoints" and not any((output_dir / name).iterdir()))]
    if used:
        raise ConfigError(f"{output_dir} already holds a run ({', '.join(used)}); continue it with --resume auto, "
                          "or pass another --output (or delete that folder) to start a new one.")


def clear_run_files(output_dir: Path) -> None:
    """What a run wrote (checkpoints, metrics, W&B run, bundle), for a deliberate fresh start in the same folder
    (a Tune trial retried before its first checkpoint); anything else in the folder is left alone."""
    for name in (*RUN_FILES, "wandb"):
        path = output_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


_ABSENT = object()


def _short(value) -> str:
    text = "unset" if value is None else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _flatten(config: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
