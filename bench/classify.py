"""Text classification: TF-IDF + logistic regression vs lmforge's MLM encoder fine-tuned as a classifier.

Data (../shared/data): AG News (``train.csv`` 3,600 -> ``test.csv`` 2,000, 4 topics) and SST-2
(``train.tsv``: every 5th row is the test set, 1,384; the other 5,536 train).
- Baseline: scikit-learn ``TfidfVectorizer`` (word 1-2 grams, sublinear tf) + ``LogisticRegression``
  (C=10), fitted on every training row.
- lmforge: the encoder from bench/task_pretrain.py fine-tuned with ``FinetuneConfig(checkpoint=...,
  task="classification")`` for ``--max-time`` seconds (``--pooling``, default mean; ``--dtype``, default
  fp32; ``--dropout``, default the checkpoint's); every 10th training row is its ``data.val_path``
  and the checkpoint with the best validation ``--best-metric`` (default accuracy) is tested. Test
  accuracy and macro-F1 through ``lmforge.evaluation.evaluate(lm, "classification", ...)``.

    python bench/classify.py --encoder /tmp/lmforge-tasks/pretrain/mlm [--datasets ag_news,sst2]
                             [--max-time 300] [--work DIR] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmforge.api import LanguageModel
from lmforge.evaluation import evaluate
from lmforge.evaluation.metrics import accuracy, macro_f1
from tasklib import (
    DATA,
    ag_news,
    need,
    print_table,
    run_finetune,
    setup_logging,
    split_off,
    sst2,
    train_options,
    write_json,
    write_jsonl,
)

DATASETS = {"ag_news": ag_news, "sst2": sst2}


def tfidf_baseline(train: list[dict], test: list[dict]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    start = time.perf_counter()
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
                          LogisticRegression(C=10.0, max_iter=2000))
    model.fit([r["text"] for r in train], [r["label"] for r in train])
    seconds = time.perf_counter() - start
    predictions = list(model.predict([r["text"] for r in test]))
    gold = [r["label"] for r in test]
    return {"model": "TF-IDF + LogReg", "accuracy": 100 * accuracy(predictions, gold),
            "macro_f1": 100 * macro_f1(predictions, gold), "train_s": seconds}


def lmforge_classifier(encoder: str, train: list[dict], test: list[dict], work: Path, args: argparse.Namespace) -> dict:
    fit, val = split_off(train)
    options = {"checkpoint": encoder, "task": "classification", "out": str(work / "run"), "pooling": args.pooling,
               "dropout": args.dropout,
               "data": {"path": str(write_jsonl(work / "train.jsonl", fit)),
                        "val_path": str(write_jsonl(work / "val.jsonl", val))},
               "train": train_options(args.max_time, args.quick, lr=args.lr, batch_size=32, warmup_steps=50,
                                      eval_interval=args.eval_interval, weight_decay=0.01,
                                      best_metric=args.best_metric, dtype=args.dtype, eval_windows=None,
                                      **({"max_steps": args.max_steps} if args.max_steps else {}))}
    result, seconds = run_finetune(options)
    lm = LanguageModel.load(result.best_checkpoint, device="cpu")
    report = evaluate(lm, "classification", str(write_jsonl(work / "test.jsonl", test)), progress=False)
    return {"model": "lmforge MLM encoder", "accuracy": 100 * report["metrics"]["accuracy"],
            "macro_f1": 100 * report["metrics"]["macro_f1"], "train_s": seconds, "steps": result.step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="/tmp/lmforge-tasks/pretrain/mlm", help="bench/task_pretrain.py's run")
    parser.add_argument("--datasets", default="ag_news,sst2")
    parser.add_argument("--max-time", type=float, default=300.0, help="seconds of fine-tuning per dataset")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    parser.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--pooling", default="mean", help="the classifier head's pooling: mean, first or last")
    parser.add_argument("--best-metric", default="accuracy", help="what picks the tested checkpoint: accuracy, loss")
    parser.add_argument("--dtype", default="fp32", help="fine-tuning precision: fp32 or bf16")
    parser.add_argument("--dropout", type=float, default=None,
                        help="the encoder's dropout while fine-tuning (FinetuneConfig.dropout; default: the "
                             "checkpoint's)")
    parser.add_argument("--work", default="/tmp/lmforge-tasks/classify")
    parser.add_argument("--quick", action="store_true", help="8 fine-tuning steps, 200 test rows")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    need(DATA / "ag_news", DATA / "sst2", Path(args.encoder))
    setup_logging()
    results = {}
    for name in args.datasets.split(","):
        train, test = DATASETS[name]("train"), DATASETS[name]("test")
        if args.quick:
            test = test[:200]
        rows = [tfidf_baseline(train, test),
                lmforge_classifier(args.encoder, train, test, Path(args.work) / name, args)]
        results[name] = {"train": len(train), "test": len(test), "rows": rows}
    for name, r in results.items():
        print_table(f"{name}: {r['train']} training rows, {r['test']} test rows (accuracy and macro-F1 in %)",
                    r["rows"], ["accuracy", "macro_f1", "train_s"])
    write_json(args.json, {"encoder": args.encoder, "max_time": args.max_time, "options": vars(args),
                           "results": results})


if __name__ == "__main__":
    main()
