"""Device and precision choice: ``auto`` means cuda, then mps, then cpu; bf16 where it is native."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from lmforge.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: str = "auto") -> torch.device:
    """The torch device for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no CUDA GPU (is this a CPU build of torch?)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for but is not available on this machine")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles (matrix units for bf16), which change which kernels are faster."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.13; absent: assume not
    return bool(check is not None and check())


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for autocast: ``auto`` is bf16 where native, else fp32."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be auto, fp32, bf16 or fp16, not {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 is for GPUs; on CPU use bf16 or fp32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@contextlib.contextmanager
def _onednn_off() -> Iterator[None]:
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def single_token_kernels(tokens: Tensor, weight: Tensor) -> contextlib.AbstractContextManager:
    """The faster matrix-product kernels for a forward pass over ``tokens`` (B, T) with ``weight``'s
    dtype (or autocast's): on CPU, a bf16 product of a single row (B * T == 1: batch-1 decoding) runs
    2-3x faster in torch's own kernels than in oneDNN's, whose set-up costs ~20 us per call (measured
    in docs/benchmarks.md); both accumulate in fp32 (bit-identical outputs where measured). So oneDNN
    is switched off for such a pass and on again after. The switch is process-wide: a bf16 product in
    another thread meanwhile takes the slower path too, with the same result.
    """
    if tokens.device.type != "cpu" or tokens.numel() != 1:
        return contextlib.nullcontext()
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    return _onednn_off() if dtype == torch.bfloat16 else contextlib.nullcontext()
