"""RL against more supervised training on arithmetic with a checkable answer (issue #33).

Problems are ``{"prompt": "What is 37 + 48?", "answer": "85"}``: ``a + b`` and ``a - b`` with a, b in
[10, 999], ``a * b`` with a in [2, 99] and b in [10, 99]. A prompt whose SHA-1 hex digest starts with
``0`` is reserved for evaluation: it is filtered out of every training and tuning set, and the
held-out problems are drawn from those alone.

One run, all on this machine:
1. a small character-level Llama, SFT on prompt/answer pairs for ``--sft-minutes``: ``DIR/sft``;
2. from it, GRPO (or ``--algorithm rloo``) with the exact-answer reward for ``--minutes``: ``DIR/rl``;
3. from it too, supervised training continued for the same ``--minutes`` on the same problems:
   ``DIR/sft-more`` (the fair comparison);
4. every model answers the held-out problems greedily (pass@1), and the warm start and the policy
   draw 8 samples at temperature 1 (pass@8); paired bootstrap intervals of the differences.

    python bench/rl_arithmetic.py --out runs/rl-arithmetic            # 15 CPU-minutes each for RL and SFT
    python bench/rl_arithmetic.py --out /tmp/quick --minutes 2 --sft-minutes 1 --eval 200

``DIR/sft`` and ``DIR/rl`` load with ``LanguageModel.load``; ``DIR/results.json`` holds the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from arithmetic_tasks import (
    ANSWER_FORMATS,
    accuracy,
    cpu_flags,
    initial_checkpoint,
    problems,
    reserved,
    sft_config,
    worked_answer,
    write_jsonl,
)
from lmforge.alignment.config import RLConfig
from lmforge.alignment.policy_optimization import rl
from lmforge.alignment.rewards import extract_answer
from lmforge.api import LanguageModel
from lmforge.evaluation.significance import paired_bootstrap
from lmforge.options import build_dataclass
from lmforge.recipes.finetune import finetune

log = logging.getLogger("rl_arithmetic")
MAX_NEW_TOKENS = 16  # the longest worked answer, " 4089- = -9804", is 14 tokens

# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------
def answers(lm: LanguageModel, prompts: list[str], samples: int, temperature: float) -> list[list[str | None]]:
    """The extracted numbers of ``samples`` completions per prompt."""
    out = []
    for start in range(0, len(prompts), 128):
        chunk = prompts[start:start + 128]
        completions = lm.complete(chunk, max_new_tokens=MAX_NEW_TOKENS, temperature=temperature,
                                  num_samples=samples, seed=1)
        for i in range(len(chunk)):
            out.append([extract_answer(c.text) for c in completions[i * samples:(i + 1) * samples]])
    return out


def evaluate(path: Path, eval_set: list[dict[str, str]], pass_at_8: bool) -> dict:
    lm = LanguageModel.load(path, device="cpu")
    prompts = [p["prompt"] for p in eval_set]
    gold = [p["answer"] for p in eval_set]
    greedy = [a[0] for a in answers(lm, prompts, 1, 0.0)]
    result = {"pass@1": accuracy(greedy, gold), "greedy": greedy}
    for op in "+-*":
        rows = [i for i, p in enumerate(eval_set) if f" {op} " in p["prompt"]]
        result[f"pass@1 {op}"] = accuracy([greedy[i] for i in rows], [gold[i] for i in rows])
    if pass_at_8:
        sampled = answers(lm, prompts, 8, 1.0)
        result["pass@8"] = sum(g in s for s, g in zip(sampled, gold)) / len(gold)
        result["sampled pass@1"] = sum(s.count(g) for s, g in zip(sampled, gold)) / (8 * len(gold))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="run directory (DIR/sft, DIR/rl, DIR/sft-more)")
    parser.add_argument("--minutes", type=float, default=15.0, help="budget of RL, and of continued SFT")
    parser.add_argument("--sft-minutes", type=float, default=25.0, help="budget of the SFT warm start")
    parser.add_argument("--train-problems", type=int, default=50_000, help="training problems (never reserved)")
    parser.add_argument("--eval", type=int, default=1000, help="held-out problems (reserved ones)")
    parser.add_argument("--algorithm", default="grpo", choices=("grpo", "rloo", "reinforce"))
    parser.add_argument("--answer-format", default="reversed", choices=ANSWER_FORMATS,
                        help="what SFT teaches to write before the number (see arithmetic_tasks.worked_answer)")
    parser.add_argument("--rl-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    out: Path = args.out
    started = time.time()

    eval_set = problems(args.eval, 10_000 + args.seed, evaluation=True)
    train = problems(args.train_problems, args.seed, evaluation=False)
    tune = problems(256, 20_000 + args.seed, evaluation=False, exclude={p["prompt"] for p in train})
    assert not any(reserved(p["prompt"]) for p in train + tune) and all(reserved(p["prompt"]) for p in eval_set)
    data = out / "data"
    write_jsonl(data / "eval.jsonl", eval_set)
    sft_rows = [{"prompt": p["prompt"], "completion": worked_answer(p, args.answer_format)} for p in train]
    write_jsonl(data / "sft_train.jsonl", sft_rows)
    write_jsonl(data / "sft_val.jsonl", [{"prompt": p["prompt"], "completion": worked_answer(p, args.answer_format)}
                                         for p in tune])
    write_jsonl(data / "rl_prompts.jsonl", train)
    write_jsonl(data / "rl_val.jsonl", tune)

    init = initial_checkpoint(out / "init", [r["prompt"] + r["completion"] for r in sft_rows])
    finetune(sft_config(init, data / "sft_train.jsonl", data / "sft_val.jsonl", out / "sft", args.sft_minutes, 2e-3,
                        args.seed))
    more = finetune(sft_config(out / "sft", data / "sft_train.jsonl", data / "sft_val.jsonl", out / "sft-more",
                               args.minutes, 5e-4, args.seed + 1))
    config = build_dataclass(RLConfig, {
        "checkpoint": str(out / "sft"), "prompts": str(data / "rl_prompts.jsonl"),
        "val_prompts": str(data / "rl_val.jsonl"),
        "reward": ["exact_answer"], "algorithm": args.algorithm, "num_generations": 8,
        "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": 1.0, "loss_type": "dapo", "out": str(out / "rl"), "sample_interval": 200,
        "train": {"lr": args.rl_lr, "batch_size": 128, "max_steps": None, "max_time": args.minutes * 60,
                  "eval_interval": 100, "eval_windows": 256, "save_interval": 0, "log_interval": 10,
                  "dtype": "auto", "seed": args.seed, "device": "cpu", "progress": False}})
    policy = rl(config)

    results = {name: evaluate(out / name, eval_set, pass_at_8=name != "sft-more") for name in ("sft", "sft-more", "rl")}
    gold = [p["answer"] for p in eval_set]
    comparisons = {}
    for base in ("sft", "sft-more"):
        diff = paired_bootstrap(accuracy, results[base]["greedy"], results["rl"]["greedy"], gold)
        comparisons[f"rl - {base}"] = {"difference": diff.difference, "low": diff.low, "high": diff.high}
    summary = {
        "cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(), "minutes": args.minutes,
        "sft_minutes": args.sft_minutes, "algorithm": args.algorithm, "eval_problems": len(eval_set),
        "train_problems": len(train), "sft_more_steps": more.step, "rl_steps": policy.step,
        "rl_time_split": {k: v for k, v in policy.metrics.items() if k.startswith("time/")},
        "rl_rollout_tokens_per_sec": policy.metrics.get("rollout_tokens_per_sec"),
        "models": {name: {k: v for k, v in r.items() if k != "greedy"} for name, r in results.items()},
        "comparisons": comparisons, "wall_minutes": (time.time() - started) / 60}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nheld-out exact match on {len(eval_set)} reserved problems (CPU: {summary['cpu_flags']}, "
          f"{summary['torch_threads']} threads)")
    print(f"{'model':<10} {'pass@1':>7} {'+':>6} {'-':>6} {'*':>6} {'pass@8':>7}")
    for name, r in results.items():
        p8 = f"{r['pass@8']:7.3f}" if "pass@8" in r else f"{'':>7}"
        print(f"{name:<10} {r['pass@1']:7.3f} {r['pass@1 +']:6.3f} {r['pass@1 -']:6.3f} {r['pass@1 *']:6.3f} {p8}")
    for name, c in comparisons.items():
        print(f"{name}: {100 * c['difference']:+.1f} points (95% CI {100 * c['low']:+.1f} .. {100 * c['high']:+.1f})")
    target = comparisons["rl - sft"]["difference"] >= 0.20 and comparisons["rl - sft-more"]["difference"] > 0
    print(f"target (RL >= SFT + 20 points and > continued SFT): {'met' if target else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
