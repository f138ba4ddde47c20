"""Running the service: what ``rnnlab serve`` does with the plain values its flags give (rnnlab/launch/serve_cmd.py).

1. the application's arguments are checked before Ray starts (``check_args``: every bundle found and loaded once),
   so a missing or corrupt bundle is one sentence and a non-zero exit, not replicas failing in a loop;
2. Ray starts (a new local instance, never a stale one) or is joined (``address``), and Serve's HTTP entry is set
   up: direct ingress (the Gateway replica listens on the port itself) or Ray's proxy;
3. the application is deployed from a config, as ``serve run configs/serve.yaml`` does, so that ``rnnlab swap``
   updates it in place; then the ready line (:data:`READY`) says where it answers;
4. Ctrl-C or SIGTERM drains the open streams and takes the service down.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import socket
import time
from pathlib import Path

from rnnlab.errors import ConfigError, RnnlabError, first_line
from rnnlab.serve.limits import proxy_timeout_s
from rnnlab.serve.replicas import cpu_share, node_cpus

logger = logging.getLogger(__name__)

READY = "rnnlab: serving"  # how the line printed once every deployment is up begins (rnnlab/serve/local.py)
APP_NAME = "rnnlab"
# glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps what is freed inside each
# one; a replica has many such threads (Ray's core worker, its event loops, uvicorn's under direct ingress, torch's),
# each arena holding its own high-water mark, so in a soak every replica's RSS crept for as long as it ran: the
# Gateway ~0.25 MiB/min after minute 5 while its Python objects (tracemalloc) and glibc's bytes in use stayed flat
# and only the free bytes inside the arenas grew (benchmarks/soak.py --trace-memory). With two arenas its RSS
# levelled off 20 MiB lower within 5 minutes; malloc_trim once a minute did not help (pages freed between live
# allocations are reused at once). The runs: benchmarks/results/soak_allocator.json.
MALLOC_ARENAS = "2"
PROXY_READY_TIMEOUT_S = "30"  # Ray's per-try readiness deadline for its HTTP proxy (tries 2 and 3: 2x, 3x)


def run(app_args: dict, *, host: str, port: int, address: str | None = None, proxy: bool = False,
        metrics_port: int | None = None, verbose: bool = False) -> int:
    """Serve ``build_app(app_args)`` on host:port until Ctrl-C or SIGTERM; 0 after a clean stop. ``address``: an
    existing Ray cluster to deploy onto (HTTP then enters through Ray's proxy on its head)."""
    from rnnlab.serve.app import check_args
    from rnnlab.serve.bundles import default_model
    from rnnlab.serve.connections import export_for_proxy

    checked = check_args(app_args)
    routes = ", ".join(f"/v1/{job} ({', '.join(ids)}; default {default_model(job, ids, checked.defaults)})"
                       for job, ids in sorted(checked.found.items()))
    if address is None:
        check_port(host, port)
    # direct ingress needs the Ray instance started here: the ports it hands replicas are read when Ray starts
    proxy_port = choose_ingress(address is None and not proxy, host, port)
    # Ray's proxy (--proxy, and the one Ray keeps aside under direct ingress) reads the header deadline and the
    # connection cap from the environment Ray's processes inherit; the Gateway gets them as arguments. (On an
    # existing cluster, --address, the proxy was started without them: export them where `ray start --head` runs.)
    limits = checked.limits
    export_for_proxy(limits["header_timeout_s"], int(limits["max_connections"]), limits["retry_after_s"])
    set_ray_environment()
    ray_address = start_ray(address, metrics_port=metrics_port, verbose=verbose)
    try:
        # the replicas' CPU shares need the cluster's nodes: replicas that do not fit are one sentence here, not a
        # deployment waiting for CPUs that never come
        cpu_share(len(checked.found), app_args.get("replicas", 1), node_cpus(), app_args.get("torch_threads") or 1)
        deploy_config(app_args, proxy_port, host, proxy_timeout_s(limits["request_timeout_s"]))
        _stop_on_signals()
        print(f"{READY} {routes} on http://{host}:{port} (API docs at /docs); Ctrl-C stops. "
              f"Swap a model in place with: rnnlab swap --address {ray_address} MODEL_ID BUNDLE", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("rnnlab: stopping the service.", flush=True)
            _drain()
        return 0
    finally:
        stop(address)


def set_ray_environment() -> None:
    """Settings the processes Ray starts read from the environment they inherit: call before ray.init (an exported
    value wins; on --address they are read where `ray start` runs)."""
    # glibc's malloc arenas, read when each process begins (the soak's replica memory: benchmarks/README.md)
    os.environ.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENAS)
    # Serve's controller gives its HTTP proxy 5 s to answer its first readiness check, three tries, then kills it
    # and serve.start fails (ActorDiedError): on the 2-core box at load ~6 a proxy took 33 s from its actor's
    # creation to its first log line, so a loaded CI machine could not start a service
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_TIMEOUT_S)


def check_port(host: str, port: int) -> None:
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


# Ports to choose from: above Ray's worker ports (10002-19999) and below both Ray Serve's direct-ingress range
# (30000-) and the kernel's ephemeral ports, from which every outgoing connection takes its local port.
QUIET_PORTS = (20_000, 30_000)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing uses right now, outside the kernel's ephemeral range: a port the kernel
    chose (``bind(0)``) is one it hands out again, and Ray's processes open hundreds of connections while a service
    starts, so one of them could take it before the service binds it (``make demo`` once failed that way: "Failed
    to bind to address '127.0.0.1:37347'"). Falls back to a kernel-chosen port when no quiet port is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low, high = QUIET_PORTS[0], min(QUIET_PORTS[1], _ephemeral_start())
    for port in random.sample(range(low, high), min(100, max(0, high - low))):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


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
    return free_port(host)


def start_ray(address: str | None, *, metrics_port: int | None = None, verbose: bool = False) -> str:
    """Join the cluster at ``address`` (one sentence within seconds when none answers: rnnlab/cluster.py), or start a
    new local instance (never one a stale address file names); returns the GCS address, for ``rnnlab swap``."""
    import ray

    from rnnlab.cluster import connect

    init = {"logging_level": logging.WARNING, "log_to_driver": verbose}
    try:
        if address:
            connect(address, **init)
        else:
            connect(None, include_dashboard=False, **init,
                    **({"_metrics_export_port": metrics_port} if metrics_port else {}))
    except (ConnectionError, RuntimeError, TimeoutError) as error:
        raise RnnlabError(f"Ray could not be started or reached ({first_line(error)}); check --address or "
                          "'ray status'.")
    return ray.get_runtime_context().gcs_address


def deploy_config(app_args: dict, proxy_port: int, host: str, request_timeout_s: float,
                  timeout_s: float = 900) -> None:
    """Deploy the application from a config, as ``serve run configs/serve.yaml`` and ``serve deploy`` do, not with
    ``serve.run(app)``: Ray versions a config's deployments by the config's code (import path, args), so a later
    config that changes only a deployment's ``user_config`` (``rnnlab swap``) reconfigures the running replicas in
    place. An application deployed from Python gets a new random version on every deploy: any update restarts
    every replica. Serve's HTTP entry starts with it: one proxy, on the head node (with one per node, nodes
    sharing a machine would fight for the port, and a cluster's load balancer points at the head anyway); replicas
    still spread over every node."""
    from ray import serve
    # Serve's controller client: what `serve run CONFIG` itself deploys with. Ray's public alternative, `serve
    # deploy`, goes through the dashboard's REST API, and the dashboard is not started (nor needed) here.
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    http_options = {"host": host, "port": proxy_port, "request_timeout_s": request_timeout_s}
    serve.start(proxy_location="HeadOnly", http_options=http_options)
    config = ServeDeploySchema.model_validate({
        "proxy_location": "HeadOnly", "http_options": http_options,
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "rnnlab.serve.app:build_app",
                          "args": app_args}]})
    _get_global_client().deploy_apps(config)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in FAILED:
            raise RnnlabError(f"The service failed to start ({why_failed(status)}); see the replica logs in "
                              f"{serve_logs()}.")
        time.sleep(0.5)
    raise RnnlabError(f"The service did not start within {timeout_s:.0f} s; see the replica logs in {serve_logs()}.")


FAILED = ("DEPLOY_FAILED", "UNHEALTHY")  # Serve's statuses of an application or deployment that will not serve


def why_failed(status) -> str:
    """Each failing deployment of an application's ``serve.status()`` with the last line of its message: for a
    constructor that raised, the error itself (Serve keeps the traceback; the application's own message only
    names the deployments)."""
    failed = []
    for name, deployment in status.deployments.items():
        if deployment.status in FAILED:
            lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
            failed.append(f"{name}: {lines[-1]}" if lines else name)
    return "; ".join(failed) or first_line(status.message or status.status)


def serve_logs() -> str:
    """Where this machine's Ray keeps Serve's logs: under RAY_TMPDIR, else TMPDIR, else /tmp (Ray's rule on Linux)."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(root, "ray", "session_latest", "logs", "serve")


def _stop_on_signals() -> None:
    """SIGTERM (and SIGINT, even where a parent shell set it to be ignored) end the wait in :func:`run` through the
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
        serve.get_deployment_handle("Gateway", app_name=APP_NAME).drain.remote(grace_s).result(timeout_s=grace_s + 10)
        time.sleep(0.5)  # the proxy passes the last events on
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: stop now
    except Exception as error:  # the Gateway may already be gone; shutting down goes on regardless
        logger.warning("rnnlab serve: could not drain open streams (%s).", type(error).__name__)


def stop(address: str | None) -> None:
    """Take the service down so that a clean stop reads clean.

    ``serve.shutdown()`` ends by killing Serve's controller with ``ray.kill`` while this driver still has calls
    open on it (its own ``graceful_shutdown``, and the long poll of the handle ``_drain`` used), and Ray prints
    each as ``(raylet) Task ServeController... failed ... killed by ray.kill``: a fault to anyone reading. So: an
    instance this process started (no ``address``) goes down with ``ray.shutdown()`` alone, which stops this
    driver's listeners first and then every process of the instance (the streams were drained above; unary
    requests in flight are cut either way); on an existing cluster only the application is deleted
    (``serve.delete``): Serve's controller and proxy stay for the cluster's other users, so nothing is killed
    under a call."""
    import ray
    from ray import serve

    try:
        if address is not None and ray.is_initialized():
            serve.delete(APP_NAME)
    except Exception as error:  # noqa: BLE001 -- shutting down goes on regardless
        logger.warning("rnnlab serve: could not delete the application (%s).", first_line(error))
    finally:
        ray.shutdown()
