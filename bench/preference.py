"""DPO and reward models on real preference data, and DPO on arithmetic (issue #33).

Part 1, ``../shared/data/preference``: Anthropic's hh-rlhf harmless-base pairs (``\\n\\nHuman: ...
\\n\\nAssistant:`` prompts) and LLaMA-Factory's DPO demo set (as chat messages, through the chat
template). A fifth of each (by the SHA-1 of the pair's id) is held out. A small BPE Llama is
pretrained on the training conversations (chosen and rejected alike) and Alpaca's instructions, SFT'd
on the chosen replies, then trained by DPO (``DIR/dpo``) and, separately, as a reward model
(``DIR/reward``). On the held-out pairs: preference accuracy of the DPO policy's implicit reward, of
the reward model, and of the baseline, the SFT model's log-likelihood ratio of chosen to rejected;
95% bootstrap intervals.

Part 2, arithmetic: a model SFT'd on ``What is 37 + 48?`` problems (bench/arithmetic_tasks.py; the
reserved problems are never trained on) samples answers to training problems; pairs of a correct
answer (chosen: its own right sample where it wrote one, else the worked answer) and one of its own
wrong samples (rejected) train it by DPO (``DIR/dpo-arithmetic``). Held-out exact match before and
after. ``--part`` runs one part; its numbers are merged into an existing ``DIR/results.json``.

    python bench/preference.py --out runs/preference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from arithmetic_tasks import cpu_flags, initial_checkpoint, problems, sft_config, worked_answer, write_jsonl
from lmforge.alignment.config import PreferenceConfig
from lmforge.alignment.preference_training import dpo, reply_logps, train_reward
from lmforge.alignment.rewards import extract_answer
from lmforge.api import LanguageModel
from lmforge.config import PretrainConfig
from lmforge.data.preferences import collate_pairs, encode_pairs
from lmforge.data.shards import prepare
from lmforge.inference.prompts import prompt_head
from lmforge.options import build_dataclass
from lmforge.recipes.finetune import finetune
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = dict(family="decoder", block_size=256, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, norm="rmsnorm",
             mlp="swiglu", position="rope", bias=False, tie_embeddings=True, dropout=0.0)


def held_out(row: dict) -> bool:
    return int(hashlib.sha1(str(row["id"]).encode()).hexdigest(), 16) % 5 == 0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def demo_as_chat(row: dict) -> dict:
    return {"id": row["id"], "prompt": [{"role": "user", "content": row["prompt"]}], "chosen": row["chosen"],
            "rejected": row["rejected"]}


def preference_config(checkpoint: Path, data: Path, val: Path, out: Path, minutes: float, lr: float = 1e-4,
                      **extra) -> PreferenceConfig:
    return build_dataclass(PreferenceConfig, {
        "checkpoint": str(checkpoint), "data": str(data), "val_data": str(val), "out": str(out), **extra,
        "train": {"lr": lr, "batch_size": 8, "max_steps": None, "max_time": minutes * 60,
                  "eval_interval": 100, "eval_windows": 128, "save_interval": 0, "log_interval": 10,
                  "dtype": "auto", "device": "cpu", "progress": False}})


@torch.no_grad()
def pair_logps(lm: LanguageModel, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Summed reply log-probabilities (chosen, rejected) of each pair under a causal LM."""
    pairs = encode_pairs(rows, lm.tokenizer, lm.context_length, prompt_head(lm.tokenizer))
    pad = lm.tokenizer.pad_id or 0
    chosen, rejected = [], []
    for start in range(0, len(pairs), 16):
        chunk = pairs[start:start + 16]
        logps, _ = reply_logps(lm.model, collate_pairs(chunk, pad))
        chosen += logps[:len(chunk)].tolist()
        rejected += logps[len(chunk):].tolist()
    return np.array(chosen), np.array(rejected)


def accuracy_with_interval(correct: np.ndarray, resamples: int = 2000) -> dict:
    rng = np.random.default_rng(0)
    means = correct[rng.integers(0, len(correct), (resamples, len(correct)))].mean(axis=1)
    return {"accuracy": float(correct.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "pairs": len(correct)}


def evaluate_preferences(out: Path, rows: list[dict]) -> dict:
    sft = LanguageModel.load(out / "sft", device="cpu")
    policy = LanguageModel.load(out / "dpo", device="cpu")
    rm = LanguageModel.load(out / "reward", device="cpu")
    sft_c, sft_r = pair_logps(sft, rows)
    dpo_c, dpo_r = pair_logps(policy, rows)
    prompts = [r["prompt"] for r in rows]
    scores = zip(rm.reward(prompts, [r["chosen"] for r in rows]), rm.reward(prompts, [r["rejected"] for r in rows]))
    # ties (identical replies' scores) count as wrong
    return {"sft log-likelihood ratio": accuracy_with_interval((sft_c - sft_r > 0).astype(float)),
            "dpo implicit reward": accuracy_with_interval(((dpo_c - sft_c) - (dpo_r - sft_r) > 0).astype(float)),
            "reward model": accuracy_with_interval(np.array([float(c > r) for c, r in scores]))}


def real_preferences(out: Path, args: argparse.Namespace) -> dict:
    hh = [r for r in read_jsonl(DATA / "preference" / "hh_rlhf_harmless_base.jsonl")
          if r["chosen"].strip() and r["rejected"].strip()]  # a few pairs have an empty reply
    demo = [demo_as_chat(r) for r in read_jsonl(DATA / "preference" / "llamafactory_dpo_en_demo.jsonl")]
    train = [r for r in hh if not held_out(r)] + [r for r in demo if not held_out(r)]
    hh_val, demo_val = [r for r in hh if held_out(r)], [r for r in demo if held_out(r)]
    random.Random(0).shuffle(train)
    data = out / "data"
    keep = ("prompt", "chosen", "rejected")
    write_jsonl(data / "train.jsonl", [{k: r[k] for k in keep} for r in train])
    write_jsonl(data / "val.jsonl", [{k: r[k] for k in keep} for r in hh_val + demo_val])

    texts = [r["chosen_full"] for r in hh if not held_out(r)] + [r["rejected_full"] for r in hh if not held_out(r)]
    texts += [f"{r['prompt'][0]['content']}\n\n{r['chosen']}" for r in demo if not held_out(r)]
    texts += [f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in read_jsonl(DATA / "alpaca" /
                                                                                             "train.jsonl")]
    (data / "corpus.txt").write_text("\n\n".join(texts), encoding="utf-8")
    tokenizer = Tokenizer.train(iter(texts), kind="bpe", vocab_size=4096)
    tokenizer.save(out / "tokenizer")
    prepare([data / "corpus.txt"], out / "tokenizer", data / "shards", val_fraction=0.02, progress=False)
    if not (out / "lm" / "checkpoints" / "final").is_dir():  # a rerun reuses a finished pretraining
        pretrain(build_dataclass(PretrainConfig, {
            "data": str(data / "shards"), "out": str(out / "lm"), "model": MODEL,
            "train": {"lr": 2e-3, "batch_size": 16, "max_steps": None, "max_time": args.lm_minutes * 60,
                      "eval_interval": 500, "save_interval": 0, "dtype": "auto", "device": "cpu",
                      "progress": False}}))
    write_jsonl(data / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train
                                     if isinstance(r["prompt"], str)])  # the hh-rlhf pairs' chosen replies
    sft = sft_config(out / "lm", data / "sft.jsonl", data / "sft.jsonl", out / "sft", args.sft_minutes, 5e-4, 0)
    sft.data.val_path, sft.data.val_fraction, sft.train.batch_size = None, 0.05, 16
    finetune(sft)
    dpo(preference_config(out / "sft", data / "train.jsonl", data / "val.jsonl", out / "dpo", args.minutes, beta=0.1))
    train_reward(preference_config(out / "sft", data / "train.jsonl", data / "val.jsonl", out / "reward",
                                   args.minutes, lr=2e-4))
    return {"hh-rlhf harmless (held out)": evaluate_preferences(out, hh_val),
            "dpo demo, chat (held out)": evaluate_preferences(out, demo_val),
            "train_pairs": len(train)}


def arithmetic(out: Path, args: argparse.Namespace) -> dict:
    """DPO on a model's own wrong answers against correct ones: held-out exact match before and after."""
    eval_set = problems(500, 10_000, evaluation=True)
    train = problems(30_000, 0, evaluation=False)
    tune = problems(256, 20_000, evaluation=False, exclude={p["prompt"] for p in train})
    data = out / "arithmetic"
    rows = [{"prompt": p["prompt"], "completion": worked_answer(p)} for p in train]
    write_jsonl(data / "sft.jsonl", rows)
    write_jsonl(data / "sft_val.jsonl", [{"prompt": p["prompt"], "completion": worked_answer(p)} for p in tune])
    init = initial_checkpoint(out / "arithmetic-init", [r["prompt"] + r["completion"] for r in rows])
    finetune(sft_config(init, data / "sft.jsonl", data / "sft_val.jsonl", out / "sft-arithmetic",
                        args.arithmetic_sft_minutes, 2e-3, 0))
    lm = LanguageModel.load(out / "sft-arithmetic", device="cpu")

    def exact_match(model: LanguageModel, problems_: list[dict]) -> float:
        completions = model.complete([p["prompt"] for p in problems_], max_new_tokens=16, temperature=0.0)
        return sum(extract_answer(c.text) == p["answer"] for c, p in zip(completions, problems_)) / len(problems_)

    pairs = []
    for p in train[:4000]:
        samples = lm.complete(p["prompt"], max_new_tokens=16, temperature=1.0, num_samples=4, seed=len(pairs))
        right = [s.text for s in samples if extract_answer(s.text) == p["answer"]]
        wrong = [s.text for s in samples if extract_answer(s.text) != p["answer"]]
        if wrong:  # the model's own right answer where it wrote one (on-policy), else the worked answer
            pairs.append({"prompt": p["prompt"], "chosen": (right or [worked_answer(p)])[0], "rejected": wrong[0]})
    val_pairs = []
    for p in tune:
        sample = lm.complete(p["prompt"], max_new_tokens=16, temperature=1.0, seed=7)[0]
        if extract_answer(sample.text) != p["answer"]:
            val_pairs.append({"prompt": p["prompt"], "chosen": worked_answer(p), "rejected": sample.text})
    write_jsonl(data / "pairs.jsonl", pairs)
    write_jsonl(data / "val_pairs.jsonl", val_pairs)
    dpo(preference_config(out / "sft-arithmetic", data / "pairs.jsonl", data / "val_pairs.jsonl",
                          out / "dpo-arithmetic", args.minutes, beta=0.1, lr=1e-4))
    before = exact_match(lm, eval_set)
    after = exact_match(LanguageModel.load(out / "dpo-arithmetic", device="cpu"), eval_set)
    return {"pairs": len(pairs), "held_out_problems": len(eval_set), "exact_match_sft": before,
            "exact_match_dpo": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--lm-minutes", type=float, default=5.0)
    parser.add_argument("--sft-minutes", type=float, default=3.0)
    parser.add_argument("--arithmetic-sft-minutes", type=float, default=20.0,
                        help="SFT of the arithmetic model (it must get some problems right for DPO to work on)")
    parser.add_argument("--minutes", type=float, default=4.0, help="budget of each DPO / reward-model run")
    parser.add_argument("--part", choices=("all", "real", "arithmetic"), default="all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if not (DATA / "preference").is_dir():
        raise SystemExit(f"needs {DATA / 'preference'}")
    started = time.time()
    results = args.out / "results.json"
    summary: dict = json.loads(results.read_text()) if results.is_file() and args.part != "all" else {}
    summary.update({"cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads()})
    if args.part in ("all", "real"):
        summary["real"] = real_preferences(args.out, args)
    if args.part in ("all", "arithmetic"):
        summary["arithmetic"] = arithmetic(args.out, args)
    summary["wall_minutes"] = (time.time() - started) / 60
    results.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
