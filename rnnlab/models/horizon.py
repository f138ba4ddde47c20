"""HorizonRNN: a window of daily feature vectors in, the quantiles of the next H days' (scaled) log returns out.

An encoder (LSTM, GRU or plain RNN: ``cell``) reads the window. Two decoders (``decoder``):

- ``seq2seq``: the chapter's unsynchronised many-to-many, an encoder-decoder. A decoder RNN of the same cell starts
  from the encoder's final state and is unrolled over the H steps; its input at step h is a learned embedding of
  h beside the encoder's last output; one linear layer maps each step's output to its Q quantiles.
- ``direct``: one MLP head maps the encoder's last output to all H x Q outputs at once.

Quantiles never cross: the output at the level nearest 0.5 is the centre, and the levels above (below) it add
(subtract) cumulative softplus increments, so q_1 < q_2 < ... < q_Q for any weights and input.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from rnnlab.config import Number, PositiveInt, Probability
from rnnlab.models.cells import CellSettings, recurrent
DEFAULT_QUANTILES = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]


class HorizonConfig(CellSettings):  # model.cell (lstm | gru | rnn) and model.forget_bias, as every model
    FROM_DATA: ClassVar[tuple[str, ...]] = ("num_features",)

    num_features: PositiveInt = 26
    horizon: PositiveInt = 5  # days ahead (t+1 .. t+H)
    quantiles: list[Number] = Field(default_factory=lambda: list(DEFAULT_QUANTILES))
    decoder: Literal["seq2seq", "direct"] = "seq2seq"
    hidden_size: PositiveInt = 32
    num_layers: PositiveInt = 1
    fc_size: PositiveInt = 32  # direct head's hidden layer; seq2seq's horizon-step embedding size
    dropout: Probability = 0.0  # between RNN layers (num_layers > 1) and on the encoder's output
    # learned: the network places the median too; zero: the median is a zero log return (the random walk's) and
    # the network learns only the spread of the other quantiles around it
    median: Literal["learned", "zero"] = "learned"

    @model_validator(mode="after")
    def _increasing_levels(self):
        q = self.quantiles
        if not q or any(not 0 < t < 1 for t in q) or any(b <= a for a, b in zip(q, q[1:])):
            raise ValueError(f"model.quantiles must be increasing levels strictly between 0 and 1, not {q}.")
        return self


def _rnn(config: HorizonConfig, input_size: int) -> nn.RNNBase:
    return recurrent(config.cell, input_size, config.hidden_size, num_layers=config.num_layers,
                     dropout=config.dropout, forget_bias=config.forget_bias)


def ordered_quantiles(raw: torch.Tensor, centre: int, *, anchored: bool = False) -> torch.Tensor:
    """[..., Q] free outputs -> [..., Q] increasing: raw[centre] stays (0 when ``anchored``), the others are
    cumulative softplus steps from it."""
    base = raw[..., centre : centre + 1]
    if anchored:
        base = torch.zeros_like(base)
    up = base + torch.cumsum(F.softplus(raw[..., centre + 1 :]), dim=-1)
    down = base - torch.cumsum(F.softplus(raw[..., :centre].flip(-1)), dim=-1).flip(-1)
    return torch.cat([down, base, up], dim=-1)


class HorizonRNN(nn.Module):
    def __init__(self, config: HorizonConfig) -> None:
        super().__init__()
        self.config = config
        self.num_quantiles = len(config.quantiles)
        self.centre = min(range(self.num_quantiles), key=lambda i: abs(config.quantiles[i] - 0.5))
        self.encoder = _rnn(config, config.num_features)
        self.dropout = nn.Dropout(config.dropout)
        hidden, horizon, nq = config.hidden_size, config.horizon, self.num_quantiles
        if config.decoder == "seq2seq":
            self.step_embedding = nn.Embedding(horizon, config.fc_size)
            self.decoder = _rnn(config, config.fc_size + hidden)
            self.out = nn.Linear(hidden, nq)
        else:
            self.head = nn.Sequential(nn.Linear(hidden, config.fc_size), nn.ReLU(),
                                      nn.Linear(config.fc_size, horizon * nq))
        self._start_gaussian()

    @torch.no_grad()
    def _start_gaussian(self) -> None:
        """Start as a standard normal's quantiles for every input (the targets are scaled to unit variance): the
        output layer's bias gives them through ordered_quantiles, its weights start small."""
        from statistics import NormalDist

        z = torch.tensor([NormalDist().inv_cdf(t) for t in self.config.quantiles])
        raw = torch.empty_like(z)
        raw[self.centre] = z[self.centre]
        steps = z.diff().abs().clamp_min(1e-3)  # gaps between neighbours
        raw[self.centre + 1 :] = torch.log(torch.expm1(steps[self.centre :]))
        raw[: self.centre] = torch.log(torch.expm1(steps[: self.centre]))
        layer = self.out if self.config.decoder == "seq2seq" else self.head[-1]
        layer.weight.mul_(0.1)
        layer.bias.copy_(raw.repeat(layer.bias.numel() // len(raw)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: FloatTensor[B, L, F]. Returns FloatTensor[B, H, Q], increasing along Q (scaled log returns)."""
        out, state = self.encoder(x)
        last = self.dropout(out[:, -1])
        batch, horizon = x.shape[0], self.config.horizon
        if self.config.decoder == "seq2seq":
            steps = self.step_embedding.weight.unsqueeze(0).expand(batch, horizon, -1)
            inputs = torch.cat([steps, last.unsqueeze(1).expand(batch, horizon, -1)], dim=-1)
            decoded, _ = self.decoder(inputs, state)
            raw = self.out(decoded)
        else:
            raw = self.head(last).view(batch, horizon, self.num_quantiles)
        return ordered_quantiles(raw, self.centre, anchored=self.config.median == "zero")
