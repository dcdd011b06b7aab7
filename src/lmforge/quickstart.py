"""``lmforge quickstart``: the whole path in one command, offline, in minutes.

corpus -> byte-level BPE tokenizer -> token shards -> pretraining (time budget) -> validation
perplexity and loss plot -> samples -> where everything went and what to try next.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lmforge.config import ModelConfig, PretrainConfig, TrainConfig
from lmforge.corpus import describe, write_default_corpus
from lmforge.data.shards import prepare
from lmforge.data.sources import expand_inputs, iter_texts
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

VOCAB_SIZE = 4096
SAMPLE_PROMPTS = ("The for statement", "A list is", "This module provides")
# Chosen by measurement for ~5 minutes on a 2-core CPU: a 3.5M-parameter GPT-2 (no dropout: the
# run sees the corpus ~7 times and validation loss is still falling at the end), context 128.
DEFAULT_MODEL = {"preset": "gpt2-10m", "n_layer": 6, "n_embd": 192, "n_head": 3, "block_size": 128, "dropout": 0.0}


def _say(step: int, total: int, text: str) -> None:
    print(f"[{step}/{total}] {text}", flush=True)


def quickstart(out: str | Path = "runs/quickstart", max_time: float = 300.0, inputs: list[str] | None = None,
               model: str | None = None, samples: tuple[str, ...] = SAMPLE_PROMPTS) -> dict:
    """Run the quickstart; returns a summary (paths and numbers)."""
    from lmforge.api import LanguageModel
    from lmforge.recipes.pretrain import pretrain

    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = 5
    if inputs:
        files = expand_inputs(inputs)
        _say(1, total, f"corpus: {len(files)} file(s) of your own")
        corpus_note = "your text"
    else:
        corpus_file = write_default_corpus(out / "corpus.jsonl")
        files = [corpus_file]
        corpus_note = describe()
        _say(1, total, f"corpus: {corpus_note} -> {corpus_file} ({corpus_file.stat().st_size / 1e6:.1f} MB)")

    tokenizer_dir = out / "tokenizer"
    tokenizer = Tokenizer.train(iter_texts(files), kind="bpe", vocab_size=VOCAB_SIZE)
    tokenizer.save(tokenizer_dir)
    _say(2, total, f"tokenizer: byte-level BPE, {tokenizer.vocab_size:,} tokens -> {tokenizer_dir}")

    data_dir = out / "data"
    meta = prepare(files, tokenizer_dir, data_dir, val_fraction=0.1)
    _say(3, total, f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens -> {data_dir}")

    model_config = ModelConfig.from_dict({"preset": model} if model else DEFAULT_MODEL)
    train_config = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=30, max_steps=None, max_time=max_time,
                               batch_size=32, eval_interval=100, eval_windows=100, save_interval=200)
    run_dir = out / "run"
    _say(4, total, f"pretraining for {max_time:.0f} s -> {run_dir}")
    result = pretrain(PretrainConfig(data=str(data_dir), out=str(run_dir), model=model_config, train=train_config))

    lm = LanguageModel.load(result.best_checkpoint or result.final_checkpoint, device="auto")
    _say(5, total, "samples (temperature 0.8, top-k 40):")
    for prompt in samples:
        text = lm.generate(prompt, max_new_tokens=60, temperature=0.8, top_k=40, seed=0)
        print(f"  > {prompt}{text}".replace("\n", "\n    "))

    metrics = result.metrics
    summary = {"run_dir": str(run_dir), "checkpoint": str(result.best_checkpoint), "val_loss": metrics["val_loss"],
               "val_ppl": metrics["val_ppl"], "steps": result.step, "tokens": result.tokens,
               "seconds": time.monotonic() - started}
    best = result.best_checkpoint
    print()
    print(f"done in {summary['seconds']:.0f} s: {result.step:,} steps, {result.tokens:,} tokens; "
          f"validation loss {metrics['val_loss']:.3f}, perplexity {metrics['val_ppl']:.1f}")
    print(f"  corpus        {files[0] if len(files) == 1 else f'{len(files)} files'}")
    print(f"  tokenizer     {tokenizer_dir / 'tokenizer.json'}")
    print(f"  token shards  {data_dir}")
    print(f"  checkpoints   {run_dir / 'checkpoints'} (best: {best})")
    print(f"  metrics       {run_dir / 'metrics.jsonl'}, TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"  loss plot     {run_dir / 'loss.png'}")
    print("next:")
    print(f"  lmforge generate {run_dir} --prompt \"The while statement\" --max-new-tokens 100 --stream")
    print(f"  lmforge perplexity {run_dir} --input README.md")
    print(f"  lmforge serve {run_dir}            # OpenAI-compatible API at http://127.0.0.1:8000/v1")
    print(f"  lmforge export hf {run_dir} hf-model  # for Hugging Face transformers")
    print(f"  lmforge pretrain --data {data_dir} --model gpt2-baby --out runs/baby --max-time 600")
    return summary
