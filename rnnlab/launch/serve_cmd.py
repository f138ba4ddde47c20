"""``rnnlab serve --bundles DIR``: the HTTP service over trained bundles (Ray Serve, FastAPI ingress).

The bundles are found and checked here, before Ray starts, so a missing or corrupt one is one sentence and a
non-zero exit, not replicas failing in a loop. The same application runs under Ray's own CLI:
``serve run configs/serve.yaml`` (see that file for replicas, autoscaling, batch sizes and GPU fractions).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import time
from pathlib import Path

from rnnlab.errors import ConfigError, RnnlabError, first_line
from rnnlab.registry import routes, served
from rnnlab.serve.auth import ENV_VAR
from rnnlab.serve.limits import LIMITS

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help=f"serve trained bundles over HTTP (Ray Serve): {', '.join(served())}",
        description="Serve the bundles in DIR over HTTP with Ray Serve: POST /v1/<job> for "
        f"{', '.join(served())} (older routes: "
        f"{', '.join(f'/v1/{a} = /v1/{j}' for a, j in routes().items() if a != j)}, "
        "kept for one release); POST /v1/completions (OpenAI's API, for the openai client); GET /v1/models, "
        "/healthz; OpenAPI at /docs. Concurrent requests are batched.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--bundles", required=True, metavar="DIR",
                        help="folder holding bundles as sub-folders (each bundle's config.json names its job)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; another than loopback (0.0.0.0) needs an API key or --insecure")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster to deploy onto ('auto' or HOST:PORT of its head; replicas "
                        "spread over its nodes, HTTP enters on the head); default starts a new local instance "
                        "(never a stale one left under the Ray temp folder)")
    parser.add_argument("--api-key-file", metavar="FILE", default=None,
                        help="file holding the API key every /v1/* request must send as 'Authorization: Bearer "
                        f"KEY' (also from ${ENV_VAR}); /healthz stays open")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without an API key")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="port of Ray's Prometheus endpoint (/metrics), with rnnlab_* metrics beside Serve's")
    parser.add_argument("--default-model", action="append", metavar="MODEL_ID", default=None,
                        help="the model a job's route answers with when a request names none (repeat for each "
                        "job); default: the job's first model id in name order (ids: the bundles' folder names)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="batch size for every model deployment (generation: sequences decoded together)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="threads per replica (torch's, or ONNX Runtime's intra-op threads)")
    parser.add_argument("--runtime", metavar="auto|torch|onnx", default=None,
                        help="what runs every model: onnx (ONNX Runtime on the CPU, from the bundle's graph), torch, "
                        "or auto (onnx on a CPU where the bundle holds a graph, torch on a GPU or without one); "
                        "default: each bundle's own default, else auto")
    parser.add_argument("--proxy", action="store_true",
                        help="take HTTP through Ray Serve's proxy actor, as on a cluster (--address implies it). "
                        "By default the Gateway replica listens on --port itself (Ray Serve's direct ingress): "
                        "one hop fewer, about 5x the request rate on a small CPU")
    limits = parser.add_argument_group("limits (also configs/serve.yaml args)")
    for name, (kind, default, _, what) in LIMITS.items():
        # "%(default).0s" prints nothing and keeps the formatter from adding "(default: None)"
        limits.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=kind.__name__.upper(),
                            help=f"{what} (default: {kind(default)})%(default).0s")
    parser.set_defaults(func=run)


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a valid port; use 1..65535.")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"Port {port} on {host} is already in use; stop the other server or pass --port.")
            raise ConfigError(f"Cannot bind {host}:{port} ({error.strerror}); pass another --host or --port.")


def choose_ingress(direct: bool, host: str, port: int) -> int:
    """Set up, before ray.init, who takes HTTP on ``port`` (the controller and replicas read these settings when
    they start); returns the port for Ray's proxy.

    ``direct``: Ray Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``), the Gateway replica itself
    listens on ``port`` (no proxy hop: ~5x the POST rate on 2 cores, benchmarks/README.md). Ray 2.60 still starts
    its proxy on the head node and hands ingress replicas ports from RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT
    (max exclusive), so the range is pinned to ``port`` alone and the proxy is moved to a free port. One port
    means one Gateway replica, and a restarted one must get it back at once: no drain period, no quarantine.
    Otherwise the proxy takes ``port`` (an exported RAY_SERVE_ENABLE_DIRECT_INGRESS does not decide it)."""
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1" if direct else "0"
    if not direct:
        return port
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(port))
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(port + 1))
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    os.environ.setdefault("RAY_SERVE_PORT_QUARANTINE_S", "0")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _stop_on_signals() -> None:
    """SIGTERM (and SIGINT, even where a parent shell set it to be ignored) end the wait below through the
    same path as Ctrl-C, so Serve and Ray are always shut down."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _drain(grace_s: float = 10.0) -> None:
    """Let open streams finish (or end them with an error event) before Serve's proxy goes away."""
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not "Started <SharedRouterLongPollClient ...>"
    try:
        serve.get_deployment_handle("Gateway", app_name="rnnlab").drain.remote(grace_s).result(timeout_s=grace_s + 10)
        time.sleep(0.5)  # the proxy passes the last events on
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: stop now
    except Exception as error:  # the Gateway may already be gone; shutting down goes on regardless
        logger.warning("rnnlab serve: could not drain open streams (%s).", type(error).__name__)


def run(args: argparse.Namespace) -> int:
    from rnnlab.serve.app import build_app
    from rnnlab.serve.bundles import check_defaults, default_model, find_models

    from rnnlab.serve.auth import load_key, refuse_exposed_without_key
    from rnnlab.serve.limits import check_limits

    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be at least 1, got {args.max_batch_size}.")
    limits = check_limits({name: getattr(args, name) for name in LIMITS}, flags=True)
    refuse_exposed_without_key(args.host, load_key(args.api_key_file) is not None, args.insecure)
    # The application's arguments, as a config's `args` (JSON; absolute paths: Ray builds the application in a
    # task of its own). Built here first, which finds and loads every bundle once: a missing or corrupt one is a
    # BundleError (one sentence, exit 2) before Ray starts.
    app_args = {"bundles": str(Path(args.bundles).expanduser().resolve()), "torch_threads": args.torch_threads,
                "max_batch_size": args.max_batch_size, "default_models": args.default_model or None,
                "runtime": args.runtime,
                "api_key_file": str(Path(args.api_key_file).expanduser().resolve()) if args.api_key_file else None}
    app_args = {key: value for key, value in app_args.items() if value is not None} | limits
    build_app(app_args)
    found = find_models(args.bundles, check=False)
    check_defaults(found, args.default_model)
    kinds = ", ".join(f"/v1/{job} ({', '.join(ids)}; default {default_model(job, ids, args.default_model)})"
                      for job, ids in sorted(found.items()))
    if args.address is None:
        _check_port(args.host, args.port)
    # direct ingress needs the Ray instance started here: the ports it hands replicas are read when Ray starts
    proxy_port = choose_ingress(args.address is None and not args.proxy, args.host, args.port)
    # Ray's proxy (--proxy, and the one Ray keeps aside under direct ingress) reads the header deadline and the
    # connection cap from the environment Ray's processes inherit; the Gateway gets them as arguments. (On an
    # existing cluster, --address, the proxy was started without them: export them where `ray start --head` runs.)
    from rnnlab.serve.connections import export_for_proxy

    export_for_proxy(limits["header_timeout_s"], int(limits["max_connections"]), limits["retry_after_s"])

    import ray
    from ray import serve

    from rnnlab.cluster import connect

    init = {"logging_level": logging.WARNING, "log_to_driver": bool(getattr(args, "verbose", 0))}
    try:
        if args.address:  # a cluster that does not answer is one sentence within seconds (rnnlab/cluster.py)
            connect(args.address, **init)
        else:  # a new instance, never one a stale address file names
            own = {"_metrics_export_port": args.metrics_port} if args.metrics_port else {}
            connect(None, include_dashboard=False, **init, **own)
    except (ConnectionError, RuntimeError, TimeoutError) as error:
        raise RnnlabError(f"Ray could not be started or reached ({first_line(error)}); check --address or "
                          "'ray status'.")
    try:
        # One HTTP proxy, on the head node: with one per node, nodes sharing a machine would fight for the port,
        # and a cluster's load balancer points at the head anyway. Replicas still spread over every node.
        serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": proxy_port,
                                                             "request_timeout_s": limits["request_timeout_s"]})
        deploy_config(app_args, proxy_port, args.host, limits["request_timeout_s"])
        _stop_on_signals()
        address = ray.get_runtime_context().gcs_address
        print(f"rnnlab: serving {kinds} on http://{args.host}:{args.port} (API docs at /docs); Ctrl-C stops. "
              f"Swap a model in place with: rnnlab swap --address {address} MODEL_ID BUNDLE", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("rnnlab: stopping the service.", flush=True)
            _drain()
        return 0
    finally:
        _stop(args.address)


def deploy_config(app_args: dict, proxy_port: int, host: str, request_timeout_s: float,
                  timeout_s: float = 900) -> None:
    """Deploy the application from a config, as ``serve run configs/serve.yaml`` and ``serve deploy`` do, not with
    ``serve.run(app)``: Ray versions a config's deployments by the config's code (import path, args), so a later
    config that changes only a deployment's ``user_config`` (``rnnlab swap``) reconfigures the running replicas in
    place. An application deployed from Python gets a new random version on every deploy: any update restarts
    every replica."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate({
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": proxy_port, "request_timeout_s": request_timeout_s},
        "applications": [{"name": "rnnlab", "route_prefix": "/", "import_path": "rnnlab.serve.app:build_app",
                          "args": app_args}]})
    _get_global_client().deploy_apps(config)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get("rnnlab")
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RnnlabError(f"The service failed to start ({first_line(status.message or status.status)}); see "
                              "the replica logs in /tmp/ray/session_latest/logs/serve.")
        time.sleep(0.5)
    raise RnnlabError(f"The service did not start within {timeout_s:.0f} s; see the replica logs in "
                      "/tmp/ray/session_latest/logs/serve.")


def _stop(address: str | None) -> None:
    """Take the service down so that a clean stop reads clean.

    ``serve.shutdown()`` ends by killing Serve's controller with ``ray.kill`` while this driver still has calls
    open on it (its own ``graceful_shutdown``, and the long poll of the handle ``_drain`` used), and Ray prints
    each as ``(raylet) Task ServeController... failed ... killed by ray.kill``: a fault to anyone reading. So: an
    instance this command started (no ``--address``) goes down with ``ray.shutdown()`` alone, which stops this
    driver's listeners first and then every process of the instance (the streams were drained above; unary
    requests in flight are cut either way); on an existing cluster only the application is deleted
    (``serve.delete``): Serve's controller and proxy stay for the cluster's other users, so nothing is killed
    under a call."""
    import ray
    from ray import serve

    try:
        if address is not None and ray.is_initialized():
            serve.delete("rnnlab")
    except Exception as error:  # noqa: BLE001 -- shutting down goes on regardless
        logger.warning("rnnlab serve: could not delete the application (%s).", first_line(error))
    finally:
        ray.shutdown()
