"""Ray Tune searches over the one training loop: the Python API behind ``rnnlab tune``.

    from rnnlab.tuning import SearchSettings, plan_search, run_search
    plan = plan_search("stock", SearchSettings(num_samples=8, max_epochs=10), output="runs/tune/stock")
    result = run_search(plan)
    result.best.params, result.best.metric, result.best_config_path, result.best_bundle_path

space.py   search spaces: reading, merging, checking them against the job's config (no Ray)
plan.py    SearchSettings + the checked SearchPlan, saved for --resume (no Ray)
run.py     the trainable, the Tuner, what happens inside a trial
results.py results.csv, the table, best.yaml and best_bundle/ from Ray's ResultGrid
"""

from rnnlab.tuning.plan import SearchPlan, SearchSettings, load_plan, plan_search
from rnnlab.tuning.results import SearchResult, TrialSummary
from rnnlab.tuning.run import flatten_metrics, run_search
from rnnlab.tuning.space import SearchSpace, load_space

__all__ = ["SearchPlan", "SearchResult", "SearchSettings", "SearchSpace", "TrialSummary", "flatten_metrics",
           "load_plan", "load_space", "plan_search", "run_search"]
