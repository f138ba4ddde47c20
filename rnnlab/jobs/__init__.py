"""One module per job (rnnlab/registry.py lists them): everything job-specific that is not data loading
(``rnnlab.data``) or the model (``rnnlab.models``) -- config keys, batches, loss, metrics and report, the
predictor, the service's request and answer schemas, the scorer for ``rnnlab evaluate --data``, the CLI verb."""
