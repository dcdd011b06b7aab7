"""Task endpoints (/v1/generate, summarize, translate, classify, answer): equal to the Python API, errors, and
a task-specialised model plugged in."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lmforge.api import LanguageModel
from lmforge.evaluation.harness import CLASSIFICATION_TEMPLATE, QA_TEMPLATE, label_scores
from lmforge.serving import create_app
from lmforge.serving.task_routes import SUMMARIZE_TEMPLATE, TRANSLATE_TEMPLATE, TaskAnswer
from serving_helpers import NAME, assert_error, make_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return make_lm()


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, model_name=NAME)) as c:
        yield c


def expected(lm: LanguageModel, prompt: str, max_tokens: int) -> tuple[str, dict]:
    """The Python API's greedy answer (stripped, as the endpoints answer) and the usage."""
    completion = lm.complete(prompt, temperature=0, max_new_tokens=max_tokens)[0]
    prompt_tokens = len(lm.encode_prompt(prompt)[0])
    return completion.text.strip(), {"prompt_tokens": prompt_tokens, "completion_tokens": len(completion.token_ids),
                                     "total_tokens": prompt_tokens + len(completion.token_ids)}


def test_generate_summarize_translate_answer_equal_the_python_api(client, lm):
    cases = [
        ("/v1/generate", {"prompt": "Pack my box", "temperature": 0, "max_tokens": 20}, "text", "Pack my box", 20),
        ("/v1/summarize", {"text": TEXT, "max_tokens": 12}, "summary", SUMMARIZE_TEMPLATE.format(text=TEXT), 12),
        ("/v1/translate", {"text": TEXT, "source_language": "English", "target_language": "German",
                           "max_tokens": 10}, "translation",
         TRANSLATE_TEMPLATE.format(text=TEXT, source="English", target="German"), 10),
        ("/v1/answer", {"question": "Who jumps?", "context": TEXT, "max_tokens": 8}, "answer",
         QA_TEMPLATE.format(context=TEXT, question="Who jumps?"), 8),
    ]
    for path, body, field, prompt, max_tokens in cases:
        answer = client.post(path, json=body)
        assert answer.status_code == 200, answer.text
        text, usage = expected(lm, prompt, max_tokens)
        assert answer.json()[field] == text and answer.json()["usage"] == usage, path
        assert answer.json()["model"] == NAME and answer.json()["finish_reason"] in ("stop", "length")


def test_classify_scores_every_label_by_likelihood(client, lm):
    labels = ["dog", "fox", "zebra", "quartz sphinx"]
    body = client.post("/v1/classify", json={"text": TEXT, "labels": labels}).json()
    reference = label_scores(lm, [TEXT], labels, CLASSIFICATION_TEMPLATE)[0]
    assert [s["label"] for s in body["scores"]] == labels
    assert [s["logprob"] for s in body["scores"]] == pytest.approx(reference.tolist(), abs=1e-4)
    assert sum(s["probability"] for s in body["scores"]) == pytest.approx(1.0)
    assert [s["probability"] for s in body["scores"]] == pytest.approx(reference.softmax(-1).tolist(), abs=1e-6)
    assert body["label"] == labels[int(reference.argmax())]


def test_a_chat_model_gets_the_task_as_a_user_message(lm):
    chat_lm = make_lm()
    chat_lm.tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                                       "<|assistant|> :")
    messages = [{"role": "user", "content": SUMMARIZE_TEMPLATE.format(text="Sphinx of black quartz")}]
    reference = chat_lm.chat(messages, temperature=0, max_new_tokens=10)
    with TestClient(create_app(chat_lm)) as c:
        body = c.post("/v1/summarize", json={"text": "Sphinx of black quartz", "max_tokens": 10}).json()
    assert body["summary"] == reference.text.strip()
    assert body["usage"]["prompt_tokens"] == len(chat_lm.chat_prompt(messages))


class KeywordTasks:
    """A stand-in for a task-specialised checkpoint: what the endpoints call, nothing about decoders."""

    async def summarize(self, request, text, sampling):
        return TaskAnswer(text.split()[0], "stop", len(text), 1)

    async def translate(self, request, text, source, target, sampling):
        return TaskAnswer(f"[{target}] {text}", "stop", len(text), len(text))

    async def answer(self, request, question, context, sampling):
        return TaskAnswer(context.split()[-1], "stop", len(context), 1)

    async def classify(self, request, text, labels):
        return [0.0 if label in text else -10.0 for label in labels]


def test_a_task_specialised_model_plugs_in(lm):
    app = create_app(lm)
    with TestClient(app) as c:
        app.state.server.tasks = KeywordTasks()
        assert c.post("/v1/summarize", json={"text": "Foxes jump"}).json()["summary"] == "Foxes"
        assert c.post("/v1/translate", json={"text": "hi", "target_language": "fr"}).json()["translation"] == "[fr] hi"
        assert c.post("/v1/answer", json={"question": "?", "context": "a b c"}).json()["answer"] == "c"
        assert c.post("/v1/classify", json={"text": "a fox", "labels": ["dog", "fox"]}).json()["label"] == "fox"


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/generate", {}, 400, None),
    ("/v1/generate", {"prompt": "a", "stream": True}, 400, None),
    ("/v1/generate", {"prompt": "a", "n": 2}, 400, None),
    ("/v1/generate", {"prompt": "The quick brown fox " * 10}, 400, "context_length_exceeded"),
    ("/v1/summarize", {"text": ""}, 400, None),
    ("/v1/summarize", {"text": "a", "max_tokens": 0}, 400, None),
    ("/v1/summarize", {"text": "The quick brown fox " * 10}, 400, "context_length_exceeded"),
    ("/v1/translate", {"text": "a"}, 400, None),
    ("/v1/answer", {"question": "a"}, 400, None),
    ("/v1/answer", {"question": "a", "context": "b", "temperature": -1}, 400, None),
    ("/v1/classify", {"text": "a", "labels": []}, 400, None),
    ("/v1/classify", {"text": "a", "labels": ["x", "x"]}, 400, None),
    ("/v1/classify", {"text": "a", "labels": ["x", " "]}, 400, None),
    ("/v1/classify", {"text": "a", "labels": "x"}, 400, None),
    ("/v1/classify", {"text": "a", "labels": ["x"], "model": "other"}, 404, "model_not_found"),
])
def test_bad_task_requests_are_openai_errors(client, path, body, status, code):
    assert_error(client.post(path, json=body), status, code)
    assert client.post("/v1/classify", json={"text": "a", "labels": ["x", "y"]}).status_code == 200
