"""rnnlab's benchmarks, each a module run from the repository root: ``python -m benchmarks.NAME --help``
(benchmarks/README.md lists them and what they measured)."""
