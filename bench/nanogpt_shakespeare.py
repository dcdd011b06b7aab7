"""The nanoGPT reference run on tinyshakespeare (character level), start to finish, with lmforge.

Reference (../shared/data/tinyshakespeare/README.md, measured on the same kind of 2-core machine):
4 layers, 4 heads, width 128, context 64, batch 12, 2,000 iterations, lr 1e-3 cosine to 1e-4 with
100 warm-up steps, AdamW (0.9, 0.99), weight decay 0.1, clip 1.0, no dropout, no biases: val loss
1.898 over the whole val split in 123 s wall at ~14,000 tokens/s.

This script times the whole job the same way (tokenizer, data preparation, training, evaluation on
the whole val split: ``lmforge.recipes.pipeline.pretrain_from_text``) for the GPT-2 flavour with those
settings, the shipped ``shakespeare-char`` recipe (``lmforge pretrain --recipe shakespeare-char``),
then shows what the Llama flavour and a tuned Llama (the ``shakespeare-char-llama`` recipe) reach within
the same 60-second wall budget.

    python bench/nanogpt_shakespeare.py [--runs gpt2,llama,best] [--out /tmp/nanogpt-bench]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from lmforge.options import deep_merge
from lmforge.recipes.catalog import recipe_values
from lmforge.recipes.pipeline import pretrain_from_text

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
REFERENCE = {"val_loss": 1.898, "wall_s": 123.0, "tokens_per_sec": 14_000}
TARGET_WALL = 60.0

RUNS = {  # a shipped recipe and what this run changes in it
    # the reference settings, GPT-2 flavour (learned positions, LayerNorm, GELU, tied embeddings)
    "gpt2": ("shakespeare-char", {}),
    # the same settings, Llama flavour (RoPE, RMSNorm, SwiGLU, 2 key/value heads, untied head)
    "llama": ("shakespeare-char", {"model": {"preset": "llama-tiny", "n_kv_head": 2}}),
    # best found (a small sweep of width, context, batch and rate): the Llama flavour with a higher
    # rate and batch 16, trained on a time budget that keeps the whole job under 60 s
    "best": ("shakespeare-char-llama", {}),
}


def run(name: str, out: Path) -> dict:
    recipe, changes = RUNS[name]
    values = deep_merge(recipe_values(recipe, "pretrain"), deep_merge(changes, {"train": {"progress": False}}))
    start = time.monotonic()
    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    result = pretrain_from_text([DATA], work, values, kind="char", val_fraction=0.1)  # tokenizer, data, run
    wall = time.monotonic() - start
    return {"run": name, "val_loss": result.metrics["val_loss"], "wall_s": wall, "steps": result.step,
            "train_s": result.elapsed, "tokens_per_sec": result.tokens / result.elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="gpt2,llama,best")
    parser.add_argument("--out", default="/tmp/lmforge-nanogpt-bench")
    args = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"skipped: {DATA} is not there (the shared datasets sit beside the project)")
    rows = [run(name, Path(args.out)) for name in args.runs.split(",")]
    print(f"\nreference: val loss {REFERENCE['val_loss']:.3f}, {REFERENCE['wall_s']:.0f} s wall, "
          f"{REFERENCE['tokens_per_sec']:,} tokens/s")
    print(f"{'run':<6} {'steps':>6} {'val loss':>9} {'wall s':>7} {'train s':>8} {'tokens/s':>9} "
          f"{'speed-up':>9} {'targets (loss <= 1.90, wall <= 60 s)':>38}")
    for r in rows:
        speedup = r["tokens_per_sec"] / REFERENCE["tokens_per_sec"]
        ok = r["val_loss"] <= 1.90 and r["wall_s"] <= TARGET_WALL
        print(f"{r['run']:<6} {r['steps']:>6} {r['val_loss']:>9.4f} {r['wall_s']:>7.1f} {r['train_s']:>8.1f} "
              f"{r['tokens_per_sec']:>9,.0f} {speedup:>8.2f}x {'met' if ok else 'NOT met':>38}")


if __name__ == "__main__":
    main()
