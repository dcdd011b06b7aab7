"""The server's web page (``GET /``) in a real headless Chromium driven by Playwright, against a real
uvicorn server: streamed completion equal to the API's answer, chat, the task tabs, the API key, errors
shown as the server wrote them, and model output and error messages rendered as text, never as HTML.

Needs Debian's ``chromium`` (``/usr/bin/chromium``, or ``$LMFORGE_CHROMIUM``) and the ``playwright``
package (``make install-test`` installs both); without them the module is skipped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from lmforge.serving import create_app
from serving_helpers import NAME, PROMPT, Server, make_lm

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"the browser test needs Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the browser test needs playwright (pip install playwright)")
expect = sync_api.expect

# No sandbox (root in a container), no GPU, and nothing that phones home: the machine may be offline.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.environ.get("LMFORGE_PAGE_SCREENSHOT")  # set to a .png path to look at the page
EVIL = '<img src=x onerror="window.__pwned=1"><b>bold</b><script>window.__pwned=2</script>'

pytestmark = pytest.mark.usefixtures("one_thread")


def slow_lm():
    """The tiny model of test_serving, 5 ms a forward pass: the stream reaches the page in many pieces."""
    lm = make_lm()
    lm.model.register_forward_hook(lambda *args: time.sleep(0.005))
    return lm


@pytest.fixture(scope="module")
def server():
    with Server(create_app(slow_lm(), model_name=NAME)) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    """A fresh page at ``url``; returns it and the list its script errors and CSP violations go to."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("console", lambda message: problems.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text else None)
    page.goto(url + "/")
    return page, problems


@pytest.fixture
def page(browser, server):
    page, problems = open_page(browser, server.url)
    expect(page.locator("#model-name")).to_have_text(NAME)
    yield page
    page.context.close()
    assert problems == []


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def sse(*events: object) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def fulfill_sse(body: str):
    return lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body)


def assert_no_injected_markup(page) -> None:
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img, main script, .output b, .chat-log b, #error *").count() == 0


# ------------------------------------------------------------------------------------------
def test_a_greedy_completion_streams_the_same_text_as_the_api(page, server):
    assert "160" in page.text_content("#model-context")
    for tab in ("complete", "chat", "summarize", "translate", "classify", "answer"):
        expect(page.locator(f"#tab-{tab}")).to_be_visible()
    expect(page.locator("#stop")).to_be_disabled()

    page.fill("#prompt", PROMPT)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "60")
    page.evaluate("""() => {  // the output's length at every DOM update, to see the text arrive in pieces
        const out = document.getElementById("completion-text");
        window.__lengths = [];
        new MutationObserver(() => window.__lengths.push(out.textContent.length))
            .observe(out, {childList: true, characterData: true, subtree: true});
    }""")
    with page.expect_request("**/v1/completions") as sent:
        page.click("#generate")
    expect(page.locator("#completion-stats")).to_contain_text("tokens/s")

    body = sent.value.post_data_json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["prompt"] == PROMPT and body["temperature"] == 0 and body["max_tokens"] == 60
    expected = post(server, "/v1/completions", {**body, "stream": False}).json()
    text = expected["choices"][0]["text"]
    assert len(text) > 10
    assert page.text_content("#completion-echo") == PROMPT
    assert page.text_content("#completion-text") == text
    usage = expected["usage"]
    assert page.text_content('#completion-stats [data-stat="prompt-tokens"] b') == str(usage["prompt_tokens"])
    assert page.text_content('#completion-stats [data-stat="completion-tokens"] b') == str(usage["completion_tokens"])
    assert page.text_content('#completion-stats [data-stat="finish"] b') == expected["choices"][0]["finish_reason"]
    lengths = page.evaluate("window.__lengths")
    assert len({n for n in lengths if 0 < n < len(text)}) >= 2, lengths  # several partial texts were shown
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#error")).to_be_hidden()
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)


def test_stop_ends_a_generation_and_keeps_its_text(page):
    page.fill("#prompt", "The ")
    page.fill("#max-tokens", "150")  # 150 steps of 5 ms at least: Stop comes well before the end
    page.click("#generate")
    expect(page.locator("#completion-text")).not_to_have_text("")
    expect(page.locator("#stop")).to_be_enabled()
    page.click("#stop")
    expect(page.locator('#completion-stats [data-stat="finish"] b')).to_have_text("stopped")
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    assert 0 < len(page.text_content("#completion-text")) < 150
    expect(page.locator("#error")).to_be_hidden()


def test_chat_keeps_the_conversation_and_new_chat_clears_it(page, server):
    page.click("#tab-chat")
    expect(page.locator("#panel-chat")).to_be_visible()
    expect(page.locator("#panel-complete")).to_be_hidden()
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "15")
    page.fill("#chat-system", "Be brief.")
    page.fill("#chat-input", "The quick brown fox?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.press("#chat-input", "Enter")
    expect(page.locator("#chat-stats")).to_contain_text("tokens/s")
    body = sent.value.post_data_json
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "The quick brown fox?"}]
    reply = post(server, "/v1/chat/completions", {**body, "stream": False}).json()["choices"][0]["message"]["content"]
    assert page.locator("#chat-log .msg").all_text_contents() == ["user" + "The quick brown fox?", "assistant" + reply]
    assert page.text_content("#chat-log .msg.assistant .content") == reply
    assert page.input_value("#chat-input") == ""

    page.fill("#chat-input", "Sphinx?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#chat-send")
    expect(page.locator("#chat-log .msg.assistant")).to_have_count(2)
    expect(page.locator("#chat-send")).to_be_enabled()
    assert sent.value.post_data_json["messages"][1:] == [{"role": "user", "content": "The quick brown fox?"},
                                                         {"role": "assistant", "content": reply},
                                                         {"role": "user", "content": "Sphinx?"}]
    page.click("#chat-new")
    expect(page.locator("#chat-log .msg")).to_have_count(0)


def test_model_output_and_error_messages_are_text_not_html(page):
    # a completion stream whose text is markup, split across chunks
    pieces = [EVIL[:7], EVIL[7:30], EVIL[30:]]
    page.route("**/v1/completions", fulfill_sse(sse(
        *({"choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces),
        {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}, "[DONE]")))
    page.fill("#prompt", "<i>prompt</i>")
    page.click("#generate")
    expect(page.locator("#completion-stats")).to_contain_text("tokens/s")
    assert page.text_content("#completion-text") == EVIL
    assert page.text_content("#completion-echo") == "<i>prompt</i>"
    assert page.locator("#completion-output *").count() == 2  # the two spans, nothing inside them
    assert_no_injected_markup(page)

    # the same in a chat reply
    page.route("**/v1/chat/completions", fulfill_sse(sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": EVIL}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]")))
    page.click("#tab-chat")
    page.fill("#chat-input", "<u>hi</u>")
    page.click("#chat-send")
    expect(page.locator("#chat-log .msg.assistant .content")).to_have_text(EVIL)
    expect(page.locator("#chat-log .msg.user .content")).to_have_text("<u>hi</u>")
    assert page.locator("#chat-log .content *").count() == 0
    assert_no_injected_markup(page)

    # an error in the middle of a stream: the text so far stays, the message is shown as text
    page.click("#tab-complete")
    message = '<img src=x onerror="window.__pwned=3"> generation failed'
    page.unroute("**/v1/completions")
    page.route("**/v1/completions", fulfill_sse(sse(
        {"choices": [{"index": 0, "text": "partial", "finish_reason": None}]},
        {"error": {"message": message, "type": "internal_error", "param": None, "code": None}})))
    page.click("#generate")
    expect(page.locator("#error")).to_have_text(message)
    assert page.text_content("#completion-text") == "partial"
    assert_no_injected_markup(page)

    # a task that fails: the server's JSON error message, as text
    page.route("**/v1/classify", lambda route: route.fulfill(
        status=400, content_type="application/json",
        body=json.dumps({"error": {"message": "labels: <b>two</b> or more are needed", "type": "invalid_request_error",
                                   "param": "labels", "code": None}})))
    page.click("#tab-classify")
    expect(page.locator("#sampling")).to_be_hidden()
    page.fill("#classify-text", "I loved it")
    page.fill("#classify-labels", "positive")
    page.click("#classify-run")
    expect(page.locator("#error")).to_have_text("labels: <b>two</b> or more are needed")
    assert page.text_content("#classify-output") == ""
    assert_no_injected_markup(page)


def test_the_servers_error_messages_are_shown(page, server):
    page.fill("#prompt", PROMPT)
    page.fill("#top-p", "5")
    with page.expect_request("**/v1/completions") as sent:
        page.click("#generate")
    response = post(server, "/v1/completions", sent.value.post_data_json)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "top_p" in message
    expect(page.locator("#error")).to_have_text(message)
    expect(page.locator("#generate")).to_be_enabled()

    # text that is not a number is caught before sending
    page.fill("#top-p", "")
    page.fill("#max-tokens", "2.5")
    page.click("#generate")
    expect(page.locator("#error")).to_have_text("max_tokens must be a whole number, not 2.5")

    # a task route, whatever it answers now: the page shows the answer or the server's error message
    page.click("#tab-summarize")
    with page.expect_request("**/v1/summarize") as sent:
        page.click("#summarize-run")
    expect(page.locator("#summarize-run")).to_be_enabled()
    response = post(server, "/v1/summarize", sent.value.post_data_json)
    if response.status_code >= 400:
        expect(page.locator("#error")).to_have_text(response.json()["error"]["message"])
        assert page.text_content("#summarize-output") == ""
    else:
        expect(page.locator("#error")).to_be_hidden()
        assert page.text_content("#summarize-output") == response.json()["summary"]


def test_the_api_key_is_sent_and_kept_for_the_session(browser):
    with Server(create_app(make_lm(), model_name=NAME, api_key="s3cret")) as server:
        page, problems = open_page(browser, server.url)
        expect(page.locator("#model-name")).to_have_text("unavailable")
        expect(page.locator("#model-context")).to_contain_text("API key")
        page.fill("#api-key", "s3cret")
        page.press("#api-key", "Tab")  # "change": the model is fetched again, with the key
        expect(page.locator("#model-name")).to_have_text(NAME)
        page.reload()
        expect(page.locator("#model-name")).to_have_text(NAME)
        assert page.input_value("#api-key") == "s3cret"
        page.fill("#prompt", "The ")
        page.fill("#max-tokens", "5")
        with page.expect_request("**/v1/completions") as sent:
            page.click("#generate")
        expect(page.locator("#completion-stats")).to_contain_text("tokens/s")
        assert sent.value.headers["authorization"] == "Bearer s3cret"
        page.context.close()
        assert problems == []
