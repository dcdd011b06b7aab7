"""Small-batch bf16 linear layers on CPU in C (``cpu_linear.c``), and :class:`Linear`, which uses them.

A decoding step multiplies a few rows (one per sequence) by each weight. oneDNN, torch's bf16 path on
CPU, spends ~25-50 us setting up each such product whatever its size, several times the arithmetic, and
torch's other bf16 kernels are slower still from 4 rows up (docs/benchmarks.md). The C kernel reads the
weight in place (torch's (N, K) layout, nothing packed or copied), multiplies with AVX512-BF16 and sums
each output in fp32 in an order that does not depend on the batch, so a row's result is bit-identical
alone or batched. It is compiled on first use (:mod:`lmforge.models.native`) and is available on CPUs
with AVX512-BF16; elsewhere, and for more than ``MAX_ROWS`` rows, torch's kernels run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch
from torch import Tensor, nn

from lmforge.models import native

__all__ = ["Linear", "MAX_ROWS", "decoding_step", "kernel_available", "linear"]

# Up to this many rows the kernel is faster than oneDNN over a model's layers (bench/linear.py: 1.3-3.4x
# for decoding steps of 1-16 rows; from ~32 rows oneDNN catches up); longer prefills take oneDNN.
MAX_ROWS = 32


def kernel_available() -> bool:
    """Whether :func:`linear` runs here (compiles the kernel on first call)."""
    return _library() is not None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b in bf16 with fp32 sums. x: (..., K) bf16 with a contiguous last dimension and rows
    that one stride reaches; weight: (N, K) contiguous bf16; bias: (N,) contiguous bf16 or None.
    Returns (..., N), contiguous. Needs :func:`kernel_available`; x, weight and bias on the CPU."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)  # a view where x's rows are evenly spaced
    N = weight.shape[0]
    if not (x.dtype == weight.dtype == torch.bfloat16 and weight.shape == (N, K) and weight.is_contiguous()
            and rows.stride(-1) == 1 and (bias is None or (bias.shape == (N,) and bias.is_contiguous()
                                                           and bias.dtype == torch.bfloat16))):
        raise ValueError("linear needs bf16 inputs, a contiguous (N, K) weight and a contiguous (N,) bias")
    out = torch.empty(*x.shape[:-1], N, dtype=torch.bfloat16)
    _library().lmforge_linear(rows.data_ptr(), rows.stride(0), weight.data_ptr(),
                              None if bias is None else bias.data_ptr(), out.data_ptr(),
                              rows.shape[0], N, K, native.kernel_threads())
    return out


def decoding_step(tokens: Tensor, weight: Tensor) -> contextlib.AbstractContextManager:
    """For a forward pass over ``tokens`` (B, T) whose products all run in the kernel (a decoding step,
    T == 1, of at most ``MAX_ROWS`` rows of a bf16 model ``weight`` on CPU, without gradients): torch's
    own small operations on one thread meanwhile (:func:`lmforge.models.native.torch_on_one_thread`)."""
    if (tokens.device.type == "cpu" and tokens.shape[-1] == 1 and tokens.numel() <= MAX_ROWS
            and weight.dtype == torch.bfloat16 and not torch.is_grad_enabled() and kernel_available()):
        return native.torch_on_one_thread()
    return contextlib.nullcontext()


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` (same parameters, same state dict) whose bf16 products of at most
    ``MAX_ROWS`` rows on CPU, without gradients, run in the C kernel of :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        if _native(x, self.weight, self.bias):
            return linear(x, self.weight, self.bias)
        return super().forward(x)


def _native(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() <= MAX_ROWS * x.shape[-1] and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and weight.is_contiguous()
            and (bias is None or bias.is_contiguous()) and kernel_available())


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = native.load("cpu_linear")
    if library is None or not library.lmforge_linear_supported():
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.lmforge_linear.argtypes = [pointer, i64, pointer, pointer, pointer, i64, i64, i64, ctypes.c_int]
    library.lmforge_linear.restype = None
    return library
