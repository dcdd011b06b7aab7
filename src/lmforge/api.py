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
* a masked-language model (``lmforge pretrain`` of an encoder): ``fill_mask``.

Every task method takes a string or a list of strings (batched) and answers in kind. The CLI and
the server call these same methods.
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
from lmforge.evaluation.harness import CLASSIFICATION_TEMPLATE, label_scores, qa_prompt
from lmforge.inference.detokenize import TextStream
from lmforge.inference.generate import TokenGenerator
from lmforge.inference.tasks import Answer, answer_questions, classify_texts, translate_texts
from lmforge.interop.hf import is_hf_folder, load_hf
from lmforge.options import build_dataclass
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import load_model

SUMMARIZE_TEMPLATE = "{text}\n\nTL;DR:"
TRANSLATE_TEMPLATE = "Translate this text from {source} to {target}.\n{source}: {text}\n{target}:"
ANALYZE_TEMPLATE = "{context}\n\n{text}"
GENERATIVE = ("generate", "complete", "stream", "chat", "stream_chat", "score", "perplexity", "token_logprobs")
CAPABILITIES = {  # kind of checkpoint -> what it can do
    "causal_lm": (*GENERATIVE, "classify", "answer", "translate", "summarize", "analyze"),
    "classification": ("classify",),
    "qa": ("answer",),
    "seq2seq": ("generate", "translate", "summarize", "analyze"),
    "masked_lm": ("fill_mask",),
}
TASK_DEFAULTS = {"temperature": 0.0, "max_new_tokens": 64}  # the generative tasks decode greedily by default
SEQ2SEQ_OPTIONS = ("beam_size", "length_penalty", "early_stopping", "no_repeat_ngram_size", "mbr")


@dataclass
class Classification:
    """Scores of a text's candidate labels: probabilities that sum to 1 (single-label), or one
    independent probability per label (multi-label)."""

    scores: dict[str, float]
    label: str                  # the most likely label
    labels: list[str]           # multi-label: the labels over their thresholds; else [label]


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
        self.task: dict[str, Any] = dict(self.info.get("task") or {})
        self.kind = self.task.get("kind") or {"encoder": "masked_lm", "seq2seq": "seq2seq"}.get(
            model.config.family, "causal_lm")
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
        capabilities = CAPABILITIES[self.kind]
        if self.kind == "seq2seq" and self.task.get("purpose") in ("translation", "summarization"):
            unwanted = "summarize" if self.task["purpose"] == "translation" else "translate"
            capabilities = tuple(c for c in capabilities if c != unwanted)
        return capabilities

    def _require(self, method: str) -> None:
        if method not in self.capabilities:
            what = {"causal_lm": "language model", "classification": "classifier", "qa": "extractive QA model",
                    "seq2seq": f"{self.task.get('purpose', 'seq2seq')} model", "masked_lm": "masked-language model"}
            raise RequestError(f"this checkpoint is a {what[self.kind]} ({self.model.config.family} family): it "
                               f"cannot {method}; it can {', '.join(self.capabilities)}")

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
        self._require("complete")
        config = sampling_config(sampling)
        encoded = [self.encode_prompt(p, truncate, config.max_new_tokens) for p in _as_list(prompts)]
        return [event for event in self._events(encoded, config) if isinstance(event, Completion)]

    def generate(self, prompt: str | list[str], truncate: bool = False, **sampling: Any) -> Any:
        """Generated text: a string for one prompt, a list of strings for a list of prompts; with
        ``num_samples > 1`` each prompt gives a list of samples instead of a string. An encoder-decoder
        maps each text to its output (see :meth:`translate` for the options)."""
        self._require("generate")
        if self.kind == "seq2seq":
            return self._seq2seq(prompt, **sampling)
        n = sampling_config(sampling).num_samples
        texts = [c.text for c in self.complete(prompt, truncate, **sampling)]
        grouped: list[Any] = texts if n == 1 else [texts[i:i + n] for i in range(0, len(texts), n)]
        return grouped[0] if isinstance(prompt, str) else grouped

    def stream(self, prompt: str, truncate: bool = False, **sampling: Any) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece, as it is produced."""
        self._require("stream")
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
        self._require("chat")
        config = sampling_config({**sampling, "num_samples": 1})
        return next(e for e in self._events([self._fit(self.chat_prompt(messages), config)], config)
                    if isinstance(e, Completion))

    def stream_chat(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """Yield the assistant's next message piece by piece."""
        self._require("stream_chat")
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
        self._require("token_logprobs")
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
        self._require("score")
        return float(self.token_logprobs(text, stride).double().sum())

    def perplexity(self, text: str, stride: int | None = None) -> float:
        """exp(mean negative log-likelihood per token) of ``text``."""
        self._require("perplexity")
        if not text:
            raise RequestError("cannot compute the perplexity of empty text")
        logprobs = self.token_logprobs(text, stride).double()
        return math.exp(-float(logprobs.mean()))


    # ------------------------------------------------------------------ tasks
    def classify(self, text: str | list[str], labels: list[str] | None = None,
                 template: str | None = None) -> Classification | list[Classification]:
        """Scores of candidate labels for a text (or a list of texts).

        A classifier scores its own labels (``labels`` may pick a subset; single-label probabilities
        are renormalised over it). A causal language model needs ``labels`` and scores each one's
        log-likelihood after ``template`` (zero-shot, :func:`lmforge.evaluation.harness.label_scores`),
        turned into probabilities over the candidates.
        """
        self._require("classify")
        texts = _as_list(text, "texts")
        if self.kind == "classification":
            known = list(self.task["labels"])
            multi = bool(self.task.get("multi_label"))
            chosen = known if labels is None else _checked_labels(labels, known)
            probs = classify_texts(self.model, self.tokenizer, texts, multi)[:, [known.index(x) for x in chosen]]
            if not multi:
                probs = probs / probs.sum(-1, keepdim=True)
            thresholds = self.task.get("thresholds") or [0.5] * len(known)
            cut = torch.tensor([thresholds[known.index(x)] for x in chosen]) if multi else None
        else:
            if labels is None:
                raise RequestError("zero-shot classification with a language model needs candidate labels")
            chosen = _checked_labels(labels, None)
            probs = label_scores(self, texts, chosen, template or CLASSIFICATION_TEMPLATE).softmax(-1).float()
            cut = None
        results = []
        for row in probs:
            best = chosen[int(row.argmax())]
            picked = [x for x, p, t in zip(chosen, row.tolist(), cut.tolist()) if p >= t] if cut is not None else [best]
            results.append(Classification({x: float(p) for x, p in zip(chosen, row.tolist())}, best, picked))
        return results[0] if isinstance(text, str) else results

    def answer(self, question: str | list[str], context: str | list[str], **options: Any) -> Answer | list[Answer]:
        """The answer to a question about a context (or lists of both): its text, a score and its
        character span in the context. An extractive QA model picks the best span over windows of
        the context; a language model generates after :data:`~lmforge.evaluation.harness.QA_TEMPLATE`
        (score: mean log-probability of the answer's tokens; span: where the answer occurs in the
        context, or None)."""
        self._require("answer")
        questions, contexts = _as_list(question, "questions"), _as_list(context, "contexts")
        if len(questions) != len(contexts):
            raise RequestError(f"{len(questions)} questions but {len(contexts)} contexts")
        if self.kind == "qa":
            if options:
                raise ConfigError(f"an extractive QA model takes no generation options, got {', '.join(options)}")
            answers = answer_questions(self.model, self.tokenizer, questions, contexts, self.context_length,
                                       int(self.task.get("stride", 128)), int(self.task.get("max_answer_tokens", 30)))
        else:
            answers = [self._generated_answer(q, c, options) for q, c in zip(questions, contexts)]
        return answers[0] if isinstance(question, str) else answers

    def _generated_answer(self, question: str, context: str, options: dict[str, Any]) -> Answer:
        config = sampling_config({**TASK_DEFAULTS, "max_new_tokens": 32, "stop": ["\n"], **options})
        budget = self.context_length - min(config.max_new_tokens, self.context_length // 2)
        prompt, _ = qa_prompt(self.tokenizer, context, question, budget)
        completion = next(e for e in self._events([(prompt, 0)], config) if isinstance(e, Completion))
        text = completion.text.strip()
        ids = completion.token_ids
        score = float("nan")
        if ids:
            with torch.inference_mode():
                tokens = torch.tensor([prompt + ids], device=self.device)
                logprobs = self.model(tokens[:, :-1]).float().log_softmax(-1)[0, len(prompt) - 1:]
                score = float(logprobs.gather(-1, tokens[0, len(prompt):, None]).mean())
        start = context.find(text) if text else -1
        return Answer(text, score, *((start, start + len(text)) if start >= 0 else (None, None)))

    def translate(self, text: str | list[str], source: str | None = None, target: str = "German",
                  **options: Any) -> str | list[str]:
        """The translation of a text (or a list). An encoder-decoder translates what it was trained
        on (``source``/``target`` are ignored); a language model is prompted with
        :data:`TRANSLATE_TEMPLATE`. Options: ``max_new_tokens``, sampling options, and for
        encoder-decoders ``beam_size``, ``length_penalty``, ``early_stopping``, ``no_repeat_ngram_size`` and
        ``mbr`` (``"bleu"`` or ``"chrf"``: of the beam's hypotheses, the one that agrees most with the
        others; minimum Bayes risk decoding, :mod:`lmforge.inference.mbr`)."""
        self._require("translate")
        if self.kind == "seq2seq":
            return self._seq2seq(text, **options)
        return self._prompted(text, lambda t: TRANSLATE_TEMPLATE.format(
            text=t, source=source or "the source language", target=target), options)

    def summarize(self, text: str | list[str], **options: Any) -> str | list[str]:
        """A summary of a text (or a list); options as :meth:`translate`."""
        self._require("summarize")
        if self.kind == "seq2seq":
            return self._seq2seq(text, **options)
        return self._prompted(text, lambda t: SUMMARIZE_TEMPLATE.format(text=t), options)

    def analyze(self, text: str | list[str], context: str | list[str], **options: Any) -> str | list[str]:
        """Text generated for ``text`` conditioned on ``context`` (the context, a blank line, then the
        text: :data:`ANALYZE_TEMPLATE`); options as :meth:`translate`."""
        self._require("analyze")
        texts, contexts = _as_list(text, "texts"), _as_list(context, "contexts")
        if len(texts) != len(contexts):
            raise RequestError(f"{len(texts)} texts but {len(contexts)} contexts")
        joined = [ANALYZE_TEMPLATE.format(context=c, text=t) for t, c in zip(texts, contexts)]
        if self.kind == "seq2seq":
            outputs = self._seq2seq(joined, **options)
        else:
            outputs = self._prompted(joined, lambda t: t, options)
        return outputs[0] if isinstance(text, str) else outputs

    def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """A masked-language model's ``top_k`` guesses (token text, probability) for each
        ``<|mask|>`` in ``text``."""
        self._require("fill_mask")
        mask = self.tokenizer.mask_id
        ids = self.tokenizer.encode_with_special(text)
        positions = [i for i, token in enumerate(ids) if token == mask]
        if not positions:
            raise RequestError(f"no {self.tokenizer.special.get('mask', '<|mask|>')} token in the text")
        if len(ids) > self.context_length:
            raise RequestError(f"the text is {len(ids)} tokens long but the model's context is {self.context_length}")
        with torch.inference_mode():
            probs = self.model(torch.tensor([ids], device=self.device))[0, positions].float().softmax(-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[(self.tokenizer.decode([i], skip_special_tokens=False), float(p))
                 for i, p in zip(row_ids.tolist(), row_p.tolist())] for row_ids, row_p in zip(top.indices, top.values)]

    def _prompted(self, text: str | list[str], template: Any, options: dict[str, Any]) -> str | list[str]:
        """Generation after a template (as a user message when the tokenizer has a chat template)."""
        config = sampling_config({**TASK_DEFAULTS, **options, "num_samples": 1})
        outputs = []
        for item in _as_list(text, "texts"):
            prompt = template(item)
            if self.tokenizer.chat_template is not None:
                encoded = self._fit(self.chat_prompt([{"role": "user", "content": prompt}]), config)
            else:
                encoded = self.encode_prompt(prompt, False, config.max_new_tokens)
            completion = next(e for e in self._events([encoded], config) if isinstance(e, Completion))
            outputs.append(completion.text.strip())
        return outputs[0] if isinstance(text, str) else outputs

    def _seq2seq(self, text: str | list[str], **options: Any) -> str | list[str]:
        """An encoder-decoder's outputs for source texts."""
        beam = {k: options.pop(k) for k in SEQ2SEQ_OPTIONS if k in options}
        config = sampling_config({**TASK_DEFAULTS, **options})
        if config.num_samples != 1:
            raise ConfigError("an encoder-decoder gives one output per text; num_samples must be 1")
        beam_size = beam.get("beam_size", 1)
        if not isinstance(beam_size, int) or beam_size < 1:
            raise ConfigError(f"beam_size must be a whole number >= 1, not {beam_size!r}")
        outputs = translate_texts(self.model, self.tokenizer, _as_list(text, "texts"),
                                  max_new_tokens=config.max_new_tokens, sampling=None if beam_size > 1 else config,
                                  **beam)
        return outputs[0] if isinstance(text, str) else outputs


def _checked_labels(labels: Any, known: list[str] | None) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)) or not labels or \
            not all(isinstance(x, str) and x for x in labels):
        raise RequestError("labels must be a non-empty list of label names")
    if len(set(labels)) != len(labels):
        raise RequestError("labels must not repeat")
    if known is not None:
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise RequestError(f"unknown label(s) {', '.join(unknown[:5])}; this classifier knows {', '.join(known)}")
    return list(labels)


def _as_list(prompts: str | list[str], what: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(f"{what} must be a string or a non-empty list of strings")
    return prompts

