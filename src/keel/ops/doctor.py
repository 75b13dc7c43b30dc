"""``keel doctor``: pre-flight checks before keel starts (systemd's ExecStartPre).

Each check is a finding, never a crash of doctor itself: the native library
is imported in a subprocess (a segfault there is reported, not suffered), and
a check that cannot run because an earlier one failed says so ("skip").

Each configured shared store (Redis, PostgreSQL) is connected to and asked one
trivial command on every run, not only ``--online``: it costs a round trip, and
a wrong password there is a config that ``keel serve`` would run on for good.

The exit code is the most serious failure's, as ``keel serve`` would exit:
78 config, 69 native library / model file / memory / unreachable provider,
75 port busy, 1 anything else; a data root keel cannot write is 78, as for
`keel serve`. Warnings do not fail.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from keel.config import (
    ENV_REF,
    ROLES,
    LocalModelConfig,
    Paths,
    Role,
    Settings,
    load_settings,
    masked_url,
)
from keel.config import check_data_root as writable_root
from keel.errors import (
    ConfigError,
    DataRootUnusable,
    ExitCode,
    InsufficientMemory,
    KeelError,
    MissingDependency,
    UpstreamAuthError,
    UpstreamConnectError,
)
from keel.index.walk import checkout_trouble
from keel.models import gguf
from keel.models.manager import (
    cgroup_memory_left,
    host_memory_available,
    memory_needed,
)
from keel.models.registry import (
    list_model_files,
    read_facts,
    resolve_model,
    tabby_prompt_template,
)
from keel.ops.ports import busy_port_message, unresolved_host_message
from keel.providers.base import Provider

if TYPE_CHECKING:
    pass

log = logging.getLogger("keel.doctor")

Status = Literal["ok", "warn", "FAIL", "skip"]

EXIT_DEPENDENCY = ExitCode.DEPENDENCY  # the name check_native_library uses
_SEVERITY = (ExitCode.CONFIG, ExitCode.DEPENDENCY, ExitCode.PORT_BUSY, ExitCode.FAILURE)
"""The most serious first: the report exits with the first of these any check failed with."""


@dataclass(slots=True)
class Check:
    name: str
    status: Status
    detail: str
    exit_code: int = ExitCode.OK
    """What keel serve would exit with because of this; used when status is FAIL."""


@dataclass(slots=True)
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str, exit_code: int = ExitCode.OK) -> Check:
        check = Check(name, status, detail, exit_code if status == "FAIL" else ExitCode.OK)
        self.checks.append(check)
        return check

    @property
    def exit_code(self) -> int:
        codes = {check.exit_code for check in self.checks if check.status == "FAIL"}
        return next((code for code in _SEVERITY if code in codes), ExitCode.OK)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.exit_code == ExitCode.OK,
            "exit_code": self.exit_code,
            "checks": [asdict(check) for check in self.checks],
        }

    def render(self, out: TextIO) -> None:
        width = max((len(check.name) for check in self.checks), default=5)
        out.write(f"{'CHECK':<{width}}  STATUS  DETAIL\n")
        for check in self.checks:
            lines = check.detail.splitlines() or [""]
            out.write(f"{check.name:<{width}}  {check.status:<6}  {lines[0]}\n")
            for line in lines[1:]:
                out.write(f"{'':<{width}}  {'':<6}  {line}\n")
        verdict = "all checks passed" if self.exit_code == ExitCode.OK else "FAILED"
        out.write(f"\n{verdict} (exit {self.exit_code})\n")


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    config: Path | None = None
    host: str | None = None
    port: int | None = None
    online: bool = False
    library_timeout: float = 120.0
    provider_timeout: float = 20.0
    store_timeout: float = 3.0
    meminfo: Path = Path("/proc/meminfo")


# checks ----------------------------------------------------------------------


def check_native_library(report: Report, timeout: float) -> None:
    """Import the local engine (xllamacpp, llama.cpp's server) in a child: a crash or
    hang there is a finding."""
    code = "import xllamacpp, sys; sys.stdout.write(xllamacpp.__version__)"
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except OSError as exc:  # this user may not run keel's interpreter
        report.add("native library", "FAIL", f"cannot run {sys.executable}: {exc}", EXIT_DEPENDENCY)
        return
    except subprocess.TimeoutExpired:
        report.add(
            "native library",
            "FAIL",
            f"importing xllamacpp hung for {timeout:.0f}s",
            EXIT_DEPENDENCY,
        )
        return
    if result.returncode == 0:
        report.add("native library", "ok", f"xllamacpp {result.stdout.strip()}")
        return
    if result.returncode < 0:
        why = f"the import was killed by signal {-result.returncode}"
    else:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {result.returncode}"
    report.add(
        "native library",
        "FAIL",
        f"cannot import xllamacpp: {why}; reinstall xllamacpp in keel's environment",
        EXIT_DEPENDENCY,
    )


def _config_file(options: DoctorOptions, paths: Paths) -> Path:
    return options.config if options.config is not None else paths.config_file


def check_env_vars(report: Report, file: Path, environ: os._Environ[str] | dict[str, str]) -> None:
    try:
        if not file.exists():
            report.add("env vars", "skip", "no config file")
            return
        raw = file.read_text(encoding="utf-8-sig")
        tomllib.loads(raw)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        report.add("env vars", "skip", "config file unreadable (see config)")
        return
    lines = [line for line in raw.splitlines() if not line.lstrip().startswith("#")]
    # $$ (a literal $) names nothing
    found = [ref for line in lines for ref in ENV_REF.finditer(line) if ref.group(1)]
    names = sorted({ref.group(1) for ref in found})
    if not names:
        report.add("env vars", "ok", "none referenced")
        return
    required = {ref.group(1) for ref in found if ref.group(2) is None}
    missing = [name for name in names if name in required and name not in environ]
    if missing:
        report.add(
            "env vars",
            "FAIL",
            f"not set: {', '.join(missing)} (referenced as ${{NAME}} in {file})",
            ExitCode.CONFIG,
        )
    else:
        report.add("env vars", "ok", f"set: {', '.join(names)}")


def check_config(report: Report, options: DoctorOptions, paths: Paths) -> Settings | None:
    file = _config_file(options, paths)
    try:
        settings = load_settings(options.config, paths)
    except ConfigError as exc:
        detail = "\n".join([f"{exc.source}:"] + [issue.render() for issue in exc.issues])
        report.add("config", "FAIL", detail, ExitCode.CONFIG)
        return None
    except DataRootUnusable as exc:  # its config.toml cannot be reached
        report.add("config", "FAIL", exc.message, ExitCode.CONFIG)
        return None
    where = str(file) if file.exists() else f"{file} absent: all defaults"
    report.add("config", "ok", where)
    return settings


def _local_configs(settings: Settings) -> list[tuple[Role, LocalModelConfig]]:
    found: list[tuple[Role, LocalModelConfig]] = []
    for role in ROLES:
        for config in settings.model.role(role).chain():
            if isinstance(config, LocalModelConfig):
                found.append((role, config))
    return found


def check_model_files(report: Report, settings: Settings, paths: Paths) -> bool:
    """Every local model the config names resolves to a readable GGUF file."""
    ok = True
    seen: set[str] = set()
    for role, config in _local_configs(settings):
        if config.model_id in seen:
            continue
        seen.add(config.model_id)
        name = f"model {config.model_id}"
        try:
            path = resolve_model(config.model_id, paths)
            metadata = gguf.read_metadata(path)
        except MissingDependency as exc:
            report.add(name, "FAIL", f"{role}: {exc.message}", ExitCode.DEPENDENCY)
            ok = False
            continue
        except OSError as exc:
            report.add(name, "FAIL", f"{role}: cannot read: {exc}", ExitCode.DEPENDENCY)
            ok = False
            continue
        try:
            tabby_prompt_template(path)  # keel serve refuses a Tabby directory's bad one
        except ValueError as exc:
            report.add(name, "FAIL", f"{role}: {exc}", ExitCode.CONFIG)
            ok = False
            continue
        size = gguf.weights_bytes(path) / 2**20
        arch = metadata.get("general.architecture", "?")
        report.add(name, "ok", f"{path} ({size:.0f} MiB, {arch})")
    if not seen:
        report.add("model files", "ok", "no local models configured")
    return ok


def check_repositories(report: Report, settings: Settings) -> None:
    """Each configured repository's checkout is there (a typo in a path silently turned
    repository context off: the server only logs it at each refresh)."""
    missing, found = [], []
    for repo in settings.repositories:
        root = Path(repo.path).expanduser() if repo.path else None
        if root is None:
            missing.append(f"{repo.name}: (no path) is not a directory")
        elif (trouble := checkout_trouble(root)) is not None:  # a bare repository too
            missing.append(f"{repo.name}: {trouble}")
        else:
            found.append(f"{repo.name}: {root}")
    if missing:
        note = "completions get no code from it; fix the path in [[repositories]]"
        report.add("repositories", "warn", "\n".join([*missing, note, *found]))
    else:
        report.add("repositories", "ok", "\n".join(found))


def check_downloaded_models(report: Report, paths: Paths) -> None:
    """The models in <root>/models (pulled or copied): header facts, damaged files, and
    what an interrupted pull left in its staging directory."""
    from keel.models.pull import STAGING_DIR, abandoned_pulls, models_dir_trouble

    if (trouble := models_dir_trouble(paths.models_dir)) is not None:  # it said "ok none in"
        report.add("downloaded models", "FAIL", trouble, ExitCode.CONFIG)
        return
    try:
        files = [file for file in list_model_files(paths) if not file.embedded]
    except OSError as exc:  # a data root that cannot be entered (see data root)
        report.add("downloaded models", "skip", f"cannot list {paths.models_dir}: {exc.strerror}")
        return
    lines: list[str] = []
    damaged: list[str] = []
    for file in files:
        facts = read_facts(file.path)
        size = f"{file.size_bytes / 2**20:,.0f} MiB"
        if facts.error is not None:
            damaged.append(f"{file.name}: {facts.error}")
            continue
        fim = "FIM" if facts.fim else "no FIM"
        lines.append(
            f"{file.name} ({facts.architecture}, {size}, context {facts.context_length}, {fim})"
        )
    # Only what no running pull holds: "remove it" during a pull broke the pull off
    abandoned = abandoned_pulls(paths.models_dir / STAGING_DIR)
    leftovers = [
        (path, what, sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
        for path, what in abandoned
    ]
    if damaged or leftovers:
        notes = [*damaged, *lines]
        for path, what, held in leftovers:
            notes.append(
                f"{path} holds {held / 2**20:,.0f} MiB of a pull"
                f"{f' of {what}' if what else ''} that was killed: remove it (the next pull "
                "does)"
            )
        report.add("downloaded models", "warn", "\n".join(notes))
    elif lines:
        report.add("downloaded models", "ok", "\n".join(lines))
    else:
        report.add(
            "downloaded models",
            "ok",
            f"none in {paths.models_dir}; `keel models pull TabbyML/Qwen2.5-Coder-1.5B` "
            "brings a code model",
        )


MEMORY_ADVICE = "; lower context_size or parallelism, or use a smaller model"


def memory_plan(providers: Iterable[Provider], available: int) -> tuple[int, str]:
    """Bytes the local workers among ``providers`` need (weights + KV cache per slot +
    overhead), and that said with each worker's share. A model file whose header cannot
    be read is left out: its worker reports it, once, as it starts."""
    from keel.providers.local import LocalProvider

    needed, parts = 0, []
    for provider in providers:
        if isinstance(provider, LocalProvider):
            try:
                need = memory_needed(provider.supervisor.spec)
            except MissingDependency:
                continue
            needed += need
            parts.append(f"{provider.name}: {need / 2**20:.0f} MiB")
    said = f"need ~{needed / 2**20:.0f} MiB, available {available / 2**20:.0f} MiB"
    return needed, f"{said} ({'; '.join(parts)})"


def check_fit(providers: Iterable[Provider], *, what: str = "the local models") -> None:
    """Raise InsufficientMemory when the local workers among ``providers`` cannot fit in
    the memory available, as a model load judges it (``keel serve`` before binding, a
    reload before it starts any): started anyway, a worker loaded for ~70 s, or a few
    seconds, before failing with the engine's words ("check the input params")."""
    available = host_memory_available()
    if available is None:
        return
    providers = list(providers)
    needed, summary = memory_plan(providers, available)
    if needed > available:
        raise InsufficientMemory(f"{what} do not fit in memory: {summary}{MEMORY_ADVICE}")
    if (trouble := group_trouble(providers)) is not None:
        log.warning("%s", trouble)


def group_trouble(
    providers: list[Provider],
    cgroups: Path = Path("/proc/self/cgroup"),
    mount: Path = Path("/sys/fs/cgroup"),
) -> str | None:
    """What keel's memory control group (a container's limit) leaves short of the local
    workers' estimate, or None. Said, not refused: the estimate counts each generating
    engine's prompt cache full, which fills as prompts come (the embedded model's three
    roles were estimated at 919 MiB and used 437 MiB: refused, they would not start in a
    900 MiB container where they ran)."""
    room = cgroup_memory_left(cgroups, mount)
    if room is None:
        return None
    needed, summary = memory_plan(providers, room)
    if needed <= room:
        return None
    return (
        f"keel's memory limit (its control group's: a container's) leaves less than the "
        f"local models are estimated to need as their prompt caches fill: {summary}; "
        "the kernel may kill a worker for memory then: raise the limit"
        f"{MEMORY_ADVICE.replace('; lower', ', or lower')}"
    )


def fit_trouble(settings: Settings, paths: Paths) -> str | None:
    """Why ``keel serve`` would refuse these local models for the memory they need, as
    :func:`check_fit` judges it before binding (exit 69), or None; no model is loaded.
    For `keel config check`, which said ok for a config serve refused."""
    from keel.providers.catalog import build_providers

    try:
        providers = build_providers(settings, paths)
    except KeelError:  # a model file missing or unusable: said on its own
        return None
    try:
        check_fit(providers.unique())
    except InsufficientMemory as exc:
        return f"{exc.message} (keel serve here would exit {exc.exit_code})"
    return None


def check_memory(report: Report, settings: Settings, paths: Paths, meminfo: Path) -> None:
    """Weights + KV cache (per slot) + overhead for every worker keel would start."""
    from keel.providers.catalog import build_providers

    available = host_memory_available(meminfo)
    if available is None:
        report.add("memory", "skip", f"no MemAvailable in {meminfo}")
        return
    try:
        providers = build_providers(settings, paths)
    except KeelError as exc:
        report.add("memory", "skip", f"cannot plan the workers: {exc.message}")
        return
    needed, summary = memory_plan(providers.unique(), available)
    if not needed:
        report.add("memory", "ok", "no local models to load")
        return
    if needed > available:
        report.add("memory", "FAIL", summary + MEMORY_ADVICE, ExitCode.DEPENDENCY)
    elif (trouble := group_trouble(providers.unique())) is not None:
        report.add("memory", "warn", trouble)
    elif needed > available * 0.8:
        report.add("memory", "warn", summary + "; little headroom")
    else:
        report.add("memory", "ok", summary)


def check_data_root(report: Report, paths: Paths) -> None:
    try:
        writable_root(paths.root)  # as `keel serve` checks it, and exits
    except DataRootUnusable as exc:
        report.add("data root", "FAIL", exc.message, ExitCode.CONFIG)
        return
    report.add("data root", "ok", f"{paths.root} writable")


def check_events(report: Report, settings: Settings, paths: Paths) -> None:
    """The events SQLite file can be used (PostgreSQL's is :func:`check_stores`'): one
    that cannot passed here, and `keel serve` then failed at start."""
    from keel.events import events_file_issue

    if settings.events.is_postgres:
        return
    if (issue := events_file_issue(settings.events, paths)) is not None:
        report.add("events", "FAIL", issue.render(), ExitCode.CONFIG)
    else:
        report.add("events", "ok", str(paths.sqlite_path(settings.events.database_url)))


def keys_file_trouble(settings: Settings, paths: Paths) -> str | None:
    """What is wrong with the configured keys file, as ``keel serve`` would find it (it
    would serve, refusing every key the file should hold), or None."""
    from keel.auth import keys_file_path, parse_keys_file

    path = keys_file_path(settings.auth, paths.root)
    if path is None:
        return None
    try:
        parse_keys_file(path)
    except FileNotFoundError:
        problem = "does not exist"
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        problem = f"cannot be used: {exc}"
    else:
        return None
    said = f"auth.keys_file {path} {problem}: keel would refuse every key it should hold"
    if Path(str(settings.auth.keys_file)).expanduser().is_absolute():
        return said  # the remark on relative paths misled for an absolute one
    return f"{said} (a relative path is read from the data root, {paths.root})"


def check_exposure(report: Report, settings: Settings, paths: Paths, host: str) -> None:
    """Who may reach the server: what ``keel serve`` refuses (beyond loopback, no keys)
    fails here too."""
    from keel.auth import is_loopback, open_remote_issue

    issue = open_remote_issue(settings, paths.root, host)
    keys_trouble = keys_file_trouble(settings, paths)
    if issue is not None:
        report.add("access", "FAIL", issue.render(), ExitCode.CONFIG)
    elif keys_trouble is not None:
        # keel serves, refusing every client the file's keys should let in, until it can
        # read the file: a check before a start or after an upgrade (a key an older keel
        # took) must not pass it (it warned, exit 0, and a restart locked the team out)
        report.add("access", "FAIL", keys_trouble, ExitCode.CONFIG)
    elif is_loopback(host):
        report.add("access", "ok", f"{host}: this machine only")
    else:
        report.add("access", "ok", f"{host}: open to the network, keys asked for (or allowed)")


def check_port(report: Report, host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                report.add("port", "FAIL", busy_port_message(host, port), ExitCode.PORT_BUSY)
            elif isinstance(exc, socket.gaierror):  # as `keel serve` exits: the config's
                report.add("port", "FAIL", unresolved_host_message(host, exc), ExitCode.CONFIG)
            elif exc.errno == errno.EADDRNOTAVAIL:  # as `keel serve` exits: the config's
                detail = f"{host} is no address of this machine (cannot bind {host}:{port})"
                report.add("port", "FAIL", detail, ExitCode.CONFIG)
            elif exc.errno == errno.EACCES:  # as `keel serve` exits: a port it may not bind
                detail = (
                    f"cannot bind {host}:{port}: {exc.strerror}: a port below 1024 takes root "
                    "or CAP_NET_BIND_SERVICE"
                )
                report.add("port", "FAIL", detail, ExitCode.CONFIG)
            else:
                report.add("port", "FAIL", f"cannot bind {host}:{port}: {exc}", ExitCode.FAILURE)
            return
    report.add("port", "ok", f"{host}:{port} free")


STORE_UNREACHABLE = (
    "keel starts anyway and works without it (limits per replica, the keys read last, "
    "events held in memory) until it answers"
)


def check_stores(report: Report, settings: Settings, timeout: float) -> None:
    """Each configured shared store (``[state] redis_url``, a PostgreSQL ``[events]
    database_url``) is reached and lets keel in: connect, authenticate, one trivial
    command, each within ``timeout``.

    A store that refuses keel (a wrong password or user, a database that is not there, a
    command its ACL forbids) fails: that does not heal, and keel would run its whole life
    without it, saying so only in a log line and a gauge. A store that does not answer is
    a warning: keel is built to start and serve without it (and doctor, as systemd's
    ExecStartPre, must not turn a Redis or PostgreSQL outage into a keel outage)."""
    if settings.state.redis_url is not None:
        _check_redis(report, settings.state.redis_url, timeout)
    if settings.events.is_postgres:
        _check_postgres(report, settings.events.database_url, timeout)


def _check_redis(report: Report, url: str, timeout: float) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    where = masked_url(url)
    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        detail = f"{where}: refused keel's credentials: {masked_url(str(exc).rstrip('.'))}"
        report.add(
            "redis", "FAIL", detail + "; fix the password in [state] redis_url", ExitCode.DEPENDENCY
        )
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        report.add(
            "redis", "warn", f"{where}: unreachable ({masked_url(str(exc))}); {STORE_UNREACHABLE}"
        )
    except redis.RedisError as exc:
        report.add(
            "redis", "FAIL", f"{where}: refused PING: {masked_url(str(exc))}", ExitCode.DEPENDENCY
        )
    else:
        _check_redis_uses(report, client, where)
    finally:
        client.close()


def _check_redis_uses(report: Report, client: Any, where: str) -> None:
    """What keel does there besides PING: the rate-limit script (on a bucket no key
    uses) and the keys' change channel. An ACL that forbids either fails (it does not
    heal, and keel would run without it, saying so only in a log line and a gauge); a
    full Redis (``noeviction``) refusing the script's write is a warning, as that heals
    once memory is freed."""
    import redis

    from keel.state.shared_keys import CHANNEL
    from keel.state.shared_limits import PROBE_KEY, TOKEN_BUCKET

    use, without = "the rate-limit script", "per-key rate limits hold per replica, not across them"
    try:
        client.register_script(TOKEN_BUCKET)(keys=[PROBE_KEY], args=[1, 1.0])
        use = f"the keys' change channel {CHANNEL}"
        without = "keys added or revoked with `keel keys` do not apply (the keys read last do)"
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(CHANNEL)
            pubsub.get_message(timeout=1.0)  # SUBSCRIBE's answer: a refusal raises here
        finally:
            pubsub.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        detail = f"{where}: stopped answering ({masked_url(str(exc))}); {STORE_UNREACHABLE}"
        report.add("redis", "warn", detail)
    except redis.RedisError as exc:
        detail = f"{where}: refuses {use} ({masked_url(str(exc))}); until it allows it, {without}"
        if isinstance(exc, redis.exceptions.NoPermissionError):
            fix = "; allow keel's user scripts and the channel (ACL SETUSER <user> +@scripting "
            report.add("redis", "FAIL", detail + fix + f"+@pubsub &{CHANNEL})", ExitCode.DEPENDENCY)
        else:  # full (noeviction): heals once memory is freed
            full = isinstance(exc, redis.exceptions.OutOfMemoryError)
            report.add(
                "redis", "warn", detail + ("; free memory or raise maxmemory" if full else "")
            )
    else:
        report.add(
            "redis",
            "ok",
            f"{where}: answered PING, ran the rate-limit script, took the keys' channel",
        )


def _check_postgres(report: Report, url: str, timeout: float) -> None:
    import psycopg

    from keel.state.postgres_events import refused

    where = masked_url(url)
    try:  # libpq counts connect_timeout in whole seconds, at least 2
        with psycopg.connect(url, connect_timeout=max(2, round(timeout))) as connection:
            version = connection.info.parameter_status("server_version") or "?"
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        error = masked_url(" ".join(str(exc).split()))
        if not refused(exc):
            report.add(  # the Redis words ("limits per replica, the keys read last") were
                # no database's
                "postgres",
                "warn",
                f"{where}: unreachable ({error}); keel starts anyway, holding editor events "
                "in memory ([events] max_buffered) until it answers",
            )
        else:
            report.add(
                "postgres",
                "FAIL",
                f"{where}: refused keel: {error}; fix [events] database_url",
                ExitCode.DEPENDENCY,
            )
    else:
        report.add("postgres", "ok", f"{where}: answered SELECT 1 (PostgreSQL {version})")


async def _probe_one(role: Role, provider: Provider, timeout: float) -> str | None:
    """None when ``provider`` generated a token in time, else why not."""
    from keel.router.service import probe

    try:
        await probe(role, provider, timeout)
    except UpstreamAuthError as exc:
        return f"not authorised (check api_key): {exc.message}"
    except UpstreamConnectError as exc:
        return f"unreachable: {exc.message}"
    except KeelError as exc:
        return exc.message
    return None


async def _check_providers(
    report: Report, settings: Settings, paths: Paths, timeout: float
) -> None:
    """Each HTTP provider answers a one-token request with keel's key."""
    from keel.providers.catalog import build_providers
    from keel.providers.local import LocalProvider

    try:
        providers = build_providers(settings, paths)
    except KeelError as exc:
        report.add("providers", "FAIL", exc.message, exc.exit_code)
        return
    remote: dict[int, tuple[Role, Provider]] = {}
    for role in ROLES:
        for group in providers.chains[role]:
            for entry in group:
                if not isinstance(entry.provider, LocalProvider):
                    remote.setdefault(id(entry.provider), (role, entry.provider))
    try:
        if not remote:
            report.add("providers", "ok", "no HTTP providers configured")
            return
        errors = await asyncio.gather(
            *(_probe_one(role, provider, timeout) for role, provider in remote.values())
        )
        for (_, provider), error in zip(remote.values(), errors, strict=True):
            name = f"provider {provider.name}"
            endpoint = provider.info.endpoint
            if error is None:
                report.add(name, "ok", f"{endpoint}: answered a one-token request")
            else:
                report.add(name, "FAIL", f"{endpoint}: {error}", ExitCode.DEPENDENCY)
    finally:
        await asyncio.gather(*(provider.aclose() for provider in providers.unique()))


def _needs_native_library(settings: Settings | None) -> bool:
    """Local models run on llama.cpp, and the embedded model is completion's last
    resort unless turned off."""
    if settings is None or _local_configs(settings):
        return True
    for role in ROLES:
        flag = settings.model.role(role).embedded_last_resort
        if flag or (flag is None and role == "completion"):
            return True
    return False


# the command -------------------------------------------------------------------


def run_checks(options: DoctorOptions, environ: dict[str, str] | None = None) -> Report:
    env = os.environ if environ is None else environ
    paths = Paths.from_env(dict(env))
    report = Report()
    settings = check_config(report, options, paths)
    check_env_vars(report, _config_file(options, paths), env)
    if _needs_native_library(settings):
        check_native_library(report, options.library_timeout)
    else:
        report.add("native library", "skip", "no local models configured")
    if settings is None:
        for name in ("model files", "memory"):
            report.add(name, "skip", "config invalid")
    elif check_model_files(report, settings, paths):
        check_memory(report, settings, paths, options.meminfo)
    else:
        report.add("memory", "skip", "model files missing")
    check_downloaded_models(report, paths)
    if settings is not None and settings.repositories:
        check_repositories(report, settings)
    check_data_root(report, paths)
    if settings is not None:
        check_events(report, settings, paths)
    host = options.host or (settings.server.host if settings else "127.0.0.1")
    port = (
        options.port if options.port is not None else (settings.server.port if settings else 8080)
    )
    if settings is not None:
        check_exposure(report, settings, paths, host)
    check_port(report, host, port)
    if settings is not None:
        check_stores(report, settings, options.store_timeout)
    if options.online:
        if settings is None:
            report.add("providers", "skip", "config invalid")
        else:
            asyncio.run(_check_providers(report, settings, paths, options.provider_timeout))
    return report


def main(options: DoctorOptions, *, as_json: bool, out: TextIO) -> int:
    report = run_checks(options)
    if as_json:
        json.dump(report.to_json(), out, indent=2)
        out.write("\n")
    else:
        report.render(out)
    return report.exit_code
