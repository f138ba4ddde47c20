"""StockLSTM: a window of daily feature vectors in, one number (the target day's scaled target) out.

LSTM layers over the window -> last step's output -> FC -> ReLU -> FC. The chapter's recipe is
``StockConfig()`` (16 hidden units, 2 layers, FC 16) on windows of 5 days of 37 features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rnnlab.models._config import ConfigMixin, check_dropout, check_positive_int


@dataclass
class StockConfig(ConfigMixin):
    num_features: int = 37
    hidden_size: int = 16
    num_layers: int = 2
    fc_size: int = 16
    dropout: float = 0.0  # between LSTM layers (only used when num_layers > 1)

    def __post_init__(self) -> None:
        check_positive_int(self, "num_features", "hidden_size", "num_layers", "fc_size")
        check_dropout(self)


class StockLSTM(nn.Module):
    def __init__(self, config: StockConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(
            config.num_features,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.head = nn.Sequential(
            nn.Linear(config.hidden_size, config.fc_size),
            nn.ReLU(),
            nn.Linear(config.fc_size, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: FloatTensor[B, L, F] (windows are all the same length). Returns FloatTensor[B]."""
        out, _ = self.lstm(x)
        return self.head(out[:, -1]).squeeze(-1)
