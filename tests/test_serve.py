"""The HTTP service against a real local Ray instance (2 CPUs), over tiny bundles made from random models.

Serve starts once for the module (about 15 s on 2 cores); every test talks real HTTP to it with httpx.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from conftest import serving
from rnnlab import registry
from tiny_datasets import make_stock_csv
from tiny_models import CHARS, FAULT_CHAR

pytestmark = pytest.mark.slow

FAULTY_PROMPT = f"the emperor{FAULT_CHAR}s "  # reaches wp-small's faulty character: its decoding fails


# --- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def price_rows(tmp_path_factory) -> list[dict]:
    frame = pd.read_csv(make_stock_csv(tmp_path_factory.mktemp("prices"))).tail(300)
    return [{"date": r.Date, "open": r.Open, "high": r.High, "low": r.Low, "close": r.Close, "volume": r.Volume}
            for r in frame.itertuples()]


@pytest.fixture(scope="module")
def service(bundles) -> str:
    # a longer batch wait than the default so concurrent test requests reliably share a batch; batches of 64 and
    # bodies up to 8 MB, so that one batch can outgrow gRPC's default message size (test_a_batch_larger_than_...)
    with serving({"bundles": str(bundles), "batch_wait_timeout_s": 0.05, "max_batch_size": 64,
                  "max_body_bytes": 8 * 2**20}) as base:
        yield base


@pytest.fixture()
def http(service):
    with httpx.Client(base_url=service, timeout=60) as client:
        yield client


def batching(http: httpx.Client, endpoint: str) -> dict:
    return next(m for m in http.get("/v1/models").json()["data"] if m["endpoint"] == endpoint)["batching"]


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
            name = "message"
    return events


# --- health, docs, models --------------------------------------------------------------------------------------
def test_healthz_docs_and_openapi(http):
    health = http.get("/healthz")
    assert health.status_code == 200
    assert sorted(health.json()["serving"]) == sorted(registry.served())
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {*(f"/v1/{job}" for job in registry.served()), "/v1/models", "/healthz"} <= set(paths)
    # the older routes answer too, for one release, marked deprecated
    assert paths["/v1/forecast"]["post"]["deprecated"] and paths["/v1/generate"]["post"]["deprecated"]


def test_models_lists_bundles_with_versions_metrics_and_batching(http):
    models = {m["endpoint"]: m for m in http.get("/v1/models").json()["data"]}
    assert set(models) == {f"/v1/{job}" for job in registry.served()}
    assert models["/v1/sentiment"]["name"] == "imdb-small"
    assert models["/v1/charlm"]["metrics"] == {"val": {"nats_per_char": 3.4}}
    for model in models.values():
        assert len(model["version"]) == 12
        assert {"batch_size_histogram", "batch_size_max", "batch_size_mean", "max_batch_size"} <= set(model["batching"])


def test_a_forecasters_example_is_linked_from_models_and_answers_its_route(http):
    """A bundle's example (example.json) is served at GET /v1/<job>/example, ready to POST; a bundle without one
    still serves, and its example route is a 404 naming the model, as is an id the job does not serve."""
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["djia-small"]["example"] == "/v1/stock/example?model=djia-small"
    assert models["imdb-small"]["example"] is None and models["wp-small"]["example"] is None
    for job, rows in [("stock", 254 + 5), ("horizon", 254 + 21)]:
        model = next(m for m in models.values() if m["job"] == job)
        example = http.get(model["example"])
        assert example.status_code == 200 and len(example.json()["rows"]) == rows
        assert http.get(f"/v1/{job}/example").json() == example.json()  # the default model's
        answer = http.post(f"/v1/{job}", json=example.json())
        assert answer.status_code == 200 and answer.json()["model"].startswith(model["id"] + "@"), answer.text
    for path, model in [("/v1/sentiment/example", "imdb-small"), ("/v1/stock/example?model=imdb-small", "imdb-small")]:
        missing = http.get(path)
        assert missing.status_code == 404 and missing.json()["detail"][0]["loc"] == ["query", "model"]
        assert model in missing.json()["detail"][0]["msg"]
    assert "/v1/horizon/example" in http.get("/openapi.json").json()["paths"]


# --- each endpoint ---------------------------------------------------------------------------------------------
def test_sentiment_matches_the_inference_layer(http, bundles):
    from rnnlab.bundle import load_bundle
    from rnnlab.jobs.sentiment import SentimentPredictor

    texts = ["The movie was great.", "An awful plot and a worse cast.", "qwxz blorfle zzyzx"]
    response = http.post("/v1/sentiment", json={"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"].startswith("imdb-small@")
    expected = SentimentPredictor(load_bundle(bundles / "imdb-small")).predict(texts)
    for got, want in zip(body["results"], expected):
        assert got == {**want, "probability": pytest.approx(want["probability"], abs=1e-6)}
    # how much of each text the model knows ("an", "worse", "cast" are not in its vocabulary), and no guess at all
    # for a text of words it has never seen
    assert [(r["tokens"], r["known_tokens"]) for r in body["results"]] == [(4, 4), (7, 4), (3, 0)]
    assert body["results"][2] == {"label": "unknown", "probability": 0.5, "tokens": 3, "known_tokens": 0}


def test_forecast_gives_next_close_beside_the_naive_baseline(http, bundles, price_rows):
    from rnnlab.bundle import load_bundle
    from rnnlab.jobs.stock import StockPredictor

    # the last row is the day to forecast: only its date and open are known
    rows = price_rows[:-1] + [{"date": price_rows[-1]["date"], "open": price_rows[-1]["open"]}]
    response = http.post("/v1/stock", json={"rows": rows})
    assert response.status_code == 200, response.text
    forecast = response.json()["forecast"]
    assert http.post("/v1/forecast", json={"rows": rows}).json() == response.json()  # the older route, the same
    expected = StockPredictor(load_bundle(bundles / "djia-small")).predict([pd.DataFrame(rows)])[0]
    assert forecast["date"] == rows[-1]["date"] == expected["date"]
    assert forecast["close"] == pytest.approx(expected["close"], rel=1e-6)
    assert forecast["baseline_open"] == pytest.approx(rows[-1]["open"])
    assert forecast["actual_close"] is None
    # a back-test: the full last row gives the actual close beside the forecast
    assert http.post("/v1/forecast", json={"rows": price_rows}).json()["forecast"]["actual_close"] == pytest.approx(
        price_rows[-1]["close"])


def test_served_text_matches_the_cli_generator_for_a_seed(http, bundles):
    from rnnlab.bundle import load_bundle
    from rnnlab.jobs.charlm import CharLMPredictor

    request = {"prompt": "The war", "max_new_tokens": 50, "temperature": 0.8, "top_k": 12, "seed": 11}
    served = http.post("/v1/charlm", json=request).json()["text"]
    assert http.post("/v1/generate", json=request).json()["text"] == served  # the older route, the same
    local = CharLMPredictor(load_bundle(bundles / "wp-small")).generate(
        request["prompt"], max_new_tokens=50, temperature=0.8, top_k=12, seed=11)
    assert served == local


def test_generate_returns_text_of_the_asked_length_and_the_seed(http):
    response = http.post("/v1/generate", json={"prompt": "the ", "max_new_tokens": 40, "seed": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["text"]) == body["tokens"] == 40
    assert set(body["text"]) <= set(CHARS)
    assert body["seed"] == 3
    unseeded = http.post("/v1/generate", json={"prompt": "the ", "max_new_tokens": 5}).json()
    assert isinstance(unseeded["seed"], int)  # chosen by the server and returned, so it can be replayed


def test_seeded_generation_is_deterministic_alone_and_in_a_crowd(http, service):
    request = {"prompt": "the war ", "max_new_tokens": 60, "temperature": 0.9, "top_k": 10, "top_p": 0.95,
               "seed": 1234}
    alone = http.post("/v1/generate", json=request).json()["text"]
    assert http.post("/v1/generate", json=request).json()["text"] == alone

    async def crowd():
        async with httpx.AsyncClient(base_url=service, timeout=60) as client:
            others = [client.post("/v1/generate", json=request | {"seed": s, "max_new_tokens": 30 + s})
                      for s in range(8)]
            answers = await asyncio.gather(client.post("/v1/generate", json=request), *others)
        return [a.json()["text"] for a in answers]

    texts = asyncio.run(crowd())
    assert texts[0] == alone
    assert len(set(texts[1:])) > 1  # different seeds really differ
    greedy = request | {"temperature": 0, "seed": 1}
    assert http.post("/v1/generate", json=greedy).json()["text"] == http.post(
        "/v1/generate", json=greedy | {"seed": 2}).json()["text"]


def test_streaming_sends_characters_as_produced_and_matches_the_plain_answer(http):
    # long enough to outlast a block (at most 64 steps) and a stream interval by far, so that more than one chunk
    # must come however loaded the machine is (80 characters fit in one block and could arrive as one chunk)
    request = {"prompt": "the ", "max_new_tokens": 2000, "seed": 7}
    plain = http.post("/v1/generate", json=request).json()["text"]
    with http.stream("POST", "/v1/generate", json=request | {"stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[0][0] == "start" and events[0][1]["seed"] == 7
    assert events[-1] == ("done", {"tokens": 2000})
    chunks = [data["text"] for name, data in events if name == "message"]
    assert "".join(chunks) == plain
    assert len(chunks) > 1


# --- batching --------------------------------------------------------------------------------------------------
def test_concurrent_requests_run_in_batches_larger_than_one(http, service, price_rows):
    async def burst():
        async with httpx.AsyncClient(base_url=service, timeout=60) as client:
            sentiment = [client.post("/v1/sentiment", json={"texts": [f"the movie was great {i}"]}) for i in range(16)]
            forecast = [client.post("/v1/stock", json={"rows": price_rows}) for _ in range(8)]
            generate = [client.post("/v1/charlm", json={"prompt": "a", "max_new_tokens": 50, "seed": i})
                        for i in range(8)]
            return await asyncio.gather(*sentiment, *forecast, *generate)

    endpoints = ("/v1/sentiment", "/v1/stock", "/v1/charlm")
    # the service is shared by the module: only the batches THIS burst made count
    before = {endpoint: batching(http, endpoint)["batch_size_histogram"] for endpoint in endpoints}
    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for endpoint in endpoints:
        after = batching(http, endpoint)["batch_size_histogram"]
        new_sizes = [int(size) for size, count in after.items() if count > before[endpoint].get(size, 0)]
        assert new_sizes and max(new_sizes) > 1, (endpoint, before[endpoint], after)


def test_a_short_request_sent_after_a_long_one_finishes_first(service):
    """Iteration-level batching: the short request joins the running batch instead of waiting for the long one."""
    finished: dict[str, float] = {}

    async def race():
        async with httpx.AsyncClient(base_url=service, timeout=60) as client:
            async def long():
                async with client.stream("POST", "/v1/generate", json={"prompt": "the ", "max_new_tokens": 2000,
                                                                       "seed": 1, "stream": True}) as response:
                    lines = response.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: ") and "text" in line:
                            started.set()
                            break
                    async for _ in lines:
                        pass
                finished["long"] = time.perf_counter()

            async def short():
                await started.wait()
                response = await client.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 5, "seed": 2})
                assert response.status_code == 200
                finished["short"] = time.perf_counter()

            started = asyncio.Event()
            await asyncio.wait_for(asyncio.gather(long(), short()), timeout=60)

    asyncio.run(race())
    assert finished["short"] < finished["long"]


# --- bad input -------------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (endpoint, body, status, a field the error must name, words the message must hold)
    ("/v1/sentiment", {}, 422, "texts", "required"),
    ("/v1/sentiment", {"texts": "just one string"}, 422, "texts", "list"),
    ("/v1/sentiment", {"texts": []}, 422, "texts", "at least 1"),
    ("/v1/sentiment", {"texts": ["fine"] * 65}, 422, "texts", "64"),
    ("/v1/sentiment", {"texts": ["x" * 20_001]}, 422, "texts", "20000"),
    ("/v1/sentiment", {"texts": ["fine", ""]}, 422, "texts", "at least 1"),
    ("/v1/sentiment", {"texts": ["fine"], "lang": "en"}, 422, "lang", "not permitted"),
    ("/v1/forecast", {"rows": [{"date": "2023-01-02", "high": 1, "low": 1, "close": 1}]}, 422, "open", "required"),
    ("/v1/forecast", {"rows": [{"date": "2023-01-02", "open": -5}]}, 422, "open", "greater than 0"),
    ("/v1/forecast", {"rows": [{"date": "yesterday", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}]},
     422, "date", "date"),
    ("/v1/forecast", {"rows": [{"date": "2023-01-02", "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}]
                      * 5_001}, 422, "rows", "5000"),
    ("/v1/generate", {"prompt": ""}, 422, "prompt", "at least 1"),
    ("/v1/generate", {"prompt": "the", "max_new_tokens": 5_000}, 422, "max_new_tokens", "2000"),
    ("/v1/generate", {"prompt": "the", "temperature": -1}, 422, "temperature", "greater than or equal"),
    ("/v1/generate", {"prompt": "the", "top_p": 0}, 422, "top_p", "greater than 0"),
    ("/v1/generate", {"prompt": "the", "top_k": 0}, 422, "top_k", "greater than or equal"),
    ("/v1/generate", {"prompt": "the", "top_k": 100000000000000000000}, 422, "top_k", "less than or equal"),
    ("/v1/generate", {"prompt": "the", "temperature": True}, 422, "temperature", "number"),
    ("/v1/generate", {"prompt": "the", "max_tokens": 10}, 422, "max_tokens", "not permitted"),
    ("/v1/generate", {"prompt": "the €mperor ☃"}, 422, "prompt", "☃"),
    ("/v1/generate", {"prompt": "the €mperor", "stream": True}, 422, "prompt", "€"),
]


@pytest.mark.parametrize("endpoint, body, status, field, words", BAD_REQUESTS,
                         ids=[f"{e.rsplit('/', 1)[1]}-{i}" for i, (e, *_) in enumerate(BAD_REQUESTS)])
def test_bad_input_is_refused_naming_the_field_and_the_limit(http, endpoint, body, status, field, words):
    response = http.post(endpoint, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert any(field in map(str, item["loc"]) for item in detail), detail
    assert any(words.lower() in item["msg"].lower() for item in detail), detail


def test_forecast_with_too_short_a_history_states_the_minimum(http, price_rows):
    needed = 254 + 5  # djia-small's window is 5 days; the 252-day features need 254 warm-up rows
    for rows in (20, needed - 1):
        response = http.post("/v1/forecast", json={"rows": price_rows[-rows:]})
        assert response.status_code == 422, response.text
        message = response.json()["detail"][0]["msg"]
        assert f"has {rows} rows" in message and f"at least {needed}" in message, message
    assert http.post("/v1/forecast", json={"rows": price_rows[-needed:]}).status_code == 200  # the minimum is enough


def test_one_bad_request_never_fails_the_others_in_its_batch(http, service, price_rows):
    async def mixed():
        async with httpx.AsyncClient(base_url=service, timeout=60) as client:
            good_forecasts = [client.post("/v1/forecast", json={"rows": price_rows}) for _ in range(6)]
            bad_forecast = client.post("/v1/forecast", json={"rows": price_rows[::-1]})  # dates descending
            unreal = client.post("/v1/stock", json={"rows": price_rows[:-1] + [high_under_low]})
            trusted = client.post("/v1/stock",  # the same row vouched for: answered, one of the good
                                  json={"rows": price_rows[:-1] + [high_under_low], "trust_prices": True})
            good_prompts = [client.post("/v1/generate", json={"prompt": "the", "max_new_tokens": 20, "seed": i})
                            for i in range(6)]
            bad_prompt = client.post("/v1/generate", json={"prompt": "the ☃", "max_new_tokens": 20})
            good_texts = [client.post("/v1/sentiment", json={"texts": ["the plot was great"]}) for _ in range(6)]
            return await asyncio.gather(bad_forecast, unreal, bad_prompt, trusted, *good_forecasts, *good_prompts,
                                        *good_texts)

    high_under_low = price_rows[-1] | {"high": 1.0}
    bad_forecast, unreal, bad_prompt, *good = asyncio.run(mixed())
    assert bad_forecast.status_code == 422 and "unsorted dates" in bad_forecast.text
    assert unreal.status_code == 422 and unreal.json()["detail"][0]["loc"] == ["body", "rows"]
    assert f"row for {high_under_low['date']} cannot be real: its high (1) is under its low" in unreal.text
    assert bad_prompt.status_code == 422 and "☃" in bad_prompt.text
    assert [g.status_code for g in good] == [200] * len(good)


def test_a_bad_text_fails_only_its_own_request_in_a_gathered_batch(http, service):
    """Whitespace passes the schema and is refused by the classifier inside the Gateway's batch: per item."""
    async def mixed():
        async with httpx.AsyncClient(base_url=service, timeout=60) as client:
            bad = client.post("/v1/sentiment", json={"texts": ["a fine film", "   \n "]})
            good = [client.post("/v1/sentiment", json={"texts": [f"the plot was great {i}"]}) for i in range(8)]
            return await asyncio.gather(bad, *good)

    bad, *good = asyncio.run(mixed())
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "texts", 1], bad.text
    assert "empty" in bad.json()["detail"][0]["msg"]
    assert [g.status_code for g in good] == [200] * len(good)


def test_a_batch_larger_than_grpcs_default_message_is_answered(http):
    """The largest request the schema allows, 64 reviews of 20,000 four-byte characters (5 MB of UTF-8, under this
    service's max_body_bytes), goes to the classifier as one batch of 64. Only generation's small requests go over
    gRPC (rnnlab/serve/app.py), whose messages are capped at 4 MB; a batch like this one stays a Ray task."""
    texts = ["\N{MATHEMATICAL BOLD SMALL A}" * 20_000] * 64  # one 80 kB word each
    body = json.dumps({"texts": texts}, ensure_ascii=False).encode()
    assert len(body) > 5 * 10**6
    response = http.post("/v1/sentiment", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text[:500]
    assert [r["tokens"] for r in response.json()["results"]] == [1] * 64


def test_a_client_that_disconnects_mid_stream_frees_its_slot(http):
    before = batching(http, "/v1/charlm")["cancelled"]
    with http.stream("POST", "/v1/generate", json={"prompt": "the ", "max_new_tokens": 2000, "stream": True,
                                                   "seed": 5}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and "text" in line:
                break  # leave after the first characters
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = batching(http, "/v1/charlm")
        if stats["active"] == 0 and stats["cancelled"] > before:
            break
        time.sleep(0.2)
    assert stats["active"] == 0
    assert stats["cancelled"] == before + 1


def test_a_step_failure_fails_only_its_own_request_with_an_id_in_the_log(service):
    """Two requests whose decoding step fails (NaN scores), one streamed, one not, join a batch of four long
    streams: they get a JSON 500 / an SSE error event carrying a request id that the log names in one line, and
    the four others run to their full length."""
    long = {"prompt": "the ", "max_new_tokens": 2000, "stream": True}
    finished: dict[str, float] = {}

    async def run():
        async with httpx.AsyncClient(base_url=service, timeout=60) as client:
            started = asyncio.Event()

            async def stream(body) -> list[tuple[str, dict]]:
                events, name = [], "message"
                async with client.stream("POST", "/v1/generate", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("event: "):
                            name = line[len("event: "):]
                        elif line.startswith("data: "):
                            events.append((name, json.loads(line[len("data: "):])))
                            name = "message"
                            started.set()
                finished.setdefault(body["prompt"], time.perf_counter())  # the first long one to end
                return events

            async def faulty():
                await started.wait()  # the long streams are decoding: the faulty ones join their batch
                return await asyncio.gather(
                    client.post("/v1/generate", json={"prompt": FAULTY_PROMPT, "max_new_tokens": 50, "seed": 1}),
                    stream({"prompt": FAULTY_PROMPT, "max_new_tokens": 50, "seed": 2, "stream": True}))

            *good, (plain, streamed) = await asyncio.wait_for(
                asyncio.gather(*(stream(long | {"seed": i}) for i in range(4)), faulty()), timeout=90)
            return good, plain, streamed

    good, plain, streamed = asyncio.run(run())
    for events in good:
        assert events[-1] == ("done", {"tokens": 2000}), events[-3:]
        assert sum(len(data["text"]) for name, data in events if name == "message") == 2000
    assert finished[FAULTY_PROMPT] < finished["the "]  # the faulty ones failed while the long ones were decoding
    assert plain.status_code == 500, plain.text
    request_id = plain.json()["request_id"]
    assert request_id in plain.json()["detail"][0]["msg"]
    assert streamed[0][0] == "start" and streamed[-1][0] == "error", streamed
    ids = [request_id, streamed[-1][1]["request_id"]]
    assert ids[1] != ids[0] and ids[1] in streamed[-1][1]["detail"]

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def naming(rid: str, replica: str) -> list[str]:
        return [line for path in logs.glob(f"replica_*{replica}*") for line in path.read_text().splitlines()
                if rid in line]

    deadline = time.monotonic() + 20  # replica logs are files written asynchronously
    while True:
        failures = [[line for line in naming(rid, "charlm") if "failed" in line] for rid in ids]
        logged = [len(lines) for lines in failures] == [1, 1] and all(naming(rid, "Gateway") for rid in ids)
        if logged or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [len(lines) for lines in failures] == [1, 1], failures
    # the failure is the one line naming the request in the charlm replica's log: Serve's access line for it is
    # the Gateway's (one per HTTP request), not written again by the model replica it called
    assert [naming(rid, "charlm") for rid in ids] == failures
    assert all(naming(rid, "Gateway") for rid in ids)


# --- failing at start ------------------------------------------------------------------------------------------
def _corrupt_copy(bundles: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken" / "imdb-small"
    shutil.copytree(bundles / "imdb-small", broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8
    weights.write_bytes(bytes(data))
    return broken


def test_a_corrupt_bundle_fails_the_deployment_at_start_not_a_hang(service, bundles, tmp_path):
    from ray import serve

    from rnnlab.serve.deployments import BatchedDeployment

    broken = _corrupt_copy(bundles, tmp_path)
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        # num_cpus 0: the 2-CPU test cluster is fully booked by the main application
        serve.run(BatchedDeployment.options(name="sentiment", ray_actor_options={"num_cpus": 0})
                  .bind(str(broken), "sentiment"),
                  name="broken", route_prefix=None)
    assert time.monotonic() - start < 60
    # the bundle's own one-sentence reason is what Serve reports for the deployment
    assert "checksum" in serve.status().applications["broken"].deployments["sentiment"].message
    serve.delete("broken")


def test_a_zero_batch_size_in_user_config_fails_the_deployment_in_one_sentence(service, bundles):
    """max_batch_size: 0 in configs/serve.yaml used to leave generation admitting nothing, forever."""
    from ray import serve

    from rnnlab.errors import ConfigError
    from rnnlab.serve.app import build_app
    from rnnlab.serve.deployments import GenerationDeployment

    with pytest.raises(RuntimeError):
        serve.run(GenerationDeployment.options(name="charlm", user_config={"max_batch_size": 0},
                                             ray_actor_options={"num_cpus": 0})
                  .bind(str(bundles / "wp-small"), "charlm"), name="zero", route_prefix=None)
    message = serve.status().applications["zero"].deployments["charlm"].message
    assert "charlm max_batch_size must be a whole number of at least 1, got 0." in message
    serve.delete("zero")
    for bad in ({"max_batch_size": 0}, {"max_batch_size": 2.5}, {"batch_wait_timeout_s": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):  # the same sentence for serve run's args
            build_app({"bundles": str(bundles), **bad})


def test_cli_refuses_missing_or_corrupt_bundles_with_one_sentence(bundles, tmp_path, capsys):
    from rnnlab.launch.cli import main

    assert main(["serve", "--bundles", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "does not exist" in error

    broken = _corrupt_copy(bundles, tmp_path)
    assert main(["serve", "--bundles", str(broken.parent)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "imdb-small" in error

    (tmp_path / "empty").mkdir()
    assert main(["serve", "--bundles", str(tmp_path / "empty")]) == 2
    assert "No model bundles" in capsys.readouterr().err


def test_cli_binds_localhost_by_default():
    from rnnlab.launch.cli import build_parser

    args = build_parser().parse_args(["serve", "--bundles", "x"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
