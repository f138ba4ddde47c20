"""CharLSTM: a character-level language model.

embedding -> LSTM layers -> dropout -> linear to the vocabulary. ``forward`` runs a whole window in one LSTM
call and carries ``(h, c)`` in and out, so truncated BPTT is "detach the state, feed the next window"; ``step``
is one decoding step for many sequences at once (each row its own sequence, its own state column).
State shapes: ``h, c: [num_layers, B, hidden_size]``. The chapter's recipe is embedding 256, LSTM 512.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rnnlab.config import ModelSettings, PositiveInt, Probability

State = tuple[torch.Tensor, torch.Tensor]


class CharConfig(ModelSettings):
    FROM_DATA: ClassVar[tuple[str, ...]] = ("vocab_size",)

    vocab_size: PositiveInt
    embed_dim: PositiveInt = 256
    hidden_size: PositiveInt = 512
    num_layers: PositiveInt = 1
    dropout: Probability = 0.0  # between LSTM layers and before the output layer


class CharLSTM(nn.Module):
    def __init__(self, config: CharConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero (h, c) for ``batch_size`` sequences (what ``state=None`` means)."""
        device = device if device is not None else self.output.weight.device
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        dtype = self.output.weight.dtype
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: LongTensor[B, T]. Returns (logits[B, T, V], (h, c)) -- the state after the last position."""
        out, state = self.lstm(self.embedding(ids), state)
        return self.output(self.dropout(out)), state

    def step(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """One decoding step: ids LongTensor[B] -> (logits[B, V], new state)."""
        logits, state = self(ids.unsqueeze(1), state)
        return logits.squeeze(1), state
