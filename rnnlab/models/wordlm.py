"""WordLSTM: a word-level language model over reviews, laid out so a sentiment model can start from it.

embedding (the sentiment vocabulary, padding index 0) -> LSTM layers (``layers[i]``, one ``nn.LSTM`` each, the
same per-layer layout as ``SentimentLSTM``'s forward direction; ``model.cell`` makes them GRU or plain RNN layers,
rnnlab/models/cells.py) -> dropout -> an output layer over the vocabulary.
``model.init_from`` in a sentiment config copies the embedding and the LSTM layers into the classifier.

The output layer decides the cost on a CPU (the vocabulary is 30,000 words, the LSTM 256 wide):

* ``softmax``: a full linear layer and softmax -- 30,000 x 256 multiply-adds per token, most of the step;
* ``tied``: the same softmax reusing the embedding matrix as output weights (a projection to ``embed_dim``
  first when the sizes differ): fewer parameters, the same cost;
* ``adaptive`` (the default): ``nn.AdaptiveLogSoftmaxWithLoss`` (Grave et al. 2017): the frequent words
  (``cutoffs[0]``, sorted first in the vocabulary) in a small head, rarer ones in clusters of smaller dimension
  reached through the head; exact log-probabilities, a fraction of the cost. Measured in
  ``benchmarks/bench_lm_output.py``.

``forward`` returns the last layer's hidden states and the state; ``loss_sum`` turns hidden states and targets
into the summed negative log-likelihood, and ``log_probs`` into full log-distributions (for scoring/sampling).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from rnnlab.config import PositiveInt, Probability
from rnnlab.models.cells import CellSettings, recurrent

OUTPUTS = ("adaptive", "softmax", "tied")
State = list[tuple[torch.Tensor, ...]]  # per layer: (h, c) for an LSTM, (h,) for a GRU or an RNN


class WordLMConfig(CellSettings):
    FROM_DATA: ClassVar[tuple[str, ...]] = ("vocab_size",)

    vocab_size: PositiveInt
    embed_dim: PositiveInt = 128
    hidden_size: PositiveInt = 256
    num_layers: PositiveInt = 1
    dropout: Probability = 0.1  # between LSTM layers and before the output layer
    output: Literal["adaptive", "softmax", "tied"] = "adaptive"
    # adaptive: the vocabulary ids where the head ends and each tail cluster ends (ids past vocab_size dropped)
    cutoffs: Annotated[list[PositiveInt], Field(min_length=1)] = [2000, 10000]


class WordLSTM(nn.Module):
    def __init__(self, config: WordLMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        self.layers = nn.ModuleList(
            recurrent(c.cell, c.embed_dim if i == 0 else c.hidden_size, c.hidden_size, forget_bias=c.forget_bias)
            for i in range(c.num_layers)
        )
        self.dropout = nn.Dropout(c.dropout)
        if c.output == "adaptive":
            # a cutoff at or past the vocabulary's end has no words; a tiny vocabulary still gets one split
            cutoffs = [cut for cut in c.cutoffs if cut < c.vocab_size - 1] or [max(1, c.vocab_size // 2)]
            self.output = nn.AdaptiveLogSoftmaxWithLoss(c.hidden_size, c.vocab_size, cutoffs=cutoffs, div_value=4.0)
        else:
            tied = c.output == "tied"
            size = c.embed_dim if tied else c.hidden_size
            self.projection = nn.Linear(c.hidden_size, c.embed_dim) if tied and size != c.hidden_size else None
            self.output = nn.Linear(size, c.vocab_size)
            if tied:
                self.output.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: LongTensor[B, T] -> (hidden[B, T, H] of the last layer, per-layer state after the last step)."""
        x = self.embedding(ids)
        new_state = []
        for i, lstm in enumerate(self.layers):
            x, layer_state = lstm(self.dropout(x) if i else x, None if state is None else state[i])
            new_state.append(layer_state)
        return self.dropout(x), new_state

    def loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of ``targets[B, T]`` given ``hidden[B, T, H]`` (float32)."""
        hidden = hidden.reshape(-1, hidden.shape[-1]).float()
        targets = targets.reshape(-1)
        if self.config.output == "adaptive":
            return -self.output(hidden, targets).output.sum()
        return nn.functional.cross_entropy(self._logits(hidden), targets, reduction="sum")

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full log-distributions over the vocabulary, [..., H] -> [..., V]."""
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        if self.config.output == "adaptive":
            out = self.output.log_prob(flat)
        else:
            out = torch.log_softmax(self._logits(flat), dim=-1)
        return out.reshape(*hidden.shape[:-1], -1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.projection(hidden) if self.projection is not None else hidden)


def copy_into_classifier(lm: WordLSTM, classifier: nn.Module) -> list[str]:
    """Copy ``lm``'s embedding and recurrent layers (the same cell) into a ``SentimentLSTM`` (its forward direction; a backward
    direction keeps its fresh weights). Returns the names of the tensors copied. The sizes must agree: a
    mismatch is a ConfigError naming both."""
    from rnnlab.errors import ConfigError

    if lm.config.cell != classifier.config.cell:
        raise ConfigError(f"model.init_from: the language model's cell is {lm.config.cell} and this classifier's is "
                          f"{classifier.config.cell}; set model.cell={lm.config.cell} to start from it.")
    pairs = [("embedding.weight", lm.embedding.weight, classifier.embedding.weight)]
    if len(classifier.layers) != len(lm.layers):
        raise ConfigError(f"model.init_from: the language model has {len(lm.layers)} LSTM layer(s), the classifier "
                          f"{len(classifier.layers)}; set model.num_layers={len(lm.layers)}.")
    for i, (source, directions) in enumerate(zip(lm.layers, classifier.layers)):
        for name, tensor in source.named_parameters():
            pairs.append((f"layers.{i}.{name}", tensor, getattr(directions[0], name)))
    for name, source, target in pairs:
        if source.shape != target.shape:
            raise ConfigError(
                f"model.init_from: {name} is {tuple(source.shape)} in the language model but {tuple(target.shape)} "
                "in the classifier; give the classifier the language model's embed_dim and hidden_size."
            )
    with torch.no_grad():
        for _, source, target in pairs:
            target.copy_(source)
    return [name for name, _, _ in pairs]
