"""The pretraining recipe: prepared token shards + a model + its objective -> the loop.

Decoders and LSTMs learn to predict the next token (``clm``); encoders learn to fill in masked
tokens (``mlm``, BERT's recipe); encoder-decoders learn to rebuild a window whose spans were each
replaced by one mask token (``denoise``, BART's text infilling), which teaches the decoder to read
and copy the source before it is fine-tuned on pairs. Masking objectives add a ``<|mask|>`` token to
the tokenizer, and the evaluation corrupts the fixed validation windows with a fixed seed, so every
evaluation scores the same predictions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
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
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import (
    MODEL_FILE,
    latest_checkpoint,
    load_weights,
    read_config,
    resolve_checkpoint,
)
from lmforge.training.distributed import DistContext, all_reduce_sum
from lmforge.training.loop import Objective, TrainResult, setup_runtime, train
from lmforge.training.objectives import (
    causal_lm_loss,
    denoising_objective,
    masked_lm_objective,
    summed_causal_lm_loss,
    summed_denoising_loss,
    summed_masked_lm_loss,
)

log = logging.getLogger(__name__)

SummedLoss = Callable[[nn.Module, dict[str, torch.Tensor], torch.Generator], tuple[torch.Tensor, int]]
"""(model, batch, generator for any randomness) -> (summed loss, number of predictions)."""
EVAL_MASK_SEED = 1234


class WindowLossEvaluator:
    """Mean next-token loss over fixed validation windows (shared among ranks).

    During training it uses ``windows`` evenly spread windows; the final evaluation uses
    ``final_windows`` (None: every non-overlapping window of the split).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, windows: int | None,
                 final_windows: int | None, context: DistContext, summed_loss: SummedLoss = summed_causal_lm_loss):
        self.tokens, self.block_size, self.batch_size, self.context = tokens, block_size, batch_size, context
        self.summed_loss = summed_loss
        self.starts = eval_window_starts(len(tokens), block_size, windows)
        self.final_starts = eval_window_starts(len(tokens), block_size, final_windows)

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        starts = (self.final_starts if final else self.starts)[self.context.rank::self.context.world_size]
        device = next(model.parameters()).device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
        generator = torch.Generator(device).manual_seed(EVAL_MASK_SEED)  # the same masks at every evaluation
        for batch in eval_batches(self.tokens, starts, self.block_size, self.batch_size):
            loss, count = self.summed_loss(model, {k: v.to(device) for k, v in batch.items()}, generator)
            totals += torch.tensor([loss.item(), count], dtype=torch.float64, device=device)
        all_reduce_sum(totals, self.context)
        val_loss = (totals[0] / totals[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def objectives(config: PretrainConfig, tokenizer: Tokenizer) -> tuple[Objective, SummedLoss]:
    """The training objective and the evaluation's summed loss of the run's objective."""
    smoothing = config.train.label_smoothing
    if config.resolved_objective == "clm":
        return (partial(causal_lm_loss, label_smoothing=smoothing),
                lambda model, batch, generator: summed_causal_lm_loss(model, batch))
    if config.resolved_objective == "denoise":
        args = (tokenizer.mask_id, tokenizer.pad_id, tokenizer.bos_id, config.denoise_probability,
                config.denoise_mean_span)
        return denoising_objective(*args, label_smoothing=smoothing), partial(summed_denoising_loss, *args)
    args = (tokenizer.mask_id, tokenizer.vocab_size, config.mlm_probability, tokenizer.special_ids)
    return masked_lm_objective(*args, label_smoothing=smoothing), partial(summed_masked_lm_loss, *args)


def run_tokenizer(config: PretrainConfig, data: TokenData) -> Tokenizer:
    """The data's tokenizer, with a mask token for the masking objectives (mlm, denoise)."""
    tokenizer = data.tokenizer()
    if config.resolved_objective == "denoise" and (tokenizer.bos_id is None or tokenizer.pad_id is None):
        raise ConfigError("denoising pretraining needs a tokenizer with bos and pad tokens (lmforge train-tokenizer "
                          "makes them)")
    return tokenizer.with_mask() if config.resolved_objective in ("mlm", "denoise") else tokenizer


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


def adopt_initial_model(config: PretrainConfig) -> Path | None:
    """With ``config.init``: its checkpoint directory, whose architecture replaces ``config.model``."""
    if not config.init:
        return None
    path = resolve_checkpoint(config.init)
    saved = read_config(path)
    if "lora" in saved:
        raise CheckpointError(f"init: {path} holds LoRA adapters; merge them into full weights first "
                              f"('lmforge merge-lora') and continue pretraining the merged checkpoint")
    kind = (saved.get("task") or {}).get("kind")
    if kind in ("classification", "qa"):
        raise CheckpointError(f"init: {path} holds a {kind} model (a task head on a backbone); continued "
                              f"pretraining starts from a language model")
    config.model = config_from_dict(saved["model"])
    return path


def check_initial_tokenizer(path: Path, tokenizer: Tokenizer, data_dir: str) -> None:
    """The data of a continued pretraining run must be token ids of the checkpoint's tokenizer."""
    if Tokenizer.load(path).fingerprint() != tokenizer.fingerprint():
        raise ConfigError(f"the data in {data_dir} was prepared with another tokenizer than {path}'s; prepare it "
                          f"with 'lmforge prepare --tokenizer {path}'")


def check_inputs(config: PretrainConfig) -> None:
    """Fail early (before launching workers) on bad options or data."""
    init = adopt_initial_model(config)
    config.validate()
    data = TokenData(config.data)
    tokenizer = run_tokenizer(config, data)
    if init is not None:
        check_initial_tokenizer(init, tokenizer, config.data)
    resolve_model_config(config, tokenizer.vocab_size)
    RandomWindows(data.train, config.model.block_size, config.train.batch_size)
    eval_window_starts(len(data.val), config.model.block_size)


def pretrain(config: PretrainConfig) -> TrainResult:
    """Run (or resume) a pretraining run described by ``config``; with ``config.init``, continue
    pretraining that checkpoint (e.g. on the text of a domain or task) in a new run."""
    init = adopt_initial_model(config)
    config.validate()
    data = TokenData(config.data)
    tokenizer = run_tokenizer(config, data)
    if init is not None:
        check_initial_tokenizer(init, tokenizer, config.data)
    run_dir = Path(config.out)
    model_config = resolve_model_config(config, tokenizer.vocab_size)
    resume_from = latest_checkpoint(run_dir) if config.resume else None
    if resume_from is not None:  # the architecture of a resumed run is the checkpoint's
        saved = config_from_dict(read_config(resume_from)["model"])
        if saved.vocab_size != model_config.vocab_size:
            raise CheckpointError(f"{resume_from} was trained with a vocabulary of {saved.vocab_size}, "
                                  f"the data in {config.data} has {model_config.vocab_size}")
        if saved.family != model_config.family:
            raise CheckpointError(f"{resume_from} holds a {saved.family} model, this run asks for "
                                  f"{model_config.family}")
        model_config = saved
        config.model = saved
    train_config = config.train
    runtime = setup_runtime(train_config)
    model = build_model(model_config)
    if init is not None and resume_from is None:  # a resumed run loads its own newer weights
        load_weights(model, init / MODEL_FILE)
        log.info("continued pretraining from %s", init)
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
    objective, summed_loss = objectives(config, tokenizer)
    evaluator = WindowLossEvaluator(data.val, model_config.block_size, eval_batch, train_config.eval_windows,
                                    train_config.final_eval_windows, context, summed_loss)
    info = {"data": str(config.data), "recipe": "pretrain", "objective": config.resolved_objective,
            **({"init": str(init)} if init is not None else {})}
    return train(model, objective, batches, evaluator, tokenizer, train_config, run_dir, runtime,
                 resume=config.resume, info=info)
