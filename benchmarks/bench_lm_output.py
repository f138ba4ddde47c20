"""The word LM's output layer on a CPU: full softmax vs tied embeddings vs adaptive softmax, in one run.

Times a training step (forward + backward + Adam) of ``WordLSTM`` on random token windows drawn with a Zipf
law like review words (so the adaptive softmax's head sees the share of tokens it would in training), and
prints tokens/s with each output's ratio to the full softmax measured in the same run.

    python -m benchmarks.bench_lm_output [--vocab 30000] [--embed 128] [--hidden 256] [--batch 32] [--bptt 64]
                                         [--steps 8] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from rnnlab.models.wordlm import OUTPUTS, WordLSTM


def zipf_tokens(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    ranks = np.arange(2, vocab)  # 0 <pad>, 1 <unk> never drawn
    weights = 1.0 / (ranks - 1.0)
    return torch.from_numpy(rng.choice(ranks, size=shape, p=weights / weights.sum()))


def tokens_per_second(output: str, args) -> float:
    torch.manual_seed(0)
    config = SimpleNamespace(vocab_size=args.vocab, embed_dim=args.embed, hidden_size=args.hidden, num_layers=1,
                             dropout=0.1, output=output, cutoffs=[2000, 10000])
    model = WordLSTM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = zipf_tokens(args.vocab, (args.steps + 1, args.batch * (args.bptt + 1)))
    times = []
    for step in range(args.steps + 1):
        window = data[step].view(args.batch, args.bptt + 1)
        started = time.perf_counter()
        hidden, _ = model(window[:, :-1])
        loss = model.loss_sum(hidden, window[:, 1:]) / window[:, 1:].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up allocators
            times.append(time.perf_counter() - started)
    return args.batch * args.bptt / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    speeds = {output: tokens_per_second(output, args) for output in OUTPUTS}
    base = speeds["softmax"]
    print(f"vocab {args.vocab}, embed {args.embed}, LSTM {args.hidden}, batch {args.batch} x {args.bptt}, "
          f"{torch.get_num_threads()} thread(s)")
    for output, speed in speeds.items():
        print(f"  {output:9s} {speed:9,.0f} tokens/s  ({speed / base:.2f}x the full softmax)")


if __name__ == "__main__":
    main()
