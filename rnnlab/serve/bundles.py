"""Finding and checking the bundles a service is asked to serve (driver side: no Ray needed).

``rnnlab serve --bundles DIR`` and ``serve run configs/serve.yaml`` both come through :func:`find_bundles`, so a
missing or corrupt bundle is one sentence before any replica starts, instead of replicas crashing in a loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from rnnlab.errors import BundleError, ConfigError
from rnnlab.registry import served

# the jobs the service answers for (each job's name is its deployment's and its route's), from the registry
KINDS = served()


def _job_of(directory: Path) -> str:
    config_path = directory / "config.json"
    try:
        job = json.loads(config_path.read_text(encoding="utf-8")).get("job")
    except (OSError, ValueError, AttributeError) as error:
        raise BundleError(
            f"Bundle {directory} has an unreadable config.json ({error}); re-export the bundle."
        ) from None
    if job not in KINDS:
        raise BundleError(
            f"Bundle {directory} is for job {job!r}, which the service does not serve ({', '.join(KINDS)})."
        )
    return job


def _looks_like_bundle(directory: Path) -> bool:
    return (directory / "config.json").is_file() or (directory / "model.safetensors").is_file()


def find_bundles(
    bundles: str | Path | None = None, *, explicit: dict[str, str | Path | None] | None = None, check: bool = True
) -> dict[str, Path]:
    """Map job -> bundle folder.

    ``bundles`` is a folder holding bundles as sub-folders (any names; each bundle's config.json says its job)
    or training runs' / searches' output folders (each with its ``bundle/`` or ``best_bundle/``), or one bundle
    itself. ``explicit`` names bundles per job ({"sentiment": path, ...}) and wins over the folder.
    With ``check``, each bundle is loaded once (checksums, format version, weights) so a bad one is refused here.
    """
    found: dict[str, Path] = {}
    if bundles is not None:
        root = Path(bundles).expanduser().resolve()  # absolute: replicas may start in another directory
        if not root.is_dir():
            raise BundleError(f"Bundle folder {root} does not exist; pass --bundles a folder holding trained bundles.")
        candidates = [root] if _looks_like_bundle(root) else sorted(p for p in root.iterdir() if p.is_dir())
        for directory in candidates:
            for exported in ("bundle", "best_bundle"):  # a training run's or a Tune search's --output folder
                if not _looks_like_bundle(directory) and _looks_like_bundle(directory / exported):
                    directory = directory / exported
            if not _looks_like_bundle(directory):
                continue
            job = _job_of(directory)
            if job in found:
                raise BundleError(
                    f"Bundle folder {root} holds two {job} bundles ({found[job].name} and {directory.name}); "
                    f"keep one, or name each with the {'/'.join(KINDS)} arguments."
                )
            found[job] = directory
    for job, path in (explicit or {}).items():
        if job not in KINDS:
            raise ConfigError(f"Unknown bundle kind {job!r}; use one of {', '.join(KINDS)}.")
        if path is None:
            continue
        directory = Path(path).expanduser().resolve()
        if not directory.is_dir():
            raise BundleError(f"The {job} bundle {directory} does not exist; train one or fix the path.")
        if _job_of(directory) != job:
            raise BundleError(f"Bundle {directory} is not a {job} bundle; check the {job} path.")
        found[job] = directory
    if not found:
        where = f" in {bundles}" if bundles is not None else ""
        raise BundleError(
            f"No model bundles found{where}; expected sub-folders written by 'rnnlab train' (each with config.json)."
        )
    if check:
        from rnnlab.bundle import load_bundle

        for directory in found.values():
            load_bundle(directory)  # raises BundleError naming the fault
    return found


def bundle_info(bundle) -> dict:
    """What /v1/models shows about a loaded bundle: name, version, job, model config, metrics."""
    path = Path(bundle.path)
    try:
        files = json.loads((path / "config.json").read_text(encoding="utf-8")).get("files", {})
        format_version = json.loads((path / "config.json").read_text(encoding="utf-8")).get("format_version")
    except (OSError, ValueError):
        files, format_version = {}, None
    digest = files.get("model.safetensors", "")
    # version: the first hex digits of the weights' sha256, so two deployments of the same bundle agree
    version = digest[:12] if digest else "unknown"
    return {
        "name": path.parent.name if path.name in ("bundle", "best_bundle") else path.name,
        "job": bundle.job,
        "version": version,
        "format_version": format_version,
        "digest": f"sha256:{digest}" if digest else None,  # of the weights; no path: it tells strangers the layout
        "created": _created(path),  # for OpenAI's model list: when the bundle was written
        "model": bundle.model_config,
        "metrics": bundle.metrics,
    }


def _created(path: Path) -> int | None:
    try:
        return int((path / "config.json").stat().st_mtime)
    except OSError:
        return None
