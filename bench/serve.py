"""Load generator for ``lmforge serve``: streaming clients against the continuous-batching server.

The script builds a ~10M-parameter checkpoint (the gpt2-10m preset, random weights from a fixed seed, a
BPE tokenizer trained on the embedded corpus) unless ``--checkpoint`` names one, and starts two ``lmforge
serve`` processes on free loopback ports: the batched server (``--max-batch-size 32 --max-queue 256``)
and the one-at-a-time server (``--max-batch-size 1``; not with ``--no-baseline``). It waits for their
``/health``, sends each one warm-up request, and then, in each of ``--rounds`` rounds, for each
concurrency level runs that many clients against the batched server, each client sending streamed
``POST /v1/completions`` requests back to back (``ignore_eos``, so every request generates exactly
``--max-tokens`` tokens) until the round's share of the level's requests is done; then 16 clients
against the one-at-a-time server. A level's numbers pool its rounds (the wall time is their sum): on a
host whose speed drifts, every level is then measured across the same minutes. An idle server takes no
CPU; both are stopped at the end, on errors and on Ctrl-C.

Reported per level: requests/s and output tokens/s (over the level's wall time, first request sent to
last stream closed), time to first token (request sent -> first chunk with text), inter-token latency
(time between successive streamed chunks with text: a chunk may carry more than one token, e.g. when a
token holds part of a UTF-8 character, so this is measured between chunks, and ``tok/chunk`` says how
many tokens a chunk held on average), end-to-end latency (request sent -> ``[DONE]``), p50 and p99, and
errors (a status other than 200, an error event, no ``[DONE]``, no usage, or a ``completion_tokens``
other than ``--max-tokens``). Then the targets, PASS or FAIL: output tokens/s at 16 clients >= 6x the
single-client rate, TTFT p99 at 16 clients < 1 s, no errors, and the 16-client load done >= 5x faster
than by the one-at-a-time server.

The load generator runs on the same machine as the server and competes with it for the CPU; it uses
aiohttp, whose HTTP parser is in C (11% of a core at 16 clients, against 27% for httpx's).

    python bench/serve.py [--dtype bf16|fp32] [--concurrency 1,4,16,32] [--requests N] [--max-tokens 64]
                          [--checkpoint PATH] [--workdir DIR] [--json OUT] [--no-baseline]
                          [--prefix-cache-tokens N] [--rounds 3]

The 8 prompts repeat, so with the servers' default prefix caching most prompts are found cached (as
repeated system prompts are); ``--prefix-cache-tokens 0`` measures every prompt computed in full.

``--dtype bf16`` is the throughput setting on a CPU with native bf16 (docs/benchmarks.md has both).
    python bench/serve.py --quick          # smoke run: a tiny model, few requests (~15 s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np

TARGET_CLIENTS = 16
PROMPT_LENGTHS = (16, 24, 32, 48, 64, 80, 96, 128)  # tokens, cycled through by the prompt list
HEALTH_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------- checkpoint
def build_checkpoint(folder: Path, quick: bool) -> Path:
    """A checkpoint with random weights (seed 0): the gpt2-10m preset with an 8,192-token BPE vocabulary,
    or with ``quick`` a 2-layer width-32 model with a 512-token vocabulary."""
    import torch

    from lmforge.config import ModelConfig
    from lmforge.corpus import default_documents
    from lmforge.models.decoder import DecoderLM
    from lmforge.tokenizer import Tokenizer
    from lmforge.training.checkpoint import save_checkpoint

    documents = list(default_documents())
    tokenizer = Tokenizer.train(documents, kind="bpe", vocab_size=512 if quick else 8192)
    knobs = {"preset": "gpt2-tiny", "block_size": 256} if quick else {"preset": "gpt2-10m"}
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_dict({**knobs, "vocab_size": tokenizer.vocab_size})).eval()
    path = save_checkpoint(folder / ("tiny" if quick else "gpt2-10m"), model, tokenizer)
    print(f"built {path}: {model.num_parameters():,} parameters, vocabulary {tokenizer.vocab_size:,}", flush=True)
    return path


def make_prompts(checkpoint: Path, max_tokens: int) -> list[str]:
    """Deterministic prompts cut from the embedded corpus, PROMPT_LENGTHS tokens long (as the checkpoint's
    tokenizer counts them; shortened where prompt + completion would not fit the model's context)."""
    from lmforge.corpus import default_documents
    from lmforge.tokenizer import Tokenizer
    from lmforge.training.checkpoint import read_config, resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    context = int(read_config(folder)["model"]["block_size"])
    if max_tokens + 1 > context:
        raise SystemExit(f"error: --max-tokens {max_tokens} does not fit the model's {context}-token context")
    tokenizer = Tokenizer.load(folder)
    ids = tokenizer.encode("\n\n".join(doc for _, doc in zip(range(50), default_documents())))
    prompts, start = [], 0
    for length in PROMPT_LENGTHS:
        length = min(length, context - max_tokens)
        prompts.append(tokenizer.decode(ids[start:start + length]))
        start += length
    return prompts


# ---------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) a process has used so far; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def serve(checkpoint: Path, workdir: Path, name: str, max_batch_size: int, dtype: str,
          prefix_cache_tokens: int | None = None) -> Iterator[Server]:
    """``lmforge serve`` in a subprocess on a free loopback port, ready (``/health`` 200); yields it and
    stops it (terminate, then kill) however the block ends. Its output goes to ``workdir/NAME.log``."""
    port = free_port()
    log_path = workdir / f"{name}.log"
    command = [sys.executable, "-m", "lmforge", "serve", str(checkpoint), "--port", str(port), "--device", "cpu",
               "--dtype", dtype, "--max-batch-size", str(max_batch_size), "--max-queue", "256",
               "--request-log", str(workdir / f"{name}-requests.sqlite3")]
    if prefix_cache_tokens is not None:
        command += ["--prefix-cache-tokens", str(prefix_cache_tokens)]
    with open(log_path, "w") as log:
        # its own session: a Ctrl-C reaches only this script, which then stops the server itself
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, log_path)
        yield Server(url, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_healthy(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    with httpx.Client(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if http.get("/health").status_code == 200:
                    return
            time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {HEALTH_TIMEOUT_S} s; see {log_path}")


# ---------------------------------------------------------------------------------------------- clients
@dataclass
class Record:
    """One request as the client saw it: ``start`` is ``time.perf_counter()`` when it was sent, the other
    times are seconds from then."""
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    gaps: list[float] = field(default_factory=list)  # between successive chunks with text
    chunks: int = 0
    tokens: int = 0
    error: str | None = None


async def stream_one(http: aiohttp.ClientSession, url: str, body: dict) -> Record:
    """Send one streamed completion and time its chunks."""
    record = Record(start=time.perf_counter())
    last, done = None, False
    try:
        async with http.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                return _fail(record, f"HTTP {response.status}: {(await response.read())[:200]!r}")
            async for line in response.content:  # one line at a time, b"\n" included
                now = time.perf_counter() - record.start
                if not line.startswith(b"data: "):
                    continue
                if line.rstrip() == b"data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    return _fail(record, f"error event: {event['error']}")
                if event.get("usage"):
                    record.tokens = event["usage"]["completion_tokens"]
                if any(choice.get("text") for choice in event.get("choices", [])):
                    record.chunks += 1
                    if last is None:
                        record.ttft = now
                    else:
                        record.gaps.append(now - last)
                    last = now
        record.e2e = time.perf_counter() - record.start
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        return _fail(record, f"{type(exc).__name__}: {exc}")
    if not done:
        return _fail(record, "the stream ended without [DONE]")
    if record.tokens != body["max_tokens"]:
        return _fail(record, f"completion_tokens {record.tokens} (or no usage), expected {body['max_tokens']}")
    return record


def _fail(record: Record, message: str) -> Record:
    record.error = message
    return record


async def run_load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[Record]]:
    """``concurrency`` clients sending ``bodies`` back to back (each takes the next one not yet sent);
    returns the wall time and the records in request order."""
    records: list[Record | None] = [None] * len(bodies)
    queue = iter(range(len(bodies)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async def client() -> None:
            for index in queue:  # one shared iterator: safe, asyncio switches only at awaits
                records[index] = await stream_one(http, url, bodies[index])

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return wall, records


def request_bodies(prompts: list[str], count: int, max_tokens: int, temperature: float) -> list[dict]:
    return [{"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": temperature,
             "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            for i in range(count)]


# ---------------------------------------------------------------------------------------------- numbers
def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def summarize(server: str, concurrency: int, wall: float, cpu: dict[str, float | None],
              records: list[Record]) -> dict:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    ttft, itl, e2e = (percentiles(values) for values in ([r.ttft for r in ok if r.ttft is not None],
                                                         [g for r in ok for g in r.gaps], [r.e2e for r in ok]))
    return {"server": server, "clients": concurrency, "requests": len(records), "wall_s": wall, **cpu,
            "req_per_s": len(ok) / wall, "tokens_per_s": tokens / wall, "tokens_per_chunk": tokens / max(chunks, 1),
            "ttft_p50": ttft[0], "ttft_p99": ttft[1], "itl_p50": itl[0], "itl_p99": itl[1],
            "e2e_p50": e2e[0], "e2e_p99": e2e[1], "errors": len(records) - len(ok),
            "error_messages": sorted({r.error for r in records if r.error})[:5],
            "records": [asdict(r) for r in records]}


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


# (header, width, cell): the columns of the printed table
COLUMNS = [("clients", 7, lambda r: r["clients"]), ("requests", 8, lambda r: r["requests"]),
           ("wall s", 7, lambda r: f"{r['wall_s']:.1f}"), ("req/s", 6, lambda r: f"{r['req_per_s']:.2f}"),
           ("tok/s", 7, lambda r: f"{r['tokens_per_s']:,.0f}"),
           ("tok/chunk", 9, lambda r: f"{r['tokens_per_chunk']:.2f}"),
           ("TTFT p50", 8, lambda r: ms(r["ttft_p50"])), ("p99 ms", 7, lambda r: ms(r["ttft_p99"])),
           ("ITL p50", 8, lambda r: ms(r["itl_p50"])), ("p99 ms", 7, lambda r: ms(r["itl_p99"])),
           ("E2E p50", 8, lambda r: ms(r["e2e_p50"])), ("p99 ms", 7, lambda r: ms(r["e2e_p99"])),
           ("errors", 6, lambda r: r["errors"]),
           ("server CPU", 10, lambda r: "-" if r["server_cpu_s"] is None else f"{r['server_cpu_s'] / r['wall_s']:.0%}"),
           ("client CPU", 10, lambda r: f"{r['client_cpu_s'] / r['wall_s']:.0%}")]


def print_table(rows: list[dict]) -> None:
    print(f"\n{'server':<13} " + " ".join(f"{header:>{width}}" for header, width, _ in COLUMNS))
    for r in rows:
        print(f"{r['server']:<13} " + " ".join(f"{cell(r):>{width}}" for _, width, cell in COLUMNS))
    for r in rows:
        for message in r["error_messages"]:
            print(f"  {r['server']} at {r['clients']} clients: {message}")


def targets(rows: list[dict]) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, goal, passed or None when not measured)."""
    level = {(r["server"], r["clients"]): r for r in rows}
    one, many, baseline = (level.get(key) for key in (("batched", 1), ("batched", TARGET_CLIENTS),
                                                      ("one-at-a-time", TARGET_CLIENTS)))
    result = []
    if one and many:
        ratio = many["tokens_per_s"] / one["tokens_per_s"]
        result.append((f"output tokens/s, {TARGET_CLIENTS} clients / 1 client", f"{ratio:.2f}x", ">= 6x", ratio >= 6))
    else:
        result.append((f"output tokens/s, {TARGET_CLIENTS} clients / 1 client", "n/a", ">= 6x", None))
    p99 = many["ttft_p99"] if many else None
    result.append((f"TTFT p99 at {TARGET_CLIENTS} clients", "n/a" if p99 is None else f"{ms(p99)} ms", "< 1,000 ms",
                   None if p99 is None else p99 < 1.0))
    errors = sum(r["errors"] for r in rows)
    result.append(("errors, all runs", str(errors), "0", errors == 0))
    if many and baseline:
        speedup = baseline["wall_s"] / many["wall_s"]
        result.append((f"{TARGET_CLIENTS}-client load: one-at-a-time wall / batched wall", f"{speedup:.2f}x",
                       ">= 5x", speedup >= 5))
    else:
        result.append((f"{TARGET_CLIENTS}-client load: one-at-a-time wall / batched wall", "n/a", ">= 5x", None))
    return result


def print_targets(result: list[tuple[str, str, str, bool | None]]) -> None:
    print(f"\n{'target':<56} {'measured':>10} {'goal':>11}  result")
    for name, measured, goal, passed in result:
        verdict = "n/a" if passed is None else "PASS" if passed else "FAIL"
        print(f"{name:<56} {measured:>10} {goal:>11}  {verdict}")


# ---------------------------------------------------------------------------------------------- main
@dataclass
class Level:
    """One concurrency level on one server, accumulated over the rounds."""
    server: str
    clients: int
    requests: int
    wall: float = 0.0
    server_cpu: float | None = 0.0
    client_cpu: float = 0.0
    records: list[Record] = field(default_factory=list)

    def run(self, server: Server, bodies: list[dict]) -> None:
        """Send ``bodies`` at this level; add the wall time, records and CPU time (server and this script)."""
        client_cpu, server_cpu = time.process_time(), cpu_seconds(server.pid)
        wall, records = asyncio.run(run_load(server.url, bodies, self.clients))
        server_after = cpu_seconds(server.pid)
        self.wall += wall
        self.records += records
        self.client_cpu += time.process_time() - client_cpu
        if server_cpu is None or server_after is None or self.server_cpu is None:
            self.server_cpu = None
        else:
            self.server_cpu += server_after - server_cpu

    def summary(self) -> dict:
        return summarize(self.server, self.clients, self.wall,
                         {"server_cpu_s": self.server_cpu, "client_cpu_s": self.client_cpu}, self.records)


def measure(checkpoint: Path, workdir: Path, levels: list[int], prompts: list[str],
            args: argparse.Namespace) -> list[dict]:
    """Start the batched server and (unless ``--no-baseline``) the one-at-a-time server, warm each up with
    one request, then run ``--rounds`` rounds: every level against the batched server, then 16 clients
    against the one-at-a-time one, each level's requests split evenly over the rounds. A host whose speed
    drifts (a shared VM) then slows every level alike, instead of whichever level ran in the slow minute."""
    bodies = lambda count: request_bodies(prompts, count, args.max_tokens, args.temperature)
    per_client, least = (2, 4) if args.quick else (4, 16)
    plan = [Level("batched", clients, args.requests or max(per_client * clients, least)) for clients in levels]
    if not args.no_baseline:
        plan.append(Level("one-at-a-time", TARGET_CLIENTS, args.requests or max(per_client * TARGET_CLIENTS, least)))
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(serve(checkpoint, workdir, name, batch, args.dtype,
                                                   args.prefix_cache_tokens))
                   for name, batch in (("batched", 32), ("one-at-a-time", 1))
                   if name == "batched" or not args.no_baseline}
        for name, server in servers.items():
            warmup = Level(name, 1, 1)
            warmup.run(server, bodies(1))
            if warmup.records[0].error:
                raise RuntimeError(f"the warm-up request to the {name} server failed: {warmup.records[0].error}")
        for round_ in range(args.rounds):
            for level in plan:
                count = level.requests // args.rounds + (round_ < level.requests % args.rounds)
                level.run(servers[level.server], bodies(count))
                print(f"round {round_ + 1}/{args.rounds}, {level.server}, {level.clients} clients: {count} requests, "
                      f"{len(level.records)} so far, {sum(r.tokens for r in level.records) / level.wall:,.0f} "
                      f"tokens/s so far", flush=True)
    return [level.summary() for level in plan]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="serve this checkpoint instead of building one")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="for the built checkpoint, server logs and request logs (default: a temporary folder)")
    parser.add_argument("--concurrency", default=None, help="comma-separated client counts (default 1,4,16,32)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default max(4 x clients, 16); with --quick max(2 x clients, 4))")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per completion (default 64; --quick 16)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--dtype", default="fp32", help="the servers' --dtype")
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-at-a-time server")
    parser.add_argument("--rounds", type=int, default=None,
                        help="split each level's requests over this many rounds of all levels (default 3; --quick 1)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=None, metavar="N",
                        help="the servers' --prefix-cache-tokens (0: no prefix caching; default: theirs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few requests, 1,4,16 clients")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write every number (and request) here")
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1 or (args.requests is not None and args.requests < args.rounds):
        parser.error("--rounds must be >= 1 and at most --requests")
    levels = [int(c) for c in (args.concurrency or ("1,4,16" if args.quick else "1,4,16,32")).split(",")]
    # a plain `kill` stops the servers too: SIGTERM becomes SystemExit, so the finally blocks run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmforge-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or build_checkpoint(workdir, args.quick)
        prompts = make_prompts(checkpoint, args.max_tokens)
        print(f"{os.cpu_count()} CPUs; {len(prompts)} prompts; {args.max_tokens} tokens per completion, "
              f"temperature {args.temperature}", flush=True)
        rows = measure(checkpoint, workdir, levels, prompts, args)

    print_table(rows)
    result = targets(rows)
    print_targets(result)
    if args.quick:
        print("(--quick serves a tiny model, where per-request overheads dominate: the targets are for full runs)")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
                                         "levels": levels, "prompts": prompts, "runs": rows,
                                         "targets": [dict(zip(("target", "measured", "goal", "passed"), t))
                                                     for t in result]}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
