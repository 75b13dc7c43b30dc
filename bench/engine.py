"""The local engine's own trade-offs, measured through the worker's protocol (no keel
in between), each side by side in one run:

- **Prompt batch**: how fast a cold ~970-token prompt is read, and how long the slot
  stays busy after a ``cancel`` sent while such a prompt is read, for prefill batches of
  32, 64 (keel's ``PREFILL_BATCH``) and 128 tokens. The engine acts on a cancel between
  batches, so the cancels go out at moments spread evenly over 0.3-0.8 s into the read
  (two 64-token batches); the slot table is polled through the worker.
- **Superseding**: a keystroke's time to first token when the engine is idle, and when
  it arrives as the request it supersedes (still decoding in the slot that holds the
  file) is cancelled, as keel does at each keystroke.

One worker per batch size, started and driven as keel does (``WorkerSupervisor``), with
the embedded model, 2 slots and keel's default threads; the cold prompts are the
local-serving bench's.

    .venv/bin/python bench/engine.py [--runs 12]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from keel.workers.supervisor import WorkerSpec, WorkerSupervisor
from keel.workers.worker import PREFILL_BATCH

BATCHES = (32, 64, 128)
CANCEL_BATCHES = (32, 64)
LINES = 60
"""Lines of the cold prompt (the local-serving bench's): ~970 tokens."""

FILE = "".join(f"def step_{i}(value):\n    return value * {i} + {i * 7}\n\n" for i in range(40))
"""The file a keystroke's prompt ends in: ~900 tokens."""


def cold_prompt(index: int) -> str:
    from local_serving import long_body

    return str(long_body(index, stream=True, prompt_lines=LINES)["prompt"])


def complete(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"op": "complete", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


async def finish(worker: WorkerSupervisor, op: dict[str, Any]) -> dict[str, Any]:
    """Run ``op`` to its end; what the worker reported for it."""
    async for _ in worker.stream(op, ready_timeout=120):
        pass
    return worker.stats.last


async def until_busy(worker: WorkerSupervisor, wanted: bool, timeout: float = 60.0) -> None:
    """Poll the engine's slot table (through the worker) until some slot is busy
    (``wanted``) or none is."""
    for _ in range(int(timeout / 0.003)):
        reply = await worker.call({"op": "slots"}, ready_timeout=5)
        if any(slot["busy"] for slot in reply["slots"]) == wanted:
            return
        await asyncio.sleep(0.003)
    raise RuntimeError(f"the engine's slots did not become {'busy' if wanted else 'free'}")


async def reading_speed(worker: WorkerSupervisor, runs: int, base: int) -> list[float]:
    """Tokens a second reading a cold prompt (prompt tokens / time to the first token)."""
    speeds = []
    for index in range(runs):
        end = await finish(worker, complete(cold_prompt(base + index), 1))
        speeds.append(end["prompt_tokens"] / end["first_token_ms"] * 1000)
    return speeds


async def cancel_times(worker: WorkerSupervisor, runs: int, base: int) -> list[float]:
    """Milliseconds from closing a stream (the worker's ``cancel``) while a cold prompt is
    read to the slot free."""
    times = []
    for index in range(runs):
        stream = worker.stream(complete(cold_prompt(base + index), 400), ready_timeout=5)
        reading = asyncio.ensure_future(anext(stream))  # sends the request
        await until_busy(worker, True)
        await asyncio.sleep(0.3 + 0.5 * index / runs)
        sent = time.perf_counter()
        reading.cancel()  # the stream's end sends the worker its cancel
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await until_busy(worker, False)
        times.append((time.perf_counter() - sent) * 1000)
    return times


async def keystrokes(worker: WorkerSupervisor, runs: int) -> dict[str, list[float]]:
    """A keystroke's first token with the engine idle, and as the request it supersedes
    is cancelled while decoding in the slot that holds the file."""
    await finish(worker, complete(FILE, 1))  # the file is read once, cold
    alone, superseding, typed = [], [], ""
    for index in range(runs):
        typed += "x"
        alone.append((await finish(worker, complete(FILE + typed, 1)))["first_token_ms"])
        typed += "y"
        running: AsyncIterator[str] = worker.stream(complete(FILE + typed, 64), ready_timeout=5)
        await anext(running)  # decoding
        await asyncio.sleep(0.003 * (index % 5))  # cancels at different moments of a step
        typed += "z"
        await running.aclose()  # type: ignore[attr-defined]
        superseding.append((await finish(worker, complete(FILE + typed, 1)))["first_token_ms"])
    return {"alone": alone, "superseding": superseding}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 1),
        "max": round(max(values), 1),
        "min": round(min(values), 1),
    }


async def measure(runs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    import common

    from keel.models.registry import embedded_model_path

    model = str(embedded_model_path())
    batches: dict[str, Any] = {}
    keystroke: dict[str, Any] = {}
    for batch in BATCHES:
        common.log(f"engine: prefill batch {batch}")
        spec = WorkerSpec(model, slots=2, prefill_batch=batch)
        worker = WorkerSupervisor(spec, name=f"engine-{batch}")
        await worker.start()
        try:
            await worker.wait_ready(120)
            speeds = await reading_speed(worker, 3, base=100 * batch)
            figures: dict[str, Any] = {"read_tok_s": summary(speeds)}
            if batch in CANCEL_BATCHES:
                times = await cancel_times(worker, runs, base=100 * batch + 10)
                figures["cancel_ms"] = summary(times)
            if batch == PREFILL_BATCH:
                common.log("engine: keystrokes")
                keystroke = {k: summary(v) for k, v in (await keystrokes(worker, runs)).items()}
        finally:
            await worker.stop()
        batches[str(batch)] = figures
    return batches, keystroke


def run(runs: int = 12) -> dict[str, Any]:
    batches, keystroke = asyncio.run(measure(runs))
    return {
        "setup": {
            "model": "embedded SmolLM2-135M-Instruct Q4_1",
            "slots": 2,
            "threads": "keel's default",
            "runs": runs,
            "cold_prompt_lines": LINES,
        },
        "prefill_batch": batches,
        "keystroke_first_token_ms": keystroke,
    }


def render(result: dict[str, Any]) -> str:
    batches = result["prefill_batch"]
    keel_speed = batches[str(PREFILL_BATCH)]["read_tok_s"]["p50"]
    lines = ["prefill batch | cold read tok/s p50 (x keel's) | cancel while reading -> slot free"]
    for batch, figures in batches.items():
        speed = figures["read_tok_s"]["p50"]
        cancel = figures.get("cancel_ms")
        where = "-" if cancel is None else f"p50 {cancel['p50']:.0f} ms, max {cancel['max']:.0f} ms"
        lines.append(f"{batch:>13} | {speed:>13.0f} ({speed / keel_speed:.2f}x) | {where}")
    keystroke = result["keystroke_first_token_ms"]
    lines.append(
        f"keystroke first token: alone p50 {keystroke['alone']['p50']} ms, "
        f"as its predecessor is cancelled p50 {keystroke['superseding']['p50']} ms "
        f"(max {keystroke['superseding']['max']} ms)"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12)
    args = parser.parse_args()
    import common

    result = run(args.runs)
    common.write_json("engine", result)
    print(render(result))
    return 0


if __name__ == "__main__":
    import os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
