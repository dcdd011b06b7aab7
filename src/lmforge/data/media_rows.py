"""Media manifests -> training rows of a multimodal model, and their batches.

A manifest is JSONL (or JSON), one example per record; media paths are relative to the manifest's
folder (or absolute)::

    {"image": "cat.png", "text": "a photo of a cat"}                      caption
    {"image": "scene.png", "question": "what colour is the square?", "answer": "red"}   vqa
    {"audio": "0_george_1.wav", "text": "zero"}                           transcribe
    {"video": "clip.mp4", "text": "a red square moves left then up"}      describe (or "frames/")

Every example is brought to the model's fixed input size by :func:`media_tensor` (images resized,
recordings resampled and padded with silence or cut, clips sampled to ``media.frames`` frames), the
same function the API uses, so training and inference see the same inputs. The text side of a row is
its prompt (:func:`prompt_ids`: the question, then a separator) and its target (answer + eos).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.config import MEDIA_TASKS, MediaConfig
from lmforge.data.formats import read_records
from lmforge.data.media import load_audio, load_image, load_video
from lmforge.data.task_rows import IGNORE, pad_rows
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

PLACEHOLDER_ID = 0  # the token id at the media positions of a prefix-fusion input (its embedding + the features)
TARGET_FIELDS = ("text", "caption", "transcript", "description")  # what a record's target may be called


@dataclass
class MediaExample:
    """One manifest record: its media (a path or anything :func:`media_tensor` takes), the question
    ("" when the task has none) and the target text."""

    media: Any
    question: str
    target: str


def media_tensor(media: MediaConfig, source: Any) -> Tensor:
    """One example's model input from a path, bytes, a PIL image or an array: images (3, S, S),
    waveforms (N,) of ``max_seconds * sample_rate`` samples, clips (F, 3, S, S)."""
    if media.modality == "image":
        return load_image(source, media.image_size)
    if media.modality == "audio":
        samples = round(media.max_seconds * media.sample_rate)
        wave = load_audio(source, media.sample_rate)[:samples]
        return F.pad(wave, (0, samples - wave.shape[0]))
    if media.modality == "video":
        return load_video(source, media.frames, media.image_size)
    raise DataError(f"unknown media modality {media.modality!r}")


def read_manifest(path: str | Path, task: str) -> list[MediaExample]:
    """The examples of a ``task`` manifest (caption, vqa, transcribe, describe), media paths resolved."""
    modality = MEDIA_TASKS[task]
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the manifest has no records")
    folder = Path(path).parent
    examples = []
    for number, record in enumerate(records, 1):
        where = f"{path}: record {number}"
        if not isinstance(record, dict) or modality not in record:
            raise DataError(f"{where} has no {modality!r} field (a {task} manifest needs "
                            f"{{\"{modality}\": path, ...}})")
        source = record[modality]
        if isinstance(source, str) and not Path(source).is_absolute():
            source = str(folder / source)
        if task == "vqa":
            if "question" not in record or "answer" not in record:
                raise DataError(f"{where} needs \"question\" and \"answer\" fields (a vqa manifest)")
            question, target = str(record["question"]), str(record["answer"])
        else:
            name = next((f for f in TARGET_FIELDS if f in record), None)
            if name is None:
                raise DataError(f"{where} has no target text (one of the fields {', '.join(TARGET_FIELDS)})")
            question, target = "", str(record[name])
        if not target.strip():
            raise DataError(f"{where} has an empty target text")
        examples.append(MediaExample(source, question, target))
    return examples


def separator_id(tokenizer: Tokenizer) -> int:
    """The token after the question (eos, else bos, else 0)."""
    for token in (tokenizer.eos_id, tokenizer.bos_id):
        if token is not None:
            return token
    return 0


def prompt_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    """The text before the answer: the question's tokens, then the separator (just the separator
    when there is no question)."""
    return tokenizer.encode(question) + [separator_id(tokenizer)] if question else [separator_id(tokenizer)]


@dataclass
class MediaRow:
    """A training row: the media input tensor, the prompt ids and the target ids (without eos)."""

    media: Tensor
    prompt: list[int]
    target: list[int]


def encode_media_rows(examples: Sequence[MediaExample], tokenizer: Tokenizer, media: MediaConfig,
                      max_text_tokens: int, progress: Callable[[int], None] | None = None) -> list[MediaRow]:
    """Decode every example's media once and tokenize its text; texts longer than ``max_text_tokens``
    (prompt + target + eos) lose the end of their target."""
    rows = []
    for example in examples:
        prompt = prompt_ids(tokenizer, example.question)[-max_text_tokens // 2:]
        target = tokenizer.encode(example.target)[:max(1, max_text_tokens - len(prompt) - 1)]
        rows.append(MediaRow(media_tensor(media, example.media), prompt, target))
        if progress is not None:
            progress(1)
    return rows


def collate_media(rows: Sequence[MediaRow], fusion: str, media_tokens: int, pad_id: int, bos_id: int,
                  eos_id: int) -> dict[str, Tensor]:
    """A batch for :class:`~lmforge.models.multimodal.fusion.MediaLM`: ``media`` (B, ...) and

    - prefix: ``input_ids`` (B, T) = K placeholders + prompt + target, right-padded, and ``labels``
      (B, T): the next token where it is the target's or eos, else ``IGNORE``;
    - cross: ``input_ids``/``attention_mask`` (B, S) the prompt, ``decoder_input_ids`` (B, T) bos +
      target and ``labels`` (B, T) target + eos.
    """
    batch = {"media": torch.stack([row.media for row in rows])}
    if fusion == "cross":
        ids, mask = pad_rows([row.prompt for row in rows], pad_id)
        decoder_ids, decoder_mask = pad_rows([[bos_id] + row.target for row in rows], pad_id)
        labels, _ = pad_rows([row.target + [eos_id] for row in rows], IGNORE)
        return {**batch, "input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
                "labels": labels.masked_fill(~decoder_mask, IGNORE)}
    sequences, label_rows = [], []
    for row in rows:
        head = [PLACEHOLDER_ID] * media_tokens + row.prompt
        sequences.append(head + row.target)  # the input; the last prediction is eos
        label_rows.append([IGNORE] * (len(head) - 1) + row.target + [eos_id])
    ids, _ = pad_rows(sequences, pad_id)
    labels, _ = pad_rows(label_rows, IGNORE)
    return {**batch, "input_ids": ids, "labels": labels}
