"""The Python API: ``LanguageModel`` loads a checkpoint and generates, streams and scores text.

>>> from lmforge import LanguageModel
>>> lm = LanguageModel.load("runs/quickstart")                  # a run or checkpoint directory
>>> lm.generate("The for statement", max_new_tokens=40, temperature=0)
>>> for piece in lm.stream("import", max_new_tokens=40): print(piece, end="")
>>> lm.perplexity("Some text.")

The CLI and (later) the server call these same methods.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import SamplingConfig
from lmforge.data.formats import chat_prompt_ids, to_messages
from lmforge.device import select_device, select_dtype
from lmforge.errors import ConfigError, DataError, RequestError
from lmforge.inference.detokenize import TextStream
from lmforge.inference.generate import TokenGenerator
from lmforge.interop.hf import is_hf_folder, load_hf
from lmforge.options import build_dataclass
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import load_model


@dataclass
class Completion:
    """One generated sample."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence or stop string) or "length"
    prompt_tokens: int
    prompt_truncated: int = 0  # prompt tokens dropped to fit the context (truncate=True)


def sampling_config(options: dict[str, Any]) -> SamplingConfig:
    """A validated :class:`SamplingConfig` from keyword arguments (unknown names are an error)."""
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    config = build_dataclass(SamplingConfig, options)
    config.validate()
    return config


class LanguageModel:
    """A loaded causal language model with its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, info: dict[str, Any] | None = None,
                 path: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = info or {}
        self.path = path
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                              f"{model.config.vocab_size}")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "fp32") -> LanguageModel:
        """Load a checkpoint or run directory, or a Hugging Face GPT-2/Llama folder (converted in
        memory). ``dtype`` sets the weights' precision (fp32, bf16, fp16; ``auto`` picks bf16 where
        the device has it natively)."""
        target = select_device(device)
        if is_hf_folder(path):
            model, tokenizer, info = load_hf(path)
        else:
            model, tokenizer, info = load_model(path)
        model = model.to(device=target, dtype=select_dtype(dtype, target))
        return cls(model, tokenizer, info, Path(path))

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.model.config.block_size

    # ------------------------------------------------------------------ generation
    def encode_prompt(self, prompt: str, truncate: bool = False, reserve: int = 0) -> tuple[list[int], int]:
        """Token ids of a prompt, and how many tokens truncation dropped.

        An empty prompt is the start-of-document token (:attr:`Tokenizer.start_ids`); tokenizers that
        start texts with bos (Llama's) get it in front of every prompt. A prompt longer than the
        context is an error, or with ``truncate`` loses its start (after bos), keeping room for
        ``reserve`` new tokens (at most half the context).
        """
        head = self.tokenizer.start_ids if self.tokenizer.adds_bos or not prompt else []
        body = self.tokenizer.encode(prompt) if prompt else []
        limit = self.context_length
        if len(head) + len(body) <= limit:
            return head + body, 0
        if not truncate:
            raise RequestError(f"the prompt is {len(head) + len(body)} tokens long but the model's context is "
                               f"{limit} tokens; shorten it or allow truncation")
        keep = limit - min(reserve, limit // 2) - len(head)
        return head + body[-keep:], len(body) - keep

    def complete(self, prompts: str | list[str], truncate: bool = False, **sampling: Any) -> list[Completion]:
        """Generate for one prompt or a batch; returns ``len(prompts) * num_samples`` completions,
        the samples of each prompt together. Keyword arguments are :class:`SamplingConfig` fields."""
        config = sampling_config(sampling)
        encoded = [self.encode_prompt(p, truncate, config.max_new_tokens) for p in _as_list(prompts)]
        return [event for event in self._events(encoded, config) if isinstance(event, Completion)]

    def generate(self, prompt: str | list[str], truncate: bool = False, **sampling: Any) -> Any:
        """Generated text: a string for one prompt, a list of strings for a list of prompts; with
        ``num_samples > 1`` each prompt gives a list of samples instead of a string."""
        n = sampling_config(sampling).num_samples
        texts = [c.text for c in self.complete(prompt, truncate, **sampling)]
        grouped: list[Any] = texts if n == 1 else [texts[i:i + n] for i in range(0, len(texts), n)]
        return grouped[0] if isinstance(prompt, str) else grouped

    def stream(self, prompt: str, truncate: bool = False, **sampling: Any) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece, as it is produced."""
        config = sampling_config(sampling)
        if config.num_samples != 1:
            raise ConfigError("stream() draws one sample; use generate() for num_samples > 1")
        for event in self._events([self.encode_prompt(prompt, truncate, config.max_new_tokens)], config):
            if isinstance(event, tuple):
                yield event[1]

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (``[{"role": "system"|"user"|"assistant", "content": ...}]``)
        rendered by the tokenizer's chat template (lmforge's default one if it has none), ending
        with the cue for the assistant's answer."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {role, content} objects")
        try:
            return chat_prompt_ids(self.tokenizer, to_messages({"messages": messages}, "chat"))
        except DataError as exc:
            raise RequestError(str(exc)) from None

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> Completion:
        """The assistant's next message for a conversation (see :meth:`chat_prompt`)."""
        config = sampling_config({**sampling, "num_samples": 1})
        return next(e for e in self._events([self._fit(self.chat_prompt(messages), config)], config)
                    if isinstance(e, Completion))

    def stream_chat(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """Yield the assistant's next message piece by piece."""
        config = sampling_config({**sampling, "num_samples": 1})
        for event in self._events([self._fit(self.chat_prompt(messages), config)], config):
            if isinstance(event, tuple):
                yield event[1]

    def _fit(self, ids: list[int], config: SamplingConfig) -> tuple[list[int], int]:
        if len(ids) > self.context_length:
            raise RequestError(f"the conversation is {len(ids)} tokens long but the model's context is "
                               f"{self.context_length} tokens")
        return ids, 0

    def _events(self, encoded: list[tuple[list[int], int]],
                config: SamplingConfig) -> Iterator[tuple[int, str] | Completion]:
        """Yield ``(row, text piece)`` as text becomes final, then one :class:`Completion` per row.
        ``encoded`` holds ``(prompt ids, tokens truncation dropped)`` per prompt."""
        rows = [ids for ids, _ in encoded for _ in range(config.num_samples)]
        dropped = [n for _, n in encoded for _ in range(config.num_samples)]
        streams = [TextStream(self.tokenizer, config.stop) for _ in rows]
        generated: list[list[int]] = [[] for _ in rows]
        reasons = ["length"] * len(rows)
        eos = None if config.ignore_eos else self.tokenizer.eos_id
        generator = TokenGenerator(self.model, rows, config, eos, self.tokenizer.pad_id or 0)
        for next_ids in generator:
            done = []
            for row, token in enumerate(next_ids.tolist()):
                if reasons[row] == "stop":
                    continue
                if token == eos:
                    reasons[row] = "stop"
                    continue
                generated[row].append(token)
                piece = streams[row].push(token)
                if piece:
                    yield row, piece
                if streams[row].stopped:
                    reasons[row] = "stop"
                    done.append(row)
            if done:
                generator.finish(done)
        for row, stream in enumerate(streams):
            rest = stream.close()
            if rest:
                yield row, rest
            yield Completion(stream.text, generated[row], reasons[row], len(rows[row]), dropped[row])

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def token_logprobs(self, text: str, stride: int | None = None) -> torch.Tensor:
        """Log-probability of every token of ``text`` given the ones before it (the first given the
        start-of-document token, :attr:`Tokenizer.start_ids`). Texts longer than the context are
        scored with sliding windows that advance by ``stride`` tokens (default: the context; smaller
        strides give each token more context). Returns a 1-D float tensor, one entry per token."""
        ids = self.tokenizer.start_ids + self.tokenizer.encode(text)
        block = self.context_length
        stride = block if stride is None else stride
        if not 0 < stride <= block:
            raise ConfigError(f"stride must be between 1 and the context ({block}), not {stride}")
        tokens = torch.tensor(ids, device=self.device)
        scores = torch.empty(len(ids) - 1, device=self.device)
        windows = []  # (start, first, end): window tokens [start, end) score targets [first, end)
        first = 1
        while first < len(ids):
            end = min(first + (stride if first > 1 else block), len(ids))
            windows.append((max(0, end - block - 1), first, end))
            first = end
        batch_size = max(1, 16384 // block)
        for i in range(0, len(windows), batch_size):  # windows of equal length share a forward pass
            group = [w for w in windows[i:i + batch_size] if w[2] - w[0] == windows[i][2] - windows[i][0]]
            rest = [w for w in windows[i:i + batch_size] if w not in group]
            for chunk in (group, *([w] for w in rest)):
                batch = torch.stack([tokens[start:end] for start, _, end in chunk])  # (B, T + 1)
                logprobs = self.model(batch[:, :-1]).float().log_softmax(-1)
                logprobs = logprobs.gather(-1, batch[:, 1:, None])[..., 0]  # (B, T)
                for row, (start, first, end) in enumerate(chunk):
                    scores[first - 1:end - 1] = logprobs[row, first - start - 1:]
        return scores.cpu()

    def score(self, text: str, stride: int | None = None) -> float:
        """Log-likelihood of ``text`` in nats (sum of its token log-probabilities)."""
        return float(self.token_logprobs(text, stride).double().sum())

    def perplexity(self, text: str, stride: int | None = None) -> float:
        """exp(mean negative log-likelihood per token) of ``text``."""
        if not text:
            raise RequestError("cannot compute the perplexity of empty text")
        logprobs = self.token_logprobs(text, stride).double()
        return math.exp(-float(logprobs.mean()))


def _as_list(prompts: str | list[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts must be a string or a non-empty list of strings")
    return prompts

