"""Evaluation tasks, suites and reports on the tiny trained model (a char-level GPT, context 64)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.evaluation import (
    TASK_METRICS,
    evaluate,
    format_table,
    generate_ids,
    generation_metrics,
    label_scores,
    load_suite,
    main_eval,
    run_suite,
    write_report,
)
from lmforge.evaluation.harness import read_labelled

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

DOC_A = "The for statement is used to iterate over the elements of a sequence."
DOC_B = "A function definition defines a user-defined function object."


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def in_range(report: dict, low: float, high: float, names: tuple[str, ...]) -> None:
    for name in names:
        assert low <= report["metrics"][name] <= high, (name, report["metrics"][name])


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", [
        {"context": "The while statement is used for repeated execution as long as an expression is true. " * 3,
         "question": "What is while for?", "answers": {"text": ["repeated execution"], "answer_start": [30]}},
        {"context": "Tuples.", "question": "What?", "answers": ["Tuples", "tuple"]},
        {"context": "x", "question": "y", "answers": {"text": ["x"]}},
    ])


@pytest.fixture
def completion_file(tmp_path):
    return write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "The for statement", "completion": " is used to iterate"},
        {"prompt": "A function definition", "completion": " defines a function"},
        {"prompt": "x", "completion": "y"},
    ])


# ------------------------------------------------------------------------------------------
# perplexity
# ------------------------------------------------------------------------------------------
def test_perplexity_task_equals_lm_perplexity(lm, tmp_path):
    path = tmp_path / "val.txt"
    path.write_text(DOC_A, encoding="utf-8")
    report = evaluate(lm, "perplexity", path, progress=False)
    assert set(report) >= {"task", "data", "examples", "metrics", "seconds"}
    assert report["task"] == "perplexity" and report["examples"] == 1 and report["data"] == str(path)
    assert report["metrics"]["perplexity"] == pytest.approx(lm.perplexity(DOC_A), rel=1e-9)
    assert report["metrics"]["tokens"] == len(DOC_A)  # one token per character
    assert report["metrics"]["loss"] == pytest.approx(math.log(report["metrics"]["perplexity"]))


def test_perplexity_is_token_weighted_and_limit_works(lm, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": DOC_A}, {"text": DOC_B * 3}, {"text": "zzz"}])
    a, b = lm.token_logprobs(DOC_A).double(), lm.token_logprobs(DOC_B * 3).double()
    expected = math.exp(-float(a.sum() + b.sum()) / (len(a) + len(b)))
    report = evaluate(lm, "perplexity", path, limit=2, progress=False)
    assert report["examples"] == 2
    assert report["metrics"]["tokens"] == len(a) + len(b)
    assert report["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-9)
    one = evaluate(lm, "perplexity", [path], limit=1, progress=False)
    assert one["examples"] == 1 and one["metrics"]["perplexity"] == pytest.approx(lm.perplexity(DOC_A), rel=1e-9)
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": DOC_A}])
    assert evaluate(lm, "perplexity", other, text_field="body", progress=False)["metrics"]["tokens"] == len(DOC_A)


# ------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------
def test_generation_task(lm, completion_file):
    report = evaluate(lm, "generation", completion_file, max_new_tokens=12, progress=False)
    assert report["examples"] == 3 and report["options"] == {"max_new_tokens": 12}
    assert set(report["metrics"]) == set(TASK_METRICS["generation"])
    in_range(report, 0, 100, ("bleu", "chrf", "rouge1", "rouge2", "rougeL"))
    in_range(report, 0, 1, ("eos_rate",))
    assert 0 < report["metrics"]["mean_new_tokens"] <= 12
    assert report["samples"][0]["reference"] == " is used to iterate"
    assert evaluate(lm, "generation", completion_file, limit=1, max_new_tokens=4, progress=False)["examples"] == 1


def test_generation_from_ids_matches_lm_complete(lm):
    prompts = ["The for statement", "A function definition is", "x"]
    ids = [lm.encode_prompt(p)[0] for p in prompts]
    ours = generate_ids(lm.model, lm.tokenizer, ids, max_new_tokens=10, temperature=0, batch_size=2)
    theirs = lm.complete(prompts, max_new_tokens=10, temperature=0)
    assert [g.text for g in ours] == [c.text for c in theirs]
    assert [g.token_ids for g in ours] == [c.token_ids for c in theirs]
    assert all(g.finish_reason in ("stop", "length") for g in ours)
    stopped = generate_ids(lm.model, lm.tokenizer, ids, max_new_tokens=10, temperature=0, stop=[" "])
    assert all(" " not in g.text for g in stopped)


def test_generation_metrics_on_a_training_model_restores_train_mode(lm):
    examples = [(lm.tokenizer.encode("The for statement"), " is used"), (lm.tokenizer.encode("def"), " f():")]
    lm.model.train()
    try:
        results, generations = generation_metrics(lm.model, lm.tokenizer, examples, max_new_tokens=6)
        assert lm.model.training
    finally:
        lm.model.eval()
    assert len(generations) == 2 and set(results) == set(TASK_METRICS["generation"])
    assert all(len(g.token_ids) <= 6 for g in generations)


class AlwaysEos(torch.nn.Module):
    """The trained model with end-of-sequence made overwhelmingly likely after ``after`` calls."""

    def __init__(self, inner: torch.nn.Module, eos: int, after: int = 0):
        super().__init__()
        self.inner, self.config, self.eos, self.calls, self.after = inner, inner.config, eos, 0, after

    def forward(self, *args, **kwargs):
        logits = self.inner(*args, **kwargs).clone()
        self.calls += 1
        if self.calls > self.after:
            logits[..., self.eos] += 1000.0
        return logits


def test_generation_eos_rate(lm):
    eos = lm.tokenizer.eos_id
    examples = [(lm.tokenizer.encode("The for"), " statement"), (lm.tokenizer.encode("def"), " f")]
    results, generations = generation_metrics(AlwaysEos(lm.model, eos), lm.tokenizer, examples, max_new_tokens=5)
    assert results["eos_rate"] == 1.0 and results["mean_new_tokens"] == 0
    assert all(g.token_ids == [] and g.finish_reason == "stop" and g.eos and g.text == "" for g in generations)
    results, generations = generation_metrics(AlwaysEos(lm.model, eos, after=3), lm.tokenizer, examples,
                                              max_new_tokens=5)  # prefill + 2 steps, then eos
    assert results["eos_rate"] == 1.0 and [len(g.token_ids) for g in generations] == [3, 3]
    results, _ = generation_metrics(AlwaysEos(lm.model, eos, after=100), lm.tokenizer, examples, max_new_tokens=5)
    assert results["eos_rate"] == 0.0 and results["mean_new_tokens"] == 5


def test_generation_with_chat_records_and_prompt_template(lm, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"instruction": "Name a loop", "output": "for"},
    ][:1])
    report = evaluate(lm, "generation", chat, max_new_tokens=5, progress=False)
    assert report["examples"] == 1
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name a loop", "output": "for"}])
    assert evaluate(lm, "generation", alpaca, max_new_tokens=5, progress=False)["examples"] == 1
    mail = write_jsonl(tmp_path / "mail.jsonl", [{"document": "Meeting at noon.", "summary": "Meeting"}])
    report = evaluate(lm, "generation", mail, prompt_template="{document}\nSubject:", reference_field="summary",
                      max_new_tokens=5, progress=False)
    assert report["samples"][0]["reference"] == "Meeting"
    with pytest.raises(ConfigError, match="go together"):
        evaluate(lm, "generation", mail, prompt_template="{document}", progress=False)
    with pytest.raises(DataError, match="does not fit"):
        evaluate(lm, "generation", mail, prompt_template="{body}", reference_field="summary", progress=False)
    with pytest.raises(DataError, match="no reference"):
        evaluate(lm, "generation", write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), progress=False)


# ------------------------------------------------------------------------------------------
# qa
# ------------------------------------------------------------------------------------------
def test_qa_task(lm, qa_file):
    report = evaluate(lm, "qa", qa_file, progress=False)
    assert report["examples"] == 3 and set(report["metrics"]) == {"exact_match", "f1"}
    in_range(report, 0, 100, ("exact_match", "f1"))
    assert report["truncated"] >= 1  # the first context is far longer than the 64-token context
    assert report["samples"][1]["answers"] == ["Tuples", "tuple"]
    assert all("\n" not in s["prediction"] for s in report["samples"])
    assert evaluate(lm, "qa", qa_file, limit=2, progress=False)["examples"] == 2


def test_qa_prompt_truncates_the_context_from_its_start(lm):
    from lmforge.evaluation.harness import QA_TEMPLATE, qa_prompt

    tok = lm.tokenizer
    ids, dropped = qa_prompt(tok, "abcdefghij" * 10, "Why?", 60)
    text = tok.decode(ids)
    assert len(ids) == 60 and dropped == len(QA_TEMPLATE.format(context="abcdefghij" * 10, question="Why?")) - 60
    assert text.endswith("j\nQuestion: Why?\nAnswer:") and text.startswith("Context: ")
    assert qa_prompt(tok, "short", "Why?", 60) == (tok.encode("Context: short\nQuestion: Why?\nAnswer:"), 0)


# ------------------------------------------------------------------------------------------
# classification
# ------------------------------------------------------------------------------------------
def test_label_scores_equal_summed_token_logprobs(lm):
    texts, labels = ["the for statement", "I love this movie"], ["the", "zqxv", "loop"]
    scores = label_scores(lm, texts, labels)
    assert scores.shape == (2, 3)
    for i, text in enumerate(texts):
        for j, label in enumerate(labels):
            prompt = f"Text: {text}\nLabel:"
            logprobs = lm.token_logprobs(f"{prompt} {label}")
            assert float(scores[i, j]) == pytest.approx(float(logprobs[len(prompt):].double().sum()), abs=1e-4)
    normalized = label_scores(lm, texts, labels, normalize=True)
    assert torch.allclose(normalized, scores / torch.tensor([4.0, 5.0, 5.0]))
    custom = label_scores(lm, ["abc"], ["x"], template="{text} => {label}.")
    assert float(custom[0, 0]) == pytest.approx(float(lm.token_logprobs("abc => x.")[len("abc =>"):].sum()), abs=1e-4)


def test_label_scores_truncate_long_texts_and_check_templates(lm):
    long_text = "The for statement iterates. " * 10
    scores = label_scores(lm, [long_text], ["yes", "no"])
    assert torch.isfinite(scores).all()
    with pytest.raises(ConfigError, match="one \\{text\\}"):
        label_scores(lm, ["a"], ["b"], template="{label} {text}")
    with pytest.raises(DataError, match="empty"):
        label_scores(lm, ["a"], [""], template="{text}{label}")


def test_classification_picks_the_label_the_scores_favour(lm, tmp_path):
    # Python-docs text continues with " the" far more likely than with " zqxv": the answer is certain.
    texts = ["The for statement is used to iterate over", "A function definition is"]
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": "the"} for t in texts])
    scores = label_scores(lm, texts, ["the", "zqxv"], template="{text} {label}")
    assert bool((scores[:, 0] > scores[:, 1] + 5).all())
    report = evaluate(lm, "classification", path, labels=["the", "zqxv"], template="{text} {label}", progress=False)
    assert report["metrics"] == {"accuracy": 1.0, "macro_f1": 1.0}
    assert report["labels"] == ["the", "zqxv"]
    # with the gold labels swapped the same choices are all wrong
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"sentence": t, "label": "zqxv"} for t in texts])
    report = evaluate(lm, "classification", wrong, labels=["the", "zqxv"], template="{text} {label}", progress=False)
    assert report["metrics"]["accuracy"] == 0.0


def test_classification_task_matches_argmax_of_label_scores(lm, tmp_path):
    rows = [("a great film", 1), ("the for loop", 0), ("terrible plot", 0), ("while True:", 1), ("def f", 0)]
    path = tmp_path / "sst.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows), encoding="utf-8")
    names = {0: "negative", 1: "positive"}
    report = evaluate(lm, "classification", path, label_names=names, limit=4, progress=False)
    assert report["examples"] == 4 and report["labels"] == ["negative", "positive"]
    scores = label_scores(lm, [t for t, _ in rows[:4]], ["negative", "positive"])
    predictions = [["negative", "positive"][k] for k in scores.argmax(-1).tolist()]
    gold = [names[label] for _, label in rows[:4]]
    assert report["metrics"]["accuracy"] == pytest.approx(sum(p == g for p, g in zip(predictions, gold)) / 4)
    in_range(report, 0, 1, ("accuracy", "macro_f1"))


def test_read_labelled_formats(tmp_path):
    csv_file = tmp_path / "news.csv"  # AG News layout: no header, "class","title","description"
    csv_file.write_text('"3","Fears for pension","Unions say, ""disappointed"""\n"4","Apple","Software"\n')
    assert read_labelled(csv_file, text_field=[1, 2], label_field=0) == [
        ("Fears for pension Unions say, \"disappointed\"", "3"), ("Apple Software", "4")]
    with_header = tmp_path / "h.csv"
    with_header.write_text("text,label\nhello,1\n")
    assert read_labelled(with_header) == [("hello", "1")]
    with pytest.raises(DataError, match="no text column"):
        read_labelled(csv_file)
    with pytest.raises(ConfigError, match="both"):
        read_labelled(csv_file, text_field="text", label_field=0)
    with pytest.raises(DataError, match="no column 'category'"):
        read_labelled(with_header, label_field="category")


def test_classification_label_errors(lm, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(DataError, match="not among the candidate"):
        evaluate(lm, "classification", path, labels=["0"], progress=False)
    with pytest.raises(DataError, match="no name for the label"):
        evaluate(lm, "classification", path, label_names={0: "zero"}, progress=False)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(DataError, match="at least two"):
        evaluate(lm, "classification", one, progress=False)


# ------------------------------------------------------------------------------------------
# diversity
# ------------------------------------------------------------------------------------------
def test_diversity_task(lm, tmp_path):
    report = evaluate(lm, "diversity", num_samples=4, max_new_tokens=16, progress=False)
    assert report["examples"] == 4 and report["data"] is None and report["prompts"] == 1
    in_range(report, 0, 1, ("distinct_1", "distinct_2", "vocabulary_coverage"))
    in_range(report, 0, 100, ("self_bleu",))
    assert report["metrics"]["vocabulary_coverage"] > 0
    again = evaluate(lm, "diversity", num_samples=4, max_new_tokens=16, progress=False)
    assert again["metrics"] == report["metrics"]  # seeded
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The for statement\n\nA class\nimport\n")
    report = evaluate(lm, "diversity", prompts, limit=2, num_samples=3, max_new_tokens=8, progress=False)
    assert report["prompts"] == 2 and report["examples"] == 3
    with pytest.raises(ConfigError, match="num_samples >= 2"):
        evaluate(lm, "diversity", num_samples=1, progress=False)


# ------------------------------------------------------------------------------------------
# errors, tables, reports
# ------------------------------------------------------------------------------------------
def test_bad_task_options_and_files(lm, tmp_path, qa_file):
    with pytest.raises(ConfigError, match="unknown evaluation task 'summarise'; tasks: perplexity"):
        evaluate(lm, "summarise", qa_file)
    with pytest.raises(ConfigError, match="no option 'max_tokens'.*did you mean 'max_new_tokens'"):
        evaluate(lm, "qa", qa_file, max_tokens=3)
    with pytest.raises(ConfigError, match="num_samples"):
        evaluate(lm, "qa", qa_file, num_samples=2)
    with pytest.raises(ConfigError, match="batch_size of the qa task must be a whole number, not 'x'"):
        evaluate(lm, "qa", qa_file, batch_size="x")
    with pytest.raises(ConfigError, match="labels of the classification task must be a list"):
        evaluate(lm, "classification", qa_file, labels=3)
    with pytest.raises(DataError, match="does not exist"):
        evaluate(lm, "perplexity", tmp_path / "missing.txt")
    with pytest.raises(DataError, match="needs a data file"):
        evaluate(lm, "qa", None)
    with pytest.raises(ConfigError, match="limit"):
        evaluate(lm, "qa", qa_file, limit=0)
    with pytest.raises(ConfigError, match="temperature"):
        evaluate(lm, "qa", qa_file, temperature=-1, progress=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "question": "q"}])
    with pytest.raises(DataError, match="answers"):
        evaluate(lm, "qa", bad, progress=False)


def test_format_table_and_write_report(lm, tmp_path):
    path = tmp_path / "val.txt"
    path.write_text(DOC_A)
    reports = [evaluate(lm, "perplexity", path, progress=False),
               evaluate(lm, "diversity", num_samples=2, max_new_tokens=4, progress=False)]
    table = format_table(reports)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "data", "examples", "metric", "value"]
    assert "perplexity" in lines[2] and "val.txt" in lines[2] and "self_bleu" in table
    assert len(lines) == 2 + 3 + 5
    out = write_report(tmp_path / "out" / "report.json", reports, checkpoint="x")
    saved = json.loads(out.read_text())
    assert saved["checkpoint"] == "x" and saved["reports"][0]["metrics"] == reports[0]["metrics"]
    with pytest.raises(LmforgeError):
        write_report(tmp_path, reports)


# ------------------------------------------------------------------------------------------
# suites and the CLI entry point
# ------------------------------------------------------------------------------------------
def write_suite(folder: Path, text: str) -> Path:
    (folder / "val.txt").write_text(DOC_A)
    path = folder / "suite.yaml"
    path.write_text(text)
    return path


SUITE = """
tasks:
  - task: perplexity
    data: val.txt
    max: {{perplexity: {ppl}}}
  - task: qa
    data: qa.jsonl
    limit: 2
    min: {{f1: {f1}, exact_match: 0}}
    max_new_tokens: 8
"""


def test_suite_passes_with_loose_thresholds(lm, tmp_path, qa_file, capsys, trained_run):
    suite = write_suite(qa_file.parent, SUITE.format(ppl=1e9, f1=0))
    reports, failures = run_suite(lm, suite, progress=False)
    assert failures == [] and [r["name"] for r in reports] == ["perplexity", "qa"]
    assert reports[1]["examples"] == 2 and all(r["passed"] for r in reports)
    assert reports[0]["data"] == str(qa_file.parent / "val.txt")
    out = tmp_path / "report.json"
    code = main_eval(trained_run, suite=suite, out=out, device="cpu", progress=False)
    printed = capsys.readouterr().out
    assert code == 0 and "all thresholds passed" in printed and f"report written to {out}" in printed
    saved = json.loads(out.read_text())
    assert saved["passed"] is True and saved["failures"] == [] and len(saved["reports"]) == 2


def test_suite_fails_with_an_impossible_threshold(lm, tmp_path, qa_file, capsys, trained_run):
    suite = write_suite(qa_file.parent, SUITE.format(ppl=1.0, f1=101))
    reports, failures = run_suite(lm, suite, limit=1, progress=False)
    assert reports[1]["examples"] == 1  # the smaller of the two limits
    assert len(failures) == 2
    assert failures[0].startswith("perplexity perplexity ") and failures[0].endswith(" > 1.00")
    assert failures[1].startswith("qa f1 ") and failures[1].endswith(" < 101.00")
    out = tmp_path / "report.json"
    code = main_eval(str(trained_run), suite=str(suite), out=str(out), limit=1, device="cpu", progress=False)
    printed = capsys.readouterr().out
    assert code == 1 and "FAILED: qa f1" in printed and "2 threshold(s) failed" in printed
    assert json.loads(out.read_text())["passed"] is False


def test_main_eval_single_task(tmp_path, trained_run, capsys):
    path = tmp_path / "val.txt"
    path.write_text(DOC_A)
    assert main_eval(trained_run, task="perplexity", data=path, device="cpu", progress=False, stride=None) == 0
    assert "perplexity" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="either a suite"):
        main_eval(trained_run, task="qa", suite=path)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        main_eval(trained_run)
    with pytest.raises(ConfigError, match="needs data"):
        main_eval(trained_run, task="qa")
    with pytest.raises(ConfigError, match="no option"):
        main_eval(trained_run, task="qa", data=path, bogus=1)
    with pytest.raises(DataError, match="does not exist"):
        main_eval(trained_run, task="qa", data=tmp_path / "nope.jsonl")


@pytest.mark.parametrize("text, error, message", [
    ("tasks: []", ConfigError, "non-empty list"),
    ("task: qa", ConfigError, "unknown key\\(s\\) 'task'"),
    ("tasks:\n  - task: summarise\n    data: val.txt", ConfigError, "unknown task 'summarise'; tasks: perplexity"),
    ("tasks:\n  - data: val.txt", ConfigError, "has no 'task'"),
    ("tasks:\n  - task: qa\n    data: val.txt\n    limt: 3", ConfigError, "unknown key 'limt' \\(did you mean 'limit'"),
    ("tasks:\n  - task: qa\n    data: val.txt\n    min: {bleu: 3}", ConfigError, "no metric 'bleu'.*exact_match, f1"),
    ("tasks:\n  - task: qa\n    data: val.txt\n    min: {f1: high}", ConfigError, "must be a number"),
    ("tasks:\n  - task: qa\n    data: missing.jsonl", DataError, "task 1: data file .*missing.jsonl does not exist"),
    ("tasks:\n  - task: qa", ConfigError, "needs 'data'"),
    ("tasks:\n  - task: qa\n    data: val.txt\n    limit: -1", ConfigError, "limit"),
    ("tasks:\n  - task: qa\n    data: val.txt\n    temperature: -2", ConfigError, "temperature"),
    ("tasks: [", ConfigError, "not valid YAML"),
])
def test_bad_suites(tmp_path, text, error, message):
    suite = write_suite(tmp_path, text)
    with pytest.raises(error, match=message):
        load_suite(suite)


def test_suite_names_repeated_tasks(tmp_path):
    suite = write_suite(tmp_path, "tasks:\n  - {task: perplexity, data: val.txt}\n"
                                  "  - {task: perplexity, data: [val.txt, val.txt]}\n  - {task: diversity}")
    tasks = load_suite(suite)
    assert [t.name for t in tasks] == ["perplexity#1", "perplexity#2", "diversity"]
    assert tasks[1].data == [tmp_path / "val.txt"] * 2 and tasks[2].data is None
    with pytest.raises(ConfigError, match="does not exist"):
        load_suite(tmp_path / "none.yaml")


# ------------------------------------------------------------------------------------------
# the shared data sets (optional)
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (SHARED_DATA / "squad_v1.1").is_dir(), reason="shared data sets are absent")
def test_shared_data_sets_load(lm):
    squad = evaluate(lm, "qa", SHARED_DATA / "squad_v1.1" / "dev_shared.jsonl", limit=2, max_new_tokens=4,
                     progress=False)
    assert squad["examples"] == 2 and squad["truncated"] == 2
    sst = evaluate(lm, "classification", SHARED_DATA / "sst2" / "train.tsv", limit=4,
                   label_names={0: "negative", 1: "positive"}, progress=False)
    assert sst["examples"] == 4 and sst["labels"] == ["negative", "positive"]
    names = (SHARED_DATA / "ag_news" / "classes.txt").read_text().split("\n")
    news = evaluate(lm, "classification", SHARED_DATA / "ag_news" / "test.csv", limit=4, text_field=[1, 2],
                    label_field=0, label_names={k: n for k, n in enumerate(names, 1) if n},
                    labels=[n for n in names if n], progress=False)
    assert news["examples"] == 4 and len(news["labels"]) == 4
    ppl = evaluate(lm, "perplexity", SHARED_DATA / "lm_ptb_wikitext2" / "ptb.valid.txt", progress=False)
    assert ppl["metrics"]["tokens"] > 100_000 and ppl["metrics"]["perplexity"] > 1
