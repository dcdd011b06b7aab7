"""Text from media: captions, answers about images, transcripts and clip descriptions.

:func:`media_texts` runs a :class:`~lmforge.models.multimodal.fusion.MediaLM` through the generation
loops everything else uses: a prefix-fusion model through :func:`~lmforge.inference.completion.complete`
(the one ``TokenGenerator`` loop, stop strings and sampling included) with the media bound to its
prompt pass, a cross-fusion model through encoder-decoder generation. The ``media`` kind adapter
(:class:`lmforge.inference.kinds.MediaAdapter`) calls it for ``LanguageModel.caption``, ``ask``,
``transcribe`` and ``describe``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmforge.config import SamplingConfig
from lmforge.data.media_rows import PLACEHOLDER_ID, prompt_ids
from lmforge.errors import ConfigError, RequestError
from lmforge.inference.completion import complete
from lmforge.inference.prompts import Prompt
from lmforge.inference.seq2seq_decoding import generate_seq2seq
from lmforge.models import eval_mode
from lmforge.models.multimodal.fusion import CrossPrompted, PrefixPrompted
from lmforge.tokenizer import Tokenizer


def media_texts(model: nn.Module, tokenizer: Tokenizer, media: torch.Tensor, questions: Sequence[str],
                sampling: SamplingConfig, batch_size: int = 32) -> list[str]:
    """The generated text for every example: ``media`` (N, ...) model inputs
    (:func:`~lmforge.data.media_rows.media_tensor`) and ``questions`` (N,) ("" for none). With
    ``sampling.num_samples`` > 1, that many texts per example, together (prefix fusion only)."""
    return [text for _, text in media_generate(model, tokenizer, media, questions, sampling, batch_size)]


@torch.inference_mode()
def media_generate(model: nn.Module, tokenizer: Tokenizer, media: torch.Tensor, questions: Sequence[str],
                   sampling: SamplingConfig, batch_size: int = 32) -> list[tuple[list[int], str]]:
    """As :func:`media_texts`, with each text's generated token ids (without eos)."""
    results: list[tuple[list[int], str]] = []
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(questions), batch_size):
            chunk = media[start:start + batch_size].to(device)
            features = model.media_embeddings(chunk)  # (B, K, C)
            prompts = [prompt_ids(tokenizer, q) for q in questions[start:start + batch_size]]
            results += _generate(model, tokenizer, features, prompts, sampling)
    return results


def _generate(model: nn.Module, tokenizer: Tokenizer, features: torch.Tensor, prompts: list[list[int]],
              sampling: SamplingConfig) -> list[tuple[list[int], str]]:
    block = model.config.block_size
    if model.media.fusion == "cross":
        if sampling.num_samples != 1:
            raise ConfigError("a cross-fusion (encoder-decoder) media model gives one output per input; "
                              "num_samples must be 1")
        bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        outputs = generate_seq2seq(CrossPrompted(model, features), prompts, sampling, bos, tokenizer.eos_id,
                                   tokenizer.pad_id or 0)
        return [(ids, tokenizer.decode(ids)) for ids in outputs]
    K = features.shape[1]
    rows = [Prompt([PLACEHOLDER_ID] * K + ids) for ids in prompts]
    room = block - max(len(row.ids) for row in rows)
    if room < 1:
        raise RequestError(f"the media ({K} positions) and the question leave no room in the context of {block}")
    config = SamplingConfig.from_options(sampling, max_new_tokens=min(sampling.max_new_tokens, room))
    bound = PrefixPrompted(model, features.repeat_interleave(config.num_samples, dim=0))
    return [(completion.token_ids, completion.text) for completion in complete(bound, tokenizer, rows, config)]
