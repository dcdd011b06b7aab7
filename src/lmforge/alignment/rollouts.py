"""Rollouts: the batch source of policy optimisation, generating its own training data.

:class:`RolloutBatches` is a :class:`lmforge.training.loop.BatchSource`. At the first micro-batch of
every ``num_iterations``-th optimiser step it takes the next prompts, plays ``num_generations``
episodes of each with the current policy (the one generation loop, batched with a KV cache), scores
them with the run's rewards, turns the rewards into advantages and computes the log-probabilities
the loss compares with (the reference policy's, and the generating policy's when several steps reuse
a batch). Each micro-batch of the step is then a slice of those completions as tensors:

    input_ids      (B, T)    prompt and episode tokens, right-padded
    mask           (B, T-1)  1 where token t+1 was written by the policy (trained on)
    advantages     (B,)
    old_logprobs   (B, T-1)  only with num_iterations > 1
    ref_logprobs   (B, T-1)  only with beta > 0
    step_tokens    ()        trained tokens of the whole optimiser step (the dapo normalisation)

The prompts of a step, and the sampling seed of its rollouts, depend on the step alone, so a run
resumed from a checkpoint (which always falls between two generated batches) continues exactly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.alignment.config import RLConfig
from lmforge.alignment.environments import Calculator, Environment, Episode, SingleTurn, policy_generate, run_episodes
from lmforge.alignment.losses import advantages_for, frac_zero_std, sequence_logprobs
from lmforge.alignment.rewards import CombinedReward, reward_metrics
from lmforge.config import SamplingConfig
from lmforge.errors import DataError
from lmforge.models import eval_mode
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CALCULATOR_INSTRUCTIONS = ""  # the prompt set says how to call the tool (or SFT taught it)


class RunningStats:
    """Means of named numbers since the last :meth:`drain` (the loop's interval metrics), and the
    seconds spent in each phase of the run (:meth:`phase`, :attr:`seconds`)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, float] = {"rollout": 0.0, "scoring": 0.0, "reference": 0.0}
        self.rollout_tokens = 0

    def add(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def drain(self) -> dict[str, float]:
        means = {name: self.sums[name] / self.counts[name] for name in self.sums}
        self.sums, self.counts = {}, {}
        return means

    def phase(self, name: str) -> _Timer:
        return _Timer(self.seconds, name)


class _Timer(AbstractContextManager):
    def __init__(self, seconds: dict[str, float], name: str):
        self.seconds, self.name = seconds, name

    def __enter__(self) -> _Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + time.perf_counter() - self.start


def make_environment(config: RLConfig, column: str) -> Callable[[], Environment]:
    """A factory of the run's environment, one instance per episode."""
    if config.environment == "calculator":
        return lambda: Calculator(column, CALCULATOR_INSTRUCTIONS)
    return lambda: SingleTurn(column)


def episode_rewards(episodes: Sequence[Episode], rewards: CombinedReward, column: str) -> tuple[Tensor, Any]:
    """Total reward per episode (N,) (the environment's where it gave one, else the run's rewards on
    the last model turn) and the :class:`RewardScores` of the run's rewards."""
    prompts = [episode.row[column] for episode in episodes]
    completions = [episode.completion for episode in episodes]
    names = sorted({key for episode in episodes for key in episode.row if key != column})
    columns = {name: [episode.row.get(name) for episode in episodes] for name in names}
    scores = rewards(prompts, completions, columns)
    total = [e.reward if e.reward is not None else t for e, t in zip(episodes, scores.total)]
    return torch.tensor(total, dtype=torch.float32), scores


def padded_episodes(episodes: Sequence[Episode], block_size: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids (N, T), mask (N, T-1)) of episodes, right-padded and cut at ``block_size`` tokens;
    ``mask[i, t]`` is 1 where token ``t + 1`` of episode ``i`` is the policy's."""
    rows = [(episode.ids[:block_size], episode.trained_mask[:block_size]) for episode in episodes]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    trained = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        trained[i, :len(mask)] = torch.tensor(mask, dtype=torch.float32)
    return input_ids, trained[:, 1:]


@torch.no_grad()
def batched_logprobs(model: nn.Module, input_ids: Tensor, batch_size: int) -> Tensor:
    """Next-token log-probabilities (N, T-1) of ``input_ids`` (N, T) under ``model``, in chunks."""
    device = next(model.parameters()).device
    with eval_mode(model):
        parts = [sequence_logprobs(model(chunk.to(device)), chunk.to(device)).cpu()
                 for chunk in input_ids.split(batch_size)]
    return torch.cat(parts)


class RolloutBatches:
    """The rollouts of a policy-optimisation run as the loop's batches (see the module docstring).

    ``reference`` is a context manager factory under which ``model`` computes the reference policy
    (LoRA: adapters off) or None when the run has no reference; ``reference_model`` a frozen copy
    instead (full fine-tuning with ``beta > 0``).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, rows: list[dict[str, Any]], config: RLConfig,
                 rewards: CombinedReward, column: str, stats: RunningStats, rank: int = 0, world_size: int = 1,
                 reference: Callable[[], AbstractContextManager] | None = None,
                 reference_model: nn.Module | None = None, samples_file: Path | None = None):
        if not rows:
            raise DataError("the prompt set is empty")
        self.model, self.tokenizer, self.rows, self.config = model, tokenizer, rows, config
        self.rewards, self.column, self.stats = rewards, column, stats
        self.rank, self.world_size = rank, world_size
        self.reference, self.reference_model, self.samples_file = reference, reference_model, samples_file
        self.environment = make_environment(config, column)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        self.prompts_per_step = config.generation_batch // config.num_generations
        self._cached: tuple[int, dict[str, Tensor]] | None = None
        self._orders: dict[int, list[int]] = {}

    # ---------------------------------------------------------------- which prompts
    def prompt_rows(self, generation: int) -> list[dict[str, Any]]:
        """The prompts of generated batch ``generation`` on this rank: the rows in a new random order
        every epoch (seeded by ``train.seed`` and the epoch)."""
        count = self.prompts_per_step
        start = (generation * self.world_size + self.rank) * count
        chosen = []
        for position in range(start, start + count):
            epoch, index = divmod(position, len(self.rows))
            if epoch not in self._orders:
                generator = torch.Generator().manual_seed(self.config.train.seed + 7919 * epoch)
                self._orders = {epoch: torch.randperm(len(self.rows), generator=generator).tolist()}
            chosen.append(self.rows[self._orders[epoch][index]])
        return chosen

    # ---------------------------------------------------------------- the loop's interface
    def batch(self, step: int, micro: int) -> dict[str, Tensor]:
        generation = step // self.config.num_iterations
        if self._cached is None or self._cached[0] != generation:
            self._cached = (generation, self.generate(generation, step))
        data = self._cached[1]
        size = self.config.train.batch_size
        rows = slice(micro * size, (micro + 1) * size)
        return {name: value if value.dim() == 0 else value[rows] for name, value in data.items()}

    # ---------------------------------------------------------------- one generated batch
    def generate(self, generation: int, step: int) -> dict[str, Tensor]:
        """Play, score and tensorise the episodes of generated batch ``generation``."""
        config, G = self.config, self.config.num_generations
        rows = [row for row in self.prompt_rows(generation) for _ in range(G)]  # groups of G together
        seed = config.train.seed * 1_000_003 + generation * self.world_size + self.rank
        sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_k=config.top_k, top_p=config.top_p, seed=seed)
        environments = [self.environment() for _ in rows]
        with self.stats.phase("rollout"):
            episodes = run_episodes(environments, rows, self.tokenizer, self.model.config.block_size,
                                    policy_generate(self.model, self.tokenizer, sampling, environments),
                                    config.max_turns)
        with self.stats.phase("scoring"):
            rewards, scores = episode_rewards(episodes, self.rewards, self.column)
        advantages = advantages_for(config.algorithm, rewards, G, config.scale_rewards)
        input_ids, mask = padded_episodes(episodes, self.model.config.block_size, self.pad_id)
        data = {"input_ids": input_ids, "mask": mask, "advantages": advantages,
                "step_tokens": mask.sum() * self.world_size}
        chunk = max(config.train.batch_size, 1)
        if config.num_iterations > 1:
            with self.stats.phase("reference"):
                data["old_logprobs"] = batched_logprobs(self.model, input_ids, chunk)
        if config.beta > 0:
            with self.stats.phase("reference"):
                if self.reference_model is not None:
                    data["ref_logprobs"] = batched_logprobs(self.reference_model, input_ids, chunk)
                else:
                    with self.reference():
                        data["ref_logprobs"] = batched_logprobs(self.model, input_ids, chunk)
        self._record(episodes, rewards, scores, mask, step)
        return data

    def _record(self, episodes: Sequence[Episode], rewards: Tensor, scores: Any, mask: Tensor, step: int) -> None:
        """Interval metrics of a generated batch (TRL's names) and, now and then, a table of samples."""
        lengths = mask.sum(1)
        self.stats.rollout_tokens += int(lengths.sum())
        ended = [episode for episode, length in zip(episodes, lengths) if not episode.truncated]
        metrics = {**reward_metrics(scores, self.config.num_generations),
                   "reward": float(rewards.mean()), "frac_reward_zero_std": frac_zero_std(rewards,
                                                                                         self.config.num_generations),
                   "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                   "completions/max_length": float(lengths.max()),
                   "completions/clipped_ratio": 1 - len(ended) / len(episodes),
                   "episodes/mean_turns": sum(sum(t.trained for t in e.turns) for e in episodes) / len(episodes)}
        if self.config.num_generations > 1:
            metrics["reward_std"] = float(rewards.view(-1, self.config.num_generations).std(dim=1).mean())
        self.stats.add(metrics)
        interval = self.config.sample_interval
        if interval and step % interval == 0 and self.rank == 0:
            self._write_samples(episodes[:8], rewards[:8].tolist(), step)

    def _write_samples(self, episodes: Sequence[Episode], rewards: list[float], step: int) -> None:
        lines = [f"samples at step {step} (reward | prompt | completion):"]
        records = []
        for episode, reward in zip(episodes, rewards):
            prompt, transcript = episode.prompt, episode.transcript
            lines.append(f"  {reward:+.3f} | {_short(prompt)} | {_short(transcript)}")
            records.append({"step": step, "prompt": prompt, "completion": transcript, "reward": reward})
        log.info("\n".join(lines))
        if self.samples_file is not None:
            self.samples_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.samples_file, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)


def _short(text: str, width: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 1] + "…"
