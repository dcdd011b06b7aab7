"""The fine-tuning recipe: a base checkpoint + supervised examples (+ LoRA) -> the one training loop.

What it adds to the loop is only what differs from pretraining: the examples
(:mod:`lmforge.data.supervised`, rendered by :mod:`lmforge.data.formats`), an evaluator on held-out
examples (loss on response tokens, so ``val_ppl`` is the held-out *response* perplexity, plus
optional generation metrics), and, with ``lora.r > 0``, adapters injected into the base model
(:func:`lmforge.models.lora.apply_lora`); checkpoints then hold only the adapters and a reference
to the base. Resume works the same for full fine-tuning and LoRA: the loop restores weights (or
adapters), optimiser state and RNG, and batches depend only on the step.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lmforge.config import FinetuneConfig, check_task_scope, to_dict
from lmforge.data.formats import DEFAULT_CHAT_TEMPLATE, read_records, record_format
from lmforge.data.supervised import EncodedSet, SupervisedBatches, collate, encode_set, split_records
from lmforge.data.task_rows import detect_task
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.evaluation.harness import generation_examples, generation_metrics
from lmforge.fileio import atomic_write_text
from lmforge.interop.hf import load_base_model
from lmforge.models.lora import apply_lora, count_trainable
from lmforge.training.checkpoint import (
    base_reference,
    fingerprint,
    latest_checkpoint,
    read_config,
)
from lmforge.training.distributed import DistContext, all_reduce_sum
from lmforge.training.loop import TrainResult, setup_runtime, train
from lmforge.training.objectives import causal_lm_loss, summed_causal_lm_loss

log = logging.getLogger(__name__)


class ExampleLossEvaluator:
    """Mean loss over the response tokens of held-out examples (shared among ranks); optionally
    generation metrics on the first few of them (``generate(model, final) -> metrics``)."""

    def __init__(self, val: EncodedSet, batch_size: int, pad_id: int, examples: int | None,
                 final_examples: int | None, context: DistContext, generate: Any = None):
        self.rows, self.batch_size, self.pad_id, self.context, self.generate = val.rows, batch_size, pad_id, context, \
            generate
        self.during = _spread(len(self.rows), examples)
        self.final = _spread(len(self.rows), final_examples)

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        indices = (self.final if final else self.during)[self.context.rank::self.context.world_size]
        device = next(model.parameters()).device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
        for start in range(0, len(indices), self.batch_size):
            batch = collate([self.rows[i] for i in indices[start:start + self.batch_size]], self.pad_id)
            loss, count = summed_causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            totals += torch.tensor([loss.item(), count], dtype=torch.float64, device=device)
        all_reduce_sum(totals, self.context)
        val_loss = (totals[0] / totals[1]).item()
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.generate is not None and self.context.is_main:
            metrics.update(self.generate(model, final))
        return metrics


def _spread(total: int, count: int | None) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them for None)."""
    if count is None or count >= total:
        return list(range(total))
    return sorted({int(i * total / count) for i in range(count)})


def resolve_task(config: FinetuneConfig) -> str:
    """The task of a run: ``config.task``, or (auto) what the data is: parallel files or source/target
    records are seq2seq, CSV/TSV files and labelled records classification, SQuAD-style records qa,
    anything else generative fine-tuning (sft)."""
    if config.task != "auto":
        return config.task
    if config.data.target_path:
        return "seq2seq"
    if Path(config.data.path).suffix.lower() in (".csv", ".tsv"):
        return "classification"
    records = read_records(config.data.path)
    return detect_task(records) or "sft"


def finetune(config: FinetuneConfig) -> TrainResult:
    """Run (or resume) a fine-tuning run described by ``config``: generative fine-tuning (sft) here,
    the task models in :mod:`lmforge.recipes.task_runs`."""
    config.validate()
    task = resolve_task(config)
    check_task_scope(config, task)  # e.g. ngram_buckets outside classification
    if task != "sft":
        from lmforge.recipes.task_runs import finetune_task

        return finetune_task(config, task)
    if not config.checkpoint:
        raise ConfigError("generative fine-tuning (sft) starts from a checkpoint: give CHECKPOINT")
    run_dir = Path(config.out)
    runtime = setup_runtime(config.train)
    context, train_config = runtime.context, config.train
    model, tokenizer, base = load_base_model(config.checkpoint, run_dir, context, config.dropout)
    if model.config.family not in ("decoder", "lstm") or hasattr(model, "backbone"):
        raise ConfigError(f"{base} is not a causal language model: generative fine-tuning (sft) needs a decoder "
                          f"or LSTM language model; for it use --task classification, qa or seq2seq")
    block_size = model.config.block_size

    records = read_records(config.data.path)
    fmt = record_format(records, config.data.format)
    if config.data.val_path:
        train_records, val_records = records, read_records(config.data.val_path)
    else:
        train_records, val_records = split_records(records, config.data.val_fraction)
    if not val_records:
        raise DataError("no held-out examples: give data.val_path or a data.val_fraction > 0 with enough data")
    if fmt in ("chat", "alpaca") and not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # saved with every checkpoint of the run
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    train_set = encode_set(train_records, fmt, tokenizer, block_size, config.data.train_on_prompt,
                           config.data.packing, train_config.seed)
    val_set = encode_set(val_records, fmt, tokenizer, block_size, name="val")

    info: dict[str, Any] = {"recipe": "finetune", "data": str(config.data.path), "data_format": fmt,
                            "base_checkpoint": str(base.resolve())}
    last = latest_checkpoint(run_dir) if config.resume else None
    recorded = read_config(last).get("base") if last is not None else None
    if recorded and recorded.get("fingerprint") != fingerprint(base):
        raise CheckpointError(f"cannot resume {run_dir}: its adapters were trained on a base whose weights differ "
                              f"from {base} now")
    if config.lora.enabled:
        apply_lora(model, config.lora)
        info.update(lora=to_dict(config.lora), base=base_reference(base))
    trainable, total = count_trainable(model)
    batches = SupervisedBatches(train_set.rows, train_config.batch_size, train_config.grad_accum, train_config.seed,
                                pad_id, context.rank, context.world_size, config.data.group_by_length)
    generate = None
    if config.eval.examples:
        examples = generation_examples(val_records[:config.eval.examples], tokenizer, fmt)

        def generate(model: nn.Module, final: bool) -> dict[str, float]:
            """Greedy answers to held-out prompts compared with the references (``gen_bleu``, ...)."""
            metrics, _ = generation_metrics(model, tokenizer, examples, max_new_tokens=config.eval.max_new_tokens)
            return {f"gen_{name}": value for name, value in metrics.items()}
    evaluator = ExampleLossEvaluator(val_set, 2 * train_config.batch_size, pad_id, train_config.eval_windows,
                                     train_config.final_eval_windows, context, generate)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        steps = train_config.max_steps
        log.info("fine-tuning %s (%s format): %d training examples (%s tokens), %d held out; trainable "
                 "parameters %s of %s (%.2f%%)%s", base, fmt, len(train_set.rows), f"{train_set.tokens:,}",
                 len(val_set.rows), f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                 f"; {batches.epochs(steps):.1f} epochs" if steps else "")
    objective = partial(causal_lm_loss, label_smoothing=train_config.label_smoothing)
    return train(model, objective, batches, evaluator, tokenizer, train_config, run_dir, runtime,
                 resume=config.resume, info=info)
