"""``lmforge serve`` in its own process, as a user runs it, with a tiny model: the official openai client,
concurrency, disconnects, the full queue, auth, limits, malformed requests, /metrics and the request log."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cli_helpers import CLI, lmforge
from prometheus_client.parser import text_string_to_metric_families

from lmforge.training.checkpoint import save_checkpoint
from serving_helpers import MESSAGES, PROMPT, assert_error, make_lm, sse_events

KEY = "e2e-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The ", "Pack my box with five", "q", "How vexingly quick daft zebras", "Sph", "dozen liquor jugs!",
           "Sphinx of black quartz, judge", "0123", "The lazy dog", "fox", "jumps over", "Pack", "my box",
           "with five dozen", "liquor", "zebras jump;"]


class ServeProcess:
    """``lmforge serve CHECKPOINT --port 0``-style: a free port, started and waited for, stopped at the end."""

    def __init__(self, checkpoint: Path, *flags: str):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [*CLI, "serve", str(checkpoint), "--port", str(self.port), "--device", "cpu", "--dtype", "fp32",
                   *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail("the server exited: " + self.process.stderr.read())
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail("the server did not become ready")

    def stop(self) -> str:
        self.http.close()
        self.process.terminate()
        _, stderr = self.process.communicate(timeout=30)
        return stderr

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = self.http.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    lm = make_lm()
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", lm.model, lm.tokenizer)


@pytest.fixture(scope="module")
def server(checkpoint):
    running = ServeProcess(checkpoint, "--api-key", KEY, "--max-batch-size", "4", "--max-queue", "32",
                           "--max-body-size", "4096", "--log-prompts")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def complete(server: ServeProcess, prompt: str, **options) -> dict:
    response = server.http.post("/v1/completions", headers=AUTH,
                                json={"prompt": prompt, "temperature": 0, "max_tokens": 24, **options})
    assert response.status_code == 200, response.text
    return response.json()


def test_openai_client_completions_and_chat_streamed_or_not(server, checkpoint):
    openai = pytest.importorskip("openai")
    from lmforge.api import LanguageModel

    lm = LanguageModel.load(checkpoint, device="cpu")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    [model] = client.models.list().data
    expected = lm.complete(PROMPT, temperature=0, max_new_tokens=30)[0]
    result = client.completions.create(model=model.id, prompt=PROMPT, max_tokens=30, temperature=0)
    assert result.choices[0].text == expected.text
    assert result.usage.completion_tokens == len(expected.token_ids)
    stream = client.completions.create(model=model.id, prompt=PROMPT, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected.text

    chat = lm.chat(MESSAGES, temperature=0, max_new_tokens=20)
    reply = client.chat.completions.create(model=model.id, messages=MESSAGES, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == chat.text
    stream = client.chat.completions.create(model=model.id, messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.text
    assert chunks[-1].usage.completion_tokens == len(chat.token_ids)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_sixteen_concurrent_clients_get_what_each_gets_alone(server):
    alone = [complete(server, p)["choices"][0]["text"] for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: complete(server, p)["choices"][0]["text"], PROMPTS))
    assert together == alone


def test_a_client_that_disconnects_frees_its_slot(server):
    before = server.metrics()
    cancelled = ("lmforge_requests_total", (("endpoint", "/v1/completions"), ("outcome", "cancelled")))
    with server.http.stream("POST", "/v1/completions", headers=AUTH,
                            json={"prompt": "The ", "max_tokens": 150, "ignore_eos": True, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 10
    while True:
        now = server.metrics()
        if now[("lmforge_num_requests_running", ())] == 0 and now.get(cancelled, 0) > before.get(cancelled, 0):
            break
        assert time.monotonic() < deadline, "the request kept its slot"
        time.sleep(0.05)
    assert now[("lmforge_generation_tokens_total", ())] - before[("lmforge_generation_tokens_total", ())] < 150


def test_a_full_queue_answers_429_with_retry_after(checkpoint):
    small = ServeProcess(checkpoint, "--max-batch-size", "2", "--max-queue", "2", "--no-request-log")
    try:
        small.wait_ready()
        body = {"prompt": "The ", "max_tokens": 150, "ignore_eos": True}
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: small.http.post("/v1/completions", json=body), range(12)))
        statuses = [r.status_code for r in responses]
        # The queue always holds 2; how many more get in depends on when the engine admits the first
        # ones into the batch (2 rows) while the 12 requests arrive.
        assert statuses.count(200) >= 2 and set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert_error(refused, 429, "queue_full")
        assert int(refused.headers["retry-after"]) >= 1
        assert small.http.post("/v1/completions", json={"prompt": "The ", "max_tokens": 2}).status_code == 200
    finally:
        small.stop()


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("post", "/v1/completions", {"json": {"prompt": "a"}}, 401),                        # no key
    ("get", "/v1/models", {"headers": {"Authorization": "Bearer nope"}}, 401),
    ("post", "/v1/completions", {"content": b"{oops", "headers": AUTH}, 400),
    ("post", "/v1/completions", {"json": {"prompt": "a", "max_tokens": -1}, "headers": AUTH}, 400),
    ("post", "/v1/completions", {"json": {"prompt": "a", "temperature": "hot"}, "headers": AUTH}, 400),
    ("post", "/v1/completions", {"json": {"prompt": "a", "top_k": 1.5}, "headers": AUTH}, 400),
    ("post", "/v1/completions", {"json": {"prompt": "a", "seed": -3}, "headers": AUTH}, 400),
    ("post", "/v1/completions", {"json": {"prompt": "a", "model": "nope"}, "headers": AUTH}, 404),
    ("post", "/v1/completions", {"json": {"prompt": "x" * 5000}, "headers": AUTH}, 413),   # over --max-body-size
    ("post", "/v1/completions", {"json": {"prompt": "The quick brown fox " * 9}, "headers": AUTH}, 400),
    ("post", "/v1/completions", {"json": [1, 2], "headers": AUTH}, 400),
    ("post", "/v1/chat/completions", {"json": {"messages": "hi"}, "headers": AUTH}, 400),
    ("post", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                                      "headers": AUTH}, 400),
    ("post", "/v1/classify", {"json": {"text": "a", "labels": [1, 2]}, "headers": AUTH}, 400),
    ("post", "/detokenize", {"json": {"tokens": [-1]}, "headers": AUTH}, 400),
    ("get", "/v1/completions", {"headers": AUTH}, 405),
    ("post", "/v2/anything", {"json": {}, "headers": AUTH}, 404),
])
def test_malformed_requests_get_openai_errors_and_the_server_goes_on(server, method, path, kwargs, status):
    assert_error(getattr(server.http, method)(path, **kwargs), status)
    assert server.http.get("/health").status_code == 200
    assert complete(server, "The ", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_metrics_parse_and_stream_usage_is_exact(server):
    events = sse_events(server.http.post("/v1/completions", headers=AUTH, json={
        "prompt": PROMPT, "max_tokens": 9, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}).text)
    assert events[-1]["usage"]["completion_tokens"] == 9
    metrics = server.metrics()
    names = {name for name, _ in metrics}
    for name in ("lmforge_requests_total", "lmforge_num_requests_waiting", "lmforge_num_requests_running",
                 "lmforge_time_to_first_token_seconds_bucket", "lmforge_inter_token_latency_seconds_bucket",
                 "lmforge_e2e_request_latency_seconds_bucket", "lmforge_prompt_tokens_total",
                 "lmforge_generation_tokens_total"):
        assert name in names, name
    assert metrics[("lmforge_requests_total", (("endpoint", "/v1/completions"), ("outcome", "ok")))] >= 1


def test_serve_loads_behind_health_and_keeps_a_request_log(checkpoint, tmp_path):
    log = tmp_path / "log.sqlite3"
    running = ServeProcess(checkpoint, "--request-log", str(log))
    try:
        running.wait_ready()
        complete(running, "The ", max_tokens=3)
        assert_error(running.http.post("/v1/completions", json={"prompt": "a", "n": 99}), 400)
    finally:
        stderr = running.stop()
    assert "Traceback" not in stderr
    result = lmforge("requests", log, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["requests"] == 2 and "The " not in result.stdout  # prompts only with --log-prompts
