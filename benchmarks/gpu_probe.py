"""What cuDNN does with an LSTM in each precision on this GPU: the dtype it computes in, its error, its speed.

For fp32 (TF32 off), fp32 with TF32 (PyTorch's default for cuDNN RNNs), bf16 and fp16 autocast, fp16 autocast with
a loss scale (what Accelerate's fp16 does), and the module itself in bf16 (no autocast), one
2-layer LSTM (256 -> 512, the charlm ``default`` shape at batch 128 x 100) runs forward and backward. Each is
compared with the same LSTM in float64 on the same inputs (relative error of the output and of the first layer's
weight gradient, ``|a - ref| / |ref|``), and timed with CUDA events (median of 20 steps after 5 warm-ups).
Finally it asks rnnlab's own ``resolve_precision`` what the trainer would use for each request, so the
fall-back path (``training in fp32 instead``) is exercised on real cuDNN.

    python -m benchmarks.gpu_probe --json probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch


def lstm_step(lstm: torch.nn.LSTM, x: torch.Tensor, dtype: torch.dtype | None, loss_scale: float = 1.0):
    """Forward and backward under autocast ``dtype`` (None: none). The loss weighs every output by a fixed random
    number and divides by batch x time, so gradients are as small as a per-character cross-entropy's."""
    lstm.zero_grad(set_to_none=True)
    context = torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with context:
        out, _ = lstm(x)
    weights = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(1))
    loss = (out.double() * weights.double()).sum() / (out.shape[0] * out.shape[1])
    (loss * loss_scale).backward()
    return out, lstm.weight_hh_l0.grad.double() / loss_scale


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


def time_step(lstm, x, dtype, loss_scale: float, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        lstm_step(lstm, x, dtype, loss_scale)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        lstm_step(lstm, x, dtype, loss_scale)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device visible; this probe is for a GPU machine", file=sys.stderr)
        return 2
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
              "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "bf16_supported": torch.cuda.is_bf16_supported(), "modes": {}}
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(256, 512, num_layers=2, batch_first=True).cuda()
    x = torch.randn(128, 100, 256, device="cuda")
    reference = torch.nn.LSTM(256, 512, num_layers=2, batch_first=True).cuda().double()
    reference.load_state_dict(lstm.state_dict())
    ref_out, ref_grad = lstm_step(reference, x.double(), None)
    ref_out, ref_grad = ref_out.detach(), ref_grad.detach().clone()
    report["reference"] = {"grad_rms": float(ref_grad.pow(2).mean().sqrt()),
                           "grad_zero_fraction": float((ref_grad == 0).double().mean())}

    bf16_lstm = torch.nn.LSTM(256, 512, num_layers=2, batch_first=True).cuda()
    bf16_lstm.load_state_dict(lstm.state_dict())
    bf16_lstm.to(torch.bfloat16)
    # name: (module, input, autocast dtype, TF32, loss scale)
    modes = {"fp32 (TF32 off)": (lstm, x, None, False, 1.0),
             "fp32 (TF32 on, default)": (lstm, x, None, True, 1.0),
             "bf16 autocast": (lstm, x, torch.bfloat16, True, 1.0),
             "fp16 autocast": (lstm, x, torch.float16, True, 1.0),
             "fp16 autocast, loss x 2^16": (lstm, x, torch.float16, True, 2.0 ** 16),
             "bf16 module and input": (bf16_lstm, x.bfloat16(), None, True, 1.0)}
    for name, (module, inputs, dtype, tf32, scale) in modes.items():
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            out, grad = lstm_step(module, inputs, dtype, scale)
            report["modes"][name] = {
                "output_dtype": str(out.dtype).replace("torch.", ""),
                "output_rel_error": relative_error(out.detach(), ref_out),
                "grad_rel_error": relative_error(grad, ref_grad),
                "grad_zero_fraction": float((grad == 0).double().mean()),
                "ms_per_fwd_bwd": time_step(module, inputs, dtype, scale),
            }
        except RuntimeError as error:  # an unsupported combination is a finding, not a crash
            report["modes"][name] = {"error": str(error).splitlines()[0]}
    torch.backends.cudnn.allow_tf32 = True

    from rnnlab.errors import ConfigError
    from rnnlab.trainers.precision import resolve_precision

    report["trainer_resolves"] = {}
    for requested in ("no", "bf16", "fp16"):
        try:
            report["trainer_resolves"][requested] = resolve_precision(requested)
        except ConfigError as error:
            report["trainer_resolves"][requested] = f"refused: {error}"

    print(f"torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}, {report['gpu']} "
          f"(sm_{''.join(map(str, report['capability']))}), bf16 supported: {report['bf16_supported']}")
    print(f"{'LSTM 2x512, b128 x 100':<28} {'computes in':<12} {'out rel err':>12} {'grad rel err':>13} "
          f"{'grad = 0':>9} {'ms/step':>8}")
    fp32_ms = report["modes"]["fp32 (TF32 on, default)"].get("ms_per_fwd_bwd")
    for name, row in report["modes"].items():
        if "error" in row:
            print(f"{name:<28} ERROR {row['error']}")
            continue
        speedup = f"  ({fp32_ms / row['ms_per_fwd_bwd']:.2f}x the default fp32)" if fp32_ms else ""
        print(f"{name:<28} {row['output_dtype']:<12} {row['output_rel_error']:12.2e} {row['grad_rel_error']:13.2e} "
              f"{100 * row['grad_zero_fraction']:8.2f}% {row['ms_per_fwd_bwd']:8.2f}{speedup}")
    print("rnnlab's resolve_precision:", report["trainer_resolves"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
