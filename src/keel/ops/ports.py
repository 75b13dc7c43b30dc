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

LISTENING, ESTABLISHED = "0A", "01"
"""``/proc/net/tcp``'s codes for a listening and an established socket."""


@dataclass(frozen=True, slots=True)
class PortHolder:
    pid: int
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command})"


def tcp_inodes(state: str, port: int | None = None, proc: Path = Path("/proc")) -> set[str]:
    """The inodes of the TCP sockets (IPv4 and IPv6) in ``state`` (:data:`LISTENING`,
    :data:`ESTABLISHED`), on local ``port`` if given."""
    inodes: set[str] = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != state:
                continue
            if port is None or int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int | str, proc: Path = Path("/proc")) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open (its fd links read
    ``socket:[inode]``); none where the process cannot be seen."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in (proc / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):  # closed since the listing
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
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
    inodes = tcp_inodes(LISTENING, port, proc)
    if not inodes:
        return None
    me = os.getpid()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
            continue
        if socket_inodes(pid_dir.name, proc) & inodes:
            return PortHolder(int(pid_dir.name), _command(pid_dir))
    return None


def unresolved_host_message(host: str, exc: OSError) -> str:
    """Why ``host``, a name, cannot be bound: no resolver knows it."""
    return (
        f"{host} is no name this machine can resolve ({exc.strerror or exc}): set an "
        "address, 127.0.0.1 for this machine only or 0.0.0.0 for every interface, or a "
        "name /etc/hosts or DNS knows"
    )


def busy_port_message(host: str, port: int) -> str:
    """Say the port is taken, by whom when that can be seen, and how to go on."""
    holder = port_holder(port)
    who = f" by {holder.describe()}" if holder else ""
    return (
        f"port {port} on {host} is already in use{who}; stop it "
        f"(`ss -ltnp 'sport = :{port}'` shows the holder) or set [server] port / --port; "
        "keel never moves to another port"
    )
