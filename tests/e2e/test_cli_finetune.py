"""``lmforge finetune``, ``lmforge merge-lora`` and ``lmforge chat`` end to end, as a user runs them, including
the promised one-line errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from cli_helpers import assert_clean_error
from cli_helpers import lmforge as run_lmforge
from cli_helpers import lmforge_all as run_all

WORDS = ["cat", "dog", "sun", "red", "box", "pen", "cup", "map"]
FAST = ["--train.device", "cpu", "--train.dtype", "fp32", "--train.num_threads", "1", "--train.progress", "false",
        "--train.warmup_steps", "5", "--train.log_interval", "5"]


def lmforge(*args: object, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    return run_lmforge(*args, timeout=timeout, input=input, threads=1)  # tiny models: one thread is fastest


def lmforge_all(*commands: tuple) -> list[subprocess.CompletedProcess]:
    return run_all(*commands, threads=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clift")
    records = [{"instruction": f"Repeat: {WORDS[i % 8]}", "output": f"{WORDS[i % 8]} {WORDS[i % 8]}"}
               for i in range(40)]
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def finetuned(root, trained_run) -> tuple[Path, subprocess.CompletedProcess]:
    """A full fine-tuning run through the command line."""
    out = root / "full"
    result = lmforge("finetune", trained_run, "--data", root / "alpaca.jsonl", "--out", out, "--train.max_steps", 200,
                     "--train.lr", "3e-3", "--data.val_fraction", "0.2", "--train.eval_interval", 100, *FAST)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="module")
def lora(root, trained_run) -> tuple[Path, subprocess.CompletedProcess]:
    """A LoRA run from a YAML file, with flags overriding it."""
    config = root / "ft.yaml"
    config.write_text(yaml.safe_dump({
        "checkpoint": str(trained_run), "data": str(root / "alpaca.jsonl"), "out": str(root / "lora"),
        "train": {"max_steps": 5, "lr": 1e-2, "eval_interval": 10, "save_interval": 10, "batch_size": 4},
        "lora": {"r": 4, "targets": ["attn"]},
    }))
    result = lmforge("finetune", "--config", config, "--train.max_steps", 30, "--lora.r", 8, "--lora.targets", "q",
                     "--lora.targets", "v", *FAST)
    assert result.returncode == 0, result.stderr
    return root / "lora", result


# ------------------------------------------------------------------------------------ finetune
def test_finetune_prints_the_summary_and_writes_the_run(finetuned, trained_run):
    out, result = finetuned
    stdout = result.stdout
    assert "trained 200 steps" in stdout and "held-out response loss" in stdout, stdout
    loss = float(stdout.split("held-out response loss ")[1].split(",")[0])
    assert loss < 0.5
    assert f"run directory: {out}" in stdout
    assert f"{out / 'checkpoints' / 'final'} (last)" in stdout and "(best held-out loss)" in stdout
    assert f"next: lmforge chat {out}" in stdout
    assert "merge-lora" not in stdout  # full fine-tuning: nothing to merge
    assert "fine-tuning" in result.stderr and "alpaca format" in result.stderr  # the log line of the run
    assert "Traceback" not in result.stderr
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "checkpoints/final/model.safetensors",
                 "checkpoints/best/tokenizer_config.json", "checkpoints/step-100/train_state.pt"):
        assert (out / name).exists(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["checkpoint"] == str(trained_run) and config["train"]["max_steps"] == 200
    assert config["data"]["val_fraction"] == 0.2 and config["lora"]["r"] == 0


def test_finetune_from_a_config_file_with_flags_overriding_it(lora, trained_run):
    out, result = lora
    assert "trained 30 steps" in result.stdout, result.stdout
    assert "LoRA adapters only; fold them into full weights with: lmforge merge-lora" in result.stdout
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 30 and config["train"]["lr"] == 1e-2  # flag over YAML, YAML over default
    assert config["train"]["batch_size"] == 4 and config["train"]["save_interval"] == 10
    assert config["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q", "v"]}
    assert config["data"]["path"].endswith("alpaca.jsonl")  # 'data: FILE' is short for data.path
    final = out / "checkpoints" / "final"
    assert (final / "adapter.safetensors").is_file() and not (final / "model.safetensors").exists()
    info = json.loads((final / "config.json").read_text())
    assert info["lora"]["targets"] == ["q", "v"] and info["base"]["path"] == str((trained_run / "checkpoints" /
                                                                                   "best").resolve())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "final", "step-10", "step-20"]


def test_merge_lora_writes_a_full_checkpoint_that_generates_the_same(lora, tmp_path):
    out, _ = lora
    merged = tmp_path / "merged"
    result = lmforge("merge-lora", out, merged)
    assert result.returncode == 0, result.stderr
    assert f"wrote a full checkpoint with the adapters merged to {merged}" in result.stdout
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter.safetensors").exists()
    info = json.loads((merged / "config.json").read_text())
    assert "lora" not in info and "base" not in info
    assert info["merged_from"] == str((out / "checkpoints" / "best").resolve())
    prompt = ["--prompt", "Repeat: cat", "--temperature", 0, "--max-new-tokens", 25, "--ignore-eos", "--json"]
    adapted, plain = lmforge_all(("generate", out, *prompt), ("generate", merged, *prompt))
    assert adapted.returncode == 0 and plain.returncode == 0, (adapted.stderr, plain.stderr)
    assert json.loads(adapted.stdout)["completion_tokens"] == 25
    assert adapted.stdout == plain.stdout


# ------------------------------------------------------------------------------------ chat
def test_chat_two_turns_reset_and_exit(finetuned):
    out, _ = finetuned
    script = "Repeat: cat\nRepeat: dog\n/nope\n/reset\n\nRepeat: pen\n/exit\nRepeat: never\n"
    result = lmforge("chat", out, "--temperature", 0, "--max-new-tokens", 10, input=script)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    stdout = result.stdout
    assert stdout.startswith("lmforge chat (type a message; /reset starts over, /exit leaves)\n")
    answers = [line.split("assistant> ", 1)[1] for line in stdout.splitlines() if "assistant> " in line]
    assert answers == ["cat cat", "dog dog", "pen pen"], stdout
    # the tiny model's context (64 tokens) holds one exchange: the first is dropped for the second
    assert "(dropped the 2 oldest messages to fit the context of 64 tokens)" in stdout
    assert stdout.index("cat cat") < stdout.index("dropped the 2") < stdout.index("dog dog")
    assert "(unknown command /nope; type a message" in stdout
    assert stdout.count("(new conversation)") == 1
    assert stdout.index("(new conversation)") < stdout.index("pen pen")
    assert "never" not in stdout  # nothing is read after /exit


def test_chat_history_overflow_and_too_long_messages(finetuned):
    out, _ = finetuned
    long_message = "Repeat: ab ab ab"  # a long turn: with its answer, it leaves no room for the next one
    script = f"{long_message}\nRepeat: sun\n{'x' * 80}\nRepeat: cup\n"  # ends without /exit: end of input
    result = lmforge("chat", out, "--temperature", 0, "--max-new-tokens", 8, input=script)
    assert result.returncode == 0, result.stderr
    stdout = result.stdout
    answers = [line.split("assistant> ", 1)[1] for line in stdout.splitlines() if "assistant> " in line]
    assert len(answers) == 3 and answers[1] == "sun sun" and answers[2] == "cup cup", stdout
    assert stdout.count("(dropped the 2 oldest messages to fit the context of 64 tokens)") == 2
    # one message longer than the context: an error on its own line, and the chat goes on without it
    assert "you> (error: the conversation is 107 tokens long but the model's context is 64 tokens)\n" in stdout
    assert stdout.endswith("cup cup\nyou> \n")  # end of input leaves the chat on a fresh line


# ------------------------------------------------------------------------------------ errors: one line, exit 2
def test_finetune_option_and_data_errors_are_one_line(root, trained_run, tmp_path):
    data = root / "alpaca.jsonl"
    missing, unknown, target = lmforge_all(
        ("finetune", trained_run, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "a", *FAST),
        ("finetune", trained_run, "--data", data, "--out", tmp_path / "b", "--train.lrr", "3"),
        ("finetune", trained_run, "--data", data, "--out", tmp_path / "c", "--lora.r", "4", "--lora.targets", "gate",
         *FAST),
    )
    assert_clean_error(missing, "data file", "missing.jsonl", "does not exist")
    assert_clean_error(unknown, "unrecognized arguments: --train.lrr 3", "did you mean --train.lr?")
    assert_clean_error(target, "no gate layer for LoRA", "q, k, v, o")
    for name in "abc":
        assert not (tmp_path / name).exists(), name


def test_base_checkpoint_errors_are_one_line(root, trained_run, lora, tmp_path):
    data = root / "alpaca.jsonl"
    lora_out, _ = lora
    merge, lora_base, no_base = lmforge_all(
        ("merge-lora", trained_run, tmp_path / "merged"),
        ("finetune", lora_out, "--data", data, "--out", tmp_path / "d", *FAST),
        ("finetune", "--data", data, "--out", tmp_path / "e"),
    )
    assert_clean_error(merge, "has no LoRA adapters to merge")
    assert_clean_error(lora_base, "is a LoRA checkpoint; merge it first", "lmforge merge-lora")
    assert_clean_error(no_base, "no base checkpoint")
    for name in ("merged", "d", "e"):
        assert not (tmp_path / name).exists(), name


def test_chat_and_merge_errors_are_one_line(trained_run, tmp_path):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"instruction": "a", "output": "b"}\n{"messages": [{"role": "user", "content": "u"}]}\n')
    not_checkpoint, bad_option, merge_missing, mixed = lmforge_all(
        ("chat", tmp_path, "--temperature", 0),
        ("chat", tmp_path, "--temperature", "-1"),
        ("merge-lora", tmp_path / "nothing", tmp_path / "out"),
        ("finetune", trained_run, "--data", bad_data, "--out", tmp_path / "run", *FAST),
    )
    assert_clean_error(not_checkpoint, "not an lmforge checkpoint")
    assert_clean_error(bad_option, "temperature")
    assert_clean_error(merge_missing, "does not exist")
    assert_clean_error(mixed, "mixes formats")


def test_finetune_and_chat_document_their_options():
    finetune_help, chat_help, merge_help = lmforge_all(("finetune", "--help"), ("chat", "--help"),
                                                       ("merge-lora", "--help"))
    for flag in ("--data", "--config", "--lora.r", "--lora.targets", "--data.packing", "--data.train_on_prompt",
                 "--eval.examples", "--train.save_interval", "--resume"):
        assert flag in finetune_help.stdout, flag
    for flag in ("--system", "--max-new-tokens", "--temperature"):
        assert flag in chat_help.stdout, flag
    assert "OUT_CHECKPOINT" in merge_help.stdout
