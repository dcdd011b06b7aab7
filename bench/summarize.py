"""Summarization (email -> subject line) on AESLC: the lead baseline vs an lmforge encoder-decoder
pretrained by denoising the training emails, then fine-tuned on their subject lines.

Data: ``../shared/data/aeslc``: ``train.jsonl`` (10,000 emails; every 50th is the validation set that
picks the best checkpoint by target loss) and ``dev.jsonl`` (500 emails, the test set here).
- Baseline (lead-N): the first N words of the email, N = the mean subject length of the training set
  in words, rounded (4).
- lmforge: a byte-level BPE tokenizer (8,192) trained on the training emails and subjects, and the
  shipped recipes ``seq2seq-denoise`` and ``aeslc-summarization``: a ``seq2seq-small`` model (3 + 3
  layers, width 256) with ``--block`` (128) token windows and pointer-generator copying
  (``pointer_generator``; ``--model pointer_generator=false`` turns it off). First ``--pretrain-time``
  seconds of BART-style denoising (``lmforge pretrain --recipe seq2seq-denoise``: spans of the training
  email bodies, no subjects, replaced by a mask token, the window rebuilt), which teaches the decoder to
  read and copy the email; then ``--max-time`` seconds of ``lmforge finetune CHECKPOINT --recipe
  aeslc-summarization`` from that checkpoint (an email keeps its start); ``--pretrain-time 0`` trains
  the same model from scratch instead. Both in ``--dtype``; the flags' defaults are the recipes' (600 s
  each, lr 1e-3, auto precision: bf16 autocast where the CPU has it). Subjects decoded with
  ``lm.summarize`` (beam ``--beam``, up to 32 tokens).
ROUGE-1/2/L F (``lmforge.evaluation.metrics.rouge``, rouge-score with stemming) against the original
subject line, and against the three human annotations of the dev set (best of three).

    python bench/summarize.py [--pretrain-time 600] [--max-time 600] [--beam 4] [--dtype bf16] [--work DIR]
                              [--model KNOB=VALUE ...] [--seed N] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import mean

from lmforge.api import LanguageModel
from lmforge.config import PretrainConfig
from lmforge.data.shards import prepare
from lmforge.evaluation.metrics import rouge
from lmforge.options import build_dataclass
from lmforge.recipes.catalog import recipe_values
from lmforge.recipes.pretrain import pretrain
from tasklib import (
    DATA,
    aeslc,
    bpe_tokenizer,
    decode_all,
    given,
    model_knobs,
    need,
    print_table,
    recipe_options,
    run_finetune,
    setup_logging,
    split_off,
    write_json,
    write_jsonl,
)

PRETRAIN_RECIPE, RECIPE = "seq2seq-denoise", "aeslc-summarization"


def scores(name: str, outputs: list[str], test: list[dict], seconds: float, decode_s: float) -> dict:
    subject = rouge(outputs, [r["summary"] for r in test])
    human = rouge(outputs, [r["annotations"] for r in test])
    return {"model": name, "R1": subject["rouge1"], "R2": subject["rouge2"], "RL": subject["rougeL"],
            "RL_human": human["rougeL"], "train_s": seconds, "decode_s": decode_s,
            "samples": [{"prediction": o, "subject": r["summary"]} for o, r in zip(outputs[:5], test)]}


def lmforge_summarizer(train: list[dict], test: list[dict], work: Path, args: argparse.Namespace) -> dict:
    fit, val = split_off(train, every=50)
    tokenizer = bpe_tokenizer(work / "tokenizer", [r["document"] + "\n" + r["summary"] for r in fit], 8192)
    # the model of the denoising recipe (seq2seq-small with copying), with this run's knobs
    model = {**recipe_values(PRETRAIN_RECIPE, "pretrain")["model"], **given({"block_size": args.block}),
             **model_knobs(args.model)}
    if args.quick:
        model.update(n_layer=1, n_decoder_layer=1, n_embd=64)
    start = time.perf_counter()
    pretrained = denoising_pretrain(fit, tokenizer, model, work, args)
    pretrain_s = time.perf_counter() - start
    options = recipe_options(
        RECIPE, quick=args.quick, out=str(work / "run"),
        data={"path": str(write_jsonl(work / "train.jsonl", fit)),
              "val_path": str(write_jsonl(work / "val.jsonl", val))},
        train={"max_time": args.max_time, "lr": args.lr, "dtype": args.dtype, "seed": args.seed})
    options.update({"checkpoint": str(pretrained)} if pretrained else {"tokenizer": str(tokenizer), "model": model})
    result, seconds = run_finetune(options)
    lm = LanguageModel.load(result.best_checkpoint, device="cpu")
    start = time.perf_counter()
    outputs = decode_all(lm.summarize, [r["document"] for r in test], beam_size=args.beam, max_new_tokens=32)
    name = "denoising-pretrained" if pretrained else "from scratch"
    row = scores(f"lmforge seq2seq, {name} (beam {args.beam})", outputs, test, seconds, time.perf_counter() - start)
    return {**row, "steps": result.step, "pretrain_s": pretrain_s}


def denoising_pretrain(fit: list[dict], tokenizer: Path, model: dict, work: Path,
                       args: argparse.Namespace) -> Path | None:
    """``--pretrain-time`` seconds of denoising on the training email bodies: the checkpoint (None: no
    pretraining)."""
    if args.pretrain_time == 0:
        return None
    corpus = write_jsonl(work / "pretrain.jsonl", [{"text": r["document"]} for r in fit if r["document"].strip()])
    prepare([corpus], tokenizer, work / "pretrain-data", val_fraction=0.02, progress=False)
    options = recipe_options(
        PRETRAIN_RECIPE, "pretrain", quick=args.quick, data=str(work / "pretrain-data"), out=str(work / "pretrain"),
        train={"max_time": args.pretrain_time, "lr": args.lr, "dtype": args.dtype, "seed": args.seed})
    options["model"] = model
    return pretrain(build_dataclass(PretrainConfig, options)).final_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-time", type=float, default=None,
                        help=f"seconds of denoising (0: none; default: the {PRETRAIN_RECIPE} recipe's)")
    parser.add_argument("--max-time", type=float, default=None,
                        help=f"seconds of fine-tuning (default: the {RECIPE} recipe's)")
    parser.add_argument("--dtype", default=None,
                        help="training precision: auto, bf16 (autocast) or fp32 (default: the recipes')")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of both (default: the recipes')")
    parser.add_argument("--block", type=int, default=None,
                        help=f"source (and target) tokens (default: the {PRETRAIN_RECIPE} recipe's)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--model", action="append", default=[], metavar="KNOB=VALUE",
                        help="a model knob over seq2seq-small with pointer_generator=true, e.g. --model dropout=0.2"
                             " (--model pointer_generator=false: no copying)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the model's initialisation and data order (default: the recipes', 1)")
    parser.add_argument("--work", default="/tmp/lmforge-tasks/summarize")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 8 steps, 50 test emails")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    need(DATA / "aeslc")
    setup_logging()
    if args.pretrain_time is None:  # the recipes' budgets, for the report
        args.pretrain_time = recipe_values(PRETRAIN_RECIPE, "pretrain")["train"]["max_time"]
    if args.max_time is None:
        args.max_time = recipe_values(RECIPE, "finetune")["train"]["max_time"]
    train, test = aeslc("train"), aeslc("dev")
    if args.quick:
        test = test[:50]
    n = round(mean(len(r["summary"].split()) for r in train))
    start = time.perf_counter()
    lead = [" ".join(r["document"].split()[:n]) for r in test]
    rows = [scores(f"lead-{n}", lead, test, 0.0, time.perf_counter() - start),
            lmforge_summarizer(train, test, Path(args.work), args)]
    print_table(f"AESLC: {len(train)} training emails, {len(test)} dev emails; ROUGE F (0-100) against the "
                f"original subject (R1, R2, RL) and the best of 3 human subjects (RL_human)", rows,
                ["R1", "R2", "RL", "RL_human", "pretrain_s", "train_s", "decode_s"])
    for r in rows[-1]["samples"]:
        print(f"  {r['prediction']!r:<50} subject: {r['subject']!r}")
    write_json(args.json, {"pretrain_time": args.pretrain_time, "max_time": args.max_time, "lead_words": n,
                           "rows": rows})


if __name__ == "__main__":
    main()
