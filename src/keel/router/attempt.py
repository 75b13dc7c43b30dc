"""Attempts, as tenacity shapes them: the caller loops, each try records itself.

::

    async for attempt in router.attempts(streaming=False):
        async with attempt:
            call = build_call(attempt.provider, shrink=attempt.shrink)
            async for piece in attempt.pieces(attempt.provider.stream_completion(call)):
                ...

:meth:`Attempts.__anext__` picks the endpoint (usable ones in chain order,
then the merely unhealthy; an open breaker is skipped) and waits out a
retry's backoff. Leaving ``async with attempt`` records the outcome to the
endpoint's breaker and health and to the metrics, then either lets the error
through (the client's own mistake, a stream already sent, a cancellation) or
swallows it, and the loop goes on as the rules of :mod:`keel.router.policy`
decided. When no endpoint is left, ``__anext__`` raises the router's
"nobody could serve this" error; after a success it ends the loop.

``streaming``: pieces reach the client as they come, so once one was
produced the request belongs to that endpoint: a failure then ends it with
the error, and two providers' output is never spliced. A client that waits
for the whole answer has seen nothing yet, so a failure mid-way still falls
back. ``shrinkable``: the caller builds the prompt and can build a shorter
one when ``attempt.shrink`` is set; otherwise a prompt over the context is
the caller's 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from keel.errors import KeelError, Overloaded, RequestError, UpstreamStatusError, UpstreamTimeout
from keel.providers.base import SLOT_WAIT, UNSUPPORTED, Provider, piece_count
from keel.router.classify import Failure, classify, context_overflow, prompt_fits, without_name
from keel.router.policy import Decision, Failed, default_rules

if TYPE_CHECKING:
    from keel.router.router import Endpoint, RoleRouter

log = logging.getLogger("keel.router")

TRIAL: ContextVar[Attempts | None] = ContextVar("keel_trial", default=None)
"""This request's attempts (its latest router call's): the endpoint tried last and the
failures before it, for a failure that cuts across attempts, as the whole request's
time limit does, to name."""
DEADLINE: ContextVar[float | None] = ContextVar("keel_deadline", default=None)
"""When (the loop's clock) the whole request's time limit ends it, where it has one."""


class Underway:
    """What a streamed request is doing before its first piece, for its heartbeats
    (:mod:`keel.serving.streaming`): the attempt a provider has begun, None while it waits
    for an admission slot or between attempts. Only a request being worked on (and not
    waiting in its engine's queue) commits its 200 early: one waiting in keel's queue got
    a 200 and its 429 as an error event, Retry-After lost."""

    __slots__ = ("attempt",)

    def __init__(self) -> None:
        self.attempt: Attempt | None = None

    @property
    def working(self) -> bool:
        return self.attempt is not None and not self.attempt.queued

    @property
    def provider(self) -> str | None:
        return None if self.attempt is None else self.attempt.endpoint.name


UNDERWAY: ContextVar[Underway | None] = ContextVar("keel_underway", default=None)
"""The streamed request's :class:`Underway` (None for any other request)."""


def past_deadline() -> bool:
    """Whether the whole request's time limit has passed: a cancellation then is keel's."""
    deadline = DEADLINE.get()
    return deadline is not None and asyncio.get_running_loop().time() >= deadline


T = TypeVar("T")
P = TypeVar("P")


class Attempt:
    """One try on one endpoint; a context manager that records its own outcome."""

    def __init__(
        self, attempts: Attempts, endpoint: Endpoint, *, number: int, shrink: bool, delay: float
    ) -> None:
        self.endpoint = endpoint
        self.number = number
        self.shrink = shrink
        """Asked for a shorter prompt: the previous try here found it too long."""
        self.produced = 0
        """Pieces this attempt has handed out."""
        self.tokens = 0
        """The backend's pieces in them (several arrive joined, see :func:`joined`)."""
        self.first_piece_after: float | None = None
        self.queued = False
        """Waiting for one of its engine's slots (see :data:`SLOT_WAIT`)."""
        self.slot_waited = 0.0
        """Seconds it has waited for one of them, the wait under way included."""
        self._slot_since: float | None = None
        self._attempts = attempts
        self._watch: _Watchdog | None = None
        self._delay = delay
        self._started = 0.0
        self._deadline = 0.0
        self._gate_slot: contextlib.AbstractAsyncContextManager[None] | None = None

    @property
    def provider(self) -> Provider:
        return self.endpoint.provider

    async def __aenter__(self) -> Attempt:
        # Outstanding from the start: a reload closes a replaced provider once nothing is
        # outstanding on it, and a retry waiting out its backoff looked idle, then reopened
        # the closed provider's connection pool, which nothing closed.
        self.endpoint.outstanding += 1
        gate = self._attempts.router.gate(self.endpoint)
        try:
            if self._delay > 0:
                await self._attempts.router.sleep(self._delay)
            if gate is not None:  # waits its turn, or is the role's 429 (no one's failure)
                slot = gate.slot()
                await slot.__aenter__()
                self._gate_slot = slot
        except BaseException:  # cancelled or refused while waiting: __aexit__ will not run
            self.endpoint.outstanding -= 1
            # Nothing was tried: a half-open breaker's probe, if this held it, is free
            # again (it was lost for good, and the provider never tried again)
            self.endpoint.breaker.record_ignored()
            raise
        self._started = self._attempts.router.clock()
        if (underway := UNDERWAY.get()) is not None:  # worked on: heartbeats may commit
            underway.attempt = self
        now = asyncio.get_running_loop().time()
        self._deadline = now + self.endpoint.timeouts.first_token
        if self.endpoint.unanswered_since is None:
            self.endpoint.unanswered_since = now
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self.endpoint.outstanding -= 1
        if (underway := UNDERWAY.get()) is not None:
            underway.attempt = None  # the next attempt may wait for its turn first
        if self._gate_slot is not None:
            await self._gate_slot.__aexit__(None, None, None)
        return self._attempts.settle(self, exc, self._attempts.router.clock() - self._started)

    async def call(self, work: Awaitable[T]) -> T:
        """``work`` (a one-shot call, or the preparation of a stream) within the
        endpoint's first-token deadline."""
        try:
            async with asyncio.timeout_at(self._deadline):
                return await work
        except TimeoutError:
            raise self._first_token_timeout() from None

    async def pieces(self, stream: AsyncIterator[P]) -> AsyncIterator[P]:
        """``stream``'s pieces under the first-token and between-token timeouts; the
        stream is closed when this ends (which cancels the upstream work)."""
        between = self.endpoint.timeouts.between_tokens
        loop = asyncio.get_running_loop()
        watch = self._watch = _Watchdog(loop)
        SLOT_WAIT.set(self._slot_wait)
        async with aclosing(aiter(stream)) as iterator:  # type: ignore[type-var]
            try:
                while True:
                    first = self.produced == 0
                    watch.wait_until(self._deadline if first else loop.time() + between)
                    try:
                        piece = await anext(iterator)
                    except StopAsyncIteration:
                        return
                    except asyncio.CancelledError:
                        if not watch.expired():
                            raise
                        if first and self.queued:
                            raise self._busy() from None
                        if first:
                            raise self._first_token_timeout() from None
                        raise UpstreamTimeout(
                            f"stream stalled for {between:g}s", provider=self.endpoint.name
                        ) from None
                    watch.waited()
                    self.endpoint.unanswered_since = None
                    if first:
                        self.first_piece_after = self._attempts.router.clock() - self._started
                    self.produced += 1
                    self.tokens += piece_count(piece)
                    yield piece
            finally:
                watch.close()

    def _slot_wait(self, waiting: bool) -> None:
        """The engine says the request waits for a slot (True) or has one (False): the
        first token's time limit starts again once it has one. Counted from its arrival,
        a request queued behind long answers failed as the engine's fault (8 OpenAI
        completions of 1,200 tokens on the embedded model's 2 slots: 504s after 60 s,
        the engine's last_error, and its breaker a few more from open)."""
        self.queued = waiting
        now = self._attempts.router.clock()
        if waiting and self._slot_since is None:
            self._slot_since = now
        elif not waiting and self._slot_since is not None:
            self.slot_waited += now - self._slot_since
            self._slot_since = None
        if not waiting and self.produced == 0 and self._watch is not None:
            self._deadline = asyncio.get_running_loop().time() + self.endpoint.timeouts.first_token
            self._watch.wait_until(self._deadline)

    @property
    def held_by_load(self) -> bool:
        """Waiting for one of its engine's slots, or having waited for one half its time or
        more: a request deadline that ends it is its engine's load, not its failure. One
        user's three long prompts held the embedded model's slots; a colleague's completion
        got one with a second of its 30 left, ran out in the prompt, and was counted a
        timeout of the engine's: it was routed around, and /ready said unusable."""
        if self.queued:
            return True
        return self.slot_waited * 2 >= self._attempts.router.clock() - self._started > 0

    def _busy(self) -> Overloaded:
        return Overloaded(
            f"{self.endpoint.name}: every slot of its engine stayed busy for "
            f"{self.endpoint.timeouts.first_token:g}s; retry shortly",
            retry_after=1.0,
        )

    def _first_token_timeout(self) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"no first token within {self.endpoint.timeouts.first_token:g}s",
            provider=self.endpoint.name,
        )


class Attempts:
    """The attempts of one request; see the module docstring."""

    def __init__(
        self, router: RoleRouter, *, streaming: bool, shrinkable: bool, limit_name: str
    ) -> None:
        self.router = router
        self.streaming = streaming
        self.shrinkable = shrinkable
        self.limit_name = limit_name
        self.provider: Provider | None = None
        """The provider that served the request, once one did."""
        self.failures: list[str] = []
        """``name: message`` of every failed attempt, in order."""
        TRIAL.set(self)
        self.last_error: KeelError | None = None
        self.too_long: KeelError | None = None
        """The last refusal of the prompt as over an endpoint's context, if any."""
        self._candidates = router.candidates()
        self._position = -1
        self._current: Attempt | None = None
        self._decision = Decision.NEXT
        self._done = False
        router.budget.record_request()

    @property
    def trying(self) -> str | None:
        """The endpoint of the latest attempt, if one began."""
        return None if self._current is None else self._current.endpoint.name

    @property
    def held_by_load(self) -> bool:
        """The latest attempt waits, or waited most of its time, for one of its engine's
        slots (:attr:`Attempt.held_by_load`)."""
        return self._current is not None and self._current.held_by_load

    def __aiter__(self) -> Attempts:
        return self

    async def __anext__(self) -> Attempt:
        if self._done:
            raise StopAsyncIteration
        current, decision = self._current, self._decision
        if current is not None and decision is not Decision.NEXT:
            again = decision is Decision.AGAIN
            if again:
                current.endpoint.retries += 1
                self.router.events.retry(current.endpoint.name)
            elif decision is Decision.SHRINK:
                current.endpoint.prompts_shrunk += 1
                self.router.events.prompt_shrunk(current.endpoint.name)
            if current.endpoint.breaker.allow():
                return self._start(
                    current.endpoint,
                    number=current.number + again,
                    shrink=current.shrink or decision is Decision.SHRINK,
                    delay=self.router.retry.backoff(current.number) if again else 0.0,
                )
            self.failures.append(f"{current.endpoint.name}: breaker open")
        while self._position + 1 < len(self._candidates):
            self._position += 1
            endpoint = self._candidates[self._position]
            if endpoint.breaker.allow():
                return self._start(endpoint, number=1, shrink=False, delay=0.0)
            self.failures.append(f"{endpoint.name}: breaker open")
        raise self._exhausted()

    def _start(self, endpoint: Endpoint, *, number: int, shrink: bool, delay: float) -> Attempt:
        previous = self._current
        if previous is not None and previous.endpoint is not endpoint:
            role = self.router.role
            endpoint.fallbacks_to[role] = endpoint.fallbacks_to.get(role, 0) + 1
            self.router.events.fallback(self.router.role, previous.endpoint.name, endpoint.name)
        self._current = Attempt(self, endpoint, number=number, shrink=shrink, delay=delay)
        return self._current

    def _exhausted(self) -> KeelError:
        last = self.last_error
        if self.too_long is not None:
            # no window that answered fits it (the others were down): the caller's 400,
            # the one thing the caller can fix
            return context_overflow(self.too_long, self.router.role, self.limit_name)
        error = self.router.exhausted(self.failures, last)
        if error.provider is None and self._current is not None:
            error.provider = self._current.endpoint.name  # the one that failed last
        return error

    def settle(self, attempt: Attempt, error: BaseException | None, seconds: float) -> bool:
        """Record how ``attempt`` ended; True swallows ``error`` (the loop goes on). An
        attempt that ended before its end (cut, stalled, cancelled: a superseded
        completion) after pieces came has them and its first token counted, not its
        time: no whole generation's (its tokens and its time to first token were lost,
        and a superseded one counted as a whole generation)."""
        endpoint = attempt.endpoint
        if error is not None and attempt.produced:
            self.router.events.generation_cut(
                self.router.role, endpoint.name, attempt.first_piece_after, attempt.tokens
            )
        if isinstance(error, asyncio.CancelledError) and past_deadline() and attempt.held_by_load:
            # it had no slot, or one only late: its engine busy with others is load, not its
            # failure (a burst of 12 completions opened the embedded model's breaker)
            endpoint.breaker.record_ignored()
            self.router.events.rejected(self.router.role, "engine_busy")
            return False
        if isinstance(error, asyncio.CancelledError) and past_deadline():
            # keel's own limit on the whole request ended it on this provider. Given the
            # whole of it, the provider was too slow: its failure (counted a success once
            # it had sent tokens, every completion was a 504 and the breaker and health
            # never knew). Given what an earlier provider's failure left, it says nothing
            # (a healthy fallback's breaker opened for the primary's lost seconds).
            if self.failures:
                endpoint.breaker.record_ignored()
                return False
            timeout = UpstreamTimeout(
                "did not finish within the request's time limit", provider=endpoint.name
            )
            self.router.failed(endpoint, timeout, Failure.RETRYABLE, retry=attempt.number > 1)
            return False
        if error is None or (not isinstance(error, KeelError) and attempt.produced):
            # Done, or the client stopped reading after tokens flowed: a success either way.
            self._done = True
            self.provider = endpoint.provider
            self.router.succeeded(endpoint, attempt.first_piece_after or seconds)
            if error is None:
                self.router.events.observe_generation(
                    self.router.role,
                    endpoint.name,
                    seconds,
                    attempt.first_piece_after,
                    attempt.tokens,
                )
            self.router.served_by(endpoint)
            return False
        if isinstance(error, RequestError) and self._cannot_serve(endpoint, error):
            return self._passed_over(endpoint, error)
        if not isinstance(error, KeelError) or isinstance(error, RequestError):
            # Cancelled, or keel's own check of the request: says nothing about the provider.
            endpoint.breaker.record_ignored()
            return False
        if isinstance(error, Overloaded):  # its engine busy with others: load, no failure
            self.router.events.rejected(self.router.role, "engine_busy")
            self.last_error = error
            return self._passed_over(endpoint, error)
        return self._failed(attempt, error)

    def _cannot_serve(self, endpoint: Endpoint, error: RequestError) -> bool:
        """Whether ``endpoint``, a fallback, refused what was asked as more than it can
        serve (a local model and web search): the answer is why the providers before it
        did not serve, which a retry may get past (its 400 hid the primary's 500)."""
        return error.code == UNSUPPORTED and endpoint not in self.router.groups[0]

    def _passed_over(self, endpoint: Endpoint, error: KeelError) -> bool:
        """``endpoint`` did not serve, through no failure of its own: the next one is tried,
        and what it said is among the failures a request no one served names."""
        endpoint.breaker.record_ignored()
        self.failures.append(f"{endpoint.name}: {without_name(error.message, endpoint.name)}")
        self._decision = Decision.NEXT
        return True

    def _failed(self, attempt: Attempt, error: KeelError) -> bool:
        endpoint, kind = attempt.endpoint, classify(error)
        if kind is Failure.CLIENT and self.shrinkable:
            # keel wrote this request (prompt, suffix, stop words, sampling): a backend
            # refusing it is its configuration's fault, which no editor can mend. It was
            # the editor's 400, the fallback idle and the backend healthy for good.
            error, kind = refused_as_built(error, endpoint.name), Failure.RETRYABLE
        # keel built the prompt and chose the tokens to generate, and the backend's
        # numbers say the prompt fits: a shorter one cannot help (it was halved, then the
        # backend was told to lower max_input_length, which changed nothing)
        answer_too_long = kind is Failure.TOO_LONG and self.shrinkable and prompt_fits(error)
        if kind is Failure.TOO_LONG and (attempt.shrink or answer_too_long):
            # keel built this prompt, and at half its budget it still does not fit (or
            # its answer does not): the backend's window is smaller than keel's
            # configured budgets, which no client can mend. It was every completion's
            # 400, no provider's failure, no alert.
            error = window_too_small(error, endpoint.name, answer=answer_too_long)
            self.router.failed(endpoint, error, Failure.RETRYABLE, retry=attempt.number > 1)
            self.too_long = None
        else:
            self.router.failed(endpoint, error, kind, retry=attempt.number > 1)
            if kind is Failure.TOO_LONG:
                self.too_long = error
        self.last_error = error
        self.failures.append(f"{endpoint.name}: {without_name(error.message, endpoint.name)}")
        log.info("%s: %s failed (%s): %s", self.router.role, endpoint.name, kind, error.message)
        if self.streaming and attempt.produced:
            return False  # the client has this endpoint's tokens: never splice another's
        rules = default_rules(self.router.retry, self.router.budget, shrinkable=self.shrinkable)
        self._decision = rules.decide(
            Failed(
                failure=kind,
                number=attempt.number,
                shrunk=attempt.shrink or answer_too_long,
                last_resort=self._position >= len(self._candidates) - 1,
                breaker_available=endpoint.may_retry,
            )
        )
        if self._decision is Decision.GIVE_UP:
            refusal: KeelError = (
                context_overflow(error, self.router.role, self.limit_name)
                if kind is Failure.TOO_LONG
                else client_error(error)
            )
            # the backend that refused it, in X-Keel-Provider and the request's metrics,
            # as a failure's (it was counted under provider "")
            refusal.provider = endpoint.name
            raise refusal
        return True


def window_too_small(error: KeelError, name: str, *, answer: bool) -> UpstreamStatusError:
    """The backend's refusal of a prompt keel built and halved, or of the tokens keel
    asked it to generate after a prompt that fits (``answer``), as its configuration's
    fault, saying what to change."""
    said = without_name(error.message, name)
    if answer:
        what = f"holds the prompt keel built but not the tokens keel asks for ({said}): "
        change = "lower [completion] max_decoding_tokens"
    else:
        what = f"is smaller than the prompt keel builds, even at half the budget ({said}): "
        change = "lower [completion] max_input_length"
    return UpstreamStatusError(
        f"its context {what}{change}, or serve the model with a larger context",
        provider=name,
        upstream_status=getattr(error, "upstream_status", None),
    )


def refused_as_built(error: KeelError, name: str) -> UpstreamStatusError:
    """A backend's 4xx about a request keel built, as the backend's failure, saying
    what to check."""
    said = without_name(error.message, name)
    return UpstreamStatusError(
        f"refused the request keel built for it ({said}): the backend does not take what "
        "its kind sends; check the provider's kind and model_name against the server",
        provider=name,
        upstream_status=getattr(error, "upstream_status", None),
    )


def client_error(error: KeelError) -> RequestError:
    """A backend's 4xx about the request, for the caller, with the backend's status."""
    status = getattr(error, "upstream_status", None) or 400
    param = getattr(error, "details", {}).get("param")  # the field the backend named
    client = RequestError(
        error.message,
        code="upstream_rejected_request",
        param=param if isinstance(param, str) and len(param) <= 200 else None,
    )
    client.status_code = status
    return client


class _Watchdog:
    """One timer for all the waits of a stream, where ``asyncio.timeout`` per piece
    made and cancelled a timer for every token.

    A wait states when it must end (``wait_until``) and that it ended (``waited``).
    The timer fires at the earliest due time it was armed for; if a wait is then
    in progress and past its due time, the task is cancelled (and ``expired``
    turns that cancellation into the timeout), otherwise it re-arms for the wait
    in progress. Only a wait can expire: time the consumer spends elsewhere, such
    as writing to a slow client, never counts. The task cancelled is the one
    waiting: a stream's first piece is awaited by the request's handler, the rest
    by the task that writes the response.
    """

    __slots__ = ("_loop", "_task", "_cancelling", "_due", "_handle", "_armed_for", "_fired")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._due: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._fired = False

    def wait_until(self, due: float) -> None:
        task = self._task = asyncio.current_task()
        self._cancelling = task.cancelling() if task is not None else 0
        self._due = due
        if self._handle is None or due < self._armed_for:
            self._arm(due)

    def waited(self) -> None:
        self._due = None
        if self._fired:  # fired as the wait ended: the piece is kept, the cancel taken back
            self.expired()

    def expired(self) -> bool:
        """Whether the cancellation in flight is this timer's (and no one else's)."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        self._disarm()
        if self._fired:  # a cancel of ours the stream turned into another error
            self.expired()

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        self._disarm()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._handle = None
        due = self._due
        if due is None:  # between waits: the next wait arms the timer again
            return
        if due > self._armed_for:
            self._arm(due)
        elif self._task is not None:
            self._fired = True
            self._task.cancel()
