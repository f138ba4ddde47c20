"""Packed vs padded (exact) LSTM for SentimentLSTM on CPU, with length-bucketed batches.

pytorch#149194 reports nn.LSTM on a PackedSequence 5-110x slower than on padded input. SentimentLSTM has two
exact strategies sharing the same weights (see rnnlab/models/sentiment.py); this script times a training step
(forward + backward) and an inference forward for each on IMDb-like lengths and checks they agree.

    python -m benchmarks.bench_sentiment_packing [--batches 10] [--batch-size 32] [--threads N] [--repeats 1]

Takes about 6.5 minutes on 2 CPU cores, almost all of it the packed bidirectional training step.

Lengths are drawn log-normally like IMDb reviews' token counts (median ~175, most between 100 and 600,
clipped to 10..2,500), sorted into buckets, cut into batches of 32, and the batches shuffled -- what
BucketBatchSampler feeds the trainer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rnnlab.models.sentiment import SentimentConfig, SentimentLSTM


def bucketed_batches(num_batches: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(175), sigma=0.65, size=num_batches * batch_size * 20), 10, 2500)
    # Bucket: sort a big pool, cut batches, pick num_batches of them at random (as a bucketed epoch would).
    lengths = np.sort(lengths.astype(np.int64))
    batches = lengths.reshape(-1, batch_size)
    chosen = rng.choice(len(batches), size=num_batches, replace=False)
    out = []
    for row in batches[chosen]:
        lens = torch.from_numpy(rng.permutation(row))
        ids = torch.randint(1, 20_000, (batch_size, int(lens.max())))
        ids[torch.arange(ids.size(1)).unsqueeze(0) >= lens.unsqueeze(1)] = 0
        out.append((ids, lens))
    return out


def time_strategy(model: SentimentLSTM, strategy: str, batches, *, train: bool) -> float:
    model.length_strategy = strategy
    model.train(train)
    start = time.perf_counter()
    for ids, lengths in batches:
        if train:
            model.zero_grad(set_to_none=True)
            model(ids, lengths).sum().backward()
        else:
            with torch.inference_mode():
                model(ids, lengths)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="best of N")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = bucketed_batches(args.batches, args.batch_size)
    tokens = sum(int(lengths.sum()) for _, lengths in batches)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.batches} batches of "
          f"{args.batch_size}, {tokens:,} tokens, batch max length "
          f"{min(len(i[0]) for i, _ in batches)}..{max(len(i[0]) for i, _ in batches)}")
    configs = {
        "chapter (emb 32, LSTM 50, uni)": SentimentConfig(vocab_size=20_000),
        "bi, 2 layers (emb 64, LSTM 64)": SentimentConfig(
            vocab_size=20_000, embed_dim=64, hidden_size=64, num_layers=2, bidirectional=True
        ),
    }
    print(f"{'model':34s} {'mode':9s} {'padded s':>9s} {'packed s':>9s} {'packed/padded':>14s} {'max |diff|':>11s}")
    for name, config in configs.items():
        model = SentimentLSTM(config)
        model.eval()
        with torch.inference_mode():
            diffs = []
            for ids, lengths in batches[:3]:
                model.length_strategy = "padded"
                a = model(ids, lengths)
                model.length_strategy = "packed"
                diffs.append((a - model(ids, lengths)).abs().max().item())
        for train in (True, False):
            time_strategy(model, "padded", batches[:2], train=train)  # warm-up
            time_strategy(model, "packed", batches[:2], train=train)
            padded = min(time_strategy(model, "padded", batches, train=train) for _ in range(args.repeats))
            packed = min(time_strategy(model, "packed", batches, train=train) for _ in range(args.repeats))
            mode = "train" if train else "inference"
            print(f"{name:34s} {mode:9s} {padded:9.2f} {packed:9.2f} {packed / padded:14.2f}x {max(diffs):11.1e}")


if __name__ == "__main__":
    main()
