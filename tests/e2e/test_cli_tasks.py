"""Task models from the command line: train-tokenizer, finetune from scratch on a task format, then
classify / answer / generate / eval with the checkpoint; bad input is a one-line error (exit 2)."""

from __future__ import annotations

import json
import random

import pytest
from cli_helpers import assert_clean_error, lmforge, lmforge_all

TOPICS = {"sport": ["ball", "goal"], "food": ["soup", "bread"]}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-cls")
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        label = rng.choice(list(TOPICS))
        rows.append((" ".join([rng.choice(["we", "saw", "a", "the"]), rng.choice(TOPICS[label]), "today"]), label))
    data = folder / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows), encoding="utf-8")
    (folder / "text.txt").write_text("\n".join(t for t, _ in rows), encoding="utf-8")
    made = lmforge("train-tokenizer", "--input", folder / "text.txt", "--kind", "char", "--out", folder / "tok")
    assert made.returncode == 0, made.stderr
    run = lmforge("finetune", "--tokenizer", folder / "tok", "--data", data, "--out", folder / "run",
                  "--model.family", "encoder", "--model.n_layer", 2, "--model.n_embd", 32, "--model.n_head", 2,
                  "--model.block_size", 32, "--train.max_steps", 120, "--train.lr", 3e-3, "--train.device", "cpu",
                  "--train.progress", "false", "--train.eval_interval", 60, "--pooling", "mean",
                  "--train.best_metric", "accuracy", threads=1)
    assert run.returncode == 0, run.stderr
    return folder, run


def test_finetune_reports_the_task_metrics_and_next_step(classifier):
    folder, run = classifier
    assert "held-out loss" in run.stdout and "accuracy" in run.stdout and "macro_f1" in run.stdout
    assert f"lmforge eval {folder / 'run'} --task classification" in run.stdout
    assert "(best held-out accuracy)" in run.stdout
    config = json.loads((folder / "run" / "checkpoints" / "best" / "config.json").read_text(encoding="utf-8"))
    assert config["task"]["pooling"] == "mean"


def test_classify_and_eval_commands(classifier):
    folder, _ = classifier
    result = lmforge("classify", folder / "run", "we saw the soup today", "a goal", "--json", threads=1)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["label"] for a in answers] == ["food", "sport"]
    report = lmforge("eval", folder / "run", "--task", "classification", "--data", folder / "train.tsv",
                     "--limit", 50, "--quiet", threads=1)
    assert report.returncode == 0, report.stderr
    assert "accuracy" in report.stdout
    assert_clean_error(lmforge("answer", folder / "run", "--question", "q?", "--context", "c", threads=1),
                       "cannot answer", "it can classify")
    assert_clean_error(lmforge("classify", folder / "run", "x", "--labels", "food", "toast", threads=1),
                       "unknown label")


def test_task_input_errors_are_one_line(classifier, tmp_path):
    folder, _ = classifier
    assert_clean_error(lmforge("finetune", "--data", folder / "train.tsv", "--out", tmp_path / "x"),
                       "no base checkpoint")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"source": "a"}\n', encoding="utf-8")
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", bad, "--task", "seq2seq",
                               "--out", tmp_path / "y", "--model.family", "seq2seq"), "source and target")
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", folder / "train.tsv",
                               "--task", "translate", "--out", tmp_path / "z"), "task must be one of")
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", folder / "train.tsv",
                               "--pooling", "max", "--out", tmp_path / "p"), "pooling must be one of")
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", folder / "train.tsv",
                               "--ngram_buckets", -1, "--out", tmp_path / "n"), "ngram_buckets must be >= 0")
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", bad, "--task", "seq2seq",
                               "--model.family", "seq2seq", "--ngram_buckets", 64, "--out", tmp_path / "s"),
                       "ngram_buckets adds an n-gram bag to a classifier; this is a seq2seq run")
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", folder / "train.tsv",
                               "--model.family", "encoder", "--model.n_layer", 1, "--model.n_embd", 16,
                               "--model.n_head", 2, "--model.block_size", 32, "--train.max_steps", 2,
                               "--train.eval_interval", 1, "--train.device", "cpu", "--train.progress", "false",
                               "--train.best_metric", "bleu", "--out", tmp_path / "b"),
                       "'bleu' is not among this task's validation metrics")



def test_average_the_last_checkpoints_of_a_run(classifier, tmp_path):
    folder, _ = classifier  # 120 steps, a checkpoint every 100: step-100 and final
    result = lmforge("average", folder / "run", "--last", 2, "--out", tmp_path / "mean", threads=1)
    assert result.returncode == 0, result.stderr
    assert "mean of 2 checkpoints (step-100, final)" in result.stdout
    classified = lmforge("classify", tmp_path / "mean", "we saw the soup today", "--json", threads=1)
    assert classified.returncode == 0, classified.stderr
    assert json.loads(classified.stdout)["label"] == "food"
    assert_clean_error(lmforge("average", folder / "run", "--last", 5, "--out", tmp_path / "x"),
                       "fewer than the 5 asked for")
    assert_clean_error(lmforge("average", folder / "run", tmp_path / "mean", "--last", 2, "--out", tmp_path / "x"),
                       "--last N takes one run directory")
    assert_clean_error(lmforge("average", folder / "run" / "checkpoints" / "final", folder / "tok",
                               "--out", tmp_path / "x"), "not an lmforge checkpoint")
    assert not (tmp_path / "x").exists()
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", folder / "train.tsv",
                               "--train.label_smoothing", 1.5, "--out", tmp_path / "s"),
                       "train.label_smoothing must be in [0, 1)")
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", folder / "train.tsv",
                               "--data.packing", "true", "--data.group_by_length", "true", "--out", tmp_path / "s"),
                       "data.group_by_length does nothing with data.packing")
    assert_clean_error(lmforge("finetune", "--tokenizer", folder / "tok", "--data", folder / "train.tsv",
                               "--model.preset", "encoder-tiny", "--question_match", "true", "--out", tmp_path / "s"),
                       "question_match marks question words in QA contexts; this is a classification run")


def test_pretrain_options_of_the_objective_reach_the_run(classifier, tmp_path):
    folder, _ = classifier
    prepared = lmforge("prepare", "--input", folder / "text.txt", "--tokenizer", folder / "tok", "--out",
                       tmp_path / "data", "--quiet")
    assert prepared.returncode == 0, prepared.stderr
    run = lmforge("pretrain", "--data", tmp_path / "data", "--model", "seq2seq-tiny", "--out", tmp_path / "run",
                  "--max-steps", 4, "--denoise_probability", 0.2, "--model.pointer_generator", "true",
                  "--train.progress", "false", "--train.device", "cpu", threads=1)
    assert run.returncode == 0, run.stderr
    resolved = (tmp_path / "run" / "config.yaml").read_text(encoding="utf-8")
    assert "denoise_probability: 0.2" in resolved
    final = json.loads((tmp_path / "run" / "checkpoints" / "final" / "config.json").read_text(encoding="utf-8"))
    assert final["objective"] == "denoise" and final["model"]["pointer_generator"]
    generated = lmforge("generate", tmp_path / "run", "--prompt", "we saw a ball", "--beam-size", 2,
                        "--max-new-tokens", 5, threads=1)
    assert generated.returncode == 0, generated.stderr
    assert_clean_error(lmforge("pretrain", "--data", tmp_path / "data", "--model", "gpt2-tiny", "--out",
                               tmp_path / "x", "--model.pointer_generator", "true"), "needs the seq2seq family")
    assert_clean_error(lmforge("pretrain", "--data", tmp_path / "data", "--model", "seq2seq-tiny", "--out",
                               tmp_path / "x", "--objective", "clm"), "clm objective does not fit the seq2seq family")
    assert_clean_error(lmforge("pretrain", "--data", tmp_path / "data", "--model", "gpt2-tiny", "--out",
                               tmp_path / "x", "--objective", "mlm"), "mlm objective does not fit the decoder family")
    assert not (tmp_path / "x").exists()


def test_seq2seq_with_rdrop_then_an_ensemble_of_two_runs(tmp_path):
    """Two encoder-decoders (one with R-Drop) decoded and scored together with --ensemble."""
    rng = random.Random(1)
    words = ["red", "blue", "cat", "dog", "sun", "sea"]
    pairs = [" ".join(rng.choice(words) for _ in range(3)) for _ in range(200)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": s.upper()}) + "\n" for s in pairs), encoding="utf-8")
    (tmp_path / "text.txt").write_text("\n".join(pairs + [s.upper() for s in pairs]), encoding="utf-8")
    assert lmforge("train-tokenizer", "--input", tmp_path / "text.txt", "--kind", "char", "--out",
                   tmp_path / "tok").returncode == 0
    common = ["--tokenizer", tmp_path / "tok", "--data", data, "--task", "seq2seq", "--model.family", "seq2seq",
              "--model.n_layer", 1, "--model.n_embd", 32, "--model.n_head", 2, "--model.block_size", 32,
              "--train.max_steps", 40, "--train.lr", 3e-3, "--train.device", "cpu", "--train.progress", "false",
              "--train.eval_interval", 0]
    runs = lmforge_all(("finetune", *common, "--out", tmp_path / "a"),
                       ("finetune", *common, "--train.rdrop", 1, "--model.dropout", 0.1, "--train.seed", 2,
                        "--out", tmp_path / "b"), workers=2, threads=1)
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    both = [tmp_path / "a", "--ensemble", tmp_path / "b"]
    generated = lmforge("generate", *both, "--prompt", "red cat sun", "--beam-size", 2, "--max-new-tokens", 12,
                        "--json", threads=1)
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["source"] == "red cat sun"
    report = lmforge("eval", *both, "--task", "generation", "--data", data, "--limit", 20, "--quiet",
                     "--out", tmp_path / "report.json", threads=1)
    assert report.returncode == 0, report.stderr
    assert "bleu" in json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["reports"][0]["metrics"]
    chosen = lmforge("generate", tmp_path / "a", "--prompt", "red cat sun", "--beam-size", 4, "--mbr", "chrf",
                     "--max-new-tokens", 12, threads=1)  # minimum Bayes risk over the beam's 4 hypotheses
    assert chosen.returncode == 0 and chosen.stdout.strip(), chosen.stderr
    report = lmforge("eval", tmp_path / "a", "--task", "generation", "--data", data, "--limit", 8, "--quiet",
                     "--beam-size", 4, "--mbr", "bleu", "--out", tmp_path / "mbr.json", threads=1)
    assert report.returncode == 0, report.stderr
    assert_clean_error(lmforge("generate", tmp_path / "a", "--prompt", "x", "--mbr", "bleu"),
                       "mbr chooses among the hypotheses of a beam; it needs beam_size >= 2, not 1")
    assert_clean_error(lmforge("generate", tmp_path / "a", "--ensemble", tmp_path / "tok", "--prompt", "x"),
                       "not an lmforge checkpoint")
    assert_clean_error(lmforge("finetune", *common, "--train.rdrop", -1, "--out", tmp_path / "c"),
                       "train.rdrop")
    assert_clean_error(lmforge("pretrain", "--data", tmp_path / "text.txt", "--model", "seq2seq-tiny",
                               "--train.rdrop", 1, "--out", tmp_path / "d"),
                       "train.rdrop is for seq2seq and classification fine-tuning")
    assert_clean_error(lmforge("finetune", *common, "--data.bpe_dropout", 0.1, "--out", tmp_path / "e"),
                       "data.bpe_dropout needs a BPE tokenizer; this one is char")
    assert_clean_error(lmforge("finetune", *common, "--data.bpe_dropout", 1.5, "--out", tmp_path / "f"),
                       "data.bpe_dropout must be in [0, 1)")
