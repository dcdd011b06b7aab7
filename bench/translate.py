"""Translation (Multi30k English -> German): a word-by-word lexicon baseline vs an lmforge encoder-decoder
trained from scratch. Target: >= 35 BLEU on the validation set within 60 minutes of training on CPU.

Data: ``../shared/data/multi30k_en_de``: ``train.{en,de}`` (29,000 pairs; 2% held out to pick the best
checkpoint by target loss) and ``val.{en,de}`` (1,014 pairs, the test set here).
- Baseline: a Dice-coefficient lexicon from sentence co-occurrence in the training pairs (each English
  word, lowercased, becomes the German word maximising 2 c(e, d) / (c(e) + c(d)); unknown words are
  copied), applied word by word in English order.
- lmforge: a byte-level BPE tokenizer (``--vocab-size``, both languages) and the shipped
  ``multi30k-en-de`` recipe (``lmforge finetune --recipe multi30k-en-de``: ``seq2seq-small``, 3 + 3
  layers, width 256, dropout 0.1, 128-token context; the flags below without a default of their own
  take the recipe's value) with ``data.path=train.en, data.target_path=train.de``, for ``--max-time``
  seconds in ``--dtype`` (the recipe's auto: bf16 autocast where the CPU has it) with label smoothing
  ``--label-smoothing`` (and R-Drop ``--rdrop``, default off; BPE-dropout ``--bpe-dropout``, default
  off). Where this script's defaults differ from the recipe they are the first runs' (so the commands in
  docs/benchmarks.md keep their meaning): learned positions (``--model position=rope`` is the recipe's),
  8,192 tokens (``--vocab-size 4096``) and each step's pairs of similar length (``data.group_by_length``;
  ``--no-group-by-length``, the recipe's, draws them at random); a checkpoint every
  ``--save-interval`` steps, and the mean of the last ``--average`` checkpoints
  (``lmforge.training.averaging``) is the result; the checkpoint with the lowest held-out loss is
  reported beside it. Beam ``--beam`` decoding with ``lm.translate``; with ``--tune-decoding`` every
  checkpoint is decoded with beams 4 and 8 and length penalties 0.6, 1.0 and 1.5, and the row with the
  best BLEU on the held-out training pairs (never the validation set) is the result.
  ``--checkpoints DIR ...`` evaluates existing checkpoints instead (with
  ``--ensemble``, also all of them as one ensemble). ``--mbr bleu`` (or ``chrf``) also decodes every
  checkpoint with minimum Bayes risk over the ``--mbr-beam`` (8) hypotheses of its beam.
- ``--bidirectional F``: bidirectional training (Ding et al. 2021): the first F of ``--max-time`` on the
  pairs in both directions (en->de and de->en, constant rate), the rest on en->de from that model.
- ``--members N``: N models trained at the same time from different seeds, each in its own process
  with ``--threads`` CPU threads (default: the cores shared out; on a small CPU one thread per model
  loses less speed than the models gain), each averaged as above, then decoded one by one and as an
  ensemble (``LanguageModel.load_ensemble``: the mean of their next-token probabilities).
The recipe that meets the target: ``--vocab-size 4096 --no-group-by-length --bidirectional 0.33 --model
position=rope`` (rotary instead of learned positions; see docs/benchmarks.md).
Corpus BLEU (sacreBLEU 13a through ``lmforge.evaluation.metrics.bleu``) and chrF on the validation set.

    python bench/translate.py [--max-time 3600] [--vocab-size 8192] [--beam 4] [--dtype auto]
                              [--label-smoothing 0.1] [--rdrop 0] [--bpe-dropout 0] [--no-group-by-length] [--average 5]
                              [--save-interval 500] [--tune-decoding] [--mbr bleu|chrf] [--members 1] [--threads T]
                              [--bidirectional F]
                              [--checkpoints DIR ... [--ensemble]]
                              [--work DIR] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.api import LanguageModel
from lmforge.data.supervised import split_records
from lmforge.evaluation.metrics import bleu, chrf
from lmforge.recipes.catalog import recipe_values
from lmforge.training.averaging import average_checkpoints, last_checkpoints
from tasklib import (
    DATA,
    bpe_tokenizer,
    decode_all,
    model_knobs,
    need,
    print_table,
    recipe_options,
    run_finetune,
    setup_logging,
    write_json,
)

MT = DATA / "multi30k_en_de"
RECIPE = "multi30k-en-de"
FIRST_RUNS_MODEL = {"position": "learned"}  # this script's default model knob (the recipe's: rope); see above
WORD = re.compile(r"\w+|[^\w\s]")


def lines(name: str) -> list[str]:
    return (MT / name).read_text(encoding="utf-8").splitlines()


def dice_lexicon(sources: list[str], targets: list[str]) -> dict[str, str]:
    source_count, target_count, pair_count = Counter(), Counter(), Counter()
    for src, tgt in zip(sources, targets):
        s, t = set(WORD.findall(src.lower())), set(WORD.findall(tgt))
        source_count.update(s)
        target_count.update(t)
        pair_count.update((a, b) for a in s for b in t)
    best: dict[str, tuple[float, str]] = {}
    for (a, b), c in pair_count.items():
        dice = 2 * c / (source_count[a] + target_count[b])
        if dice > best.get(a, (0.0, ""))[0]:
            best[a] = (dice, b)
    return {a: b for a, (_, b) in best.items()}


def word_by_word(lexicon: dict[str, str], text: str) -> str:
    return " ".join(lexicon.get(w.lower(), w) for w in WORD.findall(text))


def train_member(options: dict, threads: int | None) -> tuple[Any, float]:
    """One model's fine-tuning (in its own process when several train at once): (result, seconds)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    setup_logging()
    return run_finetune(options)


def train_members(options: dict, members: int, threads: int | None) -> list[tuple[Any, float]]:
    """``members`` fine-tunings of ``options`` at the same time: seeds 1..members, in WORK/run-member-k."""
    if members == 1:
        return [train_member(options, threads)]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    runs = [{**options, "out": f"{options['out']}-member-{k}", "train": {**options["train"], "seed": k}}
            for k in range(1, members + 1)]
    with ProcessPoolExecutor(members, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(train_member, run, threads) for run in runs]
        return [future.result() for future in futures]


def bidirectional_phase(options: dict, fraction: float, train_en: list[str], train_de: list[str], work: Path,
                        threads: int | None) -> tuple[dict, float]:
    """Bidirectional training (Ding et al. 2021, "Improving NMT by bidirectional training"): the first
    ``fraction`` of the time budget trains on every training pair in both directions (one shared
    vocabulary and embedding; the source's language tells the direction) at a constant rate after
    warm-up; returns the en->de options that continue from that model for the rest of the budget
    (a short warm-up for the fresh optimiser, then the cosine decay), and the phase's seconds. The
    pairs the en->de run holds out are left out of both directions."""
    train_pairs = split_records(list(zip(train_en, train_de)), options["data"]["val_fraction"])[0]
    sources = [en for en, _ in train_pairs] + [de for _, de in train_pairs]
    targets = [de for _, de in train_pairs] + [en for en, _ in train_pairs]
    work.mkdir(parents=True, exist_ok=True)
    (work / "bidirectional.src").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (work / "bidirectional.tgt").write_text("\n".join(targets) + "\n", encoding="utf-8")
    train = options["train"]
    phase = {**options, "out": f"{options['out']}-bidirectional",
             "data": {**options["data"], "path": str(work / "bidirectional.src"),
                      "target_path": str(work / "bidirectional.tgt")},
             "train": {**train, "schedule": "constant", "keep_checkpoints": 1,
                       "max_time": train["max_time"] and train["max_time"] * fraction}}
    result, seconds = train_member(phase, threads)
    rest = {key: value for key, value in options.items() if key not in ("tokenizer", "model")}
    rest["checkpoint"] = str(result.final_checkpoint)
    rest["train"] = {**train, "warmup_steps": min(train["warmup_steps"], 50),
                     "max_time": train["max_time"] and train["max_time"] * (1 - fraction)}
    return rest, seconds


def _step(checkpoint: Path) -> int:
    import json

    return json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("step", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = f"(default: the {RECIPE} recipe's)"
    parser.add_argument("--max-time", type=float, default=None, help=f"seconds of training {recipe}")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate {recipe}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"sentence pairs per step {recipe}")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                        help="steps of pairs of similar length (data.group_by_length): less padding (the "
                             "recipe: off)")
    parser.add_argument("--warmup", type=int, default=None, help=f"warm-up steps {recipe}")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="BPE vocabulary of both languages (the recipe's: 4096)")
    parser.add_argument("--model", action="append", default=[], metavar="KNOB=VALUE",
                        help="a model knob over the recipe's (seq2seq-small, 128-token context), e.g. --model "
                             "n_embd=128 --model dropout=0.3; positions are learned unless --model position=rope "
                             "(the recipe's)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--dtype", default=None, help=f"training precision: auto, bf16 (autocast) or fp32 {recipe}")
    parser.add_argument("--label-smoothing", type=float, default=None, help=f"train.label_smoothing {recipe}")
    parser.add_argument("--rdrop", type=float, default=None,
                        help=f"R-Drop weight (train.rdrop): symmetric KL between two dropout passes; 0: off {recipe}")
    parser.add_argument("--bpe-dropout", type=float, default=None,
                        help="BPE-dropout of the training pairs (data.bpe_dropout): chance of skipping a merge; "
                             f"0: off {recipe}")
    parser.add_argument("--average", type=int, default=None,
                        help="average the last N checkpoints (1: none; default: the recipe's keep_checkpoints)")
    parser.add_argument("--save-interval", type=int, default=None, help=f"steps between checkpoints {recipe}")
    parser.add_argument("--work", default="/tmp/lmforge-tasks/translate")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 8 steps, 50 validation sentences")
    parser.add_argument("--checkpoints", nargs="+", default=None, metavar="DIR",
                        help="evaluate these checkpoints instead of training (e.g. WORK/run/checkpoints/best)")
    parser.add_argument("--tune-decoding", action="store_true",
                        help="try beam 4/8 x length penalty 0.6/1.0/1.5, choose by held-out training-pair BLEU")
    parser.add_argument("--members", type=int, default=1,
                        help="models trained at once (different seeds), decoded alone and as an ensemble")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per model (default: the cores shared out among --members)")
    parser.add_argument("--mbr", action="append", default=[], choices=("bleu", "chrf"),
                        help="also decode every checkpoint with minimum Bayes risk over the beam's hypotheses, "
                             "with this utility (repeatable)")
    parser.add_argument("--mbr-beam", type=int, default=8, help="the beam (candidates) of --mbr decoding")
    parser.add_argument("--ensemble", action="store_true", help="with --checkpoints: also decode them as one ensemble")
    parser.add_argument("--bidirectional", type=float, default=0.0, metavar="FRACTION",
                        help="train on the pairs in both directions (en->de and de->en) for this fraction of "
                             "--max-time, then on en->de only from that checkpoint (Ding et al. 2021); 0: off")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.members < 1:
        parser.error("--members must be at least 1")
    if not 0.0 <= args.bidirectional < 1.0:
        parser.error("--bidirectional must be a fraction in [0, 1)")
    if args.bidirectional and args.members > 1:
        parser.error("--bidirectional trains one model: leave out --members")
    if args.bidirectional and args.checkpoints:
        parser.error("--bidirectional is a way of training: it does not apply to --checkpoints")
    if args.threads is None and args.members > 1:
        args.threads = max(1, (os.cpu_count() or 1) // args.members)
    need(MT)
    setup_logging()
    work = Path(args.work)
    train_en, train_de, val_en, val_de = lines("train.en"), lines("train.de"), lines("val.en"), lines("val.de")
    if args.quick:
        val_en, val_de = val_en[:50], val_de[:50]

    start = time.perf_counter()
    lexicon = dice_lexicon(train_en, train_de)
    outputs = [word_by_word(lexicon, s) for s in val_en]
    rows = [{"model": "Dice lexicon, word by word", "BLEU": bleu(outputs, val_de), "chrF": chrf(outputs, val_de),
             "train_s": time.perf_counter() - start}]

    tokenizer = bpe_tokenizer(work / f"tokenizer-{args.vocab_size}", train_en + train_de, args.vocab_size)
    options = recipe_options(
        RECIPE, quick=args.quick, tokenizer=str(tokenizer), out=str(work / "run"),
        model={**FIRST_RUNS_MODEL, **model_knobs(args.model)},
        data={"path": str(MT / "train.en"), "target_path": str(MT / "train.de"),
              "group_by_length": args.group_by_length, "bpe_dropout": args.bpe_dropout},
        train={"max_time": args.max_time, "lr": args.lr, "batch_size": args.batch_size, "warmup_steps": args.warmup,
               "dtype": args.dtype, "label_smoothing": args.label_smoothing, "rdrop": args.rdrop,
               "save_interval": args.save_interval, "keep_checkpoints": args.average})
    val_fraction, args.average = options["data"]["val_fraction"], options["train"]["keep_checkpoints"]
    if args.max_time is None:  # the recipe's budget, for the report
        args.max_time = recipe_values(RECIPE, "finetune")["train"]["max_time"]
    if args.quick:
        options["model"].update(n_layer=1, n_decoder_layer=1, n_embd=64)
        options["train"].update(save_interval=2)  # checkpoints at steps 2, 4, 6 and final (8)
        args.average = min(args.average, 4)
    if args.checkpoints:
        checkpoints: dict[str, Any] = {f"checkpoint {c}": Path(c) for c in args.checkpoints}
        if args.ensemble:
            checkpoints[f"ensemble of the {len(args.checkpoints)} checkpoints"] = [Path(c) for c in args.checkpoints]
        seconds, steps = None, None
    else:
        phase_seconds = 0.0
        if args.bidirectional:
            options, phase_seconds = bidirectional_phase(options, args.bidirectional, train_en, train_de, work,
                                                         args.threads)
        trained = train_members(options, args.members, args.threads)
        seconds = max(s for _, s in trained) + phase_seconds
        steps = "/".join(str(result.step) for result, _ in trained)
        checkpoints, averages = {}, []
        for k, (result, _) in enumerate(trained):
            member = f"model {k + 1}, " if args.members > 1 else ""
            checkpoints[f"{member}best held-out loss (step {_step(result.best_checkpoint)})"] = result.best_checkpoint
            if args.average > 1:
                averaged = average_checkpoints(last_checkpoints(result.run_dir, args.average),
                                               work / f"averaged{'-' + str(k + 1) if args.members > 1 else ''}")
                checkpoints[f"{member}mean of the last {args.average} checkpoints"] = averaged
                averages.append(averaged)
        if args.members > 1:
            bests = [result.best_checkpoint for result, _ in trained]
            checkpoints[f"ensemble of the {args.members} best held-out loss checkpoints"] = bests
            if averages:
                checkpoints[f"ensemble of the {args.members} means of the last {args.average}"] = averages
    held_out = split_records(list(zip(train_en, train_de)), val_fraction)[1]  # what the fine-tuning held out
    if args.quick:
        held_out = held_out[:50]
    grid = [(beam, penalty, None) for beam in (4, 8) for penalty in (0.6, 1.0, 1.5)] if args.tune_decoding else \
        [(args.beam, 1.0, None)]
    grid += [(args.mbr_beam, 1.0, utility) for utility in args.mbr]
    chosen, chosen_bleu = None, -1.0
    for name, checkpoint in checkpoints.items():
        lm = LanguageModel.load_ensemble(checkpoint, device="cpu") if isinstance(checkpoint, list) else \
            LanguageModel.load(checkpoint, device="cpu")
        for beam, penalty, utility in grid:  # decoding options are judged on held-out training pairs, never on val
            options = {"beam_size": beam, "length_penalty": penalty, "max_new_tokens": 64,
                       **({"mbr": utility} if utility else {})}
            held_bleu = bleu(decode_all(lm.translate, [s for s, _ in held_out], **options), [t for _, t in held_out])
            start = time.perf_counter()
            outputs = decode_all(lm.translate, val_en, **options)
            rows.append({"model": f"lmforge seq2seq, {name}, beam {beam}, length penalty {penalty}"
                                  + (f", MBR ({utility})" if utility else ""),
                         "held_out_BLEU": held_bleu, "BLEU": bleu(outputs, val_de), "chrF": chrf(outputs, val_de),
                         "train_s": seconds, "decode_s": time.perf_counter() - start, "steps": steps})
            if held_bleu > chosen_bleu:
                chosen, chosen_bleu = rows[-1], held_bleu
    chosen["model"] += " (chosen)"
    print_table(f"Multi30k en->de: {len(train_en)} training pairs, {len(val_en)} validation sentences "
                f"(target: >= 35 BLEU; the chosen row: best BLEU on the {len(held_out)} held-out training pairs)", rows,
                ["held_out_BLEU", "BLEU", "chrF", "train_s", "decode_s", "steps"])
    for src, out, ref in list(zip(val_en, outputs, val_de))[:3]:
        print(f"  {src}\n    -> {out}\n    ref {ref}")
    write_json(args.json, {"max_time": args.max_time, "rows": rows, "target_bleu": 35.0, "chosen": chosen["model"],
                           "met": chosen["BLEU"] >= 35.0})


if __name__ == "__main__":
    main()
