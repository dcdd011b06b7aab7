"""GSM8K as an RL prompt set, out of the box (issue #33): ``../shared/data/gsm8k/train.jsonl`` has
``question`` and ``answer`` columns, the answer ending in ``#### N``; ``lmforge rl`` finds the prompt
column (question) and the exact-answer reward reads N from the answer column without any options.

This script measures whatever a CPU-sized model reaches, with no target: a small BPE Llama is SFT'd on
the worked solutions for ``--sft-minutes``, then GRPO runs for ``--minutes``; both answer held-out
questions greedily (questions whose SHA-1 starts with 0, never trained on).

    python bench/rl_gsm8k.py --out runs/rl-gsm8k
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from arithmetic_tasks import accuracy, cpu_flags, reserved, sft_config, write_jsonl
from lmforge.alignment.config import RLConfig
from lmforge.alignment.policy_optimization import read_prompts, rl
from lmforge.alignment.rewards import exact_answer, extract_answer
from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.data.formats import read_records
from lmforge.models import build_model
from lmforge.options import build_dataclass
from lmforge.recipes.finetune import finetune
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import save_checkpoint

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
MODEL = dict(family="decoder", block_size=384, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, norm="rmsnorm",
             mlp="swiglu", position="rope", bias=False, tie_embeddings=True, dropout=0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sft-minutes", type=float, default=6.0)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if not GSM8K.is_file():
        raise SystemExit(f"needs {GSM8K}")
    started, out = time.time(), args.out

    # out of the box: the file itself is a prompt set, and its answers feed the exact-answer reward
    rows, column = read_prompts(str(GSM8K), "auto")
    worked = [row["answer"].split("####")[0] + f"#### {extract_answer(row['answer'])}" for row in rows[:8]]
    assert column == "question" and exact_answer([], worked, [r["answer"] for r in rows[:8]]) == [1.0] * 8

    train = [r for r in rows if not reserved(r["question"])]
    held_out = [r for r in rows if reserved(r["question"])][:args.eval]
    tune = train[-128:]
    train = train[:-128]
    data = out / "data"
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "val.jsonl", tune)
    write_jsonl(data / "sft_train.jsonl", [{"prompt": r["question"], "completion": " " + r["answer"]} for r in train])
    write_jsonl(data / "sft_val.jsonl", [{"prompt": r["question"], "completion": " " + r["answer"]} for r in tune])

    tokenizer = Tokenizer.train(iter([r["question"] + " " + r["answer"] for r in train]), kind="bpe", vocab_size=2048)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**MODEL, "vocab_size": tokenizer.vocab_size}))
    init = save_checkpoint(out / "init", model, tokenizer, None, {"step": 0})
    sft = sft_config(init, data / "sft_train.jsonl", data / "sft_val.jsonl", out / "sft", args.sft_minutes, 2e-3, 0)
    sft.train.batch_size = 16
    finetune(sft)
    config = build_dataclass(RLConfig, {
        "checkpoint": str(out / "sft"), "prompts": str(data / "train.jsonl"), "val_prompts": str(data / "val.jsonl"),
        "num_generations": 4, "max_new_tokens": 160, "out": str(out / "rl"), "sample_interval": 20,
        "train": {"lr": 5e-5, "batch_size": 32, "max_steps": None, "max_time": args.minutes * 60,
                  "eval_interval": 0, "eval_windows": 64, "save_interval": 0, "log_interval": 5, "dtype": "auto",
                  "device": "cpu", "progress": False}})
    policy = rl(config)

    gold = [extract_answer(r["answer"]) for r in held_out]
    results = {}
    for name in ("sft", "rl"):
        lm = LanguageModel.load(out / name, device="cpu")
        completions = []
        for start in range(0, len(held_out), 32):
            completions += lm.complete([r["question"] for r in held_out[start:start + 32]], max_new_tokens=160,
                                       temperature=0.0)
        predictions = [extract_answer(c.text) for c in completions]
        results[name] = {"accuracy": accuracy(predictions, gold),
                         "answered": sum(p is not None for p in predictions) / len(predictions),
                         "example": completions[0].text[:300]}
    summary = {"cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(), "held_out": len(held_out),
               "rl_steps": policy.step, "rl_frac_reward_zero_std": policy.metrics.get("frac_reward_zero_std"),
               "rl_reward": policy.metrics.get("reward"), "models": results,
               "wall_minutes": (time.time() - started) / 60, "records": len(read_records(GSM8K))}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
