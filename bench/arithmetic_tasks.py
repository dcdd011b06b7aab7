"""Shared pieces of the alignment benchmarks on arithmetic (bench/rl_arithmetic.py, rl_tools.py,
dpo_arithmetic in preference.py): the problems and their reserved evaluation part, a fresh small
character-level model, the SFT run, and answer checking.

A problem's prompt whose SHA-1 hex digest starts with ``0`` is reserved for evaluation: the training
and tuning sets never hold one, and the held-out problems are drawn from those alone.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
from pathlib import Path

import torch

from lmforge.config import FinetuneConfig, ModelConfig
from lmforge.models import build_model
from lmforge.options import build_dataclass
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import save_checkpoint

MODEL = dict(family="decoder", block_size=48, n_layer=4, n_head=4, n_kv_head=4, n_embd=192, norm="rmsnorm",
             mlp="swiglu", position="rope", bias=False, tie_embeddings=True, dropout=0.0)


# ------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------
def reserved(prompt: str) -> bool:
    """Whether a prompt is kept for evaluation (its SHA-1 hex digest starts with 0)."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest().startswith("0")


def random_problem(rng: random.Random, kind: str = "mixed") -> dict[str, str]:
    """mixed: ``a + b``, ``a - b`` (a, b in [10, 999]) or ``a * b`` (a in [2, 99], b in [10, 99]);
    big_products: ``a * b`` with a, b in [100, 999]."""
    op = "*" if kind == "big_products" else rng.choice("+-*")
    if kind == "big_products":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
    elif op == "*":
        a, b = rng.randint(2, 99), rng.randint(10, 99)
    else:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return {"prompt": f"What is {a} {op} {b}?", "answer": str(value)}


def problems(count: int, seed: int, evaluation: bool, exclude: set[str] = frozenset(),
             kind: str = "mixed") -> list[dict[str, str]]:
    """``count`` distinct problems: reserved ones only (``evaluation``) or never a reserved one."""
    rng, found, seen = random.Random(seed), [], set(exclude)
    while len(found) < count:
        problem = random_problem(rng, kind)
        if reserved(problem["prompt"]) == evaluation and problem["prompt"] not in seen:
            seen.add(problem["prompt"])
            found.append(problem)
    return found


ANSWER_FORMATS = ("reversed", "plain")


def worked_answer(problem: dict[str, str], answer_format: str = "reversed") -> str:
    """The completion SFT teaches. ``plain``: `` 1137``. ``reversed``: the digits first from the
    lowest (the order in which carries flow, so a small model computes them), then the number:
    `` 7311 = 1137`` (and `` 593- = -395``); either way the answer ends with the number."""
    answer = problem["answer"]
    if answer_format == "plain":
        return " " + answer
    digits = answer.lstrip("-")[::-1] + ("-" if answer.startswith("-") else "")
    return f" {digits} = {answer}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------
def sft_config(checkpoint: Path, data: Path, val: Path, out: Path, minutes: float, lr: float, seed: int):
    return build_dataclass(FinetuneConfig, {
        "checkpoint": str(checkpoint), "out": str(out), "task": "sft",
        "data": {"path": str(data), "val_path": str(val), "format": "prompt_completion"},
        "train": {"lr": lr, "min_lr": lr / 10, "warmup_steps": 50, "schedule": "cosine", "batch_size": 64,
                  "max_steps": None, "max_time": minutes * 60, "eval_interval": 500, "eval_windows": 256,
                  "save_interval": 0, "log_interval": 50, "weight_decay": 0.0, "dtype": "auto", "seed": seed,
                  "device": "cpu", "progress": False}})


def initial_checkpoint(out: Path, texts: list[str], block_size: int = 48) -> Path:
    """A freshly initialised character-level model (the SFT warm start trains it from scratch)."""
    tokenizer = Tokenizer.train(iter(texts), kind="char")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**MODEL, "block_size": block_size, "vocab_size": tokenizer.vocab_size}))
    return save_checkpoint(out, model, tokenizer, None, {"step": 0, "recipe": "init"})


def accuracy(predictions: list[str | None], gold: list[str]) -> float:
    return sum(p == g for p, g in zip(predictions, gold)) / max(len(gold), 1)


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
