"""Rollout speed (issue #33): the RL rollout phase's tokens/s against lmforge's own ``generate`` (the
serving path, ``LanguageModel.complete``) on the same batch: the same model, prompts, number of samples,
``max_new_tokens`` and sampling. The rollout must not be slower than serving.

    python bench/rl_speed.py                       # llama-baby size (10.7M parameters), 16 prompts x 8
    python bench/rl_speed.py --preset gpt2-tiny --prompts 8

The model is freshly initialised (speed does not depend on what it learned); it seldom writes the
end-of-sequence token, so both sides generate close to ``max_new_tokens`` per sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from arithmetic_tasks import cpu_flags, problems
from lmforge.alignment.config import RLConfig, RLTrainConfig
from lmforge.alignment.policy_optimization import build_rewards
from lmforge.alignment.rollouts import RolloutBatches, RunningStats
from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import save_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-baby")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    parser.add_argument("--generations", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per side (the best is kept)")
    args = parser.parse_args()
    rows = problems(args.prompts, 0, evaluation=False)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer.train(iter([r["prompt"] + " " + r["answer"] for r in problems(2000, 1, False)]),
                                    kind="char")
        torch.manual_seed(0)
        model_config = ModelConfig.from_dict({"preset": args.preset, "vocab_size": tokenizer.vocab_size,
                                              "dropout": 0.0})
        path = save_checkpoint(Path(tmp) / "model", build_model(model_config), tokenizer, None, {"step": 0})
        lm = LanguageModel.load(path, device="cpu")
        batch = args.prompts * args.generations
        config = RLConfig(checkpoint=str(path), prompts="-", num_generations=args.generations,
                          max_new_tokens=args.max_new_tokens, temperature=1.0,
                          train=RLTrainConfig(batch_size=batch, seed=0))
        stats = RunningStats()
        rollouts = RolloutBatches(lm.model, lm.tokenizer, rows, config, build_rewards(config), "prompt", stats)

        rollout_rates, serving_rates, lengths = [], [], {"rollout": [], "generate": []}
        for repeat in range(args.repeats):  # interleaved, so that a busy machine slows both sides alike
            # each repeat is a new generated batch (new prompts, new sampling seed) and generate gets the
            # same prompts and seed, so both sides sample alike and neither keeps a lucky draw
            prompts = [r["prompt"] for r in rollouts.prompt_rows(repeat)]
            seed = config.train.seed * 1_000_003 + repeat
            before_seconds, before_tokens = stats.seconds["rollout"], stats.rollout_tokens
            rollouts.generate(repeat, step=1)
            tokens = stats.rollout_tokens - before_tokens
            rollout_rates.append(tokens / (stats.seconds["rollout"] - before_seconds))
            lengths["rollout"].append(tokens / batch)
            start = time.perf_counter()
            completions = lm.complete(prompts, max_new_tokens=args.max_new_tokens, temperature=1.0,
                                      num_samples=args.generations, seed=seed)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) + int(c.eos) for c in completions)
            serving_rates.append(tokens / seconds)
            lengths["generate"].append(tokens / batch)
    result = {"cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(), "preset": args.preset,
              "batch": f"{args.prompts} prompts x {args.generations} samples, max_new_tokens {args.max_new_tokens}",
              "rollout_tokens_per_sec": max(rollout_rates), "generate_tokens_per_sec": max(serving_rates),
              "mean_tokens_per_sample": {side: sum(v) / len(v) for side, v in lengths.items()}}
    result["ratio"] = result["rollout_tokens_per_sec"] / result["generate_tokens_per_sec"]
    print(json.dumps(result, indent=2))
    print(f"rollout {result['rollout_tokens_per_sec']:,.0f} tokens/s vs generate "
          f"{result['generate_tokens_per_sec']:,.0f} tokens/s: ratio {result['ratio']:.2f} "
          f"(CPU: {result['cpu_flags']}, {result['torch_threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
