"""rnnlab: train, tune and serve recurrent sequence models."""

__version__ = "0.1.0"
