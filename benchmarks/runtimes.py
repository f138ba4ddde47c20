"""CPU inference per runtime: torch (oneDNN on, off, and the per-shape choice rnnlab makes), ONNX Runtime fp32 and
int8, on the calls the service makes with each served job's preset model (random weights: speed does not depend
on them).

    python -m benchmarks.runtimes [--threads 1] [--repeats 5] [--json benchmarks/results/runtimes.json]

Each figure is the best of ``--repeats`` rounds of a few calls (ms per call), timed in the CPU time of the calling
thread: with one thread (the default) torch and ONNX Runtime compute there, so time spent waiting for a core on a
shared machine does not count (with more threads that clock would miss theirs, so wall time is used). int8 is
timed without its quality gate (that needs a trained model and the data: ``rnnlab export BUNDLE --int8``);
GRU/RNN bundles have no int8 (ONNX Runtime has no int8 GRU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rnnlab.bundle import INT8_FILE, load_bundle, save_bundle
from rnnlab.data.vocab import Vocab
from rnnlab.models import build_model
from rnnlab.runtime import TorchModel, onednn, open_graph, quantize, write_graph

# job -> (model config, {case: inputs maker}); the presets' `default` models
CHARLM = {"vocab_size": 80, "embed_dim": 128, "hidden_size": 512, "num_layers": 2}
SENTIMENT = {"vocab_size": 30_000, "embed_dim": 128, "hidden_size": 128, "bidirectional": True, "fc_size": 64,
             "pooling": "max_mean"}


def cases(model) -> dict[str, tuple]:
    """name -> the arguments of one call the service makes."""
    generator = torch.Generator().manual_seed(0)
    job = type(model).__name__
    if job == "CharLSTM":
        out = {}
        for batch in (1, 32, 128):
            ids = torch.randint(0, 80, (batch, 1), generator=generator)
            out[f"decode step, batch {batch}"] = (ids, model.init_state(batch))
        out["prompt of 200 characters"] = (torch.randint(0, 80, (1, 200), generator=generator), None)
        return out
    if job == "SentimentLSTM":
        return {f"{b} reviews x {t} tokens": (torch.randint(1, 30_000, (b, t), generator=generator),
                                               torch.full((b,), t)) for b, t in ((1, 60), (32, 256))}
    if job == "StockLSTM":
        return {"32 windows of 5 days": (torch.randn(32, 5, 37, generator=generator),)}
    return {"32 windows of 21 days": (torch.randn(32, 21, 26, generator=generator),)}


def best_ms(call, args, repeats: int, clock=time.thread_time) -> float:
    with torch.inference_mode():
        call(*args)  # warm-up: oneDNN builds its kernels, ORT its buffers
        calls = 1
        start = clock()
        while clock() - start < 0.05:  # calls per round: about 50 ms of work
            call(*args)
            calls += 1
        rounds = []
        for _ in range(repeats):
            start = clock()
            for _ in range(calls):
                call(*args)
            rounds.append((clock() - start) / calls)
    return 1000 * min(rounds)


def bundles(folder: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    made = {}
    for job, config, assets, settings in (
            ("charlm", CHARLM, {"vocab": Vocab([chr(32 + i) for i in range(80)]).to_json()}, {}),
            ("sentiment", SENTIMENT, {"vocab": Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(29_998)],
                                                     unk_index=1).to_json()}, {}),
            ("stock", {"num_features": 37}, {"scaler": {}, "target_scaler": {}}, {"data": {"window": 5}}),
            ("horizon", {"num_features": 26}, {"scaler": {}, "target_scaler": {}}, {"data": {"window": 21}})):
        made[job] = save_bundle(folder / job, job=job, model=build_model(job, config), assets=assets, metrics={},
                                config={"job": job, **settings}, graph=write_graph)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for job, path in bundles(Path(folder)).items():
            bundle = load_bundle(path)
            settings = quantize(path / "model.onnx", path / INT8_FILE)
            runs = {"torch (rnnlab)": TorchModel(bundle.model),
                    "onnx fp32": open_graph(bundle, path / "model.onnx", args.threads),
                    "onnx int8": open_graph(bundle, path / INT8_FILE, args.threads)}
            for case, inputs in cases(bundle.model).items():
                row = {"job": job, "case": case}
                for enabled in (True, False):
                    with onednn(enabled):
                        row[f"torch, oneDNN {'on' if enabled else 'off'}"] = best_ms(bundle.model, inputs, args.repeats,
                                                                                     clock)
                row |= {name: best_ms(model, inputs, args.repeats, clock) for name, model in runs.items()}
                rows.append(row)
                print(f"{job:9s} {case:28s} " + "  ".join(f"{k} {v:8.3f}" for k, v in row.items()
                                                          if isinstance(v, float)), flush=True)
            print(f"          int8 settings: {settings}")
    result = {"threads": args.threads, "clock": clock.__name__, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(), "ms_per_call": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
