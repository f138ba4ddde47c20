"""rnnlab.serve.connections against a real uvicorn server on 127.0.0.1 (no Ray: the same protocol class Ray's
proxy and the direct-ingress Gateway run): half-open connections get 408 after header_timeout_s, connections above
max_connections get 503 + Retry-After at once, both answers reach the client whole even while it is still sending
(no reset: httpx sees the status, not a ReadError), and nothing else changes (slow bodies, kept-alive connections).

Every wait is a socket read with a timeout (bounded), never a sleep to let the server catch up. The running
service gets the same checks through its flags in tests/test_serve_direct_ingress.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from conftest import require

uvicorn = require("uvicorn")
httpx = require("httpx")

from rnnlab.serve import connections  # noqa: E402

HALF_OPEN = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # a request line and one header, never finished


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/busy":  # a handler that holds the event loop in 0.2 s slices for 3 s
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        for _ in range(15):
            time.sleep(0.2)
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = b"ok:" + body
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture()
def server():
    """(host, port) of a uvicorn server started as Ray Serve starts one (its own socket, uvicorn's defaults)."""
    connections.install(header_timeout_s=0.5, max_connections=8, retry_after_s=3, count=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # clients can connect at once; the server accepts them when it is up: no start-up wait needed
    server = uvicorn.Server(uvicorn.Config(_app, lifespan="off", log_level="critical", access_log=False,
                                           timeout_keep_alive=30))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        address = sock.getsockname()
        with _connect(address, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n") as client:
            assert _read_until_closed(client, 60).startswith(b"HTTP/1.1 200 ")  # up (the first answer is the sync)
        yield address
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        connections.uninstall()


def _connect(address, data: bytes = b"") -> socket.socket:
    client = socket.create_connection(address, timeout=10)
    if data:
        client.sendall(data)
    return client


def _read_until_closed(client: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (bounded by ``timeout_s``)."""
    client.settimeout(timeout_s)
    received = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        chunk = client.recv(65536)  # a reset fails the test: the answer must be readable
        if not chunk:
            break
        received += chunk
    return received


def _response(client: socket.socket, timeout_s: float = 10) -> bytes:
    """One whole response on a kept-alive connection (headers + content-length bytes)."""
    head, body = _response_head(client, timeout_s).split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += client.recv(65536)
    return head + b"\r\n\r\n" + body


def _response_head(client: socket.socket, timeout_s: float = 10) -> bytes:
    """A response's status line and headers (the body may not have been sent yet)."""
    client.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    return data


def _stays_open(client: socket.socket, seconds: float) -> bool:
    """True if the server neither sends anything nor closes within ``seconds`` (a bounded read, no sleep)."""
    client.settimeout(seconds)
    try:
        client.recv(1, socket.MSG_PEEK)  # data or b"" (closed): either way not left alone
    except TimeoutError:
        return True
    return False


def test_half_open_connections_get_408_after_the_header_timeout(server):
    started = time.monotonic()
    clients = [_connect(server, HALF_OPEN) for _ in range(5)] + [_connect(server)]  # the last sends nothing
    answers = [_read_until_closed(client) for client in clients]
    elapsed = time.monotonic() - started
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), answers
    assert b"header_timeout_s" in answers[0] and b"connection: close" in answers[0]
    assert 0.4 < elapsed < 5, elapsed
    for client in clients:
        client.close()


def test_a_slow_body_and_a_kept_alive_connection_are_not_cut(server):
    with _connect(server, b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n") as client:
        assert _stays_open(client, 1.0)  # twice the header timeout: the headers were complete, the body may wait
        client.sendall(b"hello")
        assert _response(client).endswith(b"ok:hello")
        assert _stays_open(client, 1.0)  # idle between requests: uvicorn's keep-alive timeout governs, not ours
        client.sendall(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
        assert _response(client).startswith(b"HTTP/1.1 200 ")
        client.sendall(HALF_OPEN)  # a further request that stalls in its headers: 408
        assert _read_until_closed(client).startswith(b"HTTP/1.1 408 ")


def test_connections_above_the_cap_get_503_with_retry_after_at_once(server):
    connections.install(header_timeout_s=30, count=False)  # the held connections must outlive the test
    held = [_connect(server, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n") for _ in range(8)]
    for client in held:  # answered, and kept alive: each still counts
        assert _response(client).startswith(b"HTTP/1.1 200 ")
    started = time.monotonic()
    extra = [_connect(server, b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n") for _ in range(4)]
    answers = [_read_until_closed(client) for client in extra]
    assert all(answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 3" in answer for answer in answers), answers
    assert time.monotonic() - started < 5
    held.pop().close()  # one leaves: the next is served
    deadline, answer = time.monotonic() + 10, b""
    while time.monotonic() < deadline:  # the server sees the close when it next reads that socket
        with _connect(server, b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n") as client:
            answer = _read_until_closed(client)
        if answer.startswith(b"HTTP/1.1 200 "):
            break
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    for client in held + extra:
        client.close()


def test_a_408_stays_readable_while_a_slow_client_is_still_sending(server):
    """The 408 falls due while the server's loop is busy (as under load) and the client's next header bytes are
    already waiting unread: they must not turn the close into a reset that discards the 408."""
    with _connect(server, b"GET /busy HTTP/1.1\r\nHost: h\r\n\r\n") as busy:
        assert _response_head(busy).startswith(b"HTTP/1.1 200 ")  # the loop is busy from here for 3 s
        with _connect(server, HALF_OPEN + b"X-Slow: ") as client:  # its header deadline falls within those 3 s
            client.settimeout(0.01)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # one more byte of the header value each 10 ms until an answer
                client.sendall(b"a")
                try:
                    if client.recv(1, socket.MSG_PEEK):
                        break
                except TimeoutError:
                    pass
            answer = _read_until_closed(client)
    assert answer.startswith(b"HTTP/1.1 408 ") and answer.endswith(b'"type": "timeout"}]}'), answer


async def _burst_beside_idle_connections(address, count: int) -> list:
    """``count`` concurrent httpx requests while 3 connections that sent nothing and 3 that sent part of their
    headers hold 6 of the 8 connections the server allows; then those 6 leave. Each request's answer or exception."""
    idle = [_connect(address) for _ in range(3)] + [_connect(address, HALF_OPEN) for _ in range(3)]
    try:
        async with httpx.AsyncClient(base_url=f"http://{address[0]}:{address[1]}", timeout=60,
                                     limits=httpx.Limits(max_connections=count)) as client:
            return await asyncio.gather(*(client.post("/burst", content=b"x" * 1000) for _ in range(count)),
                                        return_exceptions=True)
    finally:
        for sock in idle:
            sock.close()


def test_shed_connections_get_a_readable_503_not_a_reset(server):
    connections.install(header_timeout_s=30, count=False)  # the idle connections hold their places throughout
    answers = asyncio.run(_burst_beside_idle_connections(server, 100))
    errors = [repr(a) for a in answers if isinstance(a, Exception)]
    assert not errors, f"{len(errors)} of 100 requests got no HTTP answer: {errors[:5]}"
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503, 408, 504} and 200 in codes, codes  # the 2 free places serve
    shed = [a for a in answers if a.status_code == 503]
    assert shed and all(a.headers["retry-after"] == "3" for a in shed)
    # the turned-away connections leave no count behind: once the idle ones have gone, 8 are served again, not 9
    deadline = time.monotonic() + 30
    while True:
        held = [_connect(server, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n") for _ in range(9)]
        answers = [_read_until_closed(sock, 10) if i == 8 else _response(sock) for i, sock in enumerate(held)]
        for sock in held:
            sock.close()
        if all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers[:8]) or time.monotonic() > deadline:
            break  # until the server has seen the idle connections close (it sees a close when it next reads)
    assert [answer[:12] for answer in answers] == [b"HTTP/1.1 200"] * 8 + [b"HTTP/1.1 503"], answers


def test_the_proxy_callback_reads_the_limits_rnnlab_serve_exports(monkeypatch):
    import os

    # this test's own environment: the limits it exports must not reach the Ray proxies of later tests (monkeypatch's
    # delenv records nothing for a name that is absent, so it could not take back what export_for_proxy sets)
    environment = {name: value for name, value in os.environ.items() if name not in (
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", connections.ENV_HEADER_TIMEOUT, connections.ENV_MAX_CONNECTIONS,
        "RNNLAB_RETRY_AFTER_S")}
    monkeypatch.setattr(os, "environ", environment)
    connections.export_for_proxy(2.5, 7, 4)

    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    try:  # as Ray's proxy calls it: the import path the environment names; no extra middlewares
        assert validate_http_proxy_callback_return(call_function_from_import_path(
            os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"])) == []
        assert (connections.Settings.header_timeout_s, connections.Settings.max_connections) == (2.5, 7)
        import uvicorn.protocols.http.auto as auto

        assert auto.AutoHTTPProtocol._rnnlab_base is not None
    finally:
        connections.uninstall()
        connections.install(connections.DEFAULT_HEADER_TIMEOUT_S, connections.DEFAULT_MAX_CONNECTIONS, 1.0,
                            count=False)  # the defaults back for whatever runs next in this process
        connections.uninstall()
