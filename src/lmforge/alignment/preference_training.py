"""Training on preferences: DPO (``lmforge dpo``) and reward models (``lmforge train-reward``).

Both read ``{prompt, chosen, rejected}`` pairs (:mod:`lmforge.data.preferences`: text, chat, or
implicit-prompt rows), hold some out, and run the one training loop on batches of pairs whose rows
depend on the step alone (:class:`~lmforge.data.supervised.ShuffledBatches`), so a resumed run
continues exactly.

* :func:`dpo`: the policy's summed log-probabilities of each reply against the reference's, computed
  once before training (the starting weights; with LoRA the base with adapters off, no second copy),
  through :func:`~lmforge.alignment.losses.dpo_loss`. Held out: ``val_loss``, ``val_accuracy`` (share
  of pairs whose implicit reward ``beta (logp - ref_logp)`` ranks chosen above rejected) and
  ``val_margin``.
* :func:`train_reward`: the backbone under a one-output head read at the reply's last token, trained
  with the Bradley-Terry loss; its checkpoints load as a reward model (``LanguageModel.reward``,
  ``score_pair``; the ``reward_model:CKPT`` reward of ``lmforge rl``). Held out: ``val_loss``,
  ``val_accuracy``, ``val_margin``.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from lmforge.alignment.config import PreferenceConfig
from lmforge.alignment.losses import bradley_terry_loss, dpo_loss, dpo_metrics, sequence_logprobs
from lmforge.alignment.rollouts import RunningStats
from lmforge.config import to_dict
from lmforge.data.formats import read_records
from lmforge.data.preferences import PreferencePair, collate_pairs, encode_pairs
from lmforge.data.supervised import ShuffledBatches, split_records
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.fileio import atomic_write_text
from lmforge.inference.prompts import prompt_head
from lmforge.interop.hf import load_base_model
from lmforge.models import eval_mode
from lmforge.models.heads import SequenceClassifier
from lmforge.models.lora import adapters_disabled, apply_lora, count_trainable
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import base_reference, fingerprint, latest_checkpoint, read_config
from lmforge.training.distributed import DistContext, all_reduce_sum
from lmforge.training.loop import Runtime, TrainResult, setup_runtime, train

log = logging.getLogger(__name__)

REWARD_TASK = {"kind": "reward", "pooling": "last"}


# ------------------------------------------------------------------------------------------
# Pairs
# ------------------------------------------------------------------------------------------
def read_pairs(config: PreferenceConfig, tokenizer: Tokenizer, max_length: int) -> tuple[list[PreferencePair],
                                                                                        list[PreferencePair]]:
    """(train pairs, held-out pairs), encoded; the held-out ones from ``val_data`` or every
    ``1 / val_fraction``-th row."""
    head = prompt_head(tokenizer)
    rows = read_records(config.data)
    if not rows:
        raise DataError(f"{config.data}: the preference data is empty")
    pairs = encode_pairs(rows, tokenizer, max_length, head, Path(config.data).name)  # rows numbered as in the file
    if config.val_data:
        train_pairs = pairs
        val_pairs = encode_pairs(read_records(config.val_data), tokenizer, max_length, head, Path(config.val_data).name)
    else:
        train_pairs, val_pairs = split_records(pairs, config.val_fraction)
    if not val_pairs:
        raise DataError("no held-out pairs: give val_data or a val_fraction > 0 with enough data")
    return train_pairs, val_pairs


def reply_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(summed log-probabilities of each row's reply (2B,), reply token counts (2B,)) under a causal LM."""
    logprobs = sequence_logprobs(model(batch["input_ids"]), batch["input_ids"])  # (2B, T-1)
    mask = batch["reply_mask"]
    return (logprobs * mask).sum(-1), mask.sum(-1)


@torch.no_grad()
def attach_reference(model: nn.Module, pairs: list[PreferencePair], pad_id: int, device: torch.device,
                     batch_size: int) -> None:
    """Store the reference policy's (chosen, rejected) reply log-probabilities in each pair: ``model``
    as it is now (with LoRA, its base: adapters off)."""
    with eval_mode(model), adapters_disabled(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            logps, _ = reply_logps(model, batch)
            B = len(chunk)
            for i, pair in enumerate(chunk):
                pair.reference = (float(logps[i]), float(logps[B + i]))


def _halves(values: Tensor) -> tuple[Tensor, Tensor]:
    B = values.shape[0] // 2
    return values[:B], values[B:]


# ------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------
class DPOObjective:
    """DPO's loss on a batch of pairs, TRL's numbers recorded in ``stats``. ``ipo`` compares the
    per-token mean log-probabilities, as TRL does."""

    def __init__(self, config: PreferenceConfig, stats: RunningStats | None = None):
        self.config, self.stats = config, stats

    def terms(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        config = self.config
        logps, counts = reply_logps(model, batch)
        ref = batch["ref_logps"].to(logps.dtype)
        if config.loss_type == "ipo":
            logps, ref = logps / counts.clamp(min=1), ref / counts.clamp(min=1)
        (chosen, rejected), (ref_chosen, ref_rejected) = _halves(logps), _halves(ref)
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, config.beta, config.loss_type,
                        config.label_smoothing)
        metrics = dpo_metrics(chosen, rejected, ref_chosen, ref_rejected, config.beta)
        metrics.update({"logps/chosen": float(chosen.detach().mean()),
                        "logps/rejected": float(rejected.detach().mean())})
        return loss, metrics

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        loss, metrics = self.terms(model, batch)
        if self.stats is not None:
            self.stats.add(metrics)
        return loss


class RewardObjective:
    """The Bradley-Terry loss of a reward model's scores of the chosen and rejected rows."""

    def __init__(self, config: PreferenceConfig, stats: RunningStats | None = None):
        self.config, self.stats = config, stats

    def terms(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        scores = model(batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0]  # (2B,)
        chosen, rejected = _halves(scores)
        loss = bradley_terry_loss(chosen, rejected, center_coefficient=self.config.center_rewards)
        difference = (chosen - rejected).detach().float()
        return loss, {"accuracy": float((difference > 0).float().mean()), "margin": float(difference.mean()),
                      "scores/chosen": float(chosen.detach().float().mean()),
                      "scores/rejected": float(rejected.detach().float().mean())}

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        loss, metrics = self.terms(model, batch)
        if self.stats is not None:
            self.stats.add(metrics)
        return loss


class PairEvaluator:
    """Held-out pairs (shared among ranks): ``val_loss``, ``val_accuracy`` and ``val_margin``, from an
    objective's ``terms`` (DPO: the implicit reward's; reward model: the scores')."""

    def __init__(self, pairs: list[PreferencePair], objective: Any, pad_id: int, batch_size: int,
                 config: PreferenceConfig, context: DistContext):
        self.pairs, self.objective, self.pad_id, self.batch_size = pairs, objective, pad_id, batch_size
        self.config, self.context = config, context

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        count = self.config.train.final_eval_windows if final else self.config.train.eval_windows
        pairs = (self.pairs if count is None else self.pairs[:count])[self.context.rank::self.context.world_size]
        device = next(model.parameters()).device
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss x pairs, accuracy x pairs, margin x pairs, n
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, self.pad_id).items()}
            loss, metrics = self.objective.terms(model, batch)
            accuracy = metrics.get("rewards/accuracies", metrics.get("accuracy"))
            margin = metrics.get("rewards/margins", metrics.get("margin"))
            n = len(chunk)
            sums += torch.tensor([float(loss) * n, accuracy * n, margin * n, n], dtype=torch.float64, device=device)
        all_reduce_sum(sums, self.context)
        n = max(float(sums[3]), 1.0)
        return {"val_loss": float(sums[0]) / n, "val_accuracy": float(sums[1]) / n, "val_margin": float(sums[2]) / n}


# ------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------
def _start(config: PreferenceConfig, recipe: str) -> tuple[nn.Module, Tokenizer, Path, Runtime, dict[str, Any]]:
    """The model of a preference run as loaded, its tokenizer, base checkpoint, runtime and run info."""
    config.validate()
    runtime = setup_runtime(config.train)
    model, tokenizer, base = load_base_model(config.checkpoint, Path(config.out), runtime.context, config.dropout)
    if model.config.family not in ("decoder", "lstm"):
        raise ConfigError(f"{base} is not a causal language model: {recipe} needs a decoder or LSTM model")
    if config.resume:
        last = latest_checkpoint(Path(config.out))
        recorded = read_config(last).get("base") if last is not None else None
        if recorded and recorded.get("fingerprint") != fingerprint(base):
            raise CheckpointError(f"cannot resume {config.out}: its adapters were trained on a base whose weights "
                                  f"differ from {base} now")
    return model, tokenizer, base, runtime, {"recipe": recipe, "data": str(config.data),
                                             "base_checkpoint": str(base.resolve())}


def _max_length(config: PreferenceConfig, model: nn.Module) -> int:
    block = model.config.block_size
    if config.max_length is not None and config.max_length > block:
        raise ConfigError(f"max_length {config.max_length} exceeds the model's context of {block} tokens")
    return config.max_length or block


def _run(config: PreferenceConfig, model: nn.Module, tokenizer: Tokenizer, runtime: Runtime, objective: Any,
         stats: RunningStats, train_pairs: list[PreferencePair], val_pairs: list[PreferencePair],
         info: dict[str, Any], what: str) -> TrainResult:
    context, train_config, run_dir = runtime.context, config.train, Path(config.out)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    batches = ShuffledBatches(train_pairs, train_config.batch_size, train_config.grad_accum, train_config.seed,
                              partial(collate_pairs, pad_id=pad_id), context.rank, context.world_size)
    evaluator = PairEvaluator(val_pairs, objective, pad_id, 2 * train_config.batch_size, config, context)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        trainable, total = count_trainable(model)
        steps = train_config.max_steps
        log.info("%s: %d training pairs, %d held out; trainable parameters %s of %s (%.2f%%)%s", what,
                 len(train_pairs), len(val_pairs), f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                 f"; {batches.epochs(steps):.1f} epochs" if steps else "")
    return train(model, objective, batches, evaluator, tokenizer, train_config, run_dir, runtime,
                 resume=config.resume, info=info, interval_metrics=stats.drain)


def dpo(config: PreferenceConfig) -> TrainResult:
    """Run (or resume) DPO as ``config`` describes (full fine-tuning or LoRA)."""
    model, tokenizer, base, runtime, info = _start(config, "dpo")
    if hasattr(model, "backbone"):
        raise ConfigError(f"{base} is a task model (it has a head): DPO trains a causal language model")
    train_pairs, val_pairs = read_pairs(config, tokenizer, _max_length(config, model))
    info.update(beta=config.beta, loss_type=config.loss_type)
    if config.lora.enabled:
        apply_lora(model, config.lora)
        info.update(lora=to_dict(config.lora), base=base_reference(base))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    model.to(runtime.device)
    attach_reference(model, train_pairs + val_pairs, pad_id, runtime.device, 2 * config.train.batch_size)
    stats = RunningStats()
    return _run(config, model, tokenizer, runtime, DPOObjective(config, stats), stats, train_pairs, val_pairs, info,
                f"DPO from {base} (beta {config.beta:g}, {config.loss_type})")


def train_reward(config: PreferenceConfig) -> TrainResult:
    """Train (or resume training) a reward model as ``config`` describes; its checkpoints hold the
    ``reward`` task record, so they load as reward models."""
    if config.lora.enabled:
        raise ConfigError("a reward model trains all its weights (its head is new): drop the lora options")
    model, tokenizer, base, runtime, info = _start(config, "reward_model")
    train_pairs, val_pairs = read_pairs(config, tokenizer, _max_length(config, model))
    reward_model = SequenceClassifier(getattr(model, "backbone", model), 1, pooling=REWARD_TASK["pooling"],
                                      dropout=config.dropout)
    info["task"] = dict(REWARD_TASK)
    stats = RunningStats()
    return _run(config, reward_model, tokenizer, runtime, RewardObjective(config, stats), stats, train_pairs,
                val_pairs, info, f"reward model from {base}")
