"""Finding and checking the bundles a service is asked to serve (driver side: no Ray needed).

``rnnlab serve --bundles DIR`` and ``serve run configs/serve.yaml`` both come through :func:`find_bundles`, so a
missing or corrupt bundle is one sentence before any replica starts, instead of replicas crashing in a loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from rnnlab.errors import BundleError, ConfigError
from rnnlab.registry import served  # the jobs the service answers for (each job's name: its deployment and route)


def _job_of(directory: Path) -> str:
    config_path = directory / "config.json"
    try:
        job = json.loads(config_path.read_text(encoding="utf-8")).get("job")
    except (OSError, ValueError, AttributeError) as error:
        raise BundleError(
            f"Bundle {directory} has an unreadable config.json ({error}); re-export the bundle."
        ) from None
    if job not in served():
        raise BundleError(
            f"Bundle {directory} is for job {job!r}, which the service does not serve ({', '.join(served())})."
        )
    return job


def _looks_like_bundle(directory: Path) -> bool:
    return (directory / "config.json").is_file() or (directory / "model.safetensors").is_file()


def find_bundles(
    bundles: str | Path | None = None, *, explicit: dict[str, str | Path | None] | None = None, check: bool = True,
    defaults: list[str] | None = None,
) -> dict[str, Path]:
    """Map job -> its default bundle folder (:func:`find_models` has them all)."""
    return {job: models[default_model(job, models, defaults)]
            for job, models in find_models(bundles, explicit=explicit, check=check).items()}


def find_models(
    bundles: str | Path | None = None, *, explicit: dict[str, str | Path | None] | None = None, check: bool = True,
    runtime: str | None = None,
) -> dict[str, dict[str, Path]]:
    """Map job -> {model id: bundle folder}, ids in name order (rnnlab/serve/versions.py: what ids are).

    ``bundles`` is a folder holding bundles as sub-folders (any names; each bundle's config.json says its job)
    or training runs' / searches' output folders (each with its ``bundle/`` or ``best_bundle/``), or one bundle
    itself. ``explicit`` names one bundle per job ({"sentiment": path, ...}), served beside the folder's.
    With ``check``, each bundle is loaded once (checksums, format version, weights) so a bad one is refused here,
    as is one that ``runtime`` (rnnlab/runtime.py; None: the bundle's default) cannot run.
    """
    from rnnlab.serve.versions import model_id_of

    found: dict[str, dict[str, Path]] = {}
    where: dict[str, Path] = {}  # model id -> folder, across jobs: an id names one model

    def add(job: str, directory: Path) -> None:
        model_id = model_id_of(directory)
        if model_id in where:
            raise BundleError(f"Two bundles would be served as model {model_id!r} ({where[model_id]} and "
                              f"{directory}); rename one of their folders.")
        where[model_id] = directory
        found.setdefault(job, {})[model_id] = directory

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
            add(_job_of(directory), directory)
    for job, path in (explicit or {}).items():
        if job not in served():
            raise ConfigError(f"Unknown job {job!r}; use one of {', '.join(served())}.")
        if path is None:
            continue
        directory = Path(path).expanduser().resolve()
        if not directory.is_dir():
            raise BundleError(f"The {job} bundle {directory} does not exist; train one or fix the path.")
        if _job_of(directory) != job:
            raise BundleError(f"Bundle {directory} is not a {job} bundle; check the {job} path.")
        if directory not in where.values():
            add(job, directory)
    if not found:
        where_text = f" in {bundles}" if bundles is not None else ""
        raise BundleError(
            f"No model bundles found{where_text}; expected sub-folders written by 'rnnlab train' (each with "
            "config.json)."
        )
    if check:
        from rnnlab.bundle import load_bundle
        from rnnlab.runtime import choose_runtime

        for models in found.values():
            for directory in models.values():
                choose_runtime(load_bundle(directory), runtime)  # raises BundleError naming the fault
    return {job: dict(sorted(models.items())) for job, models in found.items()}


def default_model(job: str, models: dict[str, Path], defaults: list[str] | None = None) -> str:
    """The model id a job's routes answer with when a request names none: the one ``defaults`` names for this job
    (``--default-model``), else the first id in name order."""
    chosen = [model_id for model_id in (defaults or []) if model_id in models]
    if len(chosen) > 1:
        raise ConfigError(f"--default-model names two {job} models ({', '.join(chosen)}); name one.")
    return chosen[0] if chosen else next(iter(models))


def check_defaults(found: dict[str, dict[str, Path]], defaults: list[str] | None) -> None:
    served = {model_id for models in found.values() for model_id in models}
    unknown = [model_id for model_id in (defaults or []) if model_id not in served]
    if unknown:
        raise ConfigError(f"--default-model {', '.join(unknown)} is not a served model; served are "
                          f"{', '.join(sorted(served))}.")


def bundle_info(bundle) -> dict:
    """What /v1/models shows about a loaded bundle: name, version, job, model config, metrics; and its example
    request body (None without one), which the replica keeps and /v1/models only links to."""
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
        "model": without_paths(bundle.model_config),
        "metrics": without_paths(bundle.metrics),
        "example": bundle.example,
    }


def _created(path: Path) -> int | None:
    try:
        return int((path / "config.json").stat().st_mtime)
    except OSError:
        return None


def without_paths(value):
    """``value`` without the file-system paths in it: a ``bundle`` key (bundles trained before it was dropped from
    metrics.json carry their training machine's output folder there) and any string that is an absolute path,
    at any depth. What is left is figures and settings."""
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items()
                if key != "bundle" and not _is_path(item)}
    if isinstance(value, list):
        return [without_paths(item) for item in value if not _is_path(item)]
    return value


def _is_path(value) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~", "\\\\")) or
                                       (len(value) > 2 and value[1] == ":" and value[2] in "\\/"))
