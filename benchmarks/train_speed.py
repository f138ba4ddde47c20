"""Training throughput of rnnlab against the chapter's loops, measured in ONE run on ONE machine.

charlm (characters/s; embedding 256, LSTM 512, Adam 0.003):
  * chapter loop: one character per model call in a Python loop over the 40-character chunk, batch 64
    (benchmarks/chapter_loops.py), with the chapter's ``next(iter(DataLoader(shuffle=True)))`` sampler and with a
    cheap random-chunk sampler (the loop alone; the ratio is quoted against this, the faster, baseline);
  * rnnlab: the trainer's CharLMJob -- CharLSTM over a TBPTT window in one LSTM call, hidden state carried --
    at batch 64 x 40, and at a larger batch (``--large-batch``, ``--large-seq``).
sentiment (tokens/s; embedding 32, LSTM 50, FC 32, Adam 0.003, batch 32):
  * chapter loop: tokenize in the collate function, pad to the batch max in random order, pack;
  * rnnlab: the trainer's SentimentJob -- cached token ids, BucketBatchSampler, collate_reviews, SentimentLSTM.

The rnnlab side runs the trainer's own Job objects (batches, model, loss) under a plain optimizer step, i.e.
what ``rnnlab train`` does per step minus Accelerate's bookkeeping. The loops' optimizer steps are interleaved
(the loop with the least time so far goes next), so load on a shared machine hits all alike.

    python -m benchmarks.train_speed --quick                      # < 2 minutes on a 2-core CPU
    python -m benchmarks.train_speed --seconds 120 --json results/train_speed_cpu.json
    python -m benchmarks.train_speed --device cuda --precision fp32 bf16 fp16 --large-batch 1024 --large-seq 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import Throughput, autocast, machine_description, synchronize, write_json
from benchmarks.chapter_loops import CharChapterLoop, SentimentChapterLoop, load_raw_reviews


class JobLoop:
    """One optimizer step per call of an rnnlab trainer Job (the same batches, model and loss as ``rnnlab train``)."""

    def __init__(self, job_name: str, overrides: list[str], *, device: torch.device, precision: str,
                 mirror: str | None) -> None:
        from rnnlab.config import load_config
        from rnnlab.trainers.job import make_job

        sets = [*overrides, "tracking.wandb=false"]
        if mirror:
            sets.append(f"data.mirror={mirror}")
        self.config = load_config(job_name, "chapter", overrides=sets)
        torch.manual_seed(int(self.config["train"]["seed"]))
        self.job = make_job(self.config)
        self.job.device = device
        self.job.load_data()
        self.device, self.precision = device, precision
        self.model = self.job.build_model().to(device)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=float(self.config["train"]["lr"]))
        self.epoch = 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self):
        self.job.start_epoch(self.epoch, 0)
        return iter(self.job.batches(self.epoch, 0))

    def _next(self):
        try:
            return next(self._batches)
        except StopIteration:
            self.epoch += 1
            self._batches = self._epoch_batches()
            return next(self._batches)

    def step(self) -> int:
        batch = self._next()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.job.loss_sum(self.model, batch) / batch.global_units
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.item()  # read every step, as the chapter loops do
        return batch.tokens


def interleave(loops: dict[str, Callable[[], int]], *, device: torch.device, seconds: float,
               warmup_steps: int = 1) -> dict[str, dict[str, Any]]:
    """Time every loop for ``seconds`` of its own steps, interleaved one optimizer step at a time.

    The next step always goes to the loop with the least time so far, so load from other processes on a
    shared machine falls on all loops alike. Each step is timed alone (device synchronized around it).
    Returns per loop: units/s over all its steps (the headline) and the median of per-step units/s.
    """
    for step in loops.values():
        for _ in range(warmup_steps):  # allocator, lazy init, first-batch caches: not timed
            step()
    times: dict[str, list[float]] = {name: [] for name in loops}
    units: dict[str, list[int]] = {name: [] for name in loops}
    next_report = time.perf_counter() + 15.0
    while True:
        name = min(loops, key=lambda n: sum(times[n]))
        if sum(times[name]) >= seconds:
            break
        synchronize(device)
        start = time.perf_counter()
        units[name].append(loops[name]())
        synchronize(device)
        times[name].append(time.perf_counter() - start)
        if time.perf_counter() >= next_report:
            next_report += 15.0
            print("    " + "; ".join(f"{n.split(',')[0]}: {len(times[n])} steps {sum(times[n]):.0f} s"
                                     for n in loops), flush=True)
    out = {}
    for name in loops:
        total = Throughput(sum(units[name]), sum(times[name]), len(times[name]))
        out[name] = {**total.as_dict("units"),
                     "median_step_units_per_s": float(statistics.median(u / t for u, t in zip(units[name],
                                                                                          times[name]))),
                     "step_seconds": times[name]}
    return out


def charlm_benchmark(args, device: torch.device, precision: str) -> dict[str, Any]:
    from rnnlab.data import text
    from rnnlab.data.sources import resolve

    data = text.load_text_data(resolve("text", mirror=args.data_mirror))
    vocab_size = len(data.vocab)
    common = {"device": device, "precision": precision, "mirror": args.data_mirror}
    model_sets = ["model.embed_dim=256", "model.hidden_size=512", "model.num_layers=1", "model.dropout=0.0"]
    loops: dict[str, Callable[[], int]] = {}
    chapter_random = CharChapterLoop(data.train, vocab_size, sampler="random", device=device, precision=precision)
    loops["chapter loop (per char), b64 x 40"] = chapter_random.step
    if not args.skip_chapter_sampler:
        chapter = CharChapterLoop(data.train, vocab_size, sampler="chapter", device=device, precision=precision)
        loops["chapter loop + chapter's DataLoader sampler"] = chapter.step
    small = JobLoop("charlm", [*model_sets, "data.sampler=tbptt", "data.seq_len=40", "train.batch_size=64"],
                    **common)
    loops["rnnlab CharLMJob (TBPTT window), b64 x 40"] = small.step
    large_name = f"rnnlab CharLMJob (TBPTT window), b{args.large_batch} x {args.large_seq}"
    large = JobLoop("charlm", [*model_sets, "data.sampler=tbptt", f"data.seq_len={args.large_seq}",
                               f"train.batch_size={args.large_batch}"], **common)
    loops[large_name] = large.step
    results = interleave(loops, device=device, seconds=args.seconds)
    base = results["chapter loop (per char), b64 x 40"]
    small_res = results["rnnlab CharLMJob (TBPTT window), b64 x 40"]
    return {"unit": "characters", "loops": results,
            "ratio_b64": small_res["units_per_s"] / base["units_per_s"],
            "ratio_b64_median": small_res["median_step_units_per_s"] / base["median_step_units_per_s"],
            "ratio_large": results[large_name]["units_per_s"] / base["units_per_s"],
            "large": {"batch_size": args.large_batch, "seq_len": args.large_seq}}


def sentiment_benchmark(args, device: torch.device, precision: str) -> dict[str, Any]:
    reviews, stoi = load_raw_reviews(args.data_mirror)
    chapter = SentimentChapterLoop(reviews, stoi, device=device, precision=precision)
    rnnlab = JobLoop("sentiment", ["train.batch_size=32"], device=device, precision=precision,
                     mirror=args.data_mirror)
    loops = {"chapter loop (collate tokenizes, packed), b32": chapter.step,
             "rnnlab SentimentJob (cached ids, buckets), b32": rnnlab.step}
    results = interleave(loops, device=device, seconds=args.seconds)
    chapter_res, rnnlab_res = (results[name] for name in loops)
    return {"unit": "tokens", "loops": results,
            "ratio": rnnlab_res["units_per_s"] / chapter_res["units_per_s"],
            "ratio_median": rnnlab_res["median_step_units_per_s"] / chapter_res["median_step_units_per_s"]}


def print_summary(report: dict[str, Any]) -> None:
    print(f"\nmachine: {report['machine']}")
    print(f"settings: {report['settings']}")
    print(f"load average (1/5/15 min) at start {report['load_average_start']}, at end {report['load_average_end']}")
    for precision, jobs in report["results"].items():
        for job, res in jobs.items():
            unit = res["unit"]
            print(f"\n{job} ({precision}, {report['settings']['device']}), {unit}/s:")
            for name, r in res["loops"].items():
                print(f"  {name:<46} {r['units_per_s']:12,.0f}   (median step {r['median_step_units_per_s']:,.0f}/s; "
                      f"{r['steps']} steps, {r['seconds']:.1f} s, {1000 * r['s_per_step']:.0f} ms/step)")
            if job == "charlm":
                print(f"  ratio rnnlab / chapter loop at b64 x 40: {res['ratio_b64']:.2f}x "
                      f"(medians: {res['ratio_b64_median']:.2f}x);  "
                      f"at b{res['large']['batch_size']} x {res['large']['seq_len']}: {res['ratio_large']:.2f}x")
            else:
                print(f"  ratio rnnlab / chapter loop at b32: {res['ratio']:.2f}x (medians: {res['ratio_median']:.2f}x)")
    if len(report["results"]) > 1 and "fp32" in report["results"]:
        for precision, jobs in report["results"].items():
            if precision == "fp32":
                continue
            for job, res in jobs.items():
                for name, r in res["loops"].items():
                    base = report["results"]["fp32"][job]["loops"][name]["units_per_s"]
                    print(f"  {precision} / fp32  {job:<9} {name:<46} {r['units_per_s'] / base:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("charlm", "sentiment"), default=["charlm", "sentiment"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32"],
                        help="one or more; each is a full set of measurements (autocast, as the trainer's "
                             "mixed_precision)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="timed seconds per loop (steps of all loops interleaved)")
    parser.add_argument("--large-batch", type=int, default=256)
    parser.add_argument("--large-seq", type=int, default=100)
    parser.add_argument("--skip-chapter-sampler", action="store_true",
                        help="do not time the chapter loop with the chapter's DataLoader sampler")
    parser.add_argument("--quick", action="store_true", help="short timings, one round (< 2 minutes on 2 CPUs)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data-mirror", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.skip_chapter_sampler = 8.0, True
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")

    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine_description(device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": {},
        "load_average_start": os.getloadavg(),  # other processes on the machine: read ratios, not absolutes
    }
    for precision in args.precision:
        report["results"][precision] = {}
        for job in args.only:
            print(f"{job} ({precision}):", flush=True)
            bench = charlm_benchmark if job == "charlm" else sentiment_benchmark
            report["results"][precision][job] = bench(args, device, precision)
    report["wall_s"] = time.perf_counter() - started
    report["load_average_end"] = os.getloadavg()
    print_summary(report)
    print(f"\ntotal wall time {report['wall_s']:.0f} s")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
