"""The serving engine's decoding step on CPU with each decoding-attention path lmforge has: its C kernel
(``lmforge.models.cpu_attention``, the default where a C compiler is found), torch's fused kernel in the
model's dtype, and torch's fused kernel in fp32 on upcast copies (``single_query_attention``, the
fallback for bf16 on CPUs without AMX).

Builds the gpt2-10m preset with random weights (or takes ``--checkpoint``), loads it in ``--dtype``
(default bf16), submits ``rows`` greedy requests of the serving benchmark's prompts (16-128 tokens, 64
new tokens each) to one engine per path, and steps them in turn, so that all see the same machine load;
the prefill steps are left out. Prints the median decoding-step time of each, the C kernel's speed-up
over the faster torch path, and whether all produced the same tokens.

    python bench/decode_attention.py [--rows 1,4,16,32] [--dtype bf16|fp32] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.api import LanguageModel
from lmforge.config import SamplingConfig
from lmforge.inference.engine import Engine
from lmforge.models import cpu_attention, decoder
from serve import build_checkpoint, make_prompts

# path -> (is the C kernel used, the smallest key read that torch's path upcasts to fp32)
PATHS = {"C kernel": (True, math.inf), "torch fused": (False, math.inf),
         "torch fp32 upcast": (False, decoder.UPCAST_MIN_KEYS)}


def use(path: str) -> None:
    native, upcast = PATHS[path]
    decoder.kernel_available = cpu_attention.kernel_available if native else (lambda dtype: False)
    decoder.UPCAST_KEYS = upcast


def step_times(lm: LanguageModel, prompts: list[list[int]], rows: int) -> tuple[dict[str, float], bool]:
    """Median ms per decoding step of each attention path over the same ``rows`` requests."""
    engines, handles = {}, {}
    for path in PATHS:
        use(path)
        engines[path] = Engine(lm.model, lm.tokenizer, max_batch_size=max(rows, 1), prefix_cache_tokens=0)
        handles[path] = [engines[path].submit(prompts[i % len(prompts)],
                                              SamplingConfig(max_new_tokens=64, temperature=0, ignore_eos=True))
                         for i in range(rows)]
        engines[path].step()  # the prefills and the first decoding step
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    while any(engine.num_running for engine in engines.values()):
        for path, engine in engines.items():
            use(path)
            start = time.perf_counter()
            engine.step()
            times[path].append(time.perf_counter() - start)
    same = len({tuple(tuple(h.result().token_ids) for h in hs) for hs in handles.values()}) == 1
    return {path: statistics.median(t) * 1000 for path, t in times.items()}, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,32")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    if not cpu_attention.kernel_available(torch.float32):
        raise SystemExit("error: the C kernel is unavailable here (no C compiler, or LMFORGE_NATIVE_KERNELS=0)")
    saved = decoder.kernel_available, decoder.UPCAST_KEYS
    with tempfile.TemporaryDirectory() as work:
        checkpoint = args.checkpoint or build_checkpoint(Path(work), quick=False)
        lm = LanguageModel.load(checkpoint, dtype=args.dtype)
        prompts = [lm.tokenizer.encode(p) for p in make_prompts(checkpoint, 64)]
        header = "".join(f"{path + ' ms':>22}" for path in PATHS)
        print(f"{args.dtype}\n{'rows':>4}{header}{'speed-up':>10}  same tokens")
        try:
            for rows in (int(r) for r in args.rows.split(",")):
                ms, same = step_times(lm, prompts, rows)
                torch_best = min(ms["torch fused"], ms["torch fp32 upcast"])
                cells = "".join(f"{ms[path]:>22.2f}" for path in PATHS)
                print(f"{rows:>4}{cells}{torch_best / ms['C kernel']:>9.2f}x  {same}", flush=True)
        finally:
            decoder.kernel_available, decoder.UPCAST_KEYS = saved


if __name__ == "__main__":
    main()
