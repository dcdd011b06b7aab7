"""Classifier-reward steering (issue #33): a small LM trained on review text is steered toward positive
continuations by RL with a sentiment classifier's P(positive) as the reward, for two values of beta.

* the LM: a BPE Llama pretrained for ``--lm-minutes`` on IMDB's unlabelled reviews, cut into
  lower-cased sentences (``../shared/data/imdb/unsup.jsonl.gz``): ``DIR/lm``;
* the reward: that LM fine-tuned as a sentiment classifier on SST-2 (``../shared/data/sst2``):
  ``DIR/reward-classifier``;
* the judge, trained independently of the reward (other data, other model): a classifier trained from
  scratch on the UCI sentiment sentences and Amazon review titles (``../shared/data/reviews_extra``):
  ``DIR/judge``;
* RL (GRPO, ``classifier:positive@DIR/reward-classifier``) from the LM for ``--minutes`` per beta:
  ``DIR/rl-beta-B``.

For the LM and each policy, on held-out prompts (the first words of sentences never trained on):
the judge's positive rate of sampled continuations, the KL to the reference (the LM) estimated on
the policy's own samples (sum over the continuation's tokens of log pi - log ref, averaged), and the
perplexity of the continuations under the reference.

    python bench/rl_steering.py --out runs/rl-steering
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

from arithmetic_tasks import cpu_flags, write_jsonl
from lmforge.alignment.config import RLConfig
from lmforge.alignment.losses import sequence_logprobs
from lmforge.alignment.policy_optimization import rl
from lmforge.api import LanguageModel
from lmforge.config import FinetuneConfig, PretrainConfig
from lmforge.data.shards import prepare
from lmforge.options import build_dataclass
from lmforge.recipes.finetune import finetune
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LM = dict(family="decoder", block_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, norm="rmsnorm",
          mlp="swiglu", position="rope", bias=False, tie_embeddings=True, dropout=0.0)
NEW_TOKENS = 20


def sentences(limit: int) -> list[str]:
    """Lower-cased sentences of IMDB's unlabelled reviews (8 to 40 words), punctuation spaced as SST-2's."""
    out = []
    with gzip.open(DATA / "imdb" / "unsup.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"].replace("<br />", " ").lower()
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                sentence = re.sub(r"([.,!?;:()\"])", r" \1 ", sentence)
                words = sentence.split()
                if 8 <= len(words) <= 40:
                    out.append(" ".join(words))
            if len(out) >= limit:
                return out[:limit]
    return out


def sst2() -> list[dict[str, str]]:
    rows = (DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [{"text": s, "label": "positive" if y == "1" else "negative"} for s, y in (r.rsplit("\t", 1) for r in rows)]


def judge_rows() -> list[dict[str, str]]:
    rows = []
    for name, field in (("uci_sentiment_sentences.jsonl", "text"), ("amazon_multidomain_sentiment.jsonl", "title")):
        for line in (DATA / "reviews_extra" / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            text = re.sub(r"([.,!?;:()\"])", r" \1 ", str(record.get(field) or "").lower())
            if text.strip() and record.get("label") in (0, 1):
                rows.append({"text": " ".join(text.split()), "label": "positive" if record["label"] else "negative"})
    return rows


def classifier_config(out: Path, data: Path, minutes: float, **extra) -> FinetuneConfig:
    return build_dataclass(FinetuneConfig, {
        "out": str(out), "task": "classification", "data": {"path": str(data), "val_fraction": 0.1}, **extra,
        "train": {"lr": 1e-3 if "checkpoint" not in extra else 2e-4, "batch_size": 32, "max_steps": None,
                  "max_time": minutes * 60, "eval_interval": 200, "save_interval": 0, "log_interval": 50,
                  "dtype": "auto", "device": "cpu", "progress": False, "best_metric": "accuracy"}})


@torch.no_grad()
def continuation_logprobs(lm: LanguageModel, prompt_ids: list[list[int]], completions: list[list[int]]) -> list[float]:
    """Sum of log-probabilities of each completion after its prompt under ``lm``."""
    sums = []
    for prompt, completion in zip(prompt_ids, completions):
        ids = torch.tensor([prompt + completion])
        logprobs = sequence_logprobs(lm.model(ids), ids)[0]
        sums.append(float(logprobs[len(prompt) - 1:].sum()))
    return sums


def measure(policy: LanguageModel, reference: LanguageModel, judge: LanguageModel, prompts: list[str]) -> dict:
    completions = policy.complete(prompts, max_new_tokens=NEW_TOKENS, temperature=1.0, num_samples=4, seed=7)
    texts = [c.text for c in completions]
    prompt_ids = [policy.encode_prompt(p)[0] for p in prompts for _ in range(4)]
    ids = [list(c.token_ids) + ([policy.tokenizer.eos_id] if c.eos else []) for c in completions]
    mine = continuation_logprobs(policy, prompt_ids, ids)
    ref = continuation_logprobs(reference, prompt_ids, ids)
    tokens = sum(len(i) for i in ids)
    labels = judge.classify(texts)
    positive = sum(c.label == "positive" for c in labels) / len(labels)
    return {"judge_positive_rate": positive, "kl_to_reference": sum(m - r for m, r in zip(mine, ref)) / len(ids),
            "reference_perplexity": math.exp(-sum(ref) / max(tokens, 1)), "example": prompts[0] + " |" + texts[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--lm-minutes", type=float, default=5.0)
    parser.add_argument("--classifier-minutes", type=float, default=2.0)
    parser.add_argument("--minutes", type=float, default=4.0, help="RL budget per beta")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.02, 0.3))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    out, started = args.out, time.time()
    for path in (DATA / "imdb" / "unsup.jsonl.gz", DATA / "sst2" / "train.tsv", DATA / "reviews_extra"):
        if not path.exists():
            raise SystemExit(f"needs {path}")

    text = sentences(120_000)
    random.Random(0).shuffle(text)
    held_out, corpus = text[:2000], text[2000:]
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    tokenizer = Tokenizer.train(iter(corpus + [r["text"] for r in sst2()]), kind="bpe", vocab_size=4096)
    tokenizer.save(out / "tokenizer")
    prepare([data / "corpus.txt"], out / "tokenizer", data / "shards", val_fraction=0.02, progress=False)
    pretrain(build_dataclass(PretrainConfig, {
        "data": str(data / "shards"), "out": str(out / "lm"), "model": LM,
        "train": {"lr": 2e-3, "batch_size": 32, "max_steps": None, "max_time": args.lm_minutes * 60,
                  "eval_interval": 500, "save_interval": 0, "dtype": "auto", "device": "cpu", "progress": False}}))

    write_jsonl(data / "sst2.jsonl", sst2())
    finetune(classifier_config(out / "reward-classifier", data / "sst2.jsonl", args.classifier_minutes,
                               checkpoint=str(out / "lm"), pooling="last"))
    write_jsonl(data / "judge.jsonl", judge_rows())
    finetune(classifier_config(out / "judge", data / "judge.jsonl", args.classifier_minutes,
                               tokenizer=str(out / "tokenizer"), model={"preset": "gpt2-tiny"}, ngram_buckets=4096))

    def prompt(sentence: str) -> str:
        return " ".join(sentence.split()[:3])

    write_jsonl(data / "prompts.jsonl", [{"prompt": prompt(s)} for s in corpus[:4000]])
    write_jsonl(data / "val_prompts.jsonl", [{"prompt": prompt(s)} for s in corpus[4000:4064]])
    eval_prompts = [prompt(s) for s in held_out[:200]]
    reference = LanguageModel.load(out / "lm", device="cpu")
    judge = LanguageModel.load(out / "judge", device="cpu")
    results = {"lm": measure(reference, reference, judge, eval_prompts)}
    for beta in args.betas:
        run = out / f"rl-beta-{beta:g}"
        rl(build_dataclass(RLConfig, {
            "checkpoint": str(out / "lm"), "prompts": str(data / "prompts.jsonl"),
            "val_prompts": str(data / "val_prompts.jsonl"),
            "reward": [f"classifier:positive@{out / 'reward-classifier'}"], "beta": beta, "num_generations": 8,
            "max_new_tokens": NEW_TOKENS, "out": str(run), "sample_interval": 50,
            "train": {"lr": 5e-5, "batch_size": 64, "max_steps": None, "max_time": args.minutes * 60,
                      "eval_interval": 0, "eval_windows": 64, "save_interval": 0, "log_interval": 5,
                      "dtype": "auto", "device": "cpu", "progress": False}}))
        results[f"rl beta {beta:g}"] = measure(LanguageModel.load(run, device="cpu"), reference, judge, eval_prompts)
    last_line = (out / "judge" / "metrics.jsonl").read_text().splitlines()[-1]
    judge_accuracy = json.loads(last_line).get("final_val_accuracy")
    summary = {"cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(), "betas": list(args.betas),
               "judge_val_accuracy": judge_accuracy, "models": results, "wall_minutes": (time.time() - started) / 60}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'model':<14} {'judge positive':>14} {'KL to ref':>10} {'ref ppl':>8}")
    for name, r in results.items():
        print(f"{name:<14} {r['judge_positive_rate']:14.3f} {r['kl_to_reference']:10.2f} "
              f"{r['reference_perplexity']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
