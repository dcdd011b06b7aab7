"""The shared base of the task benchmarks: one byte-level BPE tokenizer and one encoder pretrained
with masked-language modelling on English text from ../shared/data that no benchmark evaluates on.

What goes in (one JSONL record per document, shuffled with a fixed seed; 2% held out for MLM loss):
- SQuAD v1.1 contexts (each paragraph once) of the 30 QA *training* articles (bench/tasklib.py: the
  6 evaluation articles are left out),
- WikiText-2 ``wikitext2.valid.tokens`` (one record per paragraph line; not used by any other benchmark
  here),
- AESLC ``train.jsonl`` email bodies of the first ``--aeslc-documents`` (4,000) records (``document``;
  the dev set and all subject lines are left out; capped so that emails do not dominate),
- AG News ``train.csv`` texts (title + description; ``test.csv`` left out),
- SST-2 training sentences (every 5th row of ``train.tsv`` is the test set and is left out),
- Alpaca ``train.jsonl`` records (instruction, input and output as one document; ``--no-alpaca``
  leaves them out).

Tokenizer: a byte-level BPE of 8,192 tokens trained on that corpus (MLM pretraining adds ``<|mask|>``),
then the corpus prepared, both by ``lmforge.recipes.pipeline.tokenize_and_prepare``.
Model and training: the shipped ``encoder-mlm`` recipe (``lmforge pretrain --recipe encoder-mlm``: a
rotary-position encoder, width 256, 4 heads, 256-token windows, masked-language modelling of 15% of
tokens) with ``--layers`` blocks (default: the recipe's 4) for ``--max-time`` seconds (the learning rate
decays over that time), in ``--dtype`` (default: the recipe's auto, bf16 autocast where the CPU has
it). This script's ``--max-time`` (780) and ``--warmup`` (40) defaults are the first runs'; the
recipe's, measured for an hour, are ``--max-time 3600 --warmup 200``.

    python bench/task_pretrain.py [--work /tmp/lmforge-tasks/pretrain] [--max-time 780] [--layers 4]
                                  [--dtype auto] [--warmup 40] [--quick] [--json FILE]

The encoder is then ``WORK/mlm`` (pass it to the other scripts with ``--encoder``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from lmforge.config import PretrainConfig
from lmforge.options import build_dataclass
from lmforge.recipes.catalog import recipe_info
from lmforge.recipes.pipeline import tokenize_and_prepare
from lmforge.recipes.pretrain import pretrain
from tasklib import (
    DATA,
    aeslc,
    ag_news,
    need,
    read_jsonl,
    recipe_options,
    setup_logging,
    squad,
    sst2,
    write_json,
    write_jsonl,
)

RECIPE = "encoder-mlm"


def alpaca_documents() -> list[str]:
    """Alpaca records as documents: the instruction, its input (if any) and the output, one per line."""
    records = read_jsonl(DATA / "alpaca" / "train.jsonl")
    return ["\n".join(part for part in (r["instruction"], r.get("input", ""), r["output"]) if part.strip())
            for r in records]


def corpus_documents(aeslc_documents: int, alpaca: bool) -> dict[str, list[str]]:
    """The pretraining documents per source (see the module docstring)."""
    contexts = list(dict.fromkeys(r["context"] for r in squad("train")))
    wiki = [line.strip() for line in (DATA / "lm_ptb_wikitext2" / "wikitext2.valid.tokens").read_text(
        encoding="utf-8").splitlines() if line.strip() and not line.strip().startswith("=")]
    return {
        "squad_train_contexts": contexts,
        "wikitext2_valid": wiki,
        "aeslc_train_documents": [r["document"] for r in aeslc("train")[:aeslc_documents] if r["document"].strip()],
        "ag_news_train": [r["text"] for r in ag_news("train")],
        "sst2_train_sentences": [r["text"] for r in sst2("train")],
        **({"alpaca_train": alpaca_documents()} if alpaca else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/lmforge-tasks/pretrain")
    recipe = f"(default: the {RECIPE} recipe's)"
    parser.add_argument("--max-time", type=float, default=780.0,
                        help="seconds of MLM pretraining (the recipe's: 3600)")
    parser.add_argument("--layers", type=int, default=None, help=f"encoder blocks {recipe}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"windows per step {recipe}")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate {recipe}")
    parser.add_argument("--warmup", type=int, default=40, help="warm-up steps (the recipe's: 200)")
    parser.add_argument("--dtype", default=None, choices=("auto", "fp32", "bf16"),
                        help=f"pretraining precision {recipe}")
    parser.add_argument("--aeslc-documents", type=int, default=4000, help="AESLC emails kept (the first N)")
    parser.add_argument("--no-alpaca", dest="alpaca", action="store_false", help="leave the Alpaca records out")
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny model, 10 steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    need(DATA / "squad_v1.1", DATA / "aeslc", DATA / "ag_news", DATA / "sst2", DATA / "lm_ptb_wikitext2",
         *([DATA / "alpaca"] if args.alpaca else []))
    setup_logging()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    sources = corpus_documents(args.aeslc_documents, args.alpaca)
    documents = [{"text": t, "source": name} for name, texts in sources.items() for t in texts]
    random.Random(0).shuffle(documents)
    if args.quick:
        documents = documents[:2000]
    corpus = write_jsonl(work / "corpus.jsonl", documents)

    start = time.perf_counter()
    tokenizer = recipe_info(RECIPE)["tokenizer"]  # the kind and size the recipe was measured with
    _, data = tokenize_and_prepare([corpus], work, tokenizer["kind"], tokenizer["vocab_size"], val_fraction=0.02,
                                   reuse_tokenizer=True)
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    prep_seconds = time.perf_counter() - start

    options = recipe_options(RECIPE, "pretrain", data=str(data), out=str(work / "mlm"), model={"n_layer": args.layers},
                             train={"max_time": args.max_time, "lr": args.lr, "warmup_steps": args.warmup,
                                    "batch_size": args.batch_size, "dtype": args.dtype})
    if args.quick:
        options["model"].update(n_layer=2, n_embd=64, block_size=64)
        options["train"].update(max_time=None, max_steps=10, eval_interval=0, warmup_steps=2, final_eval_windows=16)
    config = build_dataclass(PretrainConfig, options)
    model, train = config.model, config.train
    start = time.perf_counter()
    result = pretrain(config)
    seconds = time.perf_counter() - start

    chars = {name: sum(len(t) for t in texts) for name, texts in sources.items()}
    print(f"\nMLM pretraining corpus ({corpus}):")
    print(f"{'source':<24} {'documents':>10} {'characters':>12}")
    for name, texts in sources.items():
        print(f"{name:<24} {len(texts):>10,} {chars[name]:>12,}")
    tokens = {k: meta.get(k) for k in ("train_tokens", "val_tokens") if k in meta}
    print(f"tokens: {tokens}; tokenizer + preparation {prep_seconds:.0f} s")
    print(f"encoder: {model.n_layer} layers x {model.n_embd}, rope, block {model.block_size}; {result.step} steps "
          f"of {train.batch_size} windows in {seconds:.0f} s ({result.tokens:,} tokens); final val MLM loss "
          f"{result.metrics.get('val_loss', float('nan')):.3f}")
    print(f"encoder checkpoint: {work / 'mlm'}")
    write_json(args.json, {"sources": {k: {"documents": len(v), "characters": chars[k]} for k, v in sources.items()},
                           "tokens": tokens, "steps": result.step, "seconds": seconds, "trained_tokens": result.tokens,
                           "metrics": result.metrics, "encoder": str(work / "mlm"), "layers": model.n_layer,
                           "max_time": train.max_time})


if __name__ == "__main__":
    main()
