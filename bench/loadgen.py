"""A small closed-loop HTTP/1.1 load generator, run as its own process.

Each of ``--concurrency`` clients holds one keep-alive connection and sends
the same request again as soon as the previous answer has been read in full,
until ``--duration`` seconds have passed or ``--max-requests`` were sent
(both bounds always apply). Requests finished during the first ``--warmup``
seconds are not counted. Latency is from the first byte written to the last
byte read; ``ttfb`` is to the first byte of the body (for a stream, its first
event). A 429 is counted as such and, like a polite client, the client waits
``min(Retry-After, --retry-after-cap)`` before its next request.

Raw asyncio streams on uvloop rather than httpx: the generator shares two
cores with the servers it measures, so it must cost far less per request
than they do. Targets must be on loopback.

    python bench/loadgen.py --url http://127.0.0.1:8101 --path /v1/chat/completions \
        --body '{"model": "m", "messages": [...]}' --concurrency 32 --duration 5 --out r.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = ("127.", "localhost", "[::1]", "::1")


class HttpError(Exception):
    """The connection broke or the answer was not HTTP."""


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    ttfb: float
    """Seconds from sending to the first body byte (or to the head for an empty body)."""
    latency: float


class Connection:
    """One HTTP/1.1 keep-alive connection that reconnects when the server closes it."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.connects = 0

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> Answer:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._request(raw)
        except TimeoutError:
            await self.close()
            raise
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            await self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc

    async def _request(self, raw: bytes) -> Answer:
        started = time.perf_counter()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.connects += 1
        assert self.reader is not None
        self.writer.write(raw)
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        ttfb = time.perf_counter() - started
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            first = True
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if first:
                    ttfb = time.perf_counter() - started
                    first = False
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append((await reader.readexactly(size + 2))[:-2])
            body = b"".join(parts)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body = await reader.readexactly(length) if length else b""
        else:
            body = await reader.read()  # close-delimited
            headers["connection"] = "close"
        latency = time.perf_counter() - started
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Answer(status, headers, body, ttfb, latency)


def build_request(host: str, port: int, method: str, path: str, body: bytes | None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "User-Agent: keel-bench",
        "Accept: */*",
        "Authorization: Bearer bench",
    ]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def check_loopback(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host.startswith(LOOPBACK):
        raise SystemExit(f"loadgen targets loopback only, not {host!r}")
    return host, parts.port or 80


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summarize(values_s: list[float]) -> dict[str, float | None]:
    ordered = sorted(v * 1000 for v in values_s)
    mean = sum(ordered) / len(ordered) if ordered else None
    return {
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else None,
        "mean": mean,
    }


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    timeline: Counter[tuple[int, str]] = field(default_factory=Counter)
    sent: int = 0
    stream_errors: int = 0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    host, port = check_loopback(args.url)
    body = args.body.encode() if args.body is not None else None
    raw = build_request(host, port, args.method, args.path, body)
    tally = Tally()
    started = time.perf_counter()
    counted_from = started + args.warmup
    deadline = started + args.warmup + args.duration
    budget = [args.max_requests]

    async def client(index: int) -> None:
        connection = Connection(host, port, args.timeout)
        # Spread the start of many clients over 100 ms instead of one burst of SYNs.
        if args.concurrency > 64:
            await asyncio.sleep(random.random() * 0.1)
        try:
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                tally.sent += 1
                try:
                    answer = await connection.request(raw)
                except TimeoutError:
                    outcome, answer = "timeout", None
                except HttpError as exc:
                    outcome, answer = str(exc).split(":", 1)[0], None
                else:
                    outcome = str(answer.status)
                now = time.perf_counter()
                if now >= counted_from:
                    tally.timeline[(int(now - counted_from), outcome)] += 1
                    if answer is None:
                        tally.errors[outcome] += 1
                    else:
                        tally.statuses[answer.status] += 1
                        if answer.status == 200:
                            tally.latencies.append(answer.latency)
                            tally.ttfbs.append(answer.ttfb)
                            if b'"error"' in answer.body:
                                tally.stream_errors += 1
                if answer is not None and answer.status == 429:
                    wait = float(answer.headers.get("retry-after", "1") or 1)
                    await asyncio.sleep(min(wait, args.retry_after_cap) * random.uniform(0.5, 1))
                elif answer is None:
                    await asyncio.sleep(0.05)  # do not spin on a dead server
        finally:
            await connection.close()

    await asyncio.gather(*(client(i) for i in range(args.concurrency)))
    elapsed = min(time.perf_counter(), deadline) - counted_from
    ok = tally.statuses.get(200, 0)
    samples = tally.latencies
    if len(samples) > args.keep_samples:
        samples = random.Random(0).sample(samples, args.keep_samples)
    seconds = sorted({second for second, _ in tally.timeline})
    outcomes = sorted({outcome for _, outcome in tally.timeline})
    return {
        "url": args.url,
        "path": args.path,
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 3),
        "requests": sum(tally.statuses.values()) + sum(tally.errors.values()),
        "ok": ok,
        "rps": ok / elapsed if elapsed > 0 else 0.0,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "errors": dict(tally.errors),
        "stream_errors": tally.stream_errors,
        "latency_ms": summarize(tally.latencies),
        "ttfb_ms": summarize(tally.ttfbs),
        "samples_ms": [round(v * 1000, 3) for v in samples],
        "timeline": {
            outcome: [tally.timeline.get((s, outcome), 0) for s in seconds] for outcome in outcomes
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL, loopback only")
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--method", default="POST")
    parser.add_argument("--body", default=None, help="JSON body")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not counted")
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--retry-after-cap", type=float, default=1.0)
    parser.add_argument("--keep-samples", type=int, default=20_000)
    parser.add_argument("--out", default="-", help="JSON file, or - for stdout")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    text = json.dumps(result)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
