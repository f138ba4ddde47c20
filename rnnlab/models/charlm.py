"""CharLSTM: a character-level language model.

embedding -> recurrent layers (``model.cell``: LSTM by default, GRU or plain RNN; see rnnlab/models/cells.py)
-> dropout -> linear to the vocabulary. ``forward`` runs a whole window in one call and carries the state in and
out, so truncated BPTT is "detach the state, feed the next window"; ``step`` is one decoding step for many
sequences at once (each row its own sequence, its own state column). The state is a tuple whatever the cell --
LSTM ``(h, c)``, GRU/RNN ``(h,)`` -- each ``[num_layers, B, hidden_size]``. The chapter's recipe is embedding
256, LSTM 512. (The recurrent module is ``self.recurrent`` whatever the cell; bundles from before hold it as ``lstm``.)
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rnnlab.config import PositiveInt, Probability
from rnnlab.models.cells import CellSettings, State, load_renamed, recurrent, zero_state
from rnnlab.sampling import RowSampling, sample_rows


class CharConfig(CellSettings):
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
        self.recurrent = recurrent(config.cell, config.embed_dim, config.hidden_size, num_layers=config.num_layers,
                                   dropout=config.dropout, forget_bias=config.forget_bias)
        load_renamed(self, "lstm", "recurrent")
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The zero state for ``batch_size`` sequences (what ``state=None`` means): (h, c) or (h,)."""
        device = device if device is not None else self.output.weight.device
        return zero_state(self.config.cell, self.config.num_layers, batch_size, self.config.hidden_size,
                          device=device, dtype=self.output.weight.dtype)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: LongTensor[B, T]. Returns (logits[B, T, V], state) -- the state after the last position."""
        out, state = self.recurrent(self.embedding(ids), state)
        return self.output(self.dropout(out)), state

    def step(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """One decoding step: ids LongTensor[B] -> (logits[B, V], new state)."""
        logits, state = self(ids.unsqueeze(1), state)
        return logits.squeeze(1), state

    def decode(self, ids: torch.Tensor, state: State | None, settings: RowSampling,
               uniforms: torch.Tensor) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoding step and its sampling: ids[B] -> (the next ids[B], the new state, the step's logits[B, V]),
        row i sampled by its settings with the draw ``uniforms[i]`` (``rnnlab.sampling.sample_rows``)."""
        logits, state = self.step(ids, state)
        return sample_rows(logits, settings, uniforms), state, logits
