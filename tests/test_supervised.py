"""Supervised fine-tuning data (lmforge.data.supervised): held-out split, truncation, packing, collation, batches."""

from __future__ import annotations

import logging
import string

import pytest
import torch

from lmforge.data.formats import IGNORE, encode_example
from lmforge.data.supervised import SupervisedBatches, collate, encode_set, split_records
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

PAD = 0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([(string.ascii_letters + string.digits + string.punctuation + " \n") * 2], kind="char")


@pytest.fixture
def warnings(caplog):
    """Warnings of lmforge.data.supervised, captured even when the lmforge logger does not propagate."""
    logger = logging.getLogger("lmforge.data.supervised")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="lmforge.data.supervised")
    yield caplog
    logger.removeHandler(caplog.handler)


def alpaca(instruction: str, output: str) -> dict:
    return {"instruction": instruction, "output": output}


# ------------------------------------------------------------------------------------ split
@pytest.mark.parametrize("n, fraction, held_out", [(100, 0.1, 10), (40, 0.05, 2), (30, 1 / 3, 10), (7, 0.5, 3),
                                                   (1000, 0.013, 13), (20, 0.0, 0)])
def test_split_holds_out_exactly_the_fraction(n, fraction, held_out):
    records = list(range(n))
    train, val = split_records(records, fraction)
    assert len(val) == held_out and len(train) == n - held_out
    assert sorted(train + val) == records and set(train).isdisjoint(val)
    assert train == sorted(train) and val == sorted(val)  # order is kept
    assert split_records(records, fraction) == (train, val)  # deterministic


def test_split_spreads_the_held_out_records_evenly():
    _, val = split_records(list(range(100)), 0.1)
    assert val == list(range(9, 100, 10))
    _, val = split_records(list(range(1000)), 0.05)
    gaps = {b - a for a, b in zip(val, val[1:])}
    assert gaps == {20}
    _, val = split_records(list(range(30)), 1 / 3)
    assert {b - a for a, b in zip(val, val[1:])} == {3}
    # a prefix of the data is split the same way as the whole (the rule depends on the index only)
    assert split_records(list(range(50)), 0.1)[1] == [i for i in split_records(list(range(100)), 0.1)[1] if i < 50]


# ------------------------------------------------------------------------------------ encode_set
def test_short_examples_are_kept_whole(tok, warnings):
    records = [alpaca("Say a", "a"), alpaca("Say b", "bb")]
    encoded = encode_set(records, "auto", tok, block_size=64)
    assert encoded.rows == [encode_example(r, "alpaca", tok) for r in records]
    assert (encoded.truncated, encoded.dropped) == (0, 0)
    assert encoded.tokens == sum(len(ids) for ids, _ in encoded.rows)
    assert not warnings.records


def test_long_examples_are_truncated_counted_and_warned_about(tok, warnings):
    short = alpaca("Hi", "ok")
    long = alpaca("Write", "x" * 100)
    records = [short, long, long, short]
    block = 40
    encoded = encode_set(records, "alpaca", tok, block_size=block)
    assert encoded.truncated == 2 and encoded.dropped == 0 and len(encoded.rows) == 4
    full_ids, full_labels = encode_example(long, "alpaca", tok)
    assert encoded.rows[1] == (full_ids[:block + 1], full_labels[:block + 1])  # cut at the end
    assert all(len(ids) <= block + 1 for ids, _ in encoded.rows)
    assert encoded.rows[0] == encode_example(short, "alpaca", tok)
    messages = [r.getMessage() for r in warnings.records]
    assert any("2 of 4 train examples are longer than the context (40 tokens) and were truncated" in m
               for m in messages), messages


def test_examples_whose_answer_lies_beyond_the_context_are_dropped(tok, warnings):
    fits = alpaca("Say a", "a")
    hidden = alpaca("y" * 80, "the answer")  # the prompt alone fills the context
    encoded = encode_set([fits, hidden, fits], "alpaca", tok, block_size=48, name="val")
    assert encoded.dropped == 1 and encoded.truncated == 1 and len(encoded.rows) == 2
    assert encoded.rows == [encode_example(fits, "alpaca", tok)] * 2
    messages = " | ".join(r.getMessage() for r in warnings.records)
    assert "1 val examples had no response tokens left within the context and were dropped" in messages
    with pytest.raises(DataError, match="no train example has anything to learn within the context of 32"):
        encode_set([hidden, hidden], "alpaca", tok, block_size=32)
    # with the loss on the prompt too, the same example has something to learn
    assert len(encode_set([hidden], "alpaca", tok, block_size=32, train_on_prompt=True).rows) == 1


def test_an_answer_of_one_token_at_the_edge_is_kept(tok):
    # after the one-token shift a row needs a labelled token at position >= 1 within block_size + 1 tokens
    prompt_len = len(encode_example(alpaca("q", "a"), "alpaca", tok)[0]) - 2  # the answer is 'a' + eos
    block = prompt_len  # the row keeps the prompt and 'a'; eos is cut off
    encoded = encode_set([alpaca("q", "a")], "alpaca", tok, block_size=block)
    (ids, labels), = encoded.rows
    assert len(ids) == block + 1 and labels[-1] == tok.encode("a")[0] and encoded.truncated == 1
    with pytest.raises(DataError, match="anything to learn"):
        encode_set([alpaca("q", "a")], "alpaca", tok, block_size=block - 1)


def test_packing_makes_rows_of_exactly_block_size_plus_one(tok, warnings):
    records = [alpaca(f"Say {c}", c * (i % 5 + 1)) for i, c in enumerate(string.ascii_lowercase)]
    block = 64  # longer than any example, so every row holds an answer
    packed = encode_set(records, "alpaca", tok, block_size=block, packing=True, seed=3)
    examples = [encode_example(r, "alpaca", tok) for r in records]
    total = sum(len(ids) for ids, _ in examples)
    assert all(len(ids) == len(labels) == block + 1 for ids, labels in packed.rows)
    assert packed.dropped == 0 and not warnings.records
    assert len(packed.rows) == total // (block + 1) > 10  # only the incomplete tail is left out
    assert packed.tokens == len(packed.rows) * (block + 1)
    assert packed.truncated == 0
    # the rows are the examples concatenated in a shuffled order, cut into pieces
    stream = [t for ids, _ in packed.rows for t in ids]
    labels = [t for _, row_labels in packed.rows for t in row_labels]
    order, position, unused = [], 0, list(range(len(examples)))
    while position < len(stream):  # read the stream back as whole examples, each used once
        match = [i for i in unused if stream[position:position + len(examples[i][0])] ==
                 examples[i][0][:len(stream) - position]]
        assert len(match) == 1, position
        ids, example_labels = examples[match[0]]
        assert labels[position:position + len(ids)] == example_labels[:len(stream) - position]  # labels travel along
        order.append(match[0])
        unused.remove(match[0])
        position += len(ids)
    assert order != sorted(order)  # shuffled
    # deterministic for a seed, another order for another seed
    assert encode_set(records, "alpaca", tok, block_size=block, packing=True, seed=3).rows == packed.rows
    assert encode_set(records, "alpaca", tok, block_size=block, packing=True, seed=4).rows != packed.rows


def test_packed_rows_without_answers_are_dropped(tok, warnings):
    # one huge prompt: the rows cut from its middle hold no response tokens
    records = [alpaca("z" * 200, "a"), alpaca("Say b", "b")]
    packed = encode_set(records, "alpaca", tok, block_size=19, packing=True)
    assert packed.dropped >= 8
    assert all(any(x != IGNORE for x in labels[1:]) for _, labels in packed.rows)
    assert any("rows had no response tokens" in r.getMessage() for r in warnings.records)


def test_packing_too_little_data_is_an_error(tok):
    with pytest.raises(DataError, match="fewer than one packed row of 201"):
        encode_set([alpaca("Say a", "a")], "alpaca", tok, block_size=200, packing=True)


def test_encode_set_reports_the_example_that_fails(tok):
    records = [alpaca("a", "b"), {"messages": [{"role": "user", "content": "no answer"}]}]
    with pytest.raises(DataError, match="mixes formats"):
        encode_set(records, "auto", tok, block_size=32)
    answered = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match="example 2: a conversation without an assistant message"):
        encode_set([answered, records[1]], "chat", tok, block_size=32)


# ------------------------------------------------------------------------------------ collate
def test_collate_shifts_by_one_and_right_pads():
    rows = [([1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5]), ([7, 8, 9], [IGNORE, 8, 9])]
    batch = collate(rows, pad_id=PAD)
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, PAD, PAD]]
    assert batch["labels"].tolist() == [[IGNORE, 3, 4, 5], [8, 9, IGNORE, IGNORE]]
    single = collate([([5, 6], [5, 6])], pad_id=42)
    assert single["input_ids"].tolist() == [[5]] and single["labels"].tolist() == [[6]]
    padded = collate([([1, 2], [1, 2]), ([3, 4, 5, 6], [3, 4, 5, 6])], pad_id=42)
    assert padded["input_ids"].tolist() == [[1, 42, 42], [3, 4, 5]]
    assert padded["labels"].tolist() == [[2, IGNORE, IGNORE], [4, 5, 6]]


# ------------------------------------------------------------------------------------ batches
def numbered_rows(n: int, varying: bool = False) -> list[tuple[list[int], list[int]]]:
    """Rows whose first token names them (1000 + i); with ``varying`` their lengths differ."""
    rows = []
    for i in range(n):
        ids = [1000 + i] + [i % 7 + 1] * ((i % 4 + 2) if varying else 4)
        rows.append((ids, [IGNORE] + ids[1:]))
    return rows


def names(batch: dict[str, torch.Tensor]) -> list[int]:
    return [i - 1000 for i in batch["input_ids"][:, 0].tolist()]


def test_batches_depend_only_on_seed_and_step():
    rows = numbered_rows(30, varying=True)
    a = SupervisedBatches(rows, batch_size=4, grad_accum=2, seed=11, pad_id=PAD)
    b = SupervisedBatches(rows, batch_size=4, grad_accum=2, seed=11, pad_id=PAD)
    for step, micro in [(0, 0), (5, 1), (2, 0), (40, 1), (0, 0), (7, 1)]:  # any order, a fresh object: the same
        x, y = a.batch(step, micro), b.batch(step, micro)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert names(a.batch(3, 0)) != names(SupervisedBatches(rows, 4, 2, seed=12, pad_id=PAD).batch(3, 0))
    assert names(a.batch(0, 0)) != names(a.batch(0, 1)) != names(a.batch(1, 0))


@pytest.mark.parametrize("batch_size, grad_accum", [(4, 1), (2, 3), (1, 1)])
def test_every_row_once_per_epoch(batch_size, grad_accum):
    n = 24
    batches = SupervisedBatches(numbered_rows(n, varying=True), batch_size, grad_accum, seed=5, pad_id=PAD)
    per_step = batch_size * grad_accum
    steps_per_epoch = n // per_step
    assert batches.epochs(steps_per_epoch) == 1.0 and batches.epochs(3 * steps_per_epoch) == 3.0
    orders = []
    for epoch in range(3):
        seen = [name for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
                for micro in range(grad_accum) for name in names(batches.batch(step, micro))]
        assert sorted(seen) == list(range(n))
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # each epoch is a fresh permutation


def test_batches_are_padded_rows_in_their_epoch_order():
    rows = numbered_rows(10, varying=True)
    batch = SupervisedBatches(rows, batch_size=10, grad_accum=1, seed=0, pad_id=PAD).batch(0, 0)
    assert batch["input_ids"].shape == (10, max(len(ids) for ids, _ in rows) - 1)
    for r, name in enumerate(names(batch)):
        ids, labels = rows[name]
        width = len(ids) - 1
        assert batch["input_ids"][r, :width].tolist() == ids[:-1]
        assert batch["labels"][r, :width].tolist() == labels[1:]
        assert (batch["input_ids"][r, width:] == PAD).all() and (batch["labels"][r, width:] == IGNORE).all()


def test_an_epoch_that_ends_inside_a_step_continues_into_the_next():
    n = 10
    batches = SupervisedBatches(numbered_rows(n), batch_size=4, grad_accum=1, seed=2, pad_id=PAD)
    seen = [name for step in range(5) for name in names(batches.batch(step, 0))]  # 20 rows = 2 epochs
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))
    assert batches.epochs(5) == 2.0


@pytest.mark.parametrize("step", [0, 1, 6, 13])
def test_two_ranks_equal_one_process_with_double_batch(step):
    rows = numbered_rows(22)  # equal lengths, so batches can be concatenated
    B = 3
    single = SupervisedBatches(rows, batch_size=2 * B, grad_accum=1, seed=9, pad_id=PAD).batch(step, 0)
    ranks = [SupervisedBatches(rows, batch_size=B, grad_accum=1, seed=9, pad_id=PAD, rank=r, world_size=2)
             .batch(step, 0) for r in (0, 1)]
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([ranks[0][key], ranks[1][key]]), single[key])
    assert set(names(ranks[0])).isdisjoint(names(ranks[1]))  # the ranks never share a row
    accum = SupervisedBatches(rows, batch_size=B, grad_accum=2, seed=9, pad_id=PAD)
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([accum.batch(step, 0)[key], accum.batch(step, 1)[key]]), single[key])


def test_ranks_times_micro_batches_split_one_step_without_overlap():
    rows = numbered_rows(40)
    B, step = 2, 3
    single = SupervisedBatches(rows, batch_size=4 * B, grad_accum=1, seed=1, pad_id=PAD).batch(step, 0)
    parts = [SupervisedBatches(rows, batch_size=B, grad_accum=2, seed=1, pad_id=PAD, rank=rank, world_size=2)
             .batch(step, micro) for micro in (0, 1) for rank in (0, 1)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), single["input_ids"])
    seen = [name for p in parts for name in names(p)]
    assert len(set(seen)) == len(seen) == 4 * B
    batches = SupervisedBatches(rows, batch_size=B, grad_accum=2, seed=1, pad_id=PAD, world_size=2)
    assert batches.epochs(5) == 5 * 8 / 40


def test_group_by_length_gives_each_step_rows_of_similar_length():
    import random

    rng = random.Random(0)
    rows = []
    for i in range(600):
        ids = [1000 + i] + [1] * rng.randint(1, 60)
        rows.append((ids, ids))
    lengths = {i: len(ids) for i, (ids, _) in enumerate(rows)}
    B, steps = 8, 75  # one epoch
    plain = SupervisedBatches(rows, B, 1, seed=4, pad_id=PAD)
    grouped = SupervisedBatches(rows, B, 1, seed=4, pad_id=PAD, group_by_length=True)
    again = SupervisedBatches(rows, B, 1, seed=4, pad_id=PAD, group_by_length=True)

    def spread(batches, step):
        sizes = [lengths[name] for name in names(batches.batch(step, 0))]
        return max(sizes) - min(sizes)

    assert sum(spread(grouped, s) for s in range(steps)) < sum(spread(plain, s) for s in range(steps)) / 5
    seen = [name for s in range(steps) for name in names(grouped.batch(s, 0))]
    assert sorted(seen) == list(range(600))  # still every row once per epoch
    assert names(grouped.batch(3, 0)) == names(again.batch(3, 0))  # a function of (seed, step): exact resume
    first_lengths = [max(lengths[n] for n in names(grouped.batch(s, 0))) for s in range(10)]
    assert first_lengths != sorted(first_lengths, reverse=True)  # the steps' order stays random
