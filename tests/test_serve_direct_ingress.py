"""`rnnlab serve --direct-ingress`: the Gateway answers on --port itself, with Ray's proxy moved aside.

Its own module (and its own Ray instance, in a subprocess) because Ray reads the direct-ingress settings when
the cluster starts; test_serve.py's in-process instance runs with the defaults.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from test_serve import _free_port, make_bundles

pytestmark = pytest.mark.slow


def test_direct_ingress_serves_on_the_asked_port_and_stops_cleanly(tmp_path):
    bundles = make_bundles(tmp_path / "bundles")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    service = subprocess.Popen(
        [sys.executable, "-m", "rnnlab.launch.cli", "serve", "--bundles", str(bundles), "--port", str(port),
         "--direct-ingress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # The ready line comes once serve.run has returned (every deployment up, Ctrl-C handled from then on);
        # with direct ingress /healthz can answer a little earlier.
        watchdog = threading.Timer(240, lambda: os.killpg(service.pid, signal.SIGKILL))  # a hang fails, not stalls
        watchdog.start()
        lines = []
        for line in service.stdout:
            lines.append(line)
            if "rnnlab: serving" in line:
                break
        watchdog.cancel()
        assert service.poll() is None and f"127.0.0.1:{port}" in lines[-1], "".join(lines)
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        answer = httpx.post(f"{base}/v1/sentiment", json={"texts": ["a fine film", "  "]}, timeout=60)
        assert answer.status_code == 422 and answer.json()["detail"][0]["loc"][-1] == 1  # the blank text, named
        answer = httpx.post(f"{base}/v1/sentiment", json={"texts": ["a fine film", "a dull one"]}, timeout=60)
        assert answer.status_code == 200
        assert [r["label"] in ("positive", "negative") for r in answer.json()["results"]] == [True, True]
    finally:
        os.killpg(service.pid, signal.SIGINT)
        try:
            code = service.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            raise
    assert code == 0


def test_direct_ingress_refuses_a_remote_cluster(tmp_path, capsys):
    from rnnlab.launch.cli import main

    bundles = make_bundles(tmp_path / "bundles")
    assert main(["serve", "--bundles", str(bundles), "--direct-ingress", "--address", "auto"]) == 2
    assert "--direct-ingress needs" in capsys.readouterr().err
