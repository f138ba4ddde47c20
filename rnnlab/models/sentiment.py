"""SentimentLSTM: a review of variable length in, one logit (positive vs negative) out.

embedding (padding index 0, optional dropout) -> stacked LSTM (optionally bidirectional, dropout between
layers) -> a review vector -> FC -> ReLU -> FC -> logit. The review vector (``pooling``) is either

* ``"last"`` (default, the chapter's): the final state at each review's TRUE end, or
* ``"max_mean"``: the element-wise max and the mean of the last layer's outputs over the review's real steps
  (pads are -inf for the max and left out of the mean). Every position contributes a gradient, not only the
  last one, which trains faster and better on long reviews. ``dropout`` then also applies to this vector.

Padding never leaks into the result: a review gives the same logit alone or padded in a batch with longer ones.
Two exact ways to get there, sharing the same weights:

* ``"padded"`` (default): run each LSTM layer on the padded batch. A forward LSTM is causal, so its output at
  position ``length - 1`` has never seen a pad; we gather it there. The backward direction must start at the
  true end, so it runs on each review reversed *within its own length* (an index gather; pads stay at the
  tail) and its output is reversed back the same way before it feeds the next layer.
* ``"packed"``: the same layers on ``PackedSequence`` inputs (the textbook way).

Both give identical logits up to float rounding. With length-bucketed batches (batch 32, IMDb lengths) the
padded path is faster on CPU -- see ``benchmarks/bench_sentiment_packing.py`` and pytorch#149194 -- so it is
the default; ``model.length_strategy = "packed"`` switches.

The LSTM stack is built one layer and one direction at a time (``layers[i][d]``, each a one-layer
``nn.LSTM``) because the exact backward trick has to run between layers; it holds exactly the parameters of
``nn.LSTM(num_layers=..., bidirectional=...)``, laid out per layer. ``model.cell`` makes the stack GRU or plain
RNN layers instead (rnnlab/models/cells.py); everything said here of "the LSTM" then holds of that cell.

``ngram_buckets > 0`` adds a linear bag of n-grams beside the LSTM (the "wide" half of wide-and-deep; on IMDb
a linear model over word bigrams beats an LSTM trained on 25,000 reviews, and the two err on different
reviews). Each distinct unigram and bigram of a review adds one learned weight, scaled by 1/sqrt(number of
distinct n-grams), to a second logit: unigrams by their id, bigrams hashed into the remaining buckets. The
model's logit is the sum of the two, the LSTM's weighted by ``lstm_weight`` (1 while training; with
``model.fit_lstm_weight`` the job then picks it on the validation split); ``forward(..., branches=True)``
returns them apart so that training can make each a classifier of its own. The answer's logit is divided by
``temperature`` (1 while training; ``model.fit_temperature`` fits it on validation so that its probabilities
are calibrated); the branches never are. The n-gram table is read with a gather
and a weighted sum (what ``nn.EmbeddingBag(mode="sum")`` with per-sample weights computes; its ONNX export is a
loop over the bags, several times slower than the whole model under ONNX Runtime).

Everything in ``forward`` (padded path) exports to one ONNX graph (rnnlab/export.py): no Python branches on
values, no in-place writes into slices.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnlab.config import Count, Number, PositiveInt, Probability
from rnnlab.models.cells import CellSettings, recurrent

LENGTH_STRATEGIES = ("padded", "packed")


class SentimentConfig(CellSettings):
    # lstm_weight and temperature are the job's to set, from the validation split after training
    # (model.fit_lstm_weight, model.fit_temperature)
    FROM_DATA: ClassVar[tuple[str, ...]] = ("vocab_size", "lstm_weight", "temperature")

    vocab_size: PositiveInt
    embed_dim: PositiveInt = 32
    hidden_size: PositiveInt = 50
    num_layers: PositiveInt = 1
    bidirectional: bool = False
    dropout: Probability = 0.0  # between LSTM layers; with pooling max_mean also on the pooled features
    fc_size: PositiveInt = 32
    pooling: Literal["last", "max_mean"] = "last"  # see the module docstring
    embed_dropout: Probability = 0.0  # on the embeddings, before the first LSTM layer
    ngram_buckets: Count = 0  # > vocab_size: a linear bag-of-n-grams logit beside the LSTM's; 0 = none
    lstm_weight: Annotated[Number, Field(ge=0, le=1)] = 1.0  # the LSTM logit's weight in its sum with the n-grams'
    temperature: Annotated[Number, Field(gt=0)] = 1.0  # the answer's logit is divided by it (calibration)

    @model_validator(mode="after")
    def _room_for_bigrams(self):
        if self.ngram_buckets and self.ngram_buckets <= self.vocab_size:
            raise ValueError(f"ngram_buckets ({self.ngram_buckets:,}) must exceed the vocabulary size "
                             f"({self.vocab_size:,}): unigrams take one bucket each, bigrams share the rest")
        return self


BIGRAM_HASH = 1_000_003  # a prime multiplier: (first * BIGRAM_HASH + second) mod the bigram buckets


def distinct_ngrams(ids: torch.Tensor, lengths: torch.Tensor, vocab_size: int, buckets: int):
    """Bucket indices of each review's unigrams and hashed bigrams, and weights that count each distinct one once,
    scaled by 1/sqrt(its number of distinct n-grams): ids[B, T] -> (indices[B, 2T-1], weights[B, 2T-1])."""
    T = ids.size(1)
    steps = torch.arange(T, device=ids.device).unsqueeze(0)
    lengths = lengths.to(ids.device).unsqueeze(1)
    bigrams = vocab_size + (ids[:, :-1] * BIGRAM_HASH + ids[:, 1:]) % (buckets - vocab_size)
    grams = torch.cat([ids, bigrams], dim=1)
    valid = torch.cat([steps < lengths, steps[:, 1:] < lengths], dim=1)  # bigram t ends at token t + 1
    grams = grams.masked_fill(~valid, -1)  # sorts first; weighted 0
    grams, _ = grams.sort(dim=1)
    first = torch.cat([torch.ones_like(grams[:, :1], dtype=torch.bool), grams[:, 1:] != grams[:, :-1]], dim=1)
    keep = (first & (grams >= 0)).float()
    weights = keep / keep.sum(dim=1, keepdim=True).clamp(min=1).sqrt()
    return grams.clamp(min=0), weights


def reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of ``x[B, T, D]`` inside its first ``lengths[b]`` steps; pads stay where they are.

    Applying it twice gives ``x`` back, so the same call also un-reverses a backward pass's outputs.
    """
    T = x.size(1)
    steps = torch.arange(T, device=x.device).unsqueeze(0)  # [1, T]
    lengths = lengths.to(x.device).unsqueeze(1)  # [B, 1]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # [B, T]
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.size(2)))


def last_valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x[b, lengths[b] - 1]`` for each b: [B, T, D] -> [B, D]."""
    index = (lengths.to(x.device) - 1).view(-1, 1, 1).expand(-1, 1, x.size(2))
    return x.gather(1, index).squeeze(1)


def masked_max_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Max and mean of ``x[b, :lengths[b]]`` over time, concatenated: [B, T, D] -> [B, 2D]. Pads never count."""
    valid = (torch.arange(x.size(1), device=x.device).unsqueeze(0) < lengths.to(x.device).unsqueeze(1))
    valid = valid.unsqueeze(-1)  # [B, T, 1]
    maximum = x.masked_fill(~valid, float("-inf")).amax(dim=1)
    mean = x.masked_fill(~valid, 0.0).sum(dim=1) / lengths.to(x.device, x.dtype).unsqueeze(1)
    return torch.cat([maximum, mean], dim=-1)


class SentimentLSTM(nn.Module):
    def __init__(self, config: SentimentConfig, *, length_strategy: str = "padded") -> None:
        super().__init__()
        self.config = config
        self.length_strategy = length_strategy
        directions = 2 if config.bidirectional else 1
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.layers = nn.ModuleList()
        for layer in range(config.num_layers):
            input_size = config.embed_dim if layer == 0 else config.hidden_size * directions
            self.layers.append(
                nn.ModuleList(recurrent(config.cell, input_size, config.hidden_size, forget_bias=config.forget_bias)
                              for _ in range(directions))
            )
        self.embed_dropout = nn.Dropout(config.embed_dropout)
        self.dropout = nn.Dropout(config.dropout)
        features = config.hidden_size * directions * (2 if config.pooling == "max_mean" else 1)
        self.head = nn.Sequential(
            nn.Linear(features, config.fc_size),
            nn.ReLU(),
            nn.Linear(config.fc_size, 1),
        )
        if config.ngram_buckets:
            self.ngrams = nn.Embedding(config.ngram_buckets, 1)  # one weight per bucket, read as a weighted bag
            nn.init.zeros_(self.ngrams.weight)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, branches: bool = False):
        """ids: LongTensor[B, T] right-padded with 0; lengths: LongTensor[B] (each >= 1). Returns logits[B], or with
        ``branches`` the LSTM's and the n-grams' logits apart (their sum is the model's)."""
        if self.length_strategy not in LENGTH_STRATEGIES:
            raise ValueError(f"length_strategy must be one of {LENGTH_STRATEGIES}, got {self.length_strategy!r}")
        if bool((lengths < 1).any()):
            raise ValueError("every sequence needs at least one token (got a length < 1)")
        x = self.embed_dropout(self.embedding(ids))
        pool_all_steps = self.config.pooling == "max_mean"
        run = self._run_padded if self.length_strategy == "padded" else self._run_packed
        for i, directions in enumerate(self.layers):
            if i > 0:
                x = self.dropout(x)
            # Forward direction in original order; backward direction in per-sequence reversed order.
            outputs = [run(directions[0], x, lengths)]
            if len(directions) == 2:
                outputs.append(run(directions[1], reverse_within_lengths(x, lengths), lengths))
            last_layer = i == len(self.layers) - 1
            if not last_layer or pool_all_steps:
                if len(outputs) == 2:
                    outputs[1] = reverse_within_lengths(outputs[1], lengths)
                x = torch.cat(outputs, dim=-1)
        if pool_all_steps:
            # x: the last layer's outputs in original order; steps at or past each length are pads.
            features = self.dropout(masked_max_mean(x, lengths))
        else:
            # Final states: the forward direction ends at length-1; the backward one (in reversed order) too,
            # i.e. after it has read the review from its last token back to its first.
            features = torch.cat([last_valid(out, lengths) for out in outputs], dim=-1)
        logits = self.head(features).squeeze(-1)
        if not self.config.ngram_buckets:
            return (logits,) if branches else logits / self.config.temperature
        indices, weights = distinct_ngrams(ids, lengths, self.config.vocab_size, self.config.ngram_buckets)
        ngram_logits = (self.ngrams(indices).squeeze(-1) * weights.to(self.ngrams.weight.dtype)).sum(dim=1)
        if branches:
            return logits, ngram_logits
        return (self.config.lstm_weight * logits + ngram_logits) / self.config.temperature

    @staticmethod
    def _run_padded(lstm: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Positions past a sequence's end see pads; nothing at or before length-1 does (the LSTM is causal).
        return lstm(x)[0]

    @staticmethod
    def _run_packed(lstm: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=x.size(1))[0]
