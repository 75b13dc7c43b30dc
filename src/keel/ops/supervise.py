"""``keel serve --supervise``: restart a crashed server, but never loop forever.

For hosts without systemd. The server runs as a child process; when it
crashes the supervisor starts it again after an exponential backoff, and
gives up for good once ``start_limit`` starts fall within ``start_window``
seconds (systemd's StartLimitBurst / StartLimitIntervalSec), exiting
non-zero with a message that says why (:class:`keel.restart.RestartPolicy`,
the worker supervisor's policy too). Exit codes that no restart can fix
(:data:`keel.errors.NO_RESTART`: 78 config, 69 dependency or model, 75 port
busy) end supervision at once with the child's code. A clean exit (0) is a
stop, not a crash.

SIGTERM and SIGINT are forwarded to the child once, and the supervisor waits
for it to drain and exit. The child runs in its own session so a terminal's
Ctrl-C reaches it only through the supervisor (one signal, not two: a second
one ends keel's drain at once), and it gets SIGTERM if the
supervisor dies. The number of restarts so far is passed to the child in
``KEEL_SUPERVISOR_RESTARTS`` and exported as ``keel_supervisor_restarts``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType

from keel.errors import NO_RESTART, ExitCode
from keel.restart import RestartPolicy

log = logging.getLogger("keel.supervisor")

RESTARTS_ENV = "KEEL_SUPERVISOR_RESTARTS"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux; best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(
        self,
        command: Sequence[str],
        policy: RestartPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command = list(command)
        self.policy = policy
        self._clock = clock
        self._child: subprocess.Popen[bytes] | None = None
        self._stop_signal: int | None = None
        self.restarts = 0

    def _say(self, message: str, level: int = logging.INFO) -> None:
        """In the log's format, as keel's own lines (``--log-format json``: plain text
        among the objects broke a collector's parsing)."""
        log.log(level, message)

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
            self._say(f"{signal.Signals(signum).name}: stopping keel")
            child = self._child
            if child is not None and child.poll() is None:
                child.send_signal(signum)

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when asked to stop."""
        deadline = self._clock() + seconds
        while self._stop_signal is None and self._clock() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - self._clock())))

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, RESTARTS_ENV: str(self.restarts)}
        return subprocess.Popen(
            self.command, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )

    def _on_hangup(self, signum: int, _: FrameType | None) -> None:
        """SIGHUP is keel's reload: passed on. Left to its default, it ended the
        supervisor, and the child with it, for good."""
        child = self._child
        if child is not None and child.poll() is None:
            self._say("SIGHUP: passed on to keel (config reload)")
            child.send_signal(signum)

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        policy = self.policy
        starts: deque[float] = deque()
        failures = 0
        while True:
            started = self._clock()
            starts.append(started)
            self._child = self._start()
            self._say(f"started keel, pid {self._child.pid} (restarts so far: {self.restarts})")
            code = self._wait()
            self._child = None
            if self._stop_signal is not None:
                # uvicorn drains, then re-raises the signal it caught: dying by the very
                # signal we forwarded is a clean stop, as is Ctrl-C's 130 (128 + SIGINT)
                clean = code in (0, -self._stop_signal, 128 + self._stop_signal)
                self._say(f"keel stopped ({'cleanly' if clean else _describe(code)})")
                return 0 if clean else (code if code > 0 else 128 - code)
            if code == ExitCode.OK:
                self._say("keel exited cleanly; not restarting")
                return ExitCode.OK
            if code in NO_RESTART:
                self._say(
                    f"keel exited with {code} ({NO_RESTART[code]}); a restart cannot fix that, "
                    "not restarting",
                    logging.ERROR,
                )
                return code
            now = self._clock()
            if policy.exhausted(starts, now):
                self._say(
                    f"keel crashed ({_describe(code)}), {len(starts)} starts within "
                    f"{policy.start_window:.0f}s; giving up (limit: {policy.start_limit} starts "
                    f"per {policy.start_window:.0f}s). Fix the cause shown above, then start "
                    "keel again.",
                    logging.ERROR,
                )
                return ExitCode.FAILURE
            failures = 1 if now - started > policy.start_window else failures + 1
            delay = policy.backoff(failures)
            self.restarts += 1
            self._say(
                f"keel crashed ({_describe(code)}); restart {self.restarts} in {delay:.1f}s",
                logging.WARNING,
            )
            self._sleep(delay)
            if self._stop_signal is not None:
                self._say("stopped while waiting to restart")
                return 128 + self._stop_signal

    def _wait(self) -> int:
        child = self._child
        assert child is not None
        while True:
            try:
                return child.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue


def child_command(serve_argv: Sequence[str]) -> list[str]:
    """The ``keel serve`` command line the supervisor runs."""
    return [sys.executable, "-m", "keel", "serve", *serve_argv]


SUPERVISOR_OPTIONS = frozenset({"supervise", "start_limit", "start_window", "restart_backoff"})


def forwarded_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The options of ``args`` that ``parser`` defines, as a command line again, minus
    the supervisor's own: so the child gets every serve option, present and future."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in SUPERVISOR_OPTIONS | {"help"}:
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def supervise(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``keel serve --supervise``: run ``keel serve`` with the same options as a child."""
    policy = RestartPolicy(
        start_limit=args.start_limit,
        start_window=args.start_window,
        backoff_initial=args.restart_backoff,
    )
    return Supervisor(child_command(forwarded_argv(parser, args)), policy).run()
