"""Token ids folded to words: which tokens of a vocabulary spell the same word up to case and spaces.

Hand-made features compare words, not BPE pieces: the span extractor's question match
(:meth:`~lmforge.models.heads.SpanExtractor.question_matches`) and the classifier's n-gram bag
(:meth:`~lmforge.models.heads.SequenceClassifier.ngram_logits`) read ids through this table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.tokenizer import Tokenizer


def folded_ids(tokenizer: Tokenizer, size: int) -> Tensor:
    """(size,) ids under which tokens count as the same word: tokens whose text is the same once
    lowercased and stripped of surrounding spaces (`` Paris``, ``paris``) share the smallest such id;
    special tokens, tokens of only spaces and byte-level pieces of a character keep their own id."""
    ids = torch.arange(size)
    first: dict[str, int] = {}
    special = tokenizer.special_ids
    for token in range(min(size, tokenizer.vocab_size)):
        if token in special:
            continue
        key = tokenizer.decode([token]).strip().lower()
        if key and "\ufffd" not in key:
            ids[token] = first.setdefault(key, token)
    return ids
