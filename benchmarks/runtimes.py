"""CPU inference per runtime: torch (oneDNN on, off, and the per-shape choice rnnlab makes), ONNX Runtime fp32 and
int8, on the calls the service makes with each served job's preset model (random weights: speed does not depend
on them), and for charlm a decoding step with its sampling (``model.decode``, as the scheduler calls it).

    python -m benchmarks.runtimes [--threads 1] [--repeats 5] [--json benchmarks/results/runtimes.json]
    python -m benchmarks.runtimes --served [--preset default] [--seconds 20]   # through the service instead

Each figure is the best of ``--repeats`` rounds of a few calls (ms per call), timed in the CPU time of the calling
thread: with one thread (the default) torch and ONNX Runtime compute there, so time spent waiting for a core on a
shared machine does not count (with more threads that clock would miss theirs, so wall time is used). int8 is
timed without its quality gate (that needs a trained model and the data: ``rnnlab export BUNDLE --int8``);
GRU/RNN bundles have no int8 (ONNX Runtime has no int8 GRU). Beside each LSTM call: its GFLOP/s and the share of
this CPU's single-thread sgemm peak (a 1024^3 matrix product) measured in the same run.

``--served``: the same runtimes through the service (rnnlab serve's in-process twin, direct ingress): charlm and
sentiment bundles of ``--preset``'s sizes with random weights, each served as torch, ONNX Runtime fp32 and int8
(the int8 graph written by ``rnnlab export --int8``'s code, its quality gate on the job's validation split
included: a refused one is reported, not served); per runtime, generation characters/s with 32 clients asking
400 characters, beside that runtime's own one-thread decode loop at batch 32 measured just before and just after
(served/own-loop), and sentiment requests/s with 32 clients sending one real review each; the runtimes take turns
``--rounds`` times and each round's ratios to torch are reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import write_json
from rnnlab.bundle import INT8_FILE, load_bundle, save_bundle
from rnnlab.data.vocab import Vocab
from rnnlab.models import build_model
from rnnlab.export import quantize, write_graph
from rnnlab.runtime import TorchModel, onednn, open_graph

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
        for batch in (1, 32, 256):
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


def lstm_gflop(model, case: tuple) -> float | None:
    """Floating-point work of one call of an LSTM model on ``case`` (multiply-adds x 2: the gates' and the output
    layer's matrix products; elementwise work left out), in GFLOP; None for other models."""
    config = model.config
    if type(model).__name__ not in ("CharLSTM", "SentimentLSTM") or config.cell != "lstm":
        return None
    ids = case[0]
    batch, steps = ids.shape
    directions = 2 if getattr(config, "bidirectional", False) else 1
    macs, inputs = 0, config.embed_dim
    for _ in range(config.num_layers):
        macs += directions * 4 * config.hidden_size * (inputs + config.hidden_size)
        inputs = directions * config.hidden_size
    per_step = macs * batch * steps
    if type(model).__name__ == "CharLSTM":  # logits for every position
        per_step += config.hidden_size * config.vocab_size * batch * steps
    return 2 * per_step / 1e9


def sgemm_peak(repeats: int, clock) -> float:
    """GFLOP/s of this CPU's float32 matrix product on torch's threads: a 1024 x 1024 by 1024 x 1024 product."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / 1e9 / (best_ms(torch.mm, (a, b), repeats, clock) / 1000)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--served", action="store_true", help="through the service instead (see above)")
    parser.add_argument("--preset", default="default", help="--served: the preset whose model sizes the bundles have")
    parser.add_argument("--seconds", type=float, default=20.0, help="--served: seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="--served: the runtimes take turns this many times")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--port", type=int, default=8013)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = served(args) if args.served else per_call(args)
    result |= {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "load_average_after": os.getloadavg()}
    if args.json:
        write_json(args.json, result)
    return 0


def per_call(args) -> dict:
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    peak = sgemm_peak(args.repeats, clock)
    print(f"sgemm peak: {peak:.1f} GFLOP/s on {args.threads} thread(s)", flush=True)
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
                work = lstm_gflop(bundle.model, inputs)
                if work is not None:
                    row["gflop_per_s"] = {name: work / (ms / 1000) for name, ms in row.items() if isinstance(ms, float)}
                    row["share_of_sgemm_peak"] = {name: rate / peak for name, rate in row["gflop_per_s"].items()}
                rows.append(row)
                print(f"{job:9s} {case:28s} " + "  ".join(f"{k} {v:8.3f}" for k, v in row.items()
                                                          if isinstance(v, float)), flush=True)
                if work is not None:
                    print(" " * 38 + "GFLOP/s " + "  ".join(f"{k} {v:5.1f} ({row['share_of_sgemm_peak'][k]:.0%})"
                                                           for k, v in row["gflop_per_s"].items()), flush=True)
            if job == "charlm":
                for batch in (1, 32, 256):
                    rows.append(decode_row(runs, batch, args.repeats, clock))
                    print(f"{job:9s} {rows[-1]['case']:28s} " + "  ".join(
                        f"{k} {v:8.3f}" for k, v in rows[-1].items() if isinstance(v, float)), flush=True)
            print(f"          int8 settings: {settings}")
    return {"threads": args.threads, "clock": clock.__name__, "sgemm_peak_gflop_per_s": peak, "ms_per_call": rows}


def decode_row(runs: dict, batch: int, repeats: int, clock) -> dict:
    """ms per ``model.decode`` call: a decoding step and its sampling at temperature 0.8, what the generation
    scheduler calls per step (torch: the step, then ``sample_rows``; ONNX Runtime: one call of the sampling graph)."""
    from rnnlab.sampling import per_row_params, sampling_params

    generator = torch.Generator().manual_seed(0)
    ids, uniforms = torch.randint(0, 80, (batch,), generator=generator), torch.rand(batch, generator=generator)
    settings = per_row_params([sampling_params(temperature=0.8)] * batch)
    row = {"job": "charlm", "case": f"step + sampling, batch {batch}"}
    for name, model in runs.items():
        row[name] = best_ms(model.decode, (ids, model.init_state(batch), settings, uniforms), repeats, clock)
    return row


# ------------------------------------------------------------------------------------------------ --served
SERVED_JOBS = ("charlm", "sentiment")
VARIANTS = {"torch": ("fp32", "torch"), "onnx fp32": ("fp32", "onnx"), "onnx int8": ("int8", "onnx")}


def variant_folders(scratch: Path, preset: str) -> dict[str, dict]:
    """Random-weight bundles of ``preset``'s sizes, exported twice: with the fp32 graph (served as torch and as
    onnx) and with the int8 one behind its gate. Returns {"fp32"|"int8": {"folder", "gate"}}."""
    from benchmarks._harness import random_bundles
    from rnnlab.export import export_bundle

    source = random_bundles(scratch / "fp32", preset, jobs=SERVED_JOBS)
    shutil.copytree(source, scratch / "int8")
    gates = {}
    for job in SERVED_JOBS:
        export_bundle(source / job)
        started = time.perf_counter()
        graph = export_bundle(scratch / "int8" / job, int8=True).graph
        gates[job] = graph["int8"] | {"seconds": round(time.perf_counter() - started, 1)}
        print(f"int8 gate, {job}: " + ("passed" if gates[job]["passed"] else f"refused ({gates[job]['failed']})")
              + f" {gates[job]}", flush=True)
    return {"fp32": {"folder": source, "gate": None}, "int8": {"folder": scratch / "int8", "gate": gates}}


def served(args) -> dict:
    import asyncio

    import ray

    from benchmarks._harness import deploy, imdb_reviews
    from benchmarks.serve_load import decode_ceiling, run_clients
    from rnnlab.serve.local import in_process

    reviews = imdb_reviews()
    generate = lambda rng: {"prompt": "the emperor", "max_new_tokens": args.max_new_tokens,  # noqa: E731
                            "temperature": 0.8, "seed": rng.randrange(2**31)}
    classify = lambda rng: {"texts": [rng.choice(reviews)]}  # noqa: E731
    out = {"preset": args.preset, "clients": args.clients, "max_new_tokens": args.max_new_tokens, "rounds": []}
    with tempfile.TemporaryDirectory() as scratch:
        folders = variant_folders(Path(scratch), args.preset)
        out["int8_gate"] = folders["int8"]["gate"]
        with in_process(args.port, direct=True) as base:
            # the ceiling runs in a Ray worker, as the replica does (Ray starts its workers at nice 15)
            ceiling = ray.remote(num_cpus=0)(decode_ceiling)
            # the runtimes take turns, --rounds times: load from other work comes and goes, and ratios are taken
            # within each round
            for number in range(1, args.rounds + 1):
                rows = {}
                for name, (graphs, runtime) in VARIANTS.items():
                    folder = folders[graphs]["folder"]
                    usable = {job: folders[graphs]["gate"] is None or folders[graphs]["gate"][job]["passed"]
                              for job in SERVED_JOBS}
                    # the service's own batching (generation admits up to 128 sequences: all the clients)
                    deploy(folder, runtime=runtime, max_streams=args.clients,
                           max_ongoing_requests=2 * args.clients, max_queued_requests=2 * args.clients)
                    row = rows[name] = {"load_average": os.getloadavg()[0]}
                    if usable["charlm"]:
                        # the own loop just before and just after the served phase: the host's speed drifts
                        before = ray.get(ceiling.remote(folder, args.clients, args.seconds / 2, runtime))
                        row["generate"] = asyncio.run(run_clients(f"{base}/v1/charlm", generate, clients=args.clients,
                                                                  seconds=args.seconds, count_chars=True))
                        after = ray.get(ceiling.remote(folder, args.clients, args.seconds / 2, runtime))
                        row["own_loop_before_after"] = [before["chars_per_s"], after["chars_per_s"]]
                        row["own_loop_chars_per_s"] = (before["chars_per_s"] + after["chars_per_s"]) / 2
                        row["served_over_own_loop"] = row["generate"]["chars_per_s"] / row["own_loop_chars_per_s"]
                    if usable["sentiment"]:
                        row["sentiment"] = asyncio.run(run_clients(f"{base}/v1/sentiment", classify,
                                                                   clients=args.clients, seconds=args.seconds))
                    print(f"[round {number}, {name:9s}] " + "; ".join(
                        _served_line(part, row) for part in ("generate", "sentiment") if part in row), flush=True)
                out["rounds"].append(against_torch(rows))
    return out


def against_torch(rows: dict) -> dict:
    """Each runtime's served rates as a ratio to torch's of the same round."""
    baseline = rows["torch"]
    for row in rows.values():
        if "generate" in row and "generate" in baseline:
            row["generate_vs_torch"] = row["generate"]["chars_per_s"] / baseline["generate"]["chars_per_s"]
        if "sentiment" in row and "sentiment" in baseline:
            row["sentiment_vs_torch"] = row["sentiment"]["requests_per_s"] / baseline["sentiment"]["requests_per_s"]
    print("  vs torch: " + "; ".join(f"{name} generation {row.get('generate_vs_torch', float('nan')):.2f}x, "
                                     f"sentiment {row.get('sentiment_vs_torch', float('nan')):.2f}x"
                                     for name, row in rows.items() if name != "torch"), flush=True)
    return rows


def _served_line(part: str, row: dict) -> str:
    result = row[part]
    if part == "generate":
        before, after = row["own_loop_before_after"]
        return (f"generation {result['chars_per_s']:6.0f} chars/s (own loop {before:6.0f} before, {after:6.0f} after: "
                f"{row['served_over_own_loop']:.0%}), p50 {result['p50_ms']:.0f} ms, errors {result['errors']}")
    return f"sentiment {result['requests_per_s']:6.1f} req/s, p50 {result['p50_ms']:.0f} ms, errors {result['errors']}"


if __name__ == "__main__":
    raise SystemExit(main())
