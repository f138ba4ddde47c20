"""Errors a user can act on.

Every message is one sentence that names the thing at fault and what to do; the CLI prints it
without a traceback and exits non-zero (see ``rnnlab.launch.cli``).
"""


class RnnlabError(Exception):
    """Base class: an error caused by the user's input or environment, not by a bug."""


class DataError(RnnlabError):
    """A data source is missing, malformed or fails its checksum."""


class ConfigError(RnnlabError):
    """A configuration, preset, override or search space is invalid."""


class BundleError(RnnlabError):
    """A model bundle is missing files, tampered with, or of another format version."""


class InputError(RnnlabError):
    """A request to a trained model (text, prompt, price rows) cannot be served."""


class TrainingError(RnnlabError):
    """Training cannot go on as configured (e.g. the loss became NaN); the last good checkpoint is kept."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): a library's error
    quoted inside one of our one-sentence messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
