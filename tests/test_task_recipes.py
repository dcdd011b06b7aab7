"""Task models end to end: fine-tune (from scratch or a checkpoint) through the one loop, load the
checkpoint with LanguageModel, use the task methods, and evaluate with the harness."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest

from conftest import read_jsonl
from lmforge.api import LanguageModel
from lmforge.config import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneTrainConfig,
    ModelConfig,
    PretrainConfig,
    TrainConfig,
)
from lmforge.errors import ConfigError, DataError, RequestError
from lmforge.evaluation import evaluate
from lmforge.recipes.finetune import finetune, resolve_task
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import read_config

TOPICS = {"sport": ["ball", "goal", "team"], "food": ["soup", "bread", "cake"], "music": ["song", "drum", "band"]}
FILLER = ["the", "a", "we", "saw", "today", "and", "then", "very", "good", "old"]


def topic_text(rng: random.Random, topics: list[str]) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    for topic in topics:
        words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[topic]))
    return " ".join(words)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def char_tokenizer(folder: Path, texts: list[str]) -> Path:
    Tokenizer.train(texts, "char").save(folder)
    return folder


def tiny(family: str, **overrides) -> ModelConfig:
    values = dict(family=family, n_layer=2, n_head=2, n_embd=32, block_size=64)
    values.update(overrides)
    return ModelConfig(**values)


def train_options(**overrides) -> FinetuneTrainConfig:
    values = dict(max_steps=150, lr=3e-3, warmup_steps=10, batch_size=16, eval_interval=50, eval_windows=64,
                  final_eval_windows=None, save_interval=0, log_interval=10, progress=False, dtype="fp32",
                  device="cpu", seed=3)
    values.update(overrides)
    return FinetuneTrainConfig(**values)


# ------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classification_files(tmp_path_factory):
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("cls")
    rows = [(topic_text(rng, [t]), t) for t in rng.choices(list(TOPICS), k=400)]
    csv_file = folder / "train.csv"
    csv_file.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows), encoding="utf-8")
    multi = [{"text": topic_text(rng, ts), "labels": ts}
             for ts in (rng.sample(list(TOPICS), rng.randint(1, 2)) for _ in range(400))]
    write_jsonl(folder / "multi.jsonl", multi)
    tokenizer = char_tokenizer(folder / "tok", [t for t, _ in rows] + [r["text"] for r in multi])
    return folder, tokenizer


@pytest.fixture(scope="module")
def encoder_classifier(tmp_path_factory, classification_files):
    folder, tokenizer = classification_files
    out = tmp_path_factory.mktemp("cls-run")
    config = FinetuneConfig(tokenizer=str(tokenizer), model=tiny("encoder"), out=str(out),
                            data=FinetuneDataConfig(path=str(folder / "train.csv"), val_fraction=0.2),
                            train=train_options())
    result = finetune(config)
    return out, result


def test_encoder_classifier_learns_and_records_its_labels(encoder_classifier):
    out, result = encoder_classifier
    records = read_jsonl(out / "metrics.jsonl")
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] / 3
    assert result.metrics["val_accuracy"] > 0.9
    task = read_config(result.best_checkpoint)["task"]
    assert task == {"kind": "classification", "labels": ["food", "music", "sport"], "multi_label": False,
                    "pooling": "first", "thresholds": None}


def test_mean_pooling_and_the_best_checkpoint_by_accuracy(tmp_path, classification_files):
    folder, tokenizer = classification_files
    config = FinetuneConfig(tokenizer=str(tokenizer), model=tiny("encoder"), out=str(tmp_path / "run"),
                            pooling="mean",
                            data=FinetuneDataConfig(path=str(folder / "train.csv"), val_fraction=0.2),
                            train=train_options(max_steps=60, eval_interval=20, best_metric="accuracy"))
    result = finetune(config)
    assert read_config(result.best_checkpoint)["task"]["pooling"] == "mean"
    accuracies = {r["step"]: r["val_accuracy"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
                  if "val_accuracy" in r}
    assert result.best_val_loss == -max(accuracies.values())  # the best is the most accurate evaluation
    lm = LanguageModel.load(result.best_checkpoint, device="cpu")
    report = evaluate(lm, "classification", str(folder / "train.csv"), progress=False)
    assert report["metrics"]["accuracy"] > 0.8

    config.train.best_metric, config.out = "bleu", str(tmp_path / "wrong")
    with pytest.raises(ConfigError, match="'bleu' is not among this task's validation metrics: loss, accuracy"):
        finetune(config)
    with pytest.raises(ConfigError, match="pooling must be one of"):
        FinetuneConfig(tokenizer=str(tokenizer), pooling="max").validate()


def test_classifier_api_and_harness(encoder_classifier, classification_files, tmp_path):
    out, _ = encoder_classifier
    lm = LanguageModel.load(out, device="cpu")
    assert lm.capabilities == ("classify",)
    result = lm.classify("we saw the drum today")
    assert result.label == "music" and result.labels == ["music"]
    assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-5)
    batch = lm.classify(["the soup and the bread", "a goal today"])
    assert [r.label for r in batch] == ["food", "sport"]
    subset = lm.classify("the soup", labels=["food", "sport"])
    assert set(subset.scores) == {"food", "sport"} and sum(subset.scores.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(RequestError, match="unknown label"):
        lm.classify("x", labels=["food", "politics"])
    with pytest.raises(RequestError, match=r"classifier \(encoder family\): it cannot generate; it can classify"):
        lm.generate("hello")
    with pytest.raises(RequestError, match="cannot answer"):
        lm.answer("Who?", "Nobody.")
    test = tmp_path / "test.jsonl"
    write_jsonl(test, [{"text": "a song by the band", "label": "music"}, {"text": "the cake", "label": "food"}])
    report = evaluate(lm, "classification", str(test), progress=False)
    assert report["metrics"]["accuracy"] == 1.0 and report["labels"] == ["food", "music", "sport"]


def test_multi_label_classifier_tunes_thresholds(tmp_path, classification_files):
    folder, tokenizer = classification_files
    config = FinetuneConfig(tokenizer=str(tokenizer), model=tiny("encoder"), out=str(tmp_path / "run"),
                            data=FinetuneDataConfig(path=str(folder / "multi.jsonl"), val_fraction=0.2),
                            train=train_options(max_steps=200))
    assert resolve_task(config) == "classification"
    result = finetune(config)
    assert result.metrics["val_micro_f1"] > 0.85
    task = read_config(result.final_checkpoint)["task"]
    assert task["multi_label"] is True and len(task["thresholds"]) == 3
    assert all(0.0 < t < 1.0 for t in task["thresholds"])
    lm = LanguageModel.load(result.final_checkpoint, device="cpu")
    both = lm.classify("the drum and the soup")
    assert sorted(both.labels) == ["food", "music"]
    assert sum(both.scores.values()) > 1.2  # independent sigmoids, not a softmax


def test_decoder_checkpoint_gets_a_classification_head(tmp_path, trained_run, char_data):
    rng = random.Random(1)
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": topic_text(rng, [t]), "label": t}
                                                 for t in rng.choices(list(TOPICS), k=300)])
    config = FinetuneConfig(checkpoint=str(trained_run), out=str(tmp_path / "run"),
                            data=FinetuneDataConfig(path=str(data), val_fraction=0.2),
                            train=train_options(max_steps=400, lr=1e-3))
    result = finetune(config)
    assert read_config(result.final_checkpoint)["task"]["pooling"] == "last"
    assert result.metrics["val_accuracy"] > 0.9
    lm = LanguageModel.load(result.final_checkpoint, device="cpu")
    assert lm.model.config.family == "decoder" and lm.classify("the song").label == "music"


def test_fine_tuning_dropout_overrides_the_checkpoints(tmp_path, encoder_classifier, classification_files):
    folder, tokenizer = classification_files
    out, trained = encoder_classifier
    assert read_config(trained.final_checkpoint)["model"]["dropout"] == 0.0
    config = FinetuneConfig(checkpoint=str(trained.final_checkpoint), dropout=0.2, out=str(tmp_path / "run"),
                            data=FinetuneDataConfig(path=str(folder / "train.csv"), val_fraction=0.2),
                            train=train_options(max_steps=2, eval_interval=0))
    result = finetune(config)
    assert read_config(result.final_checkpoint)["model"]["dropout"] == 0.2
    lm = LanguageModel.load(result.final_checkpoint, device="cpu")
    assert {block.dropout for block in lm.model.backbone.blocks} == {0.2}
    for bad, message in ((dict(dropout=1.0), "dropout must be in [0, 1), not 1.0"),
                         (dict(checkpoint=None, tokenizer=str(tokenizer), dropout=0.1),
                          "dropout overrides a base checkpoint's; from scratch, set model.dropout")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            finetune(dataclasses.replace(config, **bad))


def test_zero_shot_classification_with_a_language_model(lm):
    result = lm.classify("def f(x): return x", labels=["code", "poem"])
    assert set(result.scores) == {"code", "poem"} and sum(result.scores.values()) == pytest.approx(1.0, abs=1e-5)
    from lmforge.evaluation.harness import label_scores

    expected = label_scores(lm, ["def f(x): return x"], ["code", "poem"]).softmax(-1)[0]
    assert result.scores["code"] == pytest.approx(float(expected[0]), abs=1e-5)
    with pytest.raises(RequestError, match="candidate labels"):
        lm.classify("text")


def test_classification_data_errors(tmp_path, classification_files):
    folder, tokenizer = classification_files
    bad = tmp_path / "bad.csv"
    bad.write_text("text,category\nhello,a\n", encoding="utf-8")
    config = FinetuneConfig(tokenizer=str(tokenizer), model=tiny("encoder"), out=str(tmp_path / "run"),
                            data=FinetuneDataConfig(path=str(bad)), train=train_options())
    with pytest.raises(DataError, match="no column 'label'"):
        finetune(config)
    one_label = tmp_path / "one.csv"
    one_label.write_text("text,label\n" + "hello,a\n" * 30, encoding="utf-8")
    config.data.path = str(one_label)
    with pytest.raises(DataError, match="at least two labels"):
        finetune(config)
    config.data.path = str(folder / "train.csv")
    config.lora.r = 4
    with pytest.raises(ConfigError, match="LoRA"):
        finetune(config)


# ------------------------------------------------------------------------------------------
# Masked-language modelling
# ------------------------------------------------------------------------------------------
def test_mlm_pretraining_of_an_encoder_then_fill_mask(tmp_path, char_data):
    from lmforge.recipes.pretrain import pretrain

    model = tiny("encoder", block_size=64, n_embd=64, position="rope")  # learns to read neighbours fast
    options = dict(max_steps=600, lr=2e-3, warmup_steps=50, batch_size=16, eval_interval=100, eval_windows=8,
                   final_eval_windows=16, save_interval=0, log_interval=10, progress=False, dtype="fp32",
                   device="cpu")
    config = PretrainConfig(data=str(char_data), out=str(tmp_path / "mlm"), model=model, train=TrainConfig(**options))
    assert config.resolved_objective == "mlm"
    result = pretrain(config)
    records = read_jsonl(tmp_path / "mlm" / "metrics.jsonl")
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.5
    lm = LanguageModel.load(tmp_path / "mlm", device="cpu")
    assert lm.kind == "masked_lm" and lm.capabilities == ("fill_mask",)
    assert lm.tokenizer.mask_id == lm.tokenizer.vocab_size - 1
    guesses = lm.fill_mask("The quick brown fox jumps <|mask|>ver the lazy dog.", top_k=3)
    assert len(guesses) == 1 and len(guesses[0]) == 3
    assert guesses[0][0][1] >= guesses[0][1][1] >= guesses[0][2][1]
    with pytest.raises(RequestError, match="no <|mask|>"):
        lm.fill_mask("no mask here")
    with pytest.raises(RequestError, match=r"masked-language model \(encoder family\): it cannot perplexity"):
        lm.perplexity("hello")
    assert result.metrics["val_loss"] < evals[0]


def test_objective_must_fit_the_family(char_data, tmp_path):
    config = PretrainConfig(data=str(char_data), out=str(tmp_path), model=tiny("decoder"), objective="mlm")
    with pytest.raises(ConfigError, match="mlm objective does not fit the decoder"):
        config.validate()
    config = PretrainConfig(data=str(char_data), out=str(tmp_path), model=tiny("seq2seq"))
    assert config.resolved_objective == "denoise"
    config.validate()
    config = PretrainConfig(data=str(char_data), out=str(tmp_path), model=tiny("seq2seq"), objective="clm")
    with pytest.raises(ConfigError, match="clm objective does not fit the seq2seq family"):
        config.validate()
    config = PretrainConfig(data=str(char_data), out=str(tmp_path), model=tiny("decoder"), objective="denoise")
    with pytest.raises(ConfigError, match="denoise objective does not fit the decoder family"):
        config.validate()
    config = PretrainConfig(data=str(char_data), out=str(tmp_path), model=tiny("seq2seq"), denoise_mean_span=0.5)
    with pytest.raises(ConfigError, match="denoise_mean_span must be at least 1"):
        config.validate()


# ------------------------------------------------------------------------------------------
# Extractive QA
# ------------------------------------------------------------------------------------------
FACTS = {"colour": ["red", "blue", "green", "pink"], "animal": ["cat", "dog", "owl", "eel"],
         "city": ["Rome", "Oslo", "Lima", "Baku"]}


def qa_record(rng: random.Random) -> dict:
    kinds = rng.sample(list(FACTS), 3)
    values = {kind: rng.choice(FACTS[kind]) for kind in kinds}
    context = " ".join(f"The {kind} is {values[kind]}." for kind in kinds)
    asked = rng.choice(kinds)
    start = context.index(f"The {asked} is ") + len(f"The {asked} is ")
    return {"context": context, "question": f"What is the {asked}?",
            "answers": {"text": [values[asked]], "answer_start": [start]}}


def qa_config(folder: Path, steps: int, **options) -> tuple[FinetuneConfig, Path]:
    """A QA run from scratch on 600 synthetic questions: (config, data file)."""
    rng = random.Random(2)
    records = [qa_record(rng) for _ in range(600)]
    data = write_jsonl(folder / "qa.jsonl", records)
    tokenizer = char_tokenizer(folder / "tok", [r["context"] + r["question"] for r in records])
    config = FinetuneConfig(tokenizer=str(tokenizer), model=tiny("encoder", block_size=96, n_embd=64, position="rope"),
                            out=str(folder / "run"), data=FinetuneDataConfig(path=str(data), val_fraction=0.1),
                            train=train_options(max_steps=steps, lr=2e-3, eval_interval=100), **options)
    return config, data


def test_extractive_qa_learns_spans_and_maps_them_to_characters(tmp_path):
    config, data = qa_config(tmp_path, steps=600)
    assert resolve_task(config) == "qa"
    result = finetune(config)
    assert result.metrics["val_f1"] > 60
    lm = LanguageModel.load(result.best_checkpoint, device="cpu")
    assert lm.capabilities == ("answer",)
    context = "The city is Oslo. The colour is pink. The animal is owl."
    answer = lm.answer("What is the colour?", context)
    assert (answer.text, context[answer.start:answer.end]) == ("pink", "pink")
    report = evaluate(lm, "qa", str(data), limit=50, progress=False)
    assert report["metrics"]["f1"] > 60


def test_qa_with_question_match_features(tmp_path):
    config, _ = qa_config(tmp_path, steps=300, question_match=True)
    result = finetune(config)
    assert result.metrics["val_f1"] > 60
    task = read_config(result.best_checkpoint)["task"]
    assert task["kind"] == "qa" and task["separator_id"] == Tokenizer.load(config.tokenizer).eos_id
    lm = LanguageModel.load(result.best_checkpoint, device="cpu")
    context = "The animal is eel. The city is Lima. The colour is blue."
    answer = lm.answer("What is the city?", context)
    assert (answer.text, context[answer.start:answer.end]) == ("Lima", "Lima")


def test_classifier_with_an_ngram_bag(tmp_path, classification_files):
    folder, tokenizer = classification_files
    config = FinetuneConfig(tokenizer=str(tokenizer), model=tiny("encoder"), out=str(tmp_path / "run"),
                            ngram_buckets=4096, ngram_lr=0.05,
                            data=FinetuneDataConfig(path=str(folder / "train.csv"), val_fraction=0.2),
                            train=train_options(max_steps=60, eval_interval=20, lr=1e-4))
    result = finetune(config)
    assert result.metrics["val_accuracy"] > 0.9  # the backbone alone barely moves at lr 1e-4 in 60 steps
    task = read_config(result.best_checkpoint)["task"]
    assert task["ngram_buckets"] == 4096
    lm = LanguageModel.load(result.best_checkpoint, device="cpu")
    assert lm.model.ngram_table.weight.abs().max() > 0.5  # learnt at ngram_lr, 500x the backbone's rate
    assert lm.classify("we saw the drum today").label == "music"


@pytest.mark.parametrize("option, message", [
    ({"question_match": True}, "question_match marks question words in QA contexts; this is a classification run"),
    ({"ngram_buckets": 64, "task": "qa"}, "ngram_buckets adds an n-gram bag to a classifier; this is a qa run"),
    ({"ngram_buckets": -1}, "ngram_buckets must be >= 0, not -1"),
    ({"ngram_buckets": 10**12}, "ngram_buckets must be at most 16,777,216"),
    ({"ngram_lr": 0.0}, "ngram_lr must be > 0, not 0.0"),
])
def test_task_specific_options_are_refused_elsewhere(tmp_path, classification_files, option, message):
    folder, tokenizer = classification_files
    config = FinetuneConfig(tokenizer=str(tokenizer), model=tiny("encoder"), out=str(tmp_path / "run"),
                            data=FinetuneDataConfig(path=str(folder / "train.csv")), train=train_options(),
                            **option)
    with pytest.raises(ConfigError, match=re.escape(message)):
        finetune(config)


# ------------------------------------------------------------------------------------------
# Sequence to sequence
# ------------------------------------------------------------------------------------------
def test_seq2seq_from_parallel_files(tmp_path):
    rng = random.Random(3)
    numbers = [[rng.randrange(10) for _ in range(rng.randint(2, 6))] for _ in range(8000)]
    source = tmp_path / "train.src"
    target = tmp_path / "train.tgt"  # the digits reversed
    source.write_text("".join("".join(map(str, n)) + "\n" for n in numbers), encoding="utf-8")
    target.write_text("".join("".join(map(str, n[::-1])) + "\n" for n in numbers), encoding="utf-8")
    tokenizer = char_tokenizer(tmp_path / "tok", [source.read_text()])
    config = FinetuneConfig(tokenizer=str(tokenizer), model=ModelConfig.from_dict("seq2seq-tiny"),
                            out=str(tmp_path / "run"),
                            data=FinetuneDataConfig(path=str(source), target_path=str(target), val_fraction=0.01),
                            train=train_options(max_steps=400, batch_size=32, eval_interval=100))
    assert resolve_task(config) == "seq2seq"
    result = finetune(config)
    assert result.metrics["val_loss"] < 0.05
    task = read_config(result.final_checkpoint)["task"]
    assert task == {"kind": "seq2seq", "purpose": "translation"}
    lm = LanguageModel.load(result.final_checkpoint, device="cpu")
    assert lm.capabilities == ("generate", "translate", "analyze")
    assert lm.translate("31415") == "51413"
    assert lm.translate(["98", "257"], beam_size=3) == ["89", "752"]
    assert lm.generate("123", temperature=0) == "321"
    with pytest.raises(RequestError, match="cannot summarize"):
        lm.summarize("12")
    val = tmp_path / "val.jsonl"
    write_jsonl(val, [{"source": "1234", "target": "4321"}, {"source": "70", "target": "07"}])
    report = evaluate(lm, "generation", str(val), progress=False, beam_size=2)
    assert report["metrics"]["chrf"] == 100.0  # (one-word outputs have no 4-grams for BLEU)
    assert [x["prediction"] for x in report["samples"]] == ["4321", "07"]


def test_task_detection_from_data(tmp_path):
    def detect(records, **data):
        path = write_jsonl(tmp_path / "d.jsonl", records)
        return resolve_task(FinetuneConfig(checkpoint="x", data=FinetuneDataConfig(path=str(path), **data)))

    assert detect([{"messages": [{"role": "user", "content": "hi"}]}]) == "sft"
    assert detect([{"text": "a", "label": "b"}]) == "classification"
    assert detect([{"document": "a", "summary": "b"}]) == "seq2seq"
    assert detect([{"question": "a", "context": "b", "answers": ["b"]}]) == "qa"
