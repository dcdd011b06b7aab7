"""The calculator environment against answering without the tool, on ``a * b`` with a, b in [100, 999]
(issue #33). Prompts read ``What is 123 * 456?``; reserved prompts (SHA-1 starting with 0) are the
held-out problems and never trained on.

1. A small character-level model is taught the tool's format by SFT for ``--sft-minutes`` on
   transcripts ``What is 123 * 456? <calc>123*456</calc><result>56088</result> 56088``: ``DIR/sft``.
2. GRPO in the calculator environment (the model's turns stop at ``</calc>``, the environment appends
   the ``<result>``, and only the model's turns are trained on) with the exact-answer reward for
   ``--minutes``: ``DIR/rl``.
3. Each model plays the held-out problems greedily twice: in the calculator environment (episode
   accuracy), and without the tool (a single turn: whatever it writes after ``<calc>`` is its own).

    python bench/rl_tools.py --out runs/rl-tools
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from arithmetic_tasks import accuracy, cpu_flags, initial_checkpoint, problems, reserved, sft_config, write_jsonl
from lmforge.alignment.config import RLConfig
from lmforge.alignment.environments import Calculator, SingleTurn, policy_generate, run_episodes
from lmforge.alignment.policy_optimization import rl
from lmforge.alignment.rewards import extract_answer
from lmforge.api import LanguageModel
from lmforge.config import SamplingConfig
from lmforge.options import build_dataclass
from lmforge.recipes.finetune import finetune

BLOCK_SIZE = 96


def transcript(problem: dict[str, str]) -> str:
    """The tool-using answer SFT teaches: the call, the environment's result, the number."""
    a, _, b = problem["prompt"].removeprefix("What is ").removesuffix("?").split()
    return f" <calc>{a}*{b}</calc><result>{problem['answer']}</result> {problem['answer']}"


def play(path: Path, eval_set: list[dict[str, str]], tool: bool) -> dict:
    """Greedy episodes of the held-out problems, with the calculator or without it (one turn)."""
    lm = LanguageModel.load(path, device="cpu")
    sampling = SamplingConfig(max_new_tokens=48 if not tool else 24, temperature=0.0)
    predictions, calls = [], 0
    for start in range(0, len(eval_set), 128):
        rows = eval_set[start:start + 128]
        environments = [Calculator("prompt") if tool else SingleTurn("prompt") for _ in rows]
        episodes = run_episodes(environments, rows, lm.tokenizer, lm.model.config.block_size,
                                policy_generate(lm.model, lm.tokenizer, sampling, environments),
                                max_turns=3 if tool else 1)
        predictions += [extract_answer(e.completion) for e in episodes]
        calls += sum(any("<result>" in t.text and not t.trained for t in e.turns) for e in episodes)
    gold = [p["answer"] for p in eval_set]
    return {"accuracy": accuracy(predictions, gold), "tool_calls": calls / len(eval_set), "predictions": predictions}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="run directory (DIR/sft, DIR/rl)")
    parser.add_argument("--minutes", type=float, default=5.0, help="budget of RL in the calculator environment")
    parser.add_argument("--sft-minutes", type=float, default=6.0, help="budget of the SFT warm start")
    parser.add_argument("--eval", type=int, default=500, help="held-out problems (reserved ones)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    out: Path = args.out
    started = time.time()
    eval_set = problems(args.eval, 10_000 + args.seed, evaluation=True, kind="big_products")
    train = problems(20_000, args.seed, evaluation=False, kind="big_products")
    tune = problems(256, 20_000 + args.seed, evaluation=False, exclude={p["prompt"] for p in train},
                    kind="big_products")
    assert not any(reserved(p["prompt"]) for p in train + tune) and all(reserved(p["prompt"]) for p in eval_set)
    data = out / "data"
    sft_rows = [{"prompt": p["prompt"], "completion": transcript(p)} for p in train]
    write_jsonl(data / "sft_train.jsonl", sft_rows)
    write_jsonl(data / "sft_val.jsonl", [{"prompt": p["prompt"], "completion": transcript(p)} for p in tune])
    write_jsonl(data / "rl_prompts.jsonl", train)
    write_jsonl(data / "rl_val.jsonl", tune)
    write_jsonl(data / "eval.jsonl", eval_set)

    init = initial_checkpoint(out / "init", [r["prompt"] + r["completion"] for r in sft_rows], BLOCK_SIZE)
    finetune(sft_config(init, data / "sft_train.jsonl", data / "sft_val.jsonl", out / "sft", args.sft_minutes, 2e-3,
                        args.seed))
    config = build_dataclass(RLConfig, {
        "checkpoint": str(out / "sft"), "prompts": str(data / "rl_prompts.jsonl"),
        "val_prompts": str(data / "rl_val.jsonl"), "reward": ["exact_answer"], "environment": "calculator",
        "max_turns": 3, "num_generations": 8, "max_new_tokens": 24, "temperature": 1.0, "out": str(out / "rl"),
        "sample_interval": 100,
        "train": {"lr": 1e-4, "batch_size": 64, "max_steps": None, "max_time": args.minutes * 60,
                  "eval_interval": 50, "eval_windows": 128, "save_interval": 0, "log_interval": 10,
                  "dtype": "auto", "seed": args.seed, "device": "cpu", "progress": False}})
    policy = rl(config)

    results = {f"{name} {'with' if tool else 'without'} the tool": play(out / name, eval_set, tool)
               for name in ("sft", "rl") for tool in (True, False)}
    summary = {"cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(), "minutes": args.minutes,
               "sft_minutes": args.sft_minutes, "eval_problems": len(eval_set), "rl_steps": policy.step,
               "rl_time_split": {k: v for k, v in policy.metrics.items() if k.startswith("time/")},
               "models": {name: {k: v for k, v in r.items() if k != "predictions"} for name, r in results.items()},
               "wall_minutes": (time.time() - started) / 60}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nheld-out a * b (a, b in [100, 999]) on {len(eval_set)} reserved problems, greedy "
          f"(CPU: {summary['cpu_flags']}, {summary['torch_threads']} threads)")
    print(f"{'model':<28} {'accuracy':>8} {'tool calls':>10}")
    for name, r in results.items():
        print(f"{name:<28} {r['accuracy']:8.3f} {r['tool_calls']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
