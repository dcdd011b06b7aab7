"""Alpaca instruction tuning from a pretrained ~10M model: base vs full fine-tuning vs LoRA (r=8).

1. A base model: the llama-10m preset (context 256), pretrained on lmforge's embedded default corpus
   (Python's documentation; no Alpaca text) with an 8,192-token BPE tokenizer, for ``--base-steps``.
   ``--base DIR`` reuses an earlier base run instead.
2. ``../shared/data/alpaca/train.jsonl`` (4,500 records): every 10th record is held out (450), the
   rest trains. Responses are rendered through lmforge's default chat template; the loss (and the
   held-out perplexity) covers the response tokens and the end-of-sequence token only.
3. Full fine-tuning (the shipped ``alpaca-sft`` recipe), LoRA (r=8, alpha 16) on q, k, v, o, and LoRA on
   every linear layer (attention, MLP, head: the ``alpaca-sft-lora`` recipe), each for ``--steps`` steps
   of 16 examples (this script's default 400; the recipes' 300, as in docs/benchmarks.md), through
   ``lmforge.recipes.finetune`` (``lmforge finetune BASE --recipe alpaca-sft ...``); then
   for each model: held-out response perplexity and greedy answers to 100 held-out prompts (how many
   end with the end-of-sequence token, ROUGE-L).

    python bench/alpaca_finetune.py [--work DIR] [--base DIR | --base-steps 1200] [--steps 400]
                                    [--runs full,lora,lora-all]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lmforge.config import FinetuneConfig
from lmforge.corpus import write_default_corpus
from lmforge.data.formats import DEFAULT_CHAT_TEMPLATE, read_records
from lmforge.data.supervised import encode_set, split_records
from lmforge.evaluation.harness import generation_examples, generation_metrics
from lmforge.models.lora import count_trainable
from lmforge.options import build_dataclass, deep_merge
from lmforge.recipes.catalog import recipe_values
from lmforge.recipes.finetune import ExampleLossEvaluator, finetune
from lmforge.recipes.pipeline import pretrain_from_text
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import load_model, resolve_checkpoint
from lmforge.training.distributed import DistContext

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "train.jsonl"
RUNS = {  # a shipped recipe and what this run changes in it
    "full": ("alpaca-sft", {}),  # lr 5e-4
    "lora": ("alpaca-sft-lora", {"lora": {"targets": ["q", "k", "v", "o"]}, "train": {"lr": 2e-3}}),
    "lora-all": ("alpaca-sft-lora", {}),  # r=8 on every linear layer, lr 3e-3
}


def pretrain_base(work: Path, steps: int) -> Path:
    """Tokenizer, data and a pretrained llama-10m on the default corpus; returns the run directory."""
    corpus = write_default_corpus(work / "corpus.jsonl")
    values = {"out": str(work / "base"), "model": {"preset": "llama-10m", "block_size": 256},
              "train": {"max_steps": steps, "lr": 2e-3, "warmup_steps": 100, "batch_size": 16, "eval_interval": 400,
                        "eval_windows": 100, "final_eval_windows": 400, "save_interval": 400, "progress": False}}
    pretrain_from_text([corpus], work, values, kind="bpe", vocab_size=8192, val_fraction=0.05, reuse_tokenizer=True)
    return work / "base"


def evaluate(model: torch.nn.Module, tokenizer: Tokenizer, val_records: list[dict], generations: int) -> dict:
    """Held-out response perplexity (every held-out record) and greedy answers to the first few."""
    model.eval()
    tokenizer.chat_template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    val = encode_set(val_records, "alpaca", tokenizer, model.config.block_size, name="val")
    pad = tokenizer.pad_id or 0
    with torch.no_grad():
        loss = ExampleLossEvaluator(val, 32, pad, None, None, DistContext())(model, True)["val_loss"]
    examples = generation_examples(val_records[:generations], tokenizer, "alpaca")
    metrics, _ = generation_metrics(model, tokenizer, examples, max_new_tokens=128)
    return {"ppl": math.exp(loss), "eos_rate": metrics["eos_rate"], "rougeL": metrics["rougeL"],
            "new_tokens": metrics["mean_new_tokens"]}


def run_finetune(work: Path, base: Path, name: str, steps: int) -> tuple[Path, float, FinetuneConfig]:
    recipe, changes = RUNS[name]
    config = build_dataclass(FinetuneConfig, deep_merge(recipe_values(recipe, "finetune"), deep_merge(changes, {
        "checkpoint": str(base), "out": str(work / name), "data": {"path": str(ALPACA)},
        "train": {"max_steps": steps, "progress": False}})))
    start = time.perf_counter()
    finetune(config)
    return work / name, time.perf_counter() - start, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/lmforge-alpaca")
    parser.add_argument("--base", default=None, help="an existing base run or checkpoint")
    parser.add_argument("--base-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--runs", default="full,lora,lora-all", help="which fine-tuning runs, of full, lora, lora-all")
    args = parser.parse_args()
    if not ALPACA.is_file():
        raise SystemExit(f"needs {ALPACA}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = Path(args.base) if args.base else pretrain_base(work, args.base_steps)
    base_seconds = time.perf_counter() - start
    base = resolve_checkpoint(base)
    _, val_records = split_records(read_records(ALPACA), 0.1)

    rows = []
    model, tokenizer, _ = load_model(base)
    rows.append(("base (no fine-tuning)", evaluate(model, tokenizer, val_records, args.generations),
                 base_seconds if not args.base else float("nan"), 1.0))
    for name in args.runs.split(","):
        run, seconds, config = run_finetune(work, base, name, args.steps)
        lora = config.lora
        model, tokenizer, _ = load_model(run / "checkpoints" / "final")
        trainable, total = count_trainable(model)  # a loaded LoRA model has only its adapters trainable
        label = "full fine-tuning" if not lora.enabled else f"LoRA r={lora.r} ({','.join(lora.targets)})"
        rows.append((label, evaluate(model, tokenizer, val_records, args.generations), seconds, trainable / total))

    print(f"\nAlpaca: {len(val_records)} held-out records; base {base}")
    print(f"{'model':<24} {'held-out response ppl':>22} {'ends with eos':>14} {'ROUGE-L':>8} "
          f"{'new tokens':>10} {'wall s':>8} {'trainable':>10}")
    for label, m, seconds, share in rows:
        print(f"{label:<24} {m['ppl']:>22.2f} {m['eos_rate']:>13.0%} {m['rougeL']:>8.2f} {m['new_tokens']:>10.1f} "
              f"{seconds:>8.0f} {share:>10.2%}")
    results = [{"model": r[0], **r[1], "seconds": r[2], "trainable": r[3]} for r in rows]
    (work / f"results-{args.runs}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
