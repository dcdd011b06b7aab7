"""The continuous-batching engine: concurrency equals serving alone, stop strings, cancel, limits, threads."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lmforge.api import LanguageModel
from lmforge.config import LoraConfig, ModelConfig, SamplingConfig
from lmforge.errors import RequestError
from lmforge.inference.engine import Engine, Result, TextEvent, TokenEvent
from lmforge.models.decoder import DecoderLM, SlotKVCache
from lmforge.models.lora import apply_lora
from lmforge.tokenizer import Tokenizer

LINES = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
         "How vexingly quick daft zebras jump; 0123456789", "Sphinx of black quartz, judge my vow?"]
PROMPTS = ["The ", "Pack my box with five", "q", "How vexingly quick daft zebras", "Sph", "dozen liquor jugs! The lazy"]
BLOCK = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(LINES, kind="char")


def make_model(flavour: str, vocab_size: int, seed: int = 1) -> DecoderLM:
    """A tiny model with large random weights, so that greedy outputs are varied (not one token repeated)."""
    knobs = dict(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32)
    if flavour == "llama":
        knobs.update(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False)
    model = DecoderLM(ModelConfig(**knobs)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tok) -> DecoderLM:
    return make_model(request.param, tok.vocab_size)


def greedy(max_new_tokens: int, **options) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, **options)


def events_of(handle) -> tuple[list[int], str, Result]:
    """Token ids and text collected from a handle's events, and its result."""
    tokens, pieces, result = [], [], None
    for event in handle:
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        elif isinstance(event, TextEvent):
            pieces.append(event.text)
        else:
            result = event
    return tokens, "".join(pieces), result


# ------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_slot_cache_decoding_equals_full_forward(flavour):
    """One token per row, rows of different lengths (and a row moved to compact them): the logits
    are those of a plain forward over each whole sequence."""
    model = make_model(flavour, 40)
    torch.manual_seed(0)
    seqs = [torch.randint(0, 40, (n,)) for n in (5, 17, 9, 12)]
    cache = SlotKVCache.empty(model.config, 4, BLOCK, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for row, seq in enumerate(seqs):
            view = cache.row_cache(row)
            model(seq[None, :-3], cache=view)
            cache.set_length(row, view.length)
        cache.move(3, 1)  # drop sequence 1: rows 0, 1, 2 hold sequences 0, 3, 2
        order = [0, 3, 2]
        cache.rows = 3
        for back in (3, 2, 1):
            positions, mask = cache.decode_inputs()
            assert positions[:, 0].tolist() == [len(seqs[i]) - back for i in order]
            last = torch.stack([seqs[i][-back] for i in order])[:, None]
            out = model(last, position_ids=positions, attention_mask=mask, cache=cache)
            for row, i in enumerate(order):
                full = model(seqs[i][None, :len(seqs[i]) - back + 1])[0, -1]
                scale = float(full.abs().max())  # large weights: compare relative to the logits (as a KVCache does)
                assert_close(out[row, 0], full, atol=1e-5 * scale, rtol=1e-5)
    assert cache.lengths[:3] == [len(seqs[i]) for i in order]


# ------------------------------------------------------------------------------------------
# The key property: greedy under concurrency == alone
# ------------------------------------------------------------------------------------------
def test_greedy_under_concurrency_equals_each_request_alone(model, tok):
    lm = LanguageModel(model, tok)
    budgets = [30, 12, 25, 8, 40, 18]
    alone = [lm.complete(p, temperature=0, max_new_tokens=n)[0] for p, n in zip(PROMPTS, budgets)]
    assert all(len(set(c.token_ids)) >= 5 for c in alone if len(c.token_ids) >= 12)  # varied outputs

    engine = Engine(model, tok, max_batch_size=3)
    handles, batches = {}, []
    joins = {0: [0, 1], 2: [2], 5: [3, 4], 9: [5]}  # step -> requests submitted before it
    step = 0
    while step <= max(joins) or engine.num_running or engine.num_waiting:
        for i in joins.get(step, []):
            handles[i] = engine.submit(tok.encode(PROMPTS[i]), greedy(budgets[i]))
        batches.append(engine.step())
        if step == 9:
            assert engine.num_running == 3 and engine.num_waiting >= 1
        step += 1
    assert max(batches) == 3 and 2 in batches  # the batch grew and shrank

    for i, expected in enumerate(alone):
        tokens, text, result = events_of(handles[i])
        assert result.token_ids == tokens == expected.token_ids
        assert result.text == text == expected.text
        assert result.finish_reason == expected.finish_reason
        assert result.prompt_tokens == len(tok.encode(PROMPTS[i]))
        assert result.completion_tokens == len(expected.token_ids)
        if result.finish_reason == "length":
            assert result.completion_tokens == budgets[i]
        assert len(result.token_times) == result.completion_tokens
        assert result.time_to_first_token == result.token_times[0] >= result.queue_time >= 0
        assert result.token_times == sorted(result.token_times) and result.total_time >= result.token_times[-1]


def test_background_thread_with_concurrent_clients(model, tok):
    lm = LanguageModel(model, tok)
    budgets = [20, 9, 30, 14, 25, 11]
    alone = [lm.complete(p, temperature=0, max_new_tokens=n)[0] for p, n in zip(PROMPTS, budgets)]
    barrier = threading.Barrier(len(PROMPTS))

    def client(i: int) -> tuple[list[int], str, Result]:
        barrier.wait()
        return events_of(engine.submit(tok.encode(PROMPTS[i]), greedy(budgets[i])))

    with Engine(model, tok, max_batch_size=4) as engine, ThreadPoolExecutor(len(PROMPTS)) as pool:
        outputs = list(pool.map(client, range(len(PROMPTS))))
    for (tokens, text, result), expected in zip(outputs, alone):
        assert tokens == result.token_ids == expected.token_ids
        assert text == result.text == expected.text


def test_lora_adapted_model(tok):
    model = apply_lora(make_model("llama", tok.vocab_size), LoraConfig(r=4, alpha=8, targets=["all"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g))
    lm = LanguageModel(model, tok)
    base = LanguageModel(make_model("llama", tok.vocab_size), tok)
    base = base.complete(PROMPTS[0], temperature=0, max_new_tokens=20)
    alone = [lm.complete(p, temperature=0, max_new_tokens=20)[0] for p in PROMPTS[:4]]
    assert alone[0].token_ids != base[0].token_ids  # the adapters matter
    engine = Engine(model, tok, max_batch_size=3)
    handles = [engine.submit(tok.encode(p), greedy(20)) for p in PROMPTS[:4]]
    engine.run_until_idle()
    assert [h.result().token_ids for h in handles] == [c.token_ids for c in alone]


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(model, tok):
    options = dict(max_new_tokens=25, temperature=1.0, top_k=12, top_p=0.95, min_p=0.02, repetition_penalty=1.3)
    prompt = tok.encode(PROMPTS[1])

    engine = Engine(model, tok, max_batch_size=4)
    alone = engine.submit(prompt, SamplingConfig(seed=7, **options))
    engine.run_until_idle()

    others = [engine.submit(tok.encode(PROMPTS[0]), greedy(30)),
              engine.submit(tok.encode(PROMPTS[2]), SamplingConfig(seed=1, **options))]
    engine.step()
    engine.step()
    crowded = engine.submit(prompt, SamplingConfig(seed=7, **options))
    other_seed = engine.submit(prompt, SamplingConfig(seed=8, **options))
    engine.run_until_idle()

    sample = alone.result().token_ids
    assert crowded.result().token_ids == sample
    assert other_seed.result().token_ids != sample
    assert all(h.result().completion_tokens > 0 for h in others)
    reference = LanguageModel(model, tok).complete(PROMPTS[1], seed=7, **options)[0]
    assert reference.token_ids == sample  # and the same as TokenGenerator alone


# ------------------------------------------------------------------------------------------
# Stopping
# ------------------------------------------------------------------------------------------
def test_stop_strings_split_across_tokens_end_the_request_without_leaking(model, tok):
    lm = LanguageModel(model, tok)
    full = lm.complete(PROMPTS[0], temperature=0, max_new_tokens=40)[0].text
    stop = full[6:9]  # three characters: three tokens of the char tokenizer
    expected = lm.complete(PROMPTS[0], temperature=0, max_new_tokens=40, stop=["never there", stop])[0]
    assert expected.text == full[:full.index(stop)]

    engine = Engine(model, tok, max_batch_size=2)
    handle = engine.submit(tok.encode(PROMPTS[0]), greedy(40, stop=["never there", stop]))
    busy = engine.submit(tok.encode(PROMPTS[4]), greedy(40))
    engine.run_until_idle()
    tokens, text, result = events_of(handle)
    assert result.finish_reason == "stop"
    assert text == result.text == expected.text and stop not in text
    assert tokens == result.token_ids == expected.token_ids  # including the tokens of the stop string
    assert busy.result().completion_tokens == 40


def test_end_of_sequence_finishes_with_stop(tok):
    model = make_model("llama", tok.vocab_size)
    lm = LanguageModel(model, tok)
    before = lm.complete(PROMPTS[0], temperature=0, max_new_tokens=30)[0].token_ids
    with torch.no_grad():  # make end-of-sequence slightly more likely than the 4th token was
        model.lm_head.weight[tok.eos_id] = model.lm_head.weight[before[3]] * 1.05
    expected = lm.complete(PROMPTS[0], temperature=0, max_new_tokens=30)[0]
    assert expected.finish_reason == "stop" and len(expected.token_ids) <= 3

    engine = Engine(model, tok, max_batch_size=2)
    handle = engine.submit(tok.encode(PROMPTS[0]), greedy(30))
    ignoring = engine.submit(tok.encode(PROMPTS[0]), greedy(30, ignore_eos=True))
    engine.run_until_idle()
    tokens, _, result = events_of(handle)
    assert result.finish_reason == "stop" and result.token_ids == tokens == expected.token_ids
    assert result.completion_tokens == len(expected.token_ids) and tok.eos_id not in tokens
    assert ignoring.result().finish_reason == "length" and ignoring.result().completion_tokens == 30


class ScriptedLM(nn.Module):
    """A stand-in model that predicts ``script[p + 1]`` after position p: a known greedy output."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=1, n_head=1, n_embd=4)
        self.script = script
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, idx, *, position_ids=None, attention_mask=None, cache=None, last_only=False, logits_at=None):
        B, T = idx.shape
        if logits_at is not None:
            last = logits_at.tolist()
        else:
            last = position_ids[:, -1].tolist() if position_ids is not None else [T - 1] * B
        cache.advance(T)
        logits = torch.zeros(B, 1, self.config.vocab_size)
        for row, p in enumerate(last):
            logits[row, 0, self.script[p + 1]] = 1.0
        return logits


def test_multibyte_characters_and_stop_strings_across_byte_tokens():
    tok = Tokenizer.train(LINES + ["naïve café, 日本語"], kind="bpe", vocab_size=264)
    text = "The naïve café — 日本語 and more text after it"
    script = tok.encode(text)
    assert len(script) > len(text)  # several byte tokens per character
    engine = Engine(ScriptedLM(script, tok.vocab_size), tok, max_batch_size=2)
    plain = engine.submit(script[:2], greedy(len(script) - 2))
    stopped = engine.submit(script[:3], greedy(40, stop=["本語 a"]))
    engine.run_until_idle()

    pieces = []
    for event in plain:
        if isinstance(event, TextEvent):
            pieces.append(event.text)
    assert "".join(pieces) == plain.result().text == tok.decode(script[2:])
    assert not any("\ufffd" in piece for piece in pieces)
    _, streamed, result = events_of(stopped)
    assert streamed == result.text == tok.decode(script[3:])[:text.index("本語 a") - len(tok.decode(script[:3]))]
    assert result.finish_reason == "stop" and "本" not in streamed


# ------------------------------------------------------------------------------------------
# Cancel, limits, errors
# ------------------------------------------------------------------------------------------
def test_cancel_frees_the_slot_for_a_waiting_request(model, tok):
    lm = LanguageModel(model, tok)
    engine = Engine(model, tok, max_batch_size=2)
    a, b, c = (engine.submit(tok.encode(p), greedy(20)) for p in PROMPTS[:3])
    d = engine.submit(tok.encode(PROMPTS[3]), greedy(20))
    assert engine.step() == 2 and engine.num_waiting == 2
    engine.step()
    d.cancel()  # a waiting request leaves the queue at once
    assert engine.num_waiting == 1 and d.done and d.result().finish_reason == "cancelled"
    assert d.result().completion_tokens == 0
    a.cancel()
    assert engine.step() == 2 and engine.num_waiting == 0  # c took a's slot in the same step
    result = a.result()
    assert result.finish_reason == "cancelled" and result.completion_tokens == 3  # 2 steps: prefill + 2 decodes
    b.cancel()
    assert engine.step() == 1  # nothing waits: the batch shrinks
    engine.run_until_idle()
    assert c.result().token_ids == lm.complete(PROMPTS[2], temperature=0, max_new_tokens=20)[0].token_ids
    a.cancel()  # no-op once finished
    assert engine.num_running == 0


def test_queue_full_and_invalid_requests_are_refused(tok):
    engine = Engine(make_model("gpt2", tok.vocab_size), tok, max_batch_size=1, max_queue=2)
    prompt = tok.encode("The ")
    first, _ = engine.submit(prompt, greedy(5)), engine.submit(prompt, greedy(5))
    with pytest.raises(RequestError, match="queue is full"):
        engine.submit(prompt, greedy(5))
    engine.step()  # one request leaves the queue for the slot
    engine.submit(prompt, greedy(5))
    with pytest.raises(RequestError, match="context"):
        engine.submit([5] * BLOCK, greedy(5))
    for bad_prompt, sampling in [([], greedy(5)), ([10**6], greedy(5)), (["a"], greedy(5)),
                                 (prompt, SamplingConfig(temperature=-1)), (prompt, greedy(5, num_samples=2))]:
        with pytest.raises(RequestError):
            engine.submit(bad_prompt, sampling)
    engine.run_until_idle()
    assert first.result().completion_tokens == 5


def test_max_new_tokens_is_capped_to_the_context(model, tok):
    prompt = (tok.encode(LINES[0] + " " + LINES[1]) * 2)[:BLOCK - 3]
    engine = Engine(model, tok)
    handle = engine.submit(prompt, greedy(10))
    assert handle.max_new_tokens == 3 and handle.requested_max_new_tokens == 10 and handle.capped
    zero = engine.submit(prompt, greedy(0))
    assert zero.done and zero.result().finish_reason == "length"
    engine.run_until_idle()
    result = handle.result()
    expected = LanguageModel(model, tok).complete(tok.decode(prompt), temperature=0, max_new_tokens=3)[0]
    assert result.token_ids == expected.token_ids and result.finish_reason == "length"
    assert result.max_new_tokens == 3 and result.prompt_tokens == BLOCK - 3


def test_stop_cancels_unfinished_requests_and_a_failed_step_reaches_its_clients(tok):
    model = make_model("gpt2", tok.vocab_size)
    engine = Engine(model, tok, max_batch_size=1)
    engine.start()
    long = [engine.submit(tok.encode("The "), greedy(BLOCK - 4)) for _ in range(3)]
    engine.stop()
    assert {h.result().finish_reason for h in long} <= {"cancelled", "length"}
    assert all(h.done for h in long)

    broken = copy.deepcopy(model)
    broken.lm_head = None  # every forward fails
    with Engine(broken, tok) as engine:
        handle = engine.submit(tok.encode("The "), greedy(5))
        with pytest.raises(TypeError):
            handle.result(timeout=10)
        assert engine.num_running == 0

    # requests admitted together but prefilled in separate groups: all of them get the error
    engine = Engine(broken, tok, max_batch_size=4)
    handles = [engine.submit(tok.encode(p), greedy(5)) for p in ("q", "How vexingly quick daft zebras")]
    with pytest.raises(TypeError):
        engine.step()
    for h in handles:
        with pytest.raises(TypeError):
            h.result(timeout=1)


def reference_greedy(model: DecoderLM, prompt: list[int], steps: int, presence: float = 0.0,
                     frequency: float = 0.0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by full forward passes (no cache), with OpenAI's penalties written out; returns the
    tokens and each step's raw log-probabilities (V,)."""
    ids, logprobs = list(prompt), []
    counts = torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1].float()
            logprobs.append(logits.log_softmax(-1))
            token = int((logits - frequency * counts - presence * (counts > 0).float()).argmax())
            counts[token] += 1
            ids.append(token)
    return ids[len(prompt):], logprobs


@pytest.mark.parametrize("penalties", [{"presence_penalty": 1.5}, {"frequency_penalty": 0.8},
                                       {"presence_penalty": -0.5, "frequency_penalty": 1.2}])
def test_presence_and_frequency_penalties_equal_a_reference_under_concurrency(model, tok, penalties):
    prompt = tok.encode(PROMPTS[1])
    expected, _ = reference_greedy(model, prompt, 20, penalties.get("presence_penalty", 0.0),
                                   penalties.get("frequency_penalty", 0.0))
    plain, _ = reference_greedy(model, prompt, 20)
    assert expected != plain  # the penalties change the text
    engine = Engine(model, tok, max_batch_size=3)
    others = [engine.submit(tok.encode(p), greedy(20)) for p in PROMPTS[2:4]]
    handle = engine.submit(prompt, greedy(20, ignore_eos=True, **penalties))
    engine.run_until_idle()
    assert handle.result().token_ids == expected
    assert all(o.result().finish_reason in ("stop", "length") for o in others)
    lm = LanguageModel(model, tok)  # the batch generator of the Python API agrees
    assert lm.complete(PROMPTS[1], max_new_tokens=20, temperature=0, ignore_eos=True, **penalties)[0].token_ids \
        == expected


def test_logprobs_are_the_models_raw_log_probabilities(model, tok):
    prompt = tok.encode(PROMPTS[3])
    tokens, logprobs = reference_greedy(model, prompt, 12)
    engine = Engine(model, tok, max_batch_size=2)
    handle = engine.submit(prompt, greedy(12, ignore_eos=True), top_logprobs=3)
    plain = engine.submit(prompt, greedy(12, ignore_eos=True))
    engine.run_until_idle()
    result = handle.result()
    assert result.token_ids == tokens and plain.result().logprobs is None
    assert [t.token_id for t in result.logprobs] == tokens
    for step, entry in enumerate(result.logprobs):
        assert entry.logprob == pytest.approx(logprobs[step][entry.token_id].item(), abs=1e-4)
        best = torch.topk(logprobs[step], 3)
        assert [i for i, _ in entry.top] == best.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely token
    events = engine.submit(prompt, greedy(3, ignore_eos=True), top_logprobs=0)
    engine.run_until_idle()
    streamed = [e.logprob for e in events if isinstance(e, TokenEvent)]
    assert [(e.token_id, e.top) for e in streamed] == [(t, ()) for t in tokens[:3]]
    with pytest.raises(RequestError, match="top_logprobs"):
        engine.submit(prompt, greedy(3), top_logprobs=21)


def test_a_listener_gets_the_events_a_handle_would_queue(model, tok):
    prompt = tok.encode(PROMPTS[1])
    engine = Engine(model, tok, max_batch_size=2)
    heard: list = []
    listened = engine.submit(prompt, greedy(15), listener=heard.append)
    queued = engine.submit(prompt, greedy(15))
    engine.run_until_idle()
    assert [e for e in heard if not isinstance(e, Result)] == [e for e in queued if not isinstance(e, Result)]
    assert isinstance(heard[-1], Result) and heard[-1].token_ids == queued.result().token_ids
    with pytest.raises(RuntimeError, match="listener"):
        listened.next_event()

    def broken(event):  # a listener whose consumer is gone: the request is cancelled, the engine goes on
        raise RuntimeError("event loop is closed")

    gone = engine.submit(prompt, greedy(40), listener=broken)
    engine.run_until_idle()
    assert gone.done and engine.num_running == 0


def test_call_runs_jobs_in_the_stepping_thread_between_steps(model, tok):
    with Engine(model, tok, max_batch_size=2) as engine:
        handle = engine.submit(tok.encode(PROMPTS[0]), greedy(30))
        names = engine.call(lambda: threading.current_thread().name)
        assert names.result(timeout=10) == "lmforge-engine"
        failing = engine.call(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=10)
        assert handle.result(timeout=10).finish_reason in ("stop", "length")
    idle = Engine(model, tok)
    job = idle.call(lambda: 7)
    idle.run_until_idle()
    assert job.result() == 7


def test_prompts_admitted_together_are_prefilled_in_groups_and_equal_alone(model, tok):
    from lmforge.inference.engine import _similar_lengths

    prompts = ["The ", "Sph", "Pack my box", "Pack my box with five", "How vexingly quick daft zebras",
               "dozen liquor jugs! The lazy", "q", "0123"]
    lm = LanguageModel(model, tok)
    alone = [lm.complete(p, temperature=0, max_new_tokens=15)[0].token_ids for p in prompts]
    engine = Engine(model, tok, max_batch_size=8)
    forward, calls = model.forward, []

    def counting(ids, **kwargs):
        calls.append(ids.shape)
        return forward(ids, **kwargs)

    model.forward = counting
    try:
        handles = [engine.submit(tok.encode(p), greedy(15)) for p in prompts]
        engine.step()  # admits all eight: one forward per group, then one decoding step
        first_step = len(calls)
        engine.run_until_idle()
    finally:
        del model.forward
    assert [h.result().token_ids for h in handles] == alone
    groups = _similar_lengths([h._request for h in handles])
    assert len(groups) < len(prompts) and sum(map(len, groups)) == len(prompts)
    for group in groups:  # padded size within 1.5x the real tokens
        lengths = [len(r.prompt) for r in group]
        assert lengths == sorted(lengths) and len(group) * max(lengths) <= 1.5 * sum(lengths)
    assert first_step == len(groups) + 1


def test_logits_at_picks_one_position_per_row(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    at = torch.tensor([8, 0, 4])
    with torch.no_grad():
        full = model(ids)
        picked = model(ids, logits_at=at)
    assert picked.shape == (3, 1, model.config.vocab_size)
    assert_close(picked[:, 0], full[torch.arange(3), at])
