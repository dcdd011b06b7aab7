"""The one training loop.

Every recipe (pretraining now; fine-tuning, classification, seq2seq later) calls :func:`train` with
what differs: a model, a :class:`BatchSource`, an :data:`Objective` and an :data:`Evaluator`. The
loop owns what is shared: device and precision, DDP, the optimiser and learning-rate schedule,
gradient accumulation and clipping, budgets, logging, checkpoints and exact resume.

Exact resume: the data of step ``s`` is a function of ``s`` alone (see
:class:`lmforge.data.windows.RandomWindows`), and a checkpoint stores weights, optimiser state and
every RNG state after its step, so on CPU a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import TrainConfig, to_dict
from lmforge.device import autocast, dtype_name, select_device, select_dtype
from lmforge.errors import ConfigError
from lmforge.progress import progress_bar
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint_weights,
    load_train_state,
    prune_checkpoints,
    save_checkpoint,
)
from lmforge.training.distributed import DistContext, all_reduce_sum, barrier, init_distributed, rank_device
from lmforge.training.optim import build_optimizer, learning_rate
from lmforge.training.tracking import Tracker, plot_loss

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict[str, Tensor]], Tensor]
"""(model, batch on the device) -> scalar loss (mean over the batch's predicted tokens)."""

Evaluator = Callable[[nn.Module, bool], dict[str, float]]
"""(unwrapped model in eval mode, final) -> metrics such as ``{"val_loss": ..., "val_ppl": ...}``."""

IntervalMetrics = Callable[[], dict[str, float]]
"""() -> a recipe's own numbers since the last log line (e.g. RL's rewards), logged with the loss."""


class BatchSource(Protocol):
    def batch(self, step: int, micro: int) -> dict[str, Tensor]:
        """The CPU tensors of micro-batch ``micro`` of optimiser step ``step``, for this rank."""


@dataclass
class Runtime:
    """Where and how a run computes."""

    device: torch.device
    dtype: torch.dtype
    context: DistContext = field(default_factory=DistContext)


def setup_runtime(config: TrainConfig) -> Runtime:
    """Pick the device and precision, join DDP when launched by torchrun, set threads and seed.

    Call it before building the model: it seeds torch so that initialisation is reproducible.
    """
    device = select_device(config.device)
    context = init_distributed(device)
    device = rank_device(device, context)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    return Runtime(device, select_dtype(config.dtype, device), context)


LOWER_IS_BETTER = ("wer", "cer")  # validation metrics where checkpoints/best is the lowest

@dataclass
class TrainResult:
    step: int
    tokens: int
    elapsed: float
    metrics: dict[str, float]
    best_val_loss: float  # the best validation loss, or minus the best train.best_metric
    run_dir: Path
    final_checkpoint: Path
    best_checkpoint: Path | None
    resumed_from: Path | None
    seconds: dict[str, float] = field(default_factory=dict)  # this session: steps, batches (inside steps), evaluation


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather(obj: Any, context: DistContext) -> list[Any]:
    if not context.enabled:
        return [obj]
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def train(model: nn.Module, objective: Objective, batches: BatchSource, evaluator: Evaluator,
          tokenizer: Tokenizer, config: TrainConfig, run_dir: str | Path, runtime: Runtime, *,
          resume: bool = False, info: dict[str, Any] | None = None,
          interval_metrics: IntervalMetrics | None = None) -> TrainResult:
    """Train ``model`` until ``config.max_steps`` or ``config.max_time``; evaluate, checkpoint, plot.

    Writes into ``run_dir``: ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/step-N``,
    ``checkpoints/best``, ``checkpoints/final`` and ``loss.png`` (rank 0 only). ``interval_metrics``,
    if given, is called at every log line and its numbers are logged with the loss.
    """
    trainer = _Trainer(model, objective, batches, evaluator, tokenizer, config, Path(run_dir), runtime, info or {})
    trainer.interval_metrics = interval_metrics
    return trainer.run(resume)


class _Trainer:
    """The state of one training session; :meth:`run` is the loop, the other methods its parts."""

    def __init__(self, model: nn.Module, objective: Objective, batches: BatchSource, evaluator: Evaluator,
                 tokenizer: Tokenizer, config: TrainConfig, run_dir: Path, runtime: Runtime, info: dict[str, Any]):
        self.model, self.objective, self.batches, self.evaluator = model, objective, batches, evaluator
        self.tokenizer, self.config, self.run_dir, self.runtime = tokenizer, config, run_dir, runtime
        self.device, self.dtype, self.context = runtime.device, runtime.dtype, runtime.context
        self.main = self.context.is_main
        self.checkpoints = run_dir / "checkpoints"
        self.meta = {"dtype": dtype_name(self.dtype), "device": str(self.device),
                     "world_size": self.context.world_size, **info}
        model.to(self.device)
        self.optimizer = build_optimizer(model, config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.tokens, self.elapsed, self.elapsed_before, self.best_val = 0, 0, 0.0, 0.0, math.inf
        self.last_log: dict[str, float] = {}
        self.interval_metrics: IntervalMetrics | None = None
        self.seconds = {"steps": 0.0, "batches": 0.0, "evaluation": 0.0}

    # -------------------------------------------------------------- the loop
    def run(self, resume: bool) -> TrainResult:
        config = self.config
        resumed_from = self._restore() if resume else None
        if resumed_from is None:
            torch.manual_seed(config.seed + self.context.rank)  # dropout differs between ranks, data does not
        self.model.train()
        train_model: nn.Module = self.model
        if self.context.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            train_model = torch.compile(train_model)
        self.tracker = Tracker(self.run_dir, resume_step=self.step if resumed_from else None) if self.main else None
        self.bar = progress_bar(total=1000, desc="train", enabled=config.progress and self.main,
                                bar_format="{desc} |{bar}| {percentage:3.0f}% {postfix}")
        self.session_start = time.monotonic()
        self.start_fraction = _progress(self.step, self.elapsed_before, config)
        self._reset_interval()
        while not self._budget_spent():
            self._optimizer_step(train_model)
            finishing = config.max_steps is not None and self.step >= config.max_steps
            if self.step % config.log_interval == 0 or finishing:
                self._log_interval()
            if config.eval_interval and self.step % config.eval_interval == 0 and not finishing:
                self._evaluate_and_keep_best()
            if config.save_interval and self.step % config.save_interval == 0 and not finishing:
                self._save(self.checkpoints / f"step-{self.step}", with_state=True)
                if self.main:
                    prune_checkpoints(self.run_dir, config.keep_checkpoints)
                barrier(self.context)
        if self.interval_steps:  # a time budget ended between two log lines
            self._log_interval()
        self.bar.close()
        return self._finish(resumed_from)

    def _budget_spent(self) -> bool:
        config = self.config
        self.elapsed = self.elapsed_before + time.monotonic() - self.session_start
        done = (config.max_steps is not None and self.step >= config.max_steps) or \
               (config.max_time is not None and self.elapsed >= config.max_time)
        if self.context.enabled and config.max_time is not None:  # every rank stops at the same step
            flag = torch.tensor(float(done), device=self.device)
            done = bool(all_reduce_sum(flag, self.context).item() > 0)
        return done

    def _optimizer_step(self, train_model: nn.Module) -> None:
        config, scaler = self.config, self.scaler
        started = time.perf_counter()
        self.lr = learning_rate(self.step, config, self.elapsed)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)  # layer-wise decay scales some groups
        for micro in range(config.grad_accum):
            fetch = time.perf_counter()
            batch = _to_device(self.batches.batch(self.step, micro), self.device)
            self.seconds["batches"] += time.perf_counter() - fetch
            last_micro = micro == config.grad_accum - 1
            sync = contextlib.nullcontext() if last_micro or not self.context.enabled else train_model.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    loss = self.objective(train_model, batch)
                scaler.scale(loss / config.grad_accum).backward()
            self.interval_loss += loss.detach() / config.grad_accum
            self.interval_tokens += batch["input_ids"].numel() * self.context.world_size
        if config.grad_clip > 0:
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.interval_steps += 1
        self.seconds["steps"] += time.perf_counter() - started

    # -------------------------------------------------------------- logging and progress
    def _reset_interval(self) -> None:
        self.interval_loss = torch.zeros((), device=self.device)
        self.interval_steps, self.interval_tokens, self.interval_start = 0, 0, time.monotonic()

    def _log_interval(self) -> None:
        context, config = self.context, self.config
        mean_loss = all_reduce_sum(self.interval_loss, context).item() / (self.interval_steps * context.world_size)
        now = time.monotonic()
        self.elapsed = self.elapsed_before + now - self.session_start
        self.tokens += self.interval_tokens
        tokens_per_sec = self.interval_tokens / max(now - self.interval_start, 1e-9)
        self.last_log = {"train_loss": mean_loss, "lr": self.lr, "tokens": self.tokens,
                         "tokens_per_sec": tokens_per_sec, "elapsed": self.elapsed}
        if self.interval_metrics is not None:
            self.last_log.update(self.interval_metrics())
        if self.tracker:
            self.tracker.log(self.step, self.last_log)
        self._reset_interval()
        fraction = _progress(self.step, self.elapsed, config)
        rate = (fraction - self.start_fraction) / max(self.elapsed - self.elapsed_before, 1e-9)  # budget/second
        remaining = (1 - fraction) / rate if rate > 0 else 0.0
        self.bar.n = int(min(fraction, 1.0) * 1000)
        total = f"/{config.max_steps}" if config.max_steps else ""
        reward = f"reward {self.last_log['reward']:.3f} " if "reward" in self.last_log else ""
        self.bar.set_postfix_str(f"step {self.step}{total} loss {mean_loss:.4f} {reward}lr {self.lr:.2e} "
                                 f"{tokens_per_sec / 1000:.1f}k tok/s eta {_format_eta(remaining)}", refresh=False)
        self.bar.update(0)

    # -------------------------------------------------------------- evaluation and checkpoints
    def _evaluate(self, final: bool) -> dict[str, float]:
        started = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            metrics = self.evaluator(self.model, final)
        self.model.train()
        self.seconds["evaluation"] += time.perf_counter() - started
        return metrics

    def _evaluate_and_keep_best(self) -> None:
        metrics = self._evaluate(final=False)
        if self.tracker:
            self.tracker.log(self.step, metrics)
            _write(self.bar, f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        score = self._selection_score(metrics)
        if score < self.best_val:
            self.best_val = score
            self._save(self.checkpoints / "best", with_state=False)
        barrier(self.context)

    def _selection_score(self, metrics: dict[str, float]) -> float:
        """What checkpoints/best minimises: the validation loss, ``train.best_metric`` where lower is
        better (error rates), or minus it."""
        name = self.config.best_metric
        if name in ("loss", "ppl"):  # perplexity rises and falls with the loss
            return metrics.get("val_loss", math.inf)
        if f"val_{name}" not in metrics:
            reported = ", ".join(k.removeprefix("val_") for k in metrics if k.startswith("val_"))
            raise ConfigError(f"train.best_metric {name!r} is not among this task's validation metrics: {reported}")
        return metrics[f"val_{name}"] if name in LOWER_IS_BETTER else -metrics[f"val_{name}"]

    def _train_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "best_val_loss": self.best_val,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": _gather(_rng_state(self.device), self.context), "config": to_dict(self.config)}

    def _save(self, path: Path, with_state: bool) -> None:
        """Save a checkpoint (rank 0 writes; every rank takes part in gathering the RNG states)."""
        state = self._train_state() if with_state else None
        if self.main:
            save_checkpoint(path, self.model, self.tokenizer, state, {**self.meta, "step": self.step})

    def _restore(self) -> Path | None:
        """Load the latest checkpoint of the run, if any; returns its path."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            if self.main:
                log.info("nothing to resume in %s: starting from scratch", self.run_dir)
            return None
        state = load_train_state(path)
        load_checkpoint_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.best_val = state["best_val_loss"]
        rng = state["rng"]
        _set_rng_state(rng[self.context.rank] if self.context.rank < len(rng) else rng[0], self.device)
        if self.main:
            log.info("resumed from %s at step %d", path, self.step)
        return path

    def _finish(self, resumed_from: Path | None) -> TrainResult:
        """Last evaluations, the final and best checkpoints, the plot."""
        self.tokens += self.interval_tokens
        self.elapsed = self.elapsed_before + time.monotonic() - self.session_start
        if self.config.eval_interval:  # the periodic evaluation once more, to compare with the best so far
            self._evaluate_and_keep_best()
        final_metrics = self._evaluate(final=True)  # the headline numbers, on the final evaluation set
        if self.tracker:
            self.tracker.log(self.step, {f"final_{k}": v for k, v in final_metrics.items()})
        self._save(self.checkpoints / "final", with_state=True)
        if not self.config.eval_interval or not (self.checkpoints / "best").exists():
            self.best_val = min(self.best_val, self._selection_score(final_metrics))
            self._save(self.checkpoints / "best", with_state=False)
        if self.main:
            prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
            self.tracker.close()
            plot_loss(self.run_dir)
        barrier(self.context)
        return TrainResult(self.step, self.tokens, self.elapsed, {**self.last_log, **final_metrics}, self.best_val,
                           self.run_dir, self.checkpoints / "final", self.checkpoints / "best", resumed_from,
                           dict(self.seconds))


def _progress(step: int, elapsed: float, config: TrainConfig) -> float:
    """Share of the budget used: steps or time, whichever runs out first."""
    return max(step / config.max_steps if config.max_steps else 0.0,
               elapsed / config.max_time if config.max_time else 0.0)


def _write(bar: Any, message: str) -> None:
    if hasattr(bar, "write") and not getattr(bar, "disable", False):
        bar.write(message)
    else:
        log.info(message)
