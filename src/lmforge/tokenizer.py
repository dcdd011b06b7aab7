"""Train, load and save tokenizers (Hugging Face ``tokenizers``), with lmforge's special tokens.

Two kinds:

* ``char``: one token per Unicode character seen in training, plus ``<|unk|>`` for unseen ones.
* ``bpe``: byte-level BPE (GPT-2 style). Any UTF-8 text round-trips exactly; no unknown token.

A tokenizer is saved as a standard ``tokenizer.json`` (loadable with
``tokenizers.Tokenizer.from_file``) beside a Hugging Face style ``tokenizer_config.json`` that
names the special tokens. Text is always encoded *literally*: a user's text that happens to contain
``<|eos|>`` is encoded as ordinary characters, never as the special token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.fileio import atomic_write_text, read_json_object

PAD, BOS, EOS, UNK, MASK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|mask|>"
ROLES = ("bos", "eos", "pad", "unk", "mask")
KINDS = ("char", "bpe")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """A trained tokenizer and the roles of its special tokens.

    Attributes:
        hf: the underlying ``tokenizers.Tokenizer``.
        special: role -> token text, for the roles ``bos``, ``eos``, ``pad``, (char) ``unk`` and,
            once :meth:`with_mask` added it for masked-language modelling, ``mask``.
        kind: ``"char"``, ``"bpe"`` or ``"unknown"`` for tokenizers made elsewhere.
    """

    def __init__(self, hf: HFTokenizer, special: dict[str, str], kind: str = "unknown",
                 chat_template: str | None = None):
        self.hf = hf
        self.special = dict(special)
        self.kind = kind
        self.chat_template = chat_template
        self.hf.encode_special_tokens = True  # user text containing "<|eos|>" stays literal text
        self._special_pattern: tuple[int, re.Pattern | None] | None = None  # built by encode_with_special
        for role, token in self.special.items():
            if self.hf.token_to_id(token) is None:
                raise CheckpointError(f"tokenizer has no {role} token {token!r}")
        # Whether the tokenizer's own rules start every text with bos (Llama's do; lmforge's and
        # GPT-2's do not). lmforge then starts prompts and scored texts with it too.
        bos = self.bos_id
        self.adds_bos = bos is not None and self.hf.encode("a", add_special_tokens=True).ids[:1] == [bos]

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "bpe", vocab_size: int | None = None,
              show_progress: bool = False) -> Tokenizer:
        """Train a ``char`` or byte-level ``bpe`` tokenizer on an iterable of texts.

        ``vocab_size`` includes the special tokens. For ``char`` it caps the alphabet (the most
        frequent characters are kept); for ``bpe`` it defaults to 8192 and must exceed 256 + specials.
        """
        if kind == "char":
            special = {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK}
            hf = HFTokenizer(models.WordLevel(unk_token=UNK))
            # Oniguruma's (?m:.) matches any character, newline included.
            hf.pre_tokenizer = pre_tokenizers.Split(Regex("(?m:.)"), behavior="isolated")
            hf.decoder = decoders.Fuse()
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size or 1_000_000, min_frequency=0,
                                                special_tokens=list(special.values()),
                                                show_progress=show_progress)
        elif kind == "bpe":
            special = {"pad": PAD, "bos": BOS, "eos": EOS}
            vocab_size = vocab_size or 8192
            minimum = 256 + len(special) + 1
            if vocab_size < minimum:
                raise ConfigError(f"a byte-level BPE vocabulary needs at least {minimum} tokens, not {vocab_size}")
            hf = HFTokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            hf.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                          special_tokens=list(special.values()),
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=show_progress)
        else:
            raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if vocab_size is not None and vocab_size <= len(special):
            raise ConfigError(f"vocab size {vocab_size} leaves no room beside {len(special)} special tokens")
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, special, kind)

    # ------------------------------------------------------------------ persistence
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding ``tokenizer.json`` (and ``tokenizer_config.json``)."""
        path = Path(path)
        folder = path.parent if path.name == TOKENIZER_FILE else path
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise CheckpointError(f"no {TOKENIZER_FILE} in {folder}; train one with 'lmforge train-tokenizer'")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library raises plain Exception
            raise CheckpointError(f"{file} is not a valid tokenizer file: {exc}") from None
        config = read_json_object(folder / TOKENIZER_CONFIG_FILE)
        token_map = read_json_object(folder / SPECIAL_TOKENS_MAP_FILE)  # older Hugging Face folders keep them here
        special = {role: token_text(config.get(f"{role}_token", token_map.get(f"{role}_token")))
                   for role in ROLES}
        special = {role: token for role, token in special.items() if token}
        if not config and not token_map:  # a bare tokenizer.json of ours: find the tokens by name
            special = {role: tok for role, tok in (("pad", PAD), ("bos", BOS), ("eos", EOS), ("unk", UNK),
                                                   ("mask", MASK)) if hf.token_to_id(tok) is not None}
        chat_template = config.get("chat_template")
        if (folder / CHAT_TEMPLATE_FILE).is_file():  # where transformers >= 4.47 saves it
            chat_template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if not isinstance(chat_template, str):  # a list of named templates: keep the default one
            chat_template = next((t.get("template") for t in chat_template or [] if t.get("name") == "default"), None)
        return cls(hf, special, config.get("lmforge_kind", "unknown"), chat_template)

    def config_dict(self) -> dict:
        """The Hugging Face style ``tokenizer_config.json`` contents."""
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "lmforge_kind": self.kind,
            "clean_up_tokenization_spaces": False,
            **{f"{role}_token": token for role, token in sorted(self.special.items())},
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / TOKENIZER_FILE, self.hf.to_str(pretty=True))
        atomic_write_text(folder / TOKENIZER_CONFIG_FILE,
                          json.dumps(self.config_dict(), indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def _id(self, role: str) -> int | None:
        token = self.special.get(role)
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad")

    @property
    def mask_id(self) -> int | None:
        return self._id("mask")

    def with_mask(self) -> Tokenizer:
        """This tokenizer with a ``<|mask|>`` special token (appended to the vocabulary if it has
        none), as masked-language modelling needs; the other ids are unchanged."""
        if self.mask_id is not None:
            return self
        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.add_special_tokens([MASK])
        return Tokenizer(hf, {**self.special, "mask": MASK}, self.kind, self.chat_template)

    @property
    def start_ids(self) -> list[int]:
        """The token(s) that stand for "start of a document": bos where the tokenizer adds it, else
        the end-of-sequence token that separates documents in training data (GPT-2's convention)."""
        if self.adds_bos:
            return [self.bos_id]
        return [self.eos_id if self.eos_id is not None else 0]

    @property
    def special_ids(self) -> set[int]:
        return {i for i in (self._id(role) for role in self.special) if i is not None}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added). Text that is not valid Unicode (a lone
        surrogate such as ``"\\ud800"``) is a :class:`~lmforge.errors.DataError`."""
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust library takes only valid Unicode (its message: "... must be str")
            if not isinstance(text, str):
                raise
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"the text holds an invalid code point U+{ord(text[exc.start]):04X} (a lone "
                                f"surrogate) at character {exc.start}; send valid Unicode text") from None
            raise

    def encode_with_special(self, text: str) -> list[int]:
        """Token ids of text in which special-token strings (``<|eos|>``, ...) stand for the special
        tokens: for text rendered by a chat template, never for users' own text."""
        size = self.vocab_size
        if self._special_pattern is None or self._special_pattern[0] != size:  # rebuilt when tokens are added
            tokens = sorted({t.content for t in self.hf.get_added_tokens_decoder().values() if t.special},
                            key=len, reverse=True)
            pattern = re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None
            self._special_pattern = (size, pattern)
        pattern = self._special_pattern[1]
        if pattern is None:
            return self.encode(text)
        ids: list[int] = []
        try:
            for i, part in enumerate(pattern.split(text)):
                if i % 2:
                    ids.append(self.hf.token_to_id(part))
                elif part:
                    ids += self.encode(part)
        except DataError:  # an invalid code point: said again with its position in the whole text
            self.encode(text)
            raise
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and, per token, the ``(start, end)`` character span of ``text`` it
        covers (a byte-level token holding part of a character covers that whole character)."""
        encoding = self.hf.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel by the Rust library."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE token may hold part of a UTF-8 character);
        a special token's bytes are its text."""
        piece = self.hf.id_to_token(token_id)
        if piece is None:
            raise ConfigError(f"token id {token_id} is not in the vocabulary of {self.vocab_size} tokens")
        added = self.hf.get_added_tokens_decoder().get(token_id)
        if added is not None:
            return added.content.encode("utf-8")
        if isinstance(self.hf.decoder, decoders.ByteLevel):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if byte := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece's byte fallback
            return bytes([int(byte.group(1), 16)])
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def fingerprint(self) -> str:
        """A short hash identifying this tokenizer's vocabulary and rules."""
        import hashlib

        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()[:16]


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: each of the 256 printable stand-in characters -> its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_BYTE_OF_CHAR = _byte_of_char()


def token_text(value: object) -> str | None:
    """HF configs store a special token as a string or as ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
