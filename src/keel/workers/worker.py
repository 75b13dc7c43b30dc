"""The worker: a child process that holds one llama.cpp model.

Run as ``python -m keel.workers.worker --model PATH ...``. A native crash or an
out-of-memory kill ends this process, never the server. The protocol is JSON
lines: requests on stdin, replies on the original stdout (duplicated before
fd 1 is pointed at stderr, so whatever llama.cpp prints cannot corrupt it).

Requests carry an ``id`` and an ``op``:

- ``complete`` {prompt, max_tokens, temperature, stop, seed}: streams
  ``{"id", "text"}`` pieces, then ``{"id", "done": true, "finish_reason",
  "prompt_tokens", "completion_tokens"}``.
- ``chat`` {messages, max_tokens, temperature, stop, seed}: the same, with the
  model's own chat template.
- ``embed`` {texts}: ``{"id", "embeddings"}``.
- ``tokenize`` {texts}: ``{"id", "counts"}``; answered at once, even while a
  generation runs.
- ``cancel`` {target}: the target generation stops after its current token and
  ends with ``finish_reason: "cancelled"``.

Any failure of one request is ``{"id", "error", "code"}``. Status lines
(``{"event": "status", "state": "loading" | "ready" | "error"}``) report the
lifecycle; a start error (library missing, bad model file) exits with 69 so
the supervisor does not retry what cannot succeed. End of stdin ends the
worker: it never outlives its server.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

from keel.errors import ExitCode

EXIT_UNUSABLE = ExitCode.DEPENDENCY
PREFILL_CHUNK = 64
"""Prompt tokens read between cancellation checks (~0.5 s on a 2-core CPU)."""


class _Channel:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


SHIFT_MATCH = 32
"""Tokens that must line up before a moved window is reused by shifting the KV cache."""


def shift_offset(cached: Sequence[int], tokens: Sequence[int], head: int) -> int | None:
    """How many cached tokens after the shared first ``head`` to drop so that the
    cache continues with ``tokens[head:]``, or None when it does not hold them.

    ``head`` is the common prefix (the snippet block, say); what follows it in
    the new prompt must appear further on in the cache: lines dropped from the
    top of a moved window."""
    probe = list(tokens[head : head + SHIFT_MATCH])
    if len(probe) < SHIFT_MATCH or len(cached) < head + SHIFT_MATCH + 1:
        return None
    if list(cached[:head]) != list(tokens[:head]):
        return None
    first = probe[0]
    for offset in range(1, len(cached) - head - SHIFT_MATCH + 1):
        start = head + offset
        if cached[start] == first and list(cached[start : start + SHIFT_MATCH]) == probe:
            return offset
    return None


class _Slots:
    """Several model contexts over one memory-mapped model file.

    Each slot keeps the tokens it last evaluated in its KV cache; a request goes
    to the slot sharing the longest token prefix with its prompt (so the same
    file of the same editor keeps landing on the same slot), ties to the least
    recently used. llama-cpp-python then evaluates only the tokens after that
    shared prefix.
    """

    def __init__(self, contexts: list[Any]) -> None:
        self.contexts = contexts
        self.used = [0] * len(contexts)
        self.clock = 0

    def pick(self, tokens: Sequence[int]) -> tuple[int, int]:
        best, best_shared = 0, -1
        for index, llm in enumerate(self.contexts):
            cached = llm._input_ids[: llm.n_tokens]
            shared = common_prefix(cached, tokens)
            if shared < len(tokens) // 2:
                offset = shift_offset(cached, tokens, shared)
                if offset is not None:  # the window moved: reusable after a KV shift
                    shared = max(shared, len(cached) - offset)
            if shared > best_shared or (
                shared == best_shared and self.used[index] < self.used[best]
            ):
                best, best_shared = index, shared
        self.clock += 1
        self.used[best] = self.clock
        return best, max(0, best_shared)


class _Worker:
    def __init__(self, contexts: list[Any], channel: _Channel) -> None:
        self.llm = contexts[0]
        self.slots = _Slots(contexts)
        self.channel = channel
        self.jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled: set[int] = set()
        self.lock = threading.Lock()
        self._reused = 0

    def read_requests(self, stdin: IO[str]) -> None:
        """Reader thread: answers cheap ops at once, queues generations."""
        for line in stdin:
            try:
                request = json.loads(line)
            except json.JSONDecodeError:
                continue
            op = request.get("op")
            if op == "cancel":
                with self.lock:
                    self.cancelled.add(int(request["target"]))
            elif op == "tokenize":
                self._guarded(request, self._tokenize)
            else:
                self.jobs.put(request)
        self.jobs.put(None)

    def run(self) -> None:
        handlers = {"complete": self._complete, "chat": self._chat, "embed": self._embed}
        while (request := self.jobs.get()) is not None:
            handler = handlers.get(request.get("op", ""))
            if self._is_cancelled(request.get("id", -1)):
                # Cancelled while queued: never start it.
                self.channel.send(
                    {
                        "id": request["id"],
                        "done": True,
                        "finish_reason": "cancelled",
                        "completion_tokens": 0,
                    }
                )
                with self.lock:
                    self.cancelled.discard(request["id"])
                continue
            if handler is None:
                self.channel.send(
                    {"id": request.get("id"), "error": "unknown op", "code": "bad_request"}
                )
                continue
            self._guarded(request, handler)
            with self.lock:
                self.cancelled.discard(request["id"])

    def _guarded(self, request: dict[str, Any], handler: Any) -> None:
        try:
            handler(request)
        except ValueError as exc:  # llama-cpp-python's "exceeds context window" and bad input
            self.channel.send({"id": request["id"], "error": str(exc), "code": "bad_request"})
        except Exception as exc:  # one request failing must not end the worker
            self.channel.send(
                {"id": request["id"], "error": f"{type(exc).__name__}: {exc}", "code": "internal"}
            )

    def _is_cancelled(self, request_id: int) -> bool:
        with self.lock:
            return request_id in self.cancelled

    def _tokenize(self, request: dict[str, Any]) -> None:
        counts = [
            len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            for text in request["texts"]
        ]
        self.channel.send({"id": request["id"], "counts": counts})

    def _sampling(self, request: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_tokens": int(request.get("max_tokens", 64)),
            "stop": list(request.get("stop") or []),
            "stream": True,
        }
        if request.get("temperature") is not None:
            kwargs["temperature"] = float(request["temperature"])
        if request.get("seed") is not None:
            kwargs["seed"] = int(request["seed"])
        return kwargs

    def _stream(
        self,
        request: dict[str, Any],
        pieces: Iterator[tuple[str, str | None]],
        stats: dict[str, Any],
    ) -> None:
        request_id = request["id"]
        produced = 0
        finish_reason: str | None = None
        started = float(stats.pop("started", time.perf_counter()))
        first_at: float | None = None
        for text, reason in pieces:
            if first_at is None:
                first_at = time.perf_counter()
            if self._is_cancelled(request_id):
                finish_reason = "cancelled"
                break
            if text:
                produced += 1
                self.channel.send({"id": request_id, "text": text})
            if reason is not None:
                finish_reason = reason
        ended = time.perf_counter()
        self.channel.send(
            {
                "id": request_id,
                "done": True,
                "finish_reason": finish_reason or "stop",
                "completion_tokens": produced,
                "first_token_ms": round(((first_at or ended) - started) * 1000, 2),
                "total_ms": round((ended - started) * 1000, 2),
                **stats,
            }
        )

    def _slot_for(self, text: str) -> tuple[Any, dict[str, Any], list[int]]:
        started = time.perf_counter()
        tokens = self.llm.tokenize(text.encode("utf-8"), special=True)
        index, shared = self.slots.pick(tokens)
        stats = {
            "slot": index,
            "prompt_tokens": len(tokens),
            "reused_tokens": shared,
            "started": started,
        }
        return self.slots.contexts[index], stats, tokens

    def _prefill(self, llm: Any, tokens: list[int], request_id: int) -> bool:
        """Read all but the last prompt token in chunks, stopping if cancelled.

        llama-cpp-python reads a prompt in one uninterruptible call; a request
        superseded during a long prefill would hold the worker for seconds.
        Done here, a cancellation takes effect within one chunk, and the
        library then finds all but one token cached and reads just that one.
        """
        target = tokens[:-1]
        shared = common_prefix(llm._input_ids[: llm.n_tokens], target)
        if shared < len(target) // 2:
            _shift_window(llm, target)
            shared = common_prefix(llm._input_ids[: llm.n_tokens], target)
        llm.n_tokens = min(llm.n_tokens, shared)  # eval() drops the KV cells after n_tokens
        self._reused = shared
        for start in range(shared, len(target), PREFILL_CHUNK):
            if self._is_cancelled(request_id):
                return False
            llm.eval(target[start : start + PREFILL_CHUNK])
        return True

    def _complete(self, request: dict[str, Any]) -> None:
        llm, stats, tokens = self._slot_for(request["prompt"])
        prefilled = self._prefill(llm, tokens, request["id"])
        stats["reused_tokens"] = self._reused
        if not prefilled:
            self.channel.send(
                {
                    "id": request["id"],
                    "done": True,
                    "finish_reason": "cancelled",
                    "completion_tokens": 0,
                    **stats,
                }
            )
            return
        chunks = llm.create_completion(request["prompt"], **self._sampling(request))

        def pieces() -> Iterator[tuple[str, str | None]]:
            for chunk in chunks:
                choice = chunk["choices"][0]
                yield choice.get("text") or "", choice.get("finish_reason")

        self._stream(request, pieces(), stats)

    def _chat(self, request: dict[str, Any]) -> None:
        head = "\n".join(str(m.get("content", "")) for m in request["messages"])
        llm, stats, _ = self._slot_for(head)
        stats["reused_tokens"] = None  # the chat template changes the tokens; not measured
        chunks = llm.create_chat_completion(messages=request["messages"], **self._sampling(request))

        def pieces() -> Iterator[tuple[str, str | None]]:
            for chunk in chunks:
                choice = chunk["choices"][0]
                yield choice.get("delta", {}).get("content") or "", choice.get("finish_reason")

        self._stream(request, pieces(), stats)

    def _embed(self, request: dict[str, Any]) -> None:
        result = self.llm.create_embedding(list(request["texts"]))
        vectors = [item["embedding"] for item in result["data"]]
        self.channel.send({"id": request["id"], "embeddings": vectors})


def _shift_window(llm: Any, tokens: Sequence[int]) -> int:
    """Reuse a cache whose window start moved: drop the lines that left the window
    from the KV cache and shift the rest back (llama.cpp's context shift), instead
    of reading the whole prompt again. Returns the tokens dropped.

    The positions shift exactly; the attention of the kept tokens was computed
    with the dropped lines still present, the approximation llama.cpp's own
    context shift makes."""
    count = llm.n_tokens
    head = common_prefix(llm._input_ids[:count], tokens)
    offset = shift_offset(llm._input_ids[:count], tokens, head)
    # Sequence 0, explicitly: llama.cpp's shift asserts on "any sequence" (-1).
    if offset is None or not llm._ctx.kv_cache_seq_rm(0, head, head + offset):
        return 0
    llm._ctx.kv_cache_seq_shift(0, head + offset, count, -offset)
    llm.input_ids[head : count - offset] = llm.input_ids[head + offset : count]
    llm.n_tokens = count - offset
    return offset


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="keel-worker", description=__doc__)
    parser.add_argument("--model", required=True, help="path to a GGUF file")
    parser.add_argument("--context-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--embedding", action="store_true", help="load for embeddings")
    parser.add_argument("--slots", type=int, default=1, help="model contexts kept (KV caches)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = _Channel(os.fdopen(protocol_fd, "w", encoding="utf-8"))

    def unusable(reason: str, message: str) -> int:
        channel.send({"event": "status", "state": "error", "reason": reason, "message": message})
        return EXIT_UNUSABLE

    channel.send({"event": "status", "state": "loading", "pid": os.getpid()})
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, OSError from a broken shared library
        return unusable("library", f"cannot load llama-cpp-python: {type(exc).__name__}: {exc}")
    if not os.path.isfile(args.model):
        return unusable("model_file", f"model file not found: {args.model}")
    options: dict[str, Any] = {
        "model_path": args.model,
        "n_ctx": args.context_size,
        "n_gpu_layers": args.gpu_layers,
        "verbose": False,
    }
    if args.threads:
        options["n_threads"] = args.threads
    if args.embedding:
        options["embedding"] = True
        options["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    try:
        contexts = [llama_cpp.Llama(**options) for _ in range(max(1, args.slots))]
    except Exception as exc:
        return unusable("model_file", f"cannot load model {args.model}: {exc}")
    llm = contexts[0]
    metadata = dict(getattr(llm, "metadata", {}) or {})
    channel.send(
        {
            "event": "status",
            "state": "ready",
            "n_ctx": llm.n_ctx(),
            "n_vocab": llm.n_vocab(),
            "name": metadata.get("general.name"),
            "architecture": metadata.get("general.architecture"),
            "slots": len(contexts),
        }
    )
    worker = _Worker(contexts, channel)
    reader = threading.Thread(target=worker.read_requests, args=(sys.stdin,), daemon=True)
    reader.start()
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
