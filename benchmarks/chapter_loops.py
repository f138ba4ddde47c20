"""Plain re-implementations of the chapter's training loops: the speed baseline rnnlab is measured against.

*Python Machine Learning by Example* (4th ed.), the RNN chapter, trains two of rnnlab's jobs this way:

charlm ("text generation"): a model whose ``forward(x, hidden, cell)`` embeds ONE character per sequence and runs
the LSTM on a length-1 sequence; training draws a batch of 64 random 41-character chunks with
``next(iter(seq_dl))`` (a shuffling DataLoader over every chunk of the text) and loops in Python::

    for c in range(seq_length):
        pred, hidden, cell = model(seq_batch[:, c], hidden, cell)
        loss += loss_fn(pred, target_batch[:, c])

sentiment: the DataLoader iterates raw reviews in random order; its ``collate_batch`` tokenizes each review
(regex tokenizer), maps tokens to ids, pads to the batch's longest review and the model packs the batch
(``pack_padded_sequence(..., enforce_sorted=False)``), then sigmoid + ``BCELoss``; batch 32.

Both are reproduced here at the chapter's model sizes (charlm: embedding 256, LSTM 512; sentiment: embedding 32,
LSTM 50, FC 32) with Adam(lr=0.003), and timed as training throughput (characters/s, tokens/s). Run alone::

    python -m benchmarks.chapter_loops charlm --seconds 20
    python -m benchmarks.chapter_loops sentiment --seconds 30

``benchmarks/train_speed.py`` runs them beside rnnlab's loops in one process and prints the ratios.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks._common import Throughput, autocast, machine_description, measure

# ---------------------------------------------------------------------------------------------------------
# charlm: the per-character loop


class ChapterCharRNN(nn.Module):
    """The chapter's text-generation model: one character per call, (hidden, cell) passed in and out."""

    def __init__(self, vocab_size: int, embed_dim: int = 256, rnn_hidden_size: int = 512) -> None:
        super().__init__()
        self.rnn_hidden_size = rnn_hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.LSTM(embed_dim, rnn_hidden_size, batch_first=True)
        self.fc = nn.Linear(rnn_hidden_size, vocab_size)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor):
        out = self.embedding(x).unsqueeze(1)
        out, (hidden, cell) = self.rnn(out, (hidden, cell))
        out = self.fc(out).reshape(out.size(0), -1)
        return out, hidden, cell

    def init_hidden(self, batch_size: int, device: torch.device):
        shape = (1, batch_size, self.rnn_hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)


class ChapterChunks(Dataset):
    """Every (seq_len + 1)-character chunk of the text, as the chapter's ``TextDataset`` holds them.

    The chapter materializes all chunks (``torch.tensor(text_chunks)``, ~1 GB for War and Peace); slicing views
    of the one stream gives the same items without the memory, and costs the loop nothing extra.
    """

    def __init__(self, ids: np.ndarray, seq_len: int = 40) -> None:
        self.stream = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        self.chunk = seq_len + 1

    def __len__(self) -> int:
        return len(self.stream) - self.chunk + 1

    def __getitem__(self, i: int):
        chunk = self.stream[i : i + self.chunk]
        return chunk[:-1], chunk[1:]


class CharChapterLoop:
    """One optimizer step per call of the chapter's charlm training, on ``device``.

    sampler="chapter": ``next(iter(DataLoader(shuffle=True)))`` per step, exactly as the chapter (each new
    iterator draws a permutation of all ~2.9M chunk starts). sampler="random": 64 uniformly random chunks drawn
    directly (rnnlab's ``random_chunks``-style gather) -- the same loop without the sampler overhead, so the
    comparison with rnnlab isolates the per-character Python loop.
    """

    def __init__(self, ids: np.ndarray, vocab_size: int, *, batch_size: int = 64, seq_len: int = 40,
                 embed_dim: int = 256, hidden_size: int = 512, sampler: str = "chapter",
                 device: torch.device | str = "cpu", precision: str = "fp32", seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.precision = precision
        self.batch_size, self.seq_len, self.sampler = batch_size, seq_len, sampler
        self.model = ChapterCharRNN(vocab_size, embed_dim, hidden_size).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.003)
        self.loss_fn = nn.CrossEntropyLoss()
        self.stream = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        self.loader = DataLoader(ChapterChunks(ids, seq_len), batch_size=batch_size, shuffle=True, drop_last=True)
        self.generator = torch.Generator().manual_seed(seed)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sampler == "chapter":
            seq_batch, target_batch = next(iter(self.loader))
        else:
            starts = torch.randint(0, len(self.stream) - self.seq_len, (self.batch_size,), generator=self.generator)
            chunks = self.stream[starts[:, None] + torch.arange(self.seq_len + 1)]
            seq_batch, target_batch = chunks[:, :-1], chunks[:, 1:]
        return seq_batch.to(self.device), target_batch.to(self.device)

    def step(self) -> int:
        self.model.train()
        hidden, cell = self.model.init_hidden(self.batch_size, self.device)
        seq_batch, target_batch = self._batch()
        self.optimizer.zero_grad()
        loss = 0
        with autocast(self.device, self.precision):
            for c in range(self.seq_len):
                pred, hidden, cell = self.model(seq_batch[:, c], hidden, cell)
                loss += self.loss_fn(pred, target_batch[:, c])
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.item() / self.seq_len  # the chapter reads the loss every iteration
        return self.batch_size * self.seq_len


# ---------------------------------------------------------------------------------------------------------
# sentiment: tokenize in the collate function, pad to the batch max, pack


def chapter_tokenizer(text: str) -> list[str]:
    """The chapter's tokenizer: drop HTML tags, keep emoticons, lowercase, split on non-word characters."""
    text = re.sub("<[^>]*>", "", text)
    emoticons = re.findall(r"(?::|;|=)(?:-)?(?:\)|\(|D|P)", text.lower())
    text = re.sub(r"[\W]+", " ", text.lower()) + " ".join(emoticons).replace("-", "")
    return text.split()


class ChapterSentimentRNN(nn.Module):
    """The chapter's sentiment model: embedding -> LSTM on a PackedSequence -> FC-ReLU-FC -> sigmoid."""

    def __init__(self, vocab_size: int, embed_dim: int = 32, rnn_hidden_dim: int = 50, fc_hidden_dim: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.rnn = nn.LSTM(embed_dim, rnn_hidden_dim, batch_first=True)
        self.fc1 = nn.Linear(rnn_hidden_dim, fc_hidden_dim)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(fc_hidden_dim, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, text: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = self.embedding(text)
        out = nn.utils.rnn.pack_padded_sequence(out, lengths.cpu().numpy(), enforce_sorted=False, batch_first=True)
        out, (hidden, cell) = self.rnn(out)
        out = hidden[-1, :, :]
        out = self.fc1(out)
        out = self.relu(out)
        out = self.fc2(out)
        return self.sigmoid(out)


class ChapterCollate:
    """The chapter's ``collate_batch``: tokenize, look up, pad to the longest review in the batch."""

    def __init__(self, stoi: dict[str, int], unk_index: int = 1) -> None:
        self.stoi, self.unk_index = stoi, unk_index

    def __call__(self, batch: Sequence[tuple[int, str]]):
        label_list, text_list, lengths = [], [], []
        for label, text in batch:
            label_list.append(float(label))
            processed = [self.stoi.get(token, self.unk_index) for token in chapter_tokenizer(text)]
            text_list.append(torch.tensor(processed, dtype=torch.int64))
            lengths.append(len(processed))
        padded = nn.utils.rnn.pad_sequence(text_list, batch_first=True)
        return padded, torch.tensor(label_list), torch.tensor(lengths)


class SentimentChapterLoop:
    """One optimizer step per call of the chapter's sentiment training over raw (label, text) reviews."""

    def __init__(self, reviews: Sequence[tuple[int, str]], stoi: dict[str, int], *, batch_size: int = 32,
                 device: torch.device | str = "cpu", precision: str = "fp32", seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.precision = precision
        self.model = ChapterSentimentRNN(max(stoi.values()) + 1).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.003)
        self.loss_fn = nn.BCELoss()
        generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(list(reviews), batch_size=batch_size, shuffle=True, collate_fn=ChapterCollate(stoi),
                                 generator=generator)
        self._batches = iter(self.loader)

    def _next(self):
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches)

    def step(self) -> int:
        self.model.train()
        text_batch, label_batch, lengths = self._next()
        text_batch, label_batch = text_batch.to(self.device), label_batch.to(self.device)
        self.optimizer.zero_grad()
        with autocast(self.device, self.precision):
            pred = self.model(text_batch, lengths)[:, 0]
        loss = self.loss_fn(pred.float(), label_batch)
        loss.backward()
        self.optimizer.step()
        # The chapter accumulates accuracy and loss with .item() every batch.
        self.last_accuracy = ((pred >= 0.5).float() == label_batch).float().sum().item()
        self.last_loss = loss.item()
        return int(lengths.sum())


# ---------------------------------------------------------------------------------------------------------
# running alone


def load_charlm_stream(mirror: str | None):
    from rnnlab.data import text
    from rnnlab.data.sources import resolve

    data = text.load_text_data(resolve("text", mirror=mirror))
    return data.train, len(data.vocab)


def load_raw_reviews(mirror: str | None) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """The 25k train reviews as (label, text), and a token -> id map (rnnlab's chapter vocabulary).

    The chapter builds its vocabulary from every training token with ``<pad>`` = 0 and ``<unk>`` = 1, the same
    recipe as rnnlab's ``chapter`` preset; which ids the words get does not change the loop's speed.
    """
    from rnnlab.data import imdb
    from rnnlab.data.sources import resolve

    path = resolve("imdb", mirror=mirror)
    reviews = [(r.label, r.text) for r in imdb.read_imdb(path, splits=("train",))["train"]]
    vocab = imdb.load_sentiment_data(path).vocab
    return reviews, dict(vocab.stoi)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=("charlm", "sentiment"))
    parser.add_argument("--seconds", type=float, default=20.0, help="timed wall time (after 2 warm-up steps)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps instead")
    parser.add_argument("--sampler", choices=("chapter", "random"), default="chapter", help="charlm batch sampler")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--data-mirror", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.job == "charlm":
        ids, vocab_size = load_charlm_stream(args.data_mirror)
        loop = CharChapterLoop(ids, vocab_size, sampler=args.sampler, device=device, precision=args.precision)
        unit = "characters"
    else:
        reviews, stoi = load_raw_reviews(args.data_mirror)
        loop = SentimentChapterLoop(reviews, stoi, device=device, precision=args.precision)
        unit = "tokens"
    result: Throughput = measure(loop.step, device=device, seconds=args.seconds, max_steps=args.steps)
    print(machine_description(device))
    print(f"chapter {args.job} loop ({args.precision}, {device}): {result.per_second:,.0f} {unit}/s "
          f"over {result.steps} steps in {result.seconds:.1f} s ({result.seconds / result.steps * 1000:.0f} ms/step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
