"""Writing a bundle's ONNX graphs: the fp32 graph checked against the torch model, and the int8 one behind the
job's quality gate. rnnlab/runtime.py runs them.

**The graph** (:func:`write_graph`, called by ``save_bundle``): the model traced by torch.onnx's TorchScript
exporter (``dynamo=False``), which maps ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` to ONNX's LSTM / GRU / RNN ops that
ONNX Runtime runs natively (and ``quantize_dynamic`` turns an LSTM into DynamicQuantizeLSTM), with the state as
plain inputs and outputs; it exports in ~1 s (the torch.export-based exporter, torch 2.13's default: ~10 s, and
its graph declared the outputs' time axis fixed at the example's length). What a job's graph takes and returns is
its :class:`GraphSpec` (the registry's ``graph``, in ``rnnlab/jobs/<name>.py``). Written only when it answers as
the torch model does on the job's examples (:func:`check_parity`); ``--int8`` adds ``model.int8.onnx`` only when
it passes the job's quality gate on the validation split (:func:`quantize_graph`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnlab.bundle import GRAPH_FILE, INT8_FILE, WEIGHTS_FILE, Bundle, load_bundle, save_bundle
from rnnlab.errors import BundleError, RnnlabError, first_line
from rnnlab.runtime import (SAMPLER_INPUTS, SAMPLER_OUTPUTS, WEIGHTS_KEY, GraphRefused, GraphSpec, OnnxModel,
                            graph_spec, open_graph)
from rnnlab.sampling import per_row_params, sample_plain, sample_rows, sampling_params

OPSET = 17
# the graph's largest difference from the torch model allowed, relative to the outputs' size: float32 rounding of
# the same computation in another order stays near 1e-6; a wrong op is off by far more
PARITY_TOLERANCE = 1e-4
# int8: linear layers with fewer weights than this stay fp32 (quantizing the activations costs more than it saves)
INT8_MIN_WEIGHTS = 16_384


class _Flat(nn.Module):
    """The model with its state as separate tensors, in and out: what the exporter traces. With ``sampler`` it
    also takes each row's draw and temperature and returns the id sampled from its last step's scores."""

    def __init__(self, model: nn.Module, state_size: int, sampler: bool = False) -> None:
        super().__init__()
        self.model, self.state_size, self.sampler = model, state_size, sampler

    def forward(self, *tensors):
        if self.sampler:
            *tensors, uniforms, divisor = tensors
        if not self.state_size:
            return self.model(*tensors)
        output, state = self.model(*tensors[: -self.state_size], tuple(tensors[-self.state_size :]))
        if self.sampler:
            return (output, *state, *sample_plain(output[:, -1], divisor, uniforms))
        return (output, *state)


def write_graph(bundle: Bundle, *, int8: bool = False, source: str | Path | None = None) -> dict:
    """Export the bundle's model (``bundle.path`` is the folder being written) as ``model.onnx``, check it against
    the torch model and return its manifest entry; with ``int8`` also try ``model.int8.onnx``
    (:func:`quantize_graph`, ``source`` replacing the data file its gate reads). GraphRefused, one sentence, for a
    model that does not export to a graph that answers as it does."""
    path = bundle.path / GRAPH_FILE
    export(bundle, path)
    entry = {"file": GRAPH_FILE, "opset": OPSET, "exporter": f"torch {torch.__version__} (TorchScript)",
             "parity": check_parity(bundle, open_graph(bundle, path))}
    if int8:
        entry["int8"] = quantize_graph(bundle, source=source)
    return entry


def export_bundle(directory: str | Path, *, int8: bool = False, source: str | Path | None = None,
                  runtime: str | None = None) -> Bundle:
    """Rewrite the bundle at ``directory`` with its ONNX graph (and with ``int8`` an int8 one behind the job's gate,
    ``source`` replacing the data file the gate reads) as training writes one: a new folder renamed into place,
    the same weights, so its version does not change. ``runtime``: its new default (None: keep the bundle's).
    Returns the bundle as written."""
    bundle = load_bundle(directory)
    runtime = runtime or (bundle.runtime if bundle.runtime != "auto" else None)
    save_bundle(bundle.path, job=bundle.job, model=bundle.model, assets=bundle.assets, metrics=bundle.metrics,
                config=bundle.config, example=bundle.example, runtime=runtime,
                graph=functools.partial(write_graph, int8=int8, source=source))
    return load_bundle(directory)


def export(bundle: Bundle, path: Path) -> None:
    """Trace the bundle's (CPU, eval) model into one graph at ``path``, stamped with its weights' sha256."""
    try:
        import onnx
    except ImportError:
        raise RnnlabError("The onnx package is not installed (pip install onnx); it writes the bundle's graph.") \
            from None
    spec = graph_spec(bundle.job)
    states = spec.state_names(bundle)
    example = _flat(bundle, spec, spec.examples(bundle)[0])
    state_axes = {name: {1: "batch"} for name in (*states, *_outs(states))}  # [layers, batch, hidden]
    inputs, outputs = [*spec.inputs, *states], [*spec.outputs, *_outs(states)]
    if spec.sampler:
        batch = len(example[0])
        example += [torch.rand(batch), torch.ones(batch, 1)]
        inputs, outputs = [*inputs, *SAMPLER_INPUTS], [*outputs, *SAMPLER_OUTPUTS]
        state_axes |= {name: {0: "batch"} for name in (*SAMPLER_INPUTS, *SAMPLER_OUTPUTS)}  # [batch] / [batch, 1]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on traced Python values and its own deprecation
        try:
            # eval() on the wrapper: the exporter restores the mode of the module it is given, recursively, and a
            # new wrapper is in training mode -- the model's dropout would be live for every call after export
            torch.onnx.export(_Flat(bundle.model, len(states), spec.sampler).eval(), tuple(example), str(path),
                              dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes={**spec.dynamic_axes, **state_axes}, opset_version=OPSET)
        except Exception as error:  # the exporter raises many kinds; its message names the op
            raise GraphRefused(f"The {bundle.job} model does not export to ONNX ({first_line(error)}).") from None
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {WEIGHTS_KEY: bundle.files[WEIGHTS_FILE], "rnnlab.job": bundle.job})
    onnx.save(graph, str(path))


def _outs(states: tuple[str, ...]) -> list[str]:
    return [f"{name}_out" for name in states]


def _flat(bundle: Bundle, spec: GraphSpec, example: tuple) -> list[torch.Tensor]:
    """An example's tensors in the graph's input order (a None state as the zero state)."""
    if not spec.stateful:
        return list(example)
    *inputs, state = example if len(example) > len(spec.inputs) else (*example, None)
    return [*inputs, *(state if state is not None else bundle.model.init_state(inputs[0].shape[0]))]


@torch.no_grad()
def check_parity(bundle: Bundle, graph: OnnxModel) -> dict:
    """The graph's answers beside the torch model's on every example: the largest absolute difference of any
    output (the state too) within PARITY_TOLERANCE of the outputs' size, and a classifier's labels all equal.
    Returns the figures; GraphRefused naming the difference otherwise."""
    spec = graph_spec(bundle.job)
    worst, labels_checked = 0.0, 0
    for number, example in enumerate(spec.examples(bundle), start=1):
        expected, got = _tensors(bundle.model(*example)), _tensors(graph(*example))
        size = max(1.0, max(float(t.abs().max()) for t in expected))
        difference = max(float((e.float() - g.float()).abs().max()) for e, g in zip(expected, got))
        shape = "x".join(map(str, example[0].shape))
        if not difference <= PARITY_TOLERANCE * size:  # NaN fails too
            raise GraphRefused(f"The exported {bundle.job} graph differs from the torch model by {difference:.3g} "
                               f"on example {number} (input {shape}), more than {PARITY_TOLERANCE * size:.3g}.")
        if spec.labels is not None:
            differ = int((spec.labels(expected[0]) != spec.labels(got[0])).sum())
            if differ:
                raise GraphRefused(f"The exported {bundle.job} graph labels {differ} of {len(expected[0])} rows of "
                                   f"example {number} (input {shape}) otherwise than the torch model.")
            labels_checked += len(expected[0])
        worst = max(worst, difference)
        if spec.sampler and example[0].shape[1] == 1 and len(example) > 1:  # a decoding step from a state
            _check_sampler(bundle, graph, example, number)
    return {"max_abs_diff": worst, "examples": number, "tolerance": PARITY_TOLERANCE,
            **({"labels_compared": labels_checked} if spec.labels is not None else {})}


def _check_sampler(bundle: Bundle, graph: OnnxModel, example: tuple, number: int, draws: int = 100) -> None:
    """The graph's sampled ids beside the torch sampler's on the graph's scores of the same step, ``draws`` draws
    per row at temperature 0.8: GraphRefused when more than 1 % differ (a draw within float rounding of a boundary
    between two characters may land on either; a wrong op differs on most)."""
    ids, state = example[0][:, 0], example[1]
    settings = per_row_params([sampling_params(temperature=0.8)] * len(ids))
    differ = 0
    for uniforms in torch.rand(draws, len(ids), generator=torch.Generator().manual_seed(number)):
        got, _, logits = graph.decode(ids, state, settings, uniforms)
        differ += int((got != sample_rows(logits, settings, uniforms)).sum())
    if differ > 0.01 * draws * len(ids):
        raise GraphRefused(f"The exported {bundle.job} graph samples {differ} of {draws * len(ids)} draws on example "
                           f"{number} otherwise than the torch sampler.")


def _tensors(output) -> list[torch.Tensor]:
    """An output (a tensor, or (output, state) of a stateful model) as a flat list of tensors."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for part in output for t in _tensors(part)]


# ------------------------------------------------------------------------------------------------ int8


def quantize_graph(bundle: Bundle, *, source: str | Path | None = None) -> dict:
    """``model.int8.onnx`` from the bundle's fp32 graph by ONNX Runtime's dynamic quantization -- the LSTM and the
    linear layers of at least INT8_MIN_WEIGHTS weights, never an embedding or the n-gram table (Gathers stay fp32),
    weights in 7 bits (reduce_range) on a CPU without VNNI, whose 8-bit products could saturate -- kept only when
    the job's gate passes on its validation split: one scale per tensor first, and where that fails one per output
    channel (finer, for layers whose rows differ in range). Returns the manifest entry: the gate's figures,
    ``passed``, and for a refusal ``failed`` (the sentence saying which figure failed; the file is not kept)."""
    spec = graph_spec(bundle.job)
    cell = bundle.model_config.get("cell", "lstm")
    if spec.int8_gate is None:
        return _refused(bundle, f"the {bundle.job} job has no int8 quality gate, so its graph stays fp32")
    if cell != "lstm":
        return _refused(bundle, f"ONNX Runtime has no int8 {cell.upper()}, so a {cell} bundle's graph stays fp32")
    score = validation_scorer(bundle, source)
    fp32 = score(GRAPH_FILE)
    for per_channel in (False, True):
        settings = quantize(bundle.path / GRAPH_FILE, bundle.path / INT8_FILE, per_channel=per_channel)
        if "DynamicQuantizeLSTM" not in settings["quantized"]:
            return _refused(bundle, "quantize_dynamic left the LSTM in fp32 (no DynamicQuantizeLSTM in the graph)",
                            settings)
        figures, failed = spec.int8_gate(fp32, score(INT8_FILE))
        if not failed:
            return {"file": INT8_FILE, "passed": True, **settings, **figures}
    return _refused(bundle, failed, settings | figures)


def quantize(source: Path, target: Path, *, per_channel: bool = False) -> dict:
    """Write the int8 version of the fp32 graph at ``source`` to ``target`` (see :func:`quantize_graph`); returns
    its settings and the quantized op types it holds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = not cpu_has_vnni()
    with warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        quantize_dynamic(source, target, op_types_to_quantize=["LSTM", "MatMul"], nodes_to_quantize=int8_nodes(source),
                         per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
    quantized = op_types(target) & {"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul"}
    return {"reduce_range": reduce_range, "per_channel": per_channel, "quantized": sorted(quantized)}


def _refused(bundle: Bundle, reason: str, figures: dict | None = None) -> dict:
    (bundle.path / INT8_FILE).unlink(missing_ok=True)
    return {"passed": False, "failed": reason, **(figures or {})}


def int8_nodes(path: Path) -> list[str]:
    """The graph's LSTM nodes and its MatMuls by a constant weight of at least INT8_MIN_WEIGHTS values."""
    import onnx

    graph = onnx.load(str(path)).graph
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    return [node.name for node in graph.node
            if node.op_type == "LSTM" or (node.op_type == "MatMul" and sizes.get(node.input[1], 0) >= INT8_MIN_WEIGHTS)]


def op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies int8 with VNNI (AVX512-VNNI or AVX-VNNI); without it ONNX Runtime's u8 x s8
    products go through a 16-bit sum that 8-bit weights can saturate (ORT's reason for reduce_range)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@contextlib.contextmanager
def _quiet_logging():
    """quantize_dynamic logs a line per node it leaves alone; keep the user's terminal to our sentences."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def validation_scorer(bundle: Bundle, source: str | Path | None = None) -> Callable[[str], Any]:
    """``score(file)``: the job's validation results (``Job.evaluate`` on the val split, rebuilt from the bundle's
    training config, ``source`` replacing its data file) of the bundle's graph in ``file``."""
    from accelerate import Accelerator

    from rnnlab.trainers.evaluate import rebuild_job

    job = rebuild_job(bundle, source)
    if not job.has_validation():
        raise BundleError(f"The data of bundle {bundle.path} has no validation split to check int8 on; export it "
                          "without --int8.")
    accelerator = Accelerator(cpu=True)
    return lambda name: job.evaluate(open_graph(bundle, bundle.path / name, torch.get_num_threads()), "val",
                                     accelerator)
