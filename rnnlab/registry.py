"""The one list of jobs. Config, the training loop, Tune, Serve, the CLI, scoring and the tests all read it.

A leaf that holds data: it imports nothing from rnnlab but ``rnnlab.errors``, so importing it (``rnnlab --help``,
a Tune pre-check) costs nothing. Each entry names where a job's parts live as ``"module:attribute"`` strings,
imported only when asked for (``spec.load("predictor")``). Everything job-specific that is not data loading or
the model lives in ONE module, ``rnnlab/jobs/<name>.py``; the shared layers (``serve/``, ``launch/``,
``scoring.py``, ``tuning/``, the tests) loop over this list and never name a job.

A new served job is six files: a data module (``rnnlab/data/``), a model (``rnnlab/models/``), a job module
(``rnnlab/jobs/<name>.py``: config keys, batches, loss, metrics, report, predictor, request and answer schemas,
scorer, CLI verb), a preset file (``configs/presets/<name>.yaml``), a Tune space (``configs/tune/<name>.yaml``) and
its entry here; plus a panel in the playground page (``rnnlab/serve/static/index.html``) if it should show there,
and, for a data set rnnlab does not read yet, its download entry in ``rnnlab/data/sources.py`` (and for the smoke
test a tiny stand-in in ``tests/tiny_datasets.py``, named in ``tests/test_trainer.py``'s ``TINY``; a job whose data
set has none is skipped there).

The job's name is the same in every layer: config ``job:``, bundle, HTTP route ``/v1/<name>``, Serve deployment,
Prometheus ``kind`` label.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

import yaml

from rnnlab.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class JobSpec:
    """One job. The ``"module:attribute"`` fields are imported by :meth:`load`; None means the job lacks that part."""

    name: str  # the one name: config, bundle, route /v1/<name>, deployment, metric label
    description: str
    data_set: str  # rnnlab.data.sources name
    metrics: dict[str, str]  # validation/test metric -> "min" | "max": what "better" means for it
    model: str  # nn.Module class; its ``Config`` (a pydantic model) declares the model's keys
    model_config: str
    job: str  # rnnlab.trainers.job.Job subclass: its ``Config`` (keys), batches, loss, metrics, report
    data_summary: str | None = None  # ``rnnlab data`` summary function
    predictor: str | None = None  # bundle -> answers (None: its bundles answer nothing)
    scorer: str | None = None  # ``rnnlab evaluate BUNDLE --data PATH``: scores any data in the job's format
    # -- the CLI verb: ``rnnlab <verb> BUNDLE ...``; several jobs may share one (it dispatches on the bundle's job)
    verb: str | None = None
    verb_help: str = ""
    cli: str | None = None  # an object with ``add_arguments(parser)`` and ``run(args, load_predictor)``
    # -- the service: POST /v1/<name>
    served_by: Literal["batched", "generation"] | None = None  # rnnlab.serve.deployments' class that answers it
    request: str | None = None  # pydantic request body
    answer: str | None = None  # pydantic answer body
    aliases: tuple[str, ...] = ()  # older routes /v1/<alias> that answer the same (kept for one release)
    demo: str | None = None  # ``make demo``: ``demo(post)`` sends one request (``post(body)``) and prints the answer
    # rnnlab.runtime.GraphSpec: the model as one ONNX graph (what it takes and returns, the parity examples, the
    # int8 gate); None: the job's bundles run on torch only
    graph: str | None = None

    @property
    def presets_file(self) -> Path:
        return CONFIGS_DIR / "presets" / f"{self.name}.yaml"

    def presets(self) -> tuple[str, ...]:
        """The presets this job has: the top-level sections of its preset file, in file order (none without one)."""
        if not self.presets_file.is_file():
            return ()
        try:
            return tuple(yaml.safe_load(self.presets_file.read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"The preset file {self.presets_file} of job {self.name} cannot be read: {error}") \
                from None

    @property
    def tune_space_file(self) -> Path:
        return CONFIGS_DIR / "tune" / f"{self.name}.yaml"

    def mode(self, metric: str) -> str:
        """``min`` or ``max`` for one of this job's metrics."""
        return self.metrics[metric]

    def load(self, part: str) -> Any:
        """The object behind one of the ``module:attribute`` fields, imported now (``spec.load("job")``)."""
        module, _, attribute = getattr(self, part).partition(":")
        return getattr(import_module(module), attribute)


JOBS: dict[str, JobSpec] = {
    spec.name: spec
    for spec in (
        JobSpec(
            name="sentiment",
            description="IMDb review sentiment, an LSTM classifier",
            data_set="imdb",
            metrics={"loss": "min", "accuracy": "max", "roc_auc": "max"},
            model="rnnlab.models.sentiment:SentimentLSTM",
            model_config="rnnlab.models.sentiment:SentimentConfig",
            job="rnnlab.jobs.sentiment:SentimentJob",
            data_summary="rnnlab.data.imdb:summarize_imdb",
            predictor="rnnlab.jobs.sentiment:SentimentPredictor",
            scorer="rnnlab.jobs.sentiment:score",
            verb="classify",
            verb_help="sentiment of one or more texts with a sentiment bundle",
            cli="rnnlab.jobs.sentiment:CLI",
            served_by="batched",
            request="rnnlab.jobs.sentiment:SentimentRequest",
            answer="rnnlab.jobs.sentiment:SentimentResponse",
            demo="rnnlab.jobs.sentiment:demo",
            graph="rnnlab.jobs.sentiment:GRAPH",
        ),
        JobSpec(
            name="stock",
            description="daily index close forecasting, an LSTM regressor",
            data_set="stock",
            metrics={"loss": "min", "r2": "max", "mae": "min", "mape": "min"},
            model="rnnlab.models.stock:StockLSTM",
            model_config="rnnlab.models.stock:StockConfig",
            job="rnnlab.jobs.stock:StockJob",
            data_summary="rnnlab.data.stock:summarize_stock",
            predictor="rnnlab.jobs.stock:StockPredictor",
            scorer="rnnlab.jobs.stock:score",
            verb="forecast",
            verb_help="next close from a price history with a stock bundle",
            cli="rnnlab.jobs.stock:CLI",
            served_by="batched",
            request="rnnlab.jobs.stock:StockRequest",
            answer="rnnlab.jobs.stock:StockResponse",
            aliases=("forecast",),
            demo="rnnlab.jobs.stock:demo",
            graph="rnnlab.jobs.stock:GRAPH",
        ),
        JobSpec(
            name="charlm",
            description="War and Peace character language model",
            data_set="text",
            metrics={"loss": "min", "bpc": "min", "perplexity": "min"},
            model="rnnlab.models.charlm:CharLSTM",
            model_config="rnnlab.models.charlm:CharConfig",
            job="rnnlab.jobs.charlm:CharLMJob",
            data_summary="rnnlab.data.text:summarize_text",
            predictor="rnnlab.jobs.charlm:CharLMPredictor",
            scorer="rnnlab.jobs.charlm:score",
            verb="generate",
            verb_help="sample text from a charlm bundle",
            cli="rnnlab.jobs.charlm:CLI",
            served_by="generation",
            request="rnnlab.jobs.charlm:CharLMRequest",
            answer="rnnlab.jobs.charlm:CharLMResponse",
            aliases=("generate",),
            demo="rnnlab.jobs.charlm:demo",
            graph="rnnlab.jobs.charlm:GRAPH",
        ),
        JobSpec(
            name="lm",
            description="IMDb review word language model (train + unlabelled reviews), what sentiment starts from",
            data_set="imdb",
            metrics={"loss": "min", "perplexity": "min"},
            model="rnnlab.models.wordlm:WordLSTM",
            model_config="rnnlab.models.wordlm:WordLMConfig",
            job="rnnlab.jobs.lm:LMJob",
            # no predictor: a starting point for sentiment (model.init_from), not served
        ),
        JobSpec(
            name="horizon",
            description="the next H days of an index as calibrated quantiles, an RNN encoder-decoder",
            data_set="stock",
            metrics={"loss": "min", "crps": "min", "pinball": "min", "mase": "min", "smape": "min",
                     "coverage_80_error": "min", "coverage_90_error": "min"},
            model="rnnlab.models.horizon:HorizonRNN",
            model_config="rnnlab.models.horizon:HorizonConfig",
            job="rnnlab.jobs.horizon:HorizonJob",
            predictor="rnnlab.jobs.horizon:HorizonPredictor",
            scorer="rnnlab.jobs.horizon:score",
            verb="forecast",
            verb_help="the next days' closes as quantiles from a price history with a horizon bundle",
            cli="rnnlab.jobs.horizon:CLI",
            served_by="batched",
            request="rnnlab.jobs.horizon:HorizonRequest",
            answer="rnnlab.jobs.horizon:HorizonResponse",
            demo="rnnlab.jobs.horizon:demo",
            graph="rnnlab.jobs.horizon:GRAPH",
        ),
    )
}


def job(name: str) -> JobSpec:
    """The spec of job ``name``; an unknown name is one sentence listing the known ones."""
    if name not in JOBS:
        raise ConfigError(f"Unknown job {name!r}; choose one of {', '.join(JOBS)}.")
    return JOBS[name]


def presets() -> tuple[str, ...]:
    """Every preset some job's preset file declares, in file order: what ``--preset`` accepts (whether the job
    at hand has it is checked when its config is loaded)."""
    return tuple(dict.fromkeys(name for spec in JOBS.values() for name in spec.presets()))


def served() -> tuple[str, ...]:
    """The jobs the service answers for (each at POST /v1/<job>)."""
    return tuple(name for name, spec in JOBS.items() if spec.served_by)


def routes() -> dict[str, str]:
    """Every route name the service answers -> its job: each served job's name, then the aliases."""
    names = {name: name for name in served()}
    return names | {alias: name for name in served() for alias in JOBS[name].aliases}


def verbs() -> dict[str, tuple[JobSpec, ...]]:
    """CLI verb -> the jobs that answer it, in registry order."""
    found: dict[str, list[JobSpec]] = {}
    for spec in JOBS.values():
        if spec.verb:
            found.setdefault(spec.verb, []).append(spec)
    return {verb: tuple(specs) for verb, specs in found.items()}
