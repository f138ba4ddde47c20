"""model.cell (lstm | gru | rnn) in every job: smoke runs that learn, step-wise state = the whole sequence,
the generation scheduler on a GRU, the forget-gate bias, old bundles, and the refusals."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch

from tiny_datasets import smoke_config, tiny_sources
from tiny_models import small_model_settings
from rnnlab.bundle import Bundle, _manifest_digest, load_bundle, save_bundle
from rnnlab.config import load_config
from rnnlab.data.vocab import Vocab
from rnnlab.errors import ConfigError
from rnnlab.jobs.charlm import CharLMPredictor
from rnnlab.models import build_model
from rnnlab.models.cells import CELLS, STATE_SIZE
from rnnlab.models.charlm import CharLSTM
from rnnlab.models.wordlm import copy_into_classifier
from rnnlab.registry import JOBS
from rnnlab.serve.scheduler import GenerationScheduler, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
# the models of the tests below that are about one job
SENTIMENT = {"vocab_size": 50, "embed_dim": 6, "hidden_size": 8, "fc_size": 4}
STOCK = {"num_features": 12, "hidden_size": 8}
CHARLM = {"vocab_size": 30, "hidden_size": 8, "embed_dim": 4}
WORD_LM = {"vocab_size": 300, "hidden_size": 16, "embed_dim": 4, "cutoffs": [20, 100]}
# any job's smoke preset, run for 30 steps at a high rate: enough to show learning on its tiny data set
LEARN = ("train.epochs=0", "train.max_steps=30", "train.lr=0.01", "train.log_every=1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return tiny_sources(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_cell_trains_each_job_and_its_loss_falls(job, cell, data, tmp_path):
    from rnnlab.trainers.loop import train

    if job not in data:
        pytest.skip(f"no tiny {JOBS[job].data_set} data set in tests/tiny_datasets.py")
    result = train(smoke_config(job, data[job], f"model.cell={cell}", *LEARN), tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "train"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"{job} {cell}: training loss {first:.4f} -> {last:.4f}"
    bundle = load_bundle(result["bundle"])
    assert bundle.model_config["cell"] == cell  # the bundle records the cell and rebuilds it
    assert bundle.model.config.cell == cell


@pytest.mark.parametrize("cell", CELLS)
def test_charlm_step_by_step_state_equals_the_whole_window(cell):
    torch.manual_seed(3)
    model = build_model("charlm", {"vocab_size": 11, "embed_dim": 5, "hidden_size": 7, "num_layers": 2,
                                   "cell": cell}).eval()
    ids = torch.randint(0, 11, (3, 8))
    with torch.no_grad():
        logits, whole = model(ids)
        assert isinstance(whole, tuple) and len(whole) == STATE_SIZE[cell]
        assert all(t.shape == (2, 3, 7) for t in whole)
        first, state = model(ids[:, :4])
        second, state = model(ids[:, 4:], state)
        torch.testing.assert_close(torch.cat([first, second], 1), logits)
        state = model.init_state(3)
        assert len(state) == STATE_SIZE[cell]
        for t in range(8):
            step_logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(step_logits, logits[:, t])
        for a, b in zip(state, whole, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_word_lm_carried_state_equals_the_whole_window(cell):
    torch.manual_seed(4)
    model = build_model("lm", {**WORD_LM, "num_layers": 2, "cell": cell}).eval()
    ids = torch.randint(1, 300, (2, 10))
    with torch.no_grad():
        hidden, whole = model(ids)
        first, state = model(ids[:, :6])
        second, state = model(ids[:, 6:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), hidden)
    assert [len(layer) for layer in state] == [STATE_SIZE[cell]] * 2
    for layer, expected in zip(state, whole, strict=True):
        for a, b in zip(layer, expected, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_sentiment_of_another_cell_is_the_same_alone_padded_or_packed(cell):
    torch.manual_seed(0)
    model = build_model("sentiment", {**SENTIMENT, "num_layers": 2, "bidirectional": True,
                                      "cell": cell}).eval()
    lengths = [9, 3, 1, 6]
    ids = torch.randint(1, 50, (4, 9))
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    lens = torch.tensor(lengths)
    with torch.no_grad():
        padded = model(ids, lens)
        alone = torch.stack([model(ids[i : i + 1, :n], lens[i : i + 1])[0] for i, n in enumerate(lengths)])
        model.length_strategy = "packed"
        packed = model(ids, lens)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded, packed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_parameters_follow_the_gates(job):
    """Same sizes: the GRU's recurrent weights are 3/4 of the LSTM's, the plain RNN's 1/4."""
    counts = {}
    for cell in CELLS:
        model = build_model(job, {**small_model_settings(job), "cell": cell})
        counts[cell] = sum(p.numel() for name, p in model.named_parameters() if "_ih_" in name or "_hh_" in name)
    assert counts["gru"] * 4 == counts["lstm"] * 3 and counts["rnn"] * 4 == counts["lstm"]


def test_forget_bias_sets_the_forget_gates_and_is_the_lstms_only():
    model = build_model("charlm", {**CHARLM, "num_layers": 2, "forget_bias": 1.0})
    h = 8
    for layer in range(2):
        b_ih, b_hh = getattr(model.recurrent, f"bias_ih_l{layer}"), getattr(model.recurrent, f"bias_hh_l{layer}")
        torch.testing.assert_close((b_ih + b_hh)[h : 2 * h], torch.ones(h))
        assert not torch.equal((b_ih + b_hh)[:h], torch.ones(h))  # the other gates keep torch's draw
    sentiment = build_model("sentiment", {**SENTIMENT, "bidirectional": True, "forget_bias": 1.0})
    for direction in sentiment.layers[0]:
        torch.testing.assert_close((direction.bias_ih_l0 + direction.bias_hh_l0)[8:16], torch.ones(8))
    with pytest.raises(ConfigError) as refused:
        build_model("stock", {**STOCK, "cell": "gru", "forget_bias": 1.0})
    assert str(refused.value).count(".") <= 1 and "forget_bias" in str(refused.value)
    with pytest.raises(ConfigError, match="model.cell is 'lstn'; choose one of lstm, gru, rnn"):
        load_config("stock", "smoke", overrides=["model.cell=lstn"])


def test_a_bundle_without_a_cell_key_loads_as_the_lstm_it_holds(tmp_path):
    torch.manual_seed(0)
    model = build_model("charlm", CHARLM)
    path = save_bundle(tmp_path / "bundle", job="charlm", model=model, metrics={},
                       assets={"vocab": Vocab(list(CHARS)).to_json()}, config={"job": "charlm"})
    manifest_path = Path(path) / "config.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("cell", "forget_bias"):  # a bundle written before the keys existed
        del manifest["model"][key]
    manifest["config_sha256"] = _manifest_digest(manifest)
    manifest_path.write_text(json.dumps(manifest))
    loaded = load_bundle(path)
    assert loaded.model.config.cell == "lstm" and isinstance(loaded.model.recurrent, torch.nn.LSTM)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_init_from_refuses_an_lm_of_another_cell_in_one_sentence():
    lm = build_model("lm", {"vocab_size": 50, "embed_dim": 6, "hidden_size": 8, "cutoffs": [20], "cell": "gru",
                            "output": "softmax"})
    classifier = build_model("sentiment", {**SENTIMENT, "cell": "lstm"})
    with pytest.raises(ConfigError) as refused:
        copy_into_classifier(lm, classifier)
    message = str(refused.value)
    assert message.count(". ") == 0 and "model.cell=gru" in message, message
    same = build_model("sentiment", {**SENTIMENT, "cell": "gru"})
    copied = copy_into_classifier(lm, same)
    assert "layers.0.weight_hh_l0" in copied
    torch.testing.assert_close(same.layers[0][0].weight_hh_l0, lm.layers[0].weight_hh_l0)


class HeldStep:
    """A model whose ``step`` waits at a gate (the decoding thread's first step can be held there) and records the
    batch size of every step, in order."""

    def __init__(self, model) -> None:
        self.model, self.forward, self.init_state = model, model.forward, model.init_state
        self.gate, self.waiting = threading.Event(), threading.Event()
        self.sizes: list[int] = []

    def step(self, ids, state):
        self.waiting.set()
        assert self.gate.wait(120), "the test never opened the gate"
        self.sizes.append(len(ids))
        return self.model.step(ids, state)

    decode = CharLSTM.decode  # a step as above, then the sampler


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_scheduler_decodes_another_cell_as_the_single_sequence_generator_does(cell):
    """Requests that arrive while a batch is decoding join it (iteration-level batching), and every sequence is
    what the single-sequence generator gives for its seed, whichever batch it shared."""
    torch.manual_seed(0)
    model = build_model("charlm", {"vocab_size": len(CHARS), "embed_dim": 8, "hidden_size": 16, "num_layers": 2,
                                   "cell": cell})
    bundle = Bundle(path="memory", job="charlm", model=model.eval(), model_config=model.config.to_dict(),
                    config={"data": {"lowercase": True}}, assets={"vocab": Vocab(list(CHARS)).to_json()}, metrics={})
    generator = CharLMPredictor(bundle)
    # prompts of several lengths (one character: the zero state), three joining together and three late
    requests = [(prompt, SamplingParams(max_new_tokens=20 + 9 * i, temperature=0.6 + 0.1 * i,
                                        top_k=[None, 5][i % 2], top_p=[None, 0.9][i // 2 % 2], seed=i))
                for i, prompt in enumerate(["the ", "a", "the ", "war and ", "t", "peace"])]
    early, late = requests[:3], requests[3:]
    held = HeldStep(generator.model)  # held at its first step until every request has arrived

    async def collect(scheduler, prompt, params):
        ids = []
        async for chunk in scheduler.generate(generator.encode_prompt(prompt), params):
            ids.extend(chunk.ids)
        return "".join(generator.vocab.itos[i] for i in ids)

    async def run():
        scheduler = GenerationScheduler(held, max_batch_size=4)
        first = [asyncio.create_task(collect(scheduler, *request)) for request in early]
        assert await asyncio.to_thread(held.waiting.wait, 120)  # a batch is decoding: its first step is held
        second = [asyncio.create_task(collect(scheduler, *request)) for request in late]
        while sum(scheduler.stats()[queue] for queue in ("active", "waiting")) < len(requests):
            await asyncio.sleep(0)  # let each task queue its request
        held.gate.set()
        return await asyncio.gather(*first, *second), scheduler.stats()

    texts, stats = asyncio.run(run())
    for text, (prompt, params) in zip(texts, requests):
        assert text == generator.generate(prompt, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                          top_k=params.top_k, top_p=params.top_p, seed=params.seed)
    # the held first step's sequences have 19+ tokens to go after it: a later, larger step holds them and requests
    # that joined the running batch
    assert max(held.sizes[1:]) > held.sizes[0], held.sizes
    assert stats["joined"] == stats["finished"] == len(requests) and stats["batch_size_max"] == 4


def _weights(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    pointer = json.loads((output / "checkpoints" / "latest.json").read_text())
    return load_file(str(output / "checkpoints" / pointer["checkpoint"] / "model.safetensors"))


@pytest.mark.parametrize("job", ["charlm", "lm"])
def test_a_gru_run_resumes_exactly_with_its_carried_state(job, data, tmp_path):
    """The carried TBPTT state of a GRU is (h,) per layer: it goes into the checkpoint and comes back."""
    from rnnlab.trainers.loop import train

    config = smoke_config(job, data[job], "model.cell=gru", "train.max_steps=9", "train.eval_every=3")
    train(config, tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def crash_at_second_eval(metrics, checkpoint):
        if metrics["step"] >= 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, tmp_path / "resumed", on_eval=crash_at_second_eval)
    train(config, tmp_path / "resumed", resume=True)
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_resuming_with_another_cell_is_refused_naming_the_key(data, tmp_path):
    from rnnlab.trainers.loop import train

    overrides = ["train.max_steps=4", "train.eval_every=2"]
    train(smoke_config("charlm", data["charlm"], *overrides), tmp_path)
    with pytest.raises(ConfigError) as refused:
        train(smoke_config("charlm", data["charlm"], *overrides, "model.cell=gru"), tmp_path, resume=True)
    message = str(refused.value)
    assert 'model.cell ("lstm" -> "gru")' in message and message.count(". ") == 0, message


def test_a_checkpoint_from_before_model_cell_resumes_as_the_lstm_it_is(tmp_path):
    from rnnlab.trainers.durable import check_same_config, config_fingerprint

    config = {"job": "charlm", "model": {"hidden_size": 8, "cell": "lstm", "forget_bias": None}}
    old = {"job": "charlm", "model": {"hidden_size": 8}}  # what a run wrote before the cell keys existed
    fingerprint, shaping = config_fingerprint(old)
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {}, "config_fingerprint": fingerprint,
                                                        "config": shaping}))
    check_same_config(tmp_path, config)  # the same run: no refusal
    with pytest.raises(ConfigError, match=r'model.cell \(unset -> "gru"\)'):
        check_same_config(tmp_path, {**config, "model": {**config["model"], "cell": "gru"}})


@pytest.fixture(scope="module")
def gru_charlm_bundle(data, tmp_path_factory) -> Path:
    """A GRU charlm bundle from a real (smoke) training run."""
    from rnnlab.trainers.loop import train

    config = smoke_config("charlm", data["charlm"], "model.cell=gru", "model.num_layers=2")
    return Path(train(config, tmp_path_factory.mktemp("gru-charlm") / "run")["bundle"])


@pytest.mark.slow
def test_a_gru_charlm_bundle_streams_through_the_service_as_rnnlab_generate_samples(gru_charlm_bundle, tmp_path):
    """The real service (Ray Serve, HTTP, the generation scheduler) on a GRU bundle: the plain answer, the streamed
    one and ``rnnlab generate`` agree for a seed."""
    import subprocess
    import sys

    import httpx

    from conftest import serving

    folder = tmp_path / "bundles"
    folder.mkdir()
    (folder / "wp-gru").symlink_to(gru_charlm_bundle)
    request = {"prompt": "the ", "max_new_tokens": 60, "temperature": 0.9, "top_k": 10, "seed": 5}
    with serving({"bundles": str(folder)}) as url, httpx.Client(base_url=url, timeout=60) as http:
        plain = http.post("/v1/charlm", json=request).json()["text"]
        with http.stream("POST", "/v1/charlm", json=request | {"stream": True}) as response:
            assert response.status_code == 200
            chunks = [json.loads(line[len("data:"):]).get("text", "") for line in response.iter_lines()
                      if line.startswith("data:")]
    assert len(plain) == 60 and "".join(chunks) == plain
    cli = subprocess.run([sys.executable, "-m", "rnnlab.launch.cli", "generate", str(gru_charlm_bundle), "--prompt",
                          "the ", "--length", "60", "--temperature", "0.9", "--top-k", "10", "--seed", "5"],
                         capture_output=True, text=True, check=True)
    assert cli.stdout == "the " + plain + "\n"


def test_init_from_copies_an_lm_of_the_same_cell_and_refuses_another_in_one_sentence(data, tmp_path):
    from rnnlab.trainers.job import make_job
    from rnnlab.trainers.loop import train

    lm = smoke_config("lm", data["lm"], "model.cell=gru")
    bundle = train(lm, tmp_path / "lm")["bundle"]
    lm_model = load_bundle(bundle).model

    def classifier(cell: str):
        config = smoke_config("sentiment", data["sentiment"], "data.min_freq=2", "data.max_vocab=30000",
                              "model.embed_dim=8", "model.hidden_size=8", "model.bidirectional=false",
                              f"model.init_from={bundle}", f"model.cell={cell}")
        job = make_job(config)
        job.load_data()
        return job.build_model()

    model = classifier("gru")
    torch.testing.assert_close(model.layers[0][0].weight_hh_l0, lm_model.layers[0].weight_hh_l0)
    torch.testing.assert_close(model.embedding.weight, lm_model.embedding.weight)
    with pytest.raises(ConfigError) as refused:
        classifier("lstm")
    message = str(refused.value)
    assert message == ("model.init_from: the language model's cell is gru and this classifier's is lstm; "
                       "set model.cell=gru to start from it."), message
