"""The demo's own pieces: its presets load for every job, and the word-share check it prints is right."""

from __future__ import annotations

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
