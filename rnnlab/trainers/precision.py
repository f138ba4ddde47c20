"""Mixed precision the LSTM can actually train in here, and deterministic kernels (``train.mixed_precision``,
``train.deterministic``)."""

from __future__ import annotations

import logging
import os

import torch

from rnnlab.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def resolve_precision(requested: str) -> str:
    """The precision to train in: a clear error for fp16 without a GPU; a warning and "no" where an LSTM can't."""
    if requested == "no":
        return "no"
    if requested == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU and none is visible; use bf16 (CPU autocast) or no."
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("This GPU has no bf16 support; training in fp32 (train.mixed_precision=no) instead.")
        return "no"
    # Probe an LSTM forward/backward under autocast now, so an unsupported combination (e.g. an old cuDNN
    # without bf16 RNNs) falls back before training instead of crashing mid-run.
    dtype = torch.float16 if requested == "fp16" else torch.bfloat16
    try:
        lstm = torch.nn.LSTM(8, 8, num_layers=2, batch_first=True).to(device)
        x = torch.randn(2, 3, 8, device=device)
        with torch.autocast(device_type=device, dtype=dtype):
            out, _ = lstm(x)
        out.float().sum().backward()
    except RuntimeError as error:
        log.warning("LSTM in %s on %s is not supported here (%s); training in fp32 instead.",
                    requested, device, first_line(error))
        return "no"
    if out.dtype != dtype:
        # Seen on an H200 (torch 2.11, cuDNN 9.19): under bf16 autocast cuDNN's LSTM computes in float16, without
        # the loss scaling float16 gradients need (Accelerate scales only for fp16), and no faster than TF32.
        log.warning("Under %s autocast the LSTM computes in %s on %s here, without loss scaling; training in fp32 "
                    "instead (ask for fp16 to get half-precision LSTMs with loss scaling).",
                    requested, str(out.dtype).replace("torch.", ""), device)
        return "no"
    return requested


def use_deterministic_kernels(enabled: bool) -> None:
    """``train.deterministic``: kernels that give the same bits on every run, at some cost in speed.

    On a CPU rnnlab's runs repeat exactly anyway. On a GPU, the embedding's backward pass (atomic adds) and some
    cuDNN and cuBLAS kernels vary from run to run: on an H200 a resumed charlm run ended about 1e-4 away from the
    uninterrupted one, so the bit-identical resume needs this. Set both ways, since it is process-wide (Tune
    trials and tests run several trainings in one process).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses deterministic mode without it
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
