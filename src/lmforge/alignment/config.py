"""The options of the alignment runs (``lmforge rl``, ``lmforge dpo``, ``lmforge train-reward``), declared
once as dataclass fields like every other run's (:mod:`lmforge.config`): YAML keys and flags alike."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config import LoraConfig, TrainConfig, _check_choice, _check_positive, option
from lmforge.errors import ConfigError

ALGORITHMS = ("grpo", "rloo", "reinforce")
ENVIRONMENTS = ("single", "calculator")


@dataclass
class RLTrainConfig(TrainConfig):
    """:class:`TrainConfig` with defaults for policy optimisation (a micro-batch counts completions)."""

    lr: float = option(5e-5, "peak learning rate")
    warmup_steps: int = option(0, "linear warm-up steps")
    schedule: str = option("constant", "learning-rate decay after warm-up: cosine, linear or constant")
    weight_decay: float = option(0.0, "weight decay of 2-D weights (matrices, embeddings); never norms or biases")
    batch_size: int = option(16, "completions per micro-batch on each process (num_generations per prompt)")
    max_steps: int | None = option(200, "stop after this many optimiser steps")
    eval_interval: int = option(25, "evaluate on the held-out prompts every this many steps (0: only at the end)")
    eval_windows: int | None = option(128, "held-out prompts answered (greedily) at each evaluation (none: all)")
    final_eval_windows: int | None = option(None, "held-out prompts for the final evaluation (none: all)")
    save_interval: int = option(50, "save a checkpoint every this many steps (0: only at the end)")
    log_interval: int = option(5, "write metrics every this many steps")
    best_metric: str = option("reward", "the held-out number that picks checkpoints/best: reward (the mean "
                                        "total reward, higher is better)")


@dataclass
class RLConfig:
    """A policy-optimisation run: a checkpoint, prompts, rewards, the algorithm, an output directory."""

    checkpoint: str | None = option(None, "the policy to start from (lmforge checkpoint/run directory or Hugging "
                                          "Face folder), usually a supervised fine-tune")
    prompts: str | None = option(None, "JSONL prompt set: a prompt column plus any columns the rewards read "
                                       "(e.g. answer)")
    val_prompts: str | None = option(None, "held-out prompts in the same format (default: val_size rows of prompts)")
    val_size: int = option(64, "prompts held out when no val_prompts is given")
    prompt_column: str = option("auto", "the column holding the prompt text (auto: prompt, then question)")
    reward: list[str] = option(["exact_answer"], "reward functions, repeat for several: exact_answer[:COLUMN], "
                                                 "numeric_answer[:COLUMN], format:REGEX, length:CHARS, "
                                                 "repetition[:N], classifier:LABEL@CHECKPOINT, reward_model:"
                                                 "CHECKPOINT, or an import path pkg.module:function / file.py:function")
    reward_weights: list[float] = option([], "one weight per reward (default: 1 each); the total is the weighted sum")
    environment: str = option("single", "single (answer once and be scored) or calculator (the model may write "
                                        "<calc>EXPR</calc> and reads <result>VALUE</result>)")
    max_turns: int = option(1, "most model turns per episode (a tool environment needs more than 1)")
    algorithm: str = option("grpo", "grpo (group-normalised advantages), rloo (leave-one-out baseline) or "
                                    "reinforce (batch-mean baseline)")
    num_generations: int = option(8, "completions sampled per prompt (the group); must divide "
                                     "train.batch_size x train.grad_accum")
    num_iterations: int = option(1, "optimiser steps on each generated batch (PPO's epochs; > 1 makes the "
                                    "ratio and its clipping matter)")
    epsilon: float = option(0.2, "lower clipping range of the probability ratio (1 - epsilon)")
    epsilon_high: float | None = option(None, "upper clipping range (1 + epsilon_high; default: epsilon; DAPO: 0.28)")
    beta: float = option(0.0, "weight of the KL penalty to the frozen reference policy (0: no reference)")
    loss_type: str = option("dapo", "loss normalisation: grpo (per sequence), bnpo (per micro-batch token), "
                                    "dr_grpo (by max length), dapo (per token of the whole step)")
    scale_rewards: bool = option(True, "grpo: divide advantages by the group's reward std (false: Dr. GRPO)")
    max_new_tokens: int = option(64, "most tokens per model turn (max_completion_length)")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    top_k: int | None = option(None, "sample rollouts among the k most likely tokens only")
    top_p: float | None = option(None, "nucleus sampling of the rollouts")
    sample_interval: int = option(25, "write a table of completions with their rewards every this many steps "
                                      "(samples.jsonl and the log; 0: never)")
    dropout: float = option(0.0, "dropout while training the policy (0: the ratio of an unchanged policy is 1)")
    out: str = option("runs/rl", "run directory for checkpoints, metrics, samples and plots")
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    resume: bool = option(False, "continue from the last checkpoint in the run directory")

    @property
    def generation_batch(self) -> int:
        """Completions generated per optimiser step (each micro-batch of the step trains on a share)."""
        return self.train.batch_size * self.train.grad_accum

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("RL starts from a checkpoint: give CHECKPOINT")
        if not self.prompts:
            raise ConfigError("no prompts: give --prompts FILE (JSONL with a prompt column)")
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        _check_choice("environment", self.environment, ENVIRONMENTS)
        _check_choice("loss_type", self.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo"))
        if self.num_generations < 2 and self.algorithm != "reinforce":
            raise ConfigError(f"num_generations must be at least 2 for {self.algorithm} (a group to compare), "
                              f"not {self.num_generations}")
        _check_positive("num_generations", self.num_generations)
        if self.generation_batch % self.num_generations:
            raise ConfigError(f"num_generations {self.num_generations} does not divide the batch of "
                              f"train.batch_size x train.grad_accum = {self.generation_batch} completions")
        _check_positive("num_iterations", self.num_iterations)
        if self.train.save_interval % self.num_iterations:
            raise ConfigError(f"train.save_interval {self.train.save_interval} must be a multiple of num_iterations "
                              f"{self.num_iterations} (a checkpoint falls between two generated batches)")
        _check_positive("max_turns", self.max_turns)
        if self.environment == "calculator" and self.max_turns < 2:
            raise ConfigError("the calculator environment needs max_turns >= 2 (a call, then the answer)")
        _check_positive("epsilon", self.epsilon)
        _check_positive("epsilon_high", self.epsilon_high, allow_none=True)
        _check_positive("beta", self.beta, allow_zero=True)
        _check_positive("max_new_tokens", self.max_new_tokens)
        _check_positive("temperature", self.temperature)
        _check_positive("val_size", self.val_size, allow_zero=True)
        _check_positive("sample_interval", self.sample_interval, allow_zero=True)
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"{len(self.reward_weights)} reward_weights for {len(self.reward)} rewards")
        if not self.reward:
            raise ConfigError("no reward: give --reward NAME (e.g. exact_answer)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")
        self.train.validate()
        self.lora.validate()


@dataclass
class PreferenceTrainConfig(TrainConfig):
    """:class:`TrainConfig` with defaults for preference training (a micro-batch counts pairs)."""

    lr: float = option(5e-5, "peak learning rate")
    warmup_steps: int = option(10, "linear warm-up steps")
    weight_decay: float = option(0.0, "weight decay of 2-D weights (matrices, embeddings); never norms or biases")
    batch_size: int = option(8, "preference pairs per micro-batch on each process")
    max_steps: int | None = option(300, "stop after this many optimiser steps")
    eval_interval: int = option(50, "evaluate on the held-out pairs every this many steps (0: only at the end)")
    eval_windows: int | None = option(256, "held-out pairs evaluated during training (none: all)")
    final_eval_windows: int | None = option(None, "held-out pairs for the final evaluation (none: all)")
    save_interval: int = option(100, "save a checkpoint every this many steps (0: only at the end)")
    best_metric: str = option("accuracy", "the held-out number that picks checkpoints/best: accuracy (of the "
                                          "preferences, higher is better) or loss")


@dataclass
class PreferenceConfig:
    """A DPO or reward-model run: a checkpoint, ``{prompt, chosen, rejected}`` pairs, an output directory."""

    checkpoint: str | None = option(None, "the model to start from (lmforge checkpoint/run directory or Hugging "
                                          "Face folder), usually a supervised fine-tune on the chosen replies")
    data: str | None = option(None, "JSONL preference pairs: prompt, chosen, rejected (texts, or lists of chat "
                                    "messages), or chosen/rejected whole conversations")
    val_data: str | None = option(None, "held-out pairs in the same format (default: val_fraction of data)")
    val_fraction: float = option(0.05, "share of the pairs held out when no val_data is given")
    beta: float = option(0.1, "dpo: strength of the implicit KL constraint to the reference")
    loss_type: str = option("sigmoid", "dpo: sigmoid, ipo, robust or hinge")
    label_smoothing: float = option(0.0, "dpo: assumed share of flipped labels (cDPO with sigmoid; robust DPO)")
    center_rewards: float = option(0.0, "reward model: weight of the penalty keeping scores centred on zero "
                                        "(TRL's center_rewards_coefficient; e.g. 0.01)")
    max_length: int | None = option(None, "most tokens of prompt + reply (the prompt loses its start first; "
                                          "default: the model's context)")
    dropout: float = option(0.0, "dropout while training")
    out: str = option("runs/dpo", "run directory for checkpoints, metrics and plots")
    train: PreferenceTrainConfig = field(default_factory=PreferenceTrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    resume: bool = option(False, "continue from the last checkpoint in the run directory")

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("preference training starts from a checkpoint: give CHECKPOINT")
        if not self.data:
            raise ConfigError("no preference data: give --data FILE (JSONL with prompt, chosen, rejected)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        _check_choice("loss_type", self.loss_type, ("sigmoid", "ipo", "robust", "hinge"))
        _check_positive("beta", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), not {self.label_smoothing}")
        _check_positive("center_rewards", self.center_rewards, allow_zero=True)
        _check_positive("max_length", self.max_length, allow_none=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")
        self.train.validate()
        self.lora.validate()
