"""``lmforge requests``: the summary of a server's request log, as a user runs it."""

from __future__ import annotations

import json
import sqlite3

import pytest
from cli_helpers import assert_clean_error, lmforge_all

from lmforge.serving.request_log import RequestLog, RequestRecord, default_log_path


def _record(i: int) -> RequestRecord:
    failed = i % 4 == 3
    return RequestRecord(time=1_700_000_000 + i, method="POST", endpoint="/v1/chat/completions" if i % 2 else
                         "/v1/completions", status=400 if failed else 200, outcome="client_error" if failed else "ok",
                         latency=0.1 * (i + 1), prompt_tokens=10 + i, completion_tokens=None if failed else 5,
                         time_to_first_token=None if failed else 0.01 * (i + 1), model="tiny",
                         error="prompt is too long" if failed else None, prompt="hello", client="127.0.0.1")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every run at once (each pays Python's start-up), keyed by name."""
    root = tmp_path_factory.mktemp("requests")
    folder = root / "checkpoint"
    with RequestLog(default_log_path(folder)) as log:
        for i in range(12):
            log.record(_record(i))
    (root / "notes.txt").write_text("hello\n")
    other = root / "other.sqlite3"
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE t (x)")
    connection.commit()
    connection.close()
    db = default_log_path(folder)
    runs = {
        "db": ("requests", db), "folder": ("requests", folder), "last": ("requests", folder, "--last", 3),
        "json": ("requests", db, "--json", "--last", 2), "missing": ("requests", root / "nope.sqlite3"),
        "empty_folder": ("requests", root), "text": ("requests", root / "notes.txt"),
        "other": ("requests", other), "bad_last": ("requests", db, "--last", 0),
    }
    before = {path: path.read_bytes() for path in (root / "notes.txt", other)}
    done = dict(zip(runs, lmforge_all(*runs.values(), workers=2)))
    assert all(path.read_bytes() == data for path, data in before.items())  # foreign files untouched
    return done, db


def test_summary_of_a_file_and_of_a_folder(results):
    done, db = results
    for name in ("db", "folder"):
        result = done[name]
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert str(db) in out and "12 requests" in out
        assert "ok 9, client_error 3" in out
        assert "186 prompt, 45 completion" in out  # sum(10..21), 9 * 5
        assert "/v1/chat/completions" in out and "/v1/completions" in out
        lines = out.splitlines()
        all_row = next(line for line in lines if line.startswith("all "))
        assert all_row.split()[1:3] == ["12", "3"]  # requests, errors
        assert "prompt is too long" in out
    assert done["db"].stdout == done["folder"].stdout


def test_last_lists_the_newest_requests(results):
    done, _ = results
    result = done["last"]
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("last 3 request(s):\n")[1].splitlines()
    assert len(table) == 4 and table[0].startswith("time")
    assert ["1.00 s", "1.10 s", "1.20 s"] == [next(c for c in row.split("  ") if c.strip().endswith(" s")).strip()
                                              for row in table[1:]]
    assert "hello" not in result.stdout  # prompts were not logged


def test_json(results):
    done, db = results
    result = done["json"]
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == str(db) and data["requests"] == 12 and data["errors"] == 3
    assert data["outcomes"] == {"ok": 9, "client_error": 3}
    assert data["prompt_tokens"] == 186 and data["completion_tokens"] == 45
    assert data["latency"]["p50"] == pytest.approx(0.65)  # median of 0.1 .. 1.2
    assert data["endpoints"]["/v1/completions"]["requests"] == 6
    assert data["common_errors"] == [{"error": "prompt is too long", "count": 3}]
    assert [r["time"] for r in data["recent"]] == [1_700_000_010, 1_700_000_011]
    assert data["recent"][1]["outcome"] == "client_error" and data["recent"][1]["prompt"] is None


def test_errors_are_one_line(results):
    done, _ = results
    assert_clean_error(done["missing"], "nope.sqlite3", "does not exist")
    assert_clean_error(done["empty_folder"], "no request log in", "requests.sqlite3")
    assert_clean_error(done["text"], "notes.txt", "not an lmforge request log")
    assert_clean_error(done["other"], "other.sqlite3", "not an lmforge request log")
    assert_clean_error(done["bad_last"], "--last")
