"""StockLSTM: a window of daily feature vectors in, one number (the target day's scaled target) out.

Recurrent layers (``model.cell``: LSTM by default, GRU or plain RNN; rnnlab/models/cells.py) over the window -> last step's output -> FC -> ReLU -> FC. The chapter's recipe is
``StockConfig()`` (16 hidden units, 2 layers, FC 16) on windows of 5 days of 37 features. The recurrent module
is ``self.recurrent`` whatever the cell (bundles from before hold it as ``lstm``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rnnlab.config import PositiveInt, Probability
from rnnlab.models.cells import CellSettings, load_renamed, recurrent


class StockConfig(CellSettings):
    FROM_DATA: ClassVar[tuple[str, ...]] = ("num_features",)

    num_features: PositiveInt = 37
    hidden_size: PositiveInt = 16
    num_layers: PositiveInt = 2
    fc_size: PositiveInt = 16
    dropout: Probability = 0.0  # between LSTM layers (only used when num_layers > 1)


class StockLSTM(nn.Module):
    def __init__(self, config: StockConfig) -> None:
        super().__init__()
        self.config = config
        self.recurrent = recurrent(config.cell, config.num_features, config.hidden_size,
                                   num_layers=config.num_layers, dropout=config.dropout, forget_bias=config.forget_bias)
        load_renamed(self, "lstm", "recurrent")
        self.head = nn.Sequential(
            nn.Linear(config.hidden_size, config.fc_size),
            nn.ReLU(),
            nn.Linear(config.fc_size, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: FloatTensor[B, L, F] (windows are all the same length). Returns FloatTensor[B]."""
        out, _ = self.recurrent(x)
        return self.head(out[:, -1]).squeeze(-1)
