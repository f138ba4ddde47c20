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
  callers that skip ``prepare``.

Limits are constants of each job's module (its service schemas use the same numbers).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

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
