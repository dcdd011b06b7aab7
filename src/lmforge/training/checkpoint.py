"""Checkpoints: portable, safe, atomic directories.

A checkpoint directory holds::

    model.safetensors        weights (fp32; a tied head is stored once), or for LoRA runs
    adapter.safetensors      only the adapters, beside a reference to the base checkpoint
    config.json              format, lmforge version, model family and architecture, training step
    tokenizer.json (+config) the tokenizer
    train_state.pt           (training runs) optimiser, step, RNG states, budgets; loaded with
                             torch.load(weights_only=True), so nothing is ever unpickled

It is written into a temporary sibling and renamed into place (:func:`lmforge.fileio.atomic_directory`):
a process killed while saving leaves the previous checkpoints intact and no partial one where a
resume would look. In a run directory, periodic checkpoints are ``checkpoints/step-N``, plus
``checkpoints/best`` (lowest validation loss) and ``checkpoints/final``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import LoraConfig, to_dict
from lmforge.errors import CheckpointError
from lmforge.fileio import atomic_directory, atomic_write_text, recover_directory
from lmforge.models import build_model, config_from_dict
from lmforge.models.lora import apply_lora, has_lora, load_lora_state_dict, lora_state_dict
from lmforge.tokenizer import Tokenizer
from lmforge.version import __version__

FORMAT = "lmforge-checkpoint-v1"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


def distinct_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared parameter (e.g. a tied head) kept once, under its first name."""
    first: set[int] = set()
    repeats = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            repeats.add(name)
        first.add(id(parameter))
    return {name: tensor for name, tensor in model.state_dict().items() if name not in repeats}


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`distinct_tensors` copied to the CPU, contiguous: what a checkpoint stores."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in distinct_tensors(model).items()}


def save_checkpoint(path: str | Path, model: nn.Module, tokenizer: Tokenizer,
                    train_state: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically; returns its path."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    if has_lora(model):
        if not info or "lora" not in info or "base" not in info:
            raise CheckpointError("a LoRA checkpoint needs its lora config and base reference in info")
        return save_weights_checkpoint(path, model.config, {k: v.to("cpu", copy=True).contiguous()
                                                            for k, v in lora_state_dict(model).items()},
                                       tokenizer, train_state, info, weights_file=ADAPTER_FILE)
    return save_weights_checkpoint(path, model.config, unique_state(model), tokenizer, train_state, info)


def save_weights_checkpoint(path: str | Path, model_config: Any, state: dict[str, torch.Tensor],
                            tokenizer: Tokenizer, train_state: dict[str, Any] | None = None,
                            info: dict[str, Any] | None = None, weights_file: str = MODEL_FILE) -> Path:
    """Write a checkpoint from a model config and its weights (a tied head stored once), atomically."""
    path = Path(path)
    config = {**(info or {}), "format": FORMAT, "lmforge_version": __version__,
              "family": model_config.family, "model": to_dict(model_config)}

    def fill(folder: Path) -> None:
        save_file(state, str(folder / weights_file), metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(folder)
        if train_state is not None:
            torch.save(train_state, folder / TRAIN_STATE_FILE)

    atomic_directory(path, fill)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint, checked to be an lmforge checkpoint."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: expected an lmforge checkpoint or run directory")
    if not file.is_file() or not ((path / MODEL_FILE).is_file() or (path / ADAPTER_FILE).is_file()):
        raise CheckpointError(f"{path} is not an lmforge checkpoint (no {CONFIG_FILE} and {MODEL_FILE})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lmforge checkpoint ({CONFIG_FILE} has no format {FORMAT!r})")
    return config


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dropout: float | None = None) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """Load a checkpoint directory (or a run directory: see :func:`resolve_checkpoint`).

    ``dropout``, if given, replaces the saved ``model.dropout`` (fine-tuning a checkpoint pretrained
    without dropout, as BERT is fine-tuned with 0.1). Returns ``(model in eval mode on device,
    tokenizer, config.json contents)``.
    """
    path = resolve_checkpoint(path)
    config = read_config(path)
    model_config = config_from_dict(config["model"])
    if dropout is not None:
        model_config.dropout = dropout
    tokenizer = Tokenizer.load(path)
    if model_config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model_config.vocab_size}")
    if "lora" in config:  # the base model, then its adapters (unmerged)
        model, _, _ = load_model(base_checkpoint(path, config), dropout=dropout)
        apply_lora(model, LoraConfig(**config["lora"]))
    else:
        model = with_task_head(build_model(model_config), config.get("task"), path)
    load_checkpoint_weights(model, path)
    return model.to(device).eval(), tokenizer, config


def with_task_head(backbone: nn.Module, task: Any, path: Path | str = "") -> nn.Module:
    """The backbone inside the head that the checkpoint's ``task`` record names (classification: a
    :class:`~lmforge.models.heads.SequenceClassifier`; reward: one with a single scalar output; qa: a
    :class:`~lmforge.models.heads.SpanExtractor`);
    the backbone itself for language models and seq2seq."""
    kind = task.get("kind") if isinstance(task, dict) else None
    if kind == "classification":
        from lmforge.models.heads import SequenceClassifier

        labels = task.get("labels")
        if not isinstance(labels, list) or not labels:
            raise CheckpointError(f"{path}: the classification task record has no labels")
        return SequenceClassifier(backbone, len(labels), pooling=task.get("pooling", "first"),
                                  ngram_buckets=int(task.get("ngram_buckets") or 0))
    if kind == "qa":
        from lmforge.models.heads import SpanExtractor

        return SpanExtractor(backbone, task.get("separator_id"))
    if kind == "reward":
        from lmforge.models.heads import SequenceClassifier

        return SequenceClassifier(backbone, 1, pooling=task.get("pooling", "last"), dropout=0.0)
    if kind == "media":
        from lmforge.config import MediaConfig
        from lmforge.models.multimodal.fusion import MediaLM

        try:
            media = MediaConfig(**task["media"])
            media.validate()
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: the media task record is incomplete or unknown ({exc})") from None
        return MediaLM(backbone, media)
    if kind not in (None, "seq2seq"):
        raise CheckpointError(f"{path}: unknown task {kind!r} (this lmforge knows classification, qa, reward, "
                              f"seq2seq, media)")
    return backbone


def update_task_info(path: str | Path, task: dict[str, Any]) -> None:
    """Replace the ``task`` record of a checkpoint's ``config.json`` (atomically)."""
    file = Path(path) / CONFIG_FILE
    config = read_config(path)
    config["task"] = task
    atomic_write_text(file, json.dumps(config, indent=2) + "\n")


def load_checkpoint_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint's weights into ``model``: all of them, or only the adapters of a LoRA checkpoint."""
    if has_lora(model):
        try:
            state = load_file(str(path / ADAPTER_FILE))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path / ADAPTER_FILE}: {exc}") from None
        load_lora_state_dict(model, state)
    else:
        load_weights(model, path / MODEL_FILE)


def fingerprint(path: str | Path) -> str:
    """A quick identity of a checkpoint's weights: size and hashes of the first and last MiB."""
    import hashlib

    file = Path(path) / MODEL_FILE
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def base_reference(path: str | Path) -> dict[str, str]:
    """What a LoRA checkpoint records about its base: the path and a fingerprint of its weights."""
    path = resolve_checkpoint(path).resolve()
    return {"path": str(path), "fingerprint": fingerprint(path)}


def base_checkpoint(path: Path, config: dict[str, Any]) -> Path:
    """The base checkpoint of a LoRA checkpoint, checked to be the one it was trained on."""
    base = config.get("base") or {}
    base_path = Path(base.get("path", ""))
    if not base.get("path") or not (base_path / MODEL_FILE).is_file():
        raise CheckpointError(f"{path} is a LoRA checkpoint whose base checkpoint {base.get('path')} is missing; "
                              f"put it back, or merge the adapters while it exists ('lmforge merge-lora')")
    if fingerprint(base_path) != base.get("fingerprint"):
        raise CheckpointError(f"the base checkpoint {base_path} has changed since {path} was trained on it")
    return base_path


def load_weights(model: nn.Module, file: Path) -> None:
    """Load safetensors weights into ``model``, strictly (a tied head may be absent from the file)."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    assign_weights(model, state, str(file))


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` after checking names and shapes (a tied head may be absent)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    tied = {name for name in missing if _is_tied(model, name)}
    unexpected = [k for k in state if k not in expected]
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)


def _is_tied(model: nn.Module, name: str) -> bool:
    return name.split(".")[-2:] == ["lm_head", "weight"] and getattr(model.config, "tie_embeddings", False)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint, read without unpickling arbitrary objects."""
    file = Path(path) / TRAIN_STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} holds no {TRAIN_STATE_FILE}: it cannot be resumed from")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"cannot read {file}: {exc}") from None


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the periodic checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one with the highest step among ``step-N`` and ``final``."""
    folder = Path(run_dir) / "checkpoints"
    for name in ("final", "best"):
        recover_directory(folder / name)
    candidates = [(step, path) for step, path in step_checkpoints(run_dir)]
    final = folder / "final"
    if (final / TRAIN_STATE_FILE).is_file():
        candidates.append((int(read_config(final).get("step", 0)), final))
    return max(candidates, key=lambda item: item[0])[1] if candidates else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest periodic checkpoints, and leftovers of interrupted saves."""
    folder = Path(run_dir) / "checkpoints"
    for _, path in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint or run directory (best, then final, then latest step)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / CONFIG_FILE).is_file():
        return path
    folder = path / "checkpoints"
    for name in ("best", "final"):
        recover_directory(folder / name)
        if (folder / name / CONFIG_FILE).is_file():
            return folder / name
    steps = step_checkpoints(path)
    if steps:
        return steps[-1][1]
    raise CheckpointError(f"{path} is not an lmforge checkpoint or run directory (no {CONFIG_FILE}, "
                          f"no checkpoints/)")
