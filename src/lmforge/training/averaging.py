"""Checkpoint averaging: one checkpoint whose weights are the element-wise mean of several.

Averaging the last few checkpoints of a run (as fairseq's ``average_checkpoints.py`` and the
Transformer paper do) is a free ensemble: the mean of nearby points along the optimiser's path
usually generalises better than any one of them. Only checkpoints of one architecture and one task
(the same ``config.json`` model and task records, the same tokenizer) can be averaged; LoRA
checkpoints must be merged first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import CheckpointError
from lmforge.fileio import check_output_folder
from lmforge.training.checkpoint import (
    CONFIG_FILE,
    load_model,
    read_config,
    save_checkpoint,
    step_checkpoints,
)

META_KEYS = ("format", "lmforge_version", "family", "model")


def last_checkpoints(run_dir: str | Path, count: int) -> list[Path]:
    """The ``count`` newest checkpoints of a run directory (its ``step-N`` folders and ``final``),
    oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = step_checkpoints(run_dir)
    final = folder / "final"
    if (final / CONFIG_FILE).is_file():
        step = int(read_config(final).get("step", 0))
        found = [(s, p) for s, p in found if s != step] + [(step, final)]
    if not found:
        raise CheckpointError(f"{run_dir} holds no checkpoints to average (no checkpoints/step-N or final)")
    if count > len(found):
        raise CheckpointError(f"{run_dir} holds {len(found)} checkpoints, fewer than the {count} asked for "
                              f"(keep more with train.keep_checkpoints and train.save_interval)")
    return [path for _, path in sorted(found)[-count:]]


def average_checkpoints(paths: list[str | Path], out: str | Path) -> Path:
    """Write to ``out`` a checkpoint whose floating-point weights are the mean of ``paths``'
    (accumulated in float64); its ``config.json`` is the last checkpoint's, with ``averaged_from``
    listing the sources. Returns ``out``."""
    sources = [Path(p) for p in paths]
    if not sources:
        raise CheckpointError("no checkpoints to average")
    out = Path(out)
    if any(out.resolve() == p.resolve() for p in sources):
        raise CheckpointError(f"{out} is one of the checkpoints being averaged; write the average elsewhere")
    configs = [read_config(p) for p in sources]
    for path, config in zip(sources, configs):
        if "lora" in config:
            raise CheckpointError(f"{path} is a LoRA checkpoint: merge its adapters first ('lmforge merge-lora')")
        if config["model"] != configs[0]["model"] or config.get("task") != configs[0].get("task"):
            raise CheckpointError(f"{path} has another architecture or task than {sources[0]}: only checkpoints "
                                  f"of one model can be averaged")
    tokenizer_file = _tokenizer_bytes(sources[0])
    for path in sources[1:]:
        if _tokenizer_bytes(path) != tokenizer_file:
            raise CheckpointError(f"{path} has another tokenizer than {sources[0]}")
    check_output_folder(out, _is_checkpoint)

    total: dict[str, torch.Tensor] = {}
    for path in sources:
        model, tokenizer, _ = load_model(path)
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                total[name] = total.get(name, 0) + tensor.double()
    state = model.state_dict()
    with torch.no_grad():
        for name, summed in total.items():
            state[name].copy_(summed / len(sources))
    info = {k: v for k, v in configs[-1].items() if k not in META_KEYS}
    info["averaged_from"] = [str(p.resolve()) for p in sources]
    return save_checkpoint(out, model, tokenizer, info=info)


def _tokenizer_bytes(path: Path) -> bytes:
    try:
        return (path / "tokenizer.json").read_bytes()
    except OSError:
        raise CheckpointError(f"{path} has no readable tokenizer.json") from None


def _is_checkpoint(path: Path) -> bool:
    try:
        read_config(path)
    except CheckpointError:
        return False
    return True
