"""The one list of jobs. Config, the training loop, Tune, Serve, the CLI, scoring and the tests all read it.

A leaf that holds data: it imports nothing from rnnlab but ``rnnlab.errors``, so importing it (``rnnlab --help``,
a Tune pre-check) costs nothing. Each entry names where a job's parts live as ``"module:attribute"`` strings,
imported only when asked for (``spec.load("predictor")``). Everything job-specific that is not data loading or
the model lives in ONE module, ``rnnlab/jobs/<name>.py``; the shared layers (``serve/``, ``launch/``,
``scoring.py``, ``tuning/``, the tests) loop over this list and never name a job.

A new job is five files and one entry: a data module, a model, a job module (config keys, batches, loss,
metrics, report, predictor, request and answer schemas, scorer, CLI verb), a preset file and a Tune space (both
under the spec's ``configs_dir``: ``presets/<name>.yaml``, ``tune/<name>.yaml``). The preset file holds
``default`` (what ``rnnlab train JOB`` trains), ``smoke`` (a run of seconds: the test suite's) and, for a served
job, ``demo`` (what ``make demo`` trains before serving it): :meth:`JobSpec.required_presets`.

Its entry is either here (rnnlab's own jobs) or in another package, which rnnlab finds in every process it
starts -- the CLI, Ray Tune's trials, Serve's replicas -- because each of them imports this module afresh:

* an installed package's entry point in the group ``rnnlab.jobs`` (``[project.entry-points."rnnlab.jobs"]``,
  ``sentence_end = "mypackage.jobs:SPEC"``);
* ``RNNLAB_JOBS=mypackage.jobs:SPEC,other.module:JOBS`` in the environment (Ray's local workers inherit it;
  ``rnnlab tune`` forwards it to a cluster's, and on a cluster the package must be importable on every node).

Each names a :class:`JobSpec` (or a list of them) in a module that imports nothing heavy: this module is
imported by every ``rnnlab`` command. A job from outside may use ``data_set`` names of rnnlab's data sets or
leave the default data to ``data.source``; playground panels and a data set's download entry stay rnnlab's.

The job's name is the same in every layer: config ``job:``, bundle, HTTP route ``/v1/<name>``, Serve deployment,
Prometheus ``kind`` label.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

import yaml

from rnnlab.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
JOBS_ENV = "RNNLAB_JOBS"  # comma-separated "module:attribute" import paths of jobs from other packages
ENTRY_POINT_GROUP = "rnnlab.jobs"  # installed packages' jobs: each entry point's value is "module:attribute"
# a route /v1/<name>, a deployment, a CLI argument and a metric label: lowercase, no spaces or slashes
JOB_NAME = re.compile(r"[a-z][a-z0-9_]*")
SERVICE_ROUTES = ("models", "completions", "chat")  # /v1/<name> routes the service answers itself


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
    configs_dir: Path = CONFIGS_DIR  # holds presets/<name>.yaml and tune/<name>.yaml (a package's own folder)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not JOB_NAME.fullmatch(self.name):
            raise ConfigError(f"The job name {self.name!r} must be lowercase letters, digits and '_', starting with "
                              "a letter (it is a route, a deployment and a CLI argument); rename the job.")

    @property
    def presets_file(self) -> Path:
        return Path(self.configs_dir) / "presets" / f"{self.name}.yaml"

    def required_presets(self) -> dict[str, str]:
        """The presets rnnlab's tools load by name -> what loads it (the preset file must hold each)."""
        required = {"default": "what `rnnlab train JOB` and `rnnlab tune JOB` start from",
                    "smoke": "a run of seconds: what the test suite trains"}
        if self.served_by:
            required["demo"] = "what `make demo` trains before it serves every served job"
        return required

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
        return Path(self.configs_dir) / "tune" / f"{self.name}.yaml"

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
            # short_*: the same reviews' windows of 10, 20 and 40 tokens (what a service is mostly sent)
            metrics={"loss": "min", "accuracy": "max", "roc_auc": "max", "short_accuracy": "max",
                     "short_loss": "min", "short_roc_auc": "max"},
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


# --- jobs from other packages -----------------------------------------------------------------------------------


def plugged_in(paths: str | None = None) -> list[JobSpec]:
    """The jobs other packages add: every entry point of the group ``rnnlab.jobs``, then each import path of
    ``paths`` (default: the ``RNNLAB_JOBS`` environment variable). A fault is a ConfigError of one sentence."""
    from importlib.metadata import entry_points

    paths = os.environ.get(JOBS_ENV, "") if paths is None else paths
    targets = [(f"The entry point {point.name!r} of group {ENTRY_POINT_GROUP}", point.value)
               for point in entry_points(group=ENTRY_POINT_GROUP)]
    targets += [(JOBS_ENV, path.strip()) for path in paths.split(",") if path.strip()]
    return [spec for where, target in targets for spec in _specs_at(where, target)]


def _specs_at(where: str, target: str) -> list[JobSpec]:
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"{where} names {target!r}, which is not an import path; write it as module:attribute, "
                          "such as mypackage.jobs:SPEC.")
    try:
        module = import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{where} names module {module_name!r}, which cannot be imported ({error}); install its "
                          "package or put its folder on PYTHONPATH.") from None
    if not hasattr(module, attribute):
        if getattr(module.__spec__, "_initializing", False):  # it imported rnnlab.registry before defining it
            raise ConfigError(f"{where} names {target!r}, whose module is still being imported (it imports "
                              f"rnnlab.registry, which loads the jobs, before it defines {attribute}); import "
                              "rnnlab.registry before that module.")
        raise ConfigError(f"{where} names {target!r}, but module {module_name} has no {attribute!r}; fix the name "
                          "after the colon.")
    found = getattr(module, attribute)
    specs = list(found) if isinstance(found, (list, tuple)) else [found]
    wrong = next((spec for spec in specs if not isinstance(spec, JobSpec)), None)
    if wrong is not None or not specs:
        held = f"a {type(wrong).__name__}" if specs else "an empty list"
        raise ConfigError(f"{where} names {target!r}, which holds {held}, not a rnnlab.registry.JobSpec (or a list "
                          "of them); point it at the job's JobSpec.")
    return specs


def add(specs: list[JobSpec], jobs: dict[str, JobSpec]) -> dict[str, JobSpec]:
    """``jobs`` with ``specs`` added; a name or route that is taken already is refused (a job never replaces
    another, nor answers another's route)."""
    for spec in specs:
        taken = {route: name for name, known in jobs.items() for route in (name, *known.aliases)}
        clash = next((route for route in (spec.name, *spec.aliases) if route in taken or route in SERVICE_ROUTES),
                     None)
        if clash is not None:
            owner = f"job {taken[clash]!r}" if clash in taken else "the service itself"
            raise ConfigError(f"The job {spec.name!r} ({spec.job.partition(':')[0]}) would take the name {clash!r}, "
                              f"which {owner} has already; give it another name.")
        jobs = {**jobs, spec.name: spec}
    return jobs


JOBS.update(add(plugged_in(), JOBS))


# --- reading the list --------------------------------------------------------------------------------------------


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
