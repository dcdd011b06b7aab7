"""Run tracking: ``metrics.jsonl``, TensorBoard event files and the ``loss.png`` plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmforge.fileio import atomic_path, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Tracker:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard.

    On resume, lines logged after the resumed step by the interrupted run are dropped (and
    TensorBoard is told to purge them), so curves show each step once.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = self.run_dir / METRICS_FILE
        if resume_step is None:
            self.file.unlink(missing_ok=True)
        else:
            kept = [r for r in read_metrics(self.file) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.file, "".join(json.dumps(r) + "\n" for r in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key,
                                           value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(file: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    records = []
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


SCORE_CURVES = (("reward", "train reward"), ("val_reward", "held-out reward"),
                ("rewards/accuracies", "train preference accuracy"), ("val_accuracy", "held-out accuracy"))
"""Higher-is-better numbers drawn in a second panel of ``loss.png`` when a run logs them."""


def plot_loss(run_dir: str | Path, title: str = "") -> Path | None:
    """Draw training and validation loss against steps into ``loss.png``, and next to them the rewards
    and accuracies of :data:`SCORE_CURVES` that the run logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    scores = [(label, [(r["step"], r[name]) for r in records if name in r]) for name, label in SCORE_CURVES]
    scores = [(label, points) for label, points in scores if points]
    if not train and not val:
        return None
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(12 if scores else 7, 4.5), dpi=110, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)" if not scores else "loss")
    ax.set_title(title or run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:
        right = axes[0][1]
        for label, points in scores:
            right.plot(*zip(*points), "o-" if label.startswith("held-out") else "-", label=label, linewidth=1.2,
                       markersize=3)
        right.set_xlabel("step")
        right.set_ylabel("reward / accuracy (higher is better)")
        right.grid(alpha=0.3)
        right.legend()
    fig.tight_layout()
    out = run_dir / PLOT_FILE
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
