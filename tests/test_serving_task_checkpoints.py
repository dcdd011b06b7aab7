"""Task checkpoints behind the server: classifiers, extractive QA, encoder-decoders and LSTMs answer the
task endpoints exactly as the Python API does; what the engine cannot decode is a clear 400."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.models.heads import SequenceClassifier, SpanExtractor
from lmforge.serving import create_app
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import save_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow!"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT + " 0123456789?"], "char")


def checkpoint(tmp_path_factory, tokenizer, family: str, task: dict | None = None, head=None) -> LanguageModel:
    torch.manual_seed(0)
    model = build_model(ModelConfig(family=family, n_layer=2, n_head=2, n_embd=32, block_size=128,
                                    vocab_size=tokenizer.vocab_size))
    if head is not None:
        model = head(model)
    path = tmp_path_factory.mktemp(family)
    save_checkpoint(path, model, tokenizer, info={"task": task} if task else None)
    return LanguageModel.load(path, device="cpu")


def test_a_classifier_scores_its_own_labels(tmp_path_factory, tokenizer):
    task = {"kind": "classification", "labels": ["ham", "eggs", "spam"], "multi_label": False, "pooling": "first"}
    lm = checkpoint(tmp_path_factory, tokenizer, "encoder", task, lambda m: SequenceClassifier(m, 3))
    expected = lm.classify(TEXT)
    with TestClient(create_app(lm)) as client:
        body = client.post("/v1/classify", json={"text": TEXT}).json()
        assert [s["label"] for s in body["scores"]] == ["ham", "eggs", "spam"]
        assert [s["probability"] for s in body["scores"]] == pytest.approx(list(expected.scores.values()), abs=1e-5)
        assert body["label"] == expected.label
        subset = client.post("/v1/classify", json={"text": TEXT, "labels": ["spam", "ham"]}).json()
        assert [s["label"] for s in subset["scores"]] == ["spam", "ham"]
        unknown = client.post("/v1/classify", json={"text": TEXT, "labels": ["ham", "toast"]})
        assert unknown.status_code == 400 and "unknown label" in unknown.json()["error"]["message"]
        refused = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_model"
        assert "/v1/classify" in refused.json()["error"]["message"]
        wrong_task = client.post("/v1/answer", json={"question": "who?", "context": TEXT})
        assert wrong_task.status_code == 400 and "it can classify" in wrong_task.json()["error"]["message"]
        assert client.get("/health").status_code == 200


def test_a_multi_label_classifier_reports_independent_labels(tmp_path_factory, tokenizer):
    task = {"kind": "classification", "labels": ["a", "b"], "multi_label": True, "pooling": "first",
            "thresholds": [0.0, 1.0]}
    lm = checkpoint(tmp_path_factory, tokenizer, "encoder", task, lambda m: SequenceClassifier(m, 2))
    with TestClient(create_app(lm)) as client:
        body = client.post("/v1/classify", json={"text": TEXT}).json()
    assert body["labels"] == ["a"]  # over its threshold of 0; b never reaches 1
    assert [s["probability"] for s in body["scores"]] == pytest.approx(list(lm.classify(TEXT).scores.values()),
                                                                       abs=1e-5)


def test_an_extractive_qa_model_answers_with_a_span(tmp_path_factory, tokenizer):
    lm = checkpoint(tmp_path_factory, tokenizer, "encoder", {"kind": "qa", "stride": 16}, SpanExtractor)
    expected = lm.answer("who judges?", TEXT)
    with TestClient(create_app(lm)) as client:
        body = client.post("/v1/answer", json={"question": "who judges?", "context": TEXT}).json()
    assert (body["answer"], body["start"], body["end"]) == (expected.text, expected.start, expected.end)
    assert body["score"] == pytest.approx(expected.score, abs=1e-4)
    assert TEXT[body["start"]:body["end"]] == body["answer"]


def test_an_encoder_decoder_translates_and_generates(tmp_path_factory, tokenizer):
    lm = checkpoint(tmp_path_factory, tokenizer, "seq2seq", {"kind": "seq2seq", "purpose": "translation"})
    with TestClient(create_app(lm)) as client:
        body = client.post("/v1/translate", json={"text": "the fox", "target_language": "German",
                                                  "max_tokens": 6}).json()
        assert body["translation"] == lm.translate("the fox", max_new_tokens=6)
        assert body["usage"]["prompt_tokens"] == len("the fox")
        text = client.post("/v1/generate", json={"prompt": "a dog", "max_tokens": 5, "temperature": 0}).json()
        assert text["text"] == lm.generate("a dog", max_new_tokens=5, temperature=0)
        refused = client.post("/v1/summarize", json={"text": "the fox"})
        assert refused.status_code == 400 and "cannot summarize" in refused.json()["error"]["message"]


def test_an_lstm_generates_through_the_task_endpoint_not_the_engine(tmp_path_factory, tokenizer):
    lm = checkpoint(tmp_path_factory, tokenizer, "lstm")
    with TestClient(create_app(lm)) as client:
        body = client.post("/v1/generate", json={"prompt": "the ", "max_tokens": 8, "temperature": 0}).json()
        assert body["text"] == lm.generate("the ", max_new_tokens=8, temperature=0).strip()
        refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_model"
