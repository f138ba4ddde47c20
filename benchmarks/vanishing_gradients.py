"""Vanishing gradients, shown: how much the loss at the END of a review still depends on each earlier word.

For each cell (LSTM, GRU, plain tanh RNN, and the LSTM with ``model.forget_bias=1``) of rnnlab's sentiment model (embedding 32, one layer of 64, the
chapter's "last state" pooling: the classifier sees only the state after the review's last word), on real IMDb
reviews from the data mirror, cut to their last ``--length`` tokens (only reviews at least that long, so every
position is a real word): the norm of the gradient of the loss with respect to the input embedding at each time
step, averaged over the reviews, plotted against the distance from the output (0 = the last word). Twice:

* untrained (fresh weights), and
* after ``--train-steps`` Adam steps on other training reviews (about a minute per cell on one CPU thread).

A curve that falls by orders of magnitude within a few dozen steps is a gradient that vanishes: the plain RNN's
does; the gates of the LSTM and the GRU carry it much further. Each curve is divided by its value at distance 0
(the scale differs between models; the slope is the point); the raw norms are in the JSON. A curve that ends
in a vertical drop has reached float32's smallest numbers: the gradient there is exactly 0.

Writes docs/vanishing_gradients.png, benchmarks/results/vanishing_gradients.json and logs the same figure and
curves to W&B (offline unless WANDB_API_KEY is set; ``--no-wandb`` skips it).

    OMP_NUM_THREADS=1 python -m benchmarks.vanishing_gradients                # ~3-5 minutes on a 2-core CPU
    OMP_NUM_THREADS=1 python -m benchmarks.vanishing_gradients --train-steps 0 --reviews 64   # untrained, seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import machine_description

ROOT = Path(__file__).resolve().parents[1]
# name -> model keys: the three cells, and the LSTM with its forget gate's bias at 1 (model.forget_bias)
VARIANTS = {"lstm": {"cell": "lstm"}, "lstm_fb1": {"cell": "lstm", "forget_bias": 1.0}, "gru": {"cell": "gru"},
            "rnn": {"cell": "rnn"}}
LABELS = {"lstm": "LSTM", "lstm_fb1": "LSTM, forget bias 1", "gru": "GRU", "rnn": "RNN (tanh)"}
COLOURS = {"lstm": "tab:blue", "lstm_fb1": "tab:cyan", "gru": "tab:green", "rnn": "tab:red"}


def load_reviews(mirror: str | None, length: int, max_vocab: int):
    """(train ids [N, length], train labels [N], probe ids [M, length], probe labels [M]) as tensors: training
    reviews of at least ``length`` tokens cut to their last ``length``; the probe reviews are the validation
    split's (never trained on)."""
    from rnnlab.data.imdb import load_sentiment_data
    from rnnlab.data.sources import resolve

    data = load_sentiment_data(resolve("imdb", mirror=mirror), max_vocab=max_vocab, max_length=length)

    def full_length(split):
        keep = [i for i, ids in enumerate(split.ids) if len(ids) == length]
        ids = torch.tensor(np.stack([split.ids[i] for i in keep]).astype(np.int64))
        return ids, torch.tensor(split.labels[keep])

    train_ids, train_labels = full_length(data.train)
    probe_ids, probe_labels = full_length(data.val)
    order = torch.randperm(len(probe_ids), generator=torch.Generator().manual_seed(0))  # both labels, mixed
    return train_ids, train_labels, probe_ids[order], probe_labels[order], len(data.vocab)


def gradient_by_distance(model, ids: torch.Tensor, labels: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Mean over reviews of ||d loss / d embedding_t||, indexed by distance from the last step (0 = last)."""
    captured = {}

    def keep_grad(_module, _inputs, output):
        output.retain_grad()
        captured["embedded"] = output

    handle = model.embedding.register_forward_hook(keep_grad)
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    total = torch.zeros(ids.size(1), dtype=torch.float64)
    try:
        for start in range(0, len(ids), batch):
            x, y = ids[start : start + batch], labels[start : start + batch]
            model.zero_grad(set_to_none=True)
            lengths = torch.full((len(x),), x.size(1), dtype=torch.long)
            loss = F.binary_cross_entropy_with_logits(model(x, lengths), y, reduction="sum")
            loss.backward()
            total += captured["embedded"].grad.norm(dim=-1).double().sum(0)  # [T]
    finally:
        handle.remove()
        model.train(was_training)
    return (total / len(ids)).flip(0).numpy()  # index = distance from the output


def train_briefly(model, ids: torch.Tensor, labels: torch.Tensor, steps: int, *, batch: int = 32,
                  lr: float = 0.003, seed: int = 0) -> list[float]:
    """``steps`` Adam steps on random batches (gradient clipped at 1, as the job does); returns the losses."""
    if steps <= 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    lengths = torch.full((batch,), ids.size(1), dtype=torch.long)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(ids), (batch,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(ids[rows], lengths), labels[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    lengths = torch.full((len(ids),), ids.size(1), dtype=torch.long)
    return float(((model(ids, lengths) > 0).float() == labels).float().mean())


def plot(curves: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(next(iter(curves.values())))
    fig, axes = plt.subplots(1, len(stages), figsize=(6.5 * len(stages), 4.8), sharey=True, squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for cell, by_stage in curves.items():
            norms = np.asarray(by_stage[stage]["grad_norm"])
            ax.semilogy(np.arange(len(norms)), norms / norms[0], label=LABELS[cell], color=COLOURS[cell])
        ax.set_title(stage_title(curves, stage), fontsize=10)
        ax.set_xlabel("distance from the output (time steps before the last word)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("||dL / d embedding_t||, relative to the last step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


def stage_title(curves: dict, stage: str) -> str:
    if stage == "untrained":
        return "untrained"
    accs = ", ".join(f"{LABELS[cell]} {by[stage]['val_accuracy']:.0%}" for cell, by in curves.items())
    steps = next(iter(curves.values()))[stage]["steps"]
    return f"after {steps} training steps\n(probe accuracy: {accs})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=200, help="tokens per review (its last ones)")
    parser.add_argument("--reviews", type=int, default=128, help="validation reviews the gradients are averaged over")
    parser.add_argument("--train-steps", type=int, default=150, help="Adam steps (batch 32) per cell; 0: untrained only")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--max-vocab", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-mirror", default=None, help="folder with aclImdb_v1.tar.gz (else RNNLAB_DATA_MIRROR)")
    parser.add_argument("--png", default=str(ROOT / "docs" / "vanishing_gradients.png"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vanishing_gradients.json"))
    parser.add_argument("--no-wandb", action="store_true")
    args = parser.parse_args()

    from rnnlab.models import build_model

    started = time.perf_counter()
    train_ids, train_labels, probe_ids, probe_labels, vocab_size = load_reviews(args.data_mirror, args.length,
                                                                                 args.max_vocab)
    probe_ids, probe_labels = probe_ids[: args.reviews], probe_labels[: args.reviews]
    print(f"{len(train_ids)} training and {len(probe_ids)} probe reviews of {args.length} tokens "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    curves: dict[str, dict] = {}
    for cell, keys in VARIANTS.items():
        torch.manual_seed(args.seed)
        model = build_model("sentiment", {"vocab_size": vocab_size, "embed_dim": args.embed_dim,
                                          "hidden_size": args.hidden_size, "fc_size": 32, "pooling": "last", **keys})
        curves[cell] = {"untrained": {"grad_norm": gradient_by_distance(model, probe_ids, probe_labels).tolist(),
                                      "val_accuracy": accuracy(model, probe_ids, probe_labels), "steps": 0}}
        if args.train_steps:
            t0 = time.perf_counter()
            losses = train_briefly(model, train_ids, train_labels, args.train_steps, seed=args.seed)
            curves[cell]["trained"] = {
                "grad_norm": gradient_by_distance(model, probe_ids, probe_labels).tolist(),
                "val_accuracy": accuracy(model, probe_ids, probe_labels), "steps": args.train_steps,
                "train_s": time.perf_counter() - t0,
                "loss_first_10": float(np.mean(losses[:10])), "loss_last_10": float(np.mean(losses[-10:])),
            }
        for stage, figures in curves[cell].items():
            g = np.asarray(figures["grad_norm"])
            print(f"{cell} {stage}: val accuracy {figures['val_accuracy']:.3f}; gradient at distance 50 / 100 / "
                  f"{len(g) - 1} = {g[50] / g[0]:.2e} / {g[100] / g[0]:.2e} / {g[-1] / g[0]:.2e} of the last step's",
                  flush=True)
    title = (f"Gradient of the loss w.r.t. each input word, IMDb reviews of {args.length} tokens "
             f"({len(probe_ids)} validation reviews), embedding {args.embed_dim}, hidden {args.hidden_size}")
    fig = plot(curves, Path(args.png), title)
    result = {"machine": machine_description(), "threads": torch.get_num_threads(), "args": vars(args),
              "wall_s": time.perf_counter() - started, "curves": curves}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.png} and {args.json} in {result['wall_s']:.0f} s", flush=True)
    if not args.no_wandb:
        log_to_wandb(curves, fig, args)


def log_to_wandb(curves: dict, fig, args) -> None:
    """The same figure, and the curves as a line series per stage, to one W&B run (offline without a key)."""
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = "online" if os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "offline" else "offline"
    run = wandb.init(project="rnnlab", job_type="vanishing-gradients", config=vars(args), mode=mode,
                     dir=str(ROOT / "runs"))
    payload = {"vanishing_gradients": wandb.Image(fig)}
    for stage in next(iter(curves.values())):
        xs = list(range(len(curves["lstm"][stage]["grad_norm"])))
        ys = [list(np.asarray(c[stage]["grad_norm"]) / c[stage]["grad_norm"][0]) for c in curves.values()]
        payload[f"grad_norm_by_distance/{stage}"] = wandb.plot.line_series(
            xs=xs, ys=ys, keys=[LABELS[cell] for cell in curves], title=f"relative gradient norm ({stage})",
            xname="distance from the output")
    run.log(payload)
    run.finish()
    print(f"W&B run {run.id} ({mode}) under {ROOT / 'runs'}", flush=True)


if __name__ == "__main__":
    main()
