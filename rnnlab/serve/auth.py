"""API keys for the service: where the key comes from, and the check every protected request passes.

The key comes from ``--api-key-file`` / the ``api_key_file`` app argument, or ``RNNLAB_API_KEY``. Only its SHA-256
travels to the Gateway replica (as a deployment argument), so the key itself never sits in Serve's stored
application config; requests are checked by comparing digests with ``hmac.compare_digest`` (constant time).

Deny by default: with a key set, every path needs ``Authorization: Bearer <key>`` except the few in ``OPEN_PATHS``
(the health check and the playground page, which sends the key from a field). That includes ``/docs`` and
``/openapi.json``: the schema is not secret, but a new route is then protected without anyone remembering to.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import socket
from pathlib import Path

from rnnlab.errors import ConfigError

ENV_VAR = "RNNLAB_API_KEY"
MIN_KEY_CHARS = 16
OPEN_PATHS = frozenset({"/", "/healthz", "/favicon.ico"})
_HOW_TO_MAKE_ONE = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_key(key_file: str | Path | None = None) -> str | None:
    """The API key from ``key_file`` (wins) or ``RNNLAB_API_KEY``; None when neither is set."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise ConfigError(f"Cannot read the API key file {path} ({reason}); create it with: {_HOW_TO_MAKE_ONE}.")
        where = f"The API key file {path}"
    else:
        key = os.environ.get(ENV_VAR, "").strip()
        if not key:
            return None
        where = f"{ENV_VAR}"
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        raise ConfigError(f"{where} must hold one key of at least {MIN_KEY_CHARS} characters without spaces; "
                          f"make one with: {_HOW_TO_MAKE_ONE}.")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: loopback only if every address it resolves to is
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def refuse_exposed_without_key(host: str, has_key: bool, insecure: bool) -> None:
    if not has_key and not insecure and not is_loopback(host):
        raise ConfigError(f"--host {host} would expose the service to the network without an API key; pass "
                          f"--api-key-file FILE (or set {ENV_VAR}), or --insecure if that is really meant.")


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def allowed(key_sha256: str | None, path: str, method: str, headers: list[tuple[bytes, bytes]]) -> bool:
    if key_sha256 is None or path in OPEN_PATHS and method in ("GET", "HEAD"):
        return True
    token = _bearer(headers)
    # compare digests: constant time, and the same length whatever the client sent
    return token is not None and hmac.compare_digest(digest(token), key_sha256)


UNAUTHORIZED_BODY = json.dumps({"detail": [{
    "loc": ["header", "authorization"],
    "msg": "This service needs an API key: send the header 'Authorization: Bearer <key>'.",
    "type": "unauthorized",
}]}).encode()
