"""Policy optimisation (``lmforge rl``): GRPO, RLOO and REINFORCE on the one training loop.

A run is the loop of :mod:`lmforge.training.loop` with three parts of its own:

* the batches are :class:`~lmforge.alignment.rollouts.RolloutBatches`: the policy plays episodes of
  the prompt set in the run's environment, the rewards score them, and their advantages weight the
  tokens the policy wrote;
* the objective is :func:`~lmforge.alignment.losses.policy_loss` on the policy's log-probabilities of
  those tokens (PPO's clipped ratio against the generating policy, plus ``beta`` times the KL to the
  reference: the base with LoRA adapters off, or a frozen copy when every weight trains);
* the evaluator plays the held-out prompts greedily and reports their mean reward (``val_reward``,
  which picks ``checkpoints/best``) and each reward's mean (``val_reward_NAME``).

At the end, the time split between rollouts, scoring, reference log-probabilities and the updates is
logged and returned with the metrics (``time/...``), with the rollouts' tokens per second.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lmforge.alignment.config import RLConfig
from lmforge.alignment.environments import policy_generate, run_episodes
from lmforge.alignment.losses import entropy, masked_mean, policy_loss, sequence_logprobs
from lmforge.alignment.rewards import CombinedReward, load_reward
from lmforge.alignment.rollouts import RolloutBatches, RunningStats, episode_rewards, make_environment
from lmforge.config import SamplingConfig, to_dict
from lmforge.data.formats import read_records
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.fileio import atomic_write_text
from lmforge.inference.prompts import encode_prompt
from lmforge.interop.hf import load_base_model
from lmforge.models.lora import adapters_disabled, apply_lora, count_trainable
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import base_reference, fingerprint, latest_checkpoint, read_config
from lmforge.training.distributed import DistContext, all_reduce_sum
from lmforge.training.loop import TrainResult, setup_runtime, train

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt", "question")


# ------------------------------------------------------------------------------------------
# The prompt set
# ------------------------------------------------------------------------------------------
def prompt_column(rows: list[dict[str, Any]], configured: str, path: str) -> str:
    """The column of ``rows`` holding the prompt text: ``configured``, or (auto) prompt, then question."""
    if configured != "auto":
        return configured
    for name in PROMPT_COLUMNS:
        if name in rows[0]:
            return name
    raise DataError(f"{path}: no prompt column (looked for {', '.join(PROMPT_COLUMNS)}; the first row has "
                    f"{', '.join(map(str, rows[0])) or 'no columns'}): give --prompt-column")


def read_prompts(path: str, configured_column: str) -> tuple[list[dict[str, Any]], str]:
    """The rows of a JSONL prompt set and the name of its prompt column; every row must have the
    column as non-empty text."""
    rows = read_records(path)
    if not rows:
        raise DataError(f"{path}: the prompt set is empty")
    column = prompt_column(rows, configured_column, path)
    for number, row in enumerate(rows, 1):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            what = "has no" if column not in row else "has an empty or non-text"
            raise DataError(f"{path}: row {number} {what} {column!r} column")
    return rows, column


def fitting_prompts(rows: list[dict[str, Any]], column: str, tokenizer: Tokenizer, block_size: int,
                    max_new_tokens: int, what: str) -> list[dict[str, Any]]:
    """The rows whose prompt leaves room for ``max_new_tokens`` in the context (the others dropped
    with a warning; none left is an error)."""
    kept = [row for row in rows if len(encode_prompt(tokenizer, row[column])) + max_new_tokens <= block_size]
    if len(kept) < len(rows):
        log.warning("%d of %d %s prompts leave no room for max_new_tokens %d in the model's context of %d "
                    "tokens: dropped", len(rows) - len(kept), len(rows), what, max_new_tokens, block_size)
    if not kept:
        raise DataError(f"no {what} prompt fits the model's context of {block_size} tokens with max_new_tokens "
                        f"{max_new_tokens}: lower max_new_tokens or shorten the prompts")
    return kept


def split_prompts(config: RLConfig, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows): the ``val_prompts`` file, or ``val_size`` rows drawn with the seed."""
    if config.val_prompts:
        val, _ = read_prompts(config.val_prompts, config.prompt_column)
        return rows, val
    if config.val_size == 0:
        raise DataError("no held-out prompts: give val_prompts or a val_size > 0")
    if len(rows) < 2 * config.val_size:
        raise DataError(f"only {len(rows)} prompts to hold {config.val_size} out of (val_size): give val_prompts "
                        f"or a smaller val_size")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.train.seed)).tolist()
    held = set(order[:config.val_size])
    return [row for i, row in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# ------------------------------------------------------------------------------------------
# Objective and evaluation
# ------------------------------------------------------------------------------------------
class PolicyObjective:
    """The loop's objective on a rollout micro-batch: the clipped policy loss, its numbers recorded in
    ``stats`` (entropy, kl, clip ratios)."""

    def __init__(self, config: RLConfig, stats: RunningStats):
        self.config, self.stats = config, stats

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        logits = model(batch["input_ids"])
        logprobs = sequence_logprobs(logits, batch["input_ids"])  # (B, T-1)
        mask = batch["mask"]
        old = batch.get("old_logprobs")
        result = policy_loss(logprobs, logprobs.detach() if old is None else old, batch["advantages"], mask,
                             loss_type=config.loss_type, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                             beta=config.beta, ref_logprobs=batch.get("ref_logprobs"),
                             max_completion_length=config.max_new_tokens * config.max_turns,
                             step_tokens=float(batch["step_tokens"]), grad_accum=config.train.grad_accum)
        with torch.no_grad():
            token_entropy = masked_mean(entropy(logits[:, :-1].detach()), mask)
        self.stats.add({"entropy": float(token_entropy), **result.metrics()})
        return result.loss


class RewardEvaluator:
    """Mean reward of greedy episodes on held-out prompts (shared among ranks): ``val_reward``, each
    reward's mean ``val_reward_NAME`` and ``val_completion_length`` (tokens of the model's turns)."""

    def __init__(self, rows: list[dict[str, Any]], config: RLConfig, tokenizer: Tokenizer,
                 rewards: CombinedReward, column: str, context: DistContext, batch_size: int = 64):
        self.rows, self.config, self.tokenizer, self.rewards, self.column = rows, config, tokenizer, rewards, column
        self.context, self.batch_size = context, batch_size
        self.environment = make_environment(config, column)
        self.sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=0.0)

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        count = self.config.train.final_eval_windows if final else self.config.train.eval_windows
        rows = self.rows if count is None else self.rows[:count]
        rows = rows[self.context.rank::self.context.world_size]
        names = self.rewards.names
        device = next(model.parameters()).device
        sums = torch.zeros(3 + 2 * len(names), dtype=torch.float64, device=device)  # total, n, length, per reward
        for begin in range(0, len(rows), self.batch_size):
            chunk = rows[begin:begin + self.batch_size]
            environments = [self.environment() for _ in chunk]
            episodes = run_episodes(environments, chunk, self.tokenizer, model.config.block_size,
                                    policy_generate(model, self.tokenizer, self.sampling, environments),
                                    self.config.max_turns)
            totals, scores = episode_rewards(episodes, self.rewards, self.column)
            lengths = [sum(len(t.ids) for t in e.turns if t.trained) for e in episodes]
            values = [float(totals.sum()), len(episodes), float(sum(lengths))]
            for name in names:
                applicable = [v for v in scores.per_reward[name] if v is not None]
                values += [float(sum(applicable)), len(applicable)]
            sums += torch.tensor(values, dtype=torch.float64, device=device)
        all_reduce_sum(sums, self.context)
        n = max(float(sums[1]), 1.0)
        metrics = {"val_reward": float(sums[0]) / n, "val_completion_length": float(sums[2]) / n}
        for i, name in enumerate(names):
            applicable = float(sums[4 + 2 * i])
            if applicable:
                metrics[f"val_reward_{_metric_name(name)}"] = float(sums[3 + 2 * i]) / applicable
        return metrics


def _metric_name(name: str) -> str:
    """A reward's name as a metric-name part (letters, digits and underscores)."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "reward"


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
def build_rewards(config: RLConfig, extra: list[Callable[..., Any]] | None = None) -> CombinedReward:
    """The run's rewards: ``config.reward`` specs (or the callables ``extra`` given instead, from Python)."""
    specs: list[Any] = list(extra) if extra else list(config.reward)
    weights = config.reward_weights or None
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"{len(weights)} reward_weights for {len(specs)} rewards")
    return CombinedReward([load_reward(spec) for spec in specs], weights)


def rl(config: RLConfig, rewards: list[Callable[..., Any]] | None = None) -> TrainResult:
    """Run (or resume) policy optimisation as ``config`` describes; ``rewards`` (Python callables
    ``reward(prompts, completions, **columns)``) replace ``config.reward`` when given."""
    config.validate()
    combined = build_rewards(config, rewards)
    run_dir = Path(config.out)
    runtime = setup_runtime(config.train)
    context = runtime.context
    model, tokenizer, base = load_base_model(config.checkpoint, run_dir, context, config.dropout)
    if model.config.family not in ("decoder", "lstm") or hasattr(model, "backbone"):
        raise ConfigError(f"{base} is not a causal language model: RL trains a decoder or LSTM language model")
    block_size = model.config.block_size
    rows, column = read_prompts(config.prompts, config.prompt_column)
    train_rows, val_rows = split_prompts(config, rows)
    room = config.max_new_tokens * config.max_turns if config.environment == "single" else config.max_new_tokens
    train_rows = fitting_prompts(train_rows, column, tokenizer, block_size, room, "training")
    val_rows = fitting_prompts(val_rows, column, tokenizer, block_size, room, "held-out")

    info: dict[str, Any] = {"recipe": "rl", "algorithm": config.algorithm, "prompts": str(config.prompts),
                            "rewards": combined.names, "base_checkpoint": str(base.resolve())}
    last = latest_checkpoint(run_dir) if config.resume else None
    recorded = read_config(last).get("base") if last is not None else None
    if recorded and recorded.get("fingerprint") != fingerprint(base):
        raise CheckpointError(f"cannot resume {run_dir}: its adapters were trained on a base whose weights differ "
                              f"from {base} now")
    reference: Callable[[], Any] | None = None
    reference_model: nn.Module | None = None
    if config.lora.enabled:
        apply_lora(model, config.lora)
        info.update(lora=to_dict(config.lora), base=base_reference(base))
        reference = lambda: adapters_disabled(model)  # noqa: E731 - the base is the reference
    elif config.beta > 0:
        reference_model = copy.deepcopy(model).to(runtime.device).eval().requires_grad_(False)
    trainable, total = count_trainable(model)

    stats = RunningStats()
    batches = RolloutBatches(model, tokenizer, train_rows, config, combined, column, stats, context.rank,
                             context.world_size, reference, reference_model,
                             run_dir / "samples.jsonl" if context.is_main else None)
    evaluator = RewardEvaluator(val_rows, config, tokenizer, combined, column, context)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        log.info("%s from %s: %d training prompts, %d held out, %d completions per prompt, rewards %s; trainable "
                 "parameters %s of %s (%.2f%%)", config.algorithm.upper(), base, len(train_rows), len(val_rows),
                 config.num_generations, ", ".join(combined.names), f"{trainable:,}", f"{total:,}",
                 100 * trainable / total)
    result = train(model, PolicyObjective(config, stats), batches, evaluator, tokenizer, config.train, run_dir,
                   runtime, resume=config.resume, info=info, interval_metrics=stats.drain)
    result.metrics.update(time_split(stats, result.seconds))
    if context.is_main:
        log.info("%s", format_time_split(result.metrics))
    return result


def time_split(stats: RunningStats, seconds: dict[str, float]) -> dict[str, float]:
    """Seconds of this session in each phase: ``time/rollout``, ``time/scoring``, ``time/reference``
    (the batches' parts), ``time/update`` (the rest of the optimiser steps: forward, backward, step) and
    ``time/evaluation``; and ``rollout_tokens_per_sec``. ``seconds`` is the loop's own account
    (:attr:`TrainResult.seconds`)."""
    split = {f"time/{name}": value for name, value in stats.seconds.items()}
    split["time/update"] = max(seconds.get("steps", 0.0) - seconds.get("batches", 0.0), 0.0)
    split["time/evaluation"] = seconds.get("evaluation", 0.0)
    split["rollout_tokens_per_sec"] = stats.rollout_tokens / max(stats.seconds["rollout"], 1e-9)
    return split


def format_time_split(metrics: dict[str, float]) -> str:
    """One line: where the run's time went."""
    phases = ["rollout", "scoring", "reference", "update", "evaluation"]
    total = sum(metrics.get(f"time/{p}", 0.0) for p in phases) or 1.0
    parts = ", ".join(f"{p} {metrics.get(f'time/{p}', 0.0):.1f} s ({100 * metrics.get(f'time/{p}', 0.0) / total:.0f}%)"
                      for p in phases)
    return f"time split: {parts}; rollouts {metrics.get('rollout_tokens_per_sec', 0.0):,.0f} tokens/s"
