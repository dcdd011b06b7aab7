"""Configuration dataclasses and named model presets.

Every option lives once, in a dataclass field with a ``help`` string; :mod:`lmforge.options` turns
the same fields into YAML keys and command-line flags. Presets are small YAML files in
``lmforge/presets/`` (one per model), never a Python dict of model names.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its command-line help text (and any other metadata: ``metavar``;
    ``tasks``, the fine-tuning tasks it is for, with ``use`` saying what it does: see
    :func:`check_task_scope`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}")


def _check_positive(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value!r}")


def check_task_scope(config: Any, task: str, prefix: str = "") -> None:
    """Refuse an option of ``config`` (and its sections) that is set away from its default in a run of a
    task it is not for: fields declared with ``option(..., tasks=(...), use="what it does")``."""
    for f in dataclasses.fields(config):
        value, name = getattr(config, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_task_scope(value, task, name + ".")
        elif "tasks" in f.metadata and task not in f.metadata["tasks"] and value != f.default:
            use = f.metadata.get("use") or f"is for {' and '.join(f.metadata['tasks'])} fine-tuning"
            raise ConfigError(f"{name} {use}; this is a {task} run")


MODEL_FAMILIES = ("decoder", "encoder", "seq2seq", "lstm")
MAX_NGRAM_BUCKETS = 2**24  # a classifier n-gram bag of 16.8M rows x labels is already ~67 MB per label


@dataclass
class ModelConfig:
    """Architecture of a model of any family; the decoder family covers GPT-2 and Llama.

    Families: ``decoder`` (causal transformer), ``encoder`` (bidirectional transformer, BERT-style,
    pretrained with masked-language modelling), ``seq2seq`` (encoder-decoder transformer, T5-style:
    ``n_layer`` encoder blocks, ``n_decoder_layer`` decoder blocks) and ``lstm`` (``n_layer``
    stacked LSTM layers of width ``n_embd``; the attention and MLP knobs do not apply).
    """

    preset: str | None = option(None, "named preset ('lmforge presets') or a preset YAML file to start from")
    family: str = option("decoder", "model family: decoder, encoder, seq2seq or lstm")
    vocab_size: int | None = option(None, "vocabulary size (default: the tokenizer's)")
    block_size: int = option(256, "context length in tokens")
    n_layer: int = option(4, "number of transformer blocks")
    n_head: int = option(4, "number of attention (query) heads")
    n_kv_head: int | None = option(None, "key/value heads for grouped-query attention (default: n_head)")
    n_embd: int = option(128, "model width")
    intermediate_size: int | None = option(None, "MLP hidden width (default: 4*n_embd; ~8/3*n_embd for swiglu)")
    norm: str = option("layernorm", "normalisation: layernorm or rmsnorm")
    norm_eps: float = option(1e-5, "epsilon of the normalisation layers")
    mlp: str = option("gelu", "MLP kind: gelu (exact), gelu_tanh (original GPT-2) or swiglu (Llama)")
    position: str = option("learned", "positions: learned (GPT-2) or rope (Llama)")
    rope_theta: float = option(10000.0, "RoPE base frequency")
    bias: bool = option(True, "biases in linear and norm layers")
    tie_embeddings: bool = option(True, "share the token embedding with the output head")
    dropout: float = option(0.0, "dropout probability during training")
    n_decoder_layer: int | None = option(None, "seq2seq only: decoder blocks (default: n_layer)")
    pointer_generator: bool = option(False, "seq2seq only: copy source tokens (See et al. 2017): the output mixes "
                                            "the vocabulary softmax with an attention over the source")

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            if self.mlp == "swiglu":
                self.intermediate_size = _round_up(int(8 * self.n_embd / 3), 64)
            else:
                self.intermediate_size = 4 * self.n_embd
        if self.n_decoder_layer is None and self.family == "seq2seq":
            self.n_decoder_layer = self.n_layer

    def validate(self) -> None:
        _check_choice("model.family", self.family, MODEL_FAMILIES)
        _check_positive("model.n_decoder_layer", self.n_decoder_layer, allow_none=True)
        _check_choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("model.mlp", self.mlp, ("gelu", "gelu_tanh", "swiglu"))
        _check_choice("model.position", self.position, ("learned", "rope"))
        for name in ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            _check_positive(f"model.{name}", getattr(self, name))
        _check_positive("model.vocab_size", self.vocab_size, allow_none=True)
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head size, got {self.head_dim} (n_embd / n_head)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), not {self.dropout}")
        if self.pointer_generator and self.family != "seq2seq":
            raise ConfigError("model.pointer_generator copies from a source: it needs the seq2seq family, "
                              f"not {self.family}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, values: dict[str, Any] | str | None) -> ModelConfig:
        """Build from a preset name (``"gpt2-baby"``) or a mapping whose optional ``preset`` key
        supplies the starting values and whose other keys override them."""
        from lmforge.options import build_dataclass

        if isinstance(values, str):
            values = {"preset": values}
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"model must be a preset name or a mapping of options, not {values!r}")
        values = dict(values or {})
        merged: dict[str, Any] = {}
        if values.get("preset"):
            merged.update(load_preset(str(values["preset"])))
            merged.pop("preset", None)
        merged.update(values)
        return build_dataclass(cls, merged, prefix="model")


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass
class TrainConfig:
    """Optimisation, schedule, budgets, evaluation and checkpointing of the one training loop."""

    optimizer: str = option("adamw", "adamw, sgd or adagrad")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float | None = option(None, "final learning rate of the decay (default: lr / 10)")
    schedule: str = option("cosine", "learning-rate decay after warm-up: cosine, linear or constant")
    warmup_steps: int = option(100, "linear warm-up steps")
    decay_steps: int | None = option(None, "steps over which the rate decays to min_lr (default: max_steps)")
    weight_decay: float = option(0.1, "weight decay of 2-D weights (matrices, embeddings); never norms or biases")
    layer_lr_decay: float = option(1.0, "layer-wise learning-rate decay for fine-tuning (ELECTRA, BEiT): the "
                                         "heads get lr, the top block lr x d, each block below d times less, "
                                         "the embeddings lr x d^(L+1) (1: off)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    momentum: float = option(0.9, "SGD momentum")
    grad_clip: float = option(1.0, "clip the gradient norm to this value (0 disables)")
    label_smoothing: float = option(0.0, "share of each target's probability spread over all tokens or classes "
                                         "in the training loss (0: none; validation losses stay unsmoothed)")
    rdrop: float = option(0.0, "R-Drop: weight of the symmetric KL divergence between two dropout passes of "
                               "each batch, added to their mean loss (seq2seq and classification fine-tuning; "
                               "0: off; a step then runs the batch twice)",
                          tasks=("seq2seq", "classification"))
    batch_size: int = option(12, "sequences per micro-batch on each process")
    grad_accum: int = option(1, "micro-batches accumulated per optimiser step")
    max_steps: int | None = option(2000, "stop after this many optimiser steps")
    max_time: float | None = option(None, "stop after this many seconds of training")
    eval_interval: int = option(250, "evaluate every this many steps (0: only at the end)")
    eval_windows: int | None = option(200, "windows of the fixed evaluation set used during training (none: all)")
    final_eval_windows: int | None = option(None, "windows for the final evaluation (none: the whole val split)")
    save_interval: int = option(500, "save a checkpoint every this many steps (0: only at the end)")
    keep_checkpoints: int = option(2, "periodic checkpoints kept on disk (older ones are deleted)")
    log_interval: int = option(10, "write metrics every this many steps")
    seed: int = option(1337, "random seed for initialisation, data order and dropout")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = option("auto", "auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16")
    compile: bool = option(False, "compile the model with torch.compile")
    best_metric: str = option("loss", "the validation number that picks checkpoints/best: loss (lower is "
                                      "better; ppl too) or a metric the task reports, e.g. accuracy, macro_f1 "
                                      "(classification), f1, exact_match (QA) (higher is better)")
    num_threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> None:
        _check_choice("train.optimizer", self.optimizer, ("adamw", "sgd", "adagrad"))
        _check_choice("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        _check_choice("train.dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        if not self.best_metric or not self.best_metric.replace("_", "").isalnum():
            raise ConfigError(f"train.best_metric must be loss or a metric name such as accuracy, "
                              f"not {self.best_metric!r}")
        _check_positive("train.lr", self.lr)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), not {self.label_smoothing}")
        _check_positive("train.rdrop", self.rdrop, allow_zero=True)
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"train.layer_lr_decay must be in (0, 1], not {self.layer_lr_decay}")
        _check_positive("train.min_lr", self.min_lr, allow_none=True, allow_zero=True)
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.grad_accum", self.grad_accum)
        _check_positive("train.max_steps", self.max_steps, allow_none=True)
        _check_positive("train.max_time", self.max_time, allow_none=True)
        _check_positive("train.decay_steps", self.decay_steps, allow_none=True)
        for name in ("warmup_steps", "eval_interval", "save_interval", "weight_decay", "grad_clip"):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _check_positive("train.eval_windows", self.eval_windows, allow_none=True)
        _check_positive("train.final_eval_windows", self.final_eval_windows, allow_none=True)
        _check_positive("train.keep_checkpoints", self.keep_checkpoints)
        _check_positive("train.log_interval", self.log_interval)
        _check_positive("train.num_threads", self.num_threads, allow_none=True)
        if self.max_steps is None and self.max_time is None:
            raise ConfigError("give a budget: train.max_steps, train.max_time or both")
        if not (self.device == "auto" or self.device in ("cpu", "mps") or self.device.startswith("cuda")):
            raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "head")
LORA_GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "all": LORA_TARGETS}


MEDIA_TASKS = {"caption": "image", "vqa": "image", "transcribe": "audio", "describe": "video"}  # task -> modality
MEDIA_ENCODERS = {"image": ("cnn", "vit"), "audio": ("conv_transformer",), "video": ("cnn", "vit")}


@dataclass
class MediaConfig:
    """A multimodal model's media side: which encoder turns the image, recording or clip into feature
    vectors, how they are fused with the text decoder, and the fixed input size every example is
    brought to (images resized, recordings padded or cut, clips sampled to a number of frames)."""

    modality: str = option("auto", "image, audio or video (auto: from the manifest's fields)")
    encoder: str = option("auto", "image and video frames: cnn (conv stack) or vit (patch embedding + "
                                  "transformer); audio: conv_transformer (log-Mel, conv subsampler, transformer); "
                                  "auto: cnn for images and video, conv_transformer for audio")
    fusion: str = option("prefix", "prefix (features projected into the decoder's embeddings and put before the "
                                   "text, LLaVA-style) or cross (a seq2seq model's decoder cross-attends to them, "
                                   "Whisper-style; needs model.family seq2seq)")
    width: int = option(128, "the encoder's width (feature size before the projector)")
    n_layer: int = option(2, "transformer layers of the encoder (vit, conv_transformer, the video's temporal one)")
    n_head: int = option(4, "attention heads of the encoder's transformer layers")
    image_size: int = option(32, "images (and video frames) are resized to this many pixels square")
    patch_size: int = option(4, "vit: patch size in pixels")
    sample_rate: int = option(16000, "audio: recordings are resampled to this rate (Hz)")
    max_seconds: float = option(2.0, "audio: recordings are padded with silence or cut to this length")
    n_mels: int = option(80, "audio: log-Mel bands")
    n_fft: int = option(400, "audio: STFT window in samples (25 ms at 16 kHz)")
    hop_length: int = option(160, "audio: STFT hop in samples (10 ms at 16 kHz)")
    frames: int = option(16, "video: frames sampled uniformly from each clip")
    temporal: str = option("transformer", "video: how frames are combined: transformer (ordered, temporal "
                                          "positions) or mean (frame averaging: order is lost; the baseline)")
    freeze_decoder: bool = option(False, "train only the encoder and projector; the text decoder stays as it was")
    augment: bool = option(False, "augment while training: recordings get speed, gain and noise perturbation and "
                                  "SpecAugment masks; images and frames random flips and shifts")

    def resolved(self, modality: str) -> MediaConfig:
        """A copy with ``modality`` and the ``auto`` encoder filled in."""
        encoder = self.encoder if self.encoder != "auto" else ("conv_transformer" if modality == "audio" else "cnn")
        return dataclasses.replace(self, modality=modality, encoder=encoder)

    def validate(self) -> None:
        _check_choice("media.modality", self.modality, ("auto", *MEDIA_ENCODERS))
        _check_choice("media.fusion", self.fusion, ("prefix", "cross"))
        _check_choice("media.temporal", self.temporal, ("transformer", "mean"))
        if self.modality != "auto" and self.encoder != "auto":
            _check_choice(f"media.encoder (for {self.modality})", self.encoder, MEDIA_ENCODERS[self.modality])
        for name in ("width", "n_layer", "n_head", "image_size", "patch_size", "sample_rate", "max_seconds",
                     "n_mels", "n_fft", "hop_length", "frames"):
            _check_positive(f"media.{name}", getattr(self, name))
        if self.width % self.n_head:
            raise ConfigError(f"media.width ({self.width}) must be divisible by media.n_head ({self.n_head})")
        if self.image_size % 8 or self.image_size % self.patch_size:
            raise ConfigError(f"media.image_size ({self.image_size}) must be a multiple of 8 and of media.patch_size "
                              f"({self.patch_size})")


@dataclass
class LoraConfig:
    """Low-rank adapters: which linear layers get them, their rank, scaling and dropout."""

    r: int = option(0, "LoRA rank; 0 (the default) fine-tunes all weights instead")
    alpha: float = option(16.0, "LoRA scaling: adapter updates are multiplied by alpha / r")
    dropout: float = option(0.0, "dropout on the adapters' input during training")
    targets: list[str] = option(["q", "k", "v", "o"], "layers that get adapters: q, k, v, o, gate, up, down, "
                                                     "head, or the groups attn, mlp, all")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def target_names(self) -> tuple[str, ...]:
        """The targets with groups expanded, in a fixed order."""
        names = set()
        for target in self.targets:
            names.update(LORA_GROUPS.get(target, (target,)))
        return tuple(t for t in LORA_TARGETS if t in names)

    def validate(self) -> None:
        _check_positive("lora.r", self.r, allow_zero=True)
        _check_positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), not {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets is empty")
        for target in self.targets:
            if target not in LORA_TARGETS and target not in LORA_GROUPS:
                raise ConfigError(f"unknown lora target {target!r}; choose from "
                                  f"{', '.join(LORA_TARGETS + tuple(LORA_GROUPS))}")


@dataclass
class PretrainConfig:
    """A pretraining run: prepared data, a model, training options and an output directory."""

    data: str | None = option(None, "prepared data directory (from 'lmforge prepare')")
    out: str = option("runs/pretrain", "run directory for checkpoints, metrics and plots")
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: str = option("auto", "clm (next token: decoder, lstm), mlm (masked tokens: encoder), denoise "
                                    "(reconstruct text with masked spans: seq2seq) or auto (the model family's)")
    mlm_probability: float = option(0.15, "mlm: share of tokens chosen for prediction")
    denoise_probability: float = option(0.3, "denoise: share of tokens inside the masked spans")
    denoise_mean_span: float = option(3.0, "denoise: mean length of a masked span (Poisson), each replaced by "
                                           "one mask token")
    init: str | None = option(None, "continued pretraining: start from this checkpoint (or run directory), "
                                    "its weights and architecture (replacing model); prepare the data with its "
                                    "tokenizer")
    resume: bool = option(False, "continue from the last checkpoint in the run directory")
    nproc: int = option(1, "processes to launch with torchrun (DDP); 1 runs in this process")

    @property
    def resolved_objective(self) -> str:
        """The objective, with ``auto`` resolved from the model family."""
        if self.objective != "auto":
            return self.objective
        return {"encoder": "mlm", "seq2seq": "denoise"}.get(self.model.family, "clm")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("no data: give --data DIR (made by 'lmforge prepare') or 'data:' in the config")
        _check_positive("nproc", self.nproc)
        self.model.validate()
        self.train.validate()
        _check_choice("objective", self.objective, ("auto", "clm", "mlm", "denoise"))
        if self.train.rdrop:
            raise ConfigError("train.rdrop is for seq2seq and classification fine-tuning, not pretraining")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability must be in (0, 1), not {self.mlm_probability}")
        if not 0.0 < self.denoise_probability < 1.0:
            raise ConfigError(f"denoise_probability must be in (0, 1), not {self.denoise_probability}")
        if not self.denoise_mean_span >= 1.0:
            raise ConfigError(f"denoise_mean_span must be at least 1, not {self.denoise_mean_span}")
        family, objective = self.model.family, self.resolved_objective
        fits = {"mlm": ("encoder",), "denoise": ("seq2seq",), "clm": ("decoder", "lstm")}
        if family not in fits[objective]:
            raise ConfigError(f"the {objective} objective does not fit the {family} family: mlm is for encoders, "
                              f"denoise for seq2seq models, clm for decoders and LSTMs")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """:class:`TrainConfig` with defaults for fine-tuning (smaller rate and budget, evaluation in examples)."""

    lr: float = option(3e-4, "peak learning rate")
    warmup_steps: int = option(20, "linear warm-up steps")
    weight_decay: float = option(0.0, "weight decay of 2-D weights (matrices, embeddings); never norms or biases")
    batch_size: int = option(8, "examples per micro-batch on each process")
    max_steps: int | None = option(300, "stop after this many optimiser steps")
    eval_interval: int = option(50, "evaluate every this many steps (0: only at the end)")
    eval_windows: int | None = option(200, "held-out examples evaluated during training (none: all)")
    final_eval_windows: int | None = option(None, "held-out examples for the final evaluation (none: all)")
    save_interval: int = option(100, "save a checkpoint every this many steps (0: only at the end)")


@dataclass
class FinetuneDataConfig:
    """What a fine-tuning run learns from."""

    path: str | None = option(None, "training data: JSONL/JSON (chat, alpaca, prompt/completion, text) or a text file")
    val_path: str | None = option(None, "held-out data in the same format (default: a share of the training data)")
    val_fraction: float = option(0.05, "share of the training examples held out when no val_path is given")
    format: str = option("auto", "auto (from the fields), chat, alpaca, prompt_completion or text")
    train_on_prompt: bool = option(False, "also compute the loss on prompt tokens (default: responses only)")
    packing: bool = option(False, "pack several examples into each context-length sequence")
    group_by_length: bool = option(False, "batch examples of similar length together (less padding, faster "
                                          "steps; the order of the steps stays random)")
    text_field: list[str] = option([], "classification: text column(s) (default: text or sentence; 0-based "
                                       "numbers for CSV/TSV files without a header, several are joined)")
    label_field: str = option("label", "classification: label column (a name, or a 0-based number)")
    multi_label: bool | None = option(None, "classification: several labels per text (default: when labels are "
                                            "JSON lists; in CSV/TSV separate them with |)")
    target_path: str | None = option(None, "seq2seq: target text file parallel to data.path (one example per line)")
    val_target_path: str | None = option(None, "seq2seq: target file parallel to data.val_path")
    source_field: str | None = option(None, "seq2seq JSON: source field (default: source, document, src, input)")
    target_field: str | None = option(None, "seq2seq JSON: target field (default: target, summary, tgt, output)")
    bpe_dropout: float = option(0.0, "seq2seq: BPE-dropout, the chance of skipping each merge when a training "
                                     "text is segmented (subword regularisation; 0.1 in the paper; 0: off)",
                                tasks=("seq2seq",))
    bpe_dropout_samples: int = option(16, "seq2seq: segmentations of the training set sampled for "
                                          "data.bpe_dropout; epoch e trains on sample e mod this")
    stride: int | None = option(None, "qa: context tokens shared by consecutive windows of a long context "
                                      "(default: a quarter of the model's context)")

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("no data: give --data FILE or 'data: {path: ...}' in the config")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), not {self.val_fraction}")
        _check_positive("data.stride", self.stride, allow_zero=True, allow_none=True)
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise ConfigError(f"data.bpe_dropout must be in [0, 1), not {self.bpe_dropout}")
        _check_positive("data.bpe_dropout_samples", self.bpe_dropout_samples)
        if self.packing and self.group_by_length:
            raise ConfigError("data.group_by_length does nothing with data.packing: packed rows all have one length")


@dataclass
class FinetuneEvalConfig:
    """Generation metrics on held-out examples during fine-tuning (besides the held-out loss)."""

    examples: int = option(0, "held-out examples to generate answers for at each evaluation (0: none)")
    max_new_tokens: int = option(64, "most tokens generated per answer")


@dataclass
class FinetuneConfig:
    """A fine-tuning run: a base checkpoint, data, training options, optional LoRA, an output directory."""

    checkpoint: str | None = option(None, "base checkpoint (lmforge checkpoint/run directory or Hugging Face "
                                          "folder); omit it to train a task model from scratch (tokenizer + model)")
    task: str = option("auto", "what to learn: auto (from the data), sft (generation), classification, qa "
                               "(extractive), seq2seq (translation, summarization), or from media manifests: "
                               "caption (image), vqa (image + question), transcribe (audio), describe (video)")
    purpose: str = option("auto", "seq2seq: translation, summarization or generic (auto: from the data fields)")
    pooling: str = option("auto", "classification: the text's state the head reads: first (token), last, mean "
                                  "(over the real tokens), or auto (first for encoders, last for causal models)")
    ngram_buckets: int = option(0, "classification: add a linear bag of the text's hashed token uni- and "
                                   "bigrams, this many buckets, to the head's logits (fastText's bag beside the "
                                   "encoder: wide & deep; helps small data; e.g. 262144); 0: off",
                                   tasks=("classification",), use="adds an n-gram bag to a classifier")
    ngram_lr: float = option(0.03, "classification: peak learning rate of the n-gram bag (it learns from zero, "
                                   "so far faster than the backbone; follows train.lr's schedule)")
    question_match: bool = option(False, "qa: mark the context tokens that also occur in the question with a "
                                         "learned input embedding (DrQA's exact-match feature; helps small data)",
                                  tasks=("qa",), use="marks question words in QA contexts")
    dropout: float | None = option(None, "dropout while fine-tuning a checkpoint (default: its model.dropout; "
                                         "e.g. 0.1 for an encoder pretrained without); from scratch: model.dropout")
    tokenizer: str | None = option(None, "from scratch: tokenizer directory or tokenizer.json")
    model: ModelConfig = field(default_factory=ModelConfig)
    out: str = option("runs/finetune", "run directory for checkpoints, metrics and plots")
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    resume: bool = option(False, "continue from the last checkpoint in the run directory")

    def validate(self) -> None:
        _check_choice("task", self.task, ("auto", "sft", "classification", "qa", "seq2seq", *MEDIA_TASKS))
        _check_choice("purpose", self.purpose, ("auto", "translation", "summarization", "generic"))
        _check_choice("pooling", self.pooling, ("auto", "first", "last", "mean"))
        _check_positive("ngram_buckets", self.ngram_buckets, allow_zero=True)
        if self.ngram_buckets > MAX_NGRAM_BUCKETS:
            raise ConfigError(f"ngram_buckets must be at most {MAX_NGRAM_BUCKETS:,} (a table row per bucket and "
                              f"label), not {self.ngram_buckets:,}")
        _check_positive("ngram_lr", self.ngram_lr)
        if not self.checkpoint and not self.tokenizer:
            raise ConfigError("no base checkpoint: give CHECKPOINT (or, to train a task model from scratch, "
                              "--tokenizer DIR and --model.preset NAME)")
        if self.checkpoint and self.tokenizer:
            raise ConfigError("give a base checkpoint or a tokenizer to start from scratch, not both")
        if self.dropout is not None:
            if not self.checkpoint:
                raise ConfigError("dropout overrides a base checkpoint's; from scratch, set model.dropout")
            if not 0.0 <= self.dropout < 1.0:
                raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")
        if not self.checkpoint:
            self.model.validate()
        self.data.validate()
        self.train.validate()
        self.lora.validate()
        self.media.validate()
        _check_positive("eval.examples", self.eval.examples, allow_zero=True)
        _check_positive("eval.max_new_tokens", self.eval.max_new_tokens)


@dataclass
class SamplingConfig:
    """How to pick each next token, and when to stop."""

    max_new_tokens: int = option(128, "most tokens to generate per sample")
    temperature: float = option(1.0, "softmax temperature; 0 means greedy (always the most likely token)")
    top_k: int | None = option(None, "sample among the k most likely tokens only")
    top_p: float | None = option(None, "sample among the most likely tokens whose probabilities add up to p")
    min_p: float | None = option(None, "drop tokens less likely than min_p times the most likely one")
    repetition_penalty: float = option(1.0, "penalise tokens already in the text (> 1 discourages repeats)")
    presence_penalty: float = option(0.0, "subtract this from the logits of tokens already generated (-2 to 2)")
    frequency_penalty: float = option(0.0, "subtract this times a token's count so far from its logit (-2 to 2)")
    stop: list[str] = option([], "stop when this text appears (may be given several times); not included")
    seed: int | None = option(None, "random seed for reproducible sampling")
    num_samples: int = option(1, "samples to draw per prompt")
    ignore_eos: bool = option(False, "keep generating after the end-of-sequence token (for benchmarks)")

    @classmethod
    def from_options(cls, base: SamplingConfig | None = None, **options: Any) -> SamplingConfig:
        """The one parser of sampling options: ``base`` (or the defaults) updated by ``options``
        (:class:`SamplingConfig` field names; ``None`` values are ignored, a string ``stop`` is one stop
        string, unknown names and bad values are a :class:`ConfigError`), validated."""
        from lmforge.options import build_dataclass

        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(options.get("stop"), str):
            options["stop"] = [options["stop"]]
        values = {**dataclasses.asdict(base), **options} if base is not None else options
        config = build_dataclass(cls, values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, not {self.top_k}")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], not {value}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name} must be between -2 and 2, not {getattr(self, name)}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, not {self.num_samples}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty text")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def counts_tokens(self) -> bool:
        """Presence or frequency penalties are on: the sampler needs each token's count so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

def preset_names() -> list[str]:
    """Names of the bundled model presets."""
    folder = resources.files("lmforge") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The architecture fields of a bundled preset (by name) or of a preset YAML file (by path)."""
    path = Path(name)
    if name.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"preset file {name} does not exist")
        return _read_yaml_mapping(path)
    resource = resources.files("lmforge") / "presets" / f"{name}.yaml"
    if not resource.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(preset_names())}"
        raise ConfigError(f"unknown model preset {name!r}{hint}")
    return yaml.safe_load(resource.read_text(encoding="utf-8")) or {}


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of options, not a {type(data).__name__}")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a nested dict (validated later, against the dataclasses)."""
    return _read_yaml_mapping(Path(path))


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as a plain nested dict (for YAML and JSON)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------

@dataclass
class ServeConfig:
    """How ``lmforge serve`` listens and admits requests (the model's device and precision aside).

    Its fields are the command's flags (``--max-batch-size``; read with
    ``add_arguments(parser, ServeConfig, flat=True, defaults=True)``); :meth:`validate` gives the
    errors in the flags' spelling.
    """

    host: str = option("127.0.0.1", "address to bind (anything but loopback needs care)", metavar=None)
    port: int = option(8000, "TCP port", metavar=None)
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 routes", metavar="KEY")
    max_batch_size: int = option(8, "sequences decoded together")
    max_queue: int = option(64, "requests waiting beyond the batch; more get 429")
    prefix_cache_tokens: int | None = option(None, "prompt positions whose keys and values are kept, so that "
                                                   "prompts starting the same way (system prompts, chat history) "
                                                   "skip recomputing them; 0 turns it off (default: half the "
                                                   "batch's context, max-batch-size x context / 2)")
    request_timeout: float | None = option(None, "stop a generation running longer than S seconds with a 408 "
                                                 "(default: no limit)", metavar="S")
    max_body_size: int = option(1 << 20, "larger request bodies get 413", metavar="BYTES")
    request_log: str | None = option(None, "SQLite file recording every request (default: requests.sqlite3 in "
                                           "the checkpoint folder)", metavar="DB")
    no_request_log: bool = option(False, "record nothing")
    log_prompts: bool = option(False, "also record prompt text in the request log")

    def validate(self) -> None:
        if self.port < 0 or self.port > 65535:
            raise ConfigError(f"--port must be between 0 and 65535, not {self.port}")
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ConfigError("--max-batch-size and --max-queue must be >= 1")
        if self.prefix_cache_tokens is not None and self.prefix_cache_tokens < 0:
            raise ConfigError("--prefix-cache-tokens must be >= 0 (0 turns prefix caching off), "
                              f"not {self.prefix_cache_tokens}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ConfigError(f"--request-timeout must be > 0 seconds, not {self.request_timeout}")
        if self.max_body_size < 1024:
            raise ConfigError(f"--max-body-size must be at least 1024 bytes, not {self.max_body_size}")
