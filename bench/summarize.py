"""Summarization (email -> subject line) on AESLC: the lead baseline vs an lmforge encoder-decoder
pretrained by denoising the training emails, then fine-tuned on their subject lines.

Data: ``../shared/data/aeslc``: ``train.jsonl`` (10,000 emails; every 50th is the validation set that
picks the best checkpoint by target loss) and ``dev.jsonl`` (500 emails, the test set here).
- Baseline (lead-N): the first N words of the email, N = the mean subject length of the training set
  in words, rounded (4).
- lmforge: a byte-level BPE tokenizer (8,192) trained on the training emails and subjects, and a
  ``seq2seq-small`` model (3 + 3 layers, width 256) with ``--block`` (128) token windows and pointer-generator
  copying (``pointer_generator``; ``--model pointer_generator=false`` turns it off). First
  ``--pretrain-time`` seconds of BART-style denoising (``PretrainConfig(objective="denoise")``: spans of
  the training email bodies, no subjects, replaced by a mask token, the window rebuilt), which teaches
  the decoder to read and copy the email; then ``--max-time`` seconds of
  ``FinetuneConfig(task="seq2seq", purpose="summarization")`` from that checkpoint (an email keeps its
  start); ``--pretrain-time 0`` trains from scratch instead. Both in ``--dtype`` (bf16 autocast by
  default). Subjects decoded with ``lm.summarize`` (beam ``--beam``, up to 32 tokens).
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
from lmforge.config import ModelConfig, PretrainConfig, TrainConfig
from lmforge.data.shards import prepare
from lmforge.evaluation.metrics import rouge
from lmforge.recipes.pretrain import pretrain
from tasklib import (
    DATA,
    aeslc,
    bpe_tokenizer,
    decode_all,
    model_knobs,
    need,
    print_table,
    run_finetune,
    setup_logging,
    split_off,
    train_options,
    write_json,
    write_jsonl,
)


def scores(name: str, outputs: list[str], test: list[dict], seconds: float, decode_s: float) -> dict:
    subject = rouge(outputs, [r["summary"] for r in test])
    human = rouge(outputs, [r["annotations"] for r in test])
    return {"model": name, "R1": subject["rouge1"], "R2": subject["rouge2"], "RL": subject["rougeL"],
            "RL_human": human["rougeL"], "train_s": seconds, "decode_s": decode_s,
            "samples": [{"prediction": o, "subject": r["summary"]} for o, r in zip(outputs[:5], test)]}


def lmforge_summarizer(train: list[dict], test: list[dict], work: Path, args: argparse.Namespace) -> dict:
    fit, val = split_off(train, every=50)
    tokenizer = bpe_tokenizer(work / "tokenizer", [r["document"] + "\n" + r["summary"] for r in fit], 8192)
    model = {"preset": "seq2seq-small", "block_size": args.block, "pointer_generator": True, **model_knobs(args.model)}
    if args.quick:
        model.update(n_layer=1, n_decoder_layer=1, n_embd=64)
    start = time.perf_counter()
    pretrained = denoising_pretrain(fit, tokenizer, model, work, args)
    pretrain_s = time.perf_counter() - start
    options = {"task": "seq2seq", "purpose": "summarization", "out": str(work / "run"),
               "data": {"path": str(write_jsonl(work / "train.jsonl", fit)),
                        "val_path": str(write_jsonl(work / "val.jsonl", val))},
               "train": train_options(args.max_time, args.quick, lr=args.lr, batch_size=32, warmup_steps=100,
                                      eval_interval=200, eval_windows=None, weight_decay=0.01, dtype=args.dtype,
                                      seed=args.seed)}
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
    if not args.pretrain_time:
        return None
    corpus = write_jsonl(work / "pretrain.jsonl", [{"text": r["document"]} for r in fit if r["document"].strip()])
    prepare([corpus], tokenizer, work / "pretrain-data", val_fraction=0.02, progress=False)
    train = train_options(args.pretrain_time, args.quick, lr=args.lr, batch_size=32, warmup_steps=100,
                          eval_interval=200, eval_windows=64, weight_decay=0.01, dtype=args.dtype, seed=args.seed)
    config = PretrainConfig(data=str(work / "pretrain-data"), out=str(work / "pretrain"),
                            model=ModelConfig.from_dict(model), train=TrainConfig(**train), objective="denoise")
    return pretrain(config).final_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-time", type=float, default=600.0, help="seconds of denoising (0: none)")
    parser.add_argument("--max-time", type=float, default=600.0, help="seconds of fine-tuning")
    parser.add_argument("--dtype", default="bf16", help="training precision: bf16 (autocast) or fp32")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--block", type=int, default=128, help="source (and target) tokens")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--model", action="append", default=[], metavar="KNOB=VALUE",
                        help="a model knob over seq2seq-small with pointer_generator=true, e.g. --model dropout=0.2"
                             " (--model pointer_generator=false: no copying)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the model's initialisation and data order")
    parser.add_argument("--work", default="/tmp/lmforge-tasks/summarize")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 8 steps, 50 test emails")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    need(DATA / "aeslc")
    setup_logging()
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
