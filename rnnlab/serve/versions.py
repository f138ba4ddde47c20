"""Several bundles per job, each under its own model id, and swapping the bundle behind an id while it serves.

**Model ids.** Every bundle found under ``--bundles`` is served, under its folder's name (a training run's folder
``runs/X/bundle`` or a search's ``X/best_bundle``: ``X``). A request names one with ``model``; without it the
job's default answers. The default is the first id of the job in name order, unless ``--default-model ID`` (the
``default_models`` arg) says otherwise: a bundle dropped into the folder later never changes what the routes
answer by itself (a new version goes live when asked for by name, made the default at start, or swapped in).

**One deployment per job** (named after the job) holds all of that job's models: the model map is the
deployment's constructor argument and, for swaps, its ``user_config["models"]`` ({id: bundle folder}); each
replica keeps every model of its job (the models of one job share its batches and its replicas).

**Swapping** (:func:`swap`, ``rnnlab swap MODEL_ID BUNDLE``) is Ray Serve's in-place reconfiguration: the
application is deployed from a config (``rnnlab serve`` and ``serve run configs/serve.yaml`` both do), so a
config whose only change is a deployment's ``user_config`` makes Ray call ``reconfigure`` on each running replica
without restarting it and without taking it out of the routing table; requests keep flowing to it meanwhile.
``reconfigure`` loads the new bundle in a thread and then replaces the model in one assignment: every batch and
every stream runs on one version from start to end (a stream begun on the old one finishes on it), and each
answer's ``model`` is ``ID@VERSION``, the version being the first 12 hex digits of the weights' sha256. A bundle
that is refused (unreadable, a checksum that does not match, another job's) is refused by ``rnnlab swap``
before Ray is asked for anything, with one sentence; should a replica still fail to load it (a path its node
cannot read), the replica keeps the model it had, says why in ``/v1/models`` (``swap_error``), and ``rnnlab
swap`` puts the previous config back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rnnlab.errors import BundleError, ConfigError, InputError, RnnlabError, first_line

logger = logging.getLogger("ray.serve")

APP_NAME = "rnnlab"


def model_id_of(directory: str | Path) -> str:
    """The id a bundle folder is served under: its name, or its run's for ``X/bundle`` and ``X/best_bundle``."""
    path = Path(directory)
    return path.parent.name if path.name in ("bundle", "best_bundle") else path.name


class UnknownModel(InputError):
    """A request named a model id this job does not serve."""


# --- inside a replica -------------------------------------------------------------------------------------------
class ModelSet:
    """The models one deployment serves, by id. ``load(path) -> (predictor, info)`` loads one bundle (raising
    RnnlabError for a bad one); ``info`` is what /v1/models shows, its ``version`` the weights' digest, except its
    ``example`` (the bundle's example request body, or None): :meth:`example` answers it, describe() says only
    whether there is one."""

    def __init__(self, job: str, models: dict[str, str] | str, default: str | None,
                 load: Callable[[str], tuple[Any, dict]]) -> None:
        if isinstance(models, (str, Path)):  # one bundle, as before several were served
            models = {model_id_of(models): str(models)}
        self.job = job
        self.load = load
        self.paths = dict(models)
        self.default = default if default in self.paths else next(iter(self.paths))
        self.served = {model_id: self._named(model_id, *load(path)) for model_id, path in self.paths.items()}
        self.errors: dict[str, str] = {}
        self.swaps = 0

    @staticmethod
    def _named(model_id: str, predictor, info: dict) -> tuple[Any, dict]:
        return predictor, info | {"id": model_id, "name": model_id}

    def pick(self, model_id: str | None) -> tuple[Any, dict]:
        """(predictor, info) of ``model_id`` (None: the default); UnknownModel naming the ids served."""
        served = self.served  # one read: a swap replaces the dict, never changes it in place
        if model_id is None:
            model_id = self.default
        try:
            return served[model_id]
        except KeyError:
            raise UnknownModel(f"Model {model_id!r} is not served for {self.job}; use one of "
                               f"{', '.join(sorted(served))} (GET /v1/models lists them).") from None

    async def update(self, models: dict[str, str] | None) -> list[str]:
        """Point ids at the bundle folders ``models`` names (user_config ``models``); returns the ids swapped.
        Each new bundle loads in a thread while requests go on; a bundle that cannot be loaded leaves its id on
        the model it had (one log line, ``swap_error`` in describe()) and never raises: a raising reconfigure
        would make Ray replace the replica, and the new one would fail the same way."""
        swapped = []
        for model_id, path in (models or {}).items():
            path = str(path)
            if model_id not in self.paths:
                self.errors[model_id] = (f"{model_id!r} is not a model this deployment serves; a swap points an "
                                         "id served since the start at a new bundle.")
                logger.error("rnnlab serve: %s", self.errors[model_id])
                continue
            if path == self.paths[model_id] and model_id not in self.errors:
                continue
            try:
                predictor, info = await asyncio.to_thread(self.load, path)
            except Exception as error:  # noqa: BLE001 -- a bad bundle never takes the serving one down
                self.errors[model_id] = (f"the bundle {Path(path).name} could not be loaded ({first_line(error)}); "
                                         f"{model_id} keeps serving version {self.served[model_id][1]['version']}.")
                logger.error("rnnlab serve: swap of %s refused: %s", model_id, self.errors[model_id])
                continue
            # one assignment: a batch or stream that picked the old model finishes on it
            self.served = self.served | {model_id: self._named(model_id, predictor, info)}
            self.paths[model_id] = path
            self.errors.pop(model_id, None)
            self.swaps += 1
            swapped.append(model_id)
            logger.info("rnnlab serve: %s now serves version %s.", model_id, info["version"])
        return swapped

    def example(self, model_id: str | None) -> dict | None:
        """The example request body of ``model_id``'s bundle (None: it has none); UnknownModel as :meth:`pick`."""
        return self.pick(model_id)[1].get("example")

    def describe(self) -> list[dict]:
        return [info | {"example": info.get("example") is not None, "default": model_id == self.default,
                        "swaps": self.swaps}
                | ({"swap_error": self.errors[model_id]} if model_id in self.errors else {})
                for model_id, (_, info) in self.served.items()]


# --- the operator's side: rnnlab swap ---------------------------------------------------------------------------
def check_new_bundle(bundle: str | Path, job: str | None = None):
    """Load ``bundle`` here, as a replica would (checksums, format, weights); BundleError, one sentence, if it
    cannot serve ``job``. Returns the loaded bundle."""
    from rnnlab.bundle import load_bundle

    path = Path(bundle).expanduser()
    if not path.is_dir() and not path.exists():
        raise BundleError(f"Bundle {path} does not exist; give the folder a training run exported.")
    loaded = load_bundle(path)  # BundleError naming the fault: unreadable, edited after export, bad weights
    if job is not None and loaded.job != job:
        raise BundleError(f"Bundle {path} is a {loaded.job} bundle and the model it would replace serves {job}; "
                          "nothing was changed.")
    return loaded


def _digest(path: Path) -> str:
    import json

    files = json.loads((path / "config.json").read_text(encoding="utf-8")).get("files", {})
    return files.get("model.safetensors", "")[:12] or "unknown"


def served_models(app_name: str = APP_NAME) -> dict[str, dict]:
    """{model id: {"job", "version", "deployment", ...}} of the running application (Ray connected), asked of each
    model deployment (a handle call, answered by one of its replicas)."""
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None:
        raise ConfigError(f"No Serve application {app_name!r} is running on this Ray cluster; start one with "
                          "rnnlab serve, or pass the --address it printed.")
    found = {}
    for name in status.deployments:
        if name == "Gateway":
            continue
        described = serve.get_deployment_handle(name, app_name=app_name).describe.remote().result(timeout_s=60)
        for info in described.get("models", [described]):
            found[info["id"] if "id" in info else info["name"]] = info | {"deployment": name}
    return found


def swap(changes: dict[str, str | Path], *, app_name: str = APP_NAME, timeout_s: float = 300,
         say: Callable[[str], None] = print) -> dict[str, str]:
    """Point each model id of ``changes`` at its new bundle folder through Ray Serve's in-place reconfiguration
    (Ray connected, namespace "serve"); returns {id: new version}. RnnlabError, one sentence, for anything refused;
    then nothing was changed (or the previous config is back)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    served = served_models(app_name)
    checked: dict[str, tuple[str, Path, str]] = {}  # id -> (deployment, absolute path, version)
    for model_id, bundle in changes.items():
        if model_id not in served:
            raise ConfigError(f"Model {model_id!r} is not served; served are {', '.join(sorted(served))}.")
        path = Path(bundle).expanduser().resolve()
        check_new_bundle(path, served[model_id]["job"])
        checked[model_id] = (served[model_id]["deployment"], path, _digest(path))

    client = _get_global_client()
    details = client.get_serve_details()
    apps = details.get("applications", {})
    app = apps.get(app_name) or {}
    if not app.get("deployed_app_config"):
        raise ConfigError(f"The application {app_name!r} was deployed with serve.run from Python, which Ray updates "
                          "only by restarting replicas; serve it with rnnlab serve or serve run/deploy of a config "
                          "file to swap models in place.")
    previous = {name: a["deployed_app_config"] for name, a in apps.items() if a.get("deployed_app_config")}
    config = {name: _copy(c) for name, c in previous.items()}
    overrides = config[app_name].setdefault("deployments", [])
    for model_id, (deployment, path, _) in checked.items():
        entry = next((d for d in overrides if d.get("name") == deployment), None)
        if entry is None:
            entry = {"name": deployment}
            overrides.append(entry)
        effective = app["deployments"][deployment]["deployment_config"].get("user_config") or {}
        user_config = dict(entry.get("user_config") or effective)
        user_config["models"] = dict(user_config.get("models") or {}) | {model_id: str(path)}
        entry["user_config"] = user_config

    def deploy(apps_config: dict) -> None:
        schema = ServeDeploySchema.model_validate({
            "proxy_location": details.get("proxy_location") or "HeadOnly",
            "http_options": {k: v for k, v in (details.get("http_options") or {}).items()
                             if k in ("host", "port", "request_timeout_s", "keep_alive_timeout_s", "root_path")},
            "applications": list(apps_config.values())})
        client.deploy_apps(schema)

    started = time.monotonic()
    deploy(config)
    try:
        versions = _wait_for_versions(app_name, {m: v for m, (_, _, v) in checked.items()}, started + timeout_s)
    except RnnlabError:
        deploy(previous)  # the replicas kept their models; the config says so again
        raise
    changed = ", ".join(f"{m} now serves version {v} (was {served[m]['version']})" for m, v in versions.items())
    say(f"rnnlab: {changed}; replicas updated in place in {time.monotonic() - started:.1f} s.")
    return versions


def swap_at(address: str, changes: dict[str, str | Path], *, timeout_s: float = 300) -> dict[str, str]:
    """``rnnlab swap``: every new bundle checked before any cluster is asked for anything (readable, checksums,
    weights), then the service's Ray at ``address`` joined, :func:`swap` done, and Ray left."""
    from rnnlab.cluster import bring_token, connect

    bring_token()  # before Ray is imported: it reads the mode then
    import ray

    for bundle in changes.values():
        check_new_bundle(bundle)
    try:
        connect(address, namespace="serve", logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, TimeoutError) as error:
        raise RnnlabError(f"Ray could not be reached at {address} ({first_line(error)}); pass the --address "
                          "rnnlab serve printed.") from None
    try:
        # Serve's INFO lines ("Started <SharedRouterLongPollClient ...>") are not the operator's business here;
        # a filter, because Serve sets its logger's level again when a handle is made
        logging.getLogger("ray.serve").addFilter(lambda record: record.levelno >= logging.WARNING)
        return swap(changes, timeout_s=timeout_s)
    finally:
        ray.shutdown()


def _copy(config: dict) -> dict:
    import copy

    return copy.deepcopy(config)


def _wait_for_versions(app_name: str, wanted: dict[str, str], deadline: float) -> dict[str, str]:
    """Until every wanted id answers with its new version (Ray updated the replicas) or a replica says why not."""
    from ray import serve

    while True:
        status = serve.status().applications.get(app_name)
        # UPDATING while Ray reconfigures replicas; an autoscaling deployment may be scaling meanwhile
        settled = status is not None and all(d.status in ("HEALTHY", "UPSCALING", "DOWNSCALING")
                                             for d in status.deployments.values())
        if settled:
            now = served_models(app_name)
            errors = {m: now[m]["swap_error"] for m in wanted if now.get(m, {}).get("swap_error")}
            if errors:
                raise BundleError("; ".join(f"{m}: {e}" for m, e in errors.items()))
            if all(now[m]["version"] == v for m, v in wanted.items()):
                return {m: now[m]["version"] for m in wanted}
        if time.monotonic() > deadline:
            raise RnnlabError(f"The swap did not finish within the timeout; {app_name} keeps serving what it did.")
        time.sleep(0.5)
