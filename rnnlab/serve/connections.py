"""Connections the HTTP server accepts: a deadline for a request's headers and a cap on open connections.

Neither Ray Serve nor uvicorn bounds either (Ray 2.60, uvicorn 0.55). uvicorn's keep-alive timer
(``keep_alive_timeout_s`` in Ray's HTTPOptions) is armed only after a response and cancelled by the next byte, so a
client that sends a request line and one header holds its socket forever; ``limit_concurrency`` (which Ray does not
pass through anyway) answers 503 only once a request's headers are complete, so it never sees such a client; and
``h11_max_incomplete_event_size`` bounds bytes, not time, and only for the h11 parser (Ray's uvicorn uses
httptools). So the guard sits where the bytes arrive: a subclass of uvicorn's HTTP protocol (one object per
connection) that

* arms a timer when a connection opens and when the first byte of a further request on it arrives, and closes the
  connection with ``408 Request Timeout`` if that request's headers are not complete within ``header_timeout_s``
  (the body and the response are bounded by ``request_timeout_s`` and ``idle_send_timeout_s`` as before);
* answers ``503`` with ``Retry-After`` and closes a new connection at once when ``max_connections`` are already open
  (idle keep-alive and streaming connections count).

Both answers end in a lingering close: the answer, then FIN (``write_eof``), then whatever the client still sends is
read and dropped (never parsed, never the app's) until it closes or ``LINGER_S`` pass. Closing with the request
unread would make the kernel answer with a reset, which throws away the answer the client has not read yet (httpx:
``ReadError`` instead of 503). Lingering connections do not count towards ``max_connections``; past
``MAX_LINGERING`` of them a connection is closed at once, as before.

Why here and not a TCP front (a small asyncio server relaying to the real one): a front is one more hop for every
byte of every request on a 2-core box where the proxy hop was what direct ingress removed, a second place where a
stream can break, and it exists only under ``rnnlab serve`` (not ``serve run``). The subclass costs one timer per
connection, runs inside whichever process runs uvicorn, and depends on three things of uvicorn, all checked by
tests/test_serve_connections.py against a real server: its default protocol is looked up at start as
``uvicorn.protocols.http.auto.AutoHTTPProtocol``, a protocol's ``connections`` set, and its ``cycle`` (the current
request, replaced when a request's headers are complete).

Installed (:func:`install`) in the two processes that run uvicorn for rnnlab: the Gateway replica (its constructor
runs before Ray Serve starts the replica's own server under direct ingress, so the limits come from the same
arguments as every other limit: ``rnnlab serve`` flags or configs/serve.yaml ``args``), and Ray's proxy actor
(through Ray's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook, called in the proxy's process just before its
uvicorn starts; ``rnnlab serve`` sets it, with the limits in ``RNNLAB_HEADER_TIMEOUT_S`` / ``RNNLAB_MAX_CONNECTIONS``,
before it starts Ray. Under ``serve run`` with the proxy, export the three yourself.)
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("ray.serve")

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 512
ENV_HEADER_TIMEOUT = "RNNLAB_HEADER_TIMEOUT_S"
ENV_MAX_CONNECTIONS = "RNNLAB_MAX_CONNECTIONS"
PROXY_CALLBACK = "rnnlab.serve.connections:proxy_callback"
LINGER_S = 2.0  # how long a turned-away client may go on sending before its connection is closed regardless
MAX_LINGERING = 256  # connections lingering at once, at most (a bound on the sockets a flood can hold)


class Settings:
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    retry_after_s: float = 1.0
    installed_by: str | None = None  # "gateway" or "proxy": the first to install decides (see proxy_callback)
    count = None  # rnnlab.serve.metrics.rejected where installed with count=True, imported then (not on a timer)


def _response(status: int, reason: str, message: str, kind: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"detail": [{"loc": ["connection"], "msg": message, "type": kind}]}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


def _rejected(kind: str) -> None:
    if Settings.count is not None:
        try:
            Settings.count(kind)
        except Exception:  # noqa: BLE001 -- counting never decides what a connection gets
            pass


def _guarded(base: type) -> type:
    class GuardedHTTPProtocol(base):
        """uvicorn's HTTP protocol with a header deadline and a connection cap (see the module docstring)."""

        _rnnlab_base = base
        lingering = 0  # connections in a lingering close (they do not count towards max_connections)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self._linger_timer = None
            if len(self.connections) - GuardedHTTPProtocol.lingering > Settings.max_connections:  # this one included
                _rejected("too_many_connections")
                retry = f"retry-after: {max(1, round(Settings.retry_after_s))}\r\n".encode()
                self._answer_and_close(_response(503, "Service Unavailable",
                                                 f"The service already has {Settings.max_connections} connections "
                                                 "open, its max_connections; retry after the Retry-After seconds.",
                                                 "overloaded", retry))
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._linger_timer is not None:
                return  # answered already: the rest of the request is read only to be dropped
            cycle = getattr(self, "cycle", None)
            if self._header_timer is None and (cycle is None or cycle.response_complete) \
                    and not self.transport.is_closing():
                self._arm()  # the first byte of a further request on a kept-alive connection
            super().data_received(data)
            if self._header_timer is not None and getattr(self, "cycle", None) is not self._waiting_since:
                self._disarm()  # its headers are complete: the request is the app's now

        def connection_lost(self, exc) -> None:
            self._disarm()
            timer, self._linger_timer = self._linger_timer, None
            if timer is not None:
                timer.cancel()
                GuardedHTTPProtocol.lingering -= 1
            super().connection_lost(exc)

        def _answer_and_close(self, response: bytes) -> None:
            """The lingering close (see the module docstring): ``response``, the end of what this side sends, then
            the client's bytes dropped until it closes or ``LINGER_S`` pass; a plain close past ``MAX_LINGERING``."""
            self.transport.write(response)
            if GuardedHTTPProtocol.lingering >= MAX_LINGERING:
                self.transport.close()
                return
            if self.transport.can_write_eof():
                self.transport.write_eof()
            GuardedHTTPProtocol.lingering += 1
            self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

        def _arm(self) -> None:
            self._waiting_since = getattr(self, "cycle", None)
            self._header_timer = self.loop.call_later(Settings.header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            timer, self._header_timer = getattr(self, "_header_timer", None), None
            if timer is not None:
                timer.cancel()

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if getattr(self, "cycle", None) is not self._waiting_since or self.transport.is_closing():
                return
            _rejected("header_timeout")
            self._answer_and_close(_response(408, "Request Timeout",
                                             f"The request's headers did not arrive within "
                                             f"{Settings.header_timeout_s:g} s (the service's header_timeout_s).",
                                             "timeout"))

    return GuardedHTTPProtocol


def install(header_timeout_s: float | None = None, max_connections: int | None = None,
            retry_after_s: float | None = None, *, by: str = "gateway", count: bool = True) -> bool:
    """Put the guard in front of uvicorn's default HTTP protocol in this process (idempotent: a second call only
    updates the limits). ``count``: turned-away connections go to the ``rnnlab_rejected_requests`` metric
    (reasons ``header_timeout``, ``too_many_connections``). Returns False, with one warning, if this uvicorn does
    not look up its protocol the way the guard relies on."""
    import inspect

    import uvicorn
    import uvicorn.protocols.http.auto as auto

    if header_timeout_s is not None:
        Settings.header_timeout_s = float(header_timeout_s)
    if max_connections is not None:
        Settings.max_connections = int(max_connections)
    if retry_after_s is not None:
        Settings.retry_after_s = float(retry_after_s)
    if count and Settings.count is None:
        from rnnlab.serve import metrics

        Settings.count = metrics.rejected
    if getattr(auto.AutoHTTPProtocol, "_rnnlab_base", None) is not None:
        return True
    if inspect.signature(uvicorn.Config).parameters["http"].default != "auto":
        logger.warning("rnnlab serve: uvicorn %s no longer defaults to its 'auto' HTTP protocol, so header_timeout_s "
                       "and max_connections are not applied.", uvicorn.__version__)
        return False
    auto.AutoHTTPProtocol = _guarded(auto.AutoHTTPProtocol)
    Settings.installed_by = by
    return True


def uninstall() -> None:
    """Back to uvicorn's own protocol (tests)."""
    import uvicorn.protocols.http.auto as auto

    base = getattr(auto.AutoHTTPProtocol, "_rnnlab_base", None)
    if base is not None:
        auto.AutoHTTPProtocol = base
    Settings.installed_by = Settings.count = None


def export_for_proxy(header_timeout_s: float, max_connections: int, retry_after_s: float) -> None:
    """Before ray.init: have Ray's proxy actor (and any replica that starts an HTTP server) install the guard with
    these limits. Processes Ray starts inherit this environment. A callback path the user exported is kept."""
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    os.environ[ENV_HEADER_TIMEOUT] = repr(float(header_timeout_s))
    os.environ[ENV_MAX_CONNECTIONS] = str(int(max_connections))
    os.environ["RNNLAB_RETRY_AFTER_S"] = repr(float(retry_after_s))


def proxy_callback() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` target: Ray calls it in the proxy's process (and, under direct
    ingress, in the Gateway replica's) right before uvicorn starts; it returns the extra ASGI middlewares (none).
    Where the Gateway already installed the guard with its own arguments, those stay."""
    if Settings.installed_by != "gateway":
        def number(name, kind):
            value = os.environ.get(name)
            return kind(value) if value else None

        install(number(ENV_HEADER_TIMEOUT, float), number(ENV_MAX_CONNECTIONS, int),
                number("RNNLAB_RETRY_AFTER_S", float), by="proxy")
    return []


