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

One worker (``python -m keel.workers.worker``) per batch size, with the embedded model,
2 slots and keel's default threads.

    .venv/bin/python bench/engine.py [--runs 12]
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from keel.workers.worker import PREFILL_BATCH

BATCHES = (32, 64, 128)
CANCEL_BATCHES = (32, 64)
LINES = 60
"""Lines of the cold prompt: ~970 tokens."""


def cold_prompt(index: int) -> str:
    lines = "".join(f"    value_{index}_{i} = compute({i}, {i * 7 % 13})\n" for i in range(LINES))
    return f"# run {index}\ndef long_function_{index}():\n{lines}"


FILE = "".join(f"def step_{i}(value):\n    return value * {i} + {i * 7}\n\n" for i in range(40))
"""The file a keystroke's prompt ends in: ~900 tokens."""


class Worker:
    """A worker process and its JSON-lines protocol."""

    def __init__(self, model: str, prefill_batch: int) -> None:
        command = [sys.executable, "-m", "keel.workers.worker", "--model", model]
        command += ["--slots", "2", "--prefill-batch", str(prefill_batch)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.status: queue.Queue[dict[str, Any]] = queue.Queue()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        while (message := self.status.get(timeout=120))["state"] != "ready":
            if message["state"] == "error":
                raise RuntimeError(message["message"])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "id" in message:
                self.replies.setdefault(message["id"], queue.Queue()).put(message)
            else:
                self.status.put(message)

    def _write(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def send(self, op: str, **fields: Any) -> int:
        self.next_id += 1
        self.replies.setdefault(self.next_id, queue.Queue())
        self._write({"id": self.next_id, "op": op, **fields})
        return self.next_id

    def cancel(self, target: int) -> None:
        self._write({"op": "cancel", "target": target})

    def first(self, request: int) -> dict[str, Any]:
        """The request's first reply (a piece, the end or an error)."""
        return self.replies[request].get(timeout=120)

    def done(self, request: int) -> dict[str, Any]:
        while True:
            message = self.replies[request].get(timeout=120)
            if message.get("done") or "error" in message or "slots" in message:
                return message

    def complete(self, prompt: str, max_tokens: int) -> int:
        return self.send("complete", prompt=prompt, max_tokens=max_tokens, temperature=0)

    def busy(self) -> bool:
        return any(slot["busy"] for slot in self.done(self.send("slots"))["slots"])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def reading_speed(worker: Worker, runs: int, base: int) -> list[float]:
    """Tokens a second reading a cold prompt (prompt tokens / time to the first token)."""
    speeds = []
    for index in range(runs):
        end = worker.done(worker.complete(cold_prompt(base + index), 1))
        speeds.append(end["prompt_tokens"] / end["first_token_ms"] * 1000)
    return speeds


def cancel_times(worker: Worker, runs: int, base: int) -> list[float]:
    """Milliseconds from a cancel sent while a cold prompt is read to the slot free."""
    times = []
    for index in range(runs):
        request = worker.complete(cold_prompt(base + index), 400)
        while not worker.busy():
            time.sleep(0.003)
        time.sleep(0.3 + 0.5 * index / runs)
        sent = time.perf_counter()
        worker.cancel(request)
        worker.done(request)
        while worker.busy():
            time.sleep(0.003)
        times.append((time.perf_counter() - sent) * 1000)
    return times


def keystrokes(worker: Worker, runs: int) -> dict[str, list[float]]:
    """A keystroke's first token with the engine idle, and as the request it supersedes
    is cancelled while decoding in the slot that holds the file."""
    worker.done(worker.complete(FILE, 1))  # the file is read once, cold
    alone, superseding, typed = [], [], ""
    for index in range(runs):
        typed += "x"
        alone.append(worker.done(worker.complete(FILE + typed, 1))["first_token_ms"])
        typed += "y"
        running = worker.complete(FILE + typed, 64)
        worker.first(running)  # decoding
        time.sleep(0.003 * (index % 5))  # cancels at different moments of a step
        typed += "z"
        worker.cancel(running)
        superseding.append(worker.done(worker.complete(FILE + typed, 1))["first_token_ms"])
        worker.done(running)
    return {"alone": alone, "superseding": superseding}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 1),
        "max": round(max(values), 1),
        "min": round(min(values), 1),
    }


def run(runs: int = 12) -> dict[str, Any]:
    import common

    from keel.models.registry import embedded_model_path

    model = str(embedded_model_path())
    batches: dict[str, Any] = {}
    keystroke: dict[str, Any] = {}
    for batch in BATCHES:
        common.log(f"engine: prefill batch {batch}")
        worker = Worker(model, batch)
        try:
            figures: dict[str, Any] = {
                "read_tok_s": summary(reading_speed(worker, 3, base=100 * batch))
            }
            if batch in CANCEL_BATCHES:
                figures["cancel_ms"] = summary(cancel_times(worker, runs, base=100 * batch + 10))
            if batch == PREFILL_BATCH:
                common.log("engine: keystrokes")
                keystroke = {k: summary(v) for k, v in keystrokes(worker, runs).items()}
        finally:
            worker.close()
        batches[str(batch)] = figures
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
