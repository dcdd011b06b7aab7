"""Model FLOPs utilisation of lmforge training on this machine, for the ~25M presets.

Measures the machine's matrix-multiply peak (fp32 and bf16, large square matmuls) in the same run,
then trains each preset for a few steps through lmforge's own pieces (model, objective, optimiser,
autocast) and reports tokens/s, achieved TFLOP/s (``flops_per_token`` x tokens/s) and MFU.

    python bench/mfu.py [--presets gpt2-25m,llama-25m] [--steps 4] [--batch-size 4] [--block-size 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.device import autocast
from lmforge.models.decoder import DecoderLM
from lmforge.training.objectives import causal_lm_loss
from lmforge.training.optim import build_optimizer

VOCAB = 8192


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) product."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def training_rate(preset: str, dtype: torch.dtype, steps: int, batch: int, block: int) -> tuple[float, float]:
    """(tokens/s, FLOPs per token at this context) of training steps with lmforge's pieces."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_dict({"preset": preset, "vocab_size": VOCAB, "block_size": block})).train()
    device = torch.device("cpu")
    optimizer = build_optimizer(model, TrainConfig(), device)
    data = torch.randint(0, VOCAB, (batch, block + 1))
    batch_data = {"input_ids": data[:, :-1], "labels": data[:, 1:]}

    def step() -> None:
        with autocast(device, dtype):
            loss = causal_lm_loss(model, batch_data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * block / (time.perf_counter() - start), model.flops_per_token()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="gpt2-25m,llama-25m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=512)
    args = parser.parse_args()
    peaks = {dtype: matmul_peak(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"matmul peak on this machine ({torch.get_num_threads()} threads): fp32 {peaks[torch.float32] / 1e12:.3f} "
          f"TFLOP/s, bf16 {peaks[torch.bfloat16] / 1e12:.3f} TFLOP/s")
    print(f"{'preset':<10} {'dtype':<5} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6}   "
          f"(batch {args.batch_size} x {args.block_size}, vocabulary {VOCAB:,})")
    for preset in args.presets.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            rate, flops = training_rate(preset, dtype, args.steps, args.batch_size, args.block_size)
            achieved = rate * flops
            name = "fp32" if dtype == torch.float32 else "bf16"
            print(f"{preset:<10} {name:<5} {rate:>9,.0f} {achieved / 1e12:>8.3f} {achieved / peaks[dtype]:>6.1%}")


if __name__ == "__main__":
    main()
