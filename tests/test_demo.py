"""The demo's own pieces: the presets rnnlab's tools load by name exist for every job (the demo's for every served
one), the word-share check it prints is right, and its service keeps Ray's token authentication without Ray's
warning about it."""

from __future__ import annotations

import os

import pytest

from rnnlab.config import load_config
from rnnlab.jobs.charlm import share_of_known_words
from rnnlab.launch.demo import PRESET
from rnnlab.registry import JOBS, served


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_has_the_presets_rnnlabs_tools_load(job):
    """default (`rnnlab train` and `rnnlab tune`), smoke (the test suite) and, for a served job, demo (`make demo`
    trains every served job with it): each is in the job's preset file and loads as a valid config."""
    required = JOBS[job].required_presets()
    assert ("demo" in required) == (job in served())
    for preset in required:
        load_config(job, preset)


@pytest.mark.parametrize("job", served())
def test_the_demo_trains_without_progress_bars(job):
    assert load_config(job, PRESET)["train"]["progress"] is False  # the demo's output stays readable


def test_share_of_known_words_counts_words_not_characters():
    book = {"the", "emperor", "said", "prince", "andrew"}
    assert share_of_known_words("The emperor said: prince Andrew!", book) == 1.0
    assert share_of_known_words("the emperor qzx blorp", book) == 0.5
    assert share_of_known_words("... 123 ...", book) == 0.0


@pytest.mark.parametrize("chosen, expected", [(None, "token"), ("disabled", "disabled")])
def test_the_service_asks_ray_for_token_authentication_by_name(monkeypatch, chosen, expected):
    """Ray warns when it turns token authentication on by default; named, it stays on and Ray says nothing. A
    mode the user chose is theirs."""
    from rnnlab.launch import demo

    if chosen is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", chosen)
    env = demo.service_env()
    assert env["RAY_AUTH_MODE"] == expected and env["PATH"] == os.environ["PATH"]
