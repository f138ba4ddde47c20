"""`rnnlab serve` as users start it: by default the Gateway answers on --port itself (Ray Serve's direct ingress,
Ray's proxy moved aside); with --proxy, through Ray's proxy actor as on a cluster.

Its own module (and its own Ray instance, in a subprocess) because Ray reads the direct-ingress settings when
the cluster starts; test_serve.py's in-process instance runs with Ray's defaults (the proxy).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import httpx
import pytest

from rnnlab.serve.local import LocalService
from tiny_models import make_bundles

pytestmark = pytest.mark.slow


def _listener(port: int) -> str:
    """The command line of the process listening on 127.0.0.1:``port`` (Linux /proc), "" if none is found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                return (fd.parents[1] / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone, or not ours to read
            continue
    return ""


def _half_open(port: int, count: int) -> list[bytes]:
    """``count`` connections that each send a request line and one header and then nothing: what the server
    answers each before it closes it (a bounded read per socket; b"" if it only closed it; a reset fails)."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    answers = []
    for sock in sockets:
        with sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except TimeoutError as error:
                data += f" [{type(error).__name__}]".encode()
            answers.append(data)
    return answers


async def _burst(base: str, count: int) -> tuple[list[int], set[str]]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        answers = await asyncio.gather(*(client.post("/v1/generate", json={"prompt": "the ", "max_new_tokens": 2000,
                                                                          "seed": i}) for i in range(count)))
    return [a.status_code for a in answers], {a.headers.get("retry-after") for a in answers if a.status_code == 503}


@pytest.mark.parametrize("ingress", ["direct", "proxy"])
def test_serve_answers_on_the_asked_port_and_stops_cleanly(tmp_path, ingress):
    bundles = make_bundles(tmp_path / "bundles")
    # a leftover export must not decide the ingress: the flag does
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1" if ingress == "proxy" else "0"
    service = LocalService(bundles, ["--max-ongoing-requests", "4", "--max-queued-requests", "4", "--retry-after-s",
                                     "2", "--header-timeout-s", "1", "--max-connections", "48",
                                     *(["--proxy"] if ingress == "proxy" else [])], env=env)
    port, base = service.port, service.url
    try:
        # The ready line comes once every deployment is up (Ctrl-C handled from then on); with direct ingress
        # /healthz can answer a little earlier.
        ready = service.start(timeout_s=240)
        assert f"127.0.0.1:{port}" in ready, service.output
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        owner = _listener(port)  # direct ingress: the Gateway replica holds the port, else Ray's proxy
        assert ("ServeReplica:rnnlab:Gateway" if ingress == "direct" else "ProxyActor") in owner, owner
        answer = httpx.post(f"{base}/v1/sentiment", json={"texts": ["a fine film", "  "]}, timeout=60)
        assert answer.status_code == 422 and answer.json()["detail"][0]["loc"][-1] == 1  # the blank text, named
        answer = httpx.post(f"{base}/v1/sentiment", json={"texts": ["a fine film", "a dull one"]}, timeout=60)
        assert answer.status_code == 200
        assert [r["label"] in ("positive", "negative") for r in answer.json()["results"]] == [True, True]
        # load is shed either way: 4 at work and 4 queued, the rest of a burst gets 503 + Retry-After at once
        codes, retry = asyncio.run(_burst(base, 40))
        assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 10, codes
        assert retry == {"2"}
        # half-open connections (a request line and one header, then nothing) are closed with 408 after
        # --header-timeout-s, and those above --max-connections get 503 + Retry-After at once; the service goes on
        answers = _half_open(port, 60)
        assert all(a.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 503 ")) for a in answers), answers
        assert sum(a.startswith(b"HTTP/1.1 503 ") and b"retry-after: 2" in a for a in answers) >= 12, answers
        assert sum(a.startswith(b"HTTP/1.1 408 ") for a in answers) >= 12, answers
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    finally:
        code = service.stop(grace_s=90)  # Ctrl-C as in a terminal: the whole process group
    assert code == 0
    # a clean stop reads clean: no "(raylet) Task ServeController... failed ... killed by `ray.kill`"
    said = service.output
    assert "rnnlab: stopping the service." in said and "ray.kill" not in said and "(raylet)" not in said, said
