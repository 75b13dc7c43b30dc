"""The local engine under two clients at once: head-of-line blocking and cancellation.

One ``keel serve`` with the default config (the embedded model behind the
completion role, keel's default 2 slots and all cores), started through this
file (``python bench/local_serving.py serve --port N``): plain keel plus one
read-only route, ``GET /_bench/slots``, that asks the local worker for the
engine's slot table (the worker's ``slots`` op, through
``WorkerSupervisor.call``) and returns it with the worker's generation stats.
Nothing else in keel changes.

- **Head-of-line**: a Tabby completion (``POST /v1/completions`` with a Tabby
  body, a cold ~200-token prefix) measured idle, and while a 400-token
  generation (an OpenAI completion, ``max_tokens`` 400, streamed) runs on the
  same model: the generation starts first, its first token arrives, then the
  Tabby request is sent; the generation is closed once the Tabby answer is in
  (it is checked to have still been running). Idle and busy alternate, each
  repetition with its own prefix; the medians and their ratio are reported.
- **Beside two chats**: the same, while two streamed chat answers of 400 tokens
  run (sent together; the Tabby request goes once the first has answered and
  0.3 s more has passed): on the default two slots, chats leave one slot to
  completions.
- **Beside an embedding batch**: Tabby completions ~0.7 s apart while the embedding
  worker (a second engine on the same cores) embeds 16 chunks of ~400 tokens, against
  the same completions idle; and how long the batch took.
- **Cancellation**: a request is sent on a raw socket, and once the engine's
  slot is busy (and, streamed, a few tokens have arrived) the socket is
  closed; the time from the close to the slot table showing every slot free
  (polled over keel's loopback HTTP, ~2 ms apart) is the cancellation time.
  Three cases: streamed while decoding, streamed while reading a long prompt
  (~1,000 tokens, cold), and not streamed (a JSON answer). The engine acts on a
  cancel between prefill batches (64 tokens, ~0.24 s on 2 cores), so the
  prompt case closes at moments spread evenly over two batches (0.3-0.8 s
  into the read): a fixed moment would measure one phase of a batch only. A
  case where the worker did not cancel (the generation ran to its end) is
  reported as such, not as a time. Each case runs twice ``--repeats`` times.

    .venv/bin/python bench/local_serving.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from inference import CODE

LONG_TOKENS = 400
FREE_TIMEOUT = 20.0
"""Seconds to wait for the slots to be free after a close (400 tokens take ~6 s)."""
CANCEL_CASES = ("stream, decoding", "stream, reading the prompt", "not streamed")

PREFIX = CODE + "    "
"""The inference benchmark's file, with the cursor in the body of its last function."""


def tabby_body(index: int, phase: str) -> dict[str, Any]:
    return {
        "language": "python",
        "segments": {
            "prefix": f"# {phase} {index}: accounts and balances\n" + PREFIX,
            "suffix": "\n\n\ndef main() -> None:\n    pass\n",
            "filepath": f"bench/{phase}_{index}.py",
        },
        "temperature": 0,
    }


def long_body(index: int, *, stream: bool, prompt_lines: int = 0) -> dict[str, Any]:
    """An OpenAI completion that generates ``LONG_TOKENS`` tokens (greedy, no stop)."""
    lines = "".join(
        f"    value_{index}_{i} = compute({i}, {i * 7 % 13})\n" for i in range(prompt_lines)
    )
    return {
        "prompt": f"# run {index}\ndef long_function_{index}():\n{lines}",
        "max_tokens": LONG_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --- the keel launcher: keel serve plus GET /_bench/slots ----------------------------


def serve(argv: list[str]) -> int:
    import keel.app
    from keel.cli import main
    from keel.providers.local import LocalProvider

    create_app = keel.app.create_app

    def with_slots(*args: Any, **kwargs: Any) -> FastAPI:
        app = create_app(*args, **kwargs)

        @app.get("/_bench/slots", include_in_schema=False)
        async def slots(request: Request) -> dict[str, Any]:
            for provider in request.app.state.keel.providers.unique():
                if isinstance(provider, LocalProvider) and not provider.supervisor.spec.embedding:
                    reply = await provider.supervisor.call({"op": "slots"}, ready_timeout=60)
                    stats = provider.supervisor.stats.snapshot()
                    return {"slots": reply["slots"], "generation": stats}
            raise RuntimeError("no local completion worker")

        return app

    keel.app.create_app = with_slots  # cmd_serve imports it from keel.app when it runs
    return main(["serve", *argv])


# --- head-of-line ----------------------------------------------------------------------


def tabby_once(client: httpx.Client, body: dict[str, Any]) -> float:
    began = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    response.raise_for_status()
    return (time.perf_counter() - began) * 1000


def chat_body(index: int) -> dict[str, Any]:
    """A streamed chat answer that runs to ``LONG_TOKENS`` tokens (the model writes on)."""
    ask = f"Story {index}: write a very long story about a dragon."
    return {
        "messages": [{"role": "user", "content": ask}],
        "max_tokens": LONG_TOKENS,
        "temperature": 0,
        "stream": True,
    }


class LongGeneration:
    """A streamed long generation in a thread (by default a 400-token completion);
    ``started`` is set at its first token."""

    def __init__(
        self, url: str, index: int, path: str = "/v1/completions", body: Any = None
    ) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.tokens = 0
        self.error: str | None = None
        self._stop = threading.Event()
        body = body or long_body(index, stream=True)
        self._thread = threading.Thread(target=self._run, args=(url, path, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, path: str, body: dict[str, Any]) -> None:
        try:
            with (
                httpx.Client(base_url=url, timeout=120) as client,
                client.stream("POST", path, json=body) as r,
            ):
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.tokens += 1
                        self.started.set()
                    if self._stop.is_set():
                        return  # leaving the block closes the stream: keel cancels it
        except Exception as exc:  # noqa: BLE001 - reported with the figures
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended.set()
            self.started.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(FREE_TIMEOUT)


def wait_slots_free(
    client: httpx.Client,
    timeout: float = FREE_TIMEOUT,
    trace: list[list[float]] | None = None,
    requests_before: int = -1,
) -> float | None:
    """Seconds until no engine slot is busy and the worker has ended more requests than
    ``requests_before``, or None; ``trace`` gets one [ms since the start, ms the poll
    took, busy slots] per poll. (A read ahead is several engine calls: between two of
    them the slots are free for a moment while the request is still running.)"""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        asked = time.perf_counter()
        table = client.get("/_bench/slots").json()
        busy = sum(s["busy"] for s in table["slots"])
        if trace is not None:
            now = time.perf_counter()
            trace.append([round((asked - began) * 1000, 1), round((now - asked) * 1000, 1), busy])
        if not busy and table["generation"]["requests"] > requests_before:
            return time.perf_counter() - began
        time.sleep(0.002)
    return None


def head_of_line(url: str, repeats: int, *, chats: int = 0) -> dict[str, Any]:
    """Tabby completions idle and while a long generation runs: one 400-token OpenAI
    completion, or ``chats`` chat answers sent at once (the completion is sent once the
    first answers, a moment later; each is ``LONG_TOKENS`` tokens)."""
    import common

    idle: list[float] = []
    busy: list[float] = []
    runs: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        tabby_once(client, tabby_body(0, "warmup"))
        for index in range(1, repeats + 1):
            common.log(f"head-of-line {index}/{repeats}" + (f", {chats} chats" if chats else ""))
            wait_slots_free(client)
            idle.append(tabby_once(client, tabby_body(index, "idle")))
            chat = "/v1/chat/completions"
            generations = [
                LongGeneration(url, index, chat, chat_body(10 * index + n)) for n in range(chats)
            ] or [LongGeneration(url, index)]
            generation = generations[0]
            generation.started.wait(120)
            time.sleep(0.3 if chats else 0)  # the others are in the worker too
            tokens_before = generation.tokens
            latency = tabby_once(client, tabby_body(index, "busy"))
            overlapped = not generation.ended.is_set()
            tokens_during = generation.tokens - tokens_before
            for each in generations:
                each.stop()
                if each.error:
                    raise RuntimeError(f"a long generation failed: {each.error}")
            busy.append(latency)
            runs.append(
                {
                    "idle_ms": idle[-1],
                    "busy_ms": latency,
                    "generation_still_running": overlapped,
                    "generation_tokens_during": tokens_during,
                }
            )
    idle_p50, busy_p50 = median(idle), median(busy)
    return {
        "idle_ms_p50": idle_p50,
        "busy_ms_p50": busy_p50,
        "ratio": busy_p50 / idle_p50 if idle_p50 and busy_p50 else None,
        "all_overlapped": all(run["generation_still_running"] for run in runs),
        "runs": runs,
    }


# --- beside an embedding batch ----------------------------------------------------------

EMBED_INPUTS = 16
TYPING_PACE = 0.7
"""Seconds between a completion's answer and the next request, as an editor's debounce."""


def beside_embeddings(url: str) -> dict[str, Any]:
    """Tabby completions idle, then sent ``TYPING_PACE`` s apart while a batch of
    ``EMBED_INPUTS`` code chunks (~400 tokens each) is embedded by the embedding worker
    (a second engine on the same cores, as when an editor indexes a repository)."""
    import common

    common.log("completions beside an embedding batch")
    chunks = [f"# chunk {i}\n" + CODE * 2 for i in range(EMBED_INPUTS)]
    batch: dict[str, Any] = {}

    def embed() -> None:
        began = time.perf_counter()
        response = httpx.post(f"{url}/v1/embeddings", json={"input": chunks}, timeout=300)
        batch.update(status=response.status_code, seconds=time.perf_counter() - began)

    with httpx.Client(base_url=url, timeout=120) as client:
        wait_slots_free(client)
        idle = [tabby_once(client, tabby_body(index, "beside-idle")) for index in range(6)]
        thread = threading.Thread(target=embed, daemon=True)
        thread.start()
        time.sleep(0.5)
        busy: list[float] = []
        while thread.is_alive():
            busy.append(tabby_once(client, tabby_body(len(busy), "beside-embedding")))
            time.sleep(TYPING_PACE)
        thread.join()
    idle_p50, busy_p50 = median(idle), median(busy)
    return {
        "idle_ms_p50": idle_p50,
        "busy_ms_p50": busy_p50,
        "busy_ms_max": max(busy) if busy else None,
        "ratio": busy_p50 / idle_p50 if idle_p50 and busy_p50 else None,
        "completions": len(busy),
        "embedding_status": batch.get("status"),
        "embedding_seconds": batch.get("seconds"),
    }


# --- cancellation ----------------------------------------------------------------------


def raw_request(url: str, body: dict[str, Any]) -> socket.socket:
    """A POST on a socket of our own, so that closing it is the client leaving, exactly."""
    address = urlsplit(url)
    sock = socket.create_connection((address.hostname or "127.0.0.1", address.port or 80))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {address.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def wait_busy(client: httpx.Client, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s["busy"] for s in client.get("/_bench/slots").json()["slots"]):
            return True
        time.sleep(0.005)
    return False


def cancel_once(
    client: httpx.Client, url: str, case: str, index: int, phase: float
) -> dict[str, Any]:
    wait_slots_free(client)
    before = client.get("/_bench/slots").json()["generation"]
    stream = case != "not streamed"
    prompt_lines = 60 if case == "stream, reading the prompt" else 0
    sock = raw_request(url, long_body(index, stream=stream, prompt_lines=prompt_lines))
    try:
        if not wait_busy(client):
            raise RuntimeError("the engine's slot never became busy")
        if case == "stream, decoding":
            received = b""
            while received.count(b"data: {") < 5:  # a few tokens: it is decoding
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("keel closed the stream before 5 tokens")
                received += chunk
        elif case == "stream, reading the prompt":
            time.sleep(0.3 + 0.5 * phase)  # inside a cold ~1,000-token read (~4 s)
        else:
            time.sleep(0.5)  # decoding by now; the JSON answer comes at the end
        closed = time.perf_counter()
    finally:
        sock.close()
    trace: list[list[float]] = []
    freed = wait_slots_free(client, trace=trace, requests_before=before["requests"])
    if freed is not None:
        freed = (time.perf_counter() - closed) * 1000
    after = client.get("/_bench/slots").json()["generation"]
    last = after.get("last") or {}
    return {
        "free_ms": freed,
        "cancelled_in_worker": after["cancelled"] > before["cancelled"],
        "finish_reason": last.get("finish_reason"),
        "completion_tokens": last.get("completion_tokens"),
        "prompt_tokens": last.get("prompt_tokens"),
        "polls": trace if len(trace) <= 20 else [*trace[:10], *trace[-10:]],
    }


def cancellation(url: str, repeats: int) -> dict[str, Any]:
    import common

    cases: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for case in CANCEL_CASES:
            runs = []
            for index in range(repeats):
                common.log(f"cancellation, {case}: {index + 1}/{repeats}")
                number = 1000 * (len(cases) + 1) + index
                runs.append(cancel_once(client, url, case, number, phase=index / repeats))
            cancelled = all(run["cancelled_in_worker"] for run in runs)
            times = [run["free_ms"] for run in runs if run["free_ms"] is not None]
            cases[case] = {
                "cancelled": cancelled,
                "free_ms_p50": median(times) if cancelled else None,
                "free_ms_max": max(times) if cancelled and times else None,
                "runs": runs,
            }
    return cases


def plot(result: dict[str, Any], out: Any) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    runs = result["head_of_line"]["runs"]
    xs = range(1, len(runs) + 1)
    left.plot(xs, [r["idle_ms"] for r in runs], "o-", label="idle")
    left.plot(xs, [r["busy_ms"] for r in runs], "s-", label=f"while {LONG_TOKENS} tokens generate")
    left.set_xlabel("repetition")
    left.set_ylabel("Tabby completion latency, ms")
    left.set_ylim(bottom=0)
    left.set_title("head-of-line")
    left.legend()
    for position, figures in enumerate(result["cancellation"].values()):
        ys = [r["free_ms"] for r in figures["runs"] if r["free_ms"] is not None]
        right.scatter([position] * len(ys), ys, s=20)
    right.axhline(100, color="grey", linestyle="--", label="target 100 ms")
    right.set_xticks(range(len(result["cancellation"])), list(result["cancellation"]), fontsize=8)
    right.set_ylabel("client close -> slot free, ms")
    right.set_title("cancellation")
    right.legend()
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
    fig.suptitle("Local engine: two clients at once (embedded model, default config)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# --- the benchmark -------------------------------------------------------------------


def run(repeats: int = 5) -> dict[str, Any]:
    import common

    with common.processes("local-serving") as group:
        keel = common.start_keel(
            group, "", timeout=180, launcher=[str(common.BENCH / "local_serving.py")]
        )
        with httpx.Client(base_url=keel.url, timeout=60) as client:
            slots = client.get("/_bench/slots").json()
            providers = client.get("/v1/providers").json()
        worker = providers["roles"]["completion"]["providers"][0]
        hol = head_of_line(keel.url, repeats)
        chats = head_of_line(keel.url, repeats, chats=2)
        cancel = cancellation(keel.url, 2 * repeats)  # about a second each
        beside = beside_embeddings(keel.url)
    return {
        "setup": {
            "config": "default (embedded model for completions)",
            "slots": len(slots["slots"]),
            "threads": worker["worker"]["engine"]["threads"],  # what the engine runs on
            "long_generation": f"OpenAI completion, max_tokens {LONG_TOKENS}, streamed",
            "repeats": repeats,
            "slot_probe": "GET /_bench/slots -> worker op 'slots' (engine /slots)",
        },
        "head_of_line": hol,
        "head_of_line_chats": chats,
        "cancellation": cancel,
        "beside_embeddings": beside,
    }


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import common

    result = run(args.repeats)
    common.write_json("local_serving", result)
    plot(result, common.RESULTS / "local_serving.png")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
