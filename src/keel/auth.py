"""Keys, their comparison, and per-key rate limits.

Keys come from ``[auth]`` in the config, from an optional keys file that
is re-read when it changes (a file that cannot be read or parsed keeps the
keys in force and records why), and, with ``[state] redis_url``, from Redis
(``keel.state.shared_keys``): all of them are in force together. Keys are
compared in constant time against every configured key (no early exit);
Redis holds only their sha256 (``key_hash``), and only a short hash of a key
ever leaves this module (``key_id``, for logs and the audit trail).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import stat
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from keel.config import KEY_CHARACTERS, AuthConfig, Settings, unsendable_keys
from keel.errors import ConfigIssue
from keel.rate_limit import TokenBucket

if TYPE_CHECKING:
    from keel.state.shared_keys import SharedKeys

log = logging.getLogger("keel.auth")


class Access(StrEnum):
    PUBLIC = "public"
    USER = "user"
    ADMIN = "admin"


def key_hash(key: str) -> str:
    """The sha256 of ``key`` (hex): what Redis keeps instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """A short name for ``key`` in logs, the audit log and ``keel keys list``."""
    return "key-" + key_hash(key)[:10]


@dataclass(frozen=True, slots=True)
class Keys:
    users: tuple[str, ...] = ()
    admin: str | None = None

    @property
    def empty(self) -> bool:
        return not self.users and self.admin is None


def keys_file_path(config: AuthConfig, base_dir: Path) -> Path | None:
    """The configured keys file; a relative path is read from ``base_dir`` (the data
    root)."""
    if config.keys_file is None:
        return None
    path = Path(config.keys_file).expanduser()
    return path if path.is_absolute() else base_dir / path


def keys_file_bytes(path: Path) -> bytes:
    """The keys file's bytes; raises OSError, or ValueError for what is no regular file
    (a FIFO's read waited for ever: check, doctor and serve hung, a reload froze every
    route)."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise ValueError("is not a regular file: point keys_file at a TOML file")
    return path.read_bytes()


def parse_keys_file(path: Path, content: bytes | None = None) -> Keys:
    """The keys of a keys file (its ``content`` where read already); raises OSError,
    ValueError or TOMLDecodeError saying why not."""
    content = keys_file_bytes(path) if content is None else content
    data = tomllib.loads(content.decode("utf-8-sig"))  # Notepad's mark dropped
    if not data:  # as a reload of an empty config file is refused
        raise ValueError(
            "holds no keys and no settings (an editor in the middle of saving it, or a "
            "writer killed mid-save, leaves it so): to revoke every key in it, write "
            "api_keys = [] or delete the file"
        )
    users = data.get("api_keys", [])
    admin = data.get("admin_key")
    unknown = set(data) - {"api_keys", "admin_key"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; use api_keys and admin_key")
    # Stripped, as the config's keys: a client cannot send a key's outer whitespace.
    if not isinstance(users, list) or not all(isinstance(k, str) for k in users):
        raise ValueError("api_keys must be a list of strings of at least 8 characters")
    users = [key.strip() for key in users]
    if not all(len(key) >= 8 for key in users):
        raise ValueError("api_keys must be a list of strings of at least 8 characters")
    if admin is not None and (not isinstance(admin, str) or len(admin.strip()) < 8):
        raise ValueError("admin_key must be a string of at least 8 characters")
    if (issue := unsendable_keys(users, "api_keys")) is not None:
        raise ValueError(issue)
    if admin is not None and unsendable_keys([admin.strip()], "admin_key") is not None:
        raise ValueError(KEY_CHARACTERS.format(where="admin_key"))
    return Keys(tuple(users), admin.strip() if admin is not None else None)


@dataclass(slots=True)
class Identity:
    access: Access
    key_id: str | None


@dataclass
class KeyStore:
    config: AuthConfig
    base_dir: Path
    clock: Callable[[], float] = time.monotonic
    on_reload: Callable[[bool, str], None] | None = None
    shared: SharedKeys | None = None
    """Keys in Redis (``[state] redis_url``), in force beside the configured ones."""
    previous: KeyStore | None = None
    """The store a config reload replaces: its keys file's keys stay in force while
    the file cannot be read (a reload during a half-written edit revoked them all)."""
    keys: Keys = field(default_factory=Keys)
    file_error: str | None = None
    _file_stamp: bytes | None = None
    _checked_at: float = -1.0

    def __post_init__(self) -> None:
        self.keys = Keys(tuple(self.config.api_keys), self.config.admin_key)
        prior, self.previous = self.previous, None
        if prior is not None and prior.keys_path == self.keys_path:
            users = tuple(key for key in prior.keys.users if key not in prior.config.api_keys)
            admin = prior.keys.admin if prior.keys.admin != prior.config.admin_key else None
            self.keys = Keys(tuple(self.config.api_keys) + users, admin or self.config.admin_key)
        self.refresh(force=True)

    @property
    def keys_path(self) -> Path | None:
        return keys_file_path(self.config, self.base_dir)

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the keys file if it changed (checked at most once a second)."""
        path = self.keys_path
        now = self.clock()
        if path is None or (not force and now - self._checked_at < 1.0):
            return
        self._checked_at = now
        try:
            # Its content, not its mtime and size: a rotated key of the same length written
            # with the same mtime (a Nix store's 1, SOURCE_DATE_EPOCH, cp -p, tar) kept the
            # revoked key in force and refused its replacement
            content = keys_file_bytes(path)
            stamp = hashlib.sha256(content).digest()
            if stamp == self._file_stamp and not force:
                return
            from_file = parse_keys_file(path, content)
        except FileNotFoundError:
            self._withdraw_file(path)
            return
        except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
            held = len(self.keys.users) + (self.keys.admin is not None)
            # at start (a directory in its place) none were: it said "keeping the keys"
            kept = (
                f"keeping the {held} key(s) in force"
                if held
                else "no key is in force: every client is refused until it can be read"
            )
            message = f"keys file {path}: {exc}; {kept}"
            if message != self.file_error:
                log.error("%s", message)
                if self.on_reload is not None:
                    self.on_reload(False, message)
            self.file_error = message
            return
        self._file_stamp = stamp
        self.file_error = None
        self.keys = Keys(
            tuple(self.config.api_keys) + from_file.users, from_file.admin or self.config.admin_key
        )
        if not force and self.on_reload is not None:
            self.on_reload(True, f"keys file {path} reloaded ({len(self.keys.users)} user keys)")

    def _withdraw_file(self, path: Path) -> None:
        """The keys file is gone: its keys are no longer in force (deleting it revokes
        them; a key is still asked for, see :attr:`enabled`)."""
        message = f"keys file {path} does not exist; only the config's keys are in force"
        if message != self.file_error:
            log.error("%s", message)
            if self.on_reload is not None:
                self.on_reload(False, message)
        self.file_error, self._file_stamp = message, None
        self.keys = Keys(tuple(self.config.api_keys), self.config.admin_key)

    @property
    def enabled(self) -> bool:
        """Whether a key is asked for. Always with Redis keys or a keys file: revoking the
        last one there (or deleting the file) must leave access closed, never open."""
        return not self.keys.empty or self.shared is not None or self.config.keys_file is not None

    @property
    def has_admin(self) -> bool:
        return self.keys.admin is not None or (
            self.shared is not None and self.shared.current.has_admin
        )

    def identify(self, presented: list[str]) -> Identity | None:
        """The strongest access the presented keys grant, or None if none is valid."""
        self.refresh()
        best: Identity | None = None
        for candidate in presented:
            access = self._access(candidate)
            if access is Access.ADMIN:
                return Identity(Access.ADMIN, key_id(candidate))
            if access is Access.USER and best is None:
                best = Identity(Access.USER, key_id(candidate))
        return best

    def _access(self, candidate: str) -> Access | None:
        keys = self.keys
        encoded = candidate.encode()
        admin = keys.admin is not None and hmac.compare_digest(encoded, keys.admin.encode())
        user = False
        for key in keys.users:  # every key compared: timing says nothing about which
            user |= hmac.compare_digest(encoded, key.encode())
        shared = self.shared.current.find(candidate) if self.shared is not None else None
        if admin or (shared is not None and shared.admin):
            return Access.ADMIN
        return Access.USER if user or shared is not None else None


class KeyLimiter(Protocol):
    """A per-key rate limit: this process's (:class:`KeyRateLimiter`) or the one the
    replicas share (``keel.state.shared_limits.SharedKeyRateLimiter``)."""

    per_minute: int

    async def acquire(self, who: str) -> float:
        """0 if allowed now, else the seconds until a request would be (nothing taken)."""
        ...

    async def refund(self, who: str) -> None:
        """Give back the request ``who`` was charged for, which keel itself refused."""
        ...


class KeyRateLimiter:
    """A token bucket per key: ``per_minute`` requests, bursting up to that many."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, who: str) -> float:
        """0 if allowed now, else the seconds until a request would be (nothing taken)."""
        bucket = self._buckets.get(who)
        if bucket is None:
            bucket = self._buckets[who] = TokenBucket(self.per_minute, clock=self._clock)
        return bucket.take()

    async def acquire(self, who: str) -> float:
        return self.take(who)

    async def refund(self, who: str) -> None:
        if (bucket := self._buckets.get(who)) is not None:
            bucket.give_back()


FORWARDING_HEADERS = ("x-forwarded-for", "x-real-ip", "forwarded")
"""What a proxy says it forwarded a request for (nginx as commonly set up, Caddy and
Traefik by default); no client on this machine sends them."""


def forwarded_for(client: str, headers: Iterable[tuple[str, str]]) -> str | None:
    """The address a proxy on this machine forwarded a request for, where ``client`` (as
    uvicorn read it: ``X-Forwarded-For``'s, from a proxy on 127.0.0.1) or a forwarding
    header in ``headers`` (lower-case names) names one that is not this machine's; None
    for a request from this machine."""
    if client and not is_loopback(client):
        return client
    for name, value in headers:
        if name in FORWARDING_HEADERS:
            for address in _addresses(value, forwarded=name == "forwarded"):
                if not is_loopback(address):
                    return address
    return None


def _addresses(value: str, *, forwarded: bool) -> Iterator[str]:
    """The addresses a forwarding header names: each of ``X-Forwarded-For``'s list,
    ``Forwarded``'s ``for=`` (``for="[2001:db8::1]:4711"``), without ports."""
    for part in re.split(r"[,;]", value):
        if forwarded:
            key, _, part = part.partition("=")
            if key.strip().lower() != "for":
                continue  # by=, proto=, host=
        address = part.strip().strip('"')
        if address.startswith("["):  # an IPv6 address with its port
            address = address[1:].partition("]")[0]
        elif address.count(":") == 1:  # an IPv4 address (or a name) with its port
            address = address.partition(":")[0]
        if address:
            yield address


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1, and 127.x written as IPv6,
    ``::ffff:127.0.0.1``, as a dual-stack proxy writes a local client's); a name that
    merely begins with "127." is neither."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
        mapped = getattr(address, "ipv4_mapped", None)  # Python 3.11 says False for it
        return (mapped or address).is_loopback
    except ValueError:
        return False


def open_remote_issue(settings: Settings, root: Path, host: str) -> ConfigIssue | None:
    """Why serving on ``host`` with ``settings`` is refused, if it is: beyond loopback
    with no keys, unless explicitly allowed. ``keel serve`` refuses it; ``keel config
    check`` and ``keel doctor`` say so first."""
    if is_loopback(host) or settings.auth.allow_unauthenticated_remote:
        return None
    if settings.state.redis_url is not None:
        return None  # keys can come from Redis at any time, so a key is always asked for
    if KeyStore(settings.auth, root).enabled:
        return None
    return ConfigIssue(
        "server.host",
        f"binding {host} would serve anyone who can reach it, and no keys are "
        "configured: set [auth] api_keys (or keys_file, or [state] redis_url and "
        "add keys with `keel keys add`), or set [auth] "
        "allow_unauthenticated_remote = true if a proxy in front handles it",
    )
