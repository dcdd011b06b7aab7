"""The pretraining recipe: prepared token shards + a decoder model + next-token loss -> the loop."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from lmforge.config import ModelConfig, PretrainConfig, to_dict
from lmforge.data.shards import TokenData
from lmforge.data.windows import RandomWindows, eval_batches, eval_window_starts
from lmforge.errors import CheckpointError, ConfigError
from lmforge.fileio import atomic_write_text
from lmforge.models import build_model, config_from_dict
from lmforge.training.checkpoint import latest_checkpoint, read_config
from lmforge.training.distributed import DistContext, all_reduce_sum
from lmforge.training.loop import TrainResult, setup_runtime, train
from lmforge.training.objectives import causal_lm_loss, summed_causal_lm_loss

log = logging.getLogger(__name__)


class WindowLossEvaluator:
    """Mean next-token loss over fixed validation windows (shared among ranks).

    During training it uses ``windows`` evenly spread windows; the final evaluation uses
    ``final_windows`` (None: every non-overlapping window of the split).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, windows: int | None,
                 final_windows: int | None, context: DistContext):
        self.tokens, self.block_size, self.batch_size, self.context = tokens, block_size, batch_size, context
        self.starts = eval_window_starts(len(tokens), block_size, windows)
        self.final_starts = eval_window_starts(len(tokens), block_size, final_windows)

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        starts = (self.final_starts if final else self.starts)[self.context.rank::self.context.world_size]
        device = next(model.parameters()).device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
        for batch in eval_batches(self.tokens, starts, self.block_size, self.batch_size):
            loss, count = summed_causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            totals += torch.tensor([loss.item(), count], dtype=torch.float64, device=device)
        all_reduce_sum(totals, self.context)
        val_loss = (totals[0] / totals[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def resolve_model_config(config: PretrainConfig, vocab_size: int) -> ModelConfig:
    """The run's architecture: the config's (vocabulary from the tokenizer unless given)."""
    model = config.model
    if model.vocab_size is None:
        model.vocab_size = vocab_size
    elif model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size is {model.vocab_size} but the tokenizer of {config.data} has "
                          f"{vocab_size} tokens; drop model.vocab_size to use the tokenizer's")
    model.validate()
    return model


def check_inputs(config: PretrainConfig) -> None:
    """Fail early (before launching workers) on bad options or data."""
    config.validate()
    data = TokenData(config.data)
    resolve_model_config(config, data.vocab_size)
    RandomWindows(data.train, config.model.block_size, config.train.batch_size)
    eval_window_starts(len(data.val), config.model.block_size)


def pretrain(config: PretrainConfig) -> TrainResult:
    """Run (or resume) a pretraining run described by ``config``."""
    config.validate()
    data = TokenData(config.data)
    tokenizer = data.tokenizer()
    run_dir = Path(config.out)
    model_config = resolve_model_config(config, data.vocab_size)
    resume_from = latest_checkpoint(run_dir) if config.resume else None
    if resume_from is not None:  # the architecture of a resumed run is the checkpoint's
        saved = config_from_dict(read_config(resume_from)["model"])
        if saved.vocab_size != model_config.vocab_size:
            raise CheckpointError(f"{resume_from} was trained with a vocabulary of {saved.vocab_size}, "
                                  f"the data in {config.data} has {model_config.vocab_size}")
        model_config = saved
        config.model = saved
    train_config = config.train
    runtime = setup_runtime(train_config)
    model = build_model(model_config)
    if runtime.context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        log.info("model: %s parameters (%s without embeddings), %.2f MFLOPs/token (training)",
                 f"{model.num_parameters():,}", f"{model.num_parameters(non_embedding=True):,}",
                 model.flops_per_token() / 1e6)
    context = runtime.context
    batches = RandomWindows(data.train, model_config.block_size, train_config.batch_size, train_config.grad_accum,
                            train_config.seed, context.rank, context.world_size)
    eval_batch = max(1, 16384 // model_config.block_size)
    evaluator = WindowLossEvaluator(data.val, model_config.block_size, eval_batch, train_config.eval_windows,
                                    train_config.final_eval_windows, context)
    info = {"data": str(config.data), "recipe": "pretrain"}
    return train(model, causal_lm_loss, batches, evaluator, tokenizer, train_config, run_dir, runtime,
                 resume=config.resume, info=info)
