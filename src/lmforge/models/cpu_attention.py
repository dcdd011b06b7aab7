"""Decoding attention on CPU in C (``cpu_attention.c``): one query per row over that row's own cached keys.

torch 2.13's fused CPU attention kernel is slow for what a decoding step asks of it: one query per
row over many cached keys. In bf16 on a CPU without AMX it is 1.5-2.5x slower than in fp32, and the
fp32 detour costs copies of every cached key and value (measured in docs/benchmarks.md). This kernel
reads the cache in place, in bf16 or fp32, computes in fp32, and reads only each row's own positions,
so a row's result does not depend on the rest of the batch (bit-identical alone or batched).

The C file is compiled on first use (:mod:`lmforge.models.native`). Without a compiler (or with
``LMFORGE_NATIVE_KERNELS=0``) :func:`kernel_available` is False and the models use torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from lmforge.models import native

__all__ = ["decode_attention", "kernel_available"]

SUPPORTED = {torch.bfloat16: 1, torch.float32: 0}  # element dtype -> the kernel's `bf16` flag


def kernel_available(dtype: torch.dtype) -> bool:
    """Whether :func:`decode_attention` runs here for ``dtype`` elements (compiles it on first call)."""
    return dtype in SUPPORTED and _library() is not None


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, lengths: Tensor,
                     new: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for one query per row, row b over its first ``lengths[b]`` positions.

    q: (B, H, 1, D), any strides with contiguous D; keys, values: (N >= B, Hkv, S, D) contiguous cache
    tensors of q's dtype (rows past B are not touched); lengths: (B,) int64 on the CPU, 1 <= lengths[b]
    <= S (the kernel clamps them into [0, S] and never writes outside the cache); ``new``: the step's
    (B, Hkv, 1, D) key and value, written at position ``lengths[b] - 1`` of each row first (else they
    must be there already). Returns (B, 1, H * D), contiguous. Needs :func:`kernel_available`.
    """
    B, H, _, D = q.shape
    k_new, v_new = new if new is not None else (None, None)
    if not (keys.is_contiguous() and values.is_contiguous() and keys.dtype == values.dtype == q.dtype
            and q.stride(-1) == 1 and lengths.dtype == torch.int64 and lengths.shape == (B,)
            and lengths.is_contiguous() and keys.shape[0] >= B):
        raise ValueError("decode_attention needs contiguous caches of the queries' dtype and (B,) int64 lengths")
    if new is not None and not (k_new.shape == v_new.shape == (B, keys.shape[1], 1, D) and k_new.stride(-1) == 1
                                and v_new.stride(-1) == 1 and k_new.dtype == v_new.dtype == q.dtype):
        raise ValueError("decode_attention's new keys and values must be (B, Hkv, 1, D) of the queries' dtype")
    out = torch.empty(B, 1, H * D, dtype=q.dtype)
    _library().lmforge_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1),
        *_pointer_and_strides(k_new), *_pointer_and_strides(v_new),
        keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
        lengths.data_ptr(), out.data_ptr(), B, H, keys.shape[1], D, keys.shape[2], native.kernel_threads(),
        SUPPORTED[q.dtype])
    return out


def _pointer_and_strides(t: Tensor | None) -> tuple[int | None, int, int]:
    return (None, 0, 0) if t is None else (t.data_ptr(), t.stride(0), t.stride(1))


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = native.load("cpu_attention")
    if library is None:
        return None
    function = library.lmforge_decode_attention
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, i64, i64, pointer, i64, i64, pointer, i64, i64, pointer, pointer, i64, i64, i64,
                         pointer, pointer, i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    function.restype = None
    return library
