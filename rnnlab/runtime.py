"""Running a bundle's model for inference: torch or ONNX Runtime behind one seam.

**The seam.** :func:`load_model` returns an object with the calls predictors and the generation scheduler make --
``model(*inputs)`` / ``model.forward``, ``model.step(ids, state)``, ``model.decode(ids, state, settings, uniforms)``
(a step and its sampling), ``model.init_state(batch, device)``,
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
  no spinning. Refused, in one sentence, for a bundle without a graph or without onnxruntime installed. A graph
  that samples (charlm's: ``GraphSpec.sampler``) makes ``decode`` one call, the step and its sampling: a step of
  the int8 charlm at batch 32 is ~0.55 ms, and the ~0.1 ms of torch calls that sampled it were a fifth of that.
* ``auto``: ``onnx`` on a CPU when the bundle holds a graph (it passed its parity check to be written) and
  onnxruntime is installed; ``torch`` otherwise (a GPU, or an older bundle).

The graphs themselves are written and checked by rnnlab/export.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnlab import registry
from rnnlab.bundle import GRAPH_FILE, INT8_FILE, WEIGHTS_FILE, Bundle, check_runtime_name
from rnnlab.errors import BundleError, RnnlabError, first_line
from rnnlab.models.charlm import CharLSTM
from rnnlab.sampling import NonFiniteScores, RowSampling, sample_rows

STATE_NAMES = ("h", "c")  # a stateful graph's state inputs (outputs: h_out, c_out); a GRU or an RNN has h only
# a sampling graph's inputs after the state and its outputs after the state's (rnnlab.sampling.sample_plain)
SAMPLER_INPUTS, SAMPLER_OUTPUTS = ("uniforms", "divisor"), ("next_ids", "total")
WEIGHTS_KEY = "rnnlab.weights_sha256"  # the graph's metadata: the weights it was exported from


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
    returns (figures, the sentence saying which failed or None); a job without one keeps its graph fp32. A
    ``sampler`` graph (a stateful one) also samples the next id from its last step's scores
    (``rnnlab.sampling.sample_plain``; inputs ``uniforms`` [B] and ``divisor`` [B, 1], outputs ``next_ids`` and
    ``total`` [B]), so that under ONNX Runtime a decoding step and its sampling are one call."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    examples: Callable[[Bundle], list[tuple]]
    stateful: bool = False
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None
    int8_gate: Callable[[Any, Any], tuple[dict, str | None]] | None = None
    sampler: bool = False

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

    def decode(self, ids: torch.Tensor, state, settings: RowSampling, uniforms: torch.Tensor) -> tuple:
        """One decoding step and its sampling (``CharLSTM.decode``), with oneDNN off as for ``step``."""
        with onednn(False):
            return self.module.decode(ids, state, settings, uniforms)

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
        inputs = session.get_inputs()
        # a graph exported before the sampler went into it still runs: its steps are sampled by torch
        self.samples = tuple(i.name for i in inputs[-len(SAMPLER_INPUTS) :]) == SAMPLER_INPUTS
        if self.samples:
            inputs = inputs[: -len(SAMPLER_INPUTS)]
        self.inputs = [i.name for i in inputs]
        self.arity = len(spec.inputs)
        self.stateful = spec.stateful
        # [layers, batch, hidden]: the state inputs' fixed sizes, read from the graph
        self.state_shapes = [(i.shape[0], i.shape[2]) for i in inputs[self.arity :]]
        self.outputs = [o.name for o in session.get_outputs()][: len(spec.outputs) + len(self.state_shapes)]
        self.info = info

    def __call__(self, *inputs: Any) -> Any:
        tensors = list(inputs[: self.arity])
        if self.stateful:
            state = inputs[self.arity] if len(inputs) > self.arity else None
            tensors += state if state is not None else self.init_state(tensors[0].shape[0])
        feeds = {name: _array(t) for name, t in zip(self.inputs, tensors)}
        if self.samples:  # nothing to sample: draws of 0 at temperature 1 (the sampler costs next to nothing)
            batch = len(tensors[0])
            feeds.update(uniforms=np.zeros(batch, np.float32), divisor=np.ones((batch, 1), np.float32))
        outputs = [torch.from_numpy(array) for array in self.session.run(self.outputs, feeds)]
        if self.stateful:
            return outputs[0], tuple(outputs[1:])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    forward = __call__

    def step(self, ids: torch.Tensor, state) -> tuple[torch.Tensor, tuple]:
        """One decoding step: ids[B] -> (logits[B, V], new state)."""
        logits, state = self(ids.unsqueeze(1), state)
        return logits.squeeze(1), state

    def decode(self, ids: torch.Tensor, state, settings: RowSampling, uniforms: torch.Tensor) -> tuple:
        """``CharLSTM.decode``: one step and its sampling, in one ONNX Runtime call when the graph samples
        (``sample_plain``); the rows it does not serve (``RowSampling.own_rows``: greedy, top-k, top-p) are sampled
        again from the step's logits by ``sample_rows``, so each row's path depends on its own settings only. A
        step is a fraction of a millisecond, so this stays in numpy between the call and the ids."""
        if not self.samples:  # an older graph: the step, then torch's sampler, as CharLSTM.decode does
            return CharLSTM.decode(self, ids, state, settings, uniforms)
        feeds = dict(zip(self.inputs, (_array(ids).reshape(-1, 1), *(_array(t) for t in state))))
        feeds.update(uniforms=_array(uniforms), divisor=_array(settings.divisor))
        logits, *state, chosen, total = self.session.run(None, feeds)
        finite = np.isfinite(total)
        if not finite.all():  # NaN or +inf in a row's scores (a model fault): name the rows, as sample_rows does
            raise NonFiniteScores(np.flatnonzero(~finite).tolist())
        logits, chosen = torch.from_numpy(logits[:, -1]), torch.from_numpy(chosen)
        own = settings.own_rows(logits.shape[1])
        if own is not None:
            chosen[own] = sample_rows(logits[own], settings.rows(own), uniforms[own])
        return chosen, tuple(torch.from_numpy(t) for t in state), logits

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
