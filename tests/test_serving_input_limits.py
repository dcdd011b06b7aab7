"""The server's input checks, by class of input: text that is not valid Unicode (lone surrogates) on every
text field of every route, ``max_tokens`` against the context, ``stop`` lists, and chat messages without
content. Every refusal is a 400 in OpenAI's error shape naming the offending field; none is a 500."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmforge.api import LanguageModel
from lmforge.errors import DataError, LmforgeError
from lmforge.serving import create_app
from lmforge.serving.schemas import MAX_STOP, MAX_STOP_CHARS
from serving_helpers import NAME, assert_error, make_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return make_lm()


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, model_name=NAME, max_batch_size=4)) as c:
        yield c


def post_raw(client: TestClient, path: str, body: Any, utf8_surrogates: bool = False):
    """POST ``body`` as JSON text. Python's json writes a lone surrogate as the escape ``\\ud800`` (what a
    client's JSON text holds); with ``utf8_surrogates`` it is written as its 3 raw bytes instead
    (``\\xed\\xa0\\x80``, not valid UTF-8, which Python's json still reads back as the surrogate)."""
    if utf8_surrogates:
        content = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    else:
        content = json.dumps(body).encode("ascii")
    return client.post(path, content=content, headers={"content-type": "application/json"})


def assert_still_serving(client: TestClient) -> None:
    ok = client.post("/v1/completions", json={"prompt": "The ", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


# ------------------------------------------------------------------------------------------
# Text that is not valid Unicode
# ------------------------------------------------------------------------------------------
# Lone surrogates, each at a known first bad character: alone, at either end, reversed, mid-text.
INVALID = {
    "lone-high": ("\ud800", 0),
    "lone-low": ("\udfff", 0),
    "reversed-pair": ("\ude00\ud83d", 0),
    "high-mid-text": ("ab\ud83dcd", 2),
    "low-mid-text": ("The \udc00 fox", 4),
    "high-at-end": ("Pack my box\udbff", 11),
    "after-an-astral-character": ("\U0001F600x\udc01", 2),  # sent as a valid surrogate pair: one character
}
# Odd but valid text: must be served. An astral character is sent as the escaped pair "\ud83d\ude00".
VALID = {"astral": "\U0001F600", "nul": "a\u0000b", "noncharacter": "\uffff\ufffe", "bom": "\ufeffok"}

ONE = {"max_tokens": 1, "temperature": 0}
USER = {"role": "user", "content": "hi"}

# (route, body holding the text t, the param the refusal names): every text field of every route.
TEXT_FIELDS: list[tuple[str, Callable[[str], dict], str]] = [
    ("/v1/completions", lambda t: {"prompt": t, **ONE}, "prompt"),
    ("/v1/completions", lambda t: {"prompt": ["ok", t], **ONE}, "prompt.1"),
    ("/v1/completions", lambda t: {"prompt": "a", "stop": t, **ONE}, "stop"),
    ("/v1/completions", lambda t: {"prompt": "a", "stop": ["zz", t], **ONE}, "stop.1"),
    ("/v1/completions", lambda t: {"prompt": "a", "user": t, **ONE}, "user"),
    ("/v1/completions", lambda t: {"prompt": "a", "model": t, **ONE}, "model"),
    ("/v1/completions", lambda t: {"prompt": "a", "suffix": t, **ONE}, "suffix"),
    ("/v1/completions", lambda t: {"prompt": "a", "unknown_field": {"deep": [t]}, **ONE}, "unknown_field.deep.0"),
    ("/v1/chat/completions", lambda t: {"messages": [{"role": "user", "content": t}], **ONE}, "messages.0.content"),
    ("/v1/chat/completions", lambda t: {"messages": [{"role": "system", "content": t}, USER], **ONE},
     "messages.0.content"),
    ("/v1/chat/completions", lambda t: {"messages": [{"role": "developer", "content": t}, USER], **ONE},
     "messages.0.content"),
    ("/v1/chat/completions", lambda t: {"messages": [USER, {"role": "assistant", "content": t}, USER], **ONE},
     "messages.1.content"),
    ("/v1/chat/completions", lambda t: {"messages": [USER, {"role": "user", "content": [
        {"type": "text", "text": "ok "}, {"type": "text", "text": t}]}], **ONE}, "messages.1.content.1.text"),
    ("/v1/chat/completions", lambda t: {"messages": [USER], "stop": [t], **ONE}, "stop.0"),
    ("/v1/chat/completions", lambda t: {"messages": [USER], "user": t, **ONE}, "user"),
    ("/v1/generate", lambda t: {"prompt": t, **ONE}, "prompt"),
    ("/v1/generate", lambda t: {"prompt": "a", "stop": t, **ONE}, "stop"),
    ("/v1/summarize", lambda t: {"text": t, **ONE}, "text"),
    ("/v1/translate", lambda t: {"text": t, "target_language": "French", **ONE}, "text"),
    ("/v1/translate", lambda t: {"text": "hi", "target_language": t, **ONE}, "target_language"),
    ("/v1/translate", lambda t: {"text": "hi", "target_language": "French", "source_language": t, **ONE},
     "source_language"),
    ("/v1/answer", lambda t: {"question": t, "context": "The fox.", **ONE}, "question"),
    ("/v1/answer", lambda t: {"question": "Who?", "context": t, **ONE}, "context"),
    ("/v1/classify", lambda t: {"text": t, "labels": ["dog", "fox"]}, "text"),
    ("/v1/classify", lambda t: {"text": "a fox", "labels": ["dog", t]}, "labels.1"),
    ("/tokenize", lambda t: {"prompt": t}, "prompt"),
]
FIELD_IDS = [f"{route}:{param}" for route, _, param in TEXT_FIELDS]


@pytest.mark.parametrize("utf8_surrogates", [False, True], ids=["json-escape", "raw-bytes"])
@pytest.mark.parametrize("route, body, param", TEXT_FIELDS, ids=FIELD_IDS)
def test_invalid_code_points_in_any_text_field_are_a_400_naming_the_field(client, route, body, param,
                                                                           utf8_surrogates):
    for name, (text, index) in INVALID.items():
        response = post_raw(client, route, body(text), utf8_surrogates)
        error = assert_error(response, 400, "invalid_code_point")
        assert error["type"] == "invalid_request_error" and error["param"] == param, (name, error)
        message = error["message"]
        assert "\n" not in message and "lone surrogate" in message and f"at character {index}" in message, name
        assert f"U+{ord(text[index]):04X}" in message
        assert message.isascii() or all(not 0xD800 <= ord(c) <= 0xDFFF for c in message)
    assert_still_serving(client)


@pytest.mark.parametrize("route, body, param", TEXT_FIELDS, ids=FIELD_IDS)
def test_odd_but_valid_text_in_any_text_field_is_served(client, route, body, param):
    for name, text in VALID.items():
        response = post_raw(client, route, body(text))
        if param == "model":  # a valid name, just not this server's
            assert_error(response, 404, "model_not_found")
        elif param == "suffix":  # refused whatever it holds
            assert_error(response, 400)
        else:
            assert response.status_code == 200, (name, response.text)


@pytest.mark.parametrize("content", [b'"\\ud800"', b'["\\udc00"]', b'{"prompt": "ok", "\\ud800": "key"}',
                                     b'{"prompt": "a\xff"}', b'{"prompt": "\xed\xa0"}', b"\xff\xfe"])
def test_odd_bodies_are_400s(client, content):
    for route in ("/v1/completions", "/v1/chat/completions", "/v1/summarize", "/tokenize"):
        response = client.post(route, content=content, headers={"content-type": "application/json"})
        assert response.status_code in (400, 200) and response.status_code != 500, response.text
        if response.status_code == 400:
            assert_error(response, 400)
    assert_still_serving(client)


@pytest.mark.parametrize("name", list(INVALID))
def test_the_tokenizer_refuses_invalid_code_points_with_a_one_line_data_error(lm, name):
    text, index = INVALID[name]
    tokenizer = lm.tokenizer
    for encode, given in ((tokenizer.encode, text), (tokenizer.encode_with_special, "<|eos|>" + text)):
        with pytest.raises(DataError, match=f"invalid code point U\\+{ord(text[index]):04X}") as caught:
            encode(given)
        message = str(caught.value)
        shift = len(given) - len(text)
        assert "\n" not in message and "lone surrogate" in message and f"at character {index + shift}" in message
    with pytest.raises(LmforgeError, match="lone surrogate"):  # and so the Python API, not a TypeError
        lm.complete(text, max_new_tokens=1)


def test_the_tokenizer_still_encodes_valid_text_and_refuses_non_text_as_before(lm):
    tokenizer = lm.tokenizer
    for text in VALID.values():
        assert tokenizer.encode_with_special("<|eos|>" + text)[1:] == tokenizer.encode(text)
    with pytest.raises(TypeError):
        tokenizer.encode(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# max_tokens against the model's context
# ------------------------------------------------------------------------------------------
ABSURD = [1, 2, 10**9, 10**30]  # past the context by this much (+ context)


@pytest.mark.parametrize("route, base, field", [
    ("/v1/completions", {"prompt": "The "}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [USER]}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [USER]}, "max_completion_tokens"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_beyond_the_context_is_a_400_naming_the_field(client, lm, route, base, field, stream):
    context = lm.context_length
    for extra in ABSURD:
        value = context + extra if extra < 10**9 else extra
        response = client.post(route, json={**base, field: value, "stream": stream})
        error = assert_error(response, 400, "invalid_value")
        assert error["param"] == field and str(context) in error["message"] and "\n" not in error["message"]
    assert_still_serving(client)


@pytest.mark.parametrize("route, base, field", [
    ("/v1/completions", {"prompt": "The "}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [USER]}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [USER]}, "max_completion_tokens"),
])
def test_max_tokens_up_to_the_context_is_capped_to_the_room_the_prompt_leaves(client, lm, route, base, field):
    context = lm.context_length
    for value in (context, context - 1):
        body = client.post(route, json={**base, field: value, "temperature": 0, "ignore_eos": True}).json()
        usage = body["usage"]
        assert usage["total_tokens"] == context, body  # capped: prompt + completion fill the context
        assert body["choices"][0]["finish_reason"] == "length"


def test_chat_without_max_tokens_gets_the_rest_of_the_context(client, lm):
    body = client.post("/v1/chat/completions", json={"messages": [USER], "temperature": 0, "ignore_eos": True})
    assert body.status_code == 200
    assert body.json()["usage"]["total_tokens"] == lm.context_length


@pytest.mark.parametrize("route, base", [
    ("/v1/generate", {"prompt": "The "}), ("/v1/summarize", {"text": "a fox"}),
    ("/v1/translate", {"text": "a fox", "target_language": "French"}),
    ("/v1/answer", {"question": "Who?", "context": "A fox."}),
])
def test_task_endpoints_with_an_absurd_max_tokens_never_fail(client, lm, route, base):
    response = client.post(route, json={**base, "max_tokens": 10**9, "ignore_eos": True})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert assert_error(response, 400)["param"] == "max_tokens"
    fits = client.post(route, json={**base, "max_tokens": lm.context_length, "ignore_eos": True})
    assert fits.status_code == 200, fits.text


@pytest.mark.parametrize("route, base", [
    ("/v1/generate", {"prompt": "The "}), ("/v1/summarize", {"text": "a fox"}),
    ("/v1/translate", {"text": "a fox", "target_language": "French"}),
    ("/v1/answer", {"question": "Who?", "context": "A fox."}),
])
def test_task_endpoints_refuse_max_tokens_beyond_the_context(client, lm, route, base):
    error = assert_error(client.post(route, json={**base, "max_tokens": lm.context_length + 1}), 400)
    assert error["param"] == "max_tokens"


# ------------------------------------------------------------------------------------------
# stop sequences
# ------------------------------------------------------------------------------------------
STOP_ROUTES = [("/v1/completions", {"prompt": "The ", **ONE}), ("/v1/chat/completions", {"messages": [USER], **ONE}),
               ("/v1/generate", {"prompt": "The ", **ONE}), ("/v1/summarize", {"text": "a fox", **ONE})]
STOP_IDS = [route for route, _ in STOP_ROUTES]


@pytest.mark.parametrize("route, base", STOP_ROUTES, ids=STOP_IDS)
def test_up_to_the_stop_limit_is_served(client, route, base):
    for stop in ([], ["zq"], [f"zq{i}" for i in range(MAX_STOP)], "zq", " ", "x" * MAX_STOP_CHARS,
                 ["x" * MAX_STOP_CHARS] * MAX_STOP, None):
        response = client.post(route, json={**base, "stop": stop})
        assert response.status_code == 200, (stop if not isinstance(stop, list) else len(stop), response.text)


@pytest.mark.parametrize("route, base", STOP_ROUTES, ids=STOP_IDS)
def test_bad_stop_values_are_a_400_naming_stop(client, route, base):
    bad: list[Any] = [[f"zq{i}" for i in range(n)] for n in (MAX_STOP + 1, 16, 1000)]
    bad += ["", [""], ["ok", ""], "x" * (MAX_STOP_CHARS + 1), ["ok", "x" * (MAX_STOP_CHARS + 1)], "x" * 100_000,
            [1], ["ok", None], [["nested"]], 5, True, {"a": "b"}]
    for stop in bad:
        error = assert_error(client.post(route, json={**base, "stop": stop}), 400)
        assert error["param"] == "stop" and error["type"] == "invalid_request_error", error
        assert "\n" not in error["message"]
    assert_still_serving(client)


@pytest.mark.parametrize("route, base", STOP_ROUTES, ids=STOP_IDS)
def test_temperature_is_in_openais_range(client, route, base):
    for temperature in (0, 0.7, 2):
        assert client.post(route, json={**base, "temperature": temperature}).status_code == 200
    for temperature in (-0.1, 2.01, 1e9, "hot"):
        error = assert_error(client.post(route, json={**base, "temperature": temperature}), 400)
        assert error["param"] == "temperature", error


# ------------------------------------------------------------------------------------------
# Chat messages without content
# ------------------------------------------------------------------------------------------
ROLES = ["system", "developer", "user", "assistant"]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("missing", [False, True], ids=["null", "missing"])
def test_a_message_without_content_is_a_400_naming_it(client, role, missing):
    message = {"role": role} if missing else {"role": role, "content": None}
    for messages, index in (([message, USER], 0), ([USER, message, USER], 1), ([USER, message], 1)):
        error = assert_error(client.post("/v1/chat/completions", json={"messages": messages, **ONE}), 400)
        assert error["param"] == f"messages.{index}.content", error
        assert "\n" not in error["message"]
    assert_still_serving(client)


@pytest.mark.parametrize("role", ROLES)
def test_a_message_with_empty_or_text_part_content_is_served(client, role):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    for content in ("", [{"type": "text", "text": "hi"}], parts):
        messages = [{"role": role, "content": content}, USER]
        response = client.post("/v1/chat/completions", json={"messages": messages, **ONE})
        assert response.status_code == 200, (content, response.text)


@pytest.mark.parametrize("content", [5, True, {"text": "hi"}, [{"type": "image_url", "image_url": {"url": "x"}}],
                                     [{"type": "text", "text": 5}], ["hi"]])
def test_a_message_with_other_content_is_a_400_naming_messages(client, content):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **ONE})
    error = assert_error(response, 400)
    assert error["param"] is not None and error["param"].startswith("messages"), error


# ------------------------------------------------------------------------------------------
# The param of other validation errors names the field, not pydantic's union member
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": 3}, "prompt"),
    ("/v1/completions", {"prompt": [3]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/tokenize", {"prompt": ["a"]}, "prompt"),
])
def test_validation_errors_name_the_field(client, route, body, param):
    error = assert_error(client.post(route, json=body), 400)
    assert error["param"] == param, error
    assert "str:" not in error["message"] and "list[" not in error["message"], error["message"]
