"""The runtimes (rnnlab/runtime.py) and the graphs they run (rnnlab/export.py): every served job's ONNX graph answers as its weights do for every cell, the
seam gives predictors and the scheduler the same answers under ONNX Runtime as under torch, int8 is kept only
behind its gate, and every bad input is one sentence."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from rnnlab import registry
from rnnlab.bundle import GRAPH_FILE, INT8_FILE, WEIGHTS_FILE, load_bundle, save_bundle
from rnnlab.data.horizon import FEATURE_SETS
from rnnlab.data.stock import FEATURE_NAMES, Scaler
from rnnlab.data.vocab import Vocab
from rnnlab.errors import BundleError, ConfigError, RnnlabError
from rnnlab.inference import load_predictor
from rnnlab.models import build_model
from rnnlab.export import op_types, write_graph
from rnnlab.runtime import GraphRefused, OnnxModel, TorchModel, graph_spec, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
WORDS = ["<pad>", "<unk>", "the", "movie", "was", "great", "awful", "plot", "and", "a", "film", "bad", "loved"]
SERVED = list(registry.served())
CELLS = ("lstm", "gru", "rnn")


def tiny_bundle(directory, job: str, cell: str = "lstm", *, graph: bool = True):
    """A bundle of ``job`` from a small random model of ``cell`` (with its ONNX graph unless ``graph`` is False), with
    dropout where the model has it: the graph must be the eval-mode model's (the exporter once left it training)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    scaler = {"scaler": Scaler.fit(rng.normal(size=(32, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES)).to_json(),
              "target_scaler": Scaler.fit(rng.normal(1000, 50, size=(32, 1)), columns=["close"]).to_json()}
    horizon_features = FEATURE_SETS["scale_free"]
    horizon_scaler = {
        "scaler": Scaler.fit(rng.normal(size=(32, len(horizon_features))), columns=list(horizon_features)).to_json(),
        "target_scaler": Scaler.fit(rng.normal(size=(32, 5)), columns=[f"h{h}" for h in range(1, 6)]).to_json()}
    settings = {
        "sentiment": ({"vocab_size": len(WORDS), "embed_dim": 6, "hidden_size": 5, "bidirectional": True,
                       "num_layers": 2, "fc_size": 4, "pooling": "max_mean", "ngram_buckets": 64, "dropout": 0.3},
                      {"vocab": Vocab(WORDS, unk_index=1).to_json()}, {"job": "sentiment", "data": {"max_length": 40}}),
        "charlm": ({"vocab_size": len(CHARS), "embed_dim": 8, "hidden_size": 16, "num_layers": 2, "dropout": 0.3},
                   {"vocab": Vocab(list(CHARS)).to_json()}, {"job": "charlm", "data": {"lowercase": True}}),
        "stock": ({"num_features": len(FEATURE_NAMES), "hidden_size": 4, "num_layers": 2, "fc_size": 4}, scaler,
                  {"job": "stock", "data": {"window": 5, "target": "close"}}),
        "horizon": ({"num_features": len(horizon_features), "hidden_size": 4, "fc_size": 4, "num_layers": 2},
                    horizon_scaler, {"job": "horizon", "data": {"window": 9}}),
    }
    model_config, assets, config = settings[job]
    model = build_model(job, {**model_config, "cell": cell})
    if job == "sentiment":  # the n-gram table starts at zero: give it weights that show
        torch.nn.init.normal_(model.ngrams.weight)
    return save_bundle(directory / f"{job}-{cell}", job=job, model=model, assets=assets, metrics={}, config=config,
                       graph=write_graph if graph else None)


def outputs(result) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else [t for part in result for t in outputs(part)]


def test_every_served_job_declares_a_graph():
    assert SERVED and all(registry.job(name).graph for name in SERVED)


# --------------------------------------------------------------------------------------------- export and parity


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("job", SERVED)
def test_the_graph_answers_as_the_weights_for_every_job_and_cell(tmp_path, job, cell):
    path = tiny_bundle(tmp_path, job, cell)
    bundle = load_bundle(path)
    assert bundle.graph["file"] == GRAPH_FILE and GRAPH_FILE in bundle.files  # checksummed like every file
    assert bundle.graph["parity"]["max_abs_diff"] <= bundle.graph["parity"]["tolerance"]
    assert {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}.keys() & op_types(path / GRAPH_FILE) == {cell.upper()}
    onnx, torch_model = load_model(bundle, "onnx"), load_model(bundle, "torch")
    assert isinstance(onnx, OnnxModel) and isinstance(torch_model, TorchModel)
    assert load_model(bundle).describe()["runtime"] == "onnx"  # auto, on a CPU, with a graph
    with torch.inference_mode():
        for example in graph_spec(job).examples(bundle):
            for got, expected in zip(outputs(onnx(*example)), outputs(torch_model(*example)), strict=True):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_the_charlm_seam_steps_and_starts_states_as_the_torch_model(tmp_path):
    bundle = load_bundle(tiny_bundle(tmp_path, "charlm"))
    onnx, torch_model = load_model(bundle, "onnx"), load_model(bundle, "torch")
    with torch.inference_mode():
        for model in (onnx, torch_model):
            assert [tuple(t.shape) for t in model.init_state(3, model.device)] == [(2, 3, 16)] * 2
        ids = torch.tensor([1, 5, 7])
        state = torch_model.init_state(3)
        for _ in range(5):
            got, got_state = onnx.step(ids, state)
            expected, state = torch_model.step(ids, state)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got_state, state, atol=1e-5, rtol=1e-4)
            ids = expected.argmax(-1)


# every way a request may sample: temperature alone (the graph's sampler), greedy, top-k, top-p, top-k of the
# whole vocabulary (no filter), top-k with top-p
MIXED_SAMPLING = [dict(temperature=0.8), dict(temperature=1.7), dict(temperature=0.0), dict(temperature=1.0, top_k=3),
                  dict(temperature=0.9, top_p=0.5), dict(temperature=1.2, top_k=1000), dict(top_k=5, top_p=0.8)]


class CountedSession:
    """An ONNX Runtime session that counts its calls."""

    def __init__(self, session) -> None:
        self.session, self.calls = session, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)


def test_the_charlm_graph_samples_each_row_as_the_torch_sampler_in_one_call(tmp_path):
    from rnnlab.sampling import per_row_params, sampling_params

    bundle = load_bundle(tiny_bundle(tmp_path, "charlm"))
    onnx, torch_model = load_model(bundle, "onnx"), load_model(bundle, "torch")
    assert onnx.samples  # the graph takes the draws and returns the sampled ids
    rows = len(MIXED_SAMPLING)
    mixed = per_row_params([sampling_params(**settings) for settings in MIXED_SAMPLING])
    plain = per_row_params([sampling_params(temperature=0.8)] * rows)
    onnx.session = counted = CountedSession(onnx.session)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ids, state = torch.arange(rows) % len(CHARS), torch_model.init_state(rows)
        for _ in range(40):
            uniforms = torch.rand(rows, generator=generator)
            expected, next_state, logits = torch_model.decode(ids, state, mixed, uniforms)
            got, got_state, got_logits = onnx.decode(ids, state, mixed, uniforms)
            assert got.tolist() == expected.tolist()
            torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got_state, next_state, atol=1e-5, rtol=1e-4)
            for row in range(rows):  # a row's id depends on its own settings and draw, not on its neighbours'
                alone = mixed.rows(torch.tensor([row]))
                assert onnx.decode(ids[row : row + 1], tuple(t[:, row : row + 1] for t in state), alone,
                                   uniforms[row : row + 1])[0].item() == got[row].item()
            calls = counted.calls
            onnx.decode(ids, state, plain, uniforms)
            assert counted.calls == calls + 1  # temperature alone: the step and its sampling in one call
            ids, state = expected, next_state


def test_a_charlm_graph_without_the_sampler_still_decodes_as_torch(tmp_path, monkeypatch):
    import dataclasses

    from rnnlab.jobs import charlm
    from rnnlab.sampling import per_row_params, sampling_params

    monkeypatch.setattr(charlm, "GRAPH", dataclasses.replace(charlm.GRAPH, sampler=False))  # as exported before
    bundle = load_bundle(tiny_bundle(tmp_path, "charlm"))
    monkeypatch.undo()
    onnx, torch_model = load_model(bundle, "onnx"), load_model(bundle, "torch")
    assert not onnx.samples
    settings = per_row_params([sampling_params(**settings) for settings in MIXED_SAMPLING])
    ids, state = torch.arange(len(MIXED_SAMPLING)), torch_model.init_state(len(MIXED_SAMPLING))
    uniforms = torch.rand(len(MIXED_SAMPLING))
    with torch.inference_mode():
        assert onnx.decode(ids, state, settings, uniforms)[0].tolist() == \
            torch_model.decode(ids, state, settings, uniforms)[0].tolist()


class NaNRow(CountedSession):
    """A session whose graph's scores for row ``row`` were not finite: its sampler's total there is NaN. (ONNX
    Runtime's LSTM saturates a NaN state instead of passing it on, so only broken weights give one, in every row.)"""

    def __init__(self, session, row: int) -> None:
        super().__init__(session)
        self.row = row

    def run(self, *args, **kwargs):
        outputs = super().run(*args, **kwargs)
        outputs[-1][self.row] = float("nan")
        return outputs


def test_rows_with_non_finite_scores_are_named_by_the_graphs_sampler(tmp_path):
    from rnnlab.sampling import NonFiniteScores, per_row_params, sampling_params

    onnx = load_model(load_bundle(tiny_bundle(tmp_path, "charlm")), "onnx")
    onnx.session = NaNRow(onnx.session, row=2)
    with pytest.raises(NonFiniteScores) as info, torch.inference_mode():
        onnx.decode(torch.tensor([1, 2, 3, 4]), onnx.init_state(4), per_row_params([sampling_params()] * 4),
                    torch.rand(4))
    assert info.value.rows == [2]


def test_a_graph_that_samples_otherwise_is_refused(tmp_path, monkeypatch):
    from rnnlab import export

    # the most likely character, whatever the draw
    monkeypatch.setattr(export, "sample_plain", lambda logits, divisor, uniforms: (
        (logits / divisor).argmax(dim=-1) + (0 * uniforms).long(), logits.softmax(dim=-1).sum(dim=-1)))
    with pytest.raises(GraphRefused, match=r"graph samples \d+ of \d+ draws on example 3 otherwise than the torch "
                                           r"sampler"):
        tiny_bundle(tmp_path, "charlm")
    assert list(tmp_path.iterdir()) == []


def test_a_graph_that_answers_otherwise_is_refused_and_no_bundle_is_left(tmp_path, monkeypatch):
    original = OnnxModel.__call__
    monkeypatch.setattr(OnnxModel, "__call__", lambda self, *inputs: outputs(original(self, *inputs))[0] + 0.5)
    with pytest.raises(GraphRefused, match=r"graph differs from the torch model by 0\.5 on example 1") as info:
        tiny_bundle(tmp_path, "stock")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging folder


def test_training_keeps_the_bundle_when_its_graph_is_refused(tmp_path, monkeypatch, caplog):
    from rnnlab.config import load_config
    from rnnlab.trainers.loop import train
    from tiny_datasets import make_stock_csv

    def refuse(bundle, **_):
        raise GraphRefused("The stock model does not export to ONNX (Exporting the operator 'aten::x' is not "
                           "supported).")

    monkeypatch.setattr("rnnlab.export.write_graph", refuse)
    config = load_config("stock", "smoke", overrides=[f"data.source={make_stock_csv(tmp_path)}",
                                                      "tracking.wandb=false", "train.max_steps=2"])
    bundle = load_bundle(train(config, tmp_path / "run")["bundle"])
    assert bundle.graph is None and "aten::x" in caplog.text
    assert load_model(bundle).describe()["runtime"] == "torch"


# --------------------------------------------------------------------------------------------- the seam


def test_predictors_answer_the_same_under_both_runtimes(tmp_path):
    reviews = ["the movie was great", "awful", "the plot and the film was bad and awful " * 5, "a"]
    answers = {}
    for runtime in ("onnx", "torch"):
        classifier = load_predictor(tiny_bundle(tmp_path / runtime, "sentiment"), runtime=runtime)
        answers[runtime] = classifier.predict(reviews)
        assert classifier.model.describe()["runtime"] == runtime
    assert [a["label"] for a in answers["onnx"]] == [a["label"] for a in answers["torch"]]
    np.testing.assert_allclose([a["probability"] for a in answers["onnx"]],
                               [a["probability"] for a in answers["torch"]], atol=1e-6)


def test_forecasts_are_the_same_under_both_runtimes(tmp_path):
    from rnnlab.data.stock import read_prices
    from tiny_datasets import make_stock_csv

    prices = read_prices(make_stock_csv(tmp_path)).iloc[-400:]
    for job in ("stock", "horizon"):
        path = tiny_bundle(tmp_path, job)
        onnx, torch_answer = (load_predictor(path, runtime=runtime).predict([prices])[0]
                              for runtime in ("onnx", "torch"))
        if job == "stock":
            assert onnx["close"] == pytest.approx(torch_answer["close"], rel=1e-6)
        else:
            np.testing.assert_allclose([s["values"] for s in onnx["steps"]],
                                       [s["values"] for s in torch_answer["steps"]], rtol=1e-5)


def test_seeded_generation_is_the_same_text_from_the_cli_predictor_and_the_scheduler(tmp_path):
    from rnnlab.serve.scheduler import GenerationScheduler, SamplingParams

    generator = load_predictor(tiny_bundle(tmp_path, "charlm"), runtime="onnx")
    # one batch of every way to sample: the graph's sampler serves some rows, torch's the others
    requests = [("the ", SamplingParams(max_new_tokens=20 + 5 * i, seed=i, **settings))
                for i, settings in enumerate(MIXED_SAMPLING)]

    async def served():
        scheduler = GenerationScheduler(generator.model, max_batch_size=len(requests))

        async def one(prompt, params):
            return "".join(generator.vocab.itos[i] for chunk in [c async for c in scheduler.generate(
                generator.encode_prompt(prompt), params)] for i in chunk.ids)

        return await asyncio.gather(*(one(p, s) for p, s in requests))

    texts = asyncio.run(served())
    assert texts == [generator.generate(p, **s.model_dump()) for p, s in requests]
    on_torch = load_predictor(tmp_path / "charlm-lstm", runtime="torch")
    assert texts[0] == on_torch.generate("the ", **requests[0][1].model_dump())  # float rounding flips no token


def test_one_step_calls_run_with_onednn_off_and_sequences_with_it_on(tmp_path):
    bundle = load_bundle(tiny_bundle(tmp_path, "charlm", graph=False))
    seen = []
    bundle.model.recurrent.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    model, before = load_model(bundle), torch.backends.mkldnn.enabled
    with torch.inference_mode():
        _, state = model(torch.tensor([[1, 2, 3]]))
        model.step(torch.tensor([4]), state)
        model(torch.tensor([[4]]), state)
    assert seen == [True, False, False]
    assert torch.backends.mkldnn.enabled == before


def test_onnx_runtime_threads_follow_the_replicas_share(tmp_path):
    bundle = load_bundle(tiny_bundle(tmp_path, "stock"))
    options = load_model(bundle, "onnx", threads=3).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_bundle_without_a_graph_runs_on_torch_and_its_default_runtime_is_kept(tmp_path):
    path = tiny_bundle(tmp_path, "stock", graph=False)
    assert load_model(load_bundle(path)).describe()["runtime"] == "torch"
    bundle = load_bundle(path)
    save_bundle(path, job="stock", model=bundle.model, assets=bundle.assets, metrics={}, config=bundle.config,
                graph=write_graph, runtime="torch")
    assert load_model(load_bundle(path)).describe()["runtime"] == "torch"  # the bundle says so
    assert load_model(load_bundle(path), "onnx").describe()["runtime"] == "onnx"  # the caller wins


# --------------------------------------------------------------------------------------------- bad input


def test_bad_runtime_choices_are_one_sentence(tmp_path, monkeypatch):
    bundle = load_bundle(tiny_bundle(tmp_path, "charlm", graph=False))
    with pytest.raises(ConfigError, match="Unknown runtime 'tensorrt'; choose one of auto, torch, onnx."):
        load_model(bundle, "tensorrt")
    with pytest.raises(BundleError, match="holds no ONNX graph; write one with 'rnnlab export"):
        load_model(bundle, "onnx")
    graphed = load_bundle(tiny_bundle(tmp_path, "charlm"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(RnnlabError, match=r"ONNX Runtime is not installed \(pip install onnxruntime\)"):
        load_model(graphed, "onnx")
    assert load_model(graphed).describe()["runtime"] == "torch"  # auto goes on without it


def test_a_changed_graph_is_refused_by_its_checksum(tmp_path):
    path = tiny_bundle(tmp_path, "charlm")
    data = bytearray((path / GRAPH_FILE).read_bytes())
    data[-1] ^= 0x01
    (path / GRAPH_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx does not match its checksum"):
        load_bundle(path)


def test_a_graph_from_another_bundle_is_refused(tmp_path):
    from rnnlab.bundle import _manifest_digest
    from rnnlab.data.sources import sha256_of

    path = tiny_bundle(tmp_path / "a", "charlm")
    torch.manual_seed(1)
    other = load_bundle(path)
    with torch.no_grad():
        other.model.output.bias.add_(1.0)
    other_path = save_bundle(tmp_path / "b", job="charlm", model=other.model, assets=other.assets, metrics={},
                             config=other.config, graph=write_graph)
    shutil.copy(other_path / GRAPH_FILE, path / GRAPH_FILE)
    manifest = json.loads((path / "config.json").read_text())  # re-signed, as a careless tool would
    manifest["files"][GRAPH_FILE] = sha256_of(path / GRAPH_FILE)
    manifest["config_sha256"] = _manifest_digest(manifest)
    (path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="was exported from other weights than its model.safetensors") as info:
        load_model(load_bundle(path), "onnx")
    assert "\n" not in str(info.value)


def test_a_manifest_naming_a_graph_it_has_no_checksum_for_is_refused(tmp_path):
    from rnnlab.bundle import _manifest_digest

    path = tiny_bundle(tmp_path, "stock", graph=False)
    manifest = json.loads((path / "config.json").read_text())
    manifest["graph"] = {"file": GRAPH_FILE, "parity": {}}
    manifest["config_sha256"] = _manifest_digest(manifest)
    (path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'graph' names a file it lists no checksum for"):
        load_bundle(path)


# --------------------------------------------------------------------------------------------- the CLI


def rnnlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnlab.launch.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_export_gives_an_old_bundle_its_graph_with_the_same_weights(tmp_path):
    path = tiny_bundle(tmp_path, "charlm", graph=False)
    before = load_bundle(path).files[WEIGHTS_FILE]
    refused = rnnlab("generate", str(path), "--runtime", "onnx", "--length", "5")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "rnnlab export" in refused.stderr

    done = rnnlab("export", str(path))
    assert done.returncode == 0, done.stderr
    assert "holds model.onnx" in done.stdout
    bundle = load_bundle(path)
    assert bundle.files[WEIGHTS_FILE] == before and bundle.graph is not None  # same version, now with a graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["charlm-lstm"]  # no staging folder left
    texts = [rnnlab("generate", str(path), "--runtime", runtime, "--seed", "3", "--length", "30").stdout
             for runtime in ("onnx", "torch")]
    assert texts[0] == texts[1] and len(texts[0]) > 30


@pytest.mark.parametrize("argv, message", [
    (["generate", "{bundle}", "--runtime", "tensorflow"], "Unknown runtime 'tensorflow'; choose one of auto"),
    (["export", "{bundle}", "--source", "x.txt"], "--source gives the data the int8 gate scores"),
])  # fmt: skip
def test_cli_runtime_errors_are_one_sentence(tmp_path, argv, message):
    path = tiny_bundle(tmp_path, "charlm", graph=False)
    result = rnnlab(*(arg.format(bundle=path) for arg in argv))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_serve_refuses_a_bundle_its_runtime_cannot_run_before_ray_starts(tmp_path):
    from rnnlab.serve.app import build_app

    tiny_bundle(tmp_path / "bundles", "stock", graph=False)
    with pytest.raises(BundleError, match="holds no ONNX graph"):
        build_app({"bundles": str(tmp_path / "bundles"), "runtime": "onnx"})
    with pytest.raises(ConfigError, match="Unknown runtime 'fast'"):
        build_app({"bundles": str(tmp_path / "bundles"), "runtime": "fast"})


# --------------------------------------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def text_job(tmp_path_factory):
    """The charlm smoke config over a tiny text file, and the vocabulary its data gives (what the gate rebuilds)."""
    from rnnlab.config import load_config
    from rnnlab.trainers.job import make_job
    from tiny_datasets import make_text

    source = make_text(tmp_path_factory.mktemp("text"))
    config = load_config("charlm", "smoke", overrides=[f"data.source={source}", "tracking.wandb=false"])
    job = make_job(config)
    job.load_data()
    return job


def text_bundle(directory, job, cell: str = "lstm"):
    torch.manual_seed(0)
    model = build_model("charlm", {**job.config.model.to_dict(), **job.data_model_config(), "cell": cell,
                                   "hidden_size": 64})
    return save_bundle(directory / cell, job="charlm", model=model, assets=job.assets(), metrics={},
                       config={**job.config.to_dict(), "model": {**job.config.model.to_dict(), "hidden_size": 64}},
                       graph=lambda bundle: write_graph(bundle, int8=True))


def test_int8_is_kept_behind_its_gate_and_served(tmp_path, text_job):
    path = text_bundle(tmp_path, text_job)
    bundle = load_bundle(path)
    int8 = bundle.graph["int8"]
    assert int8["passed"] and int8["file"] == INT8_FILE and INT8_FILE in bundle.files
    assert "DynamicQuantizeLSTM" in op_types(path / INT8_FILE) and "DynamicQuantizeLSTM" in int8["quantized"]
    assert "Gather" in op_types(path / INT8_FILE)  # the embedding stays fp32
    assert abs(int8["relative_change"]) <= 0.01 and not int8["per_channel"]  # per-tensor scales passed
    described = load_model(bundle, "onnx").describe()
    assert described["precision"] == "int8" and described["graph"]["int8"]["val_nats_per_char_int8"] > 0


def test_int8_that_fails_its_gate_keeps_fp32_and_says_which_figure(tmp_path, text_job, monkeypatch):
    monkeypatch.setattr("rnnlab.jobs.charlm.INT8_MAX_RELATIVE", -1.0)  # no change is small enough
    bundle = load_bundle(text_bundle(tmp_path, text_job))
    int8 = bundle.graph["int8"]
    assert not int8["passed"] and "validation nats/char" in int8["failed"] and "int8 vs" in int8["failed"]
    assert int8["per_channel"]  # per-tensor scales failed, and per-channel ones too
    assert not (bundle.path / INT8_FILE).exists() and INT8_FILE not in bundle.files
    assert load_model(bundle, "onnx").describe()["precision"] == "fp32"


def test_int8_of_a_gru_keeps_fp32(tmp_path, text_job):
    bundle = load_bundle(text_bundle(tmp_path, text_job, "gru"))
    assert bundle.graph["int8"] == {"passed": False,
                                    "failed": "ONNX Runtime has no int8 GRU, so a gru bundle's graph stays fp32"}


# --------------------------------------------------------------------------------------------- the service


@pytest.mark.slow
def test_the_service_runs_bundles_on_onnx_runtime_and_says_so(tmp_path):
    import httpx

    from conftest import serving

    for job in ("sentiment", "charlm"):
        tiny_bundle(tmp_path / "bundles", job)
    generator = load_predictor(tmp_path / "bundles" / "charlm-lstm")  # auto: onnx, as the service
    expected = generator.generate("the ", max_new_tokens=25, seed=7)
    with serving({"bundles": str(tmp_path / "bundles")}) as url:
        models = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
        assert {m["runtime"] for m in models.values()} == {"onnx"}, models
        assert models["charlm-lstm"]["precision"] == "fp32"
        answer = httpx.post(f"{url}/v1/charlm", json={"prompt": "the ", "max_new_tokens": 25, "seed": 7}, timeout=60)
        assert answer.json()["text"] == expected
        labels = httpx.post(f"{url}/v1/sentiment", json={"texts": ["the movie was great", "awful"]}, timeout=60)
        assert [r["label"] for r in labels.json()["results"]] == [
            r["label"] for r in load_predictor(tmp_path / "bundles" / "sentiment-lstm").predict(["the movie was great",
                                                                                                 "awful"])]
