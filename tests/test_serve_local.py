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
