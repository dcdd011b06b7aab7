"""The command line end to end, as a user runs it, including every promised error."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_clean_error, lmforge


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, corpus_file):
    """train-tokenizer -> prepare -> pretrain, through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    result = lmforge("train-tokenizer", "--input", corpus_file, "--kind", "bpe", "--vocab-size", 400,
                     "--out", root / "tok")
    assert result.returncode == 0, result.stderr
    assert "400 tokens" in result.stdout and str(root / "tok" / "tokenizer.json") in result.stdout
    result = lmforge("prepare", "--input", corpus_file, "--tokenizer", root / "tok", "--out", root / "data")
    assert result.returncode == 0, result.stderr
    assert "train and" in result.stdout
    config = root / "run.yaml"
    config.write_text(f"data: {root / 'data'}\nout: {root / 'run'}\nmodel: gpt2-tiny\n"
                      "train:\n  max_steps: 60\n  lr: 3.0e-3\n  warmup_steps: 5\n  eval_interval: 30\n"
                      "  save_interval: 30\n  progress: false\n  batch_size: 8\n  final_eval_windows: 20\n")
    result = lmforge("pretrain", "--config", config, "--train.log_interval", "5")
    assert result.returncode == 0, result.stderr
    assert "val loss" in result.stdout and str(root / "run") in result.stdout
    return root


def test_prepare_is_idempotent(workflow, corpus_file):
    before = (workflow / "data" / "train.bin").stat().st_mtime_ns
    result = lmforge("prepare", "--input", corpus_file, "--tokenizer", workflow / "tok", "--out", workflow / "data")
    assert result.returncode == 0 and "already prepared" in result.stdout
    assert (workflow / "data" / "train.bin").stat().st_mtime_ns == before


def test_pretrain_wrote_the_run_directory(workflow):
    run = workflow / "run"
    config = (run / "config.yaml").read_text()
    assert "log_interval: 5" in config  # command-line flags override the YAML file
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r][:3] == [5, 10, 15]
    for name in ("loss.png", "checkpoints/final/model.safetensors", "checkpoints/best/tokenizer.json",
                 "checkpoints/step-30/train_state.pt"):
        assert (run / name).exists(), name


def test_generate_greedy_stream_batch_and_json(workflow):
    run = workflow / "run"
    greedy = lmforge("generate", run, "--prompt", "The ", "--max-new-tokens", 20, "--temperature", 0)
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout.startswith("The ")
    streamed = lmforge("generate", run, "--prompt", "The ", "--max-new-tokens", 20, "--temperature", 0, "--stream")
    assert streamed.returncode == 0 and streamed.stdout == greedy.stdout
    batch = lmforge("generate", run, "--prompt", "The ", "--prompt", "In the", "--max-new-tokens", 10,
                    "--temperature", "0.8", "--top-k", 20, "--top-p", "0.95", "--min-p", "0.05",
                    "--repetition-penalty", "1.1", "--seed", 1, "--num-samples", 2, "--json", "--stop", "\n\n")
    assert batch.returncode == 0, batch.stderr
    rows = [json.loads(line) for line in batch.stdout.splitlines()]
    assert len(rows) == 4 and all(r["completion_tokens"] <= 10 for r in rows)


def test_perplexity(workflow, corpus_file):
    result = lmforge("perplexity", workflow / "run", "--input", corpus_file)
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.split()[1])
    assert 1.0 < value < 400  # better than uniform over the 400-token vocabulary


def test_every_command_documents_its_options():
    for command in ("", "train-tokenizer", "prepare", "pretrain", "generate", "perplexity", "quickstart", "presets"):
        result = lmforge(*(command.split()), "--help")
        assert result.returncode == 0 and "usage:" in result.stdout
    assert "--train.lr" in lmforge("pretrain", "--help").stdout
    assert "--repetition-penalty" in lmforge("generate", "--help").stdout


def test_presets_lists_both_flavours():
    out = lmforge("presets").stdout
    for name in ("gpt2-tiny", "llama-tiny", "gpt2-baby", "llama-baby", "gpt2-10m", "llama-10m", "gpt2-25m",
                 "llama-25m"):
        assert name in out


# ------------------------------------------------------------------ errors: one line, exit code 2
def test_missing_input_files(tmp_path):
    assert_clean_error(lmforge("train-tokenizer", "--input", tmp_path / "nope.txt", "--out", tmp_path / "t"),
                       "does not exist")
    assert_clean_error(lmforge("prepare", "--input", tmp_path / "nope.txt", "--tokenizer", tmp_path, "--out",
                               tmp_path / "d"), "does not exist")


def test_empty_corpus_is_refused_and_nothing_is_written(workflow, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_clean_error(lmforge("prepare", "--input", empty, "--tokenizer", workflow / "tok", "--out",
                               tmp_path / "data"), "empty")
    assert not (tmp_path / "data" / "meta.json").exists()
    assert not list((tmp_path / "data").glob("*.bin"))
    for kind in ("char", "bpe"):  # byte-level BPE has its 256 byte tokens even without text
        assert_clean_error(lmforge("train-tokenizer", "--input", empty, "--kind", kind, "--out", tmp_path / "t"),
                           "no text")
        assert not (tmp_path / "t").exists()
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    assert_clean_error(lmforge("prepare", "--input", binary, "--tokenizer", workflow / "tok", "--out",
                               tmp_path / "fresh"), "not UTF-8")
    assert not (tmp_path / "fresh").exists()


def test_config_errors(workflow, tmp_path):
    data = workflow / "data"
    base = ["pretrain", "--data", data, "--out", tmp_path / "run", "--model", "gpt2-tiny", "--max-steps", 5]
    assert_clean_error(lmforge(*base, "--train.lrr", "3"), "--train.lrr")
    assert_clean_error(lmforge(*base, "--train.lr", "abc"), "train.lr", "number")
    assert_clean_error(lmforge(*base, "--train.optimizer", "adam"), "train.optimizer")
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("train:\n  lrr: 0.1\n")
    assert_clean_error(lmforge(*base, "--config", bad_key), "unknown option 'train.lrr'", "train.lr")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    assert_clean_error(lmforge(*base, "--config", broken), "not valid YAML")
    assert_clean_error(lmforge(*base, "--config", tmp_path / "missing.yaml"), "does not exist")
    assert_clean_error(lmforge("pretrain", "--data", data, "--model", "gpt-tiny", "--out", tmp_path / "r"),
                       "unknown model preset", "gpt2-tiny")
    assert_clean_error(lmforge("pretrain", "--data", tmp_path / "nodata", "--model", "gpt2-tiny"), "does not exist")
    assert_clean_error(lmforge("pretrain", "--data", data, "--out", tmp_path / "r"), "no model")
    assert_clean_error(lmforge(*base, "--model.n_head", "3"), "divisible")
    assert not (tmp_path / "run").exists()


def test_continued_pretraining(workflow, tmp_path):
    result = lmforge("pretrain", "--data", workflow / "data", "--init", workflow / "run", "--out", tmp_path / "more",
                     "--max-steps", 10, "--train.eval_interval", 0, "--train.progress", "false")
    assert result.returncode == 0, result.stderr
    assert "trained 10 steps" in result.stdout
    assert_clean_error(lmforge("pretrain", "--data", workflow / "data", "--init", workflow / "run", "--model",
                               "gpt2-tiny", "--out", tmp_path / "x"), "--init", "drop --model")
    assert_clean_error(lmforge("pretrain", "--data", workflow / "data", "--init", tmp_path / "nothing", "--out",
                               tmp_path / "x"), "does not exist")
    assert not (tmp_path / "x").exists()


def test_vocabulary_mismatch(workflow, tmp_path):
    assert_clean_error(lmforge("pretrain", "--data", workflow / "data", "--model", "gpt2-tiny", "--model.vocab_size",
                               "50", "--out", tmp_path / "r", "--max-steps", "2"), "vocab")


def test_not_a_checkpoint_and_prompt_too_long(workflow, tmp_path):
    assert_clean_error(lmforge("generate", tmp_path, "--prompt", "x"), "not an lmforge checkpoint")
    assert_clean_error(lmforge("generate", workflow / "data", "--prompt", "x"), "not an lmforge checkpoint")
    long_prompt = "The statement " * 200
    assert_clean_error(lmforge("generate", workflow / "run", "--prompt", long_prompt), "context")
    truncated = lmforge("generate", workflow / "run", "--prompt", long_prompt, "--truncate", "--max-new-tokens", "5")
    assert truncated.returncode == 0 and "truncated" in truncated.stderr
    assert_clean_error(lmforge("generate", workflow / "run", "--temperature", "-1"), "temperature")
    assert_clean_error(lmforge("perplexity", workflow / "run", "--input", tmp_path / "none.txt"), "does not exist")
    assert_clean_error(lmforge("perplexity", workflow / "run", "--input", tmp_path), "cannot read")
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert_clean_error(lmforge("perplexity", workflow / "run", "--input", text, "--stride", "0"), "stride")


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    result = lmforge("quickstart", "--out", tmp_path / "qs", "--max-time", "15", "--model", "gpt2-tiny", timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for fragment in ("[1/5] corpus", "[5/5] samples", "validation loss", "lmforge generate", "lmforge perplexity",
                     "loss.png"):
        assert fragment in out, fragment
    run = tmp_path / "qs" / "run"
    assert (run / "loss.png").is_file() and (run / "checkpoints" / "best" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] - 1.0
