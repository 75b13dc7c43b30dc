"""Local inference: time to first token and decode speed through keel versus
the raw engine, same model file, same threads, same prompts.

The raw side is llama.cpp's server engine held in process through ``xllamacpp``
(``xllamacpp.Server``), built with the worker's own engine settings
(``keel.workers.worker._engine_params``: slots, context per slot, 64-token
prefill batches, KV reuse), measured two ways: streaming through its in-process
API as keel's worker does (no socket at all), and streaming over the engine's own
HTTP listener (llama-server's OpenAI API, what an editor would use without keel)
to the same client keel streams to. keel's side is an OpenAI completion through
``keel serve`` with ``[model.completion.local]`` set to the same model, threads,
context and slots. Both run in processes of their own (``python bench/inference.py
--raw``); chat and embedding go to a fake upstream so no other worker loads.

Setup: the embedded model (``keel.models.registry.embedded_model_path()``),
``context_size`` 2048 per slot, 2 slots (keel's default ``parallelism``),
``--threads`` (default: none set, so both sides take keel's default, the physical
cores keel may run on within its CPU quota). Prompts go to raw and keel in turn, so the
machine's noise hits both alike. Each of ``--prompts`` prompts begins with its
own number (the two raw sides share an engine and get different numbers), so no
side reuses a cached prefix: every prompt is read cold.
Greedy (temperature 0), ``max_tokens`` 32 (keel's default for a local model),
streamed. The first prompt of each side is a warm-up and not counted. Time to
first token is measured by the client; decode speed is
(tokens - 1) / (last token - first token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import IO, Any

CODE = """import os
from dataclasses import dataclass


@dataclass
class Account:
    owner: str
    balance: float = 0.0

    def deposit(self, amount: float) -> None:
        if amount <= 0:
            raise ValueError("amount must be positive")
        self.balance += amount

    def withdraw(self, amount: float) -> None:
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.balance -= amount


def load_accounts(path: str) -> list[Account]:
    accounts = []
    with open(path) as handle:
        for line in handle:
            owner, balance = line.split(",")
            accounts.append(Account(owner, float(balance)))
    return accounts


def total_balance(accounts: list[Account]) -> float:
"""

MAX_TOKENS = 32
N_CTX = 2048
"""Context per slot, keel's default ``context_size``."""
SLOTS = 2
"""Engine slots, keel's default ``parallelism``."""


def prompt(index: int) -> str:
    return f"# module {index}: accounts and balances\n" + CODE


PROMPT_NUMBERS = {"raw": 1000, "raw_http": 2000, "keel": 1000}
"""Where each side's prompt numbers start: the same number of digits, so the same
number of tokens; the raw sides share an engine, so theirs differ."""


PROMPTS = 15
"""Prompts per side. The medians of 5 moved between 0.91x and 0.97x from run to run on
the 2-core machine; of 30, between 0.94x and 0.975x."""


def decode_rate(tokens: int, first: float, last: float) -> float | None:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else None


def raw_once(server: Any, index: int) -> dict[str, Any]:
    """One prompt through the engine's in-process streaming API, as keel's worker calls it."""
    body = {"prompt": prompt(index), "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True}
    state: dict[str, Any] = {"first": None, "last": None, "tokens": 0, "prompt_tokens": None}

    def on_chunk(chunk: dict[str, Any]) -> bool:
        choices = chunk.get("choices") or [{}]
        if choices[0].get("text"):
            state["last"] = time.perf_counter()
            state["first"] = state["first"] or state["last"]
            state["tokens"] += 1
        usage = chunk.get("usage") or {}
        state["prompt_tokens"] = usage.get("prompt_tokens", state["prompt_tokens"])
        return False

    started = time.perf_counter()
    server.handle_completions(body, on_chunk)
    first, last, tokens = state["first"], state["last"], state["tokens"]
    return {
        "ttft_ms": ((first or started) - started) * 1000,
        "tokens": tokens,
        "decode_tps": decode_rate(tokens, first or 0.0, last or 0.0),
        "prompt_tokens": state["prompt_tokens"],
    }


def start_raw_engine(model: str, threads: int | None) -> tuple[Any, IO[str], str]:
    """The raw engine in this process (llama.cpp's server with the worker's settings), the
    stream this process's results go to, and the engine listener's key. llama.cpp writes
    to fd 1: the results go to a copy of it, as the worker's replies do. The engine's
    environment is the worker's too (read as its library loads: set before the import)."""
    import secrets

    from keel.workers.supervisor import engine_environment

    os.environ.update(engine_environment(os.environ))
    import xllamacpp

    from keel.workers import worker

    rows = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    args = worker._parse_args(engine_argv(model, threads))
    key = secrets.token_urlsafe(16)
    return xllamacpp.Server(worker._engine_params(xllamacpp, args, key)), rows, key


def run_raw(model: str, threads: int | None) -> None:
    """The raw side as a process: a prompt number per stdin line, a JSON row per stdout line."""
    server, rows, key = start_raw_engine(model, threads)
    print(f"ready {server.listening_address} {key}", file=rows, flush=True)
    for line in sys.stdin:
        print(json.dumps(raw_once(server, int(line))), file=rows, flush=True)
    # End of stdin: exit without running the engine's destructor (the worker does the same).
    os._exit(0)


def client_once(client: Any, index: int) -> dict[str, Any]:
    """One prompt streamed over HTTP (keel's, or the raw engine's own listener)."""
    body = {"prompt": prompt(index), "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    first = last = None
    events = counted = 0
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                events += 1
            counted = (event.get("usage") or {}).get("completion_tokens") or counted
    # A piece may hold several tokens: the answer's usage counts them.
    tokens = max(events, counted)
    return {
        "ttft_ms": ((first or started) - started) * 1000,
        "tokens": tokens,
        "decode_tps": decode_rate(tokens, first or 0.0, last or 0.0),
    }


def engine_argv(model: str, threads: int | None) -> list[str]:
    """The worker's arguments for the raw side: keel's settings, ``--threads`` if given."""
    argv = ["--model", model, "--slots", str(SLOTS), "--context-size", str(N_CTX)]
    return argv + ["--threads", str(threads)] if threads else argv


def keel_config(model: str, threads: int | None, upstream: str) -> str:
    import common

    return (
        "[model.completion.local]\n"
        f'model_id = "{model}"\n'
        + (f"threads = {threads}\n" if threads else "")
        + f"context_size = {N_CTX}\nparallelism = {SLOTS}\n\n"
        "[model.chat.http]\n"
        + common.http_provider("openai/chat", upstream)
        + "\n[model.embedding.http]\n"
        + common.http_provider("openai/embedding", upstream)
    )


def median(values: list[float]) -> float | None:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "ttft_ms_p50": median([r["ttft_ms"] for r in rows]),
        "decode_tps_p50": median([r["decode_tps"] for r in rows]),
        "tokens_p50": median([r["tokens"] for r in rows]),
        "rows": rows,
    }


def run(prompts: int = PROMPTS, threads: int | None = None) -> dict[str, Any]:
    import common
    import httpx

    from keel.models.registry import embedded_model_path
    from keel.workers import worker as engine_worker

    model = str(embedded_model_path())
    engine_args = engine_worker._parse_args(engine_argv(model, threads))
    engine_threads = engine_worker._threads(engine_args)  # what both sides will use
    sides = ("raw", "raw_http", "keel")
    rows: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    worker: Any = None
    with common.processes("inference") as group:
        upstream = common.start_upstream(group)
        config = keel_config(model, threads, upstream.url)
        keel = common.start_keel(group, config, timeout=180)
        raw = subprocess.Popen(
            [common.PYTHON, __file__, "--raw", "--model", model]
            + (["--threads", str(threads)] if threads else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert raw.stdin is not None and raw.stdout is not None
            ready, address, key = raw.stdout.readline().split()
            if ready != "ready":
                raise RuntimeError("the raw engine did not start")
            client = httpx.Client(base_url=keel.url, timeout=120)
            listener = httpx.Client(
                base_url=address, timeout=120, headers={"authorization": f"Bearer {key}"}
            )

            def in_process(index: int) -> dict[str, Any]:
                raw.stdin.write(f"{index}\n")
                raw.stdin.flush()
                return dict(json.loads(raw.stdout.readline()))

            once = {
                "raw": in_process,
                "raw_http": lambda index: client_once(listener, index),
                "keel": lambda index: client_once(client, index),
            }
            # Interleaved prompt by prompt, so a noisy neighbour slows all sides alike;
            # prompt 0 warms each side up and is not counted.
            for index in range(prompts + 1):
                common.log(f"inference prompt {index}/{prompts}")
                for side in sides:
                    row = once[side](PROMPT_NUMBERS[side] + index)
                    if index:
                        rows[side].append(row)
            providers = client.get("/v1/providers").json()
            worker = providers["roles"]["completion"]["providers"][0].get("worker", {})
            client.close()
            listener.close()
        finally:
            if raw.stdin is not None:
                raw.stdin.close()
            try:
                raw.wait(30)
            except subprocess.TimeoutExpired:
                raw.kill()
                raw.wait()
    summary = {side: summarize(rows[side]) for side in sides}

    def ratio(key: str, invert: bool = False, baseline: str = "raw") -> float | None:
        a, b = summary["keel"][key], summary[baseline][key]
        if a is None or b is None or a == 0 or b == 0:
            return None
        return float(b / a if invert else a / b)

    return {
        "setup": {
            "model": os.path.basename(model),
            "threads": engine_threads,
            "threads_set": threads is not None,
            "engine": "xllamacpp.Server, the worker's engine settings: raw streams "
            "through its in-process API, raw_http over its own HTTP listener",
            "n_ctx_per_slot": N_CTX,
            "slots": SLOTS,
            "prompts": prompts,
            "prompt_tokens": rows["raw"][0]["prompt_tokens"] if rows["raw"] else None,
            "max_tokens": MAX_TOKENS,
            "cache": "cold: every prompt starts differently",
            "order": "interleaved per prompt: raw, raw_http, keel",
        },
        **summary,
        "decode_ratio": ratio("decode_tps_p50"),
        "ttft_ratio": ratio("ttft_ms_p50", invert=True),
        "decode_ratio_http": ratio("decode_tps_p50", baseline="raw_http"),
        "ttft_ratio_http": ratio("ttft_ms_p50", invert=True, baseline="raw_http"),
        "keel_worker": worker,
    }


def run_with_a_core_left(prompts: int = PROMPTS) -> dict[str, Any]:
    """``run`` with keel's default threads, then (with more than one) on one thread
    fewer: the second shows what the HTTP and streaming work costs when it does not
    compete with the engine's own threads for a core."""
    result = run(prompts)
    cores = int(result["setup"]["threads"])
    if cores > 1:
        result["core_left"] = run(prompts, cores - 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", action="store_true", help="(internal) the raw side")
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    args = parser.parse_args()
    if args.raw:
        run_raw(args.model, args.threads)
        return 0
    import common

    result = run(args.prompts, args.threads)
    common.write_json("inference", result)
    sides = ("raw", "raw_http", "keel")
    shown = {k: v for k, v in result.items() if k not in sides}
    for side in sides:
        shown[side] = {k: v for k, v in result[side].items() if k != "rows"}
    print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
