"""The sentence_end job: config keys, batches, loss and metrics; the predictor, the service's request and answer
(POST /v1/sentence_end) and the scorer of any text file (``rnnlab evaluate BUNDLE --data TEXT``).

Most word ends are not sentence ends (about 1 in 15 in War and Peace), so accuracy is reported beside the naive
answer "never" (``baseline_accuracy``) and F1 of the sentence ends says whether the model finds them at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, StringConstraints

from rnnlab.bundle import Bundle
from rnnlab.config import DataSettings, JobConfig, PositiveInt, Probability, model_section
from rnnlab.data.text import build_char_vocab, encode_text, read_text
from rnnlab.data.vocab import Vocab
from rnnlab.errors import InputError
from rnnlab.inference import PREDICT_BATCH_SIZE, at_position, device_of, expect_job
from rnnlab.serve.schemas import StrictBody
from rnnlab.trainers.job import Batch, EvalResult, Job

from newjob.data import examples, pad_id, split
from newjob.model import SentenceEndConfig

MAX_TEXTS = 64
MAX_TEXT_CHARS = 2_000


class SentenceEndDataSettings(DataSettings):  # the limits count examples (word ends)
    window: PositiveInt = 48  # characters read up to a word's end
    lowercase: bool = True
    val_fraction: Probability = 0.05
    test_fraction: Probability = 0.05


SentenceEndModelSettings = model_section(SentenceEndConfig)


class SentenceEndJobConfig(JobConfig):
    job: Literal["sentence_end"] = "sentence_end"
    data: SentenceEndDataSettings = Field(default_factory=SentenceEndDataSettings)
    model: SentenceEndModelSettings = Field(default_factory=SentenceEndModelSettings)


class SentenceEndJob(Job):
    Config = SentenceEndJobConfig

    def load_data(self) -> None:
        d = self.config.data
        text = read_text(self.source_path(), lowercase=d.lowercase)
        self.vocab = build_char_vocab(text)
        windows, labels, _ = examples(text, self.vocab, d.window)
        self.X, self.y = {}, {}
        for name, part in split(len(labels), d.val_fraction, d.test_fraction).items():
            kept = self._limit(len(labels[part]), f"limit_{name}")
            self.X[name] = torch.from_numpy(np.ascontiguousarray(windows[part][kept]))
            self.y[name] = torch.from_numpy(labels[part][kept])

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.y["train"]) / self.batch_size)

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        return self.shuffled_batches(self.X["train"], self.y["train"], epoch, start)

    def data_model_config(self) -> dict:
        return {"vocab_size": len(self.vocab)}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(*batch.inputs).float(), batch.targets, reduction="sum")

    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        logits = self.predict_examples(model, self.X[split], accelerator)
        return EvalResult(sentence_end_metrics(self.y[split].numpy(), logits))

    def assets(self) -> dict[str, dict]:
        return {"vocab": self.vocab.to_json()}


def sentence_end_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Mean log loss, accuracy and F1 of the sentence ends at P >= 0.5, and the accuracy of answering "never"."""
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels).double())
    said = logits >= 0
    found = float((said & (labels == 1)).sum())
    f1 = 2 * found / max(1.0, float(said.sum() + (labels == 1).sum()))
    return {"loss": float(loss), "accuracy": float((said == (labels == 1)).mean()), "f1": f1,
            "baseline_accuracy": float((labels == 0).mean())}


# ------------------------------------------------------------------------------------------------ predictor


class SentenceEndPredictor:
    """Texts in, ``{"ends_sentence": bool, "probability": P}`` out: does a sentence end after the text's last
    word? Only the last ``data.window`` characters are read (a shorter text reads as if spaces came before it);
    trailing spaces are ignored, and the text must then end with a letter."""

    def __init__(self, bundle: Bundle) -> None:
        expect_job(bundle, "sentence_end")
        self.model = bundle.model.eval()
        self.vocab = Vocab.from_json(bundle.assets["vocab"])
        data = bundle.config.get("data", {})
        self.window = int(data.get("window", 48))
        self.lowercase = bool(data.get("lowercase", True))
        self.pad = pad_id(self.vocab)
        self.device = device_of(self.model)

    def prepare(self, text: Any) -> np.ndarray:
        """Check ONE text and return its window of ids (InputError, one sentence, for a bad one)."""
        if not isinstance(text, str):
            raise InputError(f"A text must be a string, got {type(text).__name__}; send the text.")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"The text has {len(text):,} characters, more than the limit of {MAX_TEXT_CHARS:,}; "
                             "send its end only.")
        text = text.rstrip()
        if not text or not text[-1].isalpha():
            raise InputError("The text must end with a word (its last character a letter); send the text up to "
                             "the word in question.")
        tail = encode_text((text.lower() if self.lowercase else text)[-self.window :], self.vocab)
        return np.pad(tail, (self.window - len(tail), 0), constant_values=self.pad)

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        return self.predict_prepared([at_position(self.prepare, text, "Text", i) for i, text in enumerate(texts)])

    @torch.inference_mode()
    def predict_prepared(self, windows: Sequence[np.ndarray], batch_size: int = PREDICT_BATCH_SIZE) -> list[dict]:
        logits = [self.model(torch.from_numpy(np.stack(windows[start : start + batch_size])).to(self.device))
                  for start in range(0, len(windows), batch_size)]
        probabilities = torch.sigmoid(torch.cat(logits).float()).cpu().numpy() if logits else []
        return [{"ends_sentence": bool(p >= 0.5), "probability": float(p)} for p in probabilities]


# ------------------------------------------------------------------------------------------------ service


class SentenceEndRequest(StrictBody):
    texts: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1, max_length=MAX_TEXTS,
        description=f"Texts, each ending with the word in question; 1 to {MAX_TEXTS}, each at most "
        f"{MAX_TEXT_CHARS} characters.",
        examples=[["and prince andrew said nothing", "the emperor"]])

    def items(self) -> list[str]:
        return list(self.texts)

    @staticmethod
    def error_loc(index: int) -> list:
        return ["body", "texts", index]


class SentenceEnd(BaseModel):
    ends_sentence: bool
    probability: float = Field(description="Probability that a sentence ends after the text's last word.")


class SentenceEndResponse(BaseModel):
    model: str = Field(description="Bundle name and version that answered.")
    results: list[SentenceEnd]

    @staticmethod
    def answer(model: str, results: list[dict]) -> dict:
        return {"model": model, "results": results}


# ------------------------------------------------------------------------------------------------ scorer


def score(bundle: Bundle, path: str | Path) -> dict[str, Any]:
    """Any UTF-8 text file -> log loss, accuracy and F1 at every word end, beside answering "never"; characters
    the bundle's vocabulary lacks read as spaces and are counted."""
    predictor = SentenceEndPredictor(bundle)
    text = read_text(path, lowercase=predictor.lowercase)
    windows, labels, unknown = examples(text, predictor.vocab, predictor.window)
    with torch.inference_mode():
        logits = torch.cat([predictor.model(torch.from_numpy(windows[i : i + 1024]).to(predictor.device)).cpu()
                            for i in range(0, len(windows), 1024)]).double().numpy()
    return {"word_ends": len(labels), "sentence_ends": int(labels.sum()), "unknown_characters": unknown,
            **sentence_end_metrics(labels, logits)}
