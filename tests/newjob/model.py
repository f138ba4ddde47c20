"""SentenceEndRNN: a window of characters in, one logit (the sentence ends after its last character) out.

Embedding -> recurrent layers (``model.cell``: lstm | gru | rnn, rnnlab's cells) -> the last step's output ->
a linear layer. The window is fixed-length, so there is no padding to mask.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rnnlab.config import PositiveInt, Probability
from rnnlab.models.cells import CellSettings, recurrent


class SentenceEndConfig(CellSettings):
    FROM_DATA: ClassVar[tuple[str, ...]] = ("vocab_size",)

    vocab_size: PositiveInt
    embed_dim: PositiveInt = 16
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 1
    dropout: Probability = 0.0  # between recurrent layers


class SentenceEndRNN(nn.Module):
    def __init__(self, config: SentenceEndConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.rnn = recurrent(config.cell, config.embed_dim, config.hidden_size, num_layers=config.num_layers,
                             dropout=config.dropout, forget_bias=config.forget_bias)
        self.output = nn.Linear(config.hidden_size, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, L] character ids (any integer type). Returns the logits [B]."""
        out, _ = self.rnn(self.embedding(ids.long()))
        return self.output(out[:, -1]).squeeze(-1)
