"""Joining a Ray cluster: the one place ``rnnlab tune --address`` and ``rnnlab serve --address`` connect.

    from rnnlab.cluster import connect
    nodes = connect("127.0.0.1:6379", runtime_env=...)   # or "auto", "HOST:PORT", "ray://HOST:10001"

Two things ``ray.init(address=...)`` alone gets wrong for a user:

* **A dead or wrong address hangs.** Ray retries the GCS for minutes, printing "Failed to connect to GCS" every
  30 s. Here the head is asked for its node table first (one gRPC call, :data:`PROBE_TIMEOUT_S`), so an address
  where no cluster answers (a typo, a stopped or killed cluster, a firewall) is one :class:`ConfigError` sentence
  within seconds.
* **A cluster that listens on 127.0.0.1 only** (``ray.cluster_utils.Cluster`` with ``node_ip_address=
  "127.0.0.1"``, or a head started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, as tests and sandboxes do).
  Ray rewrites a loopback address to the machine's own IP (``ray._private.services.resolve_ip_for_localhost``)
  before connecting, which such a cluster does not listen on. When the node table says the nodes advertise a
  loopback address, this process keeps loopback (Ray's own switch for that, ``ENABLE_RAY_CLUSTER``, turned off
  for this driver only). Clusters started with ``ray start`` advertise the machine's IP even when given
  ``--node-ip-address 127.0.0.1``, and Ray's rewrite is then right: nothing is changed.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from rnnlab.errors import ConfigError, first_line

PROBE_TIMEOUT_S = 5.0
_CLIENT_PREFIX = "ray://"


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    cpus: float
    gpus: float
    is_head: bool


# Ray starts its worker processes at nice 15 (for batch work, so a driver stays responsive), but every worker rnnlab
# starts is the work itself: a Serve replica, a Tune trial. At nice 15 beside one busy process per core at normal
# priority (a loaded CI machine) a replica's process got 3.6 % of a core, and services did not start in minutes.
WORKER_NICENESS = "0"


def set_worker_priority() -> None:
    """Workers of a Ray instance started from this process run at normal priority (an exported value wins)."""
    os.environ.setdefault("RAY_worker_niceness", WORKER_NICENESS)


def connect(address: str | None, **init_kwargs) -> list[Node] | None:
    """``ray.init`` for a new local instance (``address=None``) or an existing cluster; returns the cluster's live
    nodes (None for Ray Client or a local instance). Raises ConfigError, one sentence, when no cluster answers.

    A local instance is always a new one: ``ray.init()`` alone would join whatever cluster a ``ray start`` on this
    machine recorded in Ray's address file, a stale one after an unclean stop, or one meant for something else."""
    import ray

    if address is None:
        set_worker_priority()
        ray.init(address="local", **init_kwargs)
        return None
    address = address.strip()
    if address.startswith(_CLIENT_PREFIX):  # Ray Client: its server is not the GCS; a TCP check is what we can do
        host, port = split_address(address[len(_CLIENT_PREFIX):], original=address)
        _check_listening(host, port, address)
        _init(ray, address, init_kwargs)
        return None
    resolved = _resolve_auto(address)
    host, port = split_address(resolved, original=address)
    nodes = cluster_nodes(host, port, shown=address if resolved == address else f"{address} = {resolved}")
    if _is_loopback(host) and any(_is_loopback(node.address) for node in nodes):
        keep_loopback()
    _init(ray, f"{host}:{port}", init_kwargs)
    return nodes


def bring_token() -> None:
    """``rnnlab serve`` starts its Ray instance with Ray's token authentication on (Ray's default for a new
    instance); a driver joining it sends the token (~/.ray/auth_token, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)
    only with RAY_AUTH_MODE=token, and fails with "Failed to connect" otherwise. Set it when a token is there and
    the mode is not chosen already. Call it before Ray is imported: Ray reads the mode then."""
    from pathlib import Path

    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def split_address(address: str, *, original: str | None = None) -> tuple[str, int]:
    shown = original or address
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address '{shown}' is not HOST:PORT, 'auto' or ray://HOST:PORT; "
                          "give the head node's address as `ray start --head` printed it.")
    return host, int(port)


def cluster_nodes(host: str, port: int, *, shown: str | None = None) -> list[Node]:
    """The cluster's live nodes, asked of its GCS at host:port; ConfigError when nothing there answers as one.
    Empty when the head wants an auth token this probe does not carry (ray.init then connects with it)."""
    import grpc
    from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc

    shown = shown or f"{host}:{port}"

    def unreachable(why: str) -> ConfigError:
        return ConfigError(
            f"The Ray cluster at --address {shown} cannot be reached ({why}); start one with `ray start --head`, "
            "or pass the address its head printed (a stopped or killed cluster leaves a stale address behind)."
        )

    why = _tcp_problem(host, port)  # a closed port is known at once; gRPC would retry it until its timeout
    if why:
        raise unreachable(why)
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=PROBE_TIMEOUT_S)
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=PROBE_TIMEOUT_S)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:  # a head with token auth: ray.init brings the token
            return []
        raise unreachable(f"port {port} is open but is not a Ray head ({error.code().name})") from None
    except grpc.FutureTimeoutError:
        why = f"port {port} is open but did not answer as a Ray head within {PROBE_TIMEOUT_S:g} s"
        raise unreachable(why) from None
    finally:
        channel.close()
    alive = gcs_pb2.GcsNodeInfo.GcsNodeState.Value("ALIVE")
    nodes = [
        Node(node_id=info.node_id.hex(), address=info.node_manager_address,
             cpus=float(info.resources_total.get("CPU", 0)), gpus=float(info.resources_total.get("GPU", 0)),
             is_head=bool(info.is_head_node))
        for info in reply.node_info_list if info.state == alive
    ]
    if not nodes:  # the head's GCS outlived its raylet
        raise ConfigError(f"The Ray cluster at --address {shown} has no live node left; restart its head "
                          "(`ray stop; ray start --head`) and add the workers again.")
    return nodes


def keep_loopback() -> None:
    """Make this process connect to (and advertise) 127.0.0.1 rather than the machine's IP.

    Ray reads the flag at call time (``services.get_node_ip_address``); it only decides which address this
    driver uses, the cluster itself is untouched. Exported as well, for any Ray CLI this process starts."""
    import os

    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"


def _resolve_auto(address: str) -> str:
    """``auto``: RAY_ADDRESS, else the cluster ``ray start`` last recorded under this machine's Ray temp folder
    (RAY_TMPDIR). Unlike Ray's own ``auto``, never any GCS process found running: on a shared machine that may
    be someone else's cluster."""
    import os

    if address != "auto":
        return address
    from ray._private import services

    found = os.environ.get("RAY_ADDRESS") or services.find_bootstrap_address(None)
    if not found or found == "auto":
        raise ConfigError("--address auto found no Ray cluster on this machine (no RAY_ADDRESS, nothing started "
                          "with `ray start --head`); start one, or pass HOST:PORT of a remote head.")
    return found


def _init(ray, address: str, init_kwargs: dict) -> None:
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as error:  # e.g. another Ray version on the cluster
        reason = first_line(error).rstrip(".")
        raise ConfigError(f"Could not join the Ray cluster at {address} ({reason}).") from None


def _check_listening(host: str, port: int, shown: str) -> None:
    why = _tcp_problem(host, port)
    if why:
        raise ConfigError(f"The Ray Client server at --address {shown} cannot be reached ({why}); start the head "
                          "with `ray start --head` (its Ray Client server listens on port 10001).")


def _tcp_problem(host: str, port: int) -> str | None:
    """Why a TCP connection to host:port fails, or None when something listens there."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except ConnectionRefusedError:
        return f"nothing listens on port {port}"
    except socket.gaierror:
        return f"the host name '{host}' does not resolve"
    except OSError as error:
        return f"{host} did not answer within {PROBE_TIMEOUT_S:g} s" if isinstance(error, TimeoutError) \
            else (error.strerror or str(error))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
