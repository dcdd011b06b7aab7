"""The server's request log: concurrent recording, privacy, the summary's numbers, foreign files."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import statistics
import threading
import time
from collections import Counter
from dataclasses import replace

import pytest

from lmforge.errors import DataError
from lmforge.serving.request_log import (
    DEFAULT_FILE_NAME,
    RequestLog,
    RequestRecord,
    default_log_path,
    format_records,
    format_summary,
    recent,
    summarize,
)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
ERRORS = ("prompt is too long", "bad sampling option", "the engine failed")


def make_record(i: int, rng: random.Random | None = None, prompt: str | None = None) -> RequestRecord:
    """A distinct record per ``i``; with ``rng``, random endpoint, outcome, tokens and timings."""
    rng = rng or random.Random(i)
    outcome = rng.choice(("ok", "ok", "ok", "client_error", "server_error", "cancelled", "timeout"))
    status = {"ok": 200, "client_error": 400, "server_error": 500, "cancelled": 499, "timeout": 408}[outcome]
    generates = rng.random() < 0.8
    return RequestRecord(
        time=1_700_000_000 + i * 0.5, method="POST", endpoint=rng.choice(ENDPOINTS), status=status, outcome=outcome,
        latency=rng.uniform(0.001, 3.0), prompt_tokens=rng.randint(1, 500) if generates else None,
        completion_tokens=rng.randint(0, 300) if generates else None,
        time_to_first_token=rng.uniform(0.001, 0.5) if generates and rng.random() < 0.7 else None,
        model="tiny", error=None if outcome == "ok" else ERRORS[rng.choice((0, 0, 0, 1, 1, 2))],
        prompt=prompt if prompt is not None else f"prompt number {i}", client=f"10.0.0.{i % 250}")


def test_records_from_many_threads_are_read_back_exactly(tmp_path):
    path = tmp_path / "logs" / "deep" / "requests.sqlite3"  # the folders are created
    threads, per_thread = 8, 250
    barrier = threading.Barrier(threads)

    with RequestLog(path, log_prompts=True) as log:
        def work(t: int) -> None:
            barrier.wait()
            for j in range(per_thread):
                log.record(make_record(t * per_thread + j))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    expected = [make_record(i) for i in range(threads * per_thread)]
    assert recent(path, 10 * len(expected)) == expected  # oldest first, by start time
    assert recent(path, 3) == expected[-3:]
    assert summarize(path)["requests"] == len(expected)
    assert log.written == len(expected) and log.dropped == 0


def test_prompts_are_dropped_unless_asked_for(tmp_path):
    with RequestLog(tmp_path / "a.sqlite3") as log:
        log.record(make_record(0, prompt="my secret"))
    with RequestLog(tmp_path / "b.sqlite3", log_prompts=True) as log:
        log.record(make_record(0, prompt="my secret"))
    assert recent(tmp_path / "a.sqlite3", 1)[0].prompt is None
    assert b"my secret" not in (tmp_path / "a.sqlite3").read_bytes()
    assert recent(tmp_path / "b.sqlite3", 1)[0].prompt == "my secret"
    assert recent(tmp_path / "a.sqlite3", 1) == [replace(make_record(0), prompt=None)]


def _percentiles(values: list[float], qs: tuple[int, ...]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # cuts[k - 1] is the k-th percentile
    return {f"p{q}": cuts[q - 1] for q in qs}


def test_summary_numbers_match_an_independent_computation(tmp_path):
    rng = random.Random(1234)
    records = [make_record(i, rng) for i in range(600)]
    records.append(RequestRecord(time=1_600_000_000, method="GET", endpoint="/v1/models", status=200, outcome="ok",
                                 latency=0.002, prompt_tokens=None, completion_tokens=None,
                                 time_to_first_token=None, model=None, error=None, prompt=None, client=None))
    with RequestLog(tmp_path / DEFAULT_FILE_NAME) as log:
        for r in records:
            log.record(r)
    summary = summarize(tmp_path)  # a folder: its requests.sqlite3

    assert summary["path"] == str(tmp_path / DEFAULT_FILE_NAME)
    assert summary["requests"] == len(records)
    assert summary["first_time"] == 1_600_000_000 and summary["last_time"] == max(r.time for r in records)
    assert summary["outcomes"] == dict(Counter(r.outcome for r in records))
    assert summary["prompt_tokens"] == sum(r.prompt_tokens or 0 for r in records)
    assert summary["completion_tokens"] == sum(r.completion_tokens or 0 for r in records)
    assert summary["errors"] == sum(r.outcome != "ok" for r in records)
    common = Counter(r.error for r in records if r.error).most_common()
    assert len({count for _, count in common}) == len(common)  # no ties: the order is unambiguous
    assert summary["common_errors"] == [{"error": e, "count": n} for e, n in common]

    def check(stats: dict, chosen: list[RequestRecord]) -> None:
        assert stats["latency"] == pytest.approx(_percentiles([r.latency for r in chosen], (50, 90, 99)))
        ttfts = [r.time_to_first_token for r in chosen if r.time_to_first_token is not None]
        assert stats["time_to_first_token"] == pytest.approx(_percentiles(ttfts, (50, 99)))

    check(summary, records)
    assert set(summary["endpoints"]) == set(ENDPOINTS)
    for endpoint, stats in summary["endpoints"].items():
        chosen = [r for r in records if r.endpoint == endpoint]
        assert stats["requests"] == len(chosen)
        assert stats["outcomes"] == dict(Counter(r.outcome for r in chosen))
        assert stats["prompt_tokens"] == sum(r.prompt_tokens or 0 for r in chosen)
        assert stats["completion_tokens"] == sum(r.completion_tokens or 0 for r in chosen)
        check(stats, chosen)

    text = format_summary(summary)
    assert f"{len(records)} requests" in text and "/v1/chat/completions" in text and ERRORS[0] in text
    table = format_records(recent(tmp_path, 5))
    assert len(table.splitlines()) == 6 and "10.0.0." in table


def test_an_empty_log_summarizes_to_nothing(tmp_path):
    RequestLog(tmp_path / "r.sqlite3").close()
    summary = summarize(tmp_path / "r.sqlite3")
    assert summary["requests"] == 0 and summary["latency"] is None and summary["endpoints"] == {}
    assert summary["prompt_tokens"] == 0 and summary["first_time"] is None
    assert "no requests" in format_summary(summary)
    assert recent(tmp_path / "r.sqlite3", 5) == []


def _foreign_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 20)
    other = tmp_path / "other.sqlite3"
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, url TEXT)")
    connection.execute("INSERT INTO requests (url) VALUES ('x')")
    connection.commit()
    connection.close()
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    return {text: "not a SQLite database", other: "not an lmforge request log", empty: "not a SQLite database"}


def test_foreign_files_are_refused_and_left_byte_identical(tmp_path):
    for path, message in _foreign_files(tmp_path).items():
        before = path.read_bytes()
        for attempt, args in ((RequestLog, (path,)), (RequestLog, (path, True)), (summarize, (path,)),
                              (recent, (path, 3))):
            with pytest.raises(DataError, match=message):
                attempt(*args)
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite3", "notes.txt", "other.sqlite3"]


def test_a_database_with_our_mark_but_another_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite3"
    RequestLog(path).close()
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.commit()
    connection.close()
    before = path.read_bytes()
    with pytest.raises(DataError, match="newer"):
        RequestLog(path)
    with pytest.raises(DataError, match="newer"):
        summarize(path)
    assert path.read_bytes() == before


def test_missing_paths_are_errors_and_create_nothing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        summarize(tmp_path / "nope.sqlite3")
    with pytest.raises(DataError, match="does not exist"):
        recent(tmp_path / "sub" / "nope.sqlite3", 1)
    with pytest.raises(DataError, match="no request log in"):
        summarize(tmp_path)
    with pytest.raises(DataError, match="is a folder"):
        RequestLog(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_reading_while_the_writer_is_open(tmp_path):
    path = default_log_path(tmp_path)
    assert path == tmp_path / "requests.sqlite3"
    with RequestLog(path) as log:
        assert summarize(path)["requests"] == 0
        for i in range(10):
            log.record(make_record(i))
        assert log.flush(timeout=10)
        assert summarize(tmp_path)["requests"] == 10
        stop = threading.Event()

        def keep_writing() -> None:
            i = 10
            while not stop.is_set():
                log.record(make_record(i))
                i += 1
                time.sleep(0.001)

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            seen = [summarize(path)["requests"] for _ in range(20)]
        finally:
            stop.set()
            writer.join()
        assert seen == sorted(seen) and seen[0] >= 10
        log.record(make_record(100_000))
        assert log.flush(timeout=10)
        assert recent(path, 1) == [replace(make_record(100_000), prompt=None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.sqlite3"]  # no -wal/-shm left behind


def test_close_flushes_is_idempotent_and_later_records_are_dropped(tmp_path):
    path = tmp_path / "r.sqlite3"
    log = RequestLog(path)
    for i in range(3000):
        log.record(make_record(i))
    log.close()  # no flush first: close writes everything queued
    assert summarize(path)["requests"] == 3000
    log.close()
    log.record(make_record(5000))  # never raises
    assert log.dropped == 1 and summarize(path)["requests"] == 3000
    with RequestLog(path) as again:  # reopening appends
        again.record(make_record(5001))
    assert summarize(path)["requests"] == 3001


def test_record_never_waits_for_the_disk(tmp_path):
    """While another connection holds the write lock, record() from an event loop still returns at once."""
    path = tmp_path / "r.sqlite3"
    with RequestLog(path) as log:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the writer thread now waits for the lock

        async def serve() -> float:
            slowest = 0.0
            for i in range(200):
                started = time.perf_counter()
                log.record(make_record(i))
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0)
            return slowest

        assert asyncio.run(serve()) < 0.05
        time.sleep(0.2)
        assert log.written == 0
        blocker.execute("COMMIT")
        blocker.close()
    assert summarize(path)["requests"] == 200


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_failing_write_is_logged_once_and_never_raises(tmp_path):
    log = RequestLog(tmp_path / "r.sqlite3")
    log._connection.close()  # every write now fails, as on a full or vanished disk
    logger = logging.getLogger("lmforge.serving.request_log")
    collect = _Collect()
    logger.addHandler(collect)  # whether or not the "lmforge" logger propagates
    try:
        for i in range(3):
            log.record(make_record(i))
            assert log.flush(timeout=10)
        log.close()
    finally:
        logger.removeHandler(collect)
    assert log.dropped == 3 and log.written == 0
    assert len(collect.records) == 1 and collect.records[0].levelno == logging.ERROR
    assert "could not record" in collect.records[0].getMessage()


def test_a_record_sqlite_cannot_store_costs_only_itself(tmp_path):
    path = tmp_path / "r.sqlite3"
    with RequestLog(path) as log:
        log.record(make_record(0))
        log.record(replace(make_record(1), prompt_tokens=[1, 2]))  # a server bug: not an int
        log.record(make_record(2))
    assert recent(path, 10) == [replace(make_record(i), prompt=None) for i in (0, 2)]
    assert log.dropped == 1 and log.written == 2
