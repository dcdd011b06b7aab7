"""Continuous batching: many requests share each decoding step (the idea of Orca and vLLM).

A request is a prompt (token ids) and its own :class:`~lmforge.config.SamplingConfig`. The engine
keeps up to ``max_batch_size`` of them *running*, each in its own row ("slot") of one
:class:`~lmforge.models.decoder.SlotKVCache`; the others wait in a bounded FIFO queue. One
:meth:`Engine.step` is one scheduling round:

1. **retire** cancelled requests: their rows leave the batch (the last row moves into the hole, so
   the running rows stay packed at the front of the cache);
2. **admit** waiting requests, oldest first, into free slots: a prompt that begins like a recent one
   takes that beginning's keys and values from the :class:`~lmforge.inference.prefix_cache.PrefixCache`
   and computes only the rest; prompts with as many cached tokens (maybe none) and of similar lengths
   are prefilled together (right-padded) straight into their slots' rows of the cache; each first
   token is sampled from the prefill's logits;
3. **decode** ONE batched step: every running sequence feeds its last token at its own position
   (rows have different lengths; the attention mask hides each row's unused cache positions), each
   row is sampled with its own options (greedy, top-k, top-p, min-p, repetition penalty, its own
   seeded ``torch.Generator``), and finished rows are retired.

Because every row is computed exactly as if it were alone (its own positions, its own keys), a
greedy (``temperature=0``) response under concurrency equals the same request served alone, and a
seeded sample does not depend on what else is in the batch (up to float rounding, which does not
change the picked tokens in practice; tested).

A request never slides past the context: ``max_new_tokens`` is capped so that prompt + completion
fit in ``block_size`` (the handle reports the cap). ``num_samples > 1`` is not served here: submit
the prompt n times (with seeds ``seed + i`` if the samples must differ and be reproducible).

Use::

    engine = Engine(model, tokenizer, max_batch_size=8)
    with engine:                                     # start() a background thread; stop() at exit
        handle = engine.submit(tokenizer.encode("The "), SamplingConfig(max_new_tokens=40, temperature=0))
        for event in handle:                         # TokenEvent, TextEvent, ..., then one Result
            if isinstance(event, TextEvent):
                print(event.text, end="")

or, without a thread (tests, batch jobs): ``engine.submit(...)`` then ``engine.run_until_idle()``
(or :meth:`Engine.step` by hand) and ``handle.result()``.

Threads. :meth:`Engine.submit` and :meth:`RequestHandle.cancel` may be called from any thread (they
only touch the waiting queue and flags, under one lock); the model, the cache and the running rows
belong to whichever thread runs :meth:`Engine.step` (the background loop). Each handle delivers its
events through its own thread-safe queue, so each client thread (or, in a future asyncio server,
``asyncio.to_thread(handle.next_event)``) reads its own events without blocking the others. A server
further needs: a client disconnect -> ``handle.cancel()``; a full queue (``RequestError`` from
``submit``) -> 429; :attr:`Engine.num_waiting` / :attr:`Engine.num_running` and the timings of
:class:`Result` for its metrics; a per-request timeout -> ``cancel()``.
"""

from __future__ import annotations

import itertools
import logging
import operator
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.config import SamplingConfig
from lmforge.errors import ConfigError, RequestError
from lmforge.inference.detokenize import TextStream
from lmforge.inference.prefix_cache import PrefixCache, PrefixHit
from lmforge.inference.prompts import context_error
from lmforge.inference.sampling import pick_next
from lmforge.models.cpu_attention import kernel_available
from lmforge.models.cpu_linear import kernel_available as linear_kernel_available
from lmforge.models.decoder import SlotKVCache
from lmforge.tokenizer import Tokenizer

__all__ = ["Engine", "RequestHandle", "Result", "TextEvent", "TokenEvent", "TokenLogprob"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# Events a handle delivers
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (raw logits: before penalties, temperature and
    filtering, as vLLM and OpenAI report them) and the ``top`` most likely tokens as (id, logprob) pairs,
    most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TokenEvent:
    """A new completion token (the end-of-sequence token is never one); ``logprob`` when the request
    asked for log-probabilities."""

    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class TextEvent:
    """Text that became final: never half a character, never (part of) a stop string. All of a
    request's text events joined equal its :attr:`Result.text`."""

    text: str


@dataclass(frozen=True)
class Result:
    """The last event of a request.

    ``finish_reason``: "stop" (end-of-sequence token or stop string), "length" (``max_new_tokens``
    reached) or "cancelled". ``completion_tokens == len(token_ids)``: every generated token, including
    those that formed a stop string, never the end-of-sequence token. Times are in seconds:
    ``queue_time`` from submission to admission, ``time_to_first_token`` and ``token_times[i]`` from
    submission to token i, ``total_time`` from submission to the end.
    """

    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    max_new_tokens: int
    queue_time: float | None
    time_to_first_token: float | None
    token_times: list[float]
    total_time: float
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


Event = TokenEvent | TextEvent | Result


# ------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Request:
    """One request's state. Its tokens, stream and sampler are touched only by the stepping thread."""

    id: int
    prompt: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    eos_id: int | None
    stream: TextStream
    seen: Tensor | None            # (1, V) bool: tokens in the text so far (repetition penalty only)
    counts: Tensor | None          # (1, V) float: occurrences in the completion (presence/frequency penalties)
    generator: torch.Generator | None
    top_logprobs: int | None = None  # report log-probabilities with this many alternatives
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    listener: Callable[[Event | BaseException], None] | None = None  # called instead of queueing events
    state: str = "waiting"         # waiting -> running -> finished
    cancelled: bool = False        # set by cancel() from any thread; acted on by the next step
    token_ids: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    token_times: list[float] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache

    @property
    def greedy_plain(self) -> bool:
        """Greedy without penalties: an arg-max over the batch serves it."""
        return self.sampling.greedy and self.seen is None and self.counts is None

    def accept(self, token: int, now: float, logprob: TokenLogprob | None = None) -> str | None:
        """Take the next sampled token, emit its events; return a finish reason once done."""
        if token == self.eos_id:
            return "stop"
        self.token_ids.append(token)
        self.token_times.append(now - self.submitted)
        if logprob is not None:
            self.logprobs.append(logprob)
        self.emit(TokenEvent(token, logprob))
        piece = self.stream.push(token)
        if piece:
            self.emit(TextEvent(piece))
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
        if self.stream.stopped:
            return "stop"
        if len(self.token_ids) >= self.max_new_tokens:
            return "length"
        return None

    def close(self, reason: str) -> None:
        """Release the held-back text (never a stop string) and deliver the :class:`Result`."""
        rest = self.stream.close()
        if rest:
            self.emit(TextEvent(rest))
        self.state = "finished"
        self.emit(Result(
            request_id=self.id, token_ids=list(self.token_ids), text=self.stream.text, finish_reason=reason,
            prompt_tokens=len(self.prompt), completion_tokens=len(self.token_ids),
            max_new_tokens=self.max_new_tokens,
            queue_time=None if self.admitted is None else self.admitted - self.submitted,
            time_to_first_token=self.token_times[0] if self.token_times else None,
            token_times=list(self.token_times), total_time=time.perf_counter() - self.submitted,
            logprobs=None if self.top_logprobs is None else list(self.logprobs), cached_tokens=self.cached_tokens))

    def fail(self, error: BaseException) -> None:
        """Deliver an error: iterating the handle raises it."""
        self.state = "finished"
        self.emit(error)

    def emit(self, event: Event | BaseException) -> None:
        """Hand an event to the listener (any exception it raises cancels the request), or queue it."""
        if self.listener is None:
            self.events.put(event)
            return
        try:
            self.listener(event)
        except Exception:  # the listener's consumer is gone (e.g. a closed event loop)
            self.cancelled = True


class RequestHandle:
    """What :meth:`Engine.submit` returns: iterate it (once) for events, or wait for :meth:`result`.

    Events come in order: for each completion token a :class:`TokenEvent`, then a :class:`TextEvent`
    when text became final; at the end maybe one more :class:`TextEvent` (held-back text), then the
    :class:`Result`. Safe to read from any one thread while the engine runs in another.
    """

    def __init__(self, engine: Engine, request: _Request, requested_max_new_tokens: int):
        self._engine, self._request = engine, request
        self.id = request.id
        self.prompt_tokens = len(request.prompt)
        self.max_new_tokens = request.max_new_tokens            # after capping to the context
        self.requested_max_new_tokens = requested_max_new_tokens
        self._result: Result | None = None

    @property
    def capped(self) -> bool:
        """``max_new_tokens`` was lowered so that prompt + completion fit in the context."""
        return self.max_new_tokens < self.requested_max_new_tokens

    @property
    def done(self) -> bool:
        return self._request.state == "finished"

    def next_event(self, timeout: float | None = None) -> Event:
        """The next event; blocks (raises ``queue.Empty`` after ``timeout`` seconds). After the
        :class:`Result` it keeps returning the Result. Raises the engine's error if the step failed."""
        if self._result is not None:
            return self._result
        if self._request.listener is not None:
            raise RuntimeError("this request's events go to its listener")
        event = self._request.events.get(timeout=timeout)
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Result):
            self._result = event
        return event

    def __iter__(self) -> Iterator[Event]:
        while self._result is None:
            yield self.next_event()

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the end (skipping remaining events) and return the :class:`Result`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._result is None:
            self.next_event(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._result

    def cancel(self) -> None:
        """Stop this request: a waiting one leaves the queue now; a running one leaves the batch at the
        start of the next step (its slot is free for a waiting request in that same step). Its
        :class:`Result` has ``finish_reason == "cancelled"``. No-op once finished."""
        self._engine._cancel(self._request)


# ------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------
class Engine:
    """A continuous-batching scheduler around a decoder model (see the module docstring).

    Args:
        model: a :class:`~lmforge.models.decoder.DecoderLM` (LoRA-adapted ones too); put in eval mode.
        tokenizer: for end-of-sequence and detokenisation (text events, stop strings).
        max_batch_size: most requests decoded together (the cache holds that many rows).
        max_queue: most requests waiting for a slot; :meth:`submit` refuses more.
        prefix_cache_tokens: most prompt positions the prefix cache keeps (0: no prefix caching; default
            half the positions of the batch's cache, ``max_batch_size * block_size // 2``).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch_size: int = 8, max_queue: int = 64,
                 prefix_cache_tokens: int | None = None):
        if max_batch_size < 1 or max_queue < 0:
            raise ConfigError(f"max_batch_size must be >= 1 and max_queue >= 0, not {max_batch_size}, {max_queue}")
        if prefix_cache_tokens is not None and prefix_cache_tokens < 0:
            raise ConfigError(f"prefix_cache_tokens must be >= 0, not {prefix_cache_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.block_size, self.vocab_size = model.config.block_size, model.config.vocab_size
        self.cache = SlotKVCache.empty(model.config, max_batch_size, self.block_size, self.device, self.dtype)
        if self.device.type == "cpu":  # compile the C kernels now, not in the first request
            kernel_available(self.dtype)
            linear_kernel_available()
        if prefix_cache_tokens is None:
            prefix_cache_tokens = max_batch_size * self.block_size // 2
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self._running: list[_Request] = []   # row i of the cache belongs to _running[i]
        self._waiting: deque[_Request] = deque()
        self._cond = threading.Condition()     # guards _waiting, request states and flags; wakes the loop
        self._step_lock = threading.Lock()     # one step at a time
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = threading.Event()  # set while no loop runs
        self._stopped.set()
        self._jobs: list[tuple[Future, Callable[[], Any]]] = []

    # ------------------------------------------------------------------ requests (any thread)
    def submit(self, prompt_ids: list[int], sampling: SamplingConfig | None = None,
               top_logprobs: int | None = None,
               listener: Callable[[Event | BaseException], None] | None = None) -> RequestHandle:
        """Queue a request; returns at once. With ``top_logprobs`` (0 or more), every token comes with its
        :class:`TokenLogprob` and that many most likely alternatives. With ``listener``, events are not
        queued for the handle: the listener gets each one (or the exception that failed the request) as it
        happens, in the stepping thread (an asyncio server passes ``loop.call_soon_threadsafe`` onwards:
        no thread waits per request). It must be quick and must not call the engine.

        Raises :class:`RequestError` for an empty prompt, token ids outside the vocabulary, invalid
        sampling options, ``num_samples != 1``, a prompt that leaves no room in the context for a
        token, or a full queue. ``max_new_tokens`` is capped to ``block_size - len(prompt_ids)``
        (see :attr:`RequestHandle.max_new_tokens`).
        """
        sampling = sampling or SamplingConfig()
        try:
            sampling.validate()
        except ConfigError as exc:
            raise RequestError(str(exc)) from None
        if sampling.num_samples != 1:
            raise RequestError("the engine draws one sample per request; submit the prompt once per sample")
        try:
            prompt = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise RequestError("prompt_ids must be a list of integer token ids") from None
        if not prompt:
            raise RequestError("the prompt needs at least one token")
        if top_logprobs is not None and not 0 <= top_logprobs <= min(20, self.vocab_size):
            raise RequestError(f"top_logprobs must be between 0 and {min(20, self.vocab_size)}, not {top_logprobs}")
        if not all(0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"token ids must be in [0, {self.vocab_size})")
        room = self.block_size - len(prompt)
        if room < 1:
            raise context_error("prompt", len(prompt), self.block_size, "prompt", 1, "; shorten the prompt")
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros((1, self.vocab_size), dtype=torch.bool, device=self.device)
            seen[0, prompt] = True
        counts = None
        if sampling.counts_tokens:
            counts = torch.zeros((1, self.vocab_size), dtype=torch.float32, device=self.device)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        request = _Request(
            id=next(self._ids), prompt=prompt, sampling=sampling, max_new_tokens=min(sampling.max_new_tokens, room),
            eos_id=None if sampling.ignore_eos else self.tokenizer.eos_id,
            stream=TextStream(self.tokenizer, sampling.stop), seen=seen, counts=counts, generator=generator,
            top_logprobs=top_logprobs, listener=listener)
        handle = RequestHandle(self, request, sampling.max_new_tokens)
        if request.max_new_tokens == 0:
            request.close("length")
            return handle
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise RequestError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self._cond.notify_all()
        return handle

    def _cancel(self, request: _Request) -> None:
        with self._cond:
            if request.state == "waiting":
                self._waiting.remove(request)
                request.close("cancelled")
            elif request.state == "running":
                request.cancelled = True
                self._cond.notify_all()

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a slot (decoded together every step)."""
        return len(self._running)

    # ------------------------------------------------------------------ scheduling (one thread)
    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function`` in the stepping thread between two steps (any thread may call this); its result
        or exception arrives in the returned future. For other work on the model (e.g. scoring): on a CPU,
        torch runs fastest when a single thread does all the computing (OpenMP keeps one worker team per
        computing thread, and with more teams than cores its workers stop spinning)."""
        job: Future = Future()
        with self._cond:
            self._jobs.append((job, function))
            self._cond.notify_all()
        return job

    @torch.inference_mode()
    def step(self) -> int:
        """One scheduling round: run queued :meth:`call` jobs, retire cancelled rows, admit waiting requests,
        decode one token for every running request. Returns the size of the decoding batch (0 when
        nothing ran)."""
        with self._step_lock:
            self._run_jobs()
            for row in reversed([row for row, r in enumerate(self._running) if r.cancelled]):
                self._retire(row, "cancelled")
            self._admit()
            if not self._running:
                return 0
            batch = len(self._running)
            self._decode()
            return batch

    def run_until_idle(self) -> None:
        """Step until no request runs or waits and no job is queued (without a background thread)."""
        while self._running or self._waiting or self._jobs:
            self.step()

    def _run_jobs(self) -> None:
        with self._cond:
            jobs, self._jobs = self._jobs, []
        for job, function in jobs:
            if job.set_running_or_notify_cancel():
                try:
                    job.set_result(function())
                except BaseException as exc:
                    job.set_exception(exc)

    def _admit(self) -> None:
        """Move waiting requests into free slots, oldest first, and prefill them: prompts with as many cached
        leading tokens (from the prefix cache; maybe none) and of similar lengths together, after those tokens
        (right-padded, each straight into its own row of the cache; causal attention keeps the padding out of
        every real token's sight). Then sample each one's first token."""
        with self._cond:
            count = min(self.max_batch_size - len(self._running), len(self._waiting))
            admitted = [self._waiting.popleft() for _ in range(count)]
            for request in admitted:
                request.state = "running"
        hits: dict[int, PrefixHit] = {}  # request id -> its cached prefix
        by_past: dict[int, list[_Request]] = {}  # cached leading tokens -> requests
        for request in admitted:
            hit = None if self.prefix_cache is None else self.prefix_cache.lookup(request.prompt)
            if hit is not None:
                hits[request.id] = hit
            by_past.setdefault(0 if hit is None else hit.length, []).append(request)
        prefills = [(group, [hits[r.id] for r in group] if past else None)
                    for past, requests in by_past.items() for group in _similar_lengths(requests, past)]
        for done, (group, group_hits) in enumerate(prefills):
            try:
                self._prefill(group, group_hits)  # fails its own group's requests if it raises
            except BaseException as exc:
                for later, _ in prefills[done + 1:]:
                    for request in later:
                        request.fail(exc)
                raise

    def _prefill(self, group: list[_Request], hits: list[PrefixHit] | None = None) -> None:
        """Compute ``group``'s prompts into new rows of the cache (after their cached prefixes ``hits``, all
        of one length), keep their prefixes in the prefix cache, and take each one's first token."""
        start, lengths = len(self._running), [len(r.prompt) for r in group]
        past = hits[0].length if hits else 0
        try:
            ids = torch.zeros((len(group), max(lengths) - past), dtype=torch.long)  # (k, L) right-padded with 0
            for i, request in enumerate(group):
                ids[i, :lengths[i] - past] = torch.tensor(request.prompt[past:])
            last = torch.tensor(lengths) - 1 - past  # (k,) each prompt's last position among ids
            view = self.cache.row_cache(start, len(group))  # (k, Hkv, block_size, D) views of the new rows
            mask = None
            if hits:  # the first `past` positions of every row come from the prefix cache
                for i, hit in enumerate(hits):
                    hit.copy_into([k[i:i + 1] for k in view.keys], [v[i:i + 1] for v in view.values])
                view.length = past
                mask = torch.ones((len(group), max(lengths)), dtype=torch.bool, device=self.device)  # causal
            logits = self.model(ids.to(self.device), attention_mask=mask, cache=view,
                                logits_at=last.to(self.device))[:, -1]  # (k, V)
            admitted = time.perf_counter()
            for i, request in enumerate(group):
                self.cache.set_length(start + i, lengths[i])
                request.admitted, request.cached_tokens = admitted, past
                if self.prefix_cache is not None:
                    self.prefix_cache.insert(request.prompt, [k[i:i + 1] for k in view.keys],
                                             [v[i:i + 1] for v in view.values])
            picked = self._pick(logits, group)
        except BaseException as exc:
            for request in group:
                request.fail(exc)
            raise
        self._running.extend(group)
        self.cache.rows = len(self._running)
        now = time.perf_counter()
        finished = [(start + i, reason) for i, (request, (token, logprob)) in enumerate(zip(group, picked))
                    if (reason := request.accept(token, now, logprob)) is not None]
        for row, reason in reversed(finished):  # from the back, so moved rows are never finished ones
            self._retire(row, reason)

    def _decode(self) -> None:
        """One batched decoding step over all running rows."""
        last = torch.tensor([[r.token_ids[-1]] for r in self._running], device=self.device)  # (B, 1)
        positions, mask = self.cache.decode_inputs()  # (B, 1), (B, 1, 1, S)
        logits = self.model(last, position_ids=positions, attention_mask=mask, cache=self.cache,
                            last_only=True)[:, -1]  # (B, V)
        picked = self._pick(logits, self._running)
        now = time.perf_counter()
        finished = [(row, reason) for row, (request, (token, logprob)) in enumerate(zip(self._running, picked))
                    if (reason := request.accept(token, now, logprob)) is not None]
        for row, reason in reversed(finished):  # from the back, so moved rows are never finished ones
            self._retire(row, reason)

    def _pick(self, logits: Tensor, requests: list[_Request]) -> list[tuple[int, TokenLogprob | None]]:
        """Next token of every row, each with its request's options, and its log-probability when asked:
        (B, V) logits -> B (id, logprob) pairs."""
        # (B,) serves every plain greedy row at once; in fp32 (exact, same ties): torch 2.13's CPU arg-max
        # over bf16 rows is ~2x slower than converting them first (16 x 8,192 logits: 268 against 120 us)
        picked = logits.float().argmax(dim=-1)
        for row, request in enumerate(requests):
            if not request.greedy_plain:
                picked[row] = pick_next(logits[row:row + 1], request.sampling, request.seen, request.generator,
                                        request.counts)[0]
        tokens = picked.tolist()
        return [(token, None if request.top_logprobs is None else _logprob(logits[row], token, request.top_logprobs))
                for row, (request, token) in enumerate(zip(requests, tokens))]

    def _retire(self, row: int, reason: str) -> None:
        """Free ``row``: the last running row moves into it, so rows stay packed."""
        request, last = self._running[row], len(self._running) - 1
        if row != last:
            self.cache.move(last, row)
            self._running[row] = self._running[last]
        self._running.pop()
        self.cache.rows = len(self._running)
        request.close(reason)

    # ------------------------------------------------------------------ background thread
    def start(self) -> None:
        """Run the scheduling loop (:meth:`run`) in a background (daemon) thread."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self.run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """The scheduling loop, in the calling thread, until :meth:`stop`: step while there is work, sleep
        otherwise. Run it in the thread that loaded the model (see :meth:`call`), or use :meth:`start`."""
        self._stopped.clear()
        try:
            self._loop()
        finally:
            self._stopped.set()

    def stop(self) -> None:
        """Stop the loop (after its current step) and cancel every unfinished request and job."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stopped.wait()
        with self._step_lock:
            with self._cond:
                waiting, self._waiting = list(self._waiting), deque()
                jobs, self._jobs = self._jobs, []
            for request in waiting:
                request.close("cancelled")
            for job, _ in jobs:
                job.cancel()
            while self._running:
                self._retire(len(self._running) - 1, "cancelled")

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running and not self._jobs:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # keep serving: fail the requests of the broken step only
                logger.exception("generation step failed")
                with self._step_lock:
                    for request in self._running:
                        request.fail(exc)
                    self._running.clear()
                    self.cache.rows = 0


def _similar_lengths(requests: list[_Request], past: int = 0, waste: float = 1.5) -> list[list[_Request]]:
    """Requests grouped for batched prefill of their prompts after the first ``past`` tokens: sorted by
    length, a group grows while its padded size stays within ``waste`` times its real tokens (on a CPU a
    batch of short prompts costs far less than prefilling them one by one; padding long ones would cost
    more than it saves)."""
    groups: list[list[_Request]] = []
    real = 0
    for request in sorted(requests, key=lambda r: len(r.prompt)):
        length = len(request.prompt) - past
        if groups and (len(groups[-1]) + 1) * length <= waste * (real + length):
            groups[-1].append(request)
            real += length
        else:
            groups.append([request])
            real = length
    return groups


def _logprob(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability and the ``top`` most likely tokens', from one row of raw logits (V,)."""
    logprobs = logits.float().log_softmax(-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist()))
    return TokenLogprob(token, logprobs[token].item(), alternatives)
