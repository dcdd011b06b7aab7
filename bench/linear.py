"""lmforge's small-batch bf16 linear kernel (``lmforge.models.cpu_linear``) against torch's CPU kernels.

For the linear layers of two models (the gpt2-10m preset of the serving benchmark and GPT-2 124M), and
for 1 to 128 rows (a decoding step multiplies one row per sequence), prints the median time of one
product y = x W^T + b in bf16 with: the C kernel, torch's default (oneDNN), and torch's own kernels
with oneDNN switched off (what lmforge used for single rows before); and the kernel's speed-up over the
faster torch kernel. ``lmforge.models.cpu_linear.MAX_ROWS`` is where the kernel stops being faster.

    python bench/linear.py [--rows 1,4,16,32,64,128] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.models.cpu_linear import kernel_available, linear

# (model, layer, out_features, in_features)
LAYERS = [("gpt2-10m", "qkv", 768, 256), ("gpt2-10m", "mlp up", 1024, 256), ("gpt2-10m", "mlp down", 256, 1024),
          ("gpt2-10m", "lm head", 8192, 256), ("gpt2 124M", "qkv", 2304, 768), ("gpt2 124M", "mlp up", 3072, 768),
          ("gpt2 124M", "mlp down", 768, 3072), ("gpt2 124M", "lm head", 50257, 768)]


def median_us(function, args: tuple, repeats: int) -> float:
    for _ in range(5):
        function(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def torch_without_onednn(x, weight, bias):
    torch.backends.mkldnn.enabled = False
    try:
        return F.linear(x, weight, bias)
    finally:
        torch.backends.mkldnn.enabled = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1 or args.repeats < 1:
        parser.error("--rows takes comma-separated counts >= 1, and --repeats a count >= 1")
    if not kernel_available():
        raise SystemExit("the kernel is not available here (no C compiler, or no AVX512-BF16)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median us per product")
    print(f"{'model':<10} {'layer':<9} {'N x K':>11} {'rows':>5} {'kernel':>8} {'oneDNN':>8} {'torch':>8} "
          f"{'speed-up':>9}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for model, layer, n, k in LAYERS:
            weight, bias = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
            bias = None if layer == "lm head" else bias
            for count in rows:
                x = torch.randn(count, k).bfloat16()
                ours = median_us(linear, (x, weight, bias), args.repeats)
                onednn = median_us(F.linear, (x, weight, bias), args.repeats)
                plain = median_us(torch_without_onednn, (x, weight, bias), max(args.repeats // 4, 5))
                print(f"{model:<10} {layer:<9} {f'{n}x{k}':>11} {count:>5} {ours:>8.1f} {onednn:>8.1f} {plain:>8.1f} "
                      f"{min(onednn, plain) / ours:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
