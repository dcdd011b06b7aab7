"""``lmforge rl``, ``lmforge dpo`` and ``lmforge train-reward``: the alignment runs' commands, each a
thin call of :mod:`lmforge.alignment` with options from ``--config FILE`` (YAML) and flags."""

from __future__ import annotations

import argparse
from typing import Any

from lmforge.cli_parsing import Subcommands, add_checkpoint, add_config_options, command, run_config


def cmd_rl(args: argparse.Namespace) -> None:
    from lmforge.alignment.config import RLConfig
    from lmforge.alignment.policy_optimization import rl

    config, _ = run_config(args, RLConfig, "rl", ())
    result = rl(config)
    metrics = result.metrics
    held_out = ", ".join(f"{name.removeprefix('val_')} {value:.4f}" for name, value in metrics.items()
                         if name.startswith("val_"))
    print(f"trained {result.step:,} steps in {result.elapsed:.1f} s; training reward {metrics.get('reward', 0.0):.4f}; "
          f"held-out (greedy) {held_out}")
    _print_run(result, config.train.best_metric, config.lora.enabled)
    print(f"next: lmforge chat {result.run_dir}")


def _preference_config(args: argparse.Namespace, default_out: str) -> Any:
    from lmforge.alignment.config import PreferenceConfig

    config, values = run_config(args, PreferenceConfig, args.command, ())
    if "out" not in values:
        config.out = default_out
    return config


def cmd_dpo(args: argparse.Namespace) -> None:
    from lmforge.alignment.preference_training import dpo

    config = _preference_config(args, "runs/dpo")
    result = dpo(config)
    _print_preference_result(result)
    _print_run(result, config.train.best_metric, config.lora.enabled)
    print(f"next: lmforge chat {result.run_dir}")


def cmd_train_reward(args: argparse.Namespace) -> None:
    from lmforge.alignment.preference_training import train_reward

    config = _preference_config(args, "runs/reward")
    result = train_reward(config)
    _print_preference_result(result)
    _print_run(result, config.train.best_metric, lora=False)
    print(f"next: use it as a reward: lmforge rl POLICY --prompts FILE --reward reward_model:{result.best_checkpoint}")


def _print_preference_result(result: Any) -> None:
    held_out = ", ".join(f"{name.removeprefix('val_')} {value:.4f}" for name, value in result.metrics.items()
                         if name.startswith("val_"))
    print(f"trained {result.step:,} steps in {result.elapsed:.1f} s; held-out pairs: {held_out}")


def _print_run(result: Any, best_metric: str, lora: bool) -> None:
    print(f"run directory: {result.run_dir}  (config.yaml, metrics.jsonl, tensorboard/, loss.png)")
    print(f"checkpoints:   {result.final_checkpoint} (last), {result.best_checkpoint} (best held-out {best_metric})")
    if lora:
        print(f"LoRA adapters only; fold them into full weights with: lmforge merge-lora {result.best_checkpoint} OUT")


def add_alignment_commands(commands: Subcommands) -> None:
    from lmforge.alignment.config import PreferenceConfig, RLConfig
    from lmforge.options import add_arguments

    p = command(commands, "rl", "optimise a policy against rewards: GRPO, RLOO or REINFORCE (full or LoRA)",
                "Reinforcement learning from a checkpoint: sample num_generations completions per prompt, score "
                "them with the rewards, and train on the advantages with PPO's clipped objective (and a KL to the "
                "reference with beta > 0). Options come from --config FILE (YAML), overridden by flags; every "
                "YAML key is also a flag.")
    add_checkpoint(p, "policy checkpoint or run directory", hf=True, nargs="?", default=argparse.SUPPRESS)
    add_config_options(p, "rl", "checkpoint, prompts, reward, out, train, lora", recipes=False)
    add_arguments(p, RLConfig, skip=("checkpoint",))
    p.set_defaults(func=cmd_rl)

    for name, what, func in (("dpo", "direct preference optimisation (DPO) on prompt/chosen/rejected pairs",
                              cmd_dpo),
                             ("train-reward", "train a reward model (a scalar head, Bradley-Terry loss) on "
                                              "prompt/chosen/rejected pairs", cmd_train_reward)):
        p = command(commands, name, what, f"{what[0].upper()}{what[1:]}, from a checkpoint (usually a supervised "
                                          f"fine-tune). Options come from --config FILE (YAML), overridden by "
                                          f"flags; every YAML key is also a flag.")
        add_checkpoint(p, "starting checkpoint or run directory", hf=True, nargs="?", default=argparse.SUPPRESS)
        add_config_options(p, name, "checkpoint, data, out, train, lora", recipes=False)
        add_arguments(p, PreferenceConfig, skip=("checkpoint",))
        p.set_defaults(func=func)
