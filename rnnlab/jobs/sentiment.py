"""The IMDb sentiment job: length-bucketed batches of reviews, binary cross-entropy, accuracy and ROC AUC; its
predictor (reviews -> labels), the service's request and answer (POST /v1/sentiment), the scorer of any labelled
reviews (``rnnlab evaluate --data``) and the ``rnnlab classify`` verb."""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, BeforeValidator, Field, StringConstraints, model_validator

from rnnlab.bundle import Bundle
from rnnlab.config import Count, DataSettings, JobConfig, PositiveInt, Probability, model_section
from rnnlab.errors import ConfigError, DataError, InputError
from rnnlab.inference import PREDICT_BATCH_SIZE, Predictor
from rnnlab.models.sentiment import SentimentConfig
from rnnlab.runtime import GraphSpec
from rnnlab.serve.schemas import StrictBody
from rnnlab.trainers.evaluate import score_with_job
from rnnlab.trainers.job import Batch, EvalResult, Job, gather

log = logging.getLogger(__name__)

MAX_TEXTS = 64  # reviews per request (predict itself takes any number and works in chunks)
MAX_TEXT_CHARS = 20_000  # the longest IMDb review has ~14k characters
SHOWN_UNKNOWN = 10  # unknown tokens listed by name by the scorer, most frequent first
LSTM_WEIGHTS = tuple(i / 20 for i in range(21))  # model.fit_lstm_weight's choices: 0, 0.05, ..., 1
TEMPERATURES = tuple(round(0.25 * 2 ** (i / 20), 4) for i in range(81))  # model.fit_temperature's: 0.25 to 4
# the short texts every validation and test review is also scored on (seeded windows of that many tokens, one of
# each per review): what a sentiment service is mostly sent is a line, not a whole review
SHORT_WINDOWS = (10, 20, 40)


class SentimentDataSettings(DataSettings):
    val_fraction: Probability = 0.1  # of the training reviews, held out for validation
    min_freq: PositiveInt = 1
    max_vocab: PositiveInt | None = None
    max_length: PositiveInt | None = None  # tokens kept per review (its start)
    bucket_size_multiplier: PositiveInt = 100
    # sentiment bundles (teachers) that label the 50,000 unlabelled reviews: they join the training reviews with
    # the teachers' mean probability as soft targets (self-training, distillation); each must have held out this
    # run's validation reviews
    pseudo_labels_from: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = []
    limit_unlabelled: Count = 0
    # each epoch, this many random windows of every training review join the whole reviews, with their review's
    # label; each window's length is drawn log-uniformly from crop_tokens (a sentence is 5-40 tokens)
    crops_per_review: Count = 0
    crop_tokens: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] = [5, 60]

    @model_validator(mode="after")
    def _crop_range(self):
        if self.crop_tokens[0] > self.crop_tokens[1]:
            raise ValueError(f"data.crop_tokens {self.crop_tokens} must be [shortest, longest]; swap them")
        return self


class SentimentModelSettings(model_section(SentimentConfig)):
    # a review LM bundle (``rnnlab train lm``) whose embedding and LSTM layers the classifier starts from; its
    # vocabulary must be this run's (same data.val_fraction, min_freq, max_vocab and train.seed)
    init_from: str | None = None
    # with an n-gram branch: after training, weigh the LSTM's logit by the value in 0, 0.05, ..., 1 with the
    # lowest validation loss (the bundle keeps it as lstm_weight); trained together, the LSTM fits the training
    # reviews sooner and the plain sum leans on it more than unseen reviews bear out
    fit_lstm_weight: bool = False
    # after training, divide the answer's logit by the temperature in 0.25 ... 4 with the lowest validation loss
    # (whole reviews and short windows weighed alike), so that P(positive) means what it says on both
    fit_temperature: bool = True


class SentimentJobConfig(JobConfig):
    job: Literal["sentiment"] = "sentiment"
    data: SentimentDataSettings = Field(default_factory=SentimentDataSettings)
    model: SentimentModelSettings = Field(default_factory=SentimentModelSettings)

    @property
    def has_validation_split(self) -> bool:
        # val_fraction=0 trains on all 25,000 reviews: no selection, no fitting, the final weights are the bundle's
        return self.data.val_fraction > 0


class SentimentJob(Job):
    Config = SentimentJobConfig

    def has_validation(self) -> bool:
        return len(self.splits["val"][1]) > 0

    def load_data(self) -> None:
        from rnnlab.data import imdb

        data_cfg = self.config.data
        data = imdb.load_sentiment_data(
            self.source_path(), val_fraction=data_cfg.val_fraction, seed=self.seed, min_freq=data_cfg.min_freq,
            max_vocab=data_cfg.max_vocab, max_length=data_cfg.max_length,
        )  # fmt: skip
        self.vocab = data.vocab
        self.splits = {}
        for split in ("train", "val", "test"):
            encoded = getattr(data, split)
            keep = self._limit(len(encoded.labels), f"limit_{split}")
            ids = [np.asarray(encoded.ids[i], dtype=np.int64) for i in keep]
            labels = np.asarray(encoded.labels, dtype=np.float32)[keep]
            self.splits[split] = (ids, labels)
            if split != "train" and len(ids):
                self.splits[f"{split}_short"] = short_windows(ids, labels)
        self._imdb = imdb
        self._global_batches: list[list[int]] = []

    def load_data_to_score(self, path, assets: dict) -> dict:
        from rnnlab.data import imdb
        from rnnlab.data.vocab import Vocab

        reviews = imdb.read_labelled_reviews(path)
        self.vocab, self._imdb = Vocab.from_json(assets["vocab"]), imdb
        max_length = self.config.data.max_length
        encoded, labels, unknown, skipped = [], [], Counter(), Counter(reviews.skipped)
        tokens_total = 0
        self._scored_rows, self._rows_read = [], len(reviews.texts)  # which rows ``predictions`` answers for
        for row, (text, label) in enumerate(zip(reviews.texts, reviews.labels)):
            tokens = imdb.tokenize(text)
            if not tokens:
                skipped["reviews with no words (left out)"] += 1
                continue
            self._scored_rows.append(row)
            ids = np.asarray(self.vocab.encode(tokens), dtype=np.int64)
            unknown.update(token for token, id_ in zip(tokens, ids) if id_ == self.vocab.unk_index)
            tokens_total += len(tokens)
            encoded.append(ids[-max_length:] if max_length is not None else ids)  # the last tokens, as training
            labels.append(int(label))  # int8 from the reader: their sum would wrap at 127
        if not encoded:
            raise DataError(f"None of the {len(reviews.texts)} reviews in {path} has a word to read; pass review text.")
        self.splits = {"test": (encoded, np.asarray(labels, dtype=np.float32))}
        self.splits["test_short"] = short_windows(*self.splits["test"])  # as the test split's figures
        return {"reviews": len(labels), "positive": int(sum(labels)), "tokens": tokens_total,
                "unknown_tokens": sum(unknown.values()), "unknown_share": sum(unknown.values()) / tokens_total,
                "most_frequent_unknown": dict(unknown.most_common(SHOWN_UNKNOWN)), "skipped": dict(skipped)}

    def add_training_data(self) -> None:
        """With data.pseudo_labels_from: append the unlabelled reviews to train, each labelled with the teachers'
        mean P(positive)."""
        from rnnlab.data.review_lm import unlabelled_reviews

        teachers = self.config.data.pseudo_labels_from
        if not teachers:
            return
        reviews = unlabelled_reviews(self.source_path(), self.vocab, max_length=self.config.data.max_length)
        keep = self._limit(len(reviews), "limit_unlabelled")
        probabilities = np.mean([self._teacher_probabilities(path, keep) for path in teachers], axis=0)
        ids, labels = self.splits["train"]
        self.splits["train"] = (ids + [reviews[i] for i in keep], np.concatenate([labels, probabilities]))
        log.info("data.pseudo_labels_from: %d unlabelled reviews added, %.1f %% labelled positive",
                 len(keep), 100 * float(np.mean(probabilities > 0.5)))

    def _teacher_probabilities(self, path: str, keep: np.ndarray) -> np.ndarray:
        """P(positive) of the sentiment bundle at ``path`` for the unlabelled reviews ``keep``, read with its own
        vocabulary and length."""
        from rnnlab.bundle import load_bundle
        from rnnlab.data.review_lm import unlabelled_reviews
        from rnnlab.progress import progress_bar

        teacher = load_bundle(path)
        if teacher.job != "sentiment":
            raise ConfigError(f"data.pseudo_labels_from: {path} is a {teacher.job} bundle; give a sentiment "
                              "bundle (rnnlab train sentiment).")
        held_out = (teacher.config["data"]["val_fraction"], teacher.config["train"]["seed"])
        if held_out != (self.config.data.val_fraction, self.seed):
            # A teacher that trained on this run's validation reviews would leak them into its labels.
            raise ConfigError(f"data.pseudo_labels_from: the teacher {path} held out other validation reviews "
                              f"(val_fraction, seed = {held_out}); train it with this run's data.val_fraction "
                              "and train.seed.")
        classifier = SentimentPredictor(teacher)
        teacher_ids = unlabelled_reviews(self.source_path(), classifier.vocab, max_length=classifier.max_length)
        answers = []
        chunks = [keep[start : start + 1000] for start in range(0, len(keep), 1000)]
        for chunk in progress_bar(chunks, desc=f"labels from {Path(path).parent.name or path}", unit="k reviews",
                                  disable=not (self.rank == 0 and self.config.train.progress)):
            answers += classifier.predict_prepared([teacher_ids[i] for i in chunk])
        return np.array([answer["probability"] for answer in answers], dtype=np.float32)

    def _lengths(self, split: str) -> np.ndarray:
        return np.array([len(x) for x in self.splits[split][0]], dtype=np.int64)

    def _sampler(self, lengths: np.ndarray):
        return self._imdb.BucketBatchSampler(
            lengths, self.batch_size, shuffle=True, seed=self.seed,
            bucket_size_multiplier=self.config.data.bucket_size_multiplier, drop_last=False,
        )  # fmt: skip

    def steps_per_epoch(self) -> int:
        texts = len(self.splits["train"][0]) * (1 + self.config.data.crops_per_review)
        return len(self._sampler(np.zeros(texts, dtype=np.int64)))  # the count decides, not the lengths

    def start_epoch(self, epoch: int, start: int) -> None:
        self.splits["epoch"] = self._with_crops(epoch)
        sampler = self._sampler(self._lengths("epoch"))
        sampler.set_epoch(epoch)
        # Same global batches on every process; a final batch smaller than the world cannot be split.
        self._global_batches = [list(b) for b in sampler if len(b) >= self.world_size]

    def _with_crops(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The training reviews, then data.crops_per_review random windows of each with its label, drawn anew each
        epoch from (train.seed, epoch): the same on every process and after a resume."""
        ids, labels = self.splits["train"]
        crops = self.config.data.crops_per_review
        if not crops:
            return ids, labels
        rng = np.random.default_rng([self.seed, epoch, 1])
        lengths = np.tile(self._lengths("train"), crops)
        low, high = self.config.data.crop_tokens
        sizes = np.minimum(lengths, np.exp(rng.uniform(np.log(low), np.log(high + 1), len(lengths))).astype(np.int64))
        starts = (rng.random(len(lengths)) * (lengths - sizes + 1)).astype(np.int64)
        reviews = np.tile(np.arange(len(ids)), crops)
        cut = [ids[r][start : start + size] for r, start, size in zip(reviews, starts, sizes)]
        return ids + cut, np.concatenate([labels, labels[reviews]])

    def _collate(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels = self.splits[split]
        return self._imdb.collate_reviews([(ids[i], float(labels[i])) for i in indices])

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        for global_batch in self._global_batches[start:]:
            mine = self._share(np.asarray(global_batch))
            x, lengths, y = self._collate("epoch", mine)
            yield Batch(
                inputs=(x.to(self.device), lengths.to(self.device)), targets=y.to(self.device).float(),
                global_units=len(global_batch), samples=len(mine), tokens=int(lengths.sum()),
            )  # fmt: skip

    def data_model_config(self) -> dict:
        return {"vocab_size": len(self.vocab)}

    def build_model(self):
        from rnnlab.models import build_model

        settings = self.config.model.to_dict()
        init_from = settings.pop("init_from")
        settings.pop("fit_temperature")
        if settings.pop("fit_lstm_weight") and not settings["ngram_buckets"]:
            raise ConfigError("model.fit_lstm_weight weighs the LSTM against the n-gram branch; set "
                              "model.ngram_buckets too, or drop it.")
        model = build_model("sentiment", {**settings, **self.data_model_config()})
        if init_from is not None:
            self._start_from(model, init_from)
        return model

    def _start_from(self, model, path: str) -> None:
        """Copy the embedding and LSTM layers of the review LM bundle at ``path`` into ``model``."""
        from rnnlab.bundle import load_bundle
        from rnnlab.data.vocab import Vocab
        from rnnlab.models.wordlm import copy_into_classifier

        bundle = load_bundle(path)
        if bundle.job != "lm":
            raise ConfigError(f"model.init_from: {path} is a {bundle.job} bundle; give a review LM bundle "
                              "(rnnlab train lm).")
        lm_vocab = Vocab.from_json(bundle.assets["vocab"])
        if lm_vocab != self.vocab:
            raise ConfigError(
                f"model.init_from: the LM's vocabulary ({len(lm_vocab):,} words) is not this run's "
                f"({len(self.vocab):,}); train both with the same data.val_fraction, min_freq, max_vocab and "
                "train.seed."
            )
        copied = copy_into_classifier(bundle.model, model)
        log.info("model.init_from %s: copied %s", path, ", ".join(copied))

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        # With an n-gram branch the loss is the sum's (what the model answers with) plus each half's as a classifier
        # of its own: trained on the sum alone the bag of n-grams soon fits the training reviews and leaves the
        # LSTM little to learn from; on the halves alone they never learn to combine. Chosen on validation
        # (`wide` at 5x, 30,000 words): 90.36 % for the three terms, 89.88 % halves only, 89.76 % sum only.
        branches = model(*batch.inputs, branches=True)
        terms = (*branches, sum(branches)) if len(branches) == 2 else branches
        return sum(F.binary_cross_entropy_with_logits(logits.float(), batch.targets, reduction="sum")
                   for logits in terms)

    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        labels = self.splits[split][1]
        logits = self._logits(model, split, accelerator)[0]
        metrics = sentiment_metrics(labels, logits)
        if f"{split}_short" in self.splits:  # the same reviews' windows of 10, 20 and 40 tokens
            short_labels = self.splits[f"{split}_short"][1]
            short = sentiment_metrics(short_labels, self._logits(model, f"{split}_short", accelerator)[0])
            metrics |= {f"short_{name}": value for name, value in short.items()}
        return EvalResult(metrics, {"labels": labels, "logits": logits})

    @torch.no_grad()
    def _logits(self, model, split: str, accelerator, branches: bool = False) -> np.ndarray:
        """Logits of every review of ``split`` on every process: [1, N], or with ``branches`` [branches, N]."""
        ids, labels = self.splits[split]
        order = np.argsort(self._lengths(split), kind="stable")  # similar lengths together: little padding
        mine = self._share(order)
        parts = []
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = mine[start : start + self.eval_batch_size]
            x, lengths, _ = self._collate(split, chunk)
            with accelerator.autocast():
                inputs = (x.to(self.device), lengths.to(self.device))
                # a runtime's model (rnnlab/export.py: the int8 gate scores graphs) answers the sum only
                out = model(*inputs, branches=True) if branches else model(*inputs)
            parts.append(torch.stack(out if branches else (out,)).float().cpu().numpy())
        rows = 2 if branches and accelerator.unwrap_model(model).config.ngram_buckets else 1
        local = np.concatenate(parts, axis=1) if parts else np.zeros((rows, 0), np.float32)
        pieces = gather(accelerator, (mine, local))
        index = np.concatenate([p[0] for p in pieces])
        logits = np.empty((rows, len(labels)), dtype=np.float64)
        logits[:, index] = np.concatenate([p[1] for p in pieces], axis=1)
        return logits

    def predictions(self, result: EvalResult) -> dict:
        probabilities: list[float | None] = [None] * self._rows_read
        scored = torch.sigmoid(torch.from_numpy(np.asarray(result.details["logits"]))).tolist()
        for row, probability in zip(self._scored_rows, scored):
            probabilities[row] = probability
        return {"probabilities": probabilities}

    def fit_on_validation(self, model, accelerator) -> dict:
        """model.fit_lstm_weight and model.fit_temperature: the pair with the lowest validation loss, the mean of
        the whole reviews' and their short windows' (the service is sent both)."""
        settings = self.config.model
        if not ((settings.fit_lstm_weight or settings.fit_temperature) and self.has_validation()):
            return {}
        texts = [(self.splits[split][1], self._logits(model, split, accelerator, branches=True))
                 for split in ("val", "val_short")]

        def loss(weight: float, temperature: float) -> float:
            return float(np.mean([bce(labels, np.dot((weight, 1.0)[-len(branches):], branches) / temperature)
                                  for labels, branches in texts]))

        weights = LSTM_WEIGHTS if settings.fit_lstm_weight else (model.config.lstm_weight,)
        temperatures = TEMPERATURES if settings.fit_temperature else (model.config.temperature,)
        losses = {(w, t): loss(w, t) for w in weights for t in temperatures}
        weight, temperature = min(losses, key=losses.get)
        log.info("validation loss (whole and short texts) %.4f -> %.4f: LSTM logit weighed %.2f, temperature %.3f",
                 loss(model.config.lstm_weight, model.config.temperature), losses[weight, temperature], weight,
                 temperature)
        model.config.lstm_weight, model.config.temperature = weight, temperature
        return {"lstm_weight": weight, "temperature": temperature}

    def assets(self) -> dict[str, dict]:
        return {"vocab": self.vocab.to_json()}

    def report(self, model, val: dict, test: EvalResult, output_dir, tracker) -> dict:
        from sklearn.metrics import confusion_matrix

        labels = test.details["labels"].astype(int)
        predicted = (test.details["logits"] > 0).astype(int)
        matrix = confusion_matrix(labels, predicted, labels=[0, 1]).tolist()
        log.info("test confusion matrix [[TN, FP], [FN, TP]]: %s", matrix)
        if tracker is not None:
            import wandb

            tracker.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=labels.tolist(), preds=predicted.tolist(), class_names=["negative", "positive"])})
        return {"confusion_matrix": matrix}


def sentiment_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, roc_auc_score

    labels = np.asarray(labels, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    metrics = {"loss": bce(labels, logits), "accuracy": float(accuracy_score(labels > 0.5, logits > 0))}
    if 0 < labels.sum() < len(labels):
        metrics["roc_auc"] = float(roc_auc_score(labels, logits))
    return metrics


def bce(labels: np.ndarray, logits: np.ndarray) -> float:
    """Binary cross-entropy from logits, stable for large ones (sklearn's log_loss takes probabilities and clips
    them)."""
    return float(np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))))


def short_windows(ids: list[np.ndarray], labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """One window of each of SHORT_WINDOWS tokens from every review (a shorter review whole), with its label. Where
    a window starts follows from the review's own tokens, so a review has the same windows in any run, split or
    order (``rnnlab evaluate --data`` on the test reviews gives the test split's figures)."""
    windows = []
    for size in SHORT_WINDOWS:
        for review in ids:
            start = zlib.crc32(review.tobytes(), size) % (len(review) - size + 1) if len(review) > size else 0
            windows.append(review[start : start + size])
    return windows, np.tile(np.asarray(labels), len(SHORT_WINDOWS))


# ------------------------------------------------------------------------------------------------ predictor


class SentimentPredictor(Predictor):
    """Reviews in, ``{"label": "positive" | "negative" | "unknown", "probability": P(positive), "tokens": n,
    "known_tokens": k}`` out.

    Texts are tokenized exactly as in training (``rnnlab.data.imdb.tokenize``), unknown words map to ``<unk>``,
    and reviews longer than the training ``data.max_length`` keep their LAST tokens, as training did.
    Batching never changes a result: the model ignores padding exactly.
    """

    job, noun = "sentiment", "Review"

    def __init__(self, bundle: Bundle) -> None:
        from rnnlab.data.vocab import Vocab

        super().__init__(bundle)
        self.vocab = Vocab.from_json(bundle.assets["vocab"])
        self.max_length = bundle.config.get("data", {}).get("max_length")

    def prepare(self, text: Any) -> np.ndarray:
        """Validate ONE review (InputError if ``text`` is not a string, is empty, too long, or has no words) and
        return its token ids (what the model reads), tokenizing it once: a server
        prepares each item as it arrives and runs :meth:`predict_prepared` on the batch."""
        from rnnlab.data.imdb import tokenize

        if not isinstance(text, str):
            raise InputError(f"A review must be a string, got {type(text).__name__}; send the review's text.")
        if not text.strip():
            raise InputError("The review is empty; send the text to classify.")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(
                f"The review has {len(text):,} characters, more than the limit of {MAX_TEXT_CHARS:,}; shorten it."
            )
        tokens = tokenize(text)
        if not tokens:
            raise InputError("The review has no words after removing markup and punctuation; send review text.")
        ids = np.asarray(self.vocab.encode(tokens), dtype=np.int64)
        return ids[-self.max_length :] if self.max_length is not None else ids

    @torch.inference_mode()
    def predict_prepared(self, encoded: Sequence[np.ndarray], batch_size: int = PREDICT_BATCH_SIZE) -> list[dict]:
        """Predictions for reviews already through :meth:`prepare`, ``batch_size`` reviews per forward pass, each
        with how many tokens the model read and how many of them its vocabulary knows. A review of unknown words
        only is all ``<unk>`` to the model, whose answer would be a guess: it gets label "unknown" and 0.5."""
        known = [int(np.count_nonzero(ids != self.vocab.unk_index)) for ids in encoded]
        readable = [i for i, count in enumerate(known) if count]
        probabilities = np.full(len(encoded), 0.5)
        for passed in similar_lengths([len(encoded[i]) for i in readable], batch_size):
            chunk = [readable[j] for j in passed]
            lengths = torch.tensor([len(encoded[i]) for i in chunk])
            ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : lengths[row]] = torch.from_numpy(encoded[i])
            logits = self.model(ids.to(self.device), lengths.to(self.device))
            probabilities[chunk] = torch.sigmoid(logits.float()).cpu().numpy()
        answers = []
        for probability, review, count in zip(probabilities, encoded, known):
            label = ("positive" if probability >= 0.5 else "negative") if count else "unknown"
            answers.append({"label": label, "probability": float(probability), "tokens": len(review),
                            "known_tokens": count})
        return answers


# A forward pass pads its reviews by at most this share of their tokens: both runtimes compute every padded
# position, so 32 served reviews of 45-400 tokens (sorted) took 156 ms on torch and 107 ms on ONNX Runtime in one
# pass, 63 and 50 ms in the 5 passes this bound cuts them into (9 passes at 0.1: 67 and 43 ms; one thread).
MAX_PADDING = 0.25


def similar_lengths(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``lengths`` in forward passes: sorted by length, at most ``batch_size`` each, and a new pass
    wherever padding to the longest would add more than MAX_PADDING of the pass's tokens. Results are exact
    whatever the passes (the model ignores padding); only the time changes."""
    chunk: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = lengths[i] * (len(chunk) + 1)  # sorted: this review is the longest so far
        if chunk and (len(chunk) == batch_size or padded > (1 + MAX_PADDING) * (tokens + lengths[i])):
            yield chunk
            chunk, tokens = [], 0
        chunk.append(i)
        tokens += lengths[i]
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------------------ ONNX graph

# reviews the parity check reads: lengths from one token to the longest the bundle keeps, padded together and alone
GRAPH_REVIEWS = ("A moving, beautifully acted film; I loved every minute of it.",
                 "Dull, predictable and far too long. I want my two hours back.",
                 "bad",
                 "The plot was awful, awful, awful and the film bad :( " * 12)
INT8_MAX_ACCURACY_CHANGE = 0.003  # int8's validation accuracy within 0.3 points of fp32's
INT8_MIN_AGREEMENT = 0.99  # and the same label for at least 99 % of the validation reviews


def graph_examples(bundle: Bundle) -> list[tuple]:
    from rnnlab.data.imdb import collate_reviews

    classifier = SentimentPredictor(bundle)
    encoded = [classifier.prepare(text) for text in GRAPH_REVIEWS]
    batch = collate_reviews([(ids, 0.0) for ids in encoded])[:2]
    alone = [collate_reviews([(ids, 0.0)])[:2] for ids in (encoded[0], encoded[2])]
    longest_and_one = collate_reviews([(encoded[3], 0.0), (encoded[2], 0.0)])[:2]
    return [batch, *alone, longest_and_one]


def int8_gate(fp32: EvalResult, int8: EvalResult) -> tuple[dict, str | None]:
    """int8 is kept when its validation accuracy is within 0.3 points of the fp32 graph's and at least 99 % of the
    validation reviews get the same label from both."""
    before, after = fp32.metrics["accuracy"], int8.metrics["accuracy"]
    agreement = float(np.mean((fp32.details["logits"] > 0) == (int8.details["logits"] > 0)))
    figures = {"val_accuracy_fp32": before, "val_accuracy_int8": after, "val_label_agreement": agreement}
    if abs(after - before) > INT8_MAX_ACCURACY_CHANGE:
        return figures, (f"validation accuracy {after:.2%} int8 vs {before:.2%} fp32 differs by more than "
                         f"{INT8_MAX_ACCURACY_CHANGE * 100:.1f} points")
    if agreement < INT8_MIN_AGREEMENT:
        return figures, (f"int8 and fp32 agree on {agreement:.2%} of the validation labels, fewer than "
                         f"{INT8_MIN_AGREEMENT:.0%}")
    return figures, None


# ids [B, T] right-padded with 0 and lengths [B] in, logits [B] out (the padded path: packed sequences do not export)
GRAPH = GraphSpec(inputs=("ids", "lengths"), outputs=("logits",), examples=graph_examples, int8_gate=int8_gate,
                  labels=lambda logits: logits > 0,
                  dynamic_axes={"ids": {0: "batch", 1: "steps"}, "lengths": {0: "batch"}, "logits": {0: "batch"}})

# ------------------------------------------------------------------------------------------------ service


class SentimentRequest(StrictBody):
    texts: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_TEXTS,
        description=f"Reviews to classify, 1 to {MAX_TEXTS} per request, each at most {MAX_TEXT_CHARS} characters.",
        examples=[["A moving film with a wonderful cast.", "Two hours I will never get back."]],
    )

    def items(self) -> list[str]:
        """The items the service batches (with those of concurrent requests): one per review."""
        return list(self.texts)

    @staticmethod
    def error_loc(index: int) -> list:
        return ["body", "texts", index]


class SentimentResult(BaseModel):
    label: Literal["positive", "negative", "unknown"] = Field(
        description="positive when the probability is at least 0.5, else negative; unknown when the model knows "
                    "none of the text's words (known_tokens 0): it has nothing to read, so it does not guess.")
    probability: float = Field(description="Probability that the text is positive; 0.5 when the label is unknown.")
    tokens: int = Field(description="Tokens (words and emoticons) the model read: the text's last ones, up to the "
                                    "bundle's data.max_length.")
    known_tokens: int = Field(description="How many of those tokens the model's vocabulary knows; it reads each "
                                          "of the others as the one token <unk>.")


class SentimentResponse(BaseModel):
    model: str = Field(description="Bundle name and version that answered.")
    results: list[SentimentResult]

    @staticmethod
    def answer(model: str, results: list[dict]) -> dict:
        return {"model": model, "results": results}


# ------------------------------------------------------------------------------------------------ scorer


def score(bundle: Bundle, path: str | Path, *, predictions: bool = False) -> dict[str, Any]:
    """A folder with ``pos/`` and ``neg/`` text files, or a CSV with ``text,label`` columns -> the test figures of
    training on those reviews (loss, accuracy, ROC AUC), and how many tokens the bundle's vocabulary does not know
    (they read as ``<unk>``, as in serving). With ``predictions``, also ``probabilities``: P(positive) of each
    review in the order read (a CSV's rows), None for one with no words."""
    return score_with_job(bundle, path, predictions=predictions)


# ------------------------------------------------------------------------------------------------ CLI verb and demo


class CLI:
    """``rnnlab classify BUNDLE TEXT...``: one JSON line per text."""

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("texts", metavar="TEXT", nargs="+", help="review text(s) to classify")

    @staticmethod
    def run(args, load_predictor) -> int:
        import json

        predictor = load_predictor()
        for text, answer in zip(args.texts, predictor.predict(list(args.texts))):
            print(json.dumps({"text": text[:60], **answer}))
        return 0


def demo(post) -> None:
    """``make demo``: example reviews, whole and one-line, and a text of made-up words through ``post(body)`` (POST
    /v1/sentiment), each beside its right label."""
    reviews = [("A moving, beautifully acted film; I loved every minute of it.", "positive"),
               ("Dull, predictable and far too long. I want my two hours back.", "negative"),
               ("Loved it!", "positive"), ("What a waste of time.", "negative"), ("qwxz blorfle zzyzx", "unknown")]
    for (text, expected), answer in zip(reviews, post({"texts": [text for text, _ in reviews]})["results"]):
        verdict = "right" if answer["label"] == expected else f"WRONG (expected {expected})"
        if answer["label"] == "unknown":
            print(f"  unknown: none of its {answer['tokens']} words is known ({verdict})  <- {text!r}")
            continue
        confidence = answer["probability"] if answer["label"] == "positive" else 1 - answer["probability"]
        print(f"  {answer['label']} with probability {confidence:.3f} ({verdict})  <- {text!r}")
