"""The service's limits, checked once, and the ASGI guard that applies them before any route runs.

One table (``LIMITS``) gives each limit's default, its floor and what it bounds; ``rnnlab serve`` flags, the
``args`` of configs/serve.yaml and ``build_app`` all go through :func:`check_limits`, so a bad value is the same one
sentence everywhere. Defaults fit a 2-core box: a few dozen streams decode comfortably in one generation step,
and a request that waits longer than a minute is better refused than served.

:class:`Guard` wraps the FastAPI app inside the Gateway replica: it answers 401 without a key, 413 for a body
over ``max_body_bytes`` (from ``Content-Length`` before reading, and by counting for chunked bodies, so at most
the limit is ever read), and cuts a response whose client has stopped reading for ``idle_send_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass

from fastapi import HTTPException

from rnnlab.errors import ConfigError
from rnnlab.serve import auth, metrics
from rnnlab.serve.openai import from_detail as openai_error

# name: (type, default, minimum, what it bounds)
LIMITS: dict[str, tuple[type, float, float, str]] = {
    "max_body_bytes": (int, 4 * 1024 * 1024, 1024, "bytes in one request body; larger ones get 413"),
    "max_ongoing_requests": (int, 128, 1, "requests the Gateway works on at once; more wait in the queue"),
    "max_queued_requests": (int, 64, 1, "requests waiting for each deployment; more get 503 + Retry-After"),
    "max_streams": (int, 32, 1, "generation streams open at once; more get 503 + Retry-After"),
    "request_timeout_s": (float, 60.0, 1, "seconds a request (a stream too) may take before it is cut"),
    "idle_send_timeout_s": (float, 10.0, 0.1, "seconds a client may stop reading a response before it is closed"),
    "retry_after_s": (float, 1.0, 0, "the Retry-After a 503 asks for"),
    "header_timeout_s": (float, 10.0, 0.1, "seconds a client may take to send a request's headers; a slower "
                         "connection gets 408 and is closed"),
    "max_connections": (int, 512, 1, "HTTP connections open at once (idle keep-alive ones too); a new one above "
                        "that gets 503 + Retry-After and is closed"),
}
DEFAULTS = {name: spec[1] for name, spec in LIMITS.items()}


def check_limits(values: dict, *, flags: bool = False) -> dict:
    """Fill defaults and check each given limit; ``flags`` words errors as CLI options (--max-streams)."""
    checked = dict(DEFAULTS)
    for name, value in values.items():
        if value is None:
            continue
        kind, _, minimum, _ = LIMITS[name]
        label = "--" + name.replace("_", "-") if flags else name
        number = _number(value, kind, label)
        if number < minimum:
            raise ConfigError(f"{label} must be at least {minimum:g}, got {value!r}.")
        checked[name] = number
    return checked


def _number(value, kind: type, label: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        word = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{label} must be {word}, got {value!r}.")
    if not math.isfinite(value):
        raise ConfigError(f"{label} must be finite, got {value!r}.")
    return kind(value)


def proxy_timeout_s(request_timeout_s: float) -> float:
    """The request timeout for Ray's proxy (``http_options``): 5 s past the Gateway's. The proxy cuts a request at
    its own timeout with a plain-text 408; later, a slow request (one queued while a replica restarts, say) gets
    the Gateway's JSON 504, and a long stream its error event, first."""
    return request_timeout_s + 5.0


# --- inside the Gateway replica ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuardSettings:
    key_sha256: str | None = None
    max_body_bytes: int = int(DEFAULTS["max_body_bytes"])
    idle_send_timeout_s: float = DEFAULTS["idle_send_timeout_s"]
    retry_after_s: float = DEFAULTS["retry_after_s"]


# Set by the Gateway's constructor. The middleware is added to the FastAPI app at import (Serve freezes the app
# when @serve.ingress is applied), so it reads its settings from here, in the replica's process. (A module
# global of rnnlab.serve.app would not do: the Gateway class is shipped by value, with its own copy of those.)
SETTINGS = GuardSettings()


def configure(settings: GuardSettings) -> None:
    global SETTINGS
    SETTINGS = settings


class BodyTooLarge(HTTPException):
    # an HTTPException, so FastAPI's body parsing re-raises it (it turns other errors into a 400)
    def __init__(self, limit: int):
        super().__init__(413, [{"loc": ["body"], "type": "too_large",
                                "msg": f"The request body is over the limit of {limit} bytes; send less per request."}])


class _ClientStoppedReading(Exception):
    pass


def _json_response(status: int, body: dict, headers: list | None = None) -> list[dict]:
    # rnnlab's {"detail": [...]} and OpenAI's {"error": {...}} in one body: every client finds its own shape
    payload = json.dumps(body | openai_error(status, body["detail"][0])).encode()
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                         *(headers or [])]},
            {"type": "http.response.body", "body": payload}]


def _error(field: list, msg: str, kind: str) -> dict:
    return {"detail": [{"loc": field, "msg": msg, "type": kind}]}


class Guard:
    """ASGI middleware: key, body size and idle-send checks for every HTTP request (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = SETTINGS
        headers = scope.get("headers") or []
        if not auth.allowed(settings.key_sha256, scope.get("path", ""), scope.get("method", "GET"), headers):
            metrics.rejected("unauthorized")
            for message in _json_response(401, json.loads(auth.UNAUTHORIZED_BODY),
                                          [(b"www-authenticate", b'Bearer realm="rnnlab"')]):
                await send(message)
            return
        limit = settings.max_body_bytes
        declared = next((value for name, value in headers if name == b"content-length"), None)
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                for message in _json_response(400, _error(["header", "content-length"],
                                                          "Content-Length must be a number of bytes.", "value_error")):
                    await send(message)
                return
            if too_large:
                metrics.rejected("body_too_large")
                for message in _json_response(413, {"detail": BodyTooLarge(limit).detail}):
                    await send(message)
                return

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body (or one that lied about its length): stop reading here
                    metrics.rejected("body_too_large")
                    raise BodyTooLarge(limit)
            return message

        async def send_or_give_up(message):
            try:
                if hasattr(asyncio, "timeout"):  # Python 3.11+: no extra task per message, as wait_for makes
                    async with asyncio.timeout(settings.idle_send_timeout_s):
                        await send(message)
                else:
                    await asyncio.wait_for(send(message), settings.idle_send_timeout_s)
            except asyncio.TimeoutError:
                raise _ClientStoppedReading from None

        try:
            await self.app(scope, counted_receive, send_or_give_up)
        except _ClientStoppedReading:
            # the response is cut here; the stream's generator was closed on the way out, freeing its slot
            metrics.rejected("client_stopped_reading")
