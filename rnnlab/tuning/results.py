"""A search's results, read back from disk through Ray's ``ResultGrid`` (finished, stopped and interrupted searches
alike): one row per trial in ``results.csv`` and on the terminal, the best trial's config as ``best.yaml``
(``rnnlab train JOB --config OUTPUT/best.yaml`` retrains it) and its bundle copied to ``best_bundle/``."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rnnlab.config import with_values

if TYPE_CHECKING:
    import pandas as pd

    from rnnlab.tuning.plan import SearchPlan


@dataclass
class TrialSummary:
    name: str
    status: str  # completed | stopped early | error | unfinished
    params: dict[str, Any]
    metric: float | None  # the best validation value the trial reached
    last_metric: float | None
    epochs: int
    trial_dir: Path
    error: str = ""
    retries: int = 0  # times the trial failed (a process or node died) and went on from its last checkpoint

    @property
    def bundle_dir(self) -> Path | None:
        bundle = self.trial_dir / "bundle"
        return bundle if (bundle / "config.json").is_file() else None


@dataclass
class SearchResult:
    job: str
    name: str
    output: Path
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    csv_path: Path
    best_config_path: Path | None
    best_bundle_path: Path | None
    wall_s: float = 0.0
    interrupted: bool = False
    searched_keys: list[str] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """One row per trial, best first: name, the params, the metric (best and last), epochs, status."""
        import pandas as pd

        keys = list(self.searched_keys)
        for trial in self.trials:
            keys.extend(key for key in trial.params if key not in keys)
        rows = [{"trial": t.name, "status": t.status, "epochs": t.epochs, self.metric: t.metric,
                 f"last_{self.metric}": t.last_metric, **{key: t.params.get(key) for key in keys},
                 "best": int(t is self.best), "retries": t.retries, "trial_dir": str(t.trial_dir), "error": t.error}
                for t in self.trials]
        frame = pd.DataFrame(rows, columns=["trial", "status", "epochs", self.metric, f"last_{self.metric}", *keys,
                                            "best", "retries", "trial_dir", "error"])
        return frame.sort_values(self.metric, ascending=self.mode == "min", na_position="last", kind="stable")

    def table(self) -> str:
        """The frame as text for the terminal; a '*' marks the best trial."""
        frame = self.frame()
        frame["trial"] = [("*" if best else " ") + name for name, best in zip(frame["trial"], frame["best"])]
        columns = ["trial", *[c for c in frame.columns if c not in ("trial", "status", "epochs", "best", "trial_dir",
                                                                    "error", "retries", f"last_{self.metric}")],
                   "epochs", "status"]
        return frame[columns].to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


def summarize_search(plan: SearchPlan) -> SearchResult:
    """Read the search back and write results.csv, best.yaml and best_bundle/."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    analysis = ExperimentAnalysis(str(plan.experiment_dir))
    grid = ResultGrid(analysis)
    metric, mode = plan.space.metric, plan.space.mode
    last = _by_trial(grid.get_dataframe())
    best_rows = _by_trial(grid.get_dataframe(filter_metric=metric, filter_mode=mode))
    trials = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        trial_dir = plan.experiment_dir / f"trial_{trial.trial_id}"
        summary = TrialSummary(
            name=trial_dir.name, status="", params=dict(trial.config), trial_dir=trial_dir,
            metric=_value(best_rows, trial.trial_id, metric), last_metric=_value(last, trial.trial_id, metric),
            epochs=int(_value(last, trial.trial_id, "training_iteration") or 0),
        )
        summary.retries = int(getattr(trial, "num_failures", 0) or 0)
        summary.status = _status(trial, summary)
        if summary.status == "error":
            summary.error = _first_error_line(trial)
        trials.append(summary)
    best = pick_best(trials, mode)
    result = SearchResult(
        job=plan.job, name=plan.name, output=plan.output, metric=metric, mode=mode, trials=trials, best=best,
        csv_path=plan.output / "results.csv", best_config_path=None, best_bundle_path=None,
        interrupted=any(t.status == "unfinished" for t in trials), searched_keys=plan.space.searched_keys,
    )
    plan.output.mkdir(parents=True, exist_ok=True)
    result.frame().sort_values("trial", kind="stable").to_csv(result.csv_path, index=False)
    if best is not None:
        result.best_config_path = write_best_config(plan, best)
        result.best_bundle_path = export_best_bundle(plan, best)
    return result


def _by_trial(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index("trial_id") if "trial_id" in frame else frame


def _value(frame: pd.DataFrame, trial_id: str, column: str) -> float | None:
    if trial_id not in frame.index or column not in frame:
        return None
    value = frame.at[trial_id, column]
    return None if value is None or value != value else float(value)  # NaN: never reported


def _status(trial, summary: TrialSummary) -> str:
    if trial.status == "ERROR":
        return "error"
    if trial.status != "TERMINATED":
        return "unfinished"  # PENDING / RUNNING / PAUSED: the search was interrupted
    return "completed" if summary.bundle_dir is not None else "stopped early"


def _first_error_line(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(encoding="utf-8") if path else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "failed (see the trial's error.txt)"


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    """The best trial that finished training (and so has a bundle), ranked by the best validation value it
    reached, which is the checkpoint its bundle holds. A stopped trial has no bundle, and ASHA only stops a
    trial that a running one beats at the same epoch."""
    candidates = [t for t in trials if t.bundle_dir is not None and t.metric is not None]
    if not candidates:
        return None
    return (min if mode == "min" else max)(candidates, key=lambda t: t.metric)


def write_best_config(plan: SearchPlan, best: TrialSummary) -> Path:
    """The best trial's full config, as ``rnnlab train JOB --config best.yaml`` reads it."""
    config = with_values(plan.base_config, best.params)
    config["tracking"].update(group=None, run_name=None)
    config["train"]["progress"] = True
    header = (
        f"# Best trial of search '{plan.name}' ({plan.job}): {best.name}, {plan.space.metric} = {best.metric:.6g}"
        f" after {best.epochs} epochs.\n"
        f"# Retrain with: rnnlab train {plan.job} --config {plan.output / 'best.yaml'}\n"
    )
    path = plan.output / "best.yaml"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def export_best_bundle(plan: SearchPlan, best: TrialSummary) -> Path | None:
    if best.bundle_dir is None:
        return None
    target = plan.output / "best_bundle"
    staging = plan.output / ".best_bundle.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(best.bundle_dir, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
