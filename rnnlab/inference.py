"""Predictions from bundles: what every job's predictor shares, and ``load_predictor``.

Each job's predictor lives in its module (``rnnlab/jobs/<name>.py``; the registry names it) and turns raw user
input into model input, the one place that does so: the CLI (``rnnlab classify | forecast | generate``) and the
Ray Serve deployments both come through it, so a review, a price history or a prompt means the same thing
everywhere. Two rules shape a predictor's API:

* ``prepare`` (``encode_prompt`` for generation) checks ONE item and raises ``InputError`` (one sentence) -- a
  server validates each request before batching it, so one bad item never fails the requests batched with it;
  ``predict_prepared(prepared, batch_size)`` answers prepared items, one dict each (``{"error": sentence}`` for
  one that fails after preparing), ``batch_size`` items per forward pass;
* ``predict`` takes a LIST of raw items (a batch) and still validates each item, naming its position, for
  callers that skip ``prepare``; an item that fails after preparing raises the same way.

The batched jobs' predictors (sentiment, stock, horizon) share all of that in :class:`Predictor`; generation has
its own shape (prompts and sampling settings, one step at a time) and its own class.

Limits are constants of each job's module (its service schemas use the same numbers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from rnnlab import registry
from rnnlab.bundle import Bundle, load_bundle
from rnnlab.errors import BundleError, InputError

PREDICT_BATCH_SIZE = 64  # rows per forward pass inside predict


def load_predictor(bundle_dir: str | Path, *, device: str | torch.device = "cpu", runtime: str | None = None,
                   threads: int | None = None) -> Any:
    """The predictor for whatever job the bundle at ``bundle_dir`` was trained for, its model run by ``runtime``
    (``auto``, ``torch`` or ``onnx``; None: the bundle's default; see rnnlab/runtime.py)."""
    bundle = load_bundle(bundle_dir, device=device)
    if registry.job(bundle.job).predictor is None:
        raise BundleError(f"Bundle {bundle_dir} is a {bundle.job} bundle, which answers no requests; it is a starting "
                          "point for training (model.init_from).")
    return registry.job(bundle.job).load("predictor")(for_inference(bundle, runtime, threads))


def for_inference(bundle: Bundle, runtime: str | None = None, threads: int | None = None) -> Bundle:
    """The bundle with its model as ``runtime`` runs it (rnnlab/runtime.py's ``load_model``): what predictors and
    scorers are given."""
    from rnnlab.runtime import load_model

    return dataclasses.replace(bundle, model=load_model(bundle, runtime, threads=threads))


def expect_job(bundle: Bundle, job: str) -> None:
    if bundle.job != job:
        raise BundleError(f"Bundle {bundle.path} is a {bundle.job} bundle, not a {job} one; pass a {job} bundle.")


def device_of(model) -> torch.device:
    """Where a model's inputs go: a runtime's model says (``device``), a plain ``nn.Module`` by its weights."""
    return model.device if not isinstance(model, torch.nn.Module) else next(model.parameters()).device


def at_position(check, item, noun: str, position: int):
    """Run a per-item check inside a batch; the error names the item's position."""
    try:
        return check(item)
    except InputError as error:
        raise InputError(f"{noun} {position}: {error}") from None


class Predictor:
    """A batched job's predictor: its bundle's model in eval mode on its device, and the per-item rules above.
    A job's subclass names its ``job`` and its ``noun`` (how an error names an item: "Review 3: ...") and writes
    ``prepare`` and ``predict_prepared``."""

    job: ClassVar[str]
    noun: ClassVar[str]

    def __init__(self, bundle: Bundle) -> None:
        expect_job(bundle, self.job)
        self.model = bundle.model.eval()
        self.device = device_of(self.model)

    def prepare(self, item: Any) -> Any:
        raise NotImplementedError

    def predict_prepared(self, prepared: Sequence, batch_size: int = PREDICT_BATCH_SIZE) -> list[dict[str, Any]]:
        raise NotImplementedError

    def validate(self, item: Any) -> None:
        """InputError (one sentence) if ``item`` cannot be answered."""
        self.prepare(item)

    def predict(self, items: Sequence) -> list[dict[str, Any]]:
        """One answer per item; InputError naming the first bad item's position."""
        results = self.predict_prepared([at_position(self.prepare, item, self.noun, i) for i, item in enumerate(items)])
        for position, result in enumerate(results):
            if "error" in result:
                raise InputError(f"{self.noun} {position}: {result['error']}")
        return results

    @torch.inference_mode()
    def forward(self, inputs: np.ndarray, batch_size: int = PREDICT_BATCH_SIZE) -> np.ndarray:
        """The model's float32 outputs for fixed-size inputs (windows), ``batch_size`` rows per forward pass."""
        outputs = [self.model(torch.from_numpy(inputs[start : start + batch_size]).to(self.device)).float().cpu()
                   for start in range(0, len(inputs), batch_size)]
        return torch.cat(outputs).numpy() if outputs else np.zeros((0,), dtype=np.float32)
