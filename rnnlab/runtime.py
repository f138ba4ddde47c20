"""Running a bundle's model for inference: the one seam between predictors (and the generation scheduler) and
what computes.

:func:`load_model` returns an object with the calls predictors and the scheduler make -- ``model(*inputs)`` /
``model.forward``, ``model.step(ids, state)``, ``model.init_state(batch, device)``, ``model.device``,
``model.eval()`` -- taking and handing back torch tensors, so batching and state handling stay as they are.

torch: the bundle's ``nn.Module``, at its fastest on a CPU. oneDNN (torch's CPU LSTM kernels) pays a fixed cost per
call that dwarfs a one-step call and wins back over long sequences, so a call with ONE time step (a decoding step)
runs with oneDNN off and any longer one with it on. Measured on this box (AMD EPYC, AVX2, one thread, charlm
hidden 512 x 2 layers; oneDNN on / off): step batch 1 1.97 / 0.74 ms, batch 32 5.33 / 2.67 ms, batch 128
10.4 / 7.6 ms; prompt of 200 characters 74 / 94 ms; sentiment 32 reviews x 256 tokens 64 / 80 ms, one review of 30
tokens 1.0 / 1.5 ms; horizon 32 windows of 60 days 0.88 / 2.07 ms; stock's 5-day windows the same either way. The
switch is global to the process: two threads switching it at once at worst run one call on the other kernels (the
same answers up to float rounding).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from rnnlab.bundle import Bundle


@contextlib.contextmanager
def onednn(enabled: bool):
    """torch's oneDNN CPU kernels on or off for the calls inside (``torch.backends.mkldnn.flags`` without its
    TF32 warning on machines without an Intel GPU)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def many_steps(inputs: tuple) -> bool:
    """Whether a call's first input ([B, T, ...]) holds more than one time step (where oneDNN pays)."""
    first = inputs[0] if inputs else None
    return isinstance(first, torch.Tensor) and first.dim() >= 2 and first.shape[1] > 1


class TorchModel:
    """A bundle's ``nn.Module`` for inference, each call on the faster CPU kernels for its shape (see above)."""

    runtime = "torch"

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval()
        self.device = next(module.parameters()).device

    def __call__(self, *inputs: Any) -> Any:
        with onednn(many_steps(inputs)):
            return self.module(*inputs)

    forward = __call__

    def step(self, ids: torch.Tensor, state) -> tuple[torch.Tensor, tuple]:
        with onednn(False):
            return self.module.step(ids, state)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple:
        return self.module.init_state(batch_size, device)

    def eval(self) -> TorchModel:
        return self

    def describe(self) -> dict:
        return {"runtime": self.runtime, "device": str(self.device)}


def load_model(bundle: Bundle) -> TorchModel:
    """The bundle's model for inference (see the module docstring)."""
    return TorchModel(bundle.model)
