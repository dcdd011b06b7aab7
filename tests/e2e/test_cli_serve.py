"""``lmforge serve`` as a user runs it: a real server process answering the OpenAI-compatible API."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest
import torch
from cli_helpers import CLI, assert_clean_error, lmforge

from lmforge.api import LanguageModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_serve_answers_like_the_python_api(trained_run):
    port = free_port()
    server = subprocess.Popen([*CLI, "serve", str(trained_run), "--port", str(port), "--device", "cpu",
                               "--api-key", "secret"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not start: " + server.stderr.read() if server.poll() is not None else "")
        body = {"prompt": "The for statement", "max_tokens": 12, "temperature": 0}
        status, error = post(f"{base}/v1/completions", body)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
        status, answer = post(f"{base}/v1/completions", body, {"Authorization": "Bearer secret"})
        assert status == 200, answer
        # the server's default precision is auto: bf16 where the CPU computes it natively, else fp32
        lm = LanguageModel.load(trained_run, device="cpu", dtype="auto")
        expected = lm.complete("The for statement", max_new_tokens=12, temperature=0)[0]
        assert answer["choices"][0]["text"] == expected.text
        assert answer["usage"]["completion_tokens"] == len(expected.token_ids)
    finally:
        server.terminate()
        server.wait(timeout=30)
    precision = "bf16" if lm.model.tok_emb.weight.dtype == torch.bfloat16 else "fp32"
    assert f"serving {trained_run} ({precision}) at http://127.0.0.1:{port}/v1" in server.stdout.read()


def test_serve_errors_are_one_line(trained_run, tmp_path):
    assert_clean_error(lmforge("serve", tmp_path / "missing"), "does not exist")
    assert_clean_error(lmforge("serve", trained_run, "--port", "70000"), "--port")
    assert_clean_error(lmforge("serve", trained_run, "--max-batch-size", "0"), "--max-batch-size")
    assert_clean_error(lmforge("serve", trained_run, "--prefix-cache-tokens", "-1"), "--prefix-cache-tokens")
    assert_clean_error(lmforge("serve", trained_run, "--dtype", "fp8"), "dtype must be auto, fp32, bf16 or fp16")
    assert_clean_error(lmforge("serve", trained_run, "--request-timeout", "0"), "--request-timeout")
    assert_clean_error(lmforge("serve", trained_run, "--max-body-size", "10"), "--max-body-size")
    assert_clean_error(lmforge("serve", trained_run, "--request-log", tmp_path), "request log")
