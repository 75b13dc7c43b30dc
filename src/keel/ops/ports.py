"""Who holds a TCP port: best effort from ``/proc``, for loud busy-port errors.

``/proc/net/tcp{,6}`` maps listening sockets to inodes; ``/proc/<pid>/fd``
maps inodes to processes. Processes of other users are invisible without
privileges; then the answer is None and the message suggests ``ss -ltnp``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"


@dataclass(frozen=True, slots=True)
class PortHolder:
    pid: int
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command})"


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes: set[str] = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port:
                inodes.add(fields[9])
    return inodes


def _command(pid_dir: Path) -> str:
    try:
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:
        return "?"
    parts = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    return " ".join(parts)[:200] or "?"


def port_holder(port: int, proc: Path = Path("/proc")) -> PortHolder | None:
    """The process listening on ``port`` (TCP, any address), if it can be seen."""
    inodes = _listening_inodes(port, proc)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    me = os.getpid()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
            continue
        with contextlib.suppress(OSError):
            for fd in (pid_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        return PortHolder(int(pid_dir.name), _command(pid_dir))
    return None


def busy_port_message(host: str, port: int) -> str:
    """Say the port is taken, by whom when that can be seen, and how to go on."""
    holder = port_holder(port)
    who = f" by {holder.describe()}" if holder else ""
    return (
        f"port {port} on {host} is already in use{who}; stop it "
        f"(`ss -ltnp 'sport = :{port}'` shows the holder) or set [server] port / --port; "
        "keel never moves to another port"
    )
