"""The OpenAI-compatible server: routes, SSE streaming, errors, auth, and the official openai client."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from lmforge.api import LanguageModel
from lmforge.inference.engine import Result
from lmforge.serving import create_app
from serving_helpers import MESSAGES, NAME, PROMPT, Server, assert_error, make_lm, slowed, sse_events

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return make_lm()


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, model_name=NAME, max_batch_size=4)) as c:
        yield c


# ------------------------------------------------------------------------------------------
# Routes through TestClient
# ------------------------------------------------------------------------------------------
def test_health_and_models(client, lm):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert models["data"][0]["object"] == "model"


def test_completion_greedy_equals_the_python_api_and_usage_is_exact(client, lm):
    expected = lm.complete(PROMPT, temperature=0, max_new_tokens=40)[0]
    assert len(set(expected.token_ids)) >= 5
    body = client.post("/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 40,
                                                "temperature": 0, "unknown_field": 1}).json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    [choice] = body["choices"]
    assert choice["text"] == expected.text and choice["finish_reason"] == expected.finish_reason
    prompt_tokens = len(lm.encode_prompt(PROMPT)[0])
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert cached in (0, 16)  # 16 if an earlier test sent the same prompt
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(expected.token_ids),
                             "total_tokens": prompt_tokens + len(expected.token_ids)}


def test_usage_reports_the_prompt_tokens_taken_from_the_prefix_cache(lm):
    prompt = "The quick brown fox jumps over the lazy dog. Pack"  # 49 tokens: 48 can come from the cache
    request = {"prompt": prompt, "max_tokens": 5, "temperature": 0}
    with TestClient(create_app(lm, max_batch_size=1)) as c:
        first = c.post("/v1/completions", json=request).json()
        second = c.post("/v1/completions", json=request).json()
        streamed = sse_events(c.post("/v1/completions", json={**request, "stream": True, "n": 2, "stream_options": {
            "include_usage": True}}).text)[-1]
        cold = TestClient(create_app(lm, prefix_cache_tokens=0))
        with cold:
            off = [cold.post("/v1/completions", json=request).json() for _ in range(2)]
    assert first["usage"]["prompt_tokens"] == 49
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    # n = 2: the prompt is counted once, and so are its cached tokens
    assert streamed["usage"]["prompt_tokens"] == 49
    assert streamed["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}
    assert [o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in off] == [0, 0]
    assert off[1]["choices"][0]["text"] == first["choices"][0]["text"]


def test_streamed_completion_joins_to_the_non_streamed_text(client, lm):
    request = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    whole = client.post("/v1/completions", json=request).json()
    response = client.post("/v1/completions", json={**request, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(response.text)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stop_text_never_in_the_output(client, lm):
    full = lm.complete(PROMPT, temperature=0, max_new_tokens=40)[0].text
    stop = full[5:8]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                                                        "stop": [stop, "never seen"], "stream": stream})
        if stream:
            text = "".join(c["choices"][0]["text"] for c in sse_events(response.text))
        else:
            text = response.json()["choices"][0]["text"]
            assert response.json()["choices"][0]["finish_reason"] == "stop"
        assert text == cut


def test_n_samples_with_seeds_and_several_prompts(client, lm):
    request = {"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "n": 3, "seed": 11}
    first = client.post("/v1/completions", json=request).json()
    again = client.post("/v1/completions", json=request).json()
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2] and texts == [c["text"] for c in again["choices"]]
    assert len(set(texts)) > 1  # seed + i: different samples
    one = client.post("/v1/completions", json={**request, "n": 1, "seed": 12}).json()
    assert one["choices"][0]["text"] == texts[1]
    assert first["usage"]["prompt_tokens"] == len(lm.encode_prompt(PROMPT)[0])

    prompts = ["The ", "Sph"]
    body = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 15, "temperature": 0}).json()
    assert [c["text"] for c in body["choices"]] == [c.text for p in prompts
                                                    for c in lm.complete(p, temperature=0, max_new_tokens=15)]


def test_chat_completion_and_stream(client, lm):
    expected = lm.chat(MESSAGES, temperature=0, max_new_tokens=30)
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0,
                                                     "max_completion_tokens": 30}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["usage"]["prompt_tokens"] == len(lm.chat_prompt(MESSAGES))
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    chunks = sse_events(client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0,
                                                                  "max_tokens": 30, "stream": True}).text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason


def test_tokenize_and_detokenize(client, lm):
    body = client.post("/tokenize", json={"prompt": PROMPT}).json()
    assert body["tokens"] == lm.encode_prompt(PROMPT)[0] and body["count"] == len(body["tokens"])
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": PROMPT}
    assert_error(client.post("/detokenize", json={"tokens": [10**6]}), 400)


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"prompt": 3}, 400, None),
    ("/v1/completions", {}, 400, None),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, None),
    ("/v1/completions", {"prompt": "a", "top_p": 2}, 400, None),
    ("/v1/completions", {"prompt": "a", "max_tokens": "many"}, 400, None),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, None),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, 400, None),
    ("/v1/completions", {"prompt": []}, 400, None),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, None),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 2.5}, 400, None),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, None),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model_not_found"),
    ("/v1/completions", {"prompt": "The quick brown fox " * 10}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "The quick brown fox " * 10}]}, 400,
     "context_length_exceeded"),
    ("/v1/nothing", {}, 404, None),
])
def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(client, path, body, status, code):
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert_error(response, status, code)
    ok = client.post("/v1/completions", json={"prompt": "The ", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_full_queue_is_429_with_retry_after(lm):
    with TestClient(create_app(lm, max_queue=0)) as c:
        response = c.post("/v1/completions", json={"prompt": "The ", "max_tokens": 3})
        assert_error(response, 429, "queue_full")
        assert response.headers["retry-after"]


def test_api_key(lm):
    with TestClient(create_app(lm, api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert_error(c.get("/v1/models", headers=headers), 401, "invalid_api_key")
            assert_error(c.post("/v1/completions", json={"prompt": "a"}, headers=headers), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=good).status_code == 200


# ------------------------------------------------------------------------------------------
# A real uvicorn server and the official openai client
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(lm):
    with Server(create_app(lm, model_name=NAME, api_key="k")) as running:
        yield running


def test_openai_client_completions(server, lm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    expected = lm.complete(PROMPT, temperature=0, max_new_tokens=30)[0]
    result = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0)
    assert result.choices[0].text == expected.text and result.choices[0].finish_reason == expected.finish_reason
    assert result.usage.completion_tokens == len(expected.token_ids)
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.total_tokens == result.usage.total_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=PROMPT, temperature=-1)


def test_openai_client_chat(server, lm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    expected = lm.chat(MESSAGES, temperature=0, max_new_tokens=25)
    result = client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=25, temperature=0)
    assert result.choices[0].message.content == expected.text and result.choices[0].message.role == "assistant"
    assert result.usage.prompt_tokens == len(lm.chat_prompt(MESSAGES))
    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=25, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text


def test_client_disconnect_cancels_its_request():
    lm = make_lm()
    prompt = "The "
    assert lm.complete(prompt, temperature=0, max_new_tokens=120)[0].finish_reason == "length"
    slowed(lm, 0.01)
    app = create_app(lm, max_batch_size=2)
    results = []

    def spy(*args, listener, **kwargs):  # record the Result the server sees
        def recording(event):
            if isinstance(event, Result):
                results.append(event)
            listener(event)

        return submit(*args, listener=recording, **kwargs)

    with Server(app) as running:
        engine = app.state.server.engine
        submit = engine.submit
        engine.submit = spy
        with httpx.Client(base_url=running.url) as http, http.stream(
                "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 120, "temperature": 0,
                                                 "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 10
        while not results or engine.num_running:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.01)
        assert results[0].finish_reason == "cancelled" and results[0].completion_tokens < 120


# ------------------------------------------------------------------------------------------
# Log-probabilities and penalties
# ------------------------------------------------------------------------------------------
def reference_logprobs(lm: LanguageModel, ids: list[int], completion: list[int]) -> torch.Tensor:
    """(len(completion), V) raw log-probabilities of each completion position, by one full forward pass."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids + completion]))[0, len(ids) - 1:-1].float()
    return logits.log_softmax(-1)


def test_completion_logprobs_in_openais_legacy_format(client, lm):
    request = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    choice = client.post("/v1/completions", json=request).json()["choices"][0]
    tokens = lm.complete(PROMPT, temperature=0, max_new_tokens=12, ignore_eos=True)[0].token_ids
    expected = reference_logprobs(lm, lm.encode_prompt(PROMPT)[0], tokens)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [lm.tokenizer.decode([t]) for t in tokens]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["token_logprobs"] == pytest.approx(expected.gather(1, torch.tensor(tokens)[:, None])[:, 0]
                                                       .tolist(), abs=1e-4)
    for step, top in enumerate(logprobs["top_logprobs"]):
        best = torch.topk(expected[step], 3)
        assert list(top) == [lm.tokenizer.decode([i]) for i in best.indices.tolist()]
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert logprobs["text_offset"] == [len(PROMPT) + len(choice["text"][:i]) for i in range(len(tokens))]

    stream = sse_events(client.post("/v1/completions", json={**request, "stream": True}).text)
    streamed = [c["choices"][0]["logprobs"] for c in stream if c["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [x for part in streamed for x in part[key]] == logprobs[key]


def test_chat_logprobs_with_bytes(client, lm):
    request = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    choice = client.post("/v1/chat/completions", json=request).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert bytes(entry["bytes"]).decode() == entry["token"] and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the best token
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    no_top = client.post("/v1/chat/completions", json={**request, "top_logprobs": None}).json()
    assert all(entry["top_logprobs"] == [] for entry in no_top["choices"][0]["logprobs"]["content"])
    plain = client.post("/v1/chat/completions", json={**request, "logprobs": False, "top_logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_presence_and_frequency_penalties_reach_the_sampler(client, lm):
    request = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    for penalties in ({"presence_penalty": 1.5}, {"frequency_penalty": 0.9}):
        expected = lm.complete(PROMPT, temperature=0, max_new_tokens=30, ignore_eos=True, **penalties)[0].text
        body = client.post("/v1/completions", json={**request, **penalties}).json()
        assert body["choices"][0]["text"] == expected
    assert expected != client.post("/v1/completions", json=request).json()["choices"][0]["text"]
