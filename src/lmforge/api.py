"""The Python API: ``LanguageModel`` loads a checkpoint and generates, streams and scores text.

>>> from lmforge import LanguageModel
>>> lm = LanguageModel.load("runs/quickstart")                  # a run or checkpoint directory
>>> lm.generate("The for statement", max_new_tokens=40, temperature=0)
>>> for piece in lm.stream("import", max_new_tokens=40): print(piece, end="")
>>> lm.perplexity("Some text.")

What else a model can do depends on what the checkpoint is (:attr:`LanguageModel.capabilities`):

* a causal language model (decoder or LSTM) does everything, the tasks through prompt templates:
  ``classify(text, labels)`` scores each candidate label's likelihood (zero-shot), ``answer``,
  ``translate``, ``summarize`` and ``analyze`` generate;
* a classifier (``lmforge finetune --task classification``): ``classify(text, labels=None)``;
* an extractive QA model (``--task qa``): ``answer(question, context)`` -> text, score, span;
* an encoder-decoder (``--task seq2seq``): ``translate``/``summarize`` (what it was trained for),
  ``analyze`` and ``generate``, with greedy, sampling or beam search;
* a masked-language model (``lmforge pretrain`` of an encoder): ``fill_mask``;
* a reward model (``lmforge train-reward``): ``reward(prompt, reply)``, ``score_pair``.

A causal language model also trains on: ``lm.rl(prompts, reward=...)``, ``lm.dpo(pairs)`` and
``lm.train_reward(pairs)`` run :mod:`lmforge.alignment` from its checkpoint and return the result's
best checkpoint as a new ``LanguageModel``.

Every task method takes a string or a list of strings (batched) and answers in kind. The CLI and
the server call these same methods. ``LanguageModel`` is a facade: prompts, scoring and generation are
the text core's (:mod:`lmforge.inference.prompts`, :mod:`~lmforge.inference.scoring`,
:mod:`~lmforge.inference.completion`), and what differs by kind of checkpoint is its adapter's
(:mod:`lmforge.inference.kinds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmforge.config import SamplingConfig
from lmforge.device import select_device, select_dtype
from lmforge.errors import ConfigError, RequestError
from lmforge.inference.completion import Completion, complete, stream_completions
from lmforge.inference.kinds import SEQ2SEQ_OPTIONS, TASK_DEFAULTS, KindAdapter, adapter_for
from lmforge.inference.prompts import (
    ANALYZE_TEMPLATE,
    SUMMARIZE_TEMPLATE,
    TRANSLATE_TEMPLATE,
    Prompt,
    chat_prompt,
    encode_prompt,
    fit_prompt,
)
from lmforge.inference.scoring import token_logprobs
from lmforge.inference.task_models import Answer, Classification
from lmforge.interop.hf import is_hf_folder, load_hf
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import load_model

__all__ = ["ANALYZE_TEMPLATE", "SEQ2SEQ_OPTIONS", "SUMMARIZE_TEMPLATE", "TASK_DEFAULTS", "TRANSLATE_TEMPLATE",
           "Answer", "Classification", "Completion", "LanguageModel", "sampling_config"]

#: Sampling options from keyword arguments: :meth:`SamplingConfig.from_options` (kept under its old name).
sampling_config = SamplingConfig.from_options


class LanguageModel:
    """A loaded checkpoint with its tokenizer; what it can do depends on its kind (:attr:`capabilities`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, info: dict[str, Any] | None = None,
                 path: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = info or {}
        self.path = path
        self.task: dict[str, Any] = dict(self.info.get("task") or {})
        self.adapter: KindAdapter = adapter_for(model, tokenizer, self.task)
        self.kind = self.adapter.kind
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                              f"{model.config.vocab_size}")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "fp32") -> LanguageModel:
        """Load a checkpoint or run directory, or a Hugging Face GPT-2/Llama folder (converted in
        memory). ``dtype`` sets the weights' precision (fp32, bf16, fp16; ``auto`` picks bf16 where
        the device has it natively)."""
        target = select_device(device)
        model, tokenizer, info = load_hf(path) if is_hf_folder(path) else load_model(path)
        model = model.to(device=target, dtype=select_dtype(dtype, target))
        return cls(model, tokenizer, info, Path(path))

    @classmethod
    def load_ensemble(cls, paths: list[str | Path], device: str = "auto", dtype: str = "fp32") -> LanguageModel:
        """Several encoder-decoder checkpoints with the same tokenizer as one model that averages their
        next-token probabilities (:class:`~lmforge.models.ensemble.Seq2SeqEnsemble`); it translates,
        summarizes and generates like one checkpoint, with the first checkpoint's task record."""
        from lmforge.models.ensemble import Seq2SeqEnsemble

        if len(paths) < 2:
            raise ConfigError("an ensemble needs at least two checkpoints")
        members = [cls.load(path, device, dtype) for path in paths]
        for path, member in zip(paths, members):
            if member.kind != "seq2seq":
                raise ConfigError(f"{path} is not an encoder-decoder checkpoint; only seq2seq models can be ensembled")
            if member.tokenizer.fingerprint() != members[0].tokenizer.fingerprint():
                raise ConfigError(f"{path} has another tokenizer than {paths[0]}; ensemble members must share one")
        info = {**members[0].info, "ensemble": [str(p) for p in paths]}
        return cls(Seq2SeqEnsemble([m.model for m in members]), members[0].tokenizer, info, Path(paths[0]))

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.model.config.block_size

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The methods this checkpoint supports (see the module's docstring)."""
        return self.adapter.capabilities

    def _require(self, method: str) -> KindAdapter:
        self.adapter.require(method)
        return self.adapter

    # ------------------------------------------------------------------ generation
    def encode_prompt(self, prompt: str, truncate: bool = False, reserve: int = 0) -> tuple[list[int], int]:
        """Token ids of a prompt, and how many tokens truncation dropped.

        An empty prompt is the start-of-document token (:attr:`Tokenizer.start_ids`); tokenizers that
        start texts with bos (Llama's) get it in front of every prompt
        (:func:`~lmforge.inference.prompts.prompt_head`). A prompt longer than the context is an error,
        or with ``truncate`` loses its start (after bos), keeping room for ``reserve`` new tokens (at
        most half the context).
        """
        fitted = fit_prompt(encode_prompt(self.tokenizer, prompt), self.tokenizer, self.context_length,
                            truncate=truncate, reserve=reserve, hint="; shorten it or allow truncation")
        return fitted.ids, fitted.dropped

    def _prompts(self, prompts: str | list[str], truncate: bool, config: SamplingConfig) -> list[Prompt]:
        return [Prompt(*self.encode_prompt(p, truncate, config.max_new_tokens)) for p in _as_list(prompts)]

    def complete(self, prompts: str | list[str], truncate: bool = False, **sampling: Any) -> list[Completion]:
        """Generate for one prompt or a batch; returns ``len(prompts) * num_samples`` completions,
        the samples of each prompt together. Keyword arguments are :class:`SamplingConfig` fields."""
        self._require("complete")
        config = SamplingConfig.from_options(None, **sampling)
        return complete(self.model, self.tokenizer, self._prompts(prompts, truncate, config), config)

    def generate(self, prompt: str | list[str], truncate: bool = False, **sampling: Any) -> Any:
        """Generated text: a string for one prompt, a list of strings for a list of prompts; with
        ``num_samples > 1`` each prompt gives a list of samples instead of a string. An encoder-decoder
        maps each text to its output (see :meth:`translate` for the options)."""
        adapter = self._require("generate")
        if hasattr(adapter, "generate"):  # an encoder-decoder maps texts to texts
            return _in_kind(prompt, adapter.generate(_as_list(prompt, "texts"), dict(sampling)))
        n = SamplingConfig.from_options(None, **sampling).num_samples
        texts = [c.text for c in self.complete(prompt, truncate, **sampling)]
        grouped: list[Any] = texts if n == 1 else [texts[i:i + n] for i in range(0, len(texts), n)]
        return grouped[0] if isinstance(prompt, str) else grouped

    def stream(self, prompt: str, truncate: bool = False, **sampling: Any) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece, as it is produced."""
        self._require("stream")
        config = SamplingConfig.from_options(None, **sampling)
        if config.num_samples != 1:
            raise ConfigError("stream() draws one sample; use generate() for num_samples > 1")
        yield from self._pieces(self._prompts(prompt, truncate, config)[0], config)

    def _pieces(self, prompt: Prompt, config: SamplingConfig) -> Iterator[str]:
        for event in stream_completions(self.model, self.tokenizer, [prompt], config):
            if isinstance(event, tuple):
                yield event[1]

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (``[{"role": "system"|"user"|"assistant", "content": ...}]``)
        rendered by the tokenizer's chat template (lmforge's default one if it has none), ending
        with the cue for the assistant's answer."""
        return chat_prompt(self.tokenizer, messages)

    def _chat(self, messages: list[dict[str, str]], sampling: dict[str, Any]) -> tuple[Prompt, SamplingConfig]:
        config = SamplingConfig.from_options(None, **{**sampling, "num_samples": 1})
        ids = fit_prompt(self.chat_prompt(messages), self.tokenizer, self.context_length, what="conversation",
                         param="messages")
        return ids, config

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> Completion:
        """The assistant's next message for a conversation (see :meth:`chat_prompt`)."""
        self._require("chat")
        prompt, config = self._chat(messages, sampling)
        return complete(self.model, self.tokenizer, [prompt], config)[0]

    def stream_chat(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """Yield the assistant's next message piece by piece."""
        self._require("stream_chat")
        yield from self._pieces(*self._chat(messages, sampling))

    # ------------------------------------------------------------------ scoring
    def token_logprobs(self, text: str, stride: int | None = None) -> torch.Tensor:
        """Log-probability of every token of ``text`` given the ones before it (the first given the
        start-of-document token, :attr:`Tokenizer.start_ids`). Texts longer than the context are
        scored with sliding windows that advance by ``stride`` tokens (default: the context; smaller
        strides give each token more context). Returns a 1-D float tensor, one entry per token."""
        self._require("token_logprobs")
        return token_logprobs(self.model, self.tokenizer, text, stride)

    def score(self, text: str, stride: int | None = None) -> float:
        """Log-likelihood of ``text`` in nats (sum of its token log-probabilities)."""
        self._require("score")
        return float(self.token_logprobs(text, stride).double().sum())

    def perplexity(self, text: str, stride: int | None = None) -> float:
        """exp(mean negative log-likelihood per token) of ``text``."""
        self._require("perplexity")
        if not text:
            raise RequestError("cannot compute the perplexity of empty text")
        return math.exp(-float(self.token_logprobs(text, stride).double().mean()))

    # ------------------------------------------------------------------ tasks
    def classify(self, text: str | list[str], labels: list[str] | None = None,
                 template: str | None = None) -> Classification | list[Classification]:
        """Scores of candidate labels for a text (or a list of texts).

        A classifier scores its own labels (``labels`` may pick a subset; single-label probabilities
        are renormalised over it). A causal language model needs ``labels`` and scores each one's
        log-likelihood after ``template`` (zero-shot, :func:`lmforge.inference.scoring.label_scores`),
        turned into probabilities over the candidates.
        """
        adapter = self._require("classify")
        texts = _as_list(text, "texts")
        chosen, probs, cut = adapter.classify(texts, None if labels is None else _checked_labels(labels), template)
        results = []
        for row in probs:
            best = chosen[int(row.argmax())]
            picked = [x for x, p, t in zip(chosen, row.tolist(), cut.tolist()) if p >= t] if cut is not None else [best]
            results.append(Classification({x: float(p) for x, p in zip(chosen, row.tolist())}, best, picked))
        return _in_kind(text, results)

    def answer(self, question: str | list[str], context: str | list[str], truncate: bool = False,
               **options: Any) -> Answer | list[Answer]:
        """The answer to a question about a context (or lists of both): its text, a score and its
        character span in the context. An extractive QA model picks the best span over windows of
        the context; a language model generates after :data:`~lmforge.inference.prompts.QA_TEMPLATE`
        (score: mean log-probability of the answer's tokens; span: where the answer occurs in the
        context, or None). A context too long for a language model's prompt is an error, or with
        ``truncate`` loses its start."""
        adapter = self._require("answer")
        questions, contexts = _paired(question, context, "questions", "contexts")
        return _in_kind(question, adapter.answer(questions, contexts, options, truncate))

    def translate(self, text: str | list[str], source: str | None = None, target: str = "German",
                  truncate: bool = False, **options: Any) -> str | list[str]:
        """The translation of a text (or a list). An encoder-decoder translates what it was trained
        on (``source``/``target`` are ignored); a language model is prompted with
        :data:`TRANSLATE_TEMPLATE` (a text too long for the prompt is an error, or with ``truncate``
        loses its start). Options: ``max_new_tokens``, sampling options, and for encoder-decoders
        ``beam_size``, ``length_penalty``, ``early_stopping``, ``no_repeat_ngram_size`` and ``mbr``
        (``"bleu"`` or ``"chrf"``: of the beam's hypotheses, the one that agrees most with the others;
        minimum Bayes risk decoding, :mod:`lmforge.inference.mbr`)."""
        adapter = self._require("translate")
        return _in_kind(text, adapter.translate(_as_list(text, "texts"), source, target, options, truncate))

    def summarize(self, text: str | list[str], truncate: bool = False, **options: Any) -> str | list[str]:
        """A summary of a text (or a list); options as :meth:`translate`."""
        adapter = self._require("summarize")
        return _in_kind(text, adapter.summarize(_as_list(text, "texts"), options, truncate))

    def analyze(self, text: str | list[str], context: str | list[str], truncate: bool = False,
                **options: Any) -> str | list[str]:
        """Text generated for ``text`` conditioned on ``context`` (the context, a blank line, then the
        text: :data:`ANALYZE_TEMPLATE`); options as :meth:`translate`."""
        adapter = self._require("analyze")
        texts, contexts = _paired(text, context, "texts", "contexts")
        return _in_kind(text, adapter.analyze(texts, contexts, options, truncate))

    def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """A masked-language model's ``top_k`` guesses (token text, probability) for each
        ``<|mask|>`` in ``text``."""
        self._require("fill_mask")
        mask = self.tokenizer.mask_id
        ids = self.tokenizer.encode_with_special(text)
        positions = [i for i, token in enumerate(ids) if token == mask]
        if not positions:
            raise RequestError(f"no {self.tokenizer.special.get('mask', '<|mask|>')} token in the text")
        ids = fit_prompt(ids, self.tokenizer, self.context_length, what="text", param="text").ids
        with torch.inference_mode():
            probs = self.model(torch.tensor([ids], device=self.device))[0, positions].float().softmax(-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[(self.tokenizer.decode([i], skip_special_tokens=False), float(p))
                 for i, p in zip(row_ids.tolist(), row_p.tolist())] for row_ids, row_p in zip(top.indices, top.values)]


    # ------------------------------------------------------------------ media
    def caption(self, image: Any, **options: Any) -> str | list[str]:
        """The caption of an image (a path, bytes, a PIL image or an (H, W, 3) array), or of a list of
        them (batched). Options: ``max_new_tokens`` and the sampling options (greedy by default)."""
        adapter = self._require("caption")
        sources, one = _media_list(image)
        return _one_or_list(one, adapter.media_text(sources, [""] * len(sources), options))

    def ask(self, media: Any, question: str | list[str], **options: Any) -> str | list[str]:
        """The answer to a question about an image (or a video, for a video model); lists of both
        (one question each, or one question for all) are batched. Options as :meth:`caption`."""
        adapter = self._require("ask")
        sources, one = _media_list(media)
        questions = _as_list(question, "questions")
        if len(questions) == 1 and len(sources) > 1:
            questions = questions * len(sources)
        if len(questions) != len(sources):
            raise RequestError(f"{len(sources)} media but {len(questions)} questions")
        return _one_or_list(one, adapter.media_text(sources, questions, options))

    def transcribe(self, audio: Any, **options: Any) -> str | list[str]:
        """The transcript of a recording (a path, bytes of a WAV/FLAC/OGG/MP3 file, an array of samples
        at the model's sample rate, or ``(array, sample_rate)``), or of a list of them (batched)."""
        adapter = self._require("transcribe")
        sources, one = _media_list(audio)
        return _one_or_list(one, adapter.media_text(sources, [""] * len(sources), options))

    def describe(self, video: Any, **options: Any) -> str | list[str]:
        """The description of a clip (a video file's path or bytes, a folder of frames, a list of
        frames or an (F, H, W, 3) array), or of a list of clips (batched)."""
        adapter = self._require("describe")
        sources, one = _video_list(video)
        return _one_or_list(one, adapter.media_text(sources, [""] * len(sources), options))

    # ------------------------------------------------------------------ reward models
    def reward(self, prompt: Any, reply: str | list[str]) -> float | list[float]:
        """A reward model's score of a reply to a prompt (or of lists of both, batched); higher is better.
        A prompt is a string or a chat conversation (a list of ``{"role", "content"}`` messages, rendered
        with the checkpoint's chat template as in training)."""
        single = _is_one_prompt(prompt)
        prompts = [prompt] if single else prompt
        if not isinstance(prompts, list) or not prompts or not all(_is_one_prompt(p) for p in prompts):
            raise RequestError("prompts must be a string, a list of chat messages, or a non-empty list of those")
        replies = [reply] if isinstance(reply, str) else reply
        if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            raise RequestError("replies must be a string or a list of strings")
        if len(prompts) != len(replies):
            raise RequestError(f"{len(prompts)} prompts but {len(replies)} replies")
        scores = self._require("reward").reward(prompts, replies)
        return scores[0] if single else scores

    def score_pair(self, prompt: Any, chosen: str, rejected: str) -> float:
        """A reward model's probability that ``chosen`` is the better reply: ``sigmoid(r(chosen) - r(rejected))``
        (the Bradley-Terry model it was trained with); ``prompt`` as in :meth:`reward`."""
        first, second = self.reward([prompt, prompt], [chosen, rejected])
        return 1.0 / (1.0 + math.exp(-(first - second)))

    # ------------------------------------------------------------------ alignment runs from this checkpoint
    def _run_from_here(self, cls: type, options: dict[str, Any]) -> Any:
        from lmforge.options import build_dataclass

        if self.path is None:
            raise ConfigError("this model was not loaded from a checkpoint directory: save it and load it first")
        return build_dataclass(cls, {"checkpoint": str(self.path), **options})

    def rl(self, prompts: str | Path, reward: Any = "exact_answer", out: str | Path = "runs/rl",
           **options: Any) -> LanguageModel:
        """Policy optimisation (GRPO by default) from this checkpoint on a JSONL prompt set against
        ``reward``: a spec (``"exact_answer"``, ``"pkg.mod:func"``, ...), a callable
        ``reward(prompts, completions, **columns)``, or a list of them. ``options`` are
        :class:`~lmforge.alignment.config.RLConfig`'s (``num_generations=8, beta=0.04,
        train={"max_steps": 100}, lora={"r": 8}``). Returns the best checkpoint, loaded."""
        from lmforge.alignment.config import RLConfig
        from lmforge.alignment.policy_optimization import rl

        rewards = list(reward) if isinstance(reward, (list, tuple)) else [reward]
        specs = [r for r in rewards if isinstance(r, str)]
        config = self._run_from_here(RLConfig, {"prompts": str(prompts), "out": str(out), **options,
                                                **({"reward": specs} if len(specs) == len(rewards) else {})})
        result = rl(config, rewards=None if len(specs) == len(rewards) else rewards)
        return LanguageModel.load(result.best_checkpoint or result.final_checkpoint, device=str(self.device))

    def dpo(self, data: str | Path, out: str | Path = "runs/dpo", **options: Any) -> LanguageModel:
        """DPO from this checkpoint on JSONL preference pairs; ``options`` are
        :class:`~lmforge.alignment.config.PreferenceConfig`'s (``beta=0.1, loss_type="ipo"``, ...)."""
        from lmforge.alignment.config import PreferenceConfig
        from lmforge.alignment.preference_training import dpo

        result = dpo(self._run_from_here(PreferenceConfig, {"data": str(data), "out": str(out), **options}))
        return LanguageModel.load(result.best_checkpoint or result.final_checkpoint, device=str(self.device))

    def train_reward(self, data: str | Path, out: str | Path = "runs/reward", **options: Any) -> LanguageModel:
        """A reward model trained from this checkpoint on JSONL preference pairs (Bradley-Terry);
        the returned model scores with :meth:`reward` and :meth:`score_pair`."""
        from lmforge.alignment.config import PreferenceConfig
        from lmforge.alignment.preference_training import train_reward

        result = train_reward(self._run_from_here(PreferenceConfig, {"data": str(data), "out": str(out), **options}))
        return LanguageModel.load(result.best_checkpoint or result.final_checkpoint, device=str(self.device))


def _checked_labels(labels: Any) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)) or not labels or \
            not all(isinstance(x, str) and x for x in labels):
        raise RequestError("labels must be a non-empty list of label names", param="labels")
    if len(set(labels)) != len(labels):
        raise RequestError("labels must not repeat", param="labels")
    return list(labels)


def _as_list(prompts: str | list[str], what: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(f"{what} must be a string or a non-empty list of strings")
    return prompts


def _is_one_prompt(prompt: Any) -> bool:
    """A string, or a chat conversation: a non-empty list of message dicts."""
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                       and all(isinstance(m, dict) for m in prompt))


def _paired(first: str | list[str], second: str | list[str], names: str, other: str) -> tuple[list[str], list[str]]:
    a, b = _as_list(first, names), _as_list(second, other)
    if len(a) != len(b):
        raise RequestError(f"{len(a)} {names} but {len(b)} {other}")
    return a, b


def _media_list(media: Any) -> tuple[list[Any], bool]:
    """(the media as a list, whether one was given): a list or tuple of several is a batch, except an
    ``(array, sample_rate)`` pair, which is one recording."""
    pair = isinstance(media, tuple) and len(media) == 2 and isinstance(media[1], int)
    if isinstance(media, (list, tuple)) and not pair:
        if not media:
            raise RequestError("the list of media is empty")
        return list(media), False
    return [media], True


def _video_list(video: Any) -> tuple[list[Any], bool]:
    """As :func:`_media_list`, but a list of frames (images) is one clip; a list of clips is a batch."""
    if isinstance(video, list) and video and not all(isinstance(v, (str, Path, bytes)) or _is_clip_array(v)
                                                     for v in video):
        return [video], True
    return _media_list(video)


def _is_clip_array(value: Any) -> bool:
    return hasattr(value, "ndim") and value.ndim == 4


def _one_or_list(one: bool, results: list[Any]) -> Any:
    return results[0] if one else results


def _in_kind(given: str | list[str], results: list[Any]) -> Any:
    """One result for a string, the list for a list."""
    return results[0] if isinstance(given, str) else results
