"""Task fine-tuning: classification, extractive QA and seq2seq through the one training loop.

Each task contributes only what differs (see DESIGN.md): the model (a backbone from a checkpoint,
or built from scratch from a tokenizer and a model config, with a task head where the task needs
one), encoded rows with their collate function, an objective from
:mod:`lmforge.training.objectives`, and an evaluator on held-out examples. The checkpoint's
``config.json`` records the task (``{"kind": ..., ...}``) so :func:`lmforge.training.checkpoint.load_model`
rebuilds the head and :class:`lmforge.api.LanguageModel` knows what the model can do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lmforge.config import MEDIA_TASKS, FinetuneConfig, to_dict
from lmforge.data.bpe_dropout import SampledSegmentations, sampled_segmentations
from lmforge.data.folding import folded_ids
from lmforge.data.qa import separator_id
from lmforge.data.supervised import ShuffledBatches
from lmforge.data.task_rows import (
    collate_classification,
    collate_pairs,
    encode_labelled,
    encode_pairs,
    pad_id_of,
    read_labelled_set,
    read_pairs,
    read_qa,
)
from lmforge.errors import ConfigError
from lmforge.evaluation import metrics as M
from lmforge.fileio import atomic_write_text
from lmforge.inference.task_models import (
    answer_questions,
    classification_probabilities,
    qa_rows,
    translate_ids,
)
from lmforge.models import build_model
from lmforge.models.heads import SequenceClassifier, SpanExtractor, choose_thresholds
from lmforge.recipes.media_runs import media_run
from lmforge.recipes.task_run import TaskRun, held_out, spread
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import load_model, resolve_checkpoint, update_task_info
from lmforge.training.distributed import DistContext, barrier
from lmforge.training.loop import TrainResult, setup_runtime, train
from lmforge.training.objectives import classification_loss, seq2seq_loss, span_loss

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# The starting point: a checkpoint's backbone, or a fresh model
# ------------------------------------------------------------------------------------------
def load_backbone(config: FinetuneConfig) -> tuple[nn.Module, Tokenizer, str]:
    """(backbone model, tokenizer, where it came from). Heads of a task checkpoint are dropped."""
    if config.checkpoint:
        path = resolve_checkpoint(config.checkpoint)
        model, tokenizer, _ = load_model(path, dropout=config.dropout)
        return getattr(model, "backbone", model), tokenizer, str(path.resolve())
    tokenizer = Tokenizer.load(config.tokenizer)
    model_config = config.model
    model_config.vocab_size = model_config.vocab_size or tokenizer.vocab_size
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size is {model_config.vocab_size} but the tokenizer has "
                          f"{tokenizer.vocab_size} tokens")
    return build_model(model_config), tokenizer, "scratch"


# ------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------
def classification_run(config: FinetuneConfig, backbone: nn.Module, tokenizer: Tokenizer) -> TaskRun:
    data = config.data
    fields = [int(f) if f.isdigit() else f for f in data.text_field] or None
    label_field: Any = int(data.label_field) if data.label_field.isdigit() else data.label_field
    train_set = read_labelled_set(data.path, fields, label_field, data.multi_label)
    labels, multi = train_set.labels, train_set.multi_label
    val_set = read_labelled_set(data.val_path, fields, label_field, multi, labels) if data.val_path else None
    block = backbone.config.block_size
    train_rows = encode_labelled(train_set, tokenizer, block)
    val_rows = encode_labelled(val_set, tokenizer, block) if val_set else None
    train_rows, val_rows = held_out(config, train_rows, val_rows)
    pooling = config.pooling
    if pooling == "auto":
        pooling = "first" if backbone.config.family == "encoder" else "last"
    model = SequenceClassifier(backbone, len(labels), pooling=pooling, ngram_buckets=config.ngram_buckets,
                               ngram_ids=folded_ids(tokenizer, backbone.config.vocab_size) if config.ngram_buckets
                               else None)
    if config.ngram_buckets:
        model.ngram_table.weight.lr_scale = config.ngram_lr / config.train.lr  # read by the optimiser's groups
    pad = pad_id_of(tokenizer)
    collate = partial(collate_classification, pad_id=pad)
    task_info = {"kind": "classification", "labels": labels, "multi_label": multi, "pooling": pooling,
                 "thresholds": [0.5] * len(labels) if multi else None,
                 **({"ngram_buckets": config.ngram_buckets} if config.ngram_buckets else {})}
    batch_size = 2 * config.train.batch_size
    evaluator = ClassificationEvaluator(val_rows, collate, batch_size, multi, config.train.eval_windows,
                                        config.train.final_eval_windows)

    def tune_thresholds(result: TrainResult, trained: nn.Module) -> None:
        """Multi-label: per-label thresholds that maximise F1 on the held-out rows, into the checkpoints."""
        probs, targets = evaluator.predict(trained, val_rows)
        thresholds = choose_thresholds(probs, targets)
        for checkpoint in (result.final_checkpoint, result.best_checkpoint):
            if checkpoint is not None:
                update_task_info(checkpoint, {**task_info, "thresholds": [float(t) for t in thresholds]})

    summary = (f"{len(train_rows)} training texts, {len(val_rows)} held out, {len(labels)} labels"
               f"{' (multi-label)' if multi else ''}: {', '.join(labels[:8])}{'...' if len(labels) > 8 else ''}")
    objective = partial(classification_loss, label_smoothing=config.train.label_smoothing,
                        rdrop=config.train.rdrop)
    return TaskRun(model, objective, train_rows, collate, evaluator, task_info, summary,
                   after=tune_thresholds if multi else None)


class ClassificationEvaluator:
    """Held-out cross-entropy, accuracy and macro-F1 (multi-label: micro- and macro-F1 at 0.5)."""

    def __init__(self, rows: list[Any], collate: Callable, batch_size: int, multi_label: bool,
                 examples: int | None, final_examples: int | None):
        self.collate, self.batch_size, self.multi_label = collate, batch_size, multi_label
        self.during, self.final = spread(rows, examples), spread(rows, final_examples)
        self.metrics = ("loss", "micro_f1", "macro_f1") if multi_label else ("loss", "accuracy", "macro_f1")

    def predict(self, model: nn.Module, rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities (N, L), targets: (N,) indices or (N, L) 0/1)."""
        device = next(model.parameters()).device
        probs, targets = [], []
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                batch = self.collate(rows[start:start + self.batch_size])
                logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                probs.append(classification_probabilities(logits.float(), self.multi_label).cpu())
                targets.append(batch["labels"])
        model.train(was_training)
        return torch.cat(probs), torch.cat(targets)

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        probs, targets = self.predict(model, self.final if final else self.during)
        if self.multi_label:
            loss = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), targets.float()).item()
            predicted = probs >= 0.5
            gold = targets.bool()
            scores = M.multi_label_f1(predicted.int().tolist(), gold.int().tolist())
            return {"val_loss": loss, **{f"val_{name}": value for name, value in scores.items()}}
        loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), targets).item()
        predictions = probs.argmax(-1).tolist()
        gold = targets.tolist()
        return {"val_loss": loss, "val_accuracy": M.accuracy(predictions, gold),
                "val_macro_f1": M.macro_f1(predictions, gold)}


# ------------------------------------------------------------------------------------------
# Sequence to sequence
# ------------------------------------------------------------------------------------------
PURPOSE_OF_FIELDS = {"summary": "summarization"}


def seq2seq_run(config: FinetuneConfig, backbone: nn.Module, tokenizer: Tokenizer) -> TaskRun:
    if backbone.config.family != "seq2seq":
        raise ConfigError(f"seq2seq training needs an encoder-decoder model (model.family seq2seq), not a "
                          f"{backbone.config.family}; start from scratch with --model.preset seq2seq-small")
    data = config.data
    train_pairs = read_pairs(data.path, data.target_path, data.source_field, data.target_field)
    val_pairs = None
    if data.val_path:
        val_pairs = read_pairs(data.val_path, data.val_target_path, data.source_field, data.target_field)
    train_pairs, val_pairs = held_out(config, train_pairs, val_pairs)
    block = backbone.config.block_size
    train_rows, val_rows = encode_pairs(train_pairs, tokenizer, block), encode_pairs(val_pairs, tokenizer, block)
    pad, bos, eos = pad_id_of(tokenizer), tokenizer.bos_id, tokenizer.eos_id
    if bos is None or eos is None:
        raise ConfigError("seq2seq training needs a tokenizer with bos and eos tokens")
    collate = partial(collate_pairs, pad_id=pad, bos_id=bos, eos_id=eos)
    purpose = config.purpose
    if purpose == "auto":
        purpose = "summarization" if _json_has_field(data.path, "summary") else (
            "translation" if data.target_path else "generic")
    evaluator = Seq2SeqEvaluator(val_rows, val_pairs, collate, 2 * config.train.batch_size, tokenizer,
                                 config.train.eval_windows, config.train.final_eval_windows, config.eval.examples,
                                 config.eval.max_new_tokens)
    summary = f"{len(train_rows)} {purpose} pairs, {len(val_rows)} held out"
    objective = partial(seq2seq_loss, label_smoothing=config.train.label_smoothing, rdrop=config.train.rdrop)
    return TaskRun(backbone, objective, train_rows, collate, evaluator, {"kind": "seq2seq", "purpose": purpose},
                   summary, row_length=lambda row: len(row[0]) + len(row[1]),
                   encode_train=partial(encode_pairs, train_pairs, tokenizer, block))


def _json_has_field(path: str, name: str) -> bool:
    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        return False
    from lmforge.data.formats import read_records

    return name in read_records(path)[0]


class Seq2SeqEvaluator:
    """Held-out target-token loss and perplexity; with ``examples`` > 0 also greedy outputs of that
    many held-out sources scored with sacreBLEU and ROUGE-L against their targets."""

    def __init__(self, rows: list[Any], pairs: list[tuple[str, str]], collate: Callable, batch_size: int,
                 tokenizer: Tokenizer, examples: int | None, final_examples: int | None, generate: int,
                 max_new_tokens: int):
        self.rows, self.pairs, self.collate, self.batch_size, self.tokenizer = rows, pairs, collate, batch_size, \
            tokenizer
        self.during = spread(list(range(len(rows))), examples)
        self.final = spread(list(range(len(rows))), final_examples)
        self.generate, self.max_new_tokens = generate, max_new_tokens
        self.metrics = ("loss", "ppl")  # what train.best_metric may name (gen_bleu/gen_rougeL are reports only)

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        device = next(model.parameters()).device
        indices = self.final if final else self.during
        total, count = 0.0, 0
        for start in range(0, len(indices), self.batch_size):
            batch = self.collate([self.rows[i] for i in indices[start:start + self.batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"].flatten()
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=batch["decoder_input_ids"])
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=-100,
                                                       reduction="sum").item()
            count += int((labels != -100).sum())
        val_loss = total / max(count, 1)
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.generate:
            chosen = spread(list(range(len(self.rows))), self.generate)
            outputs = translate_ids(model, self.tokenizer, [self.rows[i][0] for i in chosen],
                                    max_new_tokens=self.max_new_tokens)
            hypotheses = [self.tokenizer.decode(ids) for ids in outputs]
            references = [self.pairs[i][1] for i in chosen]
            metrics["gen_bleu"] = M.bleu(hypotheses, references)
            metrics["gen_rougeL"] = M.rouge(hypotheses, references)["rougeL"]
        return metrics


# ------------------------------------------------------------------------------------------
# Extractive question answering
# ------------------------------------------------------------------------------------------
def qa_run(config: FinetuneConfig, backbone: nn.Module, tokenizer: Tokenizer) -> TaskRun:
    if config.train.label_smoothing:
        raise ConfigError("train.label_smoothing is for token and class targets; extractive QA (span positions) "
                          "trains without it")
    data = config.data
    train_examples = read_qa(data.path)
    val_examples = read_qa(data.val_path) if data.val_path else None
    train_examples, val_examples = held_out(config, train_examples, val_examples)
    block = backbone.config.block_size
    stride = block // 4 if data.stride is None else data.stride
    if stride >= block // 2:
        raise ConfigError(f"data.stride ({stride}) must be less than half the context ({block})")
    train_rows = [row for example in train_examples for row in qa_rows(tokenizer, example, block, stride)]
    task_info = {"kind": "qa", "stride": stride, "max_answer_tokens": 30}
    if config.question_match:
        task_info["separator_id"] = separator_id(tokenizer)
        model = SpanExtractor(backbone, task_info["separator_id"], folded_ids(tokenizer, backbone.config.vocab_size))
    else:
        model = SpanExtractor(backbone)
    pad = pad_id_of(tokenizer)
    collate = partial(collate_spans, pad_id=pad)
    evaluator = QAEvaluator(val_examples, tokenizer, block, stride, config.train.eval_windows,
                            config.train.final_eval_windows)
    summary = (f"{len(train_examples)} training questions ({len(train_rows)} windows), {len(val_examples)} held out")
    return TaskRun(model, span_loss, train_rows, collate, evaluator, task_info, summary)


def collate_spans(rows: list[tuple[list[int], int, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (B, T) and the answer's ``start_positions``/``end_positions`` (B,)."""
    from lmforge.data.task_rows import pad_rows

    ids, mask = pad_rows([r[0] for r in rows], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([r[1] for r in rows]),
            "end_positions": torch.tensor([r[2] for r in rows])}


class QAEvaluator:
    """SQuAD exact match and F1 (0-100) of the predicted spans of held-out questions; ``val_loss`` is
    100 - F1 so the best checkpoint is the one with the best F1."""

    def __init__(self, examples: list[Any], tokenizer: Tokenizer, block: int, stride: int, count: int | None,
                 final_count: int | None):
        self.tokenizer, self.block, self.stride = tokenizer, block, stride
        self.during, self.final = spread(examples, count), spread(examples, final_count)
        self.metrics = ("loss", "exact_match", "f1")

    def __call__(self, model: nn.Module, final: bool) -> dict[str, float]:
        examples = self.final if final else self.during
        answers = answer_questions(model, self.tokenizer, [e.question for e in examples], [e.context for e in examples],
                                   self.block, self.stride)
        scores = M.squad_scores([a.text for a in answers], [e.answers for e in examples])
        return {"val_loss": 100.0 - scores["f1"], "val_exact_match": scores["exact_match"], "val_f1": scores["f1"]}


# ------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------
RUNS = {"classification": classification_run, "qa": qa_run, "seq2seq": seq2seq_run,
        **{task: partial(media_run, task=task) for task in MEDIA_TASKS}}


def _bpe_dropout_rows(config: FinetuneConfig, run: TaskRun, tokenizer: Tokenizer, path: Path,
                      context: DistContext) -> SampledSegmentations:
    """The training rows under BPE-dropout: the main process samples (or, resuming, reads) them and
    saves them to ``path``; the other ranks read them from there."""
    data = config.data
    if context.is_main:
        rows = sampled_segmentations(run.train_rows, run.encode_train, tokenizer, data.bpe_dropout,
                                     data.bpe_dropout_samples, path, bool(config.resume))
        log.info("BPE-dropout %g: %d segmentations of the training rows sampled", data.bpe_dropout,
                 data.bpe_dropout_samples)
    barrier(context)
    if not context.is_main:
        rows = SampledSegmentations.load(path, run.train_rows, data.bpe_dropout, data.bpe_dropout_samples)
    return rows


def finetune_task(config: FinetuneConfig, task: str) -> TrainResult:
    """Train a task model (classification, qa or seq2seq) described by ``config``."""
    if config.lora.enabled:
        raise ConfigError("LoRA adapters are for generative fine-tuning (--task sft); task models train all "
                          "their weights")
    run_dir = Path(config.out)
    runtime = setup_runtime(config.train)
    context: DistContext = runtime.context
    backbone, tokenizer, source = load_backbone(config)
    run = RUNS[task](config, backbone, tokenizer)
    best = config.train.best_metric
    if best not in run.evaluator.metrics:
        raise ConfigError(f"train.best_metric {best!r} is not among this task's validation metrics: "
                          f"{', '.join(run.evaluator.metrics)}")
    train_config = config.train
    if config.data.bpe_dropout:
        run.train_rows = _bpe_dropout_rows(config, run, tokenizer, run_dir / "bpe-dropout.npz", context)
    lengths = [run.row_length(row) for row in run.train_rows] if config.data.group_by_length else None
    batches = ShuffledBatches(run.train_rows, train_config.batch_size, train_config.grad_accum, train_config.seed,
                              run.collate, context.rank, context.world_size, lengths)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        steps = train_config.max_steps
        parameters = sum(p.numel() for p in {id(p): p for p in run.model.parameters()}.values())
        log.info("%s (%s model from %s, %s parameters): %s%s", task, backbone.config.family, source,
                 f"{parameters:,}", run.summary, f"; {batches.epochs(steps):.1f} epochs" if steps else "")
    info = {"recipe": "finetune", "task": run.task_info, "data": str(config.data.path), "base_checkpoint": source}
    result = train(run.model, run.objective, batches, run.evaluator, tokenizer, train_config, run_dir, runtime,
                   resume=config.resume, info=info)
    if run.after is not None and context.is_main:
        run.after(result, run.model)
    return result
