"""Short texts: how the sentiment models do on what users send (a sentence, a few words) rather than whole reviews.

The slices are `rnnlab data short-texts`'s (rnnlab/data/short_texts.py): the first, last and a random sentence of
each test (or validation) review and random windows of 10, 20 and 40 tokens, each with its review's label, and
the whole reviews beside them. TF-IDF + LR and NBSVM-bi (benchmarks/baselines.py) are fitted once on the reviews
the split leaves for training (all 25,000 training reviews for test; train minus the held-out ones for val) and
score every slice; each bundle passed with --bundles scores the same CSVs through `rnnlab evaluate --data`'s path
(rnnlab.scoring.score_data). Every model is scored on the same texts of a slice.

For each bundle and baseline: the accuracy difference per slice and its mean over the short slices, with a 95 %
paired bootstrap interval (reviews resampled with replacement, the same draws for every model and slice). And per
slice, how noisy the inherited label may be, from TF-IDF + LR fitted on whole reviews: the share of texts it is
unsure of (P(positive) within 0.4-0.6) and the share it labels as it labels their whole review. And how far each
model's P(positive) can be taken at its word (every model but NBSVM, which gives no probability): the expected
calibration error (10 bins of confidence from 0.5 to 1: the gap between confidence and accuracy, weighed by the
bin's texts) and the log loss.

    python -m benchmarks.short_texts --slices /tmp/short-texts --bundles runs/sentiment-wide/bundle \\
        --json benchmarks/results/short_texts.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import machine_description, write_json
from benchmarks.baselines import fit_nbsvm_bi, fit_tfidf_lr

BASELINES = {"tfidf_lr": fit_tfidf_lr, "nbsvm_bi": fit_nbsvm_bi}
UNSURE = 0.1  # |P(positive) - 0.5| below this: the whole-review model cannot tell the label from the text
CHUNK = 100  # bootstrap resamples drawn at a time (a chunk's review weights: CHUNK x reviews floats)
CALIBRATION_BINS = 10


def prepare_slices(folder: Path, *, split: str, seed: int, mirror: str | None) -> dict:
    """The slices in ``folder`` (written now, by rnnlab's own code, when it holds none) and their manifest."""
    from rnnlab.data.short_texts import MANIFEST, read_short_texts, write_short_texts
    from rnnlab.data.sources import resolve

    if not (folder / MANIFEST).is_file():
        write_short_texts(folder, resolve("imdb", mirror=mirror), split=split, seed=seed)
    return read_short_texts(folder)


def fit_baselines(manifest: dict) -> dict[str, Any]:
    """The linear baselines fitted on the reviews the slices' split leaves for training."""
    from rnnlab.data.imdb import review_splits

    splits = review_splits(manifest["source"], val_fraction=manifest.get("val_fraction", 0.1),
                           seed=manifest.get("val_seed", 0))
    train = splits["train"] + (splits["val"] if manifest["split"] == "test" else [])
    texts, labels = [r.text for r in train], np.array([r.label for r in train])
    return {name: fit(texts, labels) for name, fit in BASELINES.items()}


def check_held_out(bundle_path: str, manifest: dict) -> None:
    """Validation slices are fair to a bundle only if its run held out those very reviews."""
    from rnnlab.bundle import load_bundle
    from rnnlab.errors import ConfigError

    if manifest["split"] != "val":
        return
    config = load_bundle(bundle_path).config
    held_out = (config["data"]["val_fraction"], config["train"]["seed"])
    if held_out != (manifest["val_fraction"], manifest["val_seed"]):
        raise ConfigError(f"{bundle_path} held out other validation reviews (val_fraction, seed = {held_out}) than "
                          f"the slices ({manifest['val_fraction']}, {manifest['val_seed']}): it trained on some.")


def bundle_name(path: str) -> str:
    """``runs/sentiment-wide/bundle`` -> ``sentiment-wide``."""
    path = Path(path)
    return path.parent.name if path.name == "bundle" else path.name


def describe_bundle(path: str) -> dict[str, Any]:
    """Where a bundle is, what it reads, and the test figures its training run recorded."""
    from rnnlab.bundle import load_bundle

    bundle = load_bundle(path)
    data = bundle.config.get("data", {})
    return {"bundle": str(path), "recorded_test": bundle.metrics.get("test"),
            **{key: data.get(key) for key in ("max_vocab", "max_length", "limit_train", "limit_test")}}


def score_slice(csv: Path, baselines: dict, bundles: list[str]) -> dict[str, Any]:
    """Each model's right/wrong per text of one slice CSV, on the texts every model scored, plus the texts'
    reviews and the TF-IDF + LR decision values (for the label-noise estimate)."""
    import pandas as pd

    from rnnlab.data.reviews import read_labelled_reviews
    from rnnlab.scoring import score_data

    read = read_labelled_reviews(csv)
    labels = read.labels.astype(int)
    if "review" in pd.read_csv(csv, nrows=0).columns:
        reviews = pd.read_csv(csv, usecols=["review"], dtype=str, keep_default_na=False)["review"].to_numpy()
    else:  # a CSV of the user's: each text is its own review for the bootstrap
        reviews = np.array([f"{csv.name}:{row}" for row in range(len(labels))])
    scores = {name: baseline.scores(read.texts) for name, baseline in baselines.items()}
    predicted = {name: value > 0 for name, value in scores.items()}
    probability = {"tfidf_lr": 1 / (1 + np.exp(-scores["tfidf_lr"]))}  # LR's decision value is a logit
    scored = np.ones(len(labels), dtype=bool)
    for path in bundles:
        answers = score_data(path, csv, predictions=True)["probabilities"]
        scored &= np.array([p is not None for p in answers])
        probability[bundle_name(path)] = np.array([0.5 if p is None else p for p in answers])
        predicted[bundle_name(path)] = probability[bundle_name(path)] >= 0.5
    return {
        "calibration": {name: calibration(value[scored], labels[scored]) for name, value in probability.items()},
        "left_out": int((~scored).sum()),  # texts some bundle could not read (no words): out of every comparison
        "reviews": reviews[scored],
        "texts": [text for text, keep in zip(read.texts, scored) if keep],
        "correct": {name: (value == (labels == 1))[scored] for name, value in predicted.items()},
        "positive": {name: value[scored] for name, value in predicted.items()},
        "tfidf_lr_scores": scores["tfidf_lr"][scored],
    }


def calibration(probability: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Expected calibration error over CALIBRATION_BINS bins of confidence (0.5 to 1) and the log loss."""
    confidence = np.maximum(probability, 1 - probability)
    correct = (probability >= 0.5) == (labels == 1)
    bins = np.minimum(((confidence - 0.5) * 2 * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    gaps = [abs(confidence[bins == b].mean() - correct[bins == b].mean()) * np.mean(bins == b)
            for b in range(CALIBRATION_BINS) if np.any(bins == b)]
    clipped = np.clip(probability, 1e-7, 1 - 1e-7)
    log_loss = -np.mean(np.where(labels == 1, np.log(clipped), np.log(1 - clipped)))
    return {"ece": float(np.sum(gaps)), "log_loss": float(log_loss)}


def median_tokens(texts: list[str]) -> float:
    from rnnlab.data.imdb import tokenize

    return float(np.median([len(tokenize(text)) for text in texts]))


def label_noise(scores: np.ndarray, reviews: np.ndarray, whole: dict[str, bool]) -> dict[str, float]:
    """How far a slice's texts carry their review's label, as TF-IDF + LR (fitted on whole reviews) reads them:
    the share it is unsure of, and the share it labels as it labels the whole review (None for a CSV of the
    user's, whose texts come from no review here)."""
    probability = 1 / (1 + np.exp(-scores))
    agrees = [(score > 0) == whole[review] for score, review in zip(scores, reviews) if review in whole]
    return {"unsure_share": float(np.mean(np.abs(probability - 0.5) < UNSURE)),
            "agrees_with_whole": float(np.mean(agrees)) if agrees else None}


def bootstrap_accuracies(per_slice: dict[str, dict], resamples: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each model's accuracy on each slice under ``resamples`` draws of the reviews with replacement: one draw
    weighs every slice's texts by how often their review was drawn, so slices and models are paired."""
    names = sorted({review for scored in per_slice.values() for review in scored["reviews"]})
    index = {name: i for i, name in enumerate(names)}
    positions = {name: np.array([index[r] for r in scored["reviews"]]) for name, scored in per_slice.items()}
    rng = np.random.default_rng(seed)
    parts: dict[str, dict[str, list]] = {s: {m: [] for m in scored["correct"]} for s, scored in per_slice.items()}
    for start in range(0, resamples, CHUNK):
        draws = min(CHUNK, resamples - start)
        counts = np.stack([np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))
                           for _ in range(draws)]).astype(np.float64)
        for slice_name, scored in per_slice.items():
            weights = counts[:, positions[slice_name]]
            total = weights.sum(axis=1)
            for model, correct in scored["correct"].items():
                parts[slice_name][model].append(weights @ correct.astype(np.float64) / total)
    return {s: {m: np.concatenate(chunks) for m, chunks in models.items()} for s, models in parts.items()}


def compare(per_slice: dict, resampled: dict, bundles: list[str]) -> dict[str, Any]:
    """Each bundle minus each baseline: the accuracy difference per slice and its mean over the short slices,
    each with its 95 % paired bootstrap interval."""
    from rnnlab.data.short_texts import SLICES

    short = [name for name in SLICES[1:] if name in per_slice]  # a user's CSV is reported, not averaged in
    pairs = {}
    for bundle in map(bundle_name, bundles):
        for baseline in BASELINES:
            rows = {}
            for slice_name, scored in per_slice.items():
                point = float(scored["correct"][bundle].mean() - scored["correct"][baseline].mean())
                draws = resampled[slice_name][bundle] - resampled[slice_name][baseline]
                rows[slice_name] = _interval(point, draws)
            point = float(np.mean([rows[name]["difference"] for name in short]))
            draws = np.mean([resampled[s][bundle] - resampled[s][baseline] for s in short], axis=0)
            rows["mean_over_short_slices"] = _interval(point, draws)
            pairs[f"{bundle} - {baseline}"] = rows
    return pairs


def _interval(point: float, draws: np.ndarray) -> dict[str, Any]:
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"difference": point, "ci95": [float(low), float(high)]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rnnlab.data.short_texts import SLICES

    started, load_before = time.perf_counter(), os.getloadavg()
    manifest = prepare_slices(args.slices, split=args.split, seed=args.seed, mirror=args.data_mirror)
    for path in args.bundles:
        check_held_out(path, manifest)
    fit_started = time.perf_counter()
    baselines = fit_baselines(manifest)
    fit_s = time.perf_counter() - fit_started
    per_slice = {}
    for name in SLICES:
        print(f"scoring {name} ...", file=sys.stderr, flush=True)
        per_slice[name] = score_slice(args.slices / f"{name}.csv", baselines, args.bundles)
    for path in args.csv:
        print(f"scoring {path} ...", file=sys.stderr, flush=True)
        per_slice[path.name] = score_slice(path, baselines, args.bundles)
    whole = per_slice["whole"]
    whole_label = dict(zip(whole["reviews"], whole["tfidf_lr_scores"] > 0))
    resampled = bootstrap_accuracies(per_slice, args.resamples, args.bootstrap_seed)
    return {
        "command": "python -m benchmarks.short_texts " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "slices_folder": str(args.slices),
        "manifest": {key: value for key, value in manifest.items() if key != "slices"},
        "models": {
            **{name: {"model": baseline.model, "features": baseline.features} for name, baseline in baselines.items()},
            **{bundle_name(path): describe_bundle(path) for path in args.bundles},
        },
        "baselines_fit_s": fit_s,
        "resamples": args.resamples,
        "bootstrap_seed": args.bootstrap_seed,
        "slices": {
            name: {
                "texts": int(len(scored["reviews"])),
                "left_out": scored["left_out"],
                "median_tokens": median_tokens(scored["texts"]),
                "accuracy": {model: float(correct.mean()) for model, correct in scored["correct"].items()},
                # half the texts are positive: far from 0.5, a model leans to one label on this slice
                "labelled_positive": {model: float(value.mean()) for model, value in scored["positive"].items()},
                "label_noise": label_noise(scored["tfidf_lr_scores"], scored["reviews"], whole_label),
                "calibration": scored["calibration"],
            }
            for name, scored in per_slice.items()
        },
        "pairs": compare(per_slice, resampled, args.bundles),
        "wall_s": time.perf_counter() - started,
    }


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def print_table(results: dict[str, Any]) -> None:
    models = list(results["models"])
    manifest = results["manifest"]
    print(f"\nmachine: {results['machine']}; load average before {results['load_average_before'][0]:.1f}, after "
          f"{results['load_average_after'][0]:.1f}")
    print(f"{manifest['reviews']:,} {manifest['split']} reviews, slices seed {manifest['seed']}; accuracy %, and the "
          "label-noise estimate from TF-IDF + LR (unsure: P within 0.4-0.6; agrees: same label as its whole review)")
    print(f"  {'slice':<16} {'texts':>6} {'tokens':>6} " + " ".join(f"{m[:16]:>16}" for m in models)
          + f" {'unsure':>7} {'agrees':>7}")
    for name, row in results["slices"].items():
        noise = row["label_noise"]
        print(f"  {name:<16} {row['texts']:>6} {row['median_tokens']:>6.0f} "
              + " ".join(f"{100 * row['accuracy'][m]:>16.2f}" for m in models)
              + f" {100 * noise['unsure_share']:>6.1f}% {percent(noise['agrees_with_whole']):>7}")
    print("share of texts each model labels positive (half of them are), %")
    for name, row in results["slices"].items():
        print(f"  {name:<16} {'':>6} {'':>6} "
              + " ".join(f"{100 * row['labelled_positive'][m]:>16.1f}" for m in models))
    calibrated = list(next(iter(results["slices"].values()))["calibration"])
    print("expected calibration error, % (and log loss)")
    for name, row in results["slices"].items():
        print(f"  {name:<16} {'':>6} {'':>6} " + " ".join(
            f"{100 * row['calibration'][m]['ece']:>8.1f} ({row['calibration'][m]['log_loss']:.3f})" for m in calibrated))
    for pair, rows in results["pairs"].items():
        print(f"\n{pair}: accuracy difference, points [95 % paired bootstrap interval, {results['resamples']:,} "
              "resamples]")
        for name, row in rows.items():
            low, high = row["ci95"]
            print(f"  {name:<24} {100 * row['difference']:+6.2f}  [{100 * low:+6.2f}, {100 * high:+6.2f}]")
    print(f"\ntotal wall time {results['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=Path, required=True,
                        help="folder of `rnnlab data short-texts`; written here first when it holds none")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="when --slices holds none: cut them from these reviews")
    parser.add_argument("--seed", type=int, default=0, help="when --slices holds none: the slices' seed")
    parser.add_argument("--bundles", nargs="*", default=[], metavar="BUNDLE", help="sentiment bundles to score")
    parser.add_argument("--csv", type=Path, action="append", default=[], metavar="CSV",
                        help="a labelled short-text CSV of your own (text,label columns), scored as one more slice "
                             "beside the others (repeatable; not in the mean over the short slices)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1,000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--data-mirror", default=None, help="folder with the data files (else RNNLAB_DATA_MIRROR)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    results = run(args)
    print_table(results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
