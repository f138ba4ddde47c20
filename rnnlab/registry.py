"""The one list of jobs. Config, the training loop, Tune, Serve, the CLI and the benchmarks all read it.

Each entry names where its parts live as ``"module:attribute"`` strings, imported only when asked for, so
importing this module (``rnnlab --help``, a Tune pre-check) costs nothing. A fourth job is one data module, one
model file, one job file (``rnnlab/trainers/``), one preset file (``configs/presets/``), a search space
(``configs/tune/``) and one entry here; plus a predictor and a deployment if it is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from rnnlab.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class JobSpec:
    name: str
    description: str
    data_set: str  # rnnlab.data.sources name
    metrics: dict[str, str]  # validation/test metric -> "min" | "max": what "better" means for it
    model: str  # nn.Module class; its ``Config`` (a pydantic model) declares the model's keys
    model_config: str
    job: str  # rnnlab.trainers.job.Job subclass: batches, loss, metrics
    predictor: str | None  # rnnlab.inference class that answers from a bundle (None: its bundles answer nothing)
    route: str | None = None  # the HTTP endpoint /v1/<route> that serves it (None: not served)
    data_summary: str | None = None  # ``rnnlab data`` summary function
    scorer: str | None = None  # ``rnnlab evaluate BUNDLE --data PATH``: scores any data in the job's format

    @property
    def presets_file(self) -> Path:
        return CONFIGS_DIR / "presets" / f"{self.name}.yaml"

    def presets(self) -> tuple[str, ...]:
        """The presets this job has: the top-level sections of its preset file, in file order."""
        from rnnlab.config import read_yaml

        return tuple(read_yaml(self.presets_file) or {})

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
            job="rnnlab.trainers.sentiment:SentimentJob",
            predictor="rnnlab.inference:SentimentClassifier",
            route="sentiment",
            data_summary="rnnlab.data.imdb:summarize_imdb",
            scorer="rnnlab.scoring:score_reviews",
        ),
        JobSpec(
            name="stock",
            description="daily index close forecasting, an LSTM regressor",
            data_set="stock",
            metrics={"loss": "min", "r2": "max", "mae": "min", "mape": "min"},
            model="rnnlab.models.stock:StockLSTM",
            model_config="rnnlab.models.stock:StockConfig",
            job="rnnlab.trainers.stock:StockJob",
            predictor="rnnlab.inference:StockForecaster",
            route="forecast",
            data_summary="rnnlab.data.stock:summarize_stock",
            scorer="rnnlab.scoring:score_prices",
        ),
        JobSpec(
            name="charlm",
            description="War and Peace character language model",
            data_set="text",
            metrics={"loss": "min", "bpc": "min", "perplexity": "min"},
            model="rnnlab.models.charlm:CharLSTM",
            model_config="rnnlab.models.charlm:CharConfig",
            job="rnnlab.trainers.charlm:CharLMJob",
            predictor="rnnlab.inference:TextGenerator",
            route="generate",
            data_summary="rnnlab.data.text:summarize_text",
            scorer="rnnlab.scoring:score_text",
        ),
        JobSpec(
            name="lm",
            description="IMDb review word language model (train + unlabelled reviews), what sentiment starts from",
            data_set="imdb",
            metrics={"loss": "min", "perplexity": "min"},
            model="rnnlab.models.wordlm:WordLSTM",
            model_config="rnnlab.models.wordlm:WordLMConfig",
            job="rnnlab.trainers.lm:ReviewLMJob",
            predictor=None,  # a starting point for sentiment (model.init_from), not served
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
            predictor=None,  # phase 2: served on /v1/horizon
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


def by_route(route: str) -> JobSpec:
    return next(spec for spec in JOBS.values() if spec.route == route)


def served() -> dict[str, str]:
    """job -> its HTTP route, for the jobs the service serves."""
    return {name: spec.route for name, spec in JOBS.items() if spec.route}
