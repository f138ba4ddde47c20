"""The demo's own pieces: its presets load for every job, the word-share check it prints is right, and its service
keeps Ray's token authentication without Ray's warning about it."""

from __future__ import annotations

import os

import pytest

from rnnlab.jobs.charlm import share_of_known_words
from rnnlab.launch.demo import JOBS, PRESET
from rnnlab.config import load_config


@pytest.mark.parametrize("job", JOBS)
def test_every_job_has_a_demo_preset(job):
    config = load_config(job, PRESET)
    assert config["job"] == job
    assert config["train"]["progress"] is False  # the demo's output stays readable


def test_share_of_known_words_counts_words_not_characters():
    book = {"the", "emperor", "said", "prince", "andrew"}
    assert share_of_known_words("The emperor said: prince Andrew!", book) == 1.0
    assert share_of_known_words("the emperor qzx blorp", book) == 0.5
    assert share_of_known_words("... 123 ...", book) == 0.0


@pytest.mark.parametrize("chosen, expected", [(None, "token"), ("disabled", "disabled")])
def test_the_service_asks_ray_for_token_authentication_by_name(monkeypatch, tmp_path, chosen, expected):
    """Ray warns when it turns token authentication on by default; named, it stays on and Ray says nothing. A
    mode the user chose is theirs."""
    from rnnlab.launch import demo

    started = {}
    monkeypatch.setattr(demo.subprocess, "Popen", lambda command, **options: started.update(options))
    if chosen is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", chosen)
    demo.start_service(tmp_path, 8765)
    assert started["env"]["RAY_AUTH_MODE"] == expected and started["env"]["PATH"] == os.environ["PATH"]
