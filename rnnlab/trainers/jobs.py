"""One Job per task: how to make batches, the loss and the metrics. The loop (``loop.py``) does the rest.

Sharding rule (why a 2-process run follows the 1-process loss curve): every process builds the SAME global
batch for micro-batch ``k`` of epoch ``e`` (seeded by ``(seed, e)``; no global RNG) and keeps only its share
(rows ``rank::world_size``, or the batcher's row block for charlm). A job returns the SUM of the per-unit losses
of its share and the number of units in the GLOBAL batch; the loop scales the sum by ``world_size / global_units``
so DDP's gradient average equals the gradient of the global mean loss, whatever the split. Batches are never
passed through ``accelerator.prepare`` (that would shard them a second time); evaluation shards the split the
same way and collects the pieces with ``accelerator.gather_for_metrics``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnlab.errors import ConfigError

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"loss", "mae", "mape", "bpc", "nats", "mse"}


@dataclass
class Batch:
    """This process's share of one global micro-batch."""

    inputs: tuple  # positional arguments of the model (tensors already on the right device)
    targets: torch.Tensor
    global_units: int  # loss units (samples or tokens) in the GLOBAL batch
    samples: int  # samples in this process's share
    tokens: int  # tokens (time steps) in this process's share


@dataclass
class EvalResult:
    metrics: dict[str, float]  # identical on every process
    details: dict[str, Any] = field(default_factory=dict)  # arrays for plots/tables (every process)


class Job:
    """The interface the loop relies on. Subclasses fill in the data, the model, the loss and the metrics."""

    name: str = ""
    data_name: str = ""  # rnnlab.data.sources name

    def __init__(self, config: dict, *, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.seed = int(config["train"]["seed"])
        self.batch_size = int(config["train"]["batch_size"])
        self.eval_batch_size = int(config["train"]["eval_batch_size"] or self.batch_size)
        self.device = torch.device("cpu")

    # -- data -------------------------------------------------------------------------------------------------
    def source_path(self):
        from rnnlab.data.sources import resolve

        data = self.config["data"]
        return resolve(self.data_name, data.get("source"), mirror=data.get("mirror"))

    def load_data(self) -> None:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        """Global micro-batches in one epoch."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, start: int) -> None:
        """Called before ``batches``; ``start > 0`` means resuming mid-epoch (state restored by the loop)."""

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """This process's share of micro-batches ``start, start+1, ...`` of ``epoch``."""
        raise NotImplementedError

    # -- model ------------------------------------------------------------------------------------------------
    def model_config(self) -> dict:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        from rnnlab.models import build_model

        return build_model(self.name, self.model_config())

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Sum of the per-unit losses of this process's share (float32)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, accelerator) -> EvalResult:
        raise NotImplementedError

    # -- outputs ----------------------------------------------------------------------------------------------
    def assets(self) -> dict[str, dict]:
        """JSON assets for the bundle (vocab.json, scaler.json, ...)."""
        return {}

    def report(self, model: nn.Module, test: EvalResult, output_dir, tracker) -> dict:
        """Main process, after the test: figures/tables for W&B and beside the bundle. Returns extra metrics."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-process state the checkpoint must hold beyond the model (e.g. a carried hidden state)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def has_validation(self) -> bool:
        """False when the config asks for no validation split (the loop then validates and selects nothing)."""
        return True

    def monitor(self) -> tuple[str, str]:
        name = self.config["train"]["monitor"]
        return name, ("min" if name in LOWER_IS_BETTER else "max")

    # -- helpers ----------------------------------------------------------------------------------------------
    def _share(self, indices: np.ndarray) -> np.ndarray:
        return indices[self.rank :: self.world_size]

    def _limit(self, n: int, key: str) -> np.ndarray:
        """Indices 0..n-1, or a seeded random subset of data.<key> of them (kept in order)."""
        limit = int(self.config["data"].get(key) or 0)
        if not limit or limit >= n:
            return np.arange(n)
        chosen = np.sort(np.random.default_rng(self.seed).permutation(n)[:limit])
        log.info("data.%s=%d: using %d of %d examples", key, limit, limit, n)
        return chosen


def _gather(accelerator, item: Any) -> list:
    """Objects from every process, in rank order (a list with one entry per process)."""
    return accelerator.gather_for_metrics([item], use_gather_object=True)


# ---------------------------------------------------------------------------------------------------------------
class SentimentJob(Job):
    name, data_name = "sentiment", "imdb"

    def load_data(self) -> None:
        from rnnlab.data import imdb

        data_cfg = self.config["data"]
        data = imdb.load_sentiment_data(
            self.source_path(),
            val_fraction=data_cfg["val_fraction"],
            seed=self.seed,
            min_freq=data_cfg["min_freq"],
            max_vocab=data_cfg["max_vocab"],
            max_length=data_cfg["max_length"],
        )
        self.vocab = data.vocab
        self.splits = {}
        for split in ("train", "val", "test"):
            encoded = getattr(data, split)
            keep = self._limit(len(encoded.labels), f"limit_{split}")
            ids = [np.asarray(encoded.ids[i], dtype=np.int64) for i in keep]
            labels = np.asarray(encoded.labels, dtype=np.float32)[keep]
            self.splits[split] = (ids, labels)
        self._imdb = imdb
        self._global_batches: list[list[int]] = []

    def _lengths(self, split: str) -> np.ndarray:
        return np.array([len(x) for x in self.splits[split][0]], dtype=np.int64)

    def _sampler(self):
        return self._imdb.BucketBatchSampler(
            self._lengths("train"), self.batch_size, shuffle=True, seed=self.seed,
            bucket_size_multiplier=self.config["data"]["bucket_size_multiplier"], drop_last=False,
        )  # fmt: skip

    def steps_per_epoch(self) -> int:
        return len(self._sampler())

    def start_epoch(self, epoch: int, start: int) -> None:
        sampler = self._sampler()
        sampler.set_epoch(epoch)
        # Same global batches on every process; a final batch smaller than the world cannot be split.
        self._global_batches = [list(b) for b in sampler if len(b) >= self.world_size]

    def _collate(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels = self.splits[split]
        return self._imdb.collate_reviews([(ids[i], float(labels[i])) for i in indices])

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        for global_batch in self._global_batches[start:]:
            mine = self._share(np.asarray(global_batch))
            x, lengths, y = self._collate("train", mine)
            yield Batch(
                inputs=(x.to(self.device), lengths.to(self.device)), targets=y.to(self.device).float(),
                global_units=len(global_batch), samples=len(mine), tokens=int(lengths.sum()),
            )  # fmt: skip

    def model_config(self) -> dict:
        return {**self.config["model"], "vocab_size": len(self.vocab)}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        logits = model(*batch.inputs).float()
        return F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="sum")

    @torch.no_grad()
    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        ids, labels = self.splits[split]
        order = np.argsort(self._lengths(split), kind="stable")  # similar lengths together: little padding
        mine = self._share(order)
        logits_parts = []
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = mine[start : start + self.eval_batch_size]
            x, lengths, _ = self._collate(split, chunk)
            with accelerator.autocast():
                logits_parts.append(model(x.to(self.device), lengths.to(self.device)).float().cpu().numpy())
        local_logits = np.concatenate(logits_parts) if logits_parts else np.zeros(0, np.float32)
        pieces = _gather(accelerator, (mine, local_logits))
        index = np.concatenate([p[0] for p in pieces])
        logits = np.empty(len(labels), dtype=np.float64)
        logits[index] = np.concatenate([p[1] for p in pieces])
        return EvalResult(sentiment_metrics(labels, logits), {"labels": labels, "logits": logits})

    def assets(self) -> dict[str, dict]:
        return {"vocab": self.vocab.to_json()}

    def report(self, model, test: EvalResult, output_dir, tracker) -> dict:
        labels = test.details["labels"].astype(int)
        predicted = (test.details["logits"] > 0).astype(int)
        matrix = confusion_matrix(labels, predicted)
        log.info("test confusion matrix [[TN, FP], [FN, TP]]: %s", matrix)
        if tracker is not None:
            import wandb

            tracker.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=labels.tolist(), preds=predicted.tolist(), class_names=["negative", "positive"])})
        return {"confusion_matrix": matrix}


def sentiment_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    # stable BCE-with-logits in numpy
    loss = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
    accuracy = float(np.mean((logits > 0) == (labels > 0.5)))
    metrics = {"loss": float(loss), "accuracy": accuracy}
    if 0 < labels.sum() < len(labels):
        from sklearn.metrics import roc_auc_score

        metrics["roc_auc"] = float(roc_auc_score(labels, logits))
    return metrics


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> list[list[int]]:
    return [[int(np.sum((labels == t) & (predicted == p))) for p in (0, 1)] for t in (0, 1)]


# ---------------------------------------------------------------------------------------------------------------
class StockJob(Job):
    name, data_name = "stock", "stock"

    def load_data(self) -> None:
        from rnnlab.data import stock

        d = self.config["data"]
        self.data = stock.load_stock_data(
            self.source_path(), window=d["window"], target=d["target"], train_end=d["train_end"],
            test_start=d["test_start"], test_end=d["test_end"], val_days=d["val_days"],
            scale_target=bool(d["scale_target"]),
        )  # fmt: skip
        self._stock = stock
        X, y, rows = self.data.splits["train"]
        limit = int(d.get("limit_train") or 0)
        if limit and limit < len(y):  # keep the most recent windows: the test period follows them
            log.info("data.limit_train=%d: using the last %d of %d training windows", limit, limit, len(y))
            X, y, rows = X[-limit:], y[-limit:], rows.iloc[-limit:]
        self.X = {s: torch.from_numpy(np.ascontiguousarray(self.data.splits[s][0])) for s in ("val", "test")}
        self.X["train"] = torch.from_numpy(np.ascontiguousarray(X))
        scale = self.data.target_scaler
        self.y_scaled = {
            "train": torch.from_numpy(scale.transform(y).astype(np.float32)),
            **{s: torch.from_numpy(scale.transform(self.data.splits[s][1]).astype(np.float32)) for s in ("val", "test")},
        }
        self.loss_name = self.config["train"]["loss"]
        self.huber_delta = float(self.config["train"]["huber_delta"])

    def has_validation(self) -> bool:
        return len(self.data.splits["val"][1]) > 0

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.y_scaled["train"]) / self.batch_size)

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        n = len(self.y_scaled["train"])
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        for k in range(start, self.steps_per_epoch()):
            global_batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            if len(global_batch) < self.world_size:
                continue
            mine = torch.from_numpy(self._share(global_batch))
            x = self.X["train"][mine]
            yield Batch(inputs=(x.to(self.device),), targets=self.y_scaled["train"][mine].to(self.device),
                        global_units=len(global_batch), samples=len(mine), tokens=len(mine) * x.shape[1])

    def model_config(self) -> dict:
        return {**self.config["model"], "num_features": self.data.num_features}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        return stock_loss(model(*batch.inputs).float(), batch.targets, self.loss_name, self.huber_delta)

    @torch.no_grad()
    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        X = self.X[split]
        mine = self._share(np.arange(len(X)))
        preds = []
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = torch.from_numpy(mine[start : start + self.eval_batch_size])
            with accelerator.autocast():
                preds.append(model(X[chunk].to(self.device)).float().cpu().numpy())
        local = np.concatenate(preds) if preds else np.zeros(0, np.float32)
        pieces = _gather(accelerator, (mine, local))
        scaled = np.empty(len(X), dtype=np.float64)
        scaled[np.concatenate([p[0] for p in pieces])] = np.concatenate([p[1] for p in pieces])
        _, y_raw, rows = self.data.splits[split]
        predicted_target = self.data.target_scaler.inverse_transform(scaled)
        predicted = self._stock.to_price(predicted_target, rows, self.data.target)
        actual = rows[self._stock.TARGET_COLUMN].to_numpy(dtype=np.float64)
        loss = stock_loss(torch.from_numpy(scaled), self.y_scaled[split].double(), self.loss_name, self.huber_delta)
        metrics = {"loss": float(loss) / max(1, len(scaled))}  # the training loss (train.loss), per window
        metrics.update(self._stock.regression_metrics(actual, predicted))
        for name, baseline in (("same_day_open", self._stock.naive_same_day_open),
                               ("previous_close", self._stock.naive_previous_close)):
            for key, value in self._stock.regression_metrics(actual, baseline(rows)).items():
                metrics[f"baseline_{name}_{key}"] = value
        return EvalResult(metrics, {"dates": rows.index, "actual": actual, "predicted": predicted,
                                    "open": self._stock.naive_same_day_open(rows)})

    def assets(self) -> dict[str, dict]:
        return {"scaler": self.data.scaler.to_json(), "target_scaler": self.data.target_scaler.to_json()}

    def report(self, model, test: EvalResult, output_dir, tracker) -> dict:
        path = plot_predictions(test.details, output_dir / "predicted_vs_actual.png")
        if tracker is not None:
            import wandb

            tracker.log({"test/predicted_vs_actual": wandb.Image(str(path))})
        return {}


def stock_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_delta: float = 1.0) -> torch.Tensor:
    """SUM of the per-window losses on the scaled target: ``mse``, ``l1`` (fits the conditional median, which
    minimises the MAE the job is scored on) or ``huber`` (quadratic within ``huber_delta``, linear beyond)."""
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="sum")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="sum", delta=huber_delta)
    raise ConfigError(f"train.loss is {kind!r}; choose one of mse, l1, huber.")


def stock_table(val: dict, test: dict) -> str:
    """R^2 / MAE / MAPE of the model beside both naive baselines, for validation and test, as one table."""
    lines = [f"{'':28s}{'val R2':>9s}{'val MAE':>10s}{'val MAPE':>10s}{'test R2':>9s}{'test MAE':>10s}{'test MAPE':>10s}"]
    for label, prefix in (("model", ""), ("close = same-day open", "baseline_same_day_open_"),
                          ("close = previous close", "baseline_previous_close_")):
        cells = []
        for m in (val, test):
            cells += [f"{m.get(prefix + 'r2', float('nan')):9.4f}", f"{m.get(prefix + 'mae', float('nan')):10.2f}",
                      f"{100 * m.get(prefix + 'mape', float('nan')):9.2f}%"]
        lines.append(f"{label:28s}" + "".join(cells))
    return "\n".join(lines)


def plot_predictions(details: dict, path) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(details["dates"], details["actual"], label="actual close", color="black", linewidth=1.5)
    ax.plot(details["dates"], details["predicted"], label="predicted close", color="tab:blue", linewidth=1.2)
    ax.plot(details["dates"], details["open"], label="close = open (baseline)", color="tab:gray",
            linewidth=0.8, linestyle="--")
    ax.set_title("Test split: predicted vs actual close")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
class CharLMJob(Job):
    """Truncated BPTT over contiguous rows (hidden state carried, detached), or the chapter's random chunks."""

    name, data_name = "charlm", "text"

    def load_data(self) -> None:
        from rnnlab.data import text

        d = self.config["data"]
        data = text.load_text_data(self.source_path(), lowercase=d["lowercase"], fractions=d["fractions"])
        self.vocab = data.vocab
        self.streams = {}
        for split in ("train", "val", "test"):
            stream = getattr(data, split)
            limit = int(d.get(f"limit_{split}") or 0)
            if limit and limit < len(stream):  # a contiguous prefix: the text's order is the data
                log.info("data.limit_%s=%d: using the first %d of %d characters", split, limit, limit, len(stream))
                stream = stream[:limit]
            self.streams[split] = np.ascontiguousarray(stream, dtype=np.int64)
        self._text = text
        self.seq_len = int(d["seq_len"])
        self.sampler = d["sampler"]
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of the number of processes "
                f"({self.world_size}) for charlm."
            )
        self.batcher = text.TBPTTBatcher(self.streams["train"], self.batch_size, self.seq_len,
                                         rank=self.rank, world_size=self.world_size)
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sample_params(0)  # a bad tracking.sample_* setting is refused now, not after training

    def steps_per_epoch(self) -> int:
        # random_chunks: an "epoch" is as many random batches as one contiguous pass has windows
        return len(self.batcher)

    def start_epoch(self, epoch: int, start: int) -> None:
        if start == 0:
            self.carry = None  # each epoch starts every row from a zero state

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        local = self.batch_size // self.world_size
        rows = slice(self.rank * local, (self.rank + 1) * local)
        for k in range(start, self.steps_per_epoch()):
            if self.sampler == "tbptt":
                x, y = self.batcher.window(k)
            else:
                # Stateless per batch: the generator is seeded by (seed, epoch, k), so resuming needs no RNG state.
                generator = torch.Generator().manual_seed(hash_seed(self.seed, epoch, k))
                x, y = self._text.random_chunks(self.streams["train"], self.batch_size, self.seq_len,
                                                generator=generator)
                x, y = x[rows], y[rows]
            yield Batch(inputs=(x.to(self.device),), targets=y.to(self.device),
                        global_units=self.batch_size * x.shape[1], samples=x.shape[0], tokens=x.numel())

    def model_config(self) -> dict:
        return {**self.config["model"], "vocab_size": len(self.vocab)}

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        state = self.carry if self.sampler == "tbptt" else None
        logits, new_state = model(*batch.inputs, state)
        if self.sampler == "tbptt":
            # Truncated BPTT: the next window starts from this state, but gradients stop here.
            self.carry = (new_state[0].detach(), new_state[1].detach())
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.targets.reshape(-1),
                               reduction="sum")

    @torch.no_grad()
    def evaluate(self, model, split: str, accelerator) -> EvalResult:
        # Contiguous rows, state carried, every character scored once (drop_last=False).
        stream = self.streams[split]
        rows = max(self.world_size, (min(self.eval_batch_size, max(1, (len(stream) - 1) // self.seq_len))
                                     // self.world_size) * self.world_size)
        batcher = self._text.TBPTTBatcher(stream, rows, self.seq_len, rank=self.rank,
                                          world_size=self.world_size, drop_last=False)
        state = None
        total, count = 0.0, 0
        for x, y in batcher:
            with accelerator.autocast():
                logits, state = model(x.to(self.device), state)
            total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                           y.to(self.device).reshape(-1), reduction="sum"))
            count += y.numel()
        pieces = _gather(accelerator, (total, count))
        nats = sum(p[0] for p in pieces) / max(1, sum(p[1] for p in pieces))
        return EvalResult({"loss": nats, "bpc": nats / math.log(2), "perplexity": math.exp(nats)})

    def assets(self) -> dict[str, dict]:
        return {"vocab": self.vocab.to_json()}

    def sample(self, model, prompt: str, params) -> str:
        """A sample for the run's table, drawn as ``rnnlab generate`` draws (the same SamplingParams and sampler),
        from the params' own seed (never the global RNG: resume stays exact)."""
        from rnnlab.sampling import sample_next

        prompt = prompt.lower() if self.config["data"]["lowercase"] else prompt
        known = "".join(ch for ch in prompt if ch in self.vocab.stoi) or self.vocab.itos[0]
        device = next(model.parameters()).device
        ids = torch.tensor([self.vocab.stoi[ch] for ch in known], device=device).unsqueeze(0)
        uniforms = torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(params.seed))
        with torch.no_grad():
            logits, state = model(ids, None)
            logits = logits[:, -1]
            out = []
            for step in range(params.max_new_tokens):
                nxt = sample_next(logits, params.temperature, params.top_k, params.top_p,
                                  uniforms=uniforms[step : step + 1])
                out.append(int(nxt))
                logits, state = model.step(nxt, state)
        return known + "".join(self.vocab.decode(out))

    def sample_params(self, seed: int):
        """The tracking.sample_* settings as SamplingParams (ConfigError naming the key if one is out of range)."""
        from rnnlab.errors import InputError
        from rnnlab.sampling import sampling_params

        t = self.config["tracking"]
        try:
            return sampling_params(max_new_tokens=t["sample_length"], temperature=t["sample_temperature"], seed=seed)
        except InputError as error:
            raise ConfigError(f"tracking.sample_length / sample_temperature: {error}") from None

    def report(self, model, test: EvalResult, output_dir, tracker) -> dict:
        t = self.config["tracking"]
        samples = [self.sample(model, t["sample_prompt"], self.sample_params(seed)) for seed in range(3)]
        (output_dir / "samples.txt").write_text("\n\n---\n\n".join(samples) + "\n", encoding="utf-8")
        if tracker is not None:
            import wandb

            table = wandb.Table(columns=["seed", "prompt", "temperature", "text"])
            for seed, sample in enumerate(samples):
                table.add_data(seed, t["sample_prompt"], t["sample_temperature"], sample)
            tracker.log({"samples": table})
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.carry is None:
            return {}
        return {"carry_h": self.carry[0].detach().cpu().contiguous(), "carry_c": self.carry[1].detach().cpu().contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.carry = (state["carry_h"].to(self.device), state["carry_c"].to(self.device)) if state else None


def hash_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (Python's hash() of ints is not mixed enough)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


JOBS: dict[str, type[Job]] = {"sentiment": SentimentJob, "stock": StockJob, "charlm": CharLMJob}


def make_job(config: dict, *, rank: int = 0, world_size: int = 1) -> Job:
    job = config.get("job")
    if job not in JOBS:
        raise ConfigError(f"Unknown job {job!r}; choose one of {', '.join(JOBS)}.")
    return JOBS[job](config, rank=rank, world_size=world_size)
