"""Device and precision selection."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

from lmforge.device import autocast, bf16_supported, cpu_has_amx, select_device, select_dtype, single_token_kernels
from lmforge.errors import ConfigError


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")


def test_unavailable_or_unknown_devices_are_config_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA"):
        select_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        select_device("gpu0")


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert select_dtype("fp32", cpu) == torch.float32
    assert select_dtype("bf16", cpu) == torch.bfloat16
    assert select_dtype("auto", cpu) == (torch.bfloat16 if bf16_supported(cpu) else torch.float32)
    with pytest.raises(ConfigError, match="fp16"):
        select_dtype("fp16", cpu)
    with pytest.raises(ConfigError):
        select_dtype("int8", cpu)


def test_autocast_is_a_no_op_for_fp32():
    with autocast(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags from /proc/cpuinfo (Linux)")
def test_amx_detection_agrees_with_the_cpu_flags_and_sets_the_decoding_attention_path():
    from lmforge.models import decoder

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_amx() == ("amx_tile" in flags)
    # with AMX, torch's fused bf16 attention is the faster one and is never replaced by the fp32 upcast
    assert decoder.UPCAST_KEYS == (math.inf if "amx_tile" in flags else decoder.UPCAST_MIN_KEYS)


def onednn_inside(tokens: torch.Tensor, weight: torch.Tensor, autocast_bf16: bool = False) -> bool:
    mixed = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with mixed, single_token_kernels(tokens, weight):
        return torch.backends.mkldnn.enabled


def test_single_token_kernels_turn_onednn_off_for_one_bf16_row_only():
    bf16, fp32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    one, row, column = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, 1)
    assert torch.backends.mkldnn.enabled
    assert not onednn_inside(one, bf16)                      # bf16 weights, batch-1 decoding
    assert not onednn_inside(one, fp32, autocast_bf16=True)  # fp32 weights under bf16 autocast
    assert onednn_inside(one, fp32)                          # fp32: unchanged
    assert onednn_inside(row, bf16) and onednn_inside(column, bf16)  # several tokens or rows: unchanged
    assert onednn_inside(torch.zeros(1, 1, device="meta"), bf16)     # not a CPU pass: unchanged
    with pytest.raises(RuntimeError, match="boom"), single_token_kernels(one, bf16):
        raise RuntimeError("boom")
    assert torch.backends.mkldnn.enabled  # switched back on, even after an error
