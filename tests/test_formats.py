"""Fine-tuning record formats (lmforge.data.formats): detection, chat templates, prompt masking, reading files."""

from __future__ import annotations

import json
import string

import pytest

from lmforge.data.formats import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE,
    chat_prompt_ids,
    detect_format,
    encode_example,
    iter_encoded,
    prompt_and_reference,
    read_records,
    record_format,
    render_chat,
    to_messages,
)
from lmforge.errors import DataError
from lmforge.tokenizer import EOS, Tokenizer

ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"

CHAT = {"messages": [{"role": "system", "content": "Be terse."},
                     {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "bye"},
                     {"role": "assistant", "content": "ciao"}]}
ALPACA = {"instruction": "Repeat: ab", "output": "ab ab"}
PROMPT_COMPLETION = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "plain text"}

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer() -> Tokenizer:
    return Tokenizer.train([ALPHABET * 3], kind="char")


@pytest.fixture
def tok() -> Tokenizer:
    """A fresh char tokenizer per test (tests change its chat template and special tokens)."""
    return char_tokenizer()


def runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled (not IGNORE) tokens."""
    out: list[list[int]] = []
    previous = IGNORE
    for label in labels:
        if label != IGNORE:
            if previous == IGNORE:
                out.append([])
            out[-1].append(label)
        previous = label
    return out


# ------------------------------------------------------------------------------------ detection
def test_detect_format_from_fields():
    assert detect_format(CHAT) == "chat"
    assert detect_format(ALPACA) == "alpaca"
    assert detect_format({**ALPACA, "input": "x"}) == "alpaca"
    assert detect_format(PROMPT_COMPLETION) == "prompt_completion"
    assert detect_format(TEXT) == "text"
    assert detect_format({"messages": [], "text": "x"}) == "chat"  # messages win over text
    with pytest.raises(DataError, match="cannot tell the format") as info:
        detect_format({"question": "q", "answer": "a"})
    assert "['answer', 'question']" in str(info.value)
    with pytest.raises(DataError, match="cannot tell"):
        detect_format({"instruction": "no output"})


def test_record_format_detects_forces_and_rejects_mixtures():
    assert record_format([ALPACA, ALPACA]) == "alpaca"
    assert record_format([CHAT], "auto") == "chat"
    # forcing wins over the fields: an alpaca record that also has text, read as text
    assert record_format([{**ALPACA, "text": "t"}], "text") == "text"
    assert record_format([{**ALPACA, "text": "t"}]) == "alpaca"
    with pytest.raises(DataError, match="mixes formats") as info:
        record_format([ALPACA, CHAT, ALPACA])
    assert "alpaca, chat" in str(info.value)
    with pytest.raises(DataError, match="must be one of"):
        record_format([ALPACA], "sharegpt")


def test_alpaca_becomes_two_messages_with_and_without_input():
    assert to_messages(ALPACA, "alpaca") == [{"role": "user", "content": "Repeat: ab"},
                                             {"role": "assistant", "content": "ab ab"}]
    with_input = to_messages({"instruction": "Translate", "input": "chat", "output": "cat"}, "alpaca")
    assert with_input[0] == {"role": "user", "content": "Translate\n\nchat"}
    assert with_input[1] == {"role": "assistant", "content": "cat"}
    for empty in ("", "   ", None):
        assert to_messages({"instruction": "Do", "input": empty, "output": "ok"}, "alpaca")[0]["content"] == "Do"
    with pytest.raises(DataError, match="'input' must be text"):
        to_messages({"instruction": "Do", "input": ["x"], "output": "ok"}, "alpaca")
    with pytest.raises(DataError, match="'output' must be text"):
        to_messages({"instruction": "Do", "output": 3}, "alpaca")


def test_chat_messages_are_checked():
    assert to_messages(CHAT, "chat") == CHAT["messages"]
    extra = {"messages": [{"role": "user", "content": "x", "name": "bob"}]}
    assert to_messages(extra, "chat") == [{"role": "user", "content": "x"}]  # only role and content kept
    for bad in ({"messages": []}, {"messages": "hi"}, {}):
        with pytest.raises(DataError, match="non-empty list"):
            to_messages(bad, "chat")
    for message in ({"role": "tool", "content": "x"}, {"role": "user"}, {"role": "user", "content": 5}, "hi"):
        with pytest.raises(DataError, match="needs a role"):
            to_messages({"messages": [message]}, "chat")


# ------------------------------------------------------------------------------------ templates
def test_default_template_renders_multi_turn_conversations(tok):
    assert tok.chat_template is None
    text = render_chat(tok, CHAT["messages"])
    assert text == ("Be terse.\n\n### User:\nhi\n\n### Assistant:\nhello<|eos|>\n\n"
                    "### User:\nbye\n\n### Assistant:\nciao<|eos|>")
    cue = render_chat(tok, CHAT["messages"][:4], add_generation_prompt=True)
    assert cue == "Be terse.\n\n### User:\nhi\n\n### Assistant:\nhello<|eos|>\n\n### User:\nbye\n\n### Assistant:\n"
    assert render_chat(tok, [], add_generation_prompt=True) == "### Assistant:\n"
    # the cue ids: the eos of the first answer is the special token, not its characters
    ids = chat_prompt_ids(tok, CHAT["messages"][:4])
    assert ids.count(tok.eos_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == cue


def test_encode_example_masks_the_prompt_of_an_alpaca_record(tok):
    ids, labels = encode_example(ALPACA, "alpaca", tok)
    assert len(ids) == len(labels)
    prompt = tok.encode("### User:\nRepeat: ab\n\n### Assistant:\n")
    answer = tok.encode("ab ab") + [tok.eos_id]
    assert ids == prompt + answer
    assert labels == [IGNORE] * len(prompt) + answer
    assert labels[-1] == tok.eos_id  # the model learns to stop


def test_encode_example_labels_every_assistant_turn_and_no_user_turn(tok):
    ids, labels = encode_example(CHAT, "chat", tok)
    assert ids == tok.encode_with_special(render_chat(tok, CHAT["messages"]))  # the whole conversation, in order
    answers = runs(labels)
    assert [tok.decode(run, skip_special_tokens=False) for run in answers] == ["hello<|eos|>", "ciao<|eos|>"]
    for position, label in enumerate(labels):
        assert label in (IGNORE, ids[position])  # labels are the ids themselves (the shift comes later)
    masked = tok.decode([i for i, label in zip(ids, labels) if label == IGNORE], skip_special_tokens=False)
    assert masked == "Be terse.\n\n### User:\nhi\n\n### Assistant:\n\n\n### User:\nbye\n\n### Assistant:\n"


def test_train_on_prompt_labels_everything(tok):
    for record, fmt in ((CHAT, "chat"), (ALPACA, "alpaca"), (PROMPT_COMPLETION, "prompt_completion")):
        ids, labels = encode_example(record, fmt, tok, train_on_prompt=True)
        assert labels == ids
        assert ids == encode_example(record, fmt, tok)[0]  # the same tokens either way


def test_prompt_completion_and_text_formats(tok):
    ids, labels = encode_example(PROMPT_COMPLETION, "prompt_completion", tok)
    assert ids == tok.encode("2+2=") + tok.encode("4") + [tok.eos_id]
    assert labels == [IGNORE] * 4 + tok.encode("4") + [tok.eos_id]
    # prompt/completion text is used as is: special-token text stays literal
    literal = {"prompt": f"a{EOS}", "completion": "b"}
    ids, _ = encode_example(literal, "prompt_completion", tok)
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id
    ids, labels = encode_example(TEXT, "text", tok)
    assert ids == tok.encode("plain text") + [tok.eos_id] and labels == ids
    with pytest.raises(DataError, match="'completion' must be text"):
        encode_example({"prompt": "p", "completion": None}, "prompt_completion", tok)


def test_conversation_without_an_assistant_message_is_an_error(tok):
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    with pytest.raises(DataError, match="without an assistant message"):
        encode_example(record, "chat", tok)
    with pytest.raises(DataError, match="example 2: a conversation without an assistant"):
        list(iter_encoded([CHAT, record], "chat", tok))


def test_prompt_and_reference(tok):
    ids, reference = prompt_and_reference(CHAT, "chat", tok)
    assert reference == "ciao"
    assert ids == chat_prompt_ids(tok, CHAT["messages"][:4])
    ids, reference = prompt_and_reference(ALPACA, "alpaca", tok)
    assert reference == "ab ab"
    assert tok.decode(ids) == "### User:\nRepeat: ab\n\n### Assistant:\n"
    # the last assistant turn is the reference even when a user turn follows it
    trailing = {"messages": [*CHAT["messages"], {"role": "user", "content": "more?"}]}
    assert prompt_and_reference(trailing, "chat", tok) == (chat_prompt_ids(tok, CHAT["messages"][:4]), "ciao")
    assert prompt_and_reference(PROMPT_COMPLETION, "prompt_completion", tok) == (tok.encode("2+2="), "4")
    with pytest.raises(DataError, match="no reference answer"):
        prompt_and_reference(TEXT, "text", tok)
    with pytest.raises(DataError, match="no reference answer"):
        prompt_and_reference({"messages": [{"role": "user", "content": "u"}]}, "chat", tok)


def test_custom_chatml_template_with_special_tokens_is_honoured(tok):
    before = tok.vocab_size
    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    start, end = tok.hf.token_to_id("<|im_start|>"), tok.hf.token_to_id("<|im_end|>")
    assert {start, end} == {before, before + 1}
    tok.chat_template = CHATML

    text = render_chat(tok, CHAT["messages"][:3])
    assert text == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nhello<|im_end|>\n")
    special_ids = tok.encode_with_special(text)
    assert special_ids.count(start) == 3 and special_ids.count(end) == 3
    assert tok.decode(special_ids, skip_special_tokens=False) == text
    literal = tok.encode(text)  # users' text: the markers stay characters
    assert start not in literal and end not in literal
    assert len(literal) == len(text)  # one token per character

    ids, labels = encode_example(CHAT, "chat", tok)
    assert ids == tok.encode_with_special(render_chat(tok, CHAT["messages"]))
    answers = runs(labels)
    assert [tok.decode(run, skip_special_tokens=False) for run in answers] == ["hello<|im_end|>\n",
                                                                             "ciao<|im_end|>\n"]
    assert all(run.count(end) == 1 and start not in run for run in answers)
    assert chat_prompt_ids(tok, CHAT["messages"][:2])[-len("assistant\n") - 1:] == \
        [start] + tok.encode("assistant\n")


def test_special_token_text_in_a_training_message_stays_literal(tok):
    record = {"messages": [{"role": "user", "content": f"say {EOS} now"}, {"role": "assistant", "content": "ok"}]}
    ids, _ = encode_example(record, "chat", tok)
    assert ids.count(tok.eos_id) == 1  # only the template's end of the answer


def test_special_token_text_in_a_chat_prompt_stays_literal(tok):
    assert chat_prompt_ids(tok, [{"role": "user", "content": f"say {EOS} now"}]).count(tok.eos_id) == 0


def test_template_that_does_not_grow_by_prefixes_is_refused(tok):
    tok.chat_template = "{{ messages | length }} turns:" + DEFAULT_CHAT_TEMPLATE
    assert render_chat(tok, to_messages(ALPACA, "alpaca")).startswith("2 turns:")
    with pytest.raises(DataError, match="growing prefixes"):
        encode_example(ALPACA, "alpaca", tok)
    tok.chat_template = "{% for m in messages | reverse %}{{ m['content'] }};{% endfor %}"
    with pytest.raises(DataError, match="growing prefixes"):
        encode_example(CHAT, "chat", tok)


def test_broken_templates_are_data_errors(tok):
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(DataError, match="not valid Jinja"):
        render_chat(tok, CHAT["messages"])
    tok.chat_template = "{{ messages[0]['content']['missing']['deeper'] }}"  # fails while rendering
    with pytest.raises(DataError, match="chat template failed"):
        render_chat(tok, CHAT["messages"])


# ------------------------------------------------------------------------------------ reading
def test_read_jsonl_json_and_text_files(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps(ALPACA) + "\n\n   \n" + json.dumps(CHAT) + "\n", encoding="utf-8")
    assert read_records(jsonl) == [ALPACA, CHAT]  # blank lines are skipped
    listed = tmp_path / "data.json"
    listed.write_text(json.dumps([PROMPT_COMPLETION, PROMPT_COMPLETION]), encoding="utf-8")
    assert read_records(listed) == [PROMPT_COMPLETION, PROMPT_COMPLETION]
    text = tmp_path / "notes.txt"
    text.write_text("line one\nline two é\n", encoding="utf-8")
    assert read_records(str(text)) == [{"text": "line one\nline two é\n"}]


def test_read_records_errors(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(ALPACA) + "\n\n{not json}\n" + json.dumps(ALPACA) + "\n")
    with pytest.raises(DataError, match="line 3: not valid JSON"):
        read_records(bad_line)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text(json.dumps(ALPACA) + "\n" + json.dumps(["a", "b"]) + "\n")
    with pytest.raises(DataError, match="record 2: expected a JSON object, not list"):
        read_records(not_object)
    scalars = tmp_path / "scalars.json"
    scalars.write_text("[1]")
    with pytest.raises(DataError, match="record 1: expected a JSON object, not int"):
        read_records(scalars)
    not_list = tmp_path / "dict.json"
    not_list.write_text(json.dumps(ALPACA))
    with pytest.raises(DataError, match="JSON list"):
        read_records(not_list)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(broken)
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]"),
                          ("empty.txt", " \n\t")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match="holds no examples"):
            read_records(tmp_path / name)
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path)  # a folder is not a data file
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(binary)
