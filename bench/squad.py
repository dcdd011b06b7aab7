"""Extractive QA on SQuAD v1.1: the SQuAD paper's sliding-window baseline vs lmforge's MLM encoder
fine-tuned as a span extractor.

Data: ``../shared/data/squad_v1.1/dev_shared.jsonl`` (36 articles) split by article: sorted by title,
every 6th article is evaluated (6 articles), the other 30 train (bench/tasklib.py). The pretraining
of bench/task_pretrain.py saw the contexts of the 30 training articles only.
- Baseline (Rajpurkar et al. 2016, after Richardson et al. 2013's MCTest sliding window): every span of
  1-``--max-span`` words inside one sentence that shares no word with the question is a candidate; its
  score is the sum, over the distinct question words found in the ``--window`` words on each side of it,
  of ``log(1 + 1 / count of the word in the context)`` (rare words count more). Ties go to the longer,
  then the earlier span. No training; nothing is tuned on the evaluation articles.
- lmforge: the encoder fine-tuned from the shipped ``squad-qa`` recipe (``lmforge finetune ENCODER
  --recipe squad-qa``: 256-token windows of ``bos question eos context eos``, ``data.stride`` 64, 16
  windows per step) for ``--max-time`` seconds (default: the recipe's 420); every 10th training
  question is its validation set. EM/F1 on the evaluation articles through
  ``lmforge.evaluation.evaluate(lm, "qa", ...)`` (the same ``squad_scores`` as the baseline's).
  ``--question-match`` (the default; ``--no-question-match`` turns it off) gives the span extractor
  DrQA's exact-match input feature (``FinetuneConfig.question_match``); ``--dtype`` is the fine-tuning
  precision (default: the recipe's auto, bf16 autocast where the CPU has it).

    python bench/squad.py --encoder /tmp/lmforge-tasks/pretrain/mlm [--max-time 420] [--work DIR]
                          [--no-question-match] [--dtype bf16] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections import Counter
from pathlib import Path

from lmforge.api import LanguageModel
from lmforge.evaluation import evaluate
from lmforge.evaluation.metrics import squad_scores
from lmforge.recipes.catalog import recipe_values
from tasklib import (
    DATA,
    need,
    print_table,
    recipe_options,
    run_finetune,
    setup_logging,
    split_off,
    squad,
    write_json,
    write_jsonl,
)

WORD = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")
RECIPE = "squad-qa"
STOP = set("a an the of in on at to for by with from and or is are was were be been it its this that these those "
           "as what which who whom whose when where why how did do does ? , . ' \" ( ) ;".split())


def sliding_window_answer(question: str, context: str, window: int, max_span: int) -> str:
    words = [(m.group(), m.start(), m.end()) for m in WORD.finditer(context)]
    lower = [w.lower() for w, _, _ in words]
    counts = Counter(lower)
    asked = {w.lower() for w in WORD.findall(question)} - STOP
    weight = {w: math.log(1 + 1 / counts[w]) for w in asked if w in counts}
    sentence = [0] * len(words)  # sentence number of each word
    for i in range(1, len(words)):
        sentence[i] = sentence[i - 1] + (words[i - 1][0] in ".!?")
    best, best_key = "", None
    for i in range(len(words)):
        for j in range(i + 1, min(i + max_span, len(words)) + 1):
            span = lower[i:j]
            if sentence[j - 1] != sentence[i] or any(w in asked for w in span) or all(w in STOP for w in span):
                break
            around = set(lower[max(0, i - window):i]) | set(lower[j:j + window])
            score = sum(weight[w] for w in around if w in weight)
            key = (score, j - i, -i)
            if best_key is None or key > best_key:
                best, best_key = context[words[i][1]:words[j - 1][2]], key
    return best


def baseline(records: list[dict], window: int, max_span: int) -> dict:
    start = time.perf_counter()
    predictions = [sliding_window_answer(r["question"], r["context"], window, max_span) for r in records]
    seconds = time.perf_counter() - start
    scores = squad_scores(predictions, [r["answers"]["text"] for r in records])
    return {"model": "sliding window", "exact_match": scores["exact_match"], "f1": scores["f1"], "train_s": 0.0,
            "answer_s": seconds}


def lmforge_qa(encoder: str, train: list[dict], test: list[dict], work: Path, args: argparse.Namespace) -> dict:
    fit, val = split_off(train)
    options = recipe_options(
        RECIPE, quick=args.quick, checkpoint=encoder, out=str(work / "run"), question_match=args.question_match,
        data={"path": str(write_jsonl(work / "train.jsonl", fit)),
              "val_path": str(write_jsonl(work / "val.jsonl", val)),
              "stride": 16 if args.quick else None},  # the quick encoder has 64-token windows
        train={"max_time": args.max_time, "lr": args.lr, "dtype": args.dtype})
    result, seconds = run_finetune(options)
    # the recipe's values, for the report
    args.max_time = args.max_time or recipe_values(RECIPE, "finetune")["train"]["max_time"]
    args.question_match, args.dtype = options["question_match"], options["train"]["dtype"]
    lm = LanguageModel.load(result.best_checkpoint, device="cpu")
    report = evaluate(lm, "qa", str(write_jsonl(work / "eval.jsonl", test)), progress=False)
    return {"model": "lmforge span extractor", "exact_match": report["metrics"]["exact_match"],
            "f1": report["metrics"]["f1"], "train_s": seconds, "answer_s": report["seconds"], "steps": result.step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="/tmp/lmforge-tasks/pretrain/mlm", help="bench/task_pretrain.py's run")
    recipe = f"(default: the {RECIPE} recipe's)"
    parser.add_argument("--max-time", type=float, default=None, help=f"seconds of fine-tuning {recipe}")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate {recipe}")
    parser.add_argument("--question-match", action=argparse.BooleanOptionalAction, default=None,
                        help=f"the exact-match input feature (FinetuneConfig.question_match) {recipe}")
    parser.add_argument("--dtype", default=None, choices=("auto", "fp32", "bf16"),
                        help=f"fine-tuning precision {recipe}")
    parser.add_argument("--window", type=int, default=8, help="baseline: words on each side of a candidate")
    parser.add_argument("--max-span", type=int, default=4, help="baseline: longest candidate, in words")
    parser.add_argument("--work", default="/tmp/lmforge-tasks/squad")
    parser.add_argument("--quick", action="store_true", help="8 fine-tuning steps, 100 evaluation questions")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    need(DATA / "squad_v1.1", Path(args.encoder))
    setup_logging()
    train, test = squad("train"), squad("eval")
    if args.quick:
        test = test[:100]
    rows = [baseline(test, args.window, args.max_span),
            lmforge_qa(args.encoder, train, test, Path(args.work), args)]
    titles = sorted({r["title"] for r in test})
    print_table(f"SQuAD v1.1: {len(train)} training questions (30 articles), {len(test)} evaluation questions "
                f"({len(titles)} articles: {', '.join(titles)})", rows, ["exact_match", "f1", "train_s", "answer_s"])
    write_json(args.json, {"encoder": args.encoder, "max_time": args.max_time, "question_match": args.question_match,
                           "dtype": args.dtype, "eval_articles": titles,
                           "train_questions": len(train), "eval_questions": len(test), "rows": rows})


if __name__ == "__main__":
    main()
