"""Progress of ``keel index`` on stderr: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import time
from typing import TextIO

BAR_WIDTH = 30


class ProgressBar:
    """A callable for :data:`keel.index.store.Progress`.

    On a TTY one line is redrawn in place (at most ten times a second); in a
    log or a pipe a plain line is written at each tenth of the work, so CI
    output stays short and readable.
    """

    def __init__(self, label: str, stream: TextIO, *, tty: bool | None = None) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._last_draw = 0.0
        self._last_tenth = -1
        self._drawn = False

    def __call__(self, done: int, total: int, relpath: str) -> None:
        if total <= 0:
            return
        if self.tty:
            now = time.monotonic()
            if done < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            filled = BAR_WIDTH * done // total
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            name = relpath if len(relpath) <= 40 else "..." + relpath[-37:]
            self.stream.write(f"\r\x1b[K{self.label} [{bar}] {done}/{total} {name}")
            self._drawn = True
        else:
            tenth = 10 * done // total
            if tenth == self._last_tenth:
                return
            self._last_tenth = tenth
            self.stream.write(f"{self.label}: {done}/{total} files ({100 * done // total}%)\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
