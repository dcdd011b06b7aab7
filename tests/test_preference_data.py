"""Preference pairs (lmforge.data.preferences): the row forms, encode_reply's tokens and truncation, batches.

A character tokenizer makes every expected id list computable by hand: one id per character.
"""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import processors

from lmforge.data.preferences import PreferencePair, collate_pairs, encode_pairs, encode_reply, split_pair
from lmforge.errors import DataError
from lmforge.inference.prompts import prompt_head
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer(adds_bos: bool = False) -> Tokenizer:
    """One token per character; with ``adds_bos`` one whose own rules start texts with bos (as Llama's)."""
    tok = Tokenizer.train([ALPHABET * 3], kind="char")
    if adds_bos:
        tok.hf.post_processor = processors.TemplateProcessing(single=f"{tok.special['bos']} $A",
                                                              special_tokens=[(tok.special["bos"], tok.bos_id)])
        tok = Tokenizer(tok.hf, tok.special, tok.kind)
        assert tok.adds_bos
    return tok


@pytest.fixture
def tok() -> Tokenizer:
    return char_tokenizer()


@pytest.fixture
def bos_tok() -> Tokenizer:
    return char_tokenizer(adds_bos=True)


def chars(tok: Tokenizer, text: str) -> list[int]:
    """The ids of ``text`` by hand: one vocabulary entry per character."""
    ids = [tok.hf.token_to_id(c) for c in text]
    assert None not in ids
    return ids


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


HUMAN = "\n\nHuman: What is 2+2?\n\nAssistant:"


# ------------------------------------------------------------------------------------------ split_pair
def test_split_text_row():
    row = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
    assert split_pair(row) == ("Q: 2+2?", " 4", " 5")


def test_split_chat_row():
    prompt = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]
    chosen = {"role": "assistant", "content": "4"}
    row = {"prompt": prompt, "chosen": chosen, "rejected": "5"}
    assert split_pair(row) == (prompt, chosen, "5")


def test_implicit_prompt_is_cut_after_the_last_shared_assistant():
    # the replies share " It is " too: the prompt still ends at "Assistant:", the replies keep their space
    row = {"chosen": HUMAN + " It is 4.", "rejected": HUMAN + " It is 5, I think."}
    assert split_pair(row) == (HUMAN, " It is 4.", " It is 5, I think.")
    turns = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:"
    row = {"chosen": turns + " 4", "rejected": turns + " 22", "prompt": ""}  # an empty prompt is no prompt
    assert split_pair(row) == (turns, " 4", " 22")


def test_implicit_prompt_without_assistant_is_the_shared_start():
    assert split_pair({"chosen": "The sky is blue", "rejected": "The sky is green"}) == ("The sky is ", "blue", "green")


def test_implicit_prompt_of_conversations():
    user = {"role": "user", "content": "2+2?"}
    chosen = [user, {"role": "assistant", "content": "4"}]
    rejected = [user, {"role": "assistant", "content": "5"}]
    assert split_pair({"chosen": chosen, "rejected": rejected}) == ([user], chosen[1:], rejected[1:])
    with pytest.raises(DataError, match="share no prompt or no reply"):
        split_pair({"chosen": chosen, "rejected": list(chosen)})
    with pytest.raises(DataError, match="share no prompt or no reply"):
        split_pair({"chosen": chosen, "rejected": [{"role": "user", "content": "3+3?"}] + rejected[1:]})


@pytest.mark.parametrize("row, missing", [
    ({"prompt": "Q", "chosen": " a"}, "no 'rejected'"),
    ({"prompt": "Q", "chosen": " a", "rejected": ""}, "an empty 'rejected'"),
    ({"prompt": "Q", "rejected": " b", "chosen": []}, "an empty 'chosen'"),
    ({"prompt": "Q"}, "no 'chosen' or 'rejected'"),
])
def test_a_row_without_a_reply_is_a_one_line_data_error(row, missing):
    with pytest.raises(DataError) as info:
        split_pair(row, "prefs.jsonl row 7")
    message = str(info.value)
    assert message.startswith(f"prefs.jsonl row 7 has {missing}") and "\n" not in message
    if missing.startswith("no"):
        assert "fields: " in message and "prompt" in message


def test_rows_that_are_no_pair():
    with pytest.raises(DataError, match="must be a JSON object"):
        split_pair(["chosen", "rejected"])
    with pytest.raises(DataError, match="not both texts or conversations"):
        split_pair({"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]})


def test_encode_pairs_names_the_bad_row(tok):
    rows = [{"prompt": "Q", "chosen": " a", "rejected": " b"}, {"prompt": "Q", "chosen": " a"}]
    with pytest.raises(DataError) as info:
        encode_pairs(rows, tok, 32, [], name="train")
    assert str(info.value).startswith("train row 2 has no 'rejected'") and "\n" not in str(info.value)
    # an error from the encoding gets the row's name in front
    rows = [{"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"}]
    with pytest.raises(DataError, match="^train row 1: a text prompt needs text replies$"):
        encode_pairs(rows, tok, 32, [], name="train")
    with pytest.raises(DataError, match="preference data is empty"):
        encode_pairs([], tok, 32, [])


# ------------------------------------------------------------------------------------------ encode_reply
def test_encode_reply_text(tok, bos_tok):
    ids, start = encode_reply(tok, "Q: 2+2?", " 4", 64, prompt_head(tok))
    assert prompt_head(tok) == []
    assert ids == chars(tok, "Q: 2+2?") + chars(tok, " 4") + [tok.eos_id] and start == 7
    ids, start = encode_reply(bos_tok, "Q: 2+2?", " 4", 64, prompt_head(bos_tok))
    assert ids == [bos_tok.bos_id] + chars(bos_tok, "Q: 2+2? 4") + [bos_tok.eos_id] and start == 8
    assert ids.count(bos_tok.bos_id) == 1  # the head only: the tokenizer's own bos is not added again


def test_truncation_cuts_the_prompt_start_first(bos_tok):
    tok, bos, eos = bos_tok, bos_tok.bos_id, bos_tok.eos_id
    head = prompt_head(tok)
    # 1 + 10 prompt tokens, 4 reply tokens + eos = 16
    ids, start = encode_reply(tok, "abcdefghij", " xyz", 16, head)
    assert ids == [bos] + chars(tok, "abcdefghij xyz") + [eos] and start == 11
    ids, start = encode_reply(tok, "abcdefghij", " xyz", 10, head)
    assert ids == [bos] + chars(tok, "ghij xyz") + [eos] and start == 5
    # no room for any prompt text: the head stays, then the reply loses its end
    ids, start = encode_reply(tok, "abcdefghij", " xyz", 4, head)
    assert ids == [bos] + chars(tok, " xy") and start == 1


def test_truncation_without_a_head_keeps_one_prompt_token(tok):
    ids, start = encode_reply(tok, "abcdefghij", " xyz", 4, [])
    assert ids == chars(tok, "j xy") and start == 1  # the first reply token is still predicted from something


@pytest.mark.parametrize("adds_bos", [False, True])
def test_max_length_is_respected_and_the_reply_is_kept(adds_bos):
    tok = char_tokenizer(adds_bos)
    head = prompt_head(tok)
    prompt, reply = "\n\nHuman: Tell me a joke.\n\nAssistant:", " Why did the chicken cross the road?"
    full_prompt, full_reply = chars(tok, prompt), chars(tok, reply) + [tok.eos_id]
    for max_length in range(2, len(head) + len(full_prompt) + len(full_reply) + 3):
        ids, start = encode_reply(tok, prompt, reply, max_length, head)
        assert len(ids) == min(max_length, len(head) + len(full_prompt) + len(full_reply))
        assert ids[:len(head)] == head and ids.count(tok.bos_id) == (1 if adds_bos else 0)
        body = ids[len(head):start]
        assert body == full_prompt[len(full_prompt) - len(body):]  # a suffix of the prompt
        assert ids[start:] == full_reply[:len(ids) - start] and len(ids) > start
        # the prompt loses tokens before the reply does
        if len(ids) - start < len(full_reply):
            assert len(body) == (0 if head else 1)


def test_no_room_for_a_reply_is_a_data_error(bos_tok, tok):
    with pytest.raises(DataError, match="max_length 1 leaves no room for a reply"):
        encode_reply(bos_tok, "abc", " x", 1, prompt_head(bos_tok))
    with pytest.raises(DataError, match="max_length 1 leaves no room for a reply"):
        encode_reply(tok, "abc", " x", 1, [])


def test_encode_reply_chat(tok):
    prompt = [{"role": "user", "content": "hi"}]
    ids, start = encode_reply(tok, prompt, "yo", 64, [])
    assert text_of(tok, ids[:start]) == "### User:\nhi\n\n### Assistant:\n"  # lmforge's default template
    assert text_of(tok, ids[start:]) == "yo<|eos|>"
    # a reply given as a message or as a list of messages is the same reply
    assert encode_reply(tok, prompt, {"role": "assistant", "content": "yo"}, 64, []) == (ids, start)
    assert encode_reply(tok, prompt, [{"role": "assistant", "content": "yo"}], 64, []) == (ids, start)
    # truncated: the start of the rendered prompt goes
    ids, start = encode_reply(tok, prompt, "yo", 8, [])
    assert text_of(tok, ids) == "ant:\nyo<|eos|>" and start == 5


def test_chat_truncation_keeps_the_templates_bos(bos_tok):
    tok = bos_tok
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    prompt = [{"role": "user", "content": "tell me"}]
    ids, start = encode_reply(tok, prompt, "ok", 64, [])
    assert text_of(tok, ids) == "<|bos|><user> tell me\n<assistant> ok<|eos|>" and ids.count(tok.bos_id) == 1
    ids, start = encode_reply(tok, prompt, "ok", 9, [])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and len(ids) == 9
    assert text_of(tok, ids) == "<|bos|>ant> ok<|eos|>" and start == 6


# ------------------------------------------------------------------------------------------ batches
def test_collate_pairs_by_hand():
    pairs = [PreferencePair([5, 6, 7, 8], 2, [5, 6, 9], 2), PreferencePair([5, 10, 11, 12, 13], 1, [5, 14], 1)]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0], [5, 10, 11, 12, 13], [5, 6, 9, 0, 0], [5, 14, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 4 + [False], [True] * 5, [True] * 3 + [False] * 2,
                                                [True] * 2 + [False] * 3]
    # reply_mask[i, t] = 1 where token t + 1 is in the reply
    assert batch["reply_mask"].tolist() == [[0, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["reply_mask"].dtype == torch.float32 and batch["attention_mask"].dtype == torch.bool
    assert batch["last"].tolist() == [3, 4, 2, 1]
    assert "ref_logps" not in batch
    pairs[0].reference, pairs[1].reference = (-1.5, -2.5), (-3.0, -4.0)
    assert collate_pairs(pairs, pad_id=0)["ref_logps"].tolist() == [-1.5, -3.0, -2.5, -4.0]


def test_encode_and_collate_pairs_end_to_end(bos_tok):
    tok = bos_tok
    rows = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5, I guess"},
            {"chosen": HUMAN + " Four.", "rejected": HUMAN + " Twenty-two."}]
    pairs = encode_pairs(rows, tok, 64, prompt_head(tok))
    batch = collate_pairs(pairs, pad_id=tok.pad_id)
    lengths = [1 + 7 + 2 + 1, 1 + len(HUMAN) + 6 + 1, 1 + 7 + 11 + 1, 1 + len(HUMAN) + 12 + 1]
    T = max(lengths)
    assert batch["input_ids"].shape == (4, T) and batch["reply_mask"].shape == (4, T - 1)
    assert batch["last"].tolist() == [n - 1 for n in lengths]
    replies = [" 4", " Four.", " 5, I guess", " Twenty-two."]  # chosen rows first
    for i, (n, reply) in enumerate(zip(lengths, replies)):
        row = batch["input_ids"][i]
        assert row[0] == tok.bos_id and (row[n:] == tok.pad_id).all()
        # the next-token targets that the mask picks are exactly the reply and its eos
        picked = row[1:][batch["reply_mask"][i].bool()].tolist()
        assert picked == chars(tok, reply) + [tok.eos_id]
    prompts = [text_of(tok, batch["input_ids"][i, 1:int(batch["reply_mask"][i].argmax()) + 1].tolist())
               for i in range(4)]
    assert prompts == ["Q: 2+2?", HUMAN, "Q: 2+2?", HUMAN]
