"""The worker: a child process running llama.cpp's server engine for one model.

Run as ``python -m keel.workers.worker --model PATH ...``. The engine is
llama.cpp's own server (``xllamacpp``, a prebuilt wheel) held in process:
continuous batching across ``--slots`` slots, a prompt cache per slot, slot
choice by prompt similarity, KV reuse of a moved window (``n_cache_reuse``),
a clean error for a prompt over the context. A native crash or an
out-of-memory kill ends this process, never the server.

Why keel's own protocol around it and not the engine's HTTP port: closing an
HTTP connection to the engine does not stop the work (measured: the slot stays
busy until ``max_tokens``), while the in-process streaming callback stops it at
the next token or prefill batch. The engine's HTTP listener still runs, on
loopback behind a random key known only to this process, for tokenizing and
the slot table.

The protocol is JSON lines: requests on stdin, replies on the original stdout
(duplicated before fd 1 is pointed at stderr, so whatever llama.cpp prints
cannot corrupt it). Requests carry an ``id`` and an ``op``:

- ``complete`` {prompt, max_tokens, temperature, top_p, frequency_penalty,
  presence_penalty, stop, seed, limit_must_fit, t_max_predict_ms, pieces}: streams
  ``{"id", "text", "tokens"}`` pieces (the first token alone, then the tokens made
  within ``PIECE_HOLD`` of the last piece, together; ``tokens``: how many; the first
  piece also carries the prompt's figures, ``prompt_tokens``, ``reused_tokens`` and
  ``prompt_ms``, for a caller that stops reading before the end), then ``{"id", "done":
  true, "finish_reason", "prompt_tokens", "completion_tokens", "reused_tokens", "prompt_ms",
  "slot_wait_ms", "slot_held", "first_token_ms", "total_ms"}`` (``slot_wait_ms``: the time it
  waited here for a slot, 0 if one was free, included in the other two). ``pieces``
  (``[[text, own], ...]``, the prompt in order): the prompt as tokens, each piece read with
  the model's control tokens where ``own`` (keel's template) and as plain text where not
  (the user's code, which spells one).
- ``chat`` {messages, and the same sampling fields, as_text}: the same, with the
  model's own chat template; ``slot_held``: it waited because the free slot was
  kept for completions (see ``_SlotPool``). ``as_text``: the messages are read as text
  (a control token they spell, as the token's characters), the template's markers as
  tokens; the engine then continues the templated prompt as a completion.
- ``embed`` {texts}: ``{"id", "embeddings", "truncated"}``; an input over the context is
  embedded from its first context's worth of tokens, and ``truncated`` lists the
  indexes of those inputs (sentence-transformers and Ollama cut them the same way).
- ``tokenize`` {texts}: ``{"id", "counts"}``; answered at once, even while
  generations run.
- ``slots`` {}: ``{"id", "slots": [{"id", "busy", "tokens"}]}``, the engine's slot
  table (``tokens``: what the slot holds, the batch being read included).
- ``cancel`` {target}: a queued target never starts; a running one stops after
  the decode step or the prompt batch (``PREFILL_BATCH`` tokens) in flight and
  ends with ``finish_reason: "cancelled"``; an ``embed`` stops after the input in
  flight, with the error code ``cancelled``.
- ``completions_seen`` {at}: no reply; the model's previous worker served a completion
  at ``at`` (Unix time), so chats leave a slot to completions as they did there.

Any failure of one request is ``{"id", "error", "code"}``; a prompt over the
context, or with ``limit_must_fit`` one that leaves less room than ``max_tokens``, has
code ``context_length_exceeded`` with ``n_prompt_tokens`` and ``n_ctx``. Status lines
(``{"event": "status", "state": "loading" | "ready" | "error"}``) report the lifecycle;
a start error (library missing, bad model file) exits with 69 so the supervisor does
not retry what cannot succeed. End of stdin ends the worker: it never outlives its
server.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from keel import jsoncodec
from keel.errors import ExitCode

EXIT_UNUSABLE = ExitCode.DEPENDENCY
PREFILL_BATCH = 64
"""Prompt tokens per engine batch. A long prompt is read one batch per engine call, so a
cancelled read ends with the batch in flight (0.2-0.4 s on 2 cores). Measured with the
embedded model on 2 cores (``bench/engine.py``, three runs), a cold ~970-token prompt
reads at 233-268 tok/s with 64, 183-217 with 32, 253-268 with 128; cancelled at moments
spread over the read, the slot is free after p50 118-139 ms (max 252-258) with 64 and
p50 73-87 ms (max 130-212) with 32. Reused prefixes are not read at all, and a superseded
keystroke's read is not lost: the next keystroke continues it in the same slot."""
PIECE_HOLD = 0.02
"""Seconds a token waits for the next before it is sent as a piece of its own. The first
token goes out at once; a model decoding faster than one token per ``PIECE_HOLD`` sends
its tokens a few to a piece (a slower one, one by one). Each piece wakes keel's event
loop, and on 2 cores every wake-up stalls the engine's threads at their step barrier.
Measured with the embedded model (~100 tok/s) and keel's default config, three
400-token streams: keel's CPU 0.29-0.32 ms per token one by one, 0.12 ms at 3.2 tokens a
piece. What a streaming client sees: at most ~50 pieces a second, a token never later
than the next one's arrival."""
KEEP_ALIVE_IDLE = 0.25
"""Seconds a connection to the engine's listener is kept alive unused, then closed: the
listener watches a kept-alive connection by waking every 10 ms, so one kept open for
keel's liveness checks (a tokenize and a slot table every 5 s) cost an idle engine 100
wake-ups and ~8 ms of CPU a second, for ever. Measured, a default keel idle for 60 s:
0.49 and 0.50 CPU-s for its two engines, 6,200 context switches each; 0.11 and 0.13,
~580, with connections closed after 0.25 s unused. Keystrokes' tokenizes and a busy
engine's slot tables come closer together than this, and keep theirs."""
CACHE_REUSE = 32
"""Smallest run of tokens the engine reuses from a moved window by shifting its KV cache."""
EMBEDDING_NICE = 10
"""An embedding engine runs at a lower CPU priority, so that a generation on the same
cores preempts it: two engines at one priority stall each other at every step's barriers
(a thread spins while the one it waits for is off the core). Measured with keel's default
config on 2 cores, Tabby completions sent ~1 s apart while 16 inputs of ~400 tokens were
embedded: p50 6.4 s, max 24 s (idle 0.2 s), the batch 76 s; at nice 10, p50 0.33 s, max
0.48 s, the batch 38 s (nice 19 the same). The cost: embeddings wait while a generation
has the CPU. A chat model of its own keeps its priority: beside it completions took 1.6x
idle, and at nice 10 its answers starved. A worker has a session of its own (a Ctrl-C at
keel's terminal is not its signal), hence its own autogroup under Linux's autogroup
scheduling, whose nice is set too: a thread's nice counts only within its autogroup."""


def _ignore(_reply: Any) -> bool:
    return False


class _Channel:
    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = jsoncodec.dumps(message) + b"\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()


def _piece(request_id: int, text: str, state: dict[str, Any], sent: float) -> dict[str, Any]:
    """A piece's message, with the tokens made since the last; the first (nothing
    ``sent`` yet) also carries the prompt's tokens, those the slot held, and the time
    reading the rest took, from the engine's progress reports (where it made one)."""
    tokens = state["produced"] - state.get("told", 0)
    state["told"] = state["produced"]
    message: dict[str, Any] = {"id": request_id, "text": text, "tokens": tokens}
    progress = state.get("progress")
    if not sent and progress is not None:
        message["prompt_tokens"] = progress["total"]
        message["reused_tokens"] = progress["cache"]
        message["prompt_ms"] = state.get("read_ms")
    return message


def _error_reply(error: dict[str, Any]) -> dict[str, Any]:
    """The engine's error object as a protocol reply (without the id)."""
    message = str(error.get("message") or error)
    if error.get("type") == "exceed_context_size_error":
        return {
            "error": message,
            "code": "context_length_exceeded",
            "n_prompt_tokens": error.get("n_prompt_tokens"),
            "n_ctx": error.get("n_ctx"),
        }
    status = int(error.get("code") or 500)
    return {"error": message, "code": "bad_request" if 400 <= status < 500 else "internal"}


class _StopWatch:
    """Stop words, applied here and not by the engine, which holds back streamed text
    that might begin a stop word and drops it when the answer ends at ``max_tokens``
    first (``"1, 2, 3,"`` with stop ``"4, 5, 6"`` and 3 tokens gave ``" "``, without the
    stop ``" 4,"``). Here too such text waits for the next token, and goes out if the
    answer ends."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self.held = ""
        self.found = False

    def take(self, piece: str) -> str:
        """What of the text so far can go out after ``piece``: up to a stop word (which
        sets ``found``), or up to what might begin one."""
        if not self._stops:
            return piece
        seen = self.held + piece
        at = min((i for i in (seen.find(s) for s in self._stops) if i >= 0), default=-1)
        if at >= 0:
            self.found, self.held = True, ""
            return seen[:at]
        keep = max((_begun(seen, stop) for stop in self._stops), default=0)
        self.held = seen[len(seen) - keep :] if keep else ""
        return seen[: len(seen) - keep]


def _begun(text: str, stop: str) -> int:
    """The length of the longest beginning of ``stop`` (short of all of it) that ``text``
    ends with; only beginnings that end in ``text``'s last character are compared."""
    last = text[-1:]
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop[n - 1] == last and text.endswith(stop[:n]):
            return n
    return 0


def _sampling(request: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": int(request.get("max_tokens") or -1),  # -1: to the end of the context
        "stream": True,
        "return_progress": True,
        # each chunk's count of tokens made: a token holding part of a character (an
        # emoji is 3) sends no chunk, and an answer keel ended at a stop word, which has
        # no last chunk, was counted a token per chunk (4 for 12)
        "timings_per_token": True,
        "cache_prompt": True,
    }
    if request.get("temperature") is not None:
        body["temperature"] = float(request["temperature"])
    if request.get("seed") is not None:
        body["seed"] = int(request["seed"])
    for name in ("top_p", "frequency_penalty", "presence_penalty"):
        if request.get(name) is not None:
            body[name] = float(request[name])
    if request.get("t_max_predict_ms"):  # the engine's own check, token by token
        body["t_max_predict_ms"] = int(request["t_max_predict_ms"])
    return body


SCHEMA_WORDS = ("grammar", "does not match the expected")
"""The engine's words for a failure of a response schema's grammar: in its sampler ("empty
grammar stack"), or reading back an answer the grammar let through unparsable (a pattern's
character written raw into the JSON: "does not match the expected peg-native format")."""


MOVED_PROBE = 128
"""Characters after the shared head that must reappear in a slot's last prompt for a
moved window (lines dropped at the top) to count as reusable there."""


def reusable_chars(cached: str, prompt: str) -> int:
    """How much of ``prompt`` a slot whose last prompt was ``cached`` holds: the common
    prefix, or, when the window start moved down, the head plus the rest of the cache
    from where the new prompt's text continues (the engine shifts those KV cells)."""
    head = len(os.path.commonprefix([cached, prompt]))
    probe = prompt[head : head + MOVED_PROBE]
    if len(probe) == MOVED_PROBE:
        at = cached.find(probe, head + 1)
        if at > head:
            return max(head, head + len(cached) - at)
    return head


SUPERSEDE_GRACE = 0.15
"""Seconds a request waits for the cancel of a running one whose slot holds much more of
its prompt (keel may send a keystroke's request a moment before it cancels the one it
supersedes), rather than start reading the prompt in another slot. It waits only where
the slot would save at least :data:`SUPERSEDE_GAIN` (a prefill batch, 0.2-0.4 s on 2
cores; the whole file, ~1 s, when the other slot holds another one), and only until the
cancel comes. 50 ms was too short on a loaded machine: a cancel sent 5 ms after the
request reached the worker past it (a CI-like run, 2026-12-03), and the file was read
cold."""
SUPERSEDE_GAIN = 256
"""Characters more of the prompt (about one prefill batch) that make that wait worth it."""


COMPLETIONS_RECENT = 600.0
"""Seconds after a completion during which chats leave a slot to completions."""
HOLD_LIMIT = 30.0
"""Seconds a chat waits for that reason once no completion has come (from its arrival or
the last completion, whichever is later): half keel's first-token limit for a local model
(60 s), so a chat held behind a long answer of a slow model is late, never failed (the
embedded model's longest answer, a full 2,048-token context, takes ~30 s). While someone
types it waits on: one user's eight chats took the kept slot after 30 s each, and a
colleague's completions waited 13 s and more behind them (a chat held to keel's
first-token limit is a 429, the engine's load)."""


class _SlotPool:
    """Which engine slot a generation runs in, chosen here and passed as ``id_slot``.

    The engine picks a slot by the longest common token prefix, which misses a moved
    window (its prefix differs after the head) and sends it to an empty slot to be
    read from scratch. Here a request goes to the slot holding the most of its prompt,
    moved windows included, ties to a free one, then to the least recently used.

    A slot whose request was cancelled counts as about to be free: a keystroke's
    request waits the engine step that ends the request it superseded rather than read
    its prompt in another slot beside it (measured: 17-34 ms to the first token that
    way against 29-47 ms beside it, and a whole cold read when the other slot held
    another file). When no slot is free or freeing it waits here, where a cancellation
    ends the wait before the engine is touched.

    While the engine serves completions (one in the last :data:`COMPLETIONS_RECENT`
    seconds), chats leave one slot to them: a chat answer runs for seconds (until the
    model stops, if the client set no limit), and with every slot answering chats a
    keystroke's completion waited for one to end (measured, two chats on the default
    two slots: 4.4 s against 0.18 s idle). A chat that waits for that reason (until
    :data:`HOLD_LIMIT` has passed with no completion) is ``held``; an engine that serves
    only chats, or has one slot, holds none.

    Requests that found no slot take the slots that free in the order they came: every
    waiter wakes when a slot frees, and whichever ran first took it, so under load one
    waited past the role's deadline while newer ones went ahead (a soak's 4-token
    completion: 0.9 s average slot wait, a 30 s timeout). Of different callers (API
    keys, as keel's admission names them), the one whose requests hold fewest slots
    goes first: eight completions one key sent at once queued ahead of a colleague's
    keystroke, which waited for all of them (p50 7.2 s against 0.34 s alone)."""

    def __init__(self, count: int) -> None:
        self._prompts = [""] * count
        self._used = [0] * count
        self._holders: list[threading.Event | None] = [None] * count
        """Each slot's request (its cancel flag), or None while the slot is free."""
        self._chats = [False] * count
        """Whether each slot's request is a chat."""
        self._callers: list[str | None] = [None] * count
        """Each slot's caller (an API key's id; None where keel has no keys)."""
        self._completed_at = float("-inf")
        self._clock = 0
        self._changed = threading.Condition()
        self._arrivals = itertools.count()
        self._waiting: dict[int, str | None] = {}
        """The arrival numbers of the requests that found no slot free, still waiting, and
        their callers."""

    def completed_at(self, when: float) -> None:
        """A completion was served at ``when`` (monotonic), by a worker before this one."""
        with self._changed:
            self._completed_at = max(self._completed_at, when)

    def acquire(
        self,
        prompt: str,
        cancelled: threading.Event,
        *,
        chat: bool = False,
        caller: str | None = None,
        on_wait: Callable[[], None] = lambda: None,
    ) -> tuple[int | None, bool, float]:
        """The slot for ``prompt`` (None if cancelled while waiting), whether a chat was
        held back to leave a slot to completions, and the seconds it waited (0 if it
        never had to: the time a loaded machine takes to schedule the request's thread
        is not a wait for a slot, and was counted as one past 1 ms). ``on_wait`` is
        called when it first has to wait."""
        with self._changed:
            turn = next(self._arrivals)
            try:
                slot, held, blocked = self._acquire(prompt, cancelled, chat, caller, turn, on_wait)
            finally:
                self._waiting.pop(turn, None)
                self._changed.notify_all()  # a later turn may go now
            return slot, held, 0.0 if blocked is None else time.perf_counter() - blocked

    def _acquire(
        self,
        prompt: str,
        cancelled: threading.Event,
        chat: bool,
        caller: str | None,
        turn: int,
        on_wait: Callable[[], None],
    ) -> tuple[int | None, bool, float | None]:
        """:meth:`acquire`'s, with when the request first waited (None if it never did)."""

        def wait(timeout: float | None, blocked: float | None) -> float:
            """Wait for a slot to change hands; when the request first waited."""
            if blocked is None:
                on_wait()
                blocked = time.perf_counter()
            self._changed.wait(timeout)
            return blocked

        arrived = time.monotonic()
        patience, held, blocked = arrived + SUPERSEDE_GRACE, False, None
        if not chat:
            self._completed_at = arrived
        while not cancelled.is_set():
            running = [
                i for i, holder in enumerate(self._holders) if holder and not holder.is_set()
            ]
            hold = max(arrived, self._completed_at) + HOLD_LIMIT - time.monotonic()
            if chat and hold > 0 and self._kept_for_completions(running):
                held = True
                self._waiting.pop(turn, None)  # held: completions go before it, not after
                blocked = wait(hold, blocked)
                continue
            reuse = [reusable_chars(cached, prompt) for cached in self._prompts]
            free = [holder is None for holder in self._holders]
            best = max(
                (i for i in range(len(free)) if i not in running),  # free or freeing
                key=lambda i: (reuse[i], free[i], -self._used[i]),
                default=None,
            )
            best_reuse = -1 if best is None else reuse[best]
            left = patience - time.monotonic()
            if left > 0 and any(reuse[i] >= best_reuse + SUPERSEDE_GAIN for i in running):
                self._waiting.pop(turn, None)  # it waits for one slot, not for any
                blocked = wait(left, blocked)  # its cancel may be on the way
            elif best is not None and free[best] and self._next(turn, caller, running):
                self._clock += 1
                self._holders[best], self._used[best] = cancelled, self._clock
                self._prompts[best], self._chats[best] = prompt, chat
                self._callers[best] = caller
                return best, held, blocked
            else:  # no slot free, or a request that goes before it waits for one
                self._waiting[turn] = caller
                blocked = wait(None, blocked)
        return None, held, blocked

    def _next(self, turn: int, caller: str | None, running: list[int]) -> bool:
        """Whether no waiting request goes before ``turn``'s: of the callers holding fewest
        slots, the oldest request first."""
        held = Counter(self._callers[i] for i in running)
        mine = (held[caller], turn)
        return not any((held[other], t) < mine for t, other in self._waiting.items())

    def _kept_for_completions(self, running: list[int]) -> bool:
        """Whether the slots not answering chats are down to the one kept for completions."""
        if len(self._holders) < 2 or time.monotonic() - self._completed_at > COMPLETIONS_RECENT:
            return False
        return sum(self._chats[i] for i in running) >= len(self._holders) - 1

    def release(self, slot: int) -> None:
        with self._changed:
            self._holders[slot] = None
            self._changed.notify_all()

    def wake(self) -> None:
        """A cancellation arrived: let waiting requests look at their flag."""
        with self._changed:
            self._changed.notify_all()


class _Engine:
    """The in-process engine and the requests running in it.

    Each generation runs in a thread of its own (the engine call blocks, without
    the GIL, until the stream ends); at most ``slots`` run at once so that a
    request queued behind them can be cancelled before it touches the engine.
    """

    def __init__(
        self,
        server: Any,
        address: str,
        key: str,
        slots: int,
        batch: int,
        channel: _Channel,
        context: int,
    ) -> None:
        self.server = server
        self.channel = channel
        self.batch = batch
        self.context = context
        """Tokens of a slot's context: the longest input an embedding reads."""
        host, _, port = address.rpartition("//")[2].rstrip("/").rpartition(":")
        self._address = (host.strip("[]") or "127.0.0.1", int(port))
        self._head = (
            f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()
        self._connections: list[tuple[_Connection, float]] = []
        """Kept-alive connections to the engine's listener, not in use, each with when it
        was last used (monotonic), the oldest first."""
        self._closer: threading.Timer | None = None
        """Closes the connections unused for ``KEEP_ALIVE_IDLE``; none while none are kept."""
        self.slots = _SlotPool(slots)
        self._cancels: dict[int, threading.Event] = {}
        self._wanted: dict[int, threading.Event] = {}
        """The engine slots a request is on, by slot: the request's cancel."""
        self._embedding = 0
        """Embedding calls running (they run in the engine's slots, outside the pool)."""
        self._lock = threading.Lock()

    # dispatch ------------------------------------------------------------

    def read_requests(self, stdin: IO[str]) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "complete": self._complete,
            "chat": self._chat,
            "embed": self._embed,
            "tokenize": self._tokenize,
            "slots": self._slot_table,
        }
        for line in stdin:
            try:
                request = jsoncodec.loads(line)
            except ValueError:
                continue
            op = request.get("op")
            if op == "completions_seen":  # by this model's previous worker, when by the
                # monotonic clock (wall time moved it by any step between the two)
                self.slots.completed_at(float(request["at"]))
                continue
            if op == "cancel":
                with self._lock:
                    event = self._cancels.get(int(request["target"]))
                if event is not None:
                    event.set()
                    self.slots.wake()
                continue
            handler = handlers.get(op or "")
            if handler is None:
                self.channel.send(
                    {"id": request.get("id"), "error": f"unknown op {op!r}", "code": "bad_request"}
                )
                continue
            with self._lock:
                self._cancels[request["id"]] = threading.Event()
            threading.Thread(target=self._guarded, args=(handler, request), daemon=True).start()

    def _guarded(self, handler: Callable[[dict[str, Any]], None], request: dict[str, Any]) -> None:
        try:
            handler(request)
        except ValueError as exc:
            # The engine refused the request's fields before any work (its
            # std::invalid_argument, a 400 over its HTTP API): a JSON schema it cannot
            # compile, say. The caller's mistake, never a provider failure.
            self.channel.send({"id": request["id"], "error": str(exc), "code": "bad_request"})
        except Exception as exc:  # one request failing must not end the worker
            self.channel.send(
                {"id": request["id"], "error": f"{type(exc).__name__}: {exc}", "code": "internal"}
            )
        finally:
            with self._lock:
                self._cancels.pop(request["id"], None)

    # generation ----------------------------------------------------------

    def _complete(self, request: dict[str, Any]) -> None:
        prompt: str | list[int] = request["prompt"]
        if pieces := request.get("pieces"):
            prompt = self._pieces_tokens(pieces)
        body = {"prompt": prompt, **_sampling(request)}
        self._generate(request, request["prompt"], body, self.server.handle_completions)

    def _chat(self, request: dict[str, Any]) -> None:
        messages = request["messages"]
        text = "\n".join(str(m.get("content", "")) for m in messages)
        if request.get("as_text") and (pieces := self._chat_pieces(messages)) is not None:
            body = {"prompt": self._pieces_tokens(pieces), **_sampling(request)}
            self._generate(request, text, body, self.server.handle_completions, chat=True)
            return
        body = {"messages": messages, **_sampling(request)}
        if request.get("response_format") is not None:
            body["response_format"] = request["response_format"]
        self._generate(request, text, body, self.server.handle_chat_completions, chat=True)

    def _chat_pieces(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]] | None:
        """The templated chat in pieces, the template's own text apart from each message's
        (:meth:`_pieces_tokens`): the template applied to stand-ins, which are then found
        in order; None where the template does not keep one whole (then the engine
        templates the chat itself)."""
        stand_ins = [f"\ue000keel-{at}\ue001" for at in range(len(messages))]
        shown = [
            {**m, "content": stand_in} for m, stand_in in zip(messages, stand_ins, strict=True)
        ]
        prompt = self._engine_call("POST", "/apply-template", {"messages": shown})["prompt"]
        pieces: list[tuple[str, bool]] = []
        at = 0
        for message, stand_in in zip(messages, stand_ins, strict=True):
            found = prompt.find(stand_in, at)
            if found < 0:
                return None
            pieces += [(prompt[at:found], True), (str(message.get("content", "")), False)]
            at = found + len(stand_in)
        return [*pieces, (prompt[at:], True)]

    def _pieces_tokens(self, pieces: list[tuple[str, bool]] | list[list[Any]]) -> list[int]:
        """A prompt's tokens, from its pieces in order: each read with the model's control
        tokens where it is the template's own text, as plain text where not. An empty
        piece (but the first, which brings the BOS token) costs no call."""
        return [
            token
            for at, (text, own) in enumerate(pieces)
            if text or at == 0
            for token in self._tokens(text, special=at == 0, parse_special=bool(own))
        ]

    def _generate(
        self,
        request: dict[str, Any],
        text: str,
        body: dict[str, Any],
        run: Any,
        *,
        chat: bool = False,
    ) -> None:
        """Run one generation in a slot, streaming its pieces.

        A prompt with more than two batches left to read after the slot's reuse is read
        in batch-sized engine calls (see ``_read_ahead``), then the request runs again
        from there, so that a cancel during the read waits for one batch, not two."""
        request_id = request["id"]
        cancelled = self._cancels[request_id]
        started = time.perf_counter()
        # Told when it waits for a slot and when it has one: the wait is the engine's
        # load, not its slowness, and keel starts the first token's time limit after it
        # (waiting behind long answers, requests failed on it as the engine's fault)
        queued = functools.partial(self.channel.send, {"id": request_id, "queued": True})
        slot, held, waited = self.slots.acquire(
            text, cancelled, chat=chat, caller=request.get("caller"), on_wait=queued
        )
        if waited:
            self.channel.send({"id": request_id, "queued": False})
        state: dict[str, Any] = {
            "produced": 0,
            "first": None,
            "progress": None,
            "held": held,
            "waited": waited,
        }
        stops = _StopWatch(list(request.get("stop") or []))
        unsent: list[str] = []  # tokens held back for the next piece
        sent = 0.0  # when the last piece went
        if slot is None:
            self._done(request_id, "cancelled", started, state)
            return
        body["id_slot"] = slot
        self._wanted[slot] = cancelled
        try:

            def on_chunk(chunk: dict[str, Any]) -> bool:
                nonlocal sent
                if "error" in chunk:
                    state["error"] = chunk["error"]
                    return True
                progress = chunk.get("prompt_progress")
                if progress is not None:  # the time reading took, for an end with no timings
                    now = time.perf_counter()
                    state["read_ms"] = (now - state.setdefault("reading", now)) * 1000
                if progress is not None and state["progress"] is None:
                    # The first report: the engine chose what to reuse and is about to read.
                    state["progress"] = progress
                    if (error := self._no_room(request, progress["total"])) is not None:
                        state["error"] = error
                        return True
                    if progress["total"] - progress["cache"] > 2 * self.batch:
                        state["read_ahead"] = True
                        return True  # the engine reads its batch in flight, then stops
                choices = chunk.get("choices") or [{}]
                piece = choices[0].get("text")  # a completion's; a chat's is a delta
                if piece is None:
                    piece = (choices[0].get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    state["first"] = state["first"] or now
                    made = (chunk.get("timings") or {}).get("predicted_n")
                    state["produced"] = int(made) if made else state["produced"] + 1
                    unsent.append(stops.take(piece))
                    if stops.found:
                        state["reason"] = "stop"
                        return True
                    if now - sent >= PIECE_HOLD and (text := "".join(unsent)):
                        self.channel.send(_piece(request_id, text, state, sent))
                        unsent.clear()
                        sent = now
                state["reason"] = choices[0].get("finish_reason") or state.get("reason")
                if "timings" in chunk or "usage" in chunk:
                    state["end"] = chunk
                return cancelled.is_set()

            run(body, on_chunk)
            if state.pop("read_ahead", False) and not cancelled.is_set():
                self._read_ahead(body, state["progress"], cancelled)
                if not cancelled.is_set():
                    run(body, on_chunk)  # the last batch, then the generation
        finally:
            del self._wanted[slot]
            self.slots.release(slot)
        if text := "".join(unsent) + stops.held:  # the held text's tokens went out before
            self.channel.send(_piece(request_id, text, state, sent))
        if "error" in state:
            reply = _error_reply(state["error"])
            if "response_format" in body and any(w in reply["error"] for w in SCHEMA_WORDS):
                # The grammar is the caller's schema's: the engine failing to follow it,
                # or to read back what it wrote to it, says nothing of the engine's health
                # (it opened the shared worker's breaker, every completion a 503 for 60 s,
                # after six such requests).
                reply["code"] = "bad_request"
                reply["error"] = f"the response schema's grammar failed: {reply['error']}"
            self.channel.send({"id": request_id, **reply})
            return
        reason = "cancelled" if cancelled.is_set() else (state.get("reason") or "stop")
        self._done(request_id, reason, started, state)

    def _no_room(self, request: dict[str, Any], prompt: int) -> dict[str, Any] | None:
        """The engine's error for a limit that must fit (``limit_must_fit``) and does not
        fit the slot's context after the prompt's ``prompt`` tokens; the engine itself
        ends such an answer where the context does."""
        limit = int(request.get("max_tokens") or 0)
        if not request.get("limit_must_fit") or limit <= 0 or prompt + limit <= self.context:
            return None
        return {
            "type": "exceed_context_size_error",
            "message": f"{prompt} prompt tokens and max_tokens {limit} are over the context"
            f" of {self.context} tokens",
            "n_prompt_tokens": prompt,
            "n_ctx": self.context,
        }

    def _read_ahead(
        self, body: dict[str, Any], progress: dict[str, Any], cancelled: threading.Event
    ) -> None:
        """Read the prompt of ``body`` up to its last batch, one batch per engine call.

        Within one call the engine takes a cancel only after the batch in flight and the
        next: the cancel can be posted only when a batch reports back, and by then the
        engine has begun the next one. Between calls nothing is in flight, so a cancel
        waits for one batch. Measured on 2 cores: the same read speed as one call."""
        slot = body["id_slot"]
        try:
            tokens = self._prompt_tokens(body)
        except (OSError, RuntimeError, KeyError, ValueError):
            return  # the request reads the rest itself
        if len(tokens) != progress["total"]:
            return  # not the tokens the engine has: it would read them again
        # The stopped call reads one batch before it stops. The first call below asks
        # for just that batch: the engine takes tasks in order, so it runs after the
        # batch, re-reads one token and returns, a wait without polling (watching the
        # slot table every 3 ms cost the engine ~45 ms of a 3-batch read's 700).
        # Asked for the next batch instead, it would read it out of a cancel's reach.
        start = progress["cache"] + self.batch
        for end in range(start, len(tokens), self.batch):
            if cancelled.is_set():
                return
            part = {"prompt": tokens[:end], "max_tokens": 1, "cache_prompt": True}
            self.server.handle_completions({**part, "id_slot": slot}, _ignore)

    def _prompt_tokens(self, body: dict[str, Any]) -> list[int]:
        """The tokens the engine makes of the request's prompt (a chat's, templated)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            return prompt
        if prompt is None:
            template = {"messages": body["messages"]}
            prompt = self._engine_call("POST", "/apply-template", template)["prompt"]
        return self._tokens(prompt, special=True)

    def _tokens(self, text: str, *, special: bool, parse_special: bool = True) -> list[int]:
        """``text``'s tokens; ``special``: with the BOS token a prompt starts with;
        ``parse_special``: a control token's text read as the token (else as text)."""
        body = {"content": text, "add_special": special, "parse_special": parse_special}
        return list(self._engine_call("POST", "/tokenize", body)["tokens"])

    def _done(
        self,
        request_id: int,
        reason: str,
        started: float,
        state: dict[str, Any],
    ) -> None:
        """The done message, from what ``_generate`` gathered: ``first`` (when the first
        piece came), ``produced``, ``end`` (the engine's last chunk, which a request
        cancelled or ended at a stop word here has not), ``progress`` (its first report),
        ``read_ms`` (from its first report to its last), ``held`` and ``waited`` (from
        the slot pool)."""
        ended = time.perf_counter()
        end, progress, first = state.get("end") or {}, state.get("progress"), state.get("first")
        timings = end.get("timings") or {}
        usage = end.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        if prompt_tokens is None and timings:
            prompt_tokens = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
        if prompt_tokens is None and progress:  # cancelled: the engine sent no last chunk
            prompt_tokens = progress["total"]
        # What the slot held of the prompt at the start (the last call of a prompt read
        # ahead reuses what the calls before it read).
        reused = progress["cache"] if progress else timings.get("cache_n")
        self.channel.send(
            {
                "id": request_id,
                "done": True,
                "finish_reason": reason,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": int(timings.get("predicted_n") or state.get("produced", 0)),
                "reused_tokens": reused,
                "prompt_ms": timings.get("prompt_ms", state.get("read_ms")),
                "slot_wait_ms": round(state["waited"] * 1000, 2),
                "slot_held": state.get("held", False),
                "first_token_ms": round(((first or ended) - started) * 1000, 2),
                "total_ms": round((ended - started) * 1000, 2),
            }
        )

    # one-reply ops -------------------------------------------------------

    def _embed(self, request: dict[str, Any]) -> None:
        """The inputs one engine call each (the engine's one embedding slot reads them one
        at a time either way: 64 short inputs took 3.9 s in one call or in 64): a cancel
        stops the batch after the input in flight. A part whose caller gave up at its
        deadline ran on whole, beside the copy the router tried again on this worker."""
        cancelled = self._cancels[request["id"]]
        inputs, truncated = self._embedding_inputs(request["texts"])
        vectors: list[list[float]] = []
        with self._lock:
            self._embedding += 1
        try:
            for text in inputs:
                if cancelled.is_set():
                    self.channel.send(
                        {"id": request["id"], "error": "cancelled", "code": "cancelled"}
                    )
                    return
                result = self.server.handle_embeddings({"input": [text]})
                if "error" in result:
                    self.channel.send({"id": request["id"], **_error_reply(result["error"])})
                    return
                vectors.append(result["data"][0]["embedding"])
        finally:
            with self._lock:
                self._embedding -= 1
        self.channel.send({"id": request["id"], "embeddings": vectors, "truncated": truncated})

    def _embedding_inputs(self, texts: list[str]) -> tuple[list[str | list[int]], list[int]]:
        """What the engine reads for each text: the text, or the first context's worth
        of its tokens where it is longer (``truncated``: their indexes)."""
        inputs: list[str | list[int]] = []
        truncated = []
        for index, text in enumerate(texts):
            # A token holds at least one character: only a text this long can be over.
            tokens = self._tokens(text, special=True) if len(text) >= self.context - 2 else []
            if len(tokens) > self.context:
                inputs.append(tokens[: self.context])
                truncated.append(index)
            else:
                inputs.append(text)
        return inputs, truncated

    def _tokenize(self, request: dict[str, Any]) -> None:
        counts = [len(self._tokens(text, special=False)) for text in request["texts"]]
        self.channel.send({"id": request["id"], "counts": counts})

    def _slot_table(self, request: dict[str, Any]) -> None:
        """The engine's slot table, by slot id: ``busy``, the ``tokens`` it holds, and
        ``stray``: busy with no live request on it (ended or cancelled, the engine not yet
        at the end of its step)."""
        table = sorted(self._engine_call("GET", "/slots", None), key=lambda slot: slot["id"])
        slots = []
        for slot in table:
            busy, wanted = bool(slot["is_processing"]), self._wanted.get(slot["id"])
            live = self._embedding > 0 or (wanted is not None and not wanted.is_set())
            tokens = slot.get("n_prompt_tokens", 0)
            slots.append(
                {"id": slot["id"], "busy": busy, "tokens": tokens, "stray": busy and not live}
            )
        self.channel.send({"id": request["id"], "slots": slots})

    def _engine_call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        """A call to the engine's own loopback listener (answered off the task queue) on
        a kept-alive connection (a new connection per call took 0.2-0.5 ms more for a
        keystroke's tokenize), kept for :data:`KEEP_ALIVE_IDLE` unused. One the listener
        closed (5 s idle, 100 calls) is replaced."""
        payload = jsoncodec.dumps(body) if body is not None else None
        with self._lock:
            kept = self._connections.pop()[0] if self._connections else None
        for connection in [kept] if kept else []:
            try:
                data, status = connection.exchange(method, path, payload)
                break
            except ConnectionError:  # closed by the listener meanwhile: not answered
                connection.close()
        else:
            connection = _Connection(self._address, self._head)
            data, status = connection.exchange(method, path, payload)
        if connection.reusable:
            with self._lock:
                self._connections.append((connection, time.monotonic()))
                if self._closer is None:
                    self._close_idle_in(KEEP_ALIVE_IDLE)
        else:
            connection.close()
        if status != 200:
            raise RuntimeError(f"engine {path} answered {status}: {data.decode(errors='replace')}")
        return jsoncodec.loads(data)

    def _close_idle_in(self, seconds: float) -> None:
        self._closer = threading.Timer(seconds, self._close_idle)
        self._closer.daemon = True
        self._closer.start()

    def _close_idle(self) -> None:
        """Close the kept connections unused for ``KEEP_ALIVE_IDLE`` (the oldest first
        in the list), and come back for the others when theirs is up."""
        idle = []
        with self._lock:
            now = time.monotonic()
            while self._connections and now - self._connections[0][1] >= KEEP_ALIVE_IDLE:
                idle.append(self._connections.pop(0)[0])
            self._closer = None
            if self._connections:
                self._close_idle_in(KEEP_ALIVE_IDLE - (now - self._connections[0][1]))
        for connection in idle:
            connection.close()


class _Connection:
    """An HTTP/1.1 connection to the engine's loopback listener. What the worker asks it
    (token counts, the slot table, a chat template applied) takes no more of HTTP than a
    request with a JSON body and an answer with a ``Content-Length``. ``http.client``,
    used before, cost each worker's start ~12 ms of CPU to import (the email package it
    reads headers with, and ssl), and each call ~0.2 ms more."""

    def __init__(self, address: tuple[str, int], head: bytes) -> None:
        self._socket = socket.create_connection(address, timeout=30)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head = head
        """The headers every request carries (host, key, content type), each line ended."""
        self.reusable = True
        """False once the listener said it closes the connection (after 100 requests)."""

    def exchange(self, method: str, path: str, payload: bytes | None) -> tuple[bytes, int]:
        """The answer's body and status. A ConnectionError where the listener closed the
        connection before answering."""
        body = payload or b""
        request = b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
            method.encode(),
            path.encode(),
            self._head,
            len(body),
        )
        self._socket.sendall(request + body)
        received = b""
        while b"\r\n\r\n" not in received:
            received += self._receive()
        head, _, data = received.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if b"content-length" not in headers:  # never so for these answers (chunked is not)
            raise RuntimeError(f"engine {path} answered without a length: {head[:200]!r}")
        length = int(headers[b"content-length"])
        while len(data) < length:
            data += self._receive()
        self.reusable = headers.get(b"connection") != b"close"
        return data[:length], int(status_line.split()[1])

    def _receive(self) -> bytes:
        chunk = self._socket.recv(65536)
        if not chunk:
            raise ConnectionError("the engine's listener closed the connection")
        return chunk

    def close(self) -> None:
        self._socket.close()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="keel-worker", description=__doc__)
    parser.add_argument("--model", required=True, help="path to a GGUF file")
    parser.add_argument("--context-size", type=int, default=2048, help="tokens per slot")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--embedding", action="store_true", help="load for embeddings")
    parser.add_argument(
        "--mean-pooling", action="store_true", help="embed the tokens' mean (no pooling set)"
    )
    parser.add_argument(
        "--prompt-cache-mib", type=int, default=0, help="host memory for set-aside prompts"
    )
    parser.add_argument("--slots", type=int, default=1, help="requests decoded side by side")
    parser.add_argument(
        "--prefill-batch", type=int, default=PREFILL_BATCH, help="prompt tokens per engine batch"
    )
    return parser.parse_args(argv)


def _engine_params(xllamacpp: Any, args: argparse.Namespace, key: str) -> Any:
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    slots = max(1, args.slots)
    params.n_parallel = slots
    params.n_ctx = args.context_size * slots  # the engine splits n_ctx among its slots
    # An embedding is read in one batch (pooling needs the whole input at once): a
    # prefill-sized batch would refuse every input over 64 tokens.
    batch = args.context_size if args.embedding else args.prefill_batch
    params.n_batch = params.n_ubatch = batch
    params.n_cache_reuse = CACHE_REUSE
    params.cache_ram_mib = args.prompt_cache_mib
    params.n_gpu_layers = args.gpu_layers
    # llama.cpp's fitting of unset sizes to device memory measures the model with a
    # trial load, then stops because the GPU layers are set above: ~0.2 s of CPU a
    # start for nothing (common/fit.cpp: "n_gpu_layers already set by user").
    params.fit_params = False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = _threads(args)
    # No busy-waiting between ops: keel runs several engines (completion, embedding,
    # a swap's new model) on the same cores, and spinning threads of one starve the
    # other. Measured, two engines reading prompts at once on 2 cores: 22.7 s with
    # polling off, 56.4 s at llama.cpp's default (50); one engine alone: the same.
    params.cpuparams.poll = params.cpuparams_batch.poll = 0
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # any free port: the listener is this process's own
    params.api_keys = [key]
    params.endpoint_slots = True
    params.verbosity = 0  # errors only: keel logs what matters per request
    if args.embedding:
        params.embedding = True
    if args.mean_pooling:
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    return params


THREADS_VARIABLE = "LLAMA_ARG_THREADS"
"""llama-server's environment variable for ``--threads``, read where no ``threads`` is
configured: a whole number above 0 (anything else leaves keel's default, and ``keel serve``
and ``keel config check`` warn of it: :func:`threads_variable_trouble`)."""


def _threads_variable(environ: Mapping[str, str]) -> tuple[str | None, int | None]:
    """``LLAMA_ARG_THREADS`` as set (None: unset or blank), and its threads where usable."""
    text = environ.get(THREADS_VARIABLE, "").strip()
    if not text:
        return None, None
    usable = text.isascii() and text.isdigit() and int(text) > 0
    return environ[THREADS_VARIABLE], int(text) if usable else None


def threads_variable_trouble(environ: Mapping[str, str]) -> str | None:
    """What is wrong with ``LLAMA_ARG_THREADS`` where it is set to what the worker
    ignores (``two``, ``0``), and what is used instead; None when unset or usable. The
    worker is a child process whose log nobody reads for this: keel says it."""
    value, threads = _threads_variable(environ)
    if value is None or threads is not None:
        return None
    return (
        f"{THREADS_VARIABLE}={value!r} is not a whole number of threads above 0, so it is "
        "ignored: a local model uses its [model.<role>.local] threads, else the physical "
        "cores keel may run on; set it to a number such as 4, or unset it"
    )


def threads_over_cores(threads: int | None, where: str) -> str | None:
    """What is wrong with ``threads`` set above the cores keel may run on (None: not)."""
    cores = usable_cores()
    if threads is None or threads <= cores:
        return None
    return (
        f"{where} = {threads} is more than the {cores} physical core(s) keel may run on: "
        "each engine step waits for threads that are not running (64 threads on 2 cores "
        f"answered 7-11x slower); leave it unset for {cores}, or set at most {cores}"
    )


def _threads(args: argparse.Namespace) -> int:
    """The configured threads, else ``LLAMA_ARG_THREADS``, else the physical cores this
    process may run on within its CPU quota: llama.cpp's own default counts every core of
    the machine, ignoring the CPU set of a container or of ``taskset`` and a quota
    (``docker --cpus``, a Kubernetes CPU limit); more threads than that stall each step on
    a thread that is not running."""
    if args.threads:
        return int(args.threads)
    _, threads = _threads_variable(os.environ)
    if threads is not None:
        return threads
    return usable_cores()


def usable_cores() -> int:
    """The physical cores this process may run on, within its CPU quota."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    quota = cpu_quota()
    return max(1, min(len(cores), quota) if quota is not None else len(cores))


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole CPUs the cgroup's quota allows (at least 1), or None without a quota."""
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:  # cgroup v1: -1 for no quota
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, int(quota) // int(period))
    except (ValueError, ZeroDivisionError):
        return None


def _damage(model: str) -> str | None:
    """What is wrong with the file, where its header tells (not a GGUF file, cut short)."""
    from keel.errors import MissingDependency
    from keel.models.gguf import read_metadata

    try:
        read_metadata(Path(model))
    except MissingDependency as exc:
        return exc.message
    except OSError as exc:
        return f"cannot read it: {exc}"
    return None


IDLE_GROUP_NICE = 19
"""The autogroup's nice of a worker in Linux's idle scheduling class (``chrt --idle``),
which an autogroup does not have: its lowest weight."""


def _keep_the_priority(embedding: bool) -> None:
    """Run at keel's own priority (an embedding engine :data:`EMBEDDING_NICE` lower), the
    session's autogroup too where Linux has one. A worker has a session of its own, hence
    an autogroup of its own under autogroup scheduling, and a nice counts only within
    its autogroup: a keel started with ``nice`` or ``chrt --idle`` had engines at full
    priority, each weighing as much as every other session on the machine."""
    nice = os.nice(EMBEDDING_NICE if embedding else 0)
    autogroup_nice(IDLE_GROUP_NICE if os.sched_getscheduler(0) == os.SCHED_IDLE else nice)


def autogroup_nice(nice: int) -> None:
    """Give this process's session's autogroup ``nice`` (a process with a session of its
    own has an autogroup of its own, which a new session starts at 0, and a nice counts
    only within its autogroup)."""
    if nice:
        with contextlib.suppress(OSError):  # no autogroups: the nice alone is enough
            Path("/proc/self/autogroup").write_text(str(nice))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # SIGHUP is keel's reload, which reaches a worker too when the whole service is
    # signalled (``systemctl kill -s HUP``): its default ended the worker, a crash.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = _Channel(os.fdopen(protocol_fd, "wb"))

    def unusable(reason: str, message: str) -> int:
        channel.send({"event": "status", "state": "error", "reason": reason, "message": message})
        return EXIT_UNUSABLE

    _keep_the_priority(args.embedding)  # before the engine starts its threads: they inherit it
    channel.send({"event": "status", "state": "loading", "pid": os.getpid()})
    try:
        import xllamacpp
    except Exception as exc:  # ImportError, OSError from a broken shared library
        return unusable("library", f"cannot load xllamacpp: {type(exc).__name__}: {exc}")
    if not os.path.isfile(args.model):
        return unusable("model_file", f"model file not found: {args.model}")
    key = secrets.token_urlsafe(24)
    try:
        params = _engine_params(xllamacpp, args, key)
        server = xllamacpp.Server(params)
    except Exception as exc:  # the engine's words are vague ("check the input params")
        why = _damage(args.model) or str(exc)
        return unusable("model_file", f"cannot load model {args.model}: {why}")
    slots = params.n_parallel  # as the engine was given them
    channel.send(
        {
            "event": "status",
            "state": "ready",
            "n_ctx": args.context_size,
            "slots": slots,
            "threads": params.cpuparams.n_threads,  # what the engine was given
            "prompt_cache_mib": params.cache_ram_mib,
            "nice": os.nice(0),
            "engine": f"xllamacpp {getattr(xllamacpp, '__version__', '?')}",
        }
    )
    engine = _Engine(
        server, server.listening_address, key, slots, args.prefill_batch, channel, args.context_size
    )
    engine.read_requests(sys.stdin)
    # End of stdin: the server is gone. Exit without running the engine's
    # destructor from an arbitrary thread; generations in flight die with us.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
