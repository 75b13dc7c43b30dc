"""Typing simulator: what a person typing in an editor feels from keel on a CPU.

Replays typing through real source files (installed packages' code, nothing
downloaded): at each keystroke it sends the Tabby completion request an editor
would send, without waiting for earlier ones, and pauses after some words.
It reports

- the latency of the request that was current when the user paused (what
  the user waits for), p50 and p90;
- time to first token of a cold prompt (nothing cached) and of the paused
  requests the model served (warm: the worker reuses the prompt prefix it
  holds), and their ratio; paused requests keel answered from its
  typed-through cache or by joining a running generation (``X-Keel-Source``)
  count in the latency but have no first token of their own, and are counted
  by source;
- prompt tokens and tokens actually evaluated (not reused from the slot's
  cache) per paused request, as the worker reports them (a cancelled request
  reports none, so the worker's running totals would undercount);
- how many requests were superseded (cancelled) by a newer keystroke;
- the same typing on the raw engine (llama.cpp's server held in process with the
  worker's settings, after keel has stopped): its warm and cold first tokens, so
  that the warm/cold ratio can be told from what the engine itself does. Each
  keystroke's call is stopped when the next keystroke comes (keel's supersede),
  the paused one runs to its end. A warm first token is one engine step, and
  after an idle moment the engine's threads and caches take a few ms more to
  wake (measured with the raw engine alone: 11.9 ms back to back, 14.0 after
  0.2 s idle, 16.1 after 1 s).

Setup: one keel process with the embedded model (SmolLM2-135M Q4_1 on the
CPU), started here on a free loopback port unless ``--url`` is given.

    .venv/bin/python bench/typing_sim.py [--keys-per-second 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def source_files() -> list[Path]:
    """Real code no one here wrote: modules of packages installed in the venv."""
    import click
    import httpx as httpx_pkg
    import starlette

    return [
        Path(httpx_pkg.__file__).with_name("_client.py"),
        Path(starlette.__file__).with_name("routing.py"),
        Path(click.__file__).with_name("core.py"),
    ]


@dataclass
class Session:
    file: str
    prefix_tokens: int = 0
    cold_first_token_ms: float = 0.0
    cold_total_ms: float = 0.0
    paused_latency_ms: list[float] = field(default_factory=list)
    paused_first_token_ms: list[float] = field(default_factory=list)
    paused_slot_wait_ms: list[float] = field(default_factory=list)
    """Of the first token's time, the wait for a slot (a superseded request's to end)."""
    paused_prompt_tokens: list[int] = field(default_factory=list)
    paused_evaluated_tokens: list[int] = field(default_factory=list)
    paused_sources: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    superseded: int = 0
    accepted_chars: int = 0
    """Characters typed from a suggestion on screen (``--accept``)."""


def tabby_body(prefix: str, suffix: str, filepath: str) -> dict[str, object]:
    return {
        "language": "python",
        "segments": {"prefix": prefix, "suffix": suffix, "filepath": filepath},
        "temperature": 0,
    }


async def worker_stats(client: httpx.AsyncClient) -> dict[str, object]:
    providers = (await client.get("/v1/providers")).json()
    for provider in providers["roles"]["completion"]["providers"]:
        if provider["kind"] == "local":
            stats: dict[str, object] = provider["worker"]["generation"]
            return stats
    raise RuntimeError("no local completion provider: the simulator needs the embedded model")


def cursor_position(text: str, min_prefix_chars: int) -> int:
    """A line start after ``min_prefix_chars`` whose next lines are code worth typing."""
    position = text.index("\n", min_prefix_chars) + 1
    while True:
        line_end = text.index("\n", position)
        line = text[position:line_end]
        if len(line.strip()) > 30 and not line.strip().startswith(("#", '"', "'")):
            return position
        position = line_end + 1


def keystrokes(
    text: str, start: int, *, chars: int, words_between_pauses: int, pause_at: str
) -> Iterator[tuple[int, bool]]:
    """The cursor after each of ``chars`` keys typed from ``start``, and whether the user
    pauses there: after ``words_between_pauses`` words, at a line's end (``pause_at``),
    and after the last key."""
    words = 0
    for offset in range(1, chars + 1):
        cursor = start + offset
        if text[cursor - 1] in " \n(" and text[cursor - 2] not in " \n(":
            words += 1
        at_line_end = pause_at == "line-end" and text[cursor : cursor + 1] == "\n"
        at_words = pause_at == "words" and words == words_between_pauses
        paused = at_words or at_line_end or offset == chars
        if paused:
            words = 0
        yield cursor, paused


async def post_timed(
    client: httpx.AsyncClient, body: dict[str, object]
) -> tuple[httpx.Response, float]:
    """One completion request and how long it took, in ms."""
    began = time.perf_counter()
    response = await client.post("/v1/completions", json=body)
    return response, (time.perf_counter() - began) * 1000


async def cold_request(
    client: httpx.AsyncClient, session: Session, body: dict[str, object]
) -> httpx.Response:
    """The first request at a place, nothing of it cached: its figures go in ``session``."""
    response, session.cold_total_ms = await post_timed(client, body)
    response.raise_for_status()
    last = (await worker_stats(client))["last"]
    assert isinstance(last, dict)
    session.cold_first_token_ms = float(last["first_token_ms"])
    session.prefix_tokens = int(last["prompt_tokens"])
    return response


async def tally(
    session: Session, in_flight: list[asyncio.Task[tuple[httpx.Response, float]]]
) -> None:
    """Every keystroke's answer: superseded or not, and who answered."""
    for response, _ in await asyncio.gather(*in_flight):
        response.raise_for_status()
        session.superseded += response.headers.get("X-Keel-Superseded") == "1"
        source = response.headers.get("X-Keel-Source", "none")
        session.sources[source] = session.sources.get(source, 0) + 1


async def run_session(
    client: httpx.AsyncClient,
    text: str,
    path: Path,
    *,
    keys_per_second: float,
    words_between_pauses: int,
    pause_seconds: float,
    chars: int,
    prefix_chars: int,
    pause_at: str = "words",
) -> Session:
    start = cursor_position(text, prefix_chars)
    filepath = f"{path.parent.name}/{path.name}"
    session = Session(file=filepath)

    await cold_request(
        client, session, tabby_body(text[:start], text[start : start + 400], filepath)
    )
    in_flight: list[asyncio.Task[tuple[httpx.Response, float]]] = []

    def send(cursor: int) -> Coroutine[Any, Any, tuple[httpx.Response, float]]:
        return post_timed(client, tabby_body(text[:cursor], text[cursor : cursor + 400], filepath))

    interval = 1.0 / keys_per_second
    walk = keystrokes(
        text, start, chars=chars, words_between_pauses=words_between_pauses, pause_at=pause_at
    )
    for cursor, paused in walk:
        task = asyncio.create_task(send(cursor))
        in_flight.append(task)
        session.requests += 1
        if paused:
            response, latency = await task  # the user waits for this one
            response.raise_for_status()
            session.paused_latency_ms.append(latency)
            source = response.headers.get("X-Keel-Source", "model")
            session.paused_sources[source] = session.paused_sources.get(source, 0) + 1
            last = (await worker_stats(client))["last"]
            assert isinstance(last, dict)
            # The worker's last generation is this request's only if the model served it
            # (not keel's typed-through cache, not a running generation it joined).
            if source == "model" and last.get("finish_reason") != "cancelled":
                session.paused_first_token_ms.append(float(last["first_token_ms"]))
                session.paused_slot_wait_ms.append(float(last["slot_wait_ms"]))
                prompt_tokens = int(last["prompt_tokens"] or 0)
                session.paused_prompt_tokens.append(prompt_tokens)
                evaluated = prompt_tokens - int(last["reused_tokens"] or 0)
                session.paused_evaluated_tokens.append(evaluated)
            await asyncio.sleep(pause_seconds)
        else:
            await asyncio.sleep(interval)
    await tally(session, in_flight)
    return session


async def run_accepting_session(
    client: httpx.AsyncClient,
    text: str,
    path: Path,
    *,
    keys_per_second: float,
    words_between_pauses: int,
    pause_seconds: float,
    chars: int,
    prefix_chars: int,
    pause_at: str = "words",
) -> Session:
    """An editor user writing new code who accepts suggestions by typing them.

    The user opens a line before a line of the file and writes there: the text
    after the cursor stays put (the suffix is fixed, as in an editor), and the
    prefix grows by each keystroke. When a suggestion is on screen the user types
    its next character; with none, the next character of the file's own code
    (what they meant to write). A suggestion appears when the answer to the
    current keystroke arrives before the next one, or after a pause.
    """
    start = cursor_position(text, prefix_chars)
    filepath = f"{path.parent.name}/{path.name}"
    session = Session(file=filepath)
    head, suffix = text[:start], "\n" + text[start : start + 400]

    response = await cold_request(client, session, tabby_body(head, suffix, filepath))

    def send(typed: str) -> Coroutine[Any, Any, tuple[httpx.Response, float]]:
        return post_timed(client, tabby_body(head + typed, suffix, filepath))

    def shown(response: httpx.Response) -> str:
        response.raise_for_status()
        return str(response.json()["choices"][0]["text"]).replace("\r\n", "\n")

    in_flight: list[asyncio.Task[tuple[httpx.Response, float]]] = []
    suggestion, typed, own, words = shown(response), "", start, 0
    interval = 1.0 / keys_per_second
    for offset in range(1, chars + 1):
        if suggestion:
            key, suggestion = suggestion[0], suggestion[1:]
            session.accepted_chars += 1
        else:
            key, own = text[own], own + 1
        previous, typed = typed[-1:], typed + key
        task = asyncio.create_task(send(typed))
        in_flight.append(task)
        session.requests += 1
        if key in " \n(" and previous not in " \n(":
            words += 1
        upcoming = suggestion[:1] or text[own : own + 1]
        at_line_end = pause_at == "line-end" and upcoming == "\n"
        if (
            (pause_at == "words" and words == words_between_pauses)
            or at_line_end
            or offset == chars
        ):
            words = 0
            response, latency = await task  # the user waits for this one
            suggestion = shown(response)
            session.paused_latency_ms.append(latency)
            source = response.headers.get("X-Keel-Source", "model")
            session.paused_sources[source] = session.paused_sources.get(source, 0) + 1
            await asyncio.sleep(pause_seconds)
        else:
            await asyncio.sleep(interval)
            if task.done() and task.result()[0].headers.get("X-Keel-Superseded") != "1":
                suggestion = shown(task.result()[0])  # it came in time to be seen
    await tally(session, in_flight)
    return session


RAW_PROMPT_CHARS = 2000
"""The raw side's prompt: the whole lines of the file that fit in this many characters
before the cursor (~500 tokens, as keel's window of the same place)."""


def raw_side(args: argparse.Namespace) -> dict[str, object]:
    """The same typing on the raw engine: run in a process of its own (``--raw-side``)."""
    from inference import start_raw_engine

    from keel.models.registry import embedded_model_path
    from keel.pipeline.languages import get_language, stop_words

    server, rows, _ = start_raw_engine(str(embedded_model_path()), None)
    stops = stop_words(get_language("python"))
    interval = 1.0 / args.keys_per_second

    def first_text_ms(prompt: str, *, superseded: bool) -> tuple[float | None, int]:
        """Time to the call's first text; a superseded call stops when the next key comes."""
        began, state = time.perf_counter(), {"first": None, "prompt": 0}

        def on_chunk(chunk: dict[str, Any]) -> bool:
            now = time.perf_counter()
            if (chunk.get("choices") or [{}])[0].get("text") and state["first"] is None:
                state["first"] = (now - began) * 1000
            state["prompt"] = (chunk.get("usage") or {}).get("prompt_tokens", state["prompt"])
            return superseded and now - began >= interval

        body = {"prompt": prompt, "max_tokens": 32, "temperature": 0, "stop": stops}
        server.handle_completions(
            {**body, "stream": True, "cache_prompt": True, "id_slot": 0}, on_chunk
        )
        return state["first"], int(state["prompt"] or 0)

    cold, warm, prompts = [], [], []
    for path in source_files():
        text = path.read_text()
        start = cursor_position(text, args.prefix_chars)
        window = text.index("\n", start - RAW_PROMPT_CHARS) + 1 if start > RAW_PROMPT_CHARS else 0
        first, tokens = first_text_ms(text[window:start], superseded=False)
        cold.append(first)
        prompts.append(tokens)
        walk = keystrokes(
            text,
            start,
            chars=args.chars,
            words_between_pauses=args.words_between_pauses,
            pause_at=args.pause_at,
        )
        for cursor, paused in walk:
            began = time.perf_counter()
            first, _ = first_text_ms(text[window:cursor], superseded=not paused)
            if paused:
                if first is not None:
                    warm.append(first)
                time.sleep(args.pause_seconds)
            else:
                time.sleep(max(0.0, interval - (time.perf_counter() - began)))
    cold_p50 = statistics.median(ms for ms in cold if ms is not None)
    warm_p50 = statistics.median(warm) if warm else None  # None: no pause had an answer
    result: dict[str, object] = {
        "cold_first_token_ms_p50": cold_p50,
        "warm_first_token_ms_p50": warm_p50,
        "warm_over_cold": None if warm_p50 is None else warm_p50 / cold_p50,
        "pauses": len(warm),
        "prompt_tokens": statistics.mean(prompts),
    }
    print(json.dumps(result), file=rows, flush=True)
    os._exit(0)  # the engine's destructor is not run (the worker does the same)


def raw_engine() -> dict[str, object]:
    """:func:`raw_side`'s figures, from a child process."""
    command = [sys.executable, __file__, *sys.argv[1:], "--raw-side"]  # the same typing
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def start_keel(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (root / "keel.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "keel", "serve", "--port", str(port)],
        env={**os.environ, "KEEL_ROOT": str(root)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"keel did not become ready: {(root / 'keel.log').read_text()[-2000:]}")


def merged(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def simulate(url: str, args: argparse.Namespace) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        before = await worker_stats(client)
        sessions = []
        session = run_accepting_session if args.accept else run_session
        for path in source_files():
            sessions.append(
                await session(
                    client,
                    path.read_text(),  # noqa: ASYNC240 - a small file, read once before timing
                    path,
                    keys_per_second=args.keys_per_second,
                    words_between_pauses=args.words_between_pauses,
                    pause_seconds=args.pause_seconds,
                    chars=args.chars,
                    prefix_chars=args.prefix_chars,
                    pause_at=args.pause_at,
                )
            )
        after = await worker_stats(client)
    paused = [ms for s in sessions for ms in s.paused_latency_ms]
    warm = [ms for s in sessions for ms in s.paused_first_token_ms]
    cold = [s.cold_first_token_ms for s in sessions]
    requests = int(after["requests"]) - int(before["requests"])  # type: ignore[call-overload]
    prompt = [n for s in sessions for n in s.paused_prompt_tokens]
    evaluated = [n for s in sessions for n in s.paused_evaluated_tokens]
    sources = merged([s.sources for s in sessions])
    warm_p50 = statistics.median(warm) if warm else None  # None: every pause served by cache
    return {
        "setup": {
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
            f"Python {platform.python_version()}",
            "model": "embedded SmolLM2-135M-Instruct Q4_1 (CPU)",
            "keys_per_second": args.keys_per_second,
            "words_between_pauses": args.words_between_pauses,
            "chars_typed_per_file": args.chars,
            "accept": args.accept,
            "pause_at": args.pause_at,
        },
        "sessions": [asdict(s) for s in sessions],
        "paused_latency_ms_p50": statistics.median(paused),
        "paused_latency_ms_p90": percentile(paused, 0.9),
        "pauses": len(paused),
        "cold_first_token_ms_p50": statistics.median(cold),
        "warm_first_token_ms_p50": warm_p50,
        "warm_over_cold": None if warm_p50 is None else warm_p50 / statistics.median(cold),
        "prefix_tokens": [s.prefix_tokens for s in sessions],
        "worker_requests": requests,
        "prompt_tokens_per_request": statistics.mean(prompt) if prompt else None,
        "evaluated_tokens_per_request": statistics.mean(evaluated) if evaluated else None,
        "keystroke_requests": sum(s.requests for s in sessions),
        "superseded": sum(s.superseded for s in sessions),
        "sources": sources,
        "no_model_work_share": (sources.get("cache", 0) + sources.get("inflight", 0))
        / max(1, sum(s.requests for s in sessions)),
        "accepted_chars": sum(s.accepted_chars for s in sessions),
        "paused_sources": merged([s.paused_sources for s in sessions]),
        "worker_cancelled": int(after["cancelled"]) - int(before["cancelled"]),  # type: ignore[call-overload]
    }


def figure(value: object, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def raw_figures(raw: object) -> str:
    if not isinstance(raw, dict) or raw["warm_over_cold"] is None:
        return "-"
    return (
        f"{raw['warm_first_token_ms_p50']:.0f} ms / {raw['cold_first_token_ms_p50']:.0f} ms"
        f" ({raw['warm_over_cold']:.3f}; {raw['prompt_tokens']:.0f}-token prompts)"
    )


def render(result: dict[str, object]) -> str:
    rows = [
        (
            "paused-request latency p50 (target <= 140 ms)",
            f"{result['paused_latency_ms_p50']:.0f} ms",
        ),
        ("paused-request latency p90", f"{result['paused_latency_ms_p90']:.0f} ms"),
        ("cold time to first token p50", f"{result['cold_first_token_ms_p50']:.0f} ms"),
        ("warm time to first token p50", figure(result["warm_first_token_ms_p50"], ".0f", " ms")),
        ("warm / cold (target <= 0.01)", figure(result["warm_over_cold"], ".3f")),
        ("the raw engine, the same typing: warm / cold", raw_figures(result.get("raw_engine"))),
        ("prompt tokens per paused request", figure(result["prompt_tokens_per_request"], ".0f")),
        (
            "tokens evaluated per paused request",
            figure(result["evaluated_tokens_per_request"], ".1f"),
        ),
        (
            "keystroke requests / superseded",
            f"{result['keystroke_requests']} / {result['superseded']}",
        ),
        ("answered by (all / paused)", f"{result['sources']} / {result['paused_sources']}"),
        (
            "keystrokes answered with no model work (target >= 30%)",
            f"{result['no_model_work_share']:.0%}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    setup = result["setup"]
    assert isinstance(setup, dict)
    lines = [f"typing simulation ({result['pauses']} pauses, {setup['machine']}, {setup['model']})"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", help="a running keel (default: start one with the embedded model)")
    parser.add_argument("--keys-per-second", type=float, default=5.0)
    parser.add_argument("--words-between-pauses", type=int, default=3)
    parser.add_argument("--pause-seconds", type=float, default=1.0)
    parser.add_argument("--chars", type=int, default=80, help="characters typed per file")
    parser.add_argument(
        "--prefix-chars", type=int, default=4000, help="prefix before the cursor (~1,000 tokens)"
    )
    parser.add_argument(
        "--accept",
        action="store_true",
        help="write new code, typing what each suggestion on screen says",
    )
    parser.add_argument(
        "--pause-at",
        choices=("words", "line-end"),
        default="words",
        help="pause after --words-between-pauses words, or at each line's end",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--no-raw", action="store_true", help="skip the same typing on the raw engine"
    )
    parser.add_argument("--raw-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_side:
        raw_side(args)
    process = None
    with tempfile.TemporaryDirectory(prefix="keel-typing-") as root:
        url = args.url
        if url is None:
            process, url = start_keel(Path(root))
        try:
            result = asyncio.run(simulate(url, args))
        except Exception:
            if process is not None:  # keel's side of the story, before its directory goes
                log = (Path(root) / "keel.log").read_text(errors="replace")[-3000:]
                print(f"keel's log ends:\n{log}", file=sys.stderr)
            raise
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)
    if not args.no_raw and not args.accept:
        result["raw_engine"] = raw_engine()
    print(render(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
