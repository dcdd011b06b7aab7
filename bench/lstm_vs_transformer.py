"""An LSTM vs a decoder transformer with the same parameter budget and the same wall-clock budget.

Both are trained with ``lmforge.recipes.pretrain.pretrain`` (next-token loss, AdamW, the same learning
rate, batch and 128-token windows, the learning rate decaying over ``--max-time`` seconds each) and
evaluated on the same validation tokens (every 128-token window of the val split, the whole split).
- LSTM: ``family: lstm``, 2 layers, width 320 (tied embeddings).
- Transformer: ``family: decoder``, 4 layers, width 192, 4 heads, learned positions (tied embeddings).
Both have about 1.7M parameters without embeddings (the table gives the totals).

Data (../shared/data):
- ``tinyshakespeare/input.txt``, character level: the first 90% trains, the last 10% is validation
  (nanoGPT's split).
- ``lm_ptb_wikitext2/ptb.valid.txt``: there is no PTB training split here, so the first 90% (bytes, cut
  at a line) trains and the last 10% is validation; byte-level BPE with 2,048 tokens trained on the
  training part only. Perplexity is per BPE token (not per word), so it is not comparable with
  published word-level PTB numbers.

    python bench/lstm_vs_transformer.py [--max-time 150] [--datasets shakespeare,ptb] [--work DIR]
                                        [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lmforge.config import ModelConfig, PretrainConfig, TrainConfig
from lmforge.models import build_model
from lmforge.recipes.pipeline import tokenize_and_prepare
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import Tokenizer
from tasklib import DATA, need, print_table, setup_logging, write_json

DATASETS = {"shakespeare": (DATA / "tinyshakespeare" / "input.txt", "char", None, 0.1),
            "ptb": (DATA / "lm_ptb_wikitext2" / "ptb.valid.txt", "bpe", 2048, 0.2)}  # file, tokenizer, vocab, dropout
MODELS = {"LSTM 2x320": dict(family="lstm", n_layer=2, n_embd=320),
          "transformer 4x192": dict(family="decoder", n_layer=4, n_head=4, n_embd=192)}


def prepare_data(name: str, work: Path) -> Path:
    path, kind, vocab, _ = DATASETS[name]
    text = path.read_text(encoding="utf-8")
    train_part = text[:text.rfind("\n", 0, int(len(text) * 0.9)) + 1]  # roughly prepare()'s byte split
    _, data = tokenize_and_prepare([path], work, kind, vocab, val_fraction=0.1, tokenizer_texts=[train_part],
                                   reuse_tokenizer=True)
    return data


def run(name: str, family: dict, data: Path, out: Path, dropout: float, args: argparse.Namespace) -> dict:
    model = ModelConfig(block_size=128, dropout=dropout, **family)
    train = TrainConfig(max_steps=None, max_time=args.max_time, lr=args.lr, warmup_steps=50, batch_size=32,
                        eval_interval=0, eval_windows=None, final_eval_windows=None, save_interval=0,
                        log_interval=20, progress=False, device="cpu", dtype="fp32", seed=1)
    if args.quick:
        train.max_time, train.max_steps, train.warmup_steps = None, 5, 1
    result = pretrain(PretrainConfig(data=str(data), out=str(out), model=model, train=train))
    model.vocab_size = Tokenizer.load(data.parent / "tokenizer").vocab_size
    params = build_model(model)
    loss = result.metrics["val_loss"]
    return {"model": name, "params_M": params.num_parameters() / 1e6,
            "nonemb_M": params.num_parameters(non_embedding=True) / 1e6, "steps": result.step,
            "train_s": result.elapsed, "val_loss": loss, "val_ppl": math.exp(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", type=float, default=150.0, help="seconds of training per model and dataset")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--datasets", default="shakespeare,ptb")
    parser.add_argument("--work", default="/tmp/lmforge-tasks/lstm")
    parser.add_argument("--quick", action="store_true", help="5 steps per model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    need(*(DATASETS[n][0] for n in args.datasets.split(",")))
    setup_logging()
    results = {}
    for name in args.datasets.split(","):
        work = Path(args.work) / name
        data = prepare_data(name, work)
        rows = [run(label, family, data, work / label.split()[0].lower(), DATASETS[name][3], args)
                for label, family in MODELS.items()]
        results[name] = rows
    for name, rows in results.items():
        print_table(f"{name}: {args.max_time:.0f} s of training each; validation loss and perplexity on the same "
                    f"tokens ({DATASETS[name][1]} tokenizer)", rows,
                    ["params_M", "nonemb_M", "steps", "val_loss", "val_ppl"], compare="ratio")
    write_json(args.json, {"max_time": args.max_time, "results": results})


if __name__ == "__main__":
    main()
