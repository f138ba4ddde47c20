"""A job from outside rnnlab, for tests/test_new_job.py: where a sentence ends in War and Peace.

At the end of each word of a text, does the sentence end there (is the next character ``.``, ``!`` or ``?``)?
A many-to-one classifier over the last characters, trained on rnnlab's ``text`` data set or any text file. Its
six files are all a job needs: this entry (the registry's), ``data.py``, ``model.py``, ``job.py`` and its two
YAML files under ``configs/``; rnnlab finds it through ``RNNLAB_JOBS=newjob:SPEC`` (or an entry point of the
group ``rnnlab.jobs``). This module imports only the registry, as rnnlab asks: every ``rnnlab`` process imports it.
"""

from pathlib import Path

from rnnlab.registry import JobSpec

SPEC = JobSpec(
    name="sentence_end",
    description="where a sentence ends: P(the text's last word ends its sentence), a character RNN classifier",
    data_set="text",
    metrics={"loss": "min", "accuracy": "max", "f1": "max"},
    model="newjob.model:SentenceEndRNN",
    model_config="newjob.model:SentenceEndConfig",
    job="newjob.job:SentenceEndJob",
    predictor="newjob.job:SentenceEndPredictor",
    scorer="newjob.job:score",
    served_by="batched",
    request="newjob.job:SentenceEndRequest",
    answer="newjob.job:SentenceEndResponse",
    configs_dir=Path(__file__).resolve().parent / "configs",
)
