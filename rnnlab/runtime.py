"""Running a bundle's model for inference: torch or ONNX Runtime behind one seam, and writing the ONNX graph.

**The seam.** :func:`load_model` returns an object with the calls predictors and the generation scheduler make --
``model(*inputs)`` / ``model.forward``, ``model.step(ids, state)``, ``model.init_state(batch, device)``,
``model.device``, ``model.eval()`` -- taking and handing back torch tensors, so batching and state handling stay
as they are; ``model.describe()`` is what /v1/models shows. Runtimes (``--runtime``, else the bundle's default,
else ``auto``):

* ``torch``: the bundle's ``nn.Module`` (any device), at its fastest on a CPU: oneDNN (torch's CPU LSTM kernels)
  pays a fixed cost per call that dwarfs a one-step call and wins back over long sequences, so a call with ONE
  time step (a decoding step) runs with oneDNN off and any longer one with it on. Measured (an Intel Xeon with
  AVX-512, one thread of a shared 2-core machine at load ~4, best of 5; charlm hidden 512 x 2 layers; oneDNN on /
  off): step batch 1 1.97 / 0.74 ms, batch 32 5.33 / 2.67 ms,
  batch 128 10.4 / 7.6 ms; a prompt of 200 characters 74 / 94 ms; sentiment 32 reviews x 256 tokens 64 / 80 ms, one
  review of 30 tokens 1.0 / 1.5 ms; horizon 32 windows of 60 days 0.88 / 2.07 ms; stock's 5-day windows the same
  either way. The switch is global to the process: two threads switching it at once at worst run one call on the
  other kernels (the same answers up to float rounding).
* ``onnx``: the bundle's ONNX graph under ONNX Runtime on the CPU (its int8 graph when the bundle holds one, which
  only a passed quality gate writes), ``threads`` intra-op threads (the replica's CPU share), one inter-op thread,
  no spinning. Refused, in one sentence, for a bundle without a graph or without onnxruntime installed.
* ``auto``: ``onnx`` on a CPU when the bundle holds a graph (it passed its parity check to be written) and
  onnxruntime is installed; ``torch`` otherwise (a GPU, or an older bundle).

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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnlab import registry
from rnnlab.bundle import GRAPH_FILE, INT8_FILE, WEIGHTS_FILE, Bundle
from rnnlab.errors import BundleError, ConfigError, RnnlabError, first_line

RUNTIMES = ("auto", "torch", "onnx")
OPSET = 17
STATE_NAMES = ("h", "c")  # a stateful graph's state inputs (outputs: h_out, c_out); a GRU or an RNN has h only
# the graph's largest difference from the torch model allowed, relative to the outputs' size: float32 rounding of
# the same computation in another order stays near 1e-6; a wrong op is off by far more
PARITY_TOLERANCE = 1e-4
WEIGHTS_KEY = "rnnlab.weights_sha256"  # the graph's metadata: the weights it was exported from
# int8: linear layers with fewer weights than this stay fp32 (quantizing the activations costs more than it saves)
INT8_MIN_WEIGHTS = 16_384


class GraphRefused(BundleError):
    """The model does not export to a graph that answers as it does (one sentence naming the op or the difference)."""


@dataclass(frozen=True)
class GraphSpec:
    """How one job's model becomes one ONNX graph. ``inputs`` name the forward's tensor arguments in order and
    ``outputs`` its results; a ``stateful`` model is ``forward(*inputs, state=None) -> (output, state)`` and its
    state's tensors are inputs after them (``h``, ``c``) and outputs after the output (``h_out``, ``c_out``), each
    ``[layers, batch, hidden]``. ``examples(bundle)`` gives the argument tuples the parity check runs through both
    (a stateful one's last argument a state or None); ``labels(output)`` a classifier's labels, which must agree;
    ``int8_gate(fp32, int8)`` compares the job's validation results (``Job.evaluate``) of the two graphs and
    returns (figures, the sentence saying which failed or None); a job without one keeps its graph fp32."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    examples: Callable[[Bundle], list[tuple]]
    stateful: bool = False
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None
    int8_gate: Callable[[Any, Any], tuple[dict, str | None]] | None = None

    def state_names(self, bundle: Bundle) -> tuple[str, ...]:
        from rnnlab.models.cells import STATE_SIZE

        return STATE_NAMES[: STATE_SIZE[bundle.model_config.get("cell", "lstm")]] if self.stateful else ()


def graph_spec(job: str) -> GraphSpec:
    spec = registry.job(job)
    if spec.graph is None:
        raise GraphRefused(f"The {job} job declares no ONNX graph (its registry entry has no 'graph').")
    return spec.load("graph")


# ------------------------------------------------------------------------------------------------ torch


@contextlib.contextmanager
def onednn(enabled: bool):
    """torch's oneDNN CPU kernels on or off for the calls inside (``torch.backends.mkldnn.flags`` without its
    TF32 warning on machines without an Intel GPU)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def many_steps(inputs: tuple) -> bool:
    """Whether a call's first input ([B, T, ...]) holds more than one time step (where oneDNN pays)."""
    first = inputs[0] if inputs else None
    return isinstance(first, torch.Tensor) and first.dim() >= 2 and first.shape[1] > 1


class TorchModel:
    """A bundle's ``nn.Module`` for inference, each call on the faster CPU kernels for its shape (see above)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval()
        self.device = next(module.parameters()).device

    def __call__(self, *inputs: Any) -> Any:
        with onednn(many_steps(inputs)):
            return self.module(*inputs)

    forward = __call__

    def step(self, ids: torch.Tensor, state) -> tuple[torch.Tensor, tuple]:
        with onednn(False):
            return self.module.step(ids, state)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple:
        return self.module.init_state(batch_size, device)

    def eval(self) -> TorchModel:
        return self

    def describe(self) -> dict:
        return {"runtime": "torch", "device": str(self.device)}


# ------------------------------------------------------------------------------------------------ ONNX Runtime


def onnxruntime():
    """The onnxruntime module; an RnnlabError of one sentence where it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RnnlabError("ONNX Runtime is not installed (pip install onnxruntime); run the bundle with "
                          "--runtime torch.") from None
    return ort


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session over the graph at ``path``: ``threads`` intra-op threads (the replica's CPU
    share), one inter-op thread, and threads that sleep when idle (spinning would burn the cores other replicas
    share)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the optimizer's notes about the graph are not the user's business
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """A bundle's ONNX graph under ONNX Runtime, with the calls of the torch model it was exported from: tensors in,
    tensors out (on the CPU). A stateful graph also gives ``step`` and ``init_state`` (zeros of the graph's state
    shape)."""

    device = torch.device("cpu")

    def __init__(self, session, spec: GraphSpec, info: dict) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.arity = len(spec.inputs)
        self.stateful = spec.stateful
        # [layers, batch, hidden]: the state inputs' fixed sizes, read from the graph
        self.state_shapes = [(i.shape[0], i.shape[2]) for i in session.get_inputs()[self.arity :]]
        self.info = info

    def __call__(self, *inputs: Any) -> Any:
        tensors = list(inputs[: self.arity])
        if self.stateful:
            state = inputs[self.arity] if len(inputs) > self.arity else None
            tensors += state if state is not None else self.init_state(tensors[0].shape[0])
        feeds = {name: _array(t) for name, t in zip(self.inputs, tensors)}
        outputs = [torch.from_numpy(array) for array in self.session.run(None, feeds)]
        if self.stateful:
            return outputs[0], tuple(outputs[1:])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    forward = __call__

    def step(self, ids: torch.Tensor, state) -> tuple[torch.Tensor, tuple]:
        """One decoding step: ids[B] -> (logits[B, V], new state)."""
        logits, state = self(ids.unsqueeze(1), state)
        return logits.squeeze(1), state

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple:
        return tuple(torch.zeros(layers, batch_size, hidden) for layers, hidden in self.state_shapes)

    def eval(self) -> OnnxModel:
        return self

    def describe(self) -> dict:
        return {"runtime": "onnx", "device": "cpu", **self.info}


def _array(tensor: torch.Tensor):
    """A tensor as the array ONNX Runtime reads, sharing its memory where it can: a decoding step's state comes
    back from the previous step as such an array, and at a fraction of a millisecond a step, copies count."""
    if tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad:
        return tensor.numpy()
    return tensor.detach().to("cpu").contiguous().numpy()


# ------------------------------------------------------------------------------------------------ the seam


def choose_runtime(bundle: Bundle, requested: str | None = None) -> str:
    """``torch`` or ``onnx`` for ``bundle``: ``requested``, else the bundle's default; ``auto`` decides as the module
    docstring says. An unknown name, ``onnx`` for a bundle without a graph or without onnxruntime: one sentence."""
    name = requested or bundle.runtime
    check_runtime_name(name)
    if name == "torch":
        return "torch"
    if name == "auto":
        on_cpu = next(bundle.model.parameters()).device.type == "cpu"
        return "onnx" if bundle.graph and on_cpu and _has_onnxruntime() else "torch"
    if not bundle.graph:
        raise BundleError(f"Bundle {bundle.path} holds no ONNX graph; write one with 'rnnlab export {bundle.path}' "
                          "or run it with --runtime torch.")
    onnxruntime()
    return "onnx"


def check_runtime_name(name: str) -> None:
    if name not in RUNTIMES:
        raise ConfigError(f"Unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}.")


def _has_onnxruntime() -> bool:
    try:
        onnxruntime()
    except RnnlabError:
        return False
    return True


def load_model(bundle: Bundle, runtime: str | None = None, *, threads: int | None = None) -> TorchModel | OnnxModel:
    """The bundle's model under ``runtime`` (see the module docstring); ``threads`` bounds ONNX Runtime's (default:
    torch's thread count)."""
    if choose_runtime(bundle, runtime) == "torch":
        return TorchModel(bundle.model)
    int8 = bundle.graph.get("int8") or {}
    name = INT8_FILE if int8.get("passed") else GRAPH_FILE
    return open_graph(bundle, bundle.path / name, threads or torch.get_num_threads(),
                      info={"precision": "int8" if name == INT8_FILE else "fp32", "graph": bundle.graph})


def open_graph(bundle: Bundle, path: Path, threads: int = 1, info: dict | None = None) -> OnnxModel:
    """An OnnxModel over the graph file at ``path`` of ``bundle``, refused (one sentence) when ONNX Runtime cannot
    load it or it was exported from other weights than the bundle's (a graph copied from another bundle)."""
    onnxruntime()  # installed, or one sentence saying so
    try:
        opened = session(path, threads)
    except Exception as error:  # onnxruntime's own errors have no common base class
        raise BundleError(f"Bundle {bundle.path} {path.name} cannot be loaded by ONNX Runtime "
                          f"({first_line(error)}); re-export it with 'rnnlab export {bundle.path}'.") from None
    exported_from = opened.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY)
    if exported_from != bundle.files.get(WEIGHTS_FILE):
        raise BundleError(f"Bundle {bundle.path} {path.name} was exported from other weights than its "
                          f"{WEIGHTS_FILE} (another bundle's graph); re-export it with 'rnnlab export {bundle.path}'.")
    return OnnxModel(opened, graph_spec(bundle.job), info or {})


# ------------------------------------------------------------------------------------------------ export


class _Flat(nn.Module):
    """The model with its state as separate tensors, in and out: what the exporter traces."""

    def __init__(self, model: nn.Module, state_size: int) -> None:
        super().__init__()
        self.model, self.state_size = model, state_size

    def forward(self, *tensors):
        if not self.state_size:
            return self.model(*tensors)
        output, state = self.model(*tensors[: -self.state_size], tuple(tensors[-self.state_size :]))
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
    import functools

    from rnnlab.bundle import load_bundle, save_bundle

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
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on traced Python values and its own deprecation
        try:
            # eval() on the wrapper: the exporter restores the mode of the module it is given, recursively, and a
            # new wrapper is in training mode -- the model's dropout would be live for every call after export
            torch.onnx.export(_Flat(bundle.model, len(states)).eval(), tuple(example), str(path), dynamo=False,
                              input_names=[*spec.inputs, *states], output_names=[*spec.outputs, *_outs(states)],
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
    return {"max_abs_diff": worst, "examples": number, "tolerance": PARITY_TOLERANCE,
            **({"labels_compared": labels_checked} if spec.labels is not None else {})}


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
