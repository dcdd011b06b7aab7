"""The server's request log: one SQLite row per HTTP request answered, and its summary.

:class:`RequestLog` is written by the server: :meth:`RequestLog.record` only puts the record on a queue
(no disk I/O, safe from any thread or an asyncio event loop); one background thread writes the queue
in batches, one transaction each. The database is in WAL mode, so ``lmforge requests`` (:func:`summarize`,
:func:`recent`) reads it while the server writes. It never holds an API key or a header; prompts only
with ``log_prompts=True``. The file is created readable by its owner only.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import queue
import sqlite3
import tempfile
import threading
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lmforge.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_FILE_NAME = "requests.sqlite3"
SCHEMA_VERSION = 1  # PRAGMA user_version
APPLICATION_ID = 0x6C6D6672  # PRAGMA application_id, "lmfr": marks the file as an lmforge request log
OUTCOMES = ("ok", "client_error", "server_error", "cancelled", "timeout")
MAX_QUEUED = 100_000  # records waiting for the writer; beyond this they are dropped (and that is logged)
BATCH_SIZE = 512

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCHEMA = """
CREATE TABLE requests (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    method TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    latency REAL NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    time_to_first_token REAL,
    model TEXT,
    error TEXT,
    prompt TEXT,
    client TEXT
);
CREATE INDEX requests_by_time ON requests (time);
"""


@dataclass(frozen=True)
class RequestRecord:
    """One HTTP request: when, where, how it ended, how long it took (seconds), and its tokens."""

    time: float  # unix seconds at the request's start
    method: str
    endpoint: str  # the URL path
    status: int  # HTTP status
    outcome: str  # one of OUTCOMES
    latency: float  # to the end of the response body, streaming included
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token: float | None = None
    model: str | None = None
    error: str | None = None  # the error message, if any
    prompt: str | None = None  # only kept by a RequestLog with log_prompts=True
    client: str | None = None  # the client's address


_COLUMNS = tuple(f.name for f in fields(RequestRecord))
_INSERT = f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_PROMPT = _COLUMNS.index("prompt")


def default_log_path(checkpoint_folder: str | Path) -> Path:
    """Where the server records requests by default: ``requests.sqlite3`` in the checkpoint folder."""
    return Path(checkpoint_folder) / DEFAULT_FILE_NAME


# ----------------------------------------------------------------------------------- the file
def _check_file(path: Path) -> None:
    """Raise DataError unless ``path`` is an lmforge request log; reads its header only, changes nothing."""
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a request log file")
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise DataError(f"cannot read request log {path}: {exc.strerror or exc}") from None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise DataError(f"{path} is not an lmforge request log (not a SQLite database); it was left untouched")
    if int.from_bytes(header[68:72], "big") != APPLICATION_ID:
        raise DataError(f"{path} is a SQLite database but not an lmforge request log; it was left untouched")


def _check_schema(connection: sqlite3.Connection, path: Path) -> None:
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise DataError(f"request log {path} has schema version {version}, newer than this lmforge "
                        f"understands ({SCHEMA_VERSION}); upgrade lmforge")
    found = {row[1] for row in connection.execute("PRAGMA table_info(requests)")}
    if version != SCHEMA_VERSION or not set(_COLUMNS) <= found:
        raise DataError(f"{path} is not an lmforge request log (schema version {version}, "
                        f"table 'requests' {'incomplete' if found else 'missing'})")


def _create(path: Path) -> None:
    """Create an empty log atomically: built under a temporary name, then linked into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    os.close(fd)
    try:
        connection = sqlite3.connect(tmp)
        try:
            connection.executescript(_SCHEMA)
            connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file's header
            connection.commit()
        finally:
            connection.close()
        try:
            os.link(tmp, path)  # fails if another process created the log meanwhile: then that one is used
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _open_for_reading(path: str | Path) -> tuple[Path, sqlite3.Connection]:
    """A read-only connection to a log file, or to ``requests.sqlite3`` in a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        if not default_log_path(path).exists():
            raise DataError(f"no request log in {path} (no {DEFAULT_FILE_NAME}); 'lmforge serve {path}' "
                            f"writes one there")
        path = default_log_path(path)
    if not path.exists():
        raise DataError(f"request log {path} does not exist")
    return path, _connect_read_only(path)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that only reads an existing lmforge request log (DataError for any other file)."""
    _check_file(path)
    try:
        # mode=rw (never creates; read-only where the file is): unlike mode=ro, its close can remove the
        # -wal and -shm files that any reader of a WAL database makes; query_only keeps it from writing
        connection = sqlite3.connect(path.resolve().as_uri() + "?mode=rw", uri=True, timeout=10)
        connection.execute("PRAGMA query_only = 1")
    except sqlite3.Error as exc:
        raise DataError(f"cannot read request log {path}: {exc}") from None
    try:
        _check_schema(connection, path)
    except sqlite3.Error as exc:
        connection.close()
        raise DataError(f"cannot read request log {path}: {exc}") from None
    except DataError:
        connection.close()
        raise
    return connection


# ----------------------------------------------------------------------------------- writing
class RequestLog:
    """Records :class:`RequestRecord` rows into a SQLite file from a background writer thread.

    ``RequestLog(path)`` creates the file (and its folders) or opens an existing log; any other file
    is refused with a :class:`~lmforge.errors.DataError` and left untouched. Use ``close()`` (or
    ``with``) to write everything still queued; a failing write is logged once and never raised.
    """

    def __init__(self, path: str | Path, log_prompts: bool = False) -> None:
        self.path = Path(path)
        self.log_prompts = log_prompts
        if self.path.is_dir():
            raise DataError(f"request log {self.path} is a folder; give a file name, e.g. "
                            f"{default_log_path(self.path)}")
        if not self.path.exists():
            try:
                _create(self.path)
            except (OSError, sqlite3.Error) as exc:
                raise DataError(f"cannot create request log {self.path}: {exc}") from None
        _connect_read_only(self.path).close()  # checked read-only first: a foreign file is never written
        try:
            self._connection = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                               check_same_thread=False)  # used by the writer thread only
            self._connection.execute("PRAGMA synchronous = NORMAL")  # durable at WAL checkpoints, and fast
        except sqlite3.Error as exc:
            raise DataError(f"cannot open request log {self.path}: {exc}") from None
        self.written = 0  # records committed so far
        self.dropped = 0  # records lost to a full queue or a failed write
        self._queue: queue.Queue[Any] = queue.Queue(MAX_QUEUED)
        self._closed = False
        self._close_lock = threading.Lock()
        self._warned = False
        self._lost_lock = threading.Lock()
        self._writer = threading.Thread(target=self._run, name="lmforge-request-log", daemon=True)
        self._writer.start()
        ref = weakref.ref(self)
        self._atexit = lambda: (log := ref()) is not None and log.close()
        atexit.register(self._atexit)  # a daemon thread's queue would be lost at exit otherwise

    def record(self, record: RequestRecord) -> None:
        """Queue one record; returns at once, never raises. The prompt is dropped unless ``log_prompts``."""
        try:
            row = tuple(getattr(record, name) for name in _COLUMNS)
            if not self.log_prompts and row[_PROMPT] is not None:
                row = row[:_PROMPT] + (None,) + row[_PROMPT + 1:]
            if self._closed:
                raise RuntimeError("the request log is closed")
            self._queue.put_nowait(row)
        except queue.Full:
            self._lost(1, "the request log's queue is full (the disk is too slow?)")
        except Exception as exc:  # the log must never break serving
            self._lost(1, str(exc))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written (or failed); False if ``timeout`` passed first."""
        if self._closed:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self) -> None:
        """Write everything still queued and stop the writer; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._atexit)
        self._queue.put(None)  # blocks only while the queue is full, i.e. while the writer is busy
        self._writer.join()
        late = []  # records queued by a record() racing with close()
        with contextlib.suppress(queue.Empty):
            while True:
                late.append(self._queue.get_nowait())
        rows = [item for item in late if isinstance(item, tuple)]
        if rows:
            self._write(rows)
        for item in late:
            if isinstance(item, threading.Event):
                item.set()
        with contextlib.suppress(sqlite3.Error):
            self._connection.close()  # the last connection folds the WAL back into the file

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RequestLog({str(self.path)!r}, log_prompts={self.log_prompts})"

    def _lost(self, count: int, reason: str) -> None:
        with self._lost_lock:
            self.dropped += count
            warn, self._warned = not self._warned, True
        if warn:
            logger.error("request log %s: could not record %d request(s): %s (further losses are not logged)",
                         self.path, count, reason)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[tuple] = []
            events: list[threading.Event] = []
            item = self._queue.get()
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    events.append(item)
                else:
                    batch.append(item)
                if stop or len(batch) >= BATCH_SIZE:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for event in events:
                event.set()

    def _write(self, batch: list[tuple]) -> None:
        """Insert a batch in one transaction; a record SQLite cannot store costs only itself."""
        try:
            self._connection.execute("BEGIN")
            try:
                self._connection.executemany(_INSERT, batch)
                self._connection.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._connection.execute("ROLLBACK")
                raise
            self.written += len(batch)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError) as exc:  # e.g. a field of an unstorable type
            if len(batch) == 1:
                self._lost(1, str(exc))
            else:
                for row in batch:
                    self._write([row])
        except Exception as exc:  # disk full, read-only file, locked too long...
            self._lost(len(batch), str(exc))


# ----------------------------------------------------------------------------------- reading
def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of sorted ``values``, interpolating linearly; None if empty."""
    if not values:
        return None
    rank = (len(values) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return values[low] + (values[high] - values[low]) * (rank - low)


def _stats(latencies: list[float], ttfts: list[float]) -> dict[str, Any]:
    latencies.sort()
    ttfts.sort()
    return {"latency": {f"p{q}": percentile(latencies, q) for q in (50, 90, 99)} if latencies else None,
            "time_to_first_token": {f"p{q}": percentile(ttfts, q) for q in (50, 99)} if ttfts else None}


def summarize(path: str | Path, top_errors: int = 5) -> dict[str, Any]:
    """Totals, counts by endpoint and outcome, tokens, latency percentiles and common errors of a log.

    ``path`` is the log file or a checkpoint folder holding ``requests.sqlite3``. Keys: path, requests,
    first_time/last_time (unix s), outcomes, prompt_tokens, completion_tokens, latency (p50/p90/p99),
    time_to_first_token (p50/p99), errors (requests not "ok"), common_errors, endpoints (each with
    requests, outcomes, tokens and percentiles). Percentiles are in seconds, interpolated linearly, over
    all requests (time to first token: over those that have one); None where there is nothing.
    """
    path, connection = _open_for_reading(path)
    try:
        with connection:
            total, first, last, prompt_tokens, completion_tokens, errors = connection.execute(
                "SELECT COUNT(*), MIN(time), MAX(time), COALESCE(SUM(prompt_tokens), 0), "
                "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(outcome != 'ok'), 0) FROM requests").fetchone()
            endpoints: dict[str, dict[str, Any]] = {}
            by_outcome: dict[str, int] = defaultdict(int)
            for endpoint, outcome, count, prompt, completion in connection.execute(
                    "SELECT endpoint, outcome, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
                    "COALESCE(SUM(completion_tokens), 0) FROM requests GROUP BY endpoint, outcome"):
                row = endpoints.setdefault(endpoint, {"requests": 0, "outcomes": {}, "prompt_tokens": 0,
                                                      "completion_tokens": 0})
                row["requests"] += count
                row["outcomes"][outcome] = count
                row["prompt_tokens"] += prompt
                row["completion_tokens"] += completion
                by_outcome[outcome] += count
            latencies: dict[str, list[float]] = defaultdict(list)
            ttfts: dict[str, list[float]] = defaultdict(list)
            for endpoint, latency, ttft in connection.execute(
                    "SELECT endpoint, latency, time_to_first_token FROM requests"):
                latencies[endpoint].append(latency)
                if ttft is not None:
                    ttfts[endpoint].append(ttft)
            common = connection.execute(
                "SELECT error, COUNT(*) FROM requests WHERE error IS NOT NULL GROUP BY error "
                "ORDER BY COUNT(*) DESC, error LIMIT ?", (top_errors,)).fetchall()
    except sqlite3.Error as exc:
        raise DataError(f"cannot read request log {path}: {exc}") from None
    finally:
        connection.close()
    for endpoint, row in endpoints.items():
        row.update(_stats(latencies[endpoint], ttfts[endpoint]))
    overall = _stats([x for xs in latencies.values() for x in xs], [x for xs in ttfts.values() for x in xs])
    order = {name: i for i, name in enumerate(OUTCOMES)}
    return {
        "path": str(path), "requests": total, "first_time": first, "last_time": last,
        "outcomes": dict(sorted(by_outcome.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))),
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, **overall,
        "errors": errors, "common_errors": [{"error": error, "count": count} for error, count in common],
        "endpoints": dict(sorted(endpoints.items(), key=lambda kv: (-kv[1]["requests"], kv[0]))),
    }


def recent(path: str | Path, n: int) -> list[RequestRecord]:
    """The last ``n`` requests (by start time), oldest first; ``path`` as for :func:`summarize`."""
    path, connection = _open_for_reading(path)
    try:
        with connection:
            rows = connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM requests ORDER BY time DESC, id DESC "
                                      f"LIMIT ?", (max(n, 0),)).fetchall()
    except sqlite3.Error as exc:
        raise DataError(f"cannot read request log {path}: {exc}") from None
    finally:
        connection.close()
    return [RequestRecord(*row) for row in reversed(rows)]


# ----------------------------------------------------------------------------------- text
def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 0.9995 else f"{value:.2f} s"


def _when(value: float | None) -> str:
    return "-" if value is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    """Columns padded to their widest cell; those in ``right`` (numbers) right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in [header, *rows])


def format_summary(summary: dict[str, Any]) -> str:
    """The summary of :func:`summarize` as a few lines and a table per endpoint."""
    lines = [f"request log {summary['path']}"]
    if not summary["requests"]:
        return "\n".join(lines + ["no requests recorded yet"])
    lines.append(f"{summary['requests']:,} requests from {_when(summary['first_time'])} to "
                 f"{_when(summary['last_time'])}")
    lines.append("outcomes: " + ", ".join(f"{name} {count:,}" for name, count in summary["outcomes"].items()))
    lines.append(f"tokens: {summary['prompt_tokens']:,} prompt, {summary['completion_tokens']:,} completion")
    lines.append("")

    def row(name: str, stats: dict[str, Any]) -> list[str]:
        latency = stats["latency"] or {}
        ttft = stats["time_to_first_token"] or {}
        errors = stats["requests"] - stats["outcomes"].get("ok", 0)
        return [name, f"{stats['requests']:,}", f"{errors:,}", *(_seconds(latency.get(f"p{q}")) for q in (50, 90, 99)),
                _seconds(ttft.get("p50")), _seconds(ttft.get("p99")), f"{stats['prompt_tokens']:,}",
                f"{stats['completion_tokens']:,}"]

    rows = [row(name, stats) for name, stats in summary["endpoints"].items()]
    rows.append(row("all", summary))
    lines.append(_table(["endpoint", "requests", "errors", "p50", "p90", "p99", "ttft p50", "ttft p99",
                         "prompt tok", "completion tok"], rows, right=set(range(1, 10))))
    if summary["errors"]:
        lines += ["", f"errors: {summary['errors']:,} requests did not end 'ok'"]
        if summary["common_errors"]:
            lines.append("most common error messages:")
            lines += [f"  {e['count']:>7,}  {_shorten(e['error'], 100)}" for e in summary["common_errors"]]
    return "\n".join(lines)


def _shorten(text: str | None, width: int) -> str:
    if text is None:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_records(records: list[RequestRecord]) -> str:
    """Records as a table, one line each (errors and prompts shortened)."""
    if not records:
        return "no requests recorded yet"
    with_prompts = any(r.prompt is not None for r in records)
    header = ["time", "method", "endpoint", "status", "outcome", "latency", "ttft", "prompt tok", "completion tok",
              "client", "error"] + (["prompt"] if with_prompts else [])
    rows = [[_when(r.time), r.method, r.endpoint, str(r.status), r.outcome, _seconds(r.latency),
             _seconds(r.time_to_first_token), "-" if r.prompt_tokens is None else f"{r.prompt_tokens:,}",
             "-" if r.completion_tokens is None else f"{r.completion_tokens:,}", r.client or "-",
             _shorten(r.error, 60)] + ([_shorten(r.prompt, 60)] if with_prompts else []) for r in records]
    return _table(header, rows, right={3, 5, 6, 7, 8})
