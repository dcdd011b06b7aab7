"""Training and evaluation windows (lmforge.data.windows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.windows import RandomWindows, eval_batches, eval_window_starts
from lmforge.errors import DataError

T = 8


@pytest.fixture
def tokens() -> np.ndarray:
    # distinct values so that a row tells where it was cut from
    return np.arange(1000, dtype=np.uint16)


def cat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in ("input_ids", "labels")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["labels"], b["labels"])


# ------------------------------------------------------------------ RandomWindows
def test_batch_shapes_and_types(tokens):
    batch = RandomWindows(tokens, T, batch_size=5).batch(0, 0)
    assert batch["input_ids"].shape == (5, T) and batch["labels"].shape == (5, T)
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64


def test_labels_are_inputs_shifted_by_one():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, size=500).astype(np.uint16)
    windows = RandomWindows(tokens, T, batch_size=6, seed=3)
    for step in range(5):
        batch = windows.batch(step, 0)
        x, y = batch["input_ids"], batch["labels"]
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            # the row is a real contiguous stretch of the token array
            matches = [s for s in range(len(tokens) - T) if tokens[s] == row_x[0]
                       and tokens[s:s + T].tolist() == row_x]
            assert any(tokens[s + 1:s + T + 1].tolist() == row_y for s in matches)


def test_windows_are_contiguous_and_in_range(tokens):
    windows = RandomWindows(tokens[:50], T, batch_size=16, seed=1)
    starts = set()
    for step in range(100):
        batch = windows.batch(step, 0)
        x, y = batch["input_ids"], batch["labels"]
        assert torch.equal(x - x[:, :1], torch.arange(T).expand_as(x))
        assert torch.equal(y, x + 1)
        assert int(y.max()) <= 49
        starts.update(x[:, 0].tolist())
    # every start from 0 to the last possible one (50 - T - 1) is drawn, and nothing beyond
    assert starts == set(range(50 - T))


def test_batch_is_deterministic_in_seed_and_step(tokens):
    a = RandomWindows(tokens, T, batch_size=4, seed=7)
    b = RandomWindows(tokens, T, batch_size=4, seed=7)
    assert_same(a.batch(3, 0), b.batch(3, 0))
    assert_same(a.batch(3, 0), a.batch(3, 0))
    # the order of the calls does not matter (resuming at step 3 sees the same windows)
    b.batch(10, 0)
    assert_same(a.batch(3, 0), b.batch(3, 0))
    assert not torch.equal(a.batch(3, 0)["input_ids"], a.batch(4, 0)["input_ids"])
    c = RandomWindows(tokens, T, batch_size=4, seed=8)
    assert not torch.equal(a.batch(3, 0)["input_ids"], c.batch(3, 0)["input_ids"])


@pytest.mark.parametrize("B", [1, 3, 6])
@pytest.mark.parametrize("step", [0, 1, 17])
def test_two_ranks_equal_one_process_with_double_batch(tokens, B, step):
    single = RandomWindows(tokens, T, batch_size=2 * B, seed=5).batch(step, 0)
    ranks = [RandomWindows(tokens, T, batch_size=B, seed=5, rank=r, world_size=2).batch(step, 0) for r in (0, 1)]
    assert_same(cat(ranks), single)
    accum = RandomWindows(tokens, T, batch_size=B, seed=5, grad_accum=2)
    assert_same(cat([accum.batch(step, 0), accum.batch(step, 1)]), single)
    # the two ranks see different windows
    assert not torch.equal(ranks[0]["input_ids"], ranks[1]["input_ids"])


def test_ranks_times_grad_accum(tokens):
    B, step = 3, 4
    single = RandomWindows(tokens, T, batch_size=4 * B, seed=2).batch(step, 0)
    parts = []
    for micro in (0, 1):
        for rank in (0, 1):
            w = RandomWindows(tokens, T, batch_size=B, grad_accum=2, seed=2, rank=rank, world_size=2)
            parts.append(w.batch(step, micro))
    assert_same(cat(parts), single)


def test_tokens_per_micro_batch(tokens):
    assert RandomWindows(tokens, T, batch_size=5).tokens_per_micro_batch == 5 * T


@pytest.mark.parametrize("n", [0, 1, T])
def test_too_short_training_split(n):
    with pytest.raises(DataError, match="training split"):
        RandomWindows(np.arange(n, dtype=np.uint16), T, batch_size=1)


def test_exactly_one_window_of_tokens_is_enough():
    # T + 1 tokens hold exactly one (input, target) window: start 0
    windows = RandomWindows(np.arange(T + 1, dtype=np.uint16), T, batch_size=2)
    batch = windows.batch(0, 0)
    assert batch["input_ids"].tolist() == [list(range(T))] * 2
    assert batch["labels"].tolist() == [list(range(1, T + 1))] * 2


def test_smallest_accepted_split_uses_both_windows():
    windows = RandomWindows(np.arange(T + 2, dtype=np.uint16), T, batch_size=8)
    firsts = {v for step in range(20) for v in windows.batch(step, 0)["input_ids"][:, 0].tolist()}
    assert firsts == {0, 1}


# ------------------------------------------------------------------ evaluation windows
def test_eval_windows_all():
    starts = eval_window_starts(100, 10)
    assert starts.tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80]  # (100 - 1) // 10 windows
    assert starts.dtype == np.int64
    assert eval_window_starts(101, 10).tolist() == list(range(0, 100, 10))


def test_eval_windows_count_spread_evenly():
    starts = eval_window_starts(1001, 10, count=5)  # 100 windows in all
    assert starts.tolist() == [0, 250, 500, 740, 990]
    assert eval_window_starts(1001, 10, count=1).tolist() == [0]
    assert eval_window_starts(1001, 10, count=2).tolist() == [0, 990]
    assert len(eval_window_starts(1001, 10, count=1000)) == 100
    assert eval_window_starts(1001, 10, count=None).tolist() == list(range(0, 1000, 10))


@settings(max_examples=200, deadline=None)
@given(n_tokens=st.integers(2, 5000), block=st.integers(1, 300), count=st.one_of(st.none(), st.integers(1, 200)))
def test_eval_windows_properties(n_tokens, block, count):
    total = (n_tokens - 1) // block
    if total < 1:
        with pytest.raises(DataError, match="validation split"):
            eval_window_starts(n_tokens, block, count)
        return
    starts = eval_window_starts(n_tokens, block, count).tolist()
    expected = total if count is None else min(count, total)
    assert len(starts) == expected
    assert starts == sorted(starts)
    assert all(s % block == 0 for s in starts)  # aligned to the fixed grid of windows
    assert all(b - a >= block for a, b in zip(starts, starts[1:]))  # non-overlapping
    assert starts[0] == 0 and starts[-1] + block + 1 <= n_tokens  # inside the split, targets included
    if expected > 1:
        assert starts[-1] == (total - 1) * block  # spread to the very end
        gaps = [(b - a) // block for a, b in zip(starts, starts[1:])]
        assert max(gaps) - min(gaps) <= 1  # evenly


@pytest.mark.parametrize("n", [0, 1, 10])
def test_too_short_validation_split(n):
    with pytest.raises(DataError, match="validation split"):
        eval_window_starts(n, 10)


def test_eval_batches_cover_windows_in_order():
    tokens = np.arange(100, dtype=np.uint32)
    starts = eval_window_starts(len(tokens), 10)
    batches = list(eval_batches(tokens, starts, 10, batch_size=4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 1]
    x = torch.cat([b["input_ids"] for b in batches])
    y = torch.cat([b["labels"] for b in batches])
    assert x.dtype == torch.int64
    assert x[:, 0].tolist() == starts.tolist()
    assert torch.equal(y, x + 1)
    # the windows together predict every token from 1 to 9 * 10 exactly once
    assert sorted(y.flatten().tolist()) == list(range(1, 91))
