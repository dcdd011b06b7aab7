"""Multimodal fine-tuning: captioning, visual question answering, speech recognition and video
description through the one training loop (``lmforge finetune --task caption|vqa|transcribe|describe``).

The run contributes what differs, as the text tasks in :mod:`lmforge.recipes.task_runs` do: the
model (a media encoder and projector around a text backbone, :class:`~lmforge.models.multimodal.fusion.MediaLM`),
rows decoded once from a manifest (:mod:`lmforge.data.media_rows`), the target-token loss and an
evaluator that generates for held-out examples and scores them (exact match, WER/CER, BLEU). The
checkpoint's task record ``{"kind": "media", "task": ..., "media": {...}}`` rebuilds the model at load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from lmforge.config import MEDIA_TASKS, FinetuneConfig
from lmforge.data.media_rows import MediaRow, collate_media, encode_media_rows, read_manifest
from lmforge.data.task_rows import pad_id_of
from lmforge.errors import ConfigError
from lmforge.evaluation import metrics as M
from lmforge.inference.media import media_texts
from lmforge.models.multimodal.fusion import MediaLM
from lmforge.progress import progress_bar
from lmforge.recipes.task_run import TaskRun, held_out, spread
from lmforge.tokenizer import Tokenizer
from lmforge.training.objectives import media_loss


def media_run(config: FinetuneConfig, backbone: nn.Module, tokenizer: Tokenizer, task: str) -> Any:
    """The :class:`~lmforge.recipes.task_runs.TaskRun` of a media task."""
    modality = MEDIA_TASKS[task]
    if config.media.modality not in ("auto", modality):
        raise ConfigError(f"a {task} run reads {modality}, but media.modality is {config.media.modality}")
    media = config.media.resolved(modality)
    media.validate()
    model = MediaLM(backbone, media)
    if tokenizer.eos_id is None:
        raise ConfigError("media tasks end every target with eos: the tokenizer needs an eos token")
    data = config.data
    block = backbone.config.block_size
    room = block - (model.num_media_tokens if media.fusion == "prefix" else 0)
    if room < 8:
        raise ConfigError(f"the media take {model.num_media_tokens} of the context's {block} positions: give the "
                          f"model a larger block_size (or smaller media inputs)")
    train_examples = read_manifest(data.path, task)
    val_examples = read_manifest(data.val_path, task) if data.val_path else None
    train_examples, val_examples = held_out(config, train_examples, val_examples)
    with progress_bar(total=len(train_examples) + len(val_examples), desc=f"decoding {modality}") as bar:
        train_rows = encode_media_rows(train_examples, tokenizer, media, room, bar.update)
        val_rows = encode_media_rows(val_examples, tokenizer, media, room, bar.update)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    collate = partial(collate_media, fusion=media.fusion, media_tokens=model.num_media_tokens,
                      pad_id=pad_id_of(tokenizer), bos_id=bos, eos_id=tokenizer.eos_id)
    evaluator = MediaEvaluator(val_rows, [e.target for e in val_examples], [e.question for e in val_examples],
                               collate, 2 * config.train.batch_size, tokenizer, task, config.train.eval_windows,
                               config.train.final_eval_windows, config.eval.max_new_tokens)
    task_info = {"kind": "media", "task": task, "media": dataclasses.asdict(media)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = (f"{len(train_rows)} {modality} examples, {len(val_rows)} held out; {media.encoder} encoder, "
               f"{media.fusion} fusion, {model.num_media_tokens} media positions; {trainable:,} trainable parameters")
    objective = partial(media_loss, label_smoothing=config.train.label_smoothing)
    return TaskRun(model, objective, train_rows, collate, evaluator, task_info, summary,
                   row_length=lambda row: len(row.prompt) + len(row.target))


class MediaEvaluator:
    """Held-out target-token loss and perplexity, and the greedy outputs of the held-out examples
    scored against their targets: exact match (after SQuAD's normalisation) for every task, word and
    character error rates for transcripts, BLEU for captions and descriptions."""

    def __init__(self, rows: list[MediaRow], targets: list[str], questions: list[str], collate: Callable,
                 batch_size: int, tokenizer: Tokenizer, task: str, examples: int | None,
                 final_examples: int | None, max_new_tokens: int):
        self.rows, self.targets, self.questions, self.collate = rows, targets, questions, collate
        self.batch_size, self.tokenizer, self.task, self.max_new_tokens = batch_size, tokenizer, task, max_new_tokens
        self.during = spread(list(range(len(rows))), examples)
        self.final = spread(list(range(len(rows))), final_examples)
        self.metrics = ("loss", "ppl", "exact_match", *(("wer", "cer") if task == "transcribe" else ()))

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        from lmforge.config import SamplingConfig
        from lmforge.models import eval_mode

        indices = self.final if final else self.during
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with eval_mode(model), torch.inference_mode():
            for start in range(0, len(indices), self.batch_size):
                batch = self.collate([self.rows[i] for i in indices[start:start + self.batch_size]])
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(batch["input_ids"], media=batch["media"], attention_mask=batch.get("attention_mask"),
                               decoder_input_ids=batch.get("decoder_input_ids")).float()
                labels = batch["labels"].flatten()
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100,
                                                           reduction="sum").item()
                count += int((labels != -100).sum())
            media = torch.stack([self.rows[i].media for i in indices])
            sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0)
            outputs = media_texts(model, self.tokenizer, media, [self.questions[i] for i in indices], sampling,
                                  self.batch_size)
        loss = total / max(count, 1)
        targets = [self.targets[i] for i in indices]
        metrics = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                   "val_exact_match": 100 * sum(M.exact_match(o, t) for o, t in zip(outputs, targets)) / len(targets)}
        if self.task == "transcribe":
            metrics["val_wer"] = 100 * M.word_error_rate(outputs, targets)
            metrics["val_cer"] = 100 * M.character_error_rate(outputs, targets)
        else:
            metrics["gen_bleu"] = M.bleu(outputs, targets)
        return metrics
