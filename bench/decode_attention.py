"""The serving engine's decoding step in bf16 on CPU: attention in torch's fused bf16 kernel against
lmforge's fp32 path for many cached keys (``lmforge.models.decoder.single_query_attention``).

Builds the gpt2-10m preset with random weights (or takes ``--checkpoint``), loads it in bf16, submits
``rows`` greedy requests of the serving benchmark's prompts (16-128 tokens, 64 new tokens each) to two
engines, and steps them alternately, so that both see the same machine load; the prefill steps are left
out. Prints the median decoding-step time of each and their ratio, and whether both produced the same
tokens. Which is faster depends on the CPU: lmforge upcasts only where it lacks AMX (``UPCAST_KEYS``).

    python bench/decode_attention.py [--rows 1,4,16,32] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from lmforge.api import LanguageModel
from lmforge.config import SamplingConfig
from lmforge.device import cpu_has_amx
from lmforge.inference.engine import Engine
from lmforge.models import decoder
from serve import build_checkpoint, make_prompts

PATHS = {"fused bf16": math.inf, "fp32 upcast": decoder.UPCAST_MIN_KEYS}  # UPCAST_KEYS: the smallest read upcast


def step_times(lm: LanguageModel, prompts: list[list[int]], rows: int) -> tuple[dict[str, float], bool]:
    """Median ms per decoding step of each attention path over the same ``rows`` requests."""
    engines = {}
    for name in PATHS:
        engines[name] = Engine(lm.model, lm.tokenizer, max_batch_size=max(rows, 1))
        for i in range(rows):
            engines[name].submit(prompts[i % len(prompts)],
                                 SamplingConfig(max_new_tokens=64, temperature=0, ignore_eos=True))
        engines[name].step()  # the prefills and the first decoding step
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    handles = {name: list(engine._running) for name, engine in engines.items()}
    while any(engine.num_running for engine in engines.values()):
        for name, engine in engines.items():
            decoder.UPCAST_KEYS = PATHS[name]
            start = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - start)
    same = len({tuple(tuple(r.token_ids) for r in requests) for requests in handles.values()}) == 1
    return {name: statistics.median(t) * 1000 for name, t in times.items()}, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,32")
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    upcast = decoder.UPCAST_KEYS
    with tempfile.TemporaryDirectory() as work:
        checkpoint = args.checkpoint or build_checkpoint(Path(work), quick=False)
        lm = LanguageModel.load(checkpoint, dtype="bf16")
        prompts = [lm.tokenizer.encode(p) for p in make_prompts(checkpoint, 64)]
        chosen = "fused bf16 (the CPU has AMX)" if cpu_has_amx() else "fp32 upcast (no AMX)"
        print(f"lmforge's choice on this CPU: {chosen}")
        print(f"{'rows':>4} {'fused bf16 ms':>14} {'fp32 upcast ms':>15} {'speed-up':>9}  same tokens")
        try:
            for rows in (int(r) for r in args.rows.split(",")):
                ms, same = step_times(lm, prompts, rows)
                print(f"{rows:>4} {ms['fused bf16']:>14.2f} {ms['fp32 upcast']:>15.2f} "
                      f"{ms['fused bf16'] / ms['fp32 upcast']:>8.2f}x  {same}", flush=True)
        finally:
            decoder.UPCAST_KEYS = upcast


if __name__ == "__main__":
    main()
