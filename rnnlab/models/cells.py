"""The recurrent cells every model can be built with: ``model.cell: lstm | gru | rnn``.

* ``lstm`` (the default): ``nn.LSTM``, four gates, state ``(h, c)``;
* ``gru``: ``nn.GRU`` (Cho et al. 2014), three gates' worth of weights, state ``(h,)``;
* ``rnn``: ``nn.RNN`` with tanh (the plain Elman RNN whose gradients vanish over long spans), state ``(h,)``.

Whatever the cell, a recurrent module here takes and returns its state as a TUPLE of tensors, each
``[num_layers * directions, B, hidden]``: the LSTM's ``(h, c)`` as ``nn.LSTM`` has it, the GRU's and the RNN's
``(h,)``. Code that carries state (truncated BPTT, the generation scheduler, sampling) therefore works on the
tuple -- ``detach_state(state)``, ``torch.cat`` per member -- and never asks which cell it holds.
``GRU`` and ``RNN`` below subclass ``nn.GRU`` / ``nn.RNN`` only to speak tuples; their parameters (and so the
names in a bundle's weights) are torch's own.

``forget_bias`` (LSTM only): the forget gate's bias starts at this value instead of torch's small uniform draw
(Jozefowicz, Zaremba & Sutskever 2015 found 1.0 closes most of the gap between the LSTM and the GRU). torch
keeps two bias vectors per layer, ``b_ih`` and ``b_hh``, each ``[i | f | g | o]``; the forget quarter of
``b_ih`` is set to the value and that of ``b_hh`` to 0, so their sum is the value.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from rnnlab.config import ModelSettings, Number

CELLS = ("lstm", "gru", "rnn")
Cell = Literal["lstm", "gru", "rnn"]
State = tuple[torch.Tensor, ...]  # (h, c) for an LSTM, (h,) for a GRU or an RNN
STATE_SIZE = {"lstm": 2, "gru": 1, "rnn": 1}  # tensors in a cell's state


class CellSettings(ModelSettings):
    """The keys every model's config shares: which cell, and the LSTM's forget-gate bias. A bundle written before
    ``cell`` existed has no such key and loads as ``lstm``, which is what it holds."""

    cell: Cell = "lstm"
    forget_bias: Number | None = None  # LSTM only: the forget gate's starting bias (None: torch's default draw)

    @model_validator(mode="after")
    def _forget_bias_is_the_lstms(self):
        if self.forget_bias is not None and self.cell != "lstm":
            raise ValueError(f"forget_bias is the LSTM's forget gate; a {self.cell} has none (leave it unset)")
        return self


class GRU(nn.GRU):
    """``nn.GRU`` with its state as the tuple ``(h,)``."""

    def forward(self, input, state: State | None = None):  # noqa: A002 -- torch's name
        out, h = super().forward(input, None if state is None else state[0])
        return out, (h,)


class RNN(nn.RNN):
    """``nn.RNN`` (tanh) with its state as the tuple ``(h,)``."""

    def forward(self, input, state: State | None = None):  # noqa: A002 -- torch's name
        out, h = super().forward(input, None if state is None else state[0])
        return out, (h,)


def recurrent(cell: str, input_size: int, hidden_size: int, *, num_layers: int = 1, dropout: float = 0.0,
              bidirectional: bool = False, forget_bias: float | None = None) -> nn.Module:
    """A batch-first recurrent module of ``cell`` whose state is a tuple (see the module docstring)."""
    kinds = {"lstm": nn.LSTM, "gru": GRU, "rnn": RNN}
    if cell not in kinds:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    module = kinds[cell](input_size, hidden_size, num_layers=num_layers, batch_first=True,
                         dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional)
    if forget_bias is not None:
        if cell != "lstm":
            raise ValueError(f"forget_bias applies to the LSTM only, not to a {cell}")
        set_forget_bias(module, forget_bias)
    return module


@torch.no_grad()
def set_forget_bias(lstm: nn.LSTM, value: float) -> None:
    """Every layer's (and direction's) forget-gate bias sums to ``value``: b_ih's forget quarter = value, b_hh's = 0."""
    h = lstm.hidden_size
    for name, bias in lstm.named_parameters():
        if name.startswith("bias_ih"):
            bias[h : 2 * h].fill_(value)
        elif name.startswith("bias_hh"):
            bias[h : 2 * h].zero_()


def zero_state(cell: str, layers: int, batch_size: int, hidden_size: int, *, device=None,
               dtype: torch.dtype | None = None) -> State:
    """The zero state of ``batch_size`` sequences: ``STATE_SIZE[cell]`` tensors of ``[layers, B, hidden]``."""
    shape = (layers, batch_size, hidden_size)
    return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(STATE_SIZE[cell]))


def load_renamed(module: nn.Module, old: str, new: str) -> None:
    """``module`` also loads state dicts written when its submodule ``new`` was called ``old`` (bundles and
    checkpoints from before the rename): their ``old.*`` keys are read as ``new.*``."""

    def rename(module, state_dict, prefix, *_):
        for key in [key for key in state_dict if key.startswith(f"{prefix}{old}.")]:
            state_dict[f"{prefix}{new}.{key[len(prefix) + len(old) + 1:]}"] = state_dict.pop(key)

    module.register_load_state_dict_pre_hook(rename)


def detach_state(state: State) -> State:
    """The same state with no gradient history (truncated BPTT)."""
    return tuple(t.detach() for t in state)
