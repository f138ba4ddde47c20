"""The local service harness (rnnlab/serve/local.py) when the service cannot start: the demo, the tests and the
benchmarks learn why at once, from what it printed, and nothing is left running. (Every test that starts a
service through it covers the way it waits for the ready line and stops.)"""

from __future__ import annotations

import pytest

from rnnlab.serve.local import LocalService, ServiceFailed


def test_a_service_that_exits_before_serving_fails_at_once_with_what_it_printed(tmp_path):
    service = LocalService(tmp_path / "nowhere")
    with pytest.raises(ServiceFailed) as failed:
        service.start(timeout_s=300)
    assert "rnnlab serve exited with code 2" in str(failed.value)
    assert "does not exist" in str(failed.value) and "Traceback" not in str(failed.value)
    assert service.session_processes() == []


def test_a_free_port_is_outside_the_range_the_kernel_hands_to_connections():
    """Ray's processes open hundreds of connections while a service starts, each on a port from the kernel's
    ephemeral range: a port chosen there could be taken before the service binds it."""
    import socket

    from rnnlab.serve.service import QUIET_PORTS, _ephemeral_start, free_port

    ports = {free_port() for _ in range(20)}
    assert all(QUIET_PORTS[0] <= port < min(QUIET_PORTS[1], _ephemeral_start()) for port in ports)
    for port in ports:  # and nothing holds them
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_the_proxy_beside_direct_ingress_gets_a_quiet_port(monkeypatch):
    """With direct ingress the Gateway takes --port and Ray's proxy a port of its own: one outside the kernel's
    ephemeral range too (`make demo` once failed to start when a connection took the proxy's port first)."""
    from rnnlab.serve.service import QUIET_PORTS, _ephemeral_start, choose_ingress

    for name in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT",
                 "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
                 "RAY_SERVE_PORT_QUARANTINE_S"):
        monkeypatch.delenv(name, raising=False)  # choose_ingress sets them; undone after the test
    ports = {choose_ingress(True, "127.0.0.1", 8765) for _ in range(10)}
    assert all(QUIET_PORTS[0] <= port < min(QUIET_PORTS[1], _ephemeral_start()) for port in ports)


def test_a_failed_start_names_each_failing_deployment_and_its_error():
    """The application's own status message only names the deployments; the error is the last line of each
    deployment's (Serve keeps the constructor's traceback there)."""
    from types import SimpleNamespace

    from rnnlab.serve.service import why_failed

    deployments = {
        "Gateway": SimpleNamespace(status="DEPLOY_FAILED", message="The deployment failed to start 1 times.\n"
                                   "Traceback (most recent call last):\n  ...\nOSError: [Errno 98] address in use\n"),
        "sentiment": SimpleNamespace(status="HEALTHY", message=""),
        "charlm": SimpleNamespace(status="UNHEALTHY", message=""),
    }
    status = SimpleNamespace(status="DEPLOY_FAILED", message="Failed to update the deployments ['Gateway'].",
                             deployments=deployments)
    assert why_failed(status) == "Gateway: OSError: [Errno 98] address in use; charlm"
