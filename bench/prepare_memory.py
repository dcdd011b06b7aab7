"""Peak memory of ``lmforge prepare`` on a large corpus: it must stream, not load the corpus.

Writes a corpus of the requested size (repeating the embedded default corpus, as one plain-text file
and as a JSONL file), trains a small BPE tokenizer, then runs ``lmforge prepare`` in a child process
and reports its peak resident memory (``ru_maxrss``) next to the corpus size, and the tokens/s.

    python bench/prepare_memory.py [--megabytes 1024] [--out /tmp/lmforge-prepare-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmforge.corpus import default_documents
from lmforge.tokenizer import Tokenizer


def write_corpus(path: Path, megabytes: int, jsonl: bool) -> int:
    documents = list(default_documents())
    target = megabytes * 1024 * 1024
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for text in documents:
                line = json.dumps({"text": text}) + "\n" if jsonl else text + "\n\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--out", default="/tmp/lmforge-prepare-bench")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    Tokenizer.train(default_documents(), kind="bpe", vocab_size=4096).save(out / "tok")
    print(f"{'input':<12} {'corpus MB':>10} {'peak RSS MB':>12} {'seconds':>8} {'tokens':>14} {'tokens/s':>10}")
    for kind in ("txt", "jsonl"):
        corpus = out / f"corpus.{kind}"
        size = write_corpus(corpus, args.megabytes, jsonl=kind == "jsonl")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "lmforge", "prepare", "--input", str(corpus), "--tokenizer",
                                 str(out / "tok"), "--out", str(out / f"data-{kind}"), "--quiet"],
                                capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode:
            sys.exit(result.stderr)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
        meta = json.loads((out / f"data-{kind}" / "meta.json").read_text())
        tokens = meta["train_tokens"] + meta["val_tokens"]
        print(f"{kind:<12} {size / 2**20:>10,.0f} {peak_mb:>12,.0f} {seconds:>8.1f} {tokens:>14,} "
              f"{tokens / seconds:>10,.0f}")
        corpus.unlink()


if __name__ == "__main__":
    main()
