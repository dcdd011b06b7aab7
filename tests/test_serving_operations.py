"""Running a server: Prometheus metrics, body size limit, request timeout, loading behind /health."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lmforge.api import LanguageModel
from lmforge.errors import CheckpointError
from lmforge.serving import create_app
from serving_helpers import PROMPT, assert_error, make_lm, slowed, sse_events

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return make_lm()


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client: {(name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_requests_tokens_and_latencies(lm):
    with TestClient(create_app(lm, max_batch_size=2)) as c:
        before = scrape(c)
        assert before[("lmforge_model_ready", ())] == 1.0
        assert before[("lmforge_num_requests_waiting", ())] == 0 and before[("lmforge_num_requests_running", ())] == 0
        usages = [c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                                  "ignore_eos": True}).json()["usage"] for n in (5, 9)]
        stream = sse_events(c.post("/v1/completions", json={"prompt": "The ", "max_tokens": 7, "stream": True,
                                                            "ignore_eos": True,
                                                            "stream_options": {"include_usage": True}}).text)
        usages.append(stream[-1]["usage"])
        assert_error(c.post("/v1/completions", json={"prompt": "a", "top_p": 9}), 400)
        assert_error(c.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}), 400)
        after = scrape(c)
    ok = ("lmforge_requests_total", (("endpoint", "/v1/completions"), ("outcome", "ok")))
    assert after[ok] == 3
    assert after[("lmforge_requests_total", (("endpoint", "/v1/completions"), ("outcome", "client_error")))] == 1
    assert after[("lmforge_requests_total", (("endpoint", "/v1/chat/completions"), ("outcome", "client_error")))] == 1
    assert after[("lmforge_prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
    # the second request repeats the first one's prompt: its whole 16-token blocks (but the last token)
    # came from the prefix cache
    assert after[("lmforge_prefix_cache_hit_tokens_total", ())] == (usages[1]["prompt_tokens"] - 1) // 16 * 16 == 16
    assert after[("lmforge_generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages) == 21
    assert after[("lmforge_time_to_first_token_seconds_count", ())] == 3
    assert after[("lmforge_inter_token_latency_seconds_count", ())] == 21 - 3
    assert after[("lmforge_e2e_request_latency_seconds_count", (("endpoint", "/v1/completions"),))] == 4
    assert after[("lmforge_request_queue_time_seconds_count", ())] == 3


def test_request_bodies_over_the_limit_are_413(lm):
    with TestClient(create_app(lm, max_body_bytes=2000)) as c:
        big = {"prompt": "x" * 3000}
        assert_error(c.post("/v1/completions", json=big), 413)

        def chunks():  # no Content-Length: the limit holds while the body streams in
            yield b'{"prompt": "'
            for _ in range(30):
                yield b"x" * 100
            yield b'"}'

        assert_error(c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
        assert c.post("/v1/completions", json={"prompt": "The ", "max_tokens": 2}).status_code == 200


def test_a_generation_past_the_request_timeout_is_408_and_frees_its_slot():
    lm = make_lm()
    slowed(lm, 0.02)
    app = create_app(lm, request_timeout=0.3)
    with TestClient(app) as c:
        long = {"prompt": "The ", "max_tokens": 100, "ignore_eos": True}
        error = assert_error(c.post("/v1/completions", json=long), 408, "request_timeout")
        assert "0.3 s" in error["message"]
        events = sse_events(c.post("/v1/completions", json={**long, "stream": True}).text)
        assert events[-1]["error"]["code"] == "request_timeout" and events[0]["choices"][0]["text"]
        engine = app.state.server.engine
        deadline = time.monotonic() + 5
        while engine.num_running or engine.num_waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.post("/v1/completions", json={"prompt": "The ", "max_tokens": 3}).status_code == 200
        outcomes = scrape(c)
    assert outcomes[("lmforge_requests_total", (("endpoint", "/v1/completions"), ("outcome", "timeout")))] == 2


def test_health_is_503_while_the_model_loads_and_200_once_ready(lm):
    release = threading.Event()

    def load() -> LanguageModel:
        release.wait(10)
        return lm

    with TestClient(create_app(load, model_name="tiny")) as c:
        health = c.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        assert_error(c.post("/v1/completions", json={"prompt": "a"}), 503, "model_not_ready")
        assert scrape(c)[("lmforge_model_ready", ())] == 0
        release.set()
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]


def test_a_model_that_fails_to_load_is_reported():
    failures = []

    def load() -> LanguageModel:
        raise CheckpointError("checkpoint nowhere does not exist")

    with TestClient(create_app(load, on_load_error=failures.append)) as c:
        deadline = time.monotonic() + 5
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.get("/health").json() == {"status": "failed"}
        error = assert_error(c.post("/v1/completions", json={"prompt": "a"}), 503)
        assert "does not exist" in error["message"]
    assert isinstance(failures[0], CheckpointError)


def test_the_web_page_is_served_with_a_strict_content_security_policy(lm):
    with TestClient(create_app(lm, api_key="k")) as c:
        page = c.get("/")  # public, like /health: the page asks for the key itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "<html" in page.text.lower()
