"""Text classification: TF-IDF + logistic regression vs lmforge's MLM encoder fine-tuned as a classifier.

Data (../shared/data): AG News (``train.csv`` 3,600 -> ``test.csv`` 2,000, 4 topics) and SST-2
(``train.tsv``: every 5th row is the test set, 1,384; the other 5,536 train).
- Baseline: scikit-learn ``TfidfVectorizer`` (word 1-2 grams, sublinear tf) + ``LogisticRegression``
  (C=10), fitted on every training row.
- lmforge: the encoder from bench/task_pretrain.py fine-tuned from the shipped ``text-classifier``
  recipe (``lmforge finetune ENCODER --recipe text-classifier``: mean pooling, 32 texts per step, 50
  warm-up steps, the best accuracy picks the checkpoint, ...) for ``--max-time`` seconds. Flags without
  a default of their own take the recipe's value (``--pooling``, ``--best-metric``, ``--ngram-lr``,
  ``--rdrop``, ``--layer-lr-decay``); where this script's defaults differ from the recipe they are the
  first runs' (so the commands in docs/benchmarks.md keep their meaning): ``--max-time`` 300 (recipe
  220), ``--lr`` 3e-4 (1e-4), ``--eval-interval`` 100 (50), ``--dtype`` fp32 (auto), ``--dropout`` the
  checkpoint's (0.1), no ``--group-by-length`` (on), no ``--ngram-buckets`` (262144, a hashed uni- and
  bigram bag beside the encoder); every
  10th training row is its ``data.val_path`` and the checkpoint with the best validation
  ``--best-metric`` (default accuracy) is tested. Test accuracy and macro-F1 through
  ``lmforge.evaluation.evaluate(lm, "classification", ...)``.
- ``--adapt S``: first S seconds of task-adaptive pretraining (the encoder's MLM continued on the
  training texts, without labels: the ``encoder-tapt`` recipe, ``--init`` the encoder). ``--seeds N``: N fine-tunings
  (seeds 1..N) tested one by one, as an ensemble (mean of their label probabilities) and as a soup
  (the mean of their weights, ``lmforge.training.averaging.average_checkpoints``). With ``--folds``
  member k holds out the k-th tenth of the training rows instead of the same tenth for all, so the
  ensemble as a whole learns from every training row (cross-validation bagging). With ``--no-holdout``
  every fine-tuning learns from every row and its final checkpoint is tested (the validation tenth, then
  seen in training, only shows progress).
- Is the difference real? For the single classifier, or the ensemble and the soup, the gain over the
  baseline in accuracy and macro-F1 with a paired bootstrap 95% interval (2,000 resamples of the test
  set) and McNemar's exact p-value (``lmforge.evaluation.significance``).

    python bench/classify.py --encoder /tmp/lmforge-tasks/pretrain/mlm [--datasets ag_news,sst2]
                             [--max-time 300] [--adapt 0] [--seeds 1] [--folds] [--work DIR] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from lmforge.api import LanguageModel
from lmforge.config import PretrainConfig
from lmforge.data.shards import prepare
from lmforge.evaluation import evaluate
from lmforge.evaluation.metrics import accuracy, macro_f1
from lmforge.evaluation.significance import mcnemar, paired_bootstrap
from lmforge.options import build_dataclass
from lmforge.recipes.pretrain import pretrain
from lmforge.training.averaging import average_checkpoints
from lmforge.training.checkpoint import resolve_checkpoint
from tasklib import (
    DATA,
    ag_news,
    need,
    print_table,
    recipe_options,
    run_finetune,
    setup_logging,
    split_off,
    sst2,
    write_json,
    write_jsonl,
)

DATASETS = {"ag_news": ag_news, "sst2": sst2}
RECIPE, ADAPT_RECIPE = "text-classifier", "encoder-tapt"


def tfidf_baseline(train: list[dict], test: list[dict]) -> tuple[dict, list[str]]:
    """The baseline's test row and its test predictions."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    start = time.perf_counter()
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
                          LogisticRegression(C=10.0, max_iter=2000))
    model.fit([r["text"] for r in train], [r["label"] for r in train])
    seconds = time.perf_counter() - start
    predictions = [str(p) for p in model.predict([r["text"] for r in test])]
    return {"model": "TF-IDF + LogReg", **scores(predictions, test), "train_s": seconds}, predictions


def scores(predictions: list[str], test: list[dict]) -> dict:
    """Accuracy and macro-F1 (%) of the predictions."""
    gold = [r["label"] for r in test]
    return {"accuracy": 100 * accuracy(predictions, gold), "macro_f1": 100 * macro_f1(predictions, gold)}


def against_baseline(model: str, predictions: list[str], baseline: list[str], test: list[dict]) -> dict:
    """The model's gains over the baseline (percentage points) with paired 95% bootstrap intervals, and
    McNemar's p-value (:mod:`lmforge.evaluation.significance`)."""
    gold = [r["label"] for r in test]
    row = {"model": model, "mcnemar_p": mcnemar(baseline, predictions, gold)}
    for name, metric in (("accuracy", accuracy), ("macro_f1", macro_f1)):
        diff = paired_bootstrap(metric, baseline, predictions, gold, resamples=2000)
        row[name] = f"{100 * diff.difference:+.2f} [{100 * diff.low:+.2f}, {100 * diff.high:+.2f}]"
    return row


def lmforge_classifier(encoder: str, train: list[dict], test: list[dict], work: Path, args: argparse.Namespace,
                       seed: int = 1) -> tuple[dict, Path]:
    """Fine-tune the encoder once (seed ``seed``); its test row and its best checkpoint."""
    fit, val = split_off(train, fold=seed - 1 if args.folds else 0)
    if args.no_holdout:  # train on every row; the validation rows only show progress, the final model is tested
        fit = train
    options = recipe_options(
        RECIPE, quick=args.quick, checkpoint=encoder, out=str(work / "run"), pooling=args.pooling,
        ngram_buckets=args.ngram_buckets, ngram_lr=args.ngram_lr,
        data={"path": str(write_jsonl(work / "train.jsonl", fit)),
              "val_path": str(write_jsonl(work / "val.jsonl", val)), "group_by_length": args.group_by_length},
        train={"max_time": args.max_time, "max_steps": args.max_steps, "lr": args.lr,
               "eval_interval": args.eval_interval, "seed": seed, "layer_lr_decay": args.layer_lr_decay,
               "rdrop": args.rdrop, "best_metric": args.best_metric, "dtype": args.dtype})
    options["dropout"] = args.dropout  # None: the checkpoint's own (the recipe's is 0.1)
    result, seconds = run_finetune(options)
    tested = result.final_checkpoint if args.no_holdout else result.best_checkpoint
    row = {"model": "lmforge MLM encoder" + (" + n-grams" if args.ngram_buckets else "")
                    + (f" (seed {seed})" if args.seeds > 1 else ""),
           **test_scores(LanguageModel.load(tested, device="cpu"), test, work),
           "train_s": seconds, "steps": result.step}
    return row, Path(tested)


def test_scores(lm: LanguageModel, test: list[dict], work: Path) -> dict:
    """Accuracy and macro-F1 (%) through ``lmforge.evaluation.evaluate``."""
    report = evaluate(lm, "classification", str(write_jsonl(work / "test.jsonl", test)), progress=False)
    return {"accuracy": 100 * report["metrics"]["accuracy"], "macro_f1": 100 * report["metrics"]["macro_f1"]}


def ensemble_predictions(checkpoints: list[Path], test: list[dict]) -> list[str]:
    """The label with the highest mean probability over the classifiers (one checkpoint: its own)."""
    texts = [r["text"] for r in test]
    totals = [Counter() for _ in texts]
    for checkpoint in checkpoints:
        for total, scored in zip(totals, LanguageModel.load(checkpoint, device="cpu").classify(texts)):
            total.update(scored.scores)
    return [total.most_common(1)[0][0] for total in totals]


def adapt_encoder(encoder: str, train: list[dict], work: Path, args: argparse.Namespace) -> tuple[str, float]:
    """Task-adaptive pretraining: the encoder's MLM continued on the training texts (no labels) for
    ``--adapt`` seconds (``PretrainConfig.init``); (its run directory, seconds)."""
    start = time.perf_counter()
    tokenizer = resolve_checkpoint(encoder)  # its tokenizer.json, mask token included
    texts = write_jsonl(work / "adapt-texts.jsonl", [{"text": r["text"]} for r in train])
    prepare([texts], tokenizer, work / "adapt-data", val_fraction=0.05, progress=False)
    options = recipe_options(ADAPT_RECIPE, "pretrain", data=str(work / "adapt-data"), out=str(work / "adapt"),
                             init=encoder, train={"max_time": args.adapt, "lr": args.adapt_lr, "dtype": args.dtype})
    if args.quick:
        options["train"].update(max_time=None, max_steps=4, eval_interval=0, final_eval_windows=8)
    pretrain(build_dataclass(PretrainConfig, options))
    return str(work / "adapt" / "checkpoints" / "final"), time.perf_counter() - start


def lmforge_rows(encoder: str, train: list[dict], test: list[dict], work: Path,
                 args: argparse.Namespace) -> tuple[list[dict], dict[str, list[str]]]:
    """One fine-tuned classifier, or with ``--seeds N`` N of them, their ensemble and their soup; with
    ``--adapt`` the encoder first continues its MLM pretraining on the training texts. Their rows, and
    the test predictions of what combines them (the single classifier, or the ensemble and the soup)."""
    adapt_seconds = 0.0
    if args.adapt:
        encoder, adapt_seconds = adapt_encoder(encoder, train, work, args)
    members = [lmforge_classifier(encoder, train, test, work / (f"seed{seed}" if args.seeds > 1 else ""), args, seed)
               for seed in range(1, args.seeds + 1)]
    rows = [row for row, _ in members]
    for row in rows:
        row["adapt_s"] = adapt_seconds
    checkpoints = [checkpoint for _, checkpoint in members]
    if args.seeds == 1:
        return rows, {rows[0]["model"]: ensemble_predictions(checkpoints, test)}
    total = {"train_s": adapt_seconds + sum(r["train_s"] for r in rows), "adapt_s": adapt_seconds,
             "steps": sum(r["steps"] for r in rows)}
    soup = average_checkpoints(checkpoints, work / "soup")
    predictions = {f"lmforge ensemble of {args.seeds}": ensemble_predictions(checkpoints, test),
                   f"lmforge soup of {args.seeds}": ensemble_predictions([soup], test)}
    combined = [{"model": model, **scores(predicted, test), **total} for model, predicted in predictions.items()]
    return combined + rows, predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="/tmp/lmforge-tasks/pretrain/mlm", help="bench/task_pretrain.py's run")
    parser.add_argument("--datasets", default="ag_news,sst2")
    recipe = f"(default: the {RECIPE} recipe's)"
    parser.add_argument("--max-time", type=float, default=300.0,
                        help="seconds of fine-tuning per dataset (the recipe's: 220)")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (the recipe's: 1e-4)")
    parser.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    parser.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations (the recipe's: 50)")
    parser.add_argument("--pooling", default=None, help=f"the classifier head's pooling: mean, first or last {recipe}")
    parser.add_argument("--best-metric", default=None,
                        help=f"what picks the tested checkpoint: accuracy, loss {recipe}")
    parser.add_argument("--dtype", default="fp32", help="fine-tuning precision: fp32, bf16 or auto (the recipe's)")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
                        help="batch texts of similar length together (data.group_by_length; the recipe's: on)")
    parser.add_argument("--layer-lr-decay", type=float, default=None,
                        help=f"train.layer_lr_decay: each block below the head learns this much slower (1: off) "
                             f"{recipe}")
    parser.add_argument("--dropout", type=float, default=None,
                        help="the encoder's dropout while fine-tuning (FinetuneConfig.dropout; default: the "
                             "checkpoint's; the recipe's: 0.1)")
    parser.add_argument("--rdrop", type=float, default=None,
                        help=f"R-Drop weight while fine-tuning (train.rdrop): symmetric KL between two dropout "
                             f"passes; 0: off {recipe}")
    parser.add_argument("--ngram-buckets", type=int, default=0,
                        help="FinetuneConfig.ngram_buckets: a hashed uni- and bigram bag added to the head's logits "
                             "(wide & deep); 0: off (the recipe's: 262144)")
    parser.add_argument("--ngram-lr", type=float, default=None, help=f"the n-gram bag's peak learning rate {recipe}")
    parser.add_argument("--seeds", type=int, default=1,
                        help="fine-tune N times (seeds 1..N, --max-time each); also test their ensemble (mean "
                             "probabilities) and their soup (mean weights)")
    parser.add_argument("--no-holdout", action="store_true",
                        help="train on every training row and test the final checkpoint (no checkpoint choice)")
    parser.add_argument("--folds", action="store_true",
                        help="with --seeds: member k holds out the k-th tenth of the training rows (not all the "
                             "same tenth), so the ensemble learns from every row")
    parser.add_argument("--adapt", type=float, default=0.0,
                        help="seconds of task-adaptive MLM pretraining on the training texts before fine-tuning")
    parser.add_argument("--adapt-lr", type=float, default=None,
                        help=f"peak learning rate of --adapt (default: the {ADAPT_RECIPE} recipe's)")
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
        baseline, baseline_predictions = tfidf_baseline(train, test)
        rows, predictions = lmforge_rows(args.encoder, train, test, Path(args.work) / name, args)
        write_json(str(Path(args.work) / name / "predictions.json"),
                   {"gold": [r["label"] for r in test], "TF-IDF + LogReg": baseline_predictions, **predictions})
        gains = [against_baseline(model, predicted, baseline_predictions, test)
                 for model, predicted in predictions.items()]
        results[name] = {"train": len(train), "test": len(test), "rows": [baseline, *rows], "vs_baseline": gains}
    for name, r in results.items():
        print_table(f"{name}: {r['train']} training rows, {r['test']} test rows (accuracy and macro-F1 in %)",
                    r["rows"], ["accuracy", "macro_f1", "train_s", "adapt_s"])
        print("gain over TF-IDF, points [paired bootstrap 95% interval]; McNemar p:")
        for gain in r["vs_baseline"]:
            print(f"  {gain['model']:<26} accuracy {gain['accuracy']:<24} macro-F1 {gain['macro_f1']:<24} "
                  f"p = {gain['mcnemar_p']:.3f}")
    write_json(args.json, {"encoder": args.encoder, "max_time": args.max_time, "options": vars(args),
                           "results": results})


if __name__ == "__main__":
    main()
