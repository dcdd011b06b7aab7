"""What each kind of checkpoint can do, behind one small adapter per kind.

A checkpoint is a causal language model (a decoder or an LSTM), a classifier, an extractive QA model,
an encoder-decoder or a masked-language model (:func:`kind_of`). :func:`adapter_for` gives its
:class:`KindAdapter`, which says what it can do (``capabilities``) and runs the tasks on lists of texts:
:class:`lmforge.api.LanguageModel` only checks its arguments and hands them over, so no other module
branches on the kind of model.

======================  =====================================================================
kind                    tasks
======================  =====================================================================
``causal_lm``           everything: generation, scoring, and the tasks through prompt templates
                        (:mod:`lmforge.inference.prompts`), ``classify`` by label likelihood
``classification``      ``classify`` with its own labels
``qa``                  ``answer``: the best span over windows of the context
``seq2seq``             ``translate``/``summarize`` (what it was trained for), ``analyze``,
                        ``generate``: greedy, sampling, beam search, minimum Bayes risk
``masked_lm``           ``fill_mask``
``reward``              ``reward``: a scalar score of (prompt, reply) (a Bradley-Terry reward model)
``media``               ``caption``/``ask`` (images), ``transcribe`` (audio), ``describe``/``ask`` (video)
======================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lmforge.config import SamplingConfig
from lmforge.data.media_rows import media_tensor
from lmforge.data.preferences import encode_reply
from lmforge.errors import ConfigError, DataError, RequestError
from lmforge.inference.completion import complete
from lmforge.inference.media import media_texts
from lmforge.inference.prompts import ANALYZE_TEMPLATE, CLASSIFICATION_TEMPLATE, prompt_head, task_prompt
from lmforge.inference.scoring import continuation_logprob, label_logprobs
from lmforge.inference.task_models import Answer, answer_questions, classify_texts, translate_texts
from lmforge.tokenizer import Tokenizer

GENERATIVE = ("generate", "complete", "stream", "chat", "stream_chat", "score", "perplexity", "token_logprobs")
TASK_DEFAULTS = {"temperature": 0.0, "max_new_tokens": 64}  # the generative tasks decode greedily by default
ANSWER_DEFAULTS = {**TASK_DEFAULTS, "max_new_tokens": 32, "stop": ["\n"]}
SEQ2SEQ_OPTIONS = ("beam_size", "length_penalty", "early_stopping", "no_repeat_ngram_size", "mbr")


def kind_of(model: nn.Module, task: dict[str, Any]) -> str:
    """The kind of a checkpoint: its task record's, else its family's."""
    return task.get("kind") or {"encoder": "masked_lm", "seq2seq": "seq2seq"}.get(model.config.family, "causal_lm")


class KindAdapter:
    """The tasks of one kind of checkpoint on lists of texts; what it cannot do it does not define."""

    kind = ""
    description = ""
    capabilities: tuple[str, ...] = ()
    generates_answers = False  # ``answer`` generates (and takes sampling options) rather than picking a span

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, task: dict[str, Any]):
        self.model, self.tokenizer, self.task = model, tokenizer, task

    @property
    def context_length(self) -> int:
        return self.model.config.block_size

    @property
    def engine_decodes(self) -> bool:
        """Whether the continuous-batching engine (:mod:`lmforge.inference.engine`) generates with it."""
        return False

    def label_policy(self) -> tuple[list[str] | None, bool, dict[str, float]]:
        """Its own labels (None: it scores the labels it is given), whether they are independent, and
        per-label probability thresholds (multi-label)."""
        return None, False, {}

    def require(self, method: str) -> None:
        """A :class:`RequestError` naming what the checkpoint is and can do, unless it can ``method``."""
        if method not in self.capabilities:
            raise RequestError(f"this checkpoint is a {self.description} ({self.model.config.family} family): it "
                               f"cannot {method}; it can {', '.join(self.capabilities)}")


class CausalLMAdapter(KindAdapter):
    """A decoder or LSTM language model: the tasks through prompt templates, decoded greedily by default."""

    kind, description = "causal_lm", "language model"
    capabilities = (*GENERATIVE, "classify", "answer", "translate", "summarize", "analyze")
    generates_answers = True

    @property
    def engine_decodes(self) -> bool:
        return self.model.config.family == "decoder"

    def classify(self, texts: list[str], labels: list[str] | None, template: str | None) -> tuple[list[str], Any, Any]:
        if labels is None:
            raise RequestError("zero-shot classification with a language model needs candidate labels", param="labels")
        scores, _ = label_logprobs(self.model, self.tokenizer, texts, labels, template or CLASSIFICATION_TEMPLATE)
        return labels, scores.softmax(-1).float(), None

    def task_prompts(self, task: str, fields: list[dict[str, str]], config: SamplingConfig,
                     truncate: bool) -> list[Any]:
        """The prompts of a prompted task (:func:`~lmforge.inference.prompts.task_prompt`), one per item."""
        return [task_prompt(self.tokenizer, task, f, self.context_length, reserve=config.max_new_tokens,
                            truncate=truncate) for f in fields]

    def _prompted(self, task: str, fields: list[dict[str, str]], options: dict[str, Any], truncate: bool,
                  defaults: dict[str, Any] = TASK_DEFAULTS) -> list[Any]:
        config = SamplingConfig.from_options(None, **{**defaults, **options, "num_samples": 1})
        prompts = self.task_prompts(task, fields, config, truncate)
        return [(prompt, complete(self.model, self.tokenizer, [prompt], config)[0]) for prompt in prompts]

    def answer(self, questions: list[str], contexts: list[str], options: dict[str, Any],
               truncate: bool = False) -> list[Answer]:
        fields = [{"question": q, "context": c} for q, c in zip(questions, contexts)]
        answers = []
        for (prompt, completion), context in zip(self._prompted("answer", fields, options, truncate, ANSWER_DEFAULTS),
                                                 contexts):
            text = completion.text.strip()
            score = continuation_logprob(self.model, prompt.ids, completion.token_ids)
            start = context.find(text) if text else -1
            answers.append(Answer(text, score, *((start, start + len(text)) if start >= 0 else (None, None))))
        return answers

    def translate(self, texts: list[str], source: str | None, target: str, options: dict[str, Any],
                  truncate: bool = False) -> list[str]:
        fields = [{"text": t, "source": source or "the source language", "target": target} for t in texts]
        return [c.text.strip() for _, c in self._prompted("translate", fields, options, truncate)]

    def summarize(self, texts: list[str], options: dict[str, Any], truncate: bool = False) -> list[str]:
        return [c.text.strip() for _, c in self._prompted("summarize", [{"text": t} for t in texts], options,
                                                           truncate)]

    def analyze(self, texts: list[str], contexts: list[str], options: dict[str, Any],
                truncate: bool = False) -> list[str]:
        fields = [{"text": t, "context": c} for t, c in zip(texts, contexts)]
        return [c.text.strip() for _, c in self._prompted("analyze", fields, options, truncate)]


class ClassifierAdapter(KindAdapter):
    """A sequence classifier: its own labels, single-label (softmax) or multi-label (one sigmoid each)."""

    kind, description, capabilities = "classification", "classifier", ("classify",)

    def label_policy(self) -> tuple[list[str] | None, bool, dict[str, float]]:
        labels, multi = list(self.task["labels"]), bool(self.task.get("multi_label"))
        thresholds = self.task.get("thresholds")
        return labels, multi, dict(zip(labels, thresholds)) if multi and thresholds else {}

    def classify(self, texts: list[str], labels: list[str] | None, template: str | None) -> tuple[list[str], Any, Any]:
        known = list(self.task["labels"])
        multi = bool(self.task.get("multi_label"))
        chosen = known if labels is None else labels
        unknown = [x for x in chosen if x not in known]
        if unknown:
            raise RequestError(f"unknown label(s) {', '.join(unknown[:5])}; this classifier knows {', '.join(known)}",
                               param="labels")
        probs = classify_texts(self.model, self.tokenizer, texts, multi)[:, [known.index(x) for x in chosen]]
        if not multi:
            return chosen, probs / probs.sum(-1, keepdim=True), None
        thresholds = self.task.get("thresholds") or [0.5] * len(known)
        return chosen, probs, torch.tensor([thresholds[known.index(x)] for x in chosen])


class ExtractiveQAAdapter(KindAdapter):
    """A span extractor: the best span of the context, over windows of it (no length limit)."""

    kind, description, capabilities = "qa", "extractive QA model", ("answer",)

    def answer(self, questions: list[str], contexts: list[str], options: dict[str, Any],
               truncate: bool = False) -> list[Answer]:
        if options:
            raise ConfigError(f"an extractive QA model takes no generation options, got {', '.join(options)}")
        return answer_questions(self.model, self.tokenizer, questions, contexts, self.context_length,
                                int(self.task.get("stride", 128)), int(self.task.get("max_answer_tokens", 30)))


class Seq2SeqAdapter(KindAdapter):
    """An encoder-decoder: every task maps a source text to its output (the source is read up to the
    context, as its training rows were)."""

    kind = "seq2seq"

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"{self.task.get('purpose', 'seq2seq')} model"

    @property
    def capabilities(self) -> tuple[str, ...]:  # type: ignore[override]
        unwanted = {"translation": "summarize", "summarization": "translate"}.get(self.task.get("purpose"))
        return tuple(c for c in ("generate", "translate", "summarize", "analyze") if c != unwanted)

    def generate(self, texts: list[str], options: dict[str, Any]) -> list[str]:
        beam = {k: options.pop(k) for k in SEQ2SEQ_OPTIONS if k in options}
        options.pop("truncate", None)
        config = SamplingConfig.from_options(None, **{**TASK_DEFAULTS, **options})
        if config.num_samples != 1:
            raise ConfigError("an encoder-decoder gives one output per text; num_samples must be 1")
        beam_size = beam.get("beam_size", 1)
        if not isinstance(beam_size, int) or beam_size < 1:
            raise ConfigError(f"beam_size must be a whole number >= 1, not {beam_size!r}")
        return translate_texts(self.model, self.tokenizer, texts, max_new_tokens=config.max_new_tokens,
                               sampling=None if beam_size > 1 else config, **beam)

    def translate(self, texts: list[str], source: str | None, target: str, options: dict[str, Any],
                  truncate: bool = False) -> list[str]:
        return self.generate(texts, options)

    def summarize(self, texts: list[str], options: dict[str, Any], truncate: bool = False) -> list[str]:
        return self.generate(texts, options)

    def analyze(self, texts: list[str], contexts: list[str], options: dict[str, Any],
                truncate: bool = False) -> list[str]:
        return self.generate([ANALYZE_TEMPLATE.format(context=c, text=t) for t, c in zip(texts, contexts)], options)


class RewardModelAdapter(KindAdapter):
    """A reward model (:mod:`lmforge.alignment.preference_training`): one scalar per (prompt, reply),
    read at the reply's last token; the pair is encoded exactly as in training
    (:func:`lmforge.data.preferences.encode_reply`), the prompt losing its start when too long."""

    kind, description, capabilities = "reward", "reward model", ("reward",)

    @torch.no_grad()
    def reward(self, prompts: list[Any], replies: list[Any], batch_size: int = 32) -> list[float]:
        head = prompt_head(self.tokenizer)
        rows = [encode_reply(self.tokenizer, p, r, self.context_length, head)[0] for p, r in zip(prompts, replies)]
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            T = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.bool)
            for i, row in enumerate(chunk):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
            scores += self.model(ids.to(device), attention_mask=mask.to(device))[:, 0].float().tolist()
        return scores


class MaskedLMAdapter(KindAdapter):
    """A masked-language model (an encoder pretrained with MLM): ``fill_mask``."""

    kind, description, capabilities = "masked_lm", "masked-language model", ("fill_mask",)


MODALITY_METHODS = {"image": ("caption", "ask"), "audio": ("transcribe",), "video": ("describe", "ask")}


class MediaAdapter(KindAdapter):
    """A multimodal checkpoint (task kind ``media``): text from the media it was trained on."""

    kind = "media"

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, task: dict[str, Any]):
        super().__init__(model, tokenizer, task)
        self.media = model.media

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"{self.media.modality}-to-text model ({self.task.get('task', self.media.modality)})"

    @property
    def capabilities(self) -> tuple[str, ...]:  # type: ignore[override]
        return MODALITY_METHODS[self.media.modality]

    def require(self, method: str) -> None:
        wanted = next((m for m, methods in MODALITY_METHODS.items() if method in methods), None)
        if method not in self.capabilities and wanted is not None:
            raise RequestError(f"this checkpoint reads {self.media.modality}, not {wanted}: it cannot {method}; "
                               f"it can {', '.join(self.capabilities)}")
        super().require(method)

    def inputs(self, sources: Sequence[Any]) -> torch.Tensor:
        """Model inputs (N, ...) from paths, bytes, images or arrays (decode errors are request errors)."""
        try:
            return torch.stack([media_tensor(self.media, source) for source in sources])
        except DataError as exc:
            raise RequestError(str(exc)) from None

    def media_text(self, sources: Sequence[Any], questions: Sequence[str], options: dict[str, Any]) -> list[str]:
        config = SamplingConfig.from_options(None, **{**TASK_DEFAULTS, **options})
        return media_texts(self.model, self.tokenizer, self.inputs(sources), list(questions), config)


ADAPTERS: dict[str, Callable[..., KindAdapter]] = {
    a.kind: a for a in (CausalLMAdapter, ClassifierAdapter, ExtractiveQAAdapter, Seq2SeqAdapter, MaskedLMAdapter,
                        RewardModelAdapter, MediaAdapter)}


def adapter_for(model: nn.Module, tokenizer: Tokenizer, task: dict[str, Any]) -> KindAdapter:
    """The adapter of a checkpoint's kind (:func:`kind_of`)."""
    return ADAPTERS[kind_of(model, task)](model, tokenizer, task)
