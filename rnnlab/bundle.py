"""Model bundles: what training exports and what evaluation, generation, Tune and Serve load.

A bundle is a folder::

    model.safetensors   the weights (safetensors: loading never unpickles)
    config.json         {"format_version", "job", "model": <model config>, "config": <full training config>,
                         "assets": [names], "files": {file name: sha256}, "rnnlab_version", "config_sha256"}
    <asset>.json        one per asset: vocab.json (sentiment, charlm, lm), scaler.json + target_scaler.json
                        (stock, horizon)
    metrics.json        the training run's final metrics
    example.json        optional: a request body for the job's route (POST /v1/<job>) to try the model with, e.g.
                        the last price rows a forecast reads (GET /v1/<job>/example serves it; the playground's
                        "load example")
    model.onnx          (optional) the model as one ONNX graph, written only when it answers as the weights do;
                        config.json's "graph" says how it was checked (rnnlab/export.py)
    model.int8.onnx     (optional) its int8 version, written only when it passed the job's quality gate

``files`` holds the sha256 of every other file and ``config_sha256`` that of config.json's own content (minus
that field), so any edit after export -- weights, assets, metrics or config -- is refused at load time.
Writing is atomic: everything goes to a temporary sibling folder that is renamed into place, so a crash never
leaves half a bundle under the final name, and an existing bundle is replaced only once the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rnnlab import __version__
from rnnlab.data.sources import sha256_of
from rnnlab.errors import BundleError, ConfigError
from rnnlab.models import build_model
from rnnlab.registry import JOBS

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
EXAMPLE_FILE = "example.json"
GRAPH_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


@dataclass
class Bundle:
    path: Path
    job: str
    model: nn.Module  # eval mode, on the device asked for
    model_config: dict[str, Any]
    config: dict[str, Any]  # the full training config
    assets: dict[str, dict]  # {"vocab": {...}} or {"scaler": {...}, "target_scaler": {...}}
    metrics: dict[str, Any]
    example: dict | None = None  # example.json: a request body for the job's route (None: the bundle has none)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, as config.json lists them
    graph: dict | None = None  # config.json's "graph": the ONNX graph's file, parity figures and int8 gate
    runtime: str = "auto"  # the runtime loaders use when none is asked for (rnnlab/runtime.py)


# ------------------------------------------------------------------------------------------------- saving


RUNTIMES = ("auto", "torch", "onnx")  # what a bundle may name as its default runtime (rnnlab/runtime.py runs them)


def check_runtime_name(name: str) -> None:
    if name not in RUNTIMES:
        raise ConfigError(f"Unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}.")


def save_bundle(
    directory: str | os.PathLike,
    *,
    job: str,
    model: nn.Module,
    assets: dict[str, dict],
    metrics: dict,
    config: dict,
    example: dict | None = None,
    graph: Callable[[Bundle], dict] | None = None,
    runtime: str | None = None,
) -> Path:
    """Write ``model`` (with ``model.config``), its assets, metrics and training config as a bundle folder, and
    ``example`` (a request body for the job's route) as example.json when given.

    ``directory`` may exist already if it is empty or a bundle (it is then replaced); anything else is refused,
    so a mistyped path never deletes a user's folder. ``graph`` (``rnnlab.export.write_graph``) is given the
    bundle as a loader reads it back, its ``path`` the folder being written, writes the ONNX graph there and returns
    config.json's ``graph`` entry; whatever it raises leaves no bundle behind. ``runtime`` is the bundle's default
    runtime (None: ``auto``).
    """
    directory = Path(directory)
    if job not in JOBS:
        raise ConfigError(f"Unknown job {job!r}; choose one of {', '.join(JOBS)}.")
    for name in assets:
        if not _is_asset_name(name):
            raise BundleError(f"Asset name {name!r} cannot be a bundle file name; use letters, digits and '_'.")
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(_plain_state_dict(model), str(staging / WEIGHTS_FILE), metadata={"job": job})
        for name, asset in assets.items():
            _write_json(staging / f"{name}.json", asset)
        _write_json(staging / METRICS_FILE, metrics)
        if example is not None:
            _write_json(staging / EXAMPLE_FILE, example)
        manifest = {
            "format_version": FORMAT_VERSION,
            "job": job,
            "model": model.config.to_dict(),
            "config": config,
            "assets": sorted(assets),
            "rnnlab_version": __version__,
        }
        if runtime is not None:
            check_runtime_name(runtime)
            if runtime == "onnx" and graph is None:
                raise BundleError("A bundle whose default runtime is onnx needs its ONNX graph; export one with it.")
            manifest["runtime"] = runtime
        _write_manifest(staging, manifest)
        if graph is not None:
            manifest["graph"] = graph(load_bundle(staging))
            _write_manifest(staging, manifest)
        _fsync_dir(staging)
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _write_manifest(staging: Path, manifest: dict) -> None:
    """config.json: ``manifest`` with the sha256 of every other file in ``staging`` and its own digest."""
    manifest["files"] = {p.name: sha256_of(p) for p in sorted(staging.iterdir()) if p.name != CONFIG_FILE}
    manifest["config_sha256"] = _manifest_digest(manifest)
    _write_json(staging / CONFIG_FILE, manifest)


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory: what safetensors' save_file accepts.

    Tied or otherwise shared weights are written once per name (a copy each), so loading stays a plain strict
    ``load_state_dict``.
    """
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _check_replaceable(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise BundleError(f"Bundle path {directory} is a file; choose a folder path for the bundle.")
    if any(directory.iterdir()) and not (directory / CONFIG_FILE).is_file():
        raise BundleError(
            f"Bundle folder {directory} exists and is not a bundle; choose an empty or new folder so nothing "
            "of yours is overwritten."
        )


def _move_into_place(staging: Path, directory: Path) -> None:
    if not directory.exists():
        os.replace(staging, directory)
        return
    # A non-empty folder cannot be replaced in one rename: move the old one aside first, then drop it.
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
    os.replace(directory, old / directory.name)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(old / directory.name, directory)  # put the previous bundle back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=_json_default, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays, tensors and paths turn up in metrics; anything else is a bug worth a TypeError.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())



def _manifest_digest(manifest: dict) -> str:
    content = {k: v for k, v in manifest.items() if k != "config_sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------- loading


def load_bundle(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> Bundle:
    """Check and load a bundle; any fault is a BundleError of one sentence naming the bundle and the fault."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    job = manifest["job"]
    files = manifest["files"]
    needed = [WEIGHTS_FILE, METRICS_FILE, *(f"{name}.json" for name in manifest["assets"])]
    not_listed = [name for name in needed if name not in files]
    if not_listed:
        raise BundleError(f"Bundle {directory} lists no checksum for {', '.join(not_listed)}; re-export the bundle.")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"Bundle {directory} is missing {name}; re-export the bundle or copy the whole folder.")
        if sha256_of(path) != expected:
            raise BundleError(
                f"Bundle {directory} file {name} does not match its checksum (changed after export); "
                "re-export the bundle."
            )

    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"Bundle {directory} has unreadable weights in {WEIGHTS_FILE} ({error}).") from None
    try:
        model = build_model(job, manifest["model"])
    except ConfigError as error:
        raise BundleError(f"Bundle {directory} has an invalid model config: {error}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:300]
        raise BundleError(f"Bundle {directory} weights do not match its model config ({reason}).") from None
    model.to(device).eval()

    assets = {name: _read_json(directory, f"{name}.json") for name in manifest["assets"]}
    metrics = _read_json(directory, METRICS_FILE)
    return Bundle(
        path=directory,
        job=job,
        model=model,
        model_config=dict(manifest["model"]),
        config=manifest["config"],
        assets=assets,
        metrics=metrics,
        # listed in ``files`` (so checked above) when the bundle has one; older bundles have none
        example=_read_json(directory, EXAMPLE_FILE) if EXAMPLE_FILE in files else None,
        files=dict(files),
        graph=manifest.get("graph"),
        runtime=manifest.get("runtime", "auto"),
    )


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a bundle, checked (format version, job, own checksum) but without loading weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"Bundle {directory} does not exist; train a model or fix the path.")
    if not (directory / CONFIG_FILE).is_file():
        raise BundleError(f"Bundle {directory} has no {CONFIG_FILE}; it is not a bundle written by rnnlab train.")
    manifest = _read_json(directory, CONFIG_FILE)
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise BundleError(f"Bundle {directory} {CONFIG_FILE} has no format_version; it is not an rnnlab bundle.")
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        raise BundleError(
            f"Bundle {directory} has format version {version!r} but this rnnlab reads version {FORMAT_VERSION}; "
            "re-export it with this version of rnnlab."
        )
    missing = [k for k in ("job", "model", "config", "assets", "files", "config_sha256") if k not in manifest]
    if missing:
        raise BundleError(f"Bundle {directory} {CONFIG_FILE} lacks {', '.join(missing)}; re-export the bundle.")
    if manifest["config_sha256"] != _manifest_digest(manifest):
        raise BundleError(
            f"Bundle {directory} {CONFIG_FILE} was edited after export (its checksum does not match); "
            "re-export the bundle instead of editing it."
        )
    if manifest["job"] not in JOBS:
        raise BundleError(f"Bundle {directory} is for unknown job {manifest['job']!r}; expected one of {', '.join(JOBS)}.")
    _check_file_names(directory, manifest)
    _check_graph(directory, manifest)
    return manifest


def _check_graph(directory: Path, manifest: dict) -> None:
    """A graph config.json names must be one whose checksum it lists (and so is checked at load)."""
    graph = manifest.get("graph")
    if graph is None:
        return
    int8 = graph.get("int8") if isinstance(graph, dict) else None
    named = [graph.get("file") if isinstance(graph, dict) else None,
             *([int8.get("file")] if isinstance(int8, dict) and int8.get("passed") else [])]
    if not all(name in (GRAPH_FILE, INT8_FILE) and name in manifest["files"] for name in named):
        raise BundleError(f"Bundle {directory} {CONFIG_FILE} 'graph' names a file it lists no checksum for; "
                          "re-export the bundle.")


def _check_file_names(directory: Path, manifest: dict) -> None:
    """Every file config.json names must be a plain file name inside the bundle folder.

    The checksum of config.json only proves it was not edited by accident: anyone can write a new one, so a
    crafted bundle could otherwise point the checksum pass at ``/dev/zero``, ``../../secrets`` or a symlink out.
    """
    files, assets = manifest["files"], manifest["assets"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"Bundle {directory} {CONFIG_FILE} 'files' is not a map of file name to sha256; re-export it.")
    if not isinstance(assets, list) or not all(isinstance(a, str) and _is_asset_name(a) for a in assets):
        raise BundleError(
            f"Bundle {directory} {CONFIG_FILE} 'assets' must list plain names (letters, digits, '_'); re-export it."
        )
    root = directory.resolve()
    for name in files:
        if not _is_plain_name(name):
            raise BundleError(
                f"Bundle {directory} {CONFIG_FILE} names the file {name!r}, which is not a plain file name inside "
                "the bundle (no folders, '..' or absolute paths); re-export the bundle."
            )
        path = directory / name
        if path.is_symlink() and path.resolve().parent != root:
            raise BundleError(
                f"Bundle {directory} file {name} is a link to {os.readlink(path)!r} outside the bundle; "
                "copy the real file into the bundle folder."
            )


def _is_plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(ch in name for ch in "/\\\0:")
        and not os.path.isabs(name)
        and Path(name).name == name
    )


def _is_asset_name(name: str) -> bool:
    return name.replace("_", "").isalnum() and name not in ("config", "metrics", "model")


def _read_json(directory: Path, name: str) -> Any:
    try:
        return json.loads((directory / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"Bundle {directory} is missing {name}; re-export the bundle.") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BundleError(f"Bundle {directory} has an unreadable {name} ({error}).") from None
