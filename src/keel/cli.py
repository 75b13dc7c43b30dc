"""The ``keel`` command: serve, config check, config sample, models, keys.

Exit codes (the table is ``keel.errors.ExitCode``; a failure exits with its
error class's code): 0 ok, 1 runtime failure, 2 usage, 78 config error, 69
missing dependency or unusable model, 75 port busy. Supervisors must not
restart keel on 78, 69 or 75 (``keel.errors.NO_RESTART``): those need a person.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from keel import __version__
from keel.config import (
    ROLES,
    HttpModelConfig,
    LocalModelConfig,
    Paths,
    RoleConfig,
    Settings,
    check_data_root,
    data_root_trouble,
    host_issue,
    load_settings,
    local_concurrency,
    local_tables,
    masked_url,
)
from keel.errors import (
    ConfigError,
    ConfigIssue,
    KeelError,
    MissingDependency,
    PortBusy,
    RequestError,
    Unavailable,
)
from keel.workers.worker import threads_over_cores, threads_variable_trouble

if TYPE_CHECKING:
    import httpx

    from keel.state.shared_keys import KeyAdmin

log = logging.getLogger("keel")
T = TypeVar("T")


N = TypeVar("N", int, float)


def _number(
    convert: Callable[[str], N],
    what: str,
    rule: str,
    least: N,
    most: N | None = None,
    *,
    above: bool = False,
) -> Callable[[str], N]:
    """An option's number: ``convert``ed, finite, at least ``least`` (``above``: more
    than it) and at most ``most``, else a usage error saying ``rule``.
    Out of range, a port ended in a traceback, a negative ``--start-window`` gave
    unbounded restarts, a negative ``--restart-backoff`` said "restart in -8.0s", and
    a negative ``--min-free-mib`` or nan was taken."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
        fits = (value > least if above else value >= least) and math.isfinite(value)
        if not fits or (most is not None and value > most):  # NaN fails both
            raise argparse.ArgumentTypeError(f"{rule} (got {text})")
        return value

    return parse


_port = _number(int, "port number", "a port is 1-65535", 1, 65535)
"""A ``--port``, as in config.toml (0, any free port, would move keel's address)."""


def _host(text: str) -> str:
    """A ``--host``: an address alone, as ``server.host`` (a port in it was called an
    open address by serve and doctor, and ended ``keel wait`` in a traceback)."""
    if (issue := host_issue(text, command_line=True)) is not None:
        raise argparse.ArgumentTypeError(f"{issue} (got {text!r})")
    return text


def _config_file(text: str) -> str:
    """A config file's path (``--config``, ``keel config check PATH``): an empty one, as
    an unset shell variable gives, read the default config in silence."""
    if not text:
        raise argparse.ArgumentTypeError(
            "the path is empty (an unset shell variable?): give the config file's path, or "
            "leave it out for <data root>/config.toml"
        )
    return text


def _base_url(text: str) -> str:
    """``keel verify``'s URL: an address with its scheme (``http://[::1`` ended in a
    traceback, ``127.0.0.1:8080`` ran six checks that each failed "UnsupportedProtocol")."""
    from keel.config import url_trouble

    if (trouble := url_trouble(text)) is not None:
        raise argparse.ArgumentTypeError(f"{text!r} {trouble.replace('/v1', '')}")
    return text


def _bind(
    host: str,
    port: int,
    source: tuple[str, str] | None = None,
    port_source: tuple[str, str] | None = None,
) -> socket.socket:
    """Bind the listening socket ourselves: a busy port is an error, never another port.
    ``source``: where ``host`` was set (the file and ``server.host``, or the command line
    and ``--host``), which an address this machine does not have is an error of;
    ``port_source``: the same for the port, which one keel may not bind is an error of."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # sockets whose proto says TCP, and with Nagle on every response waits ~40 ms for
    # the client's delayed ACK between its head and its body.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            from keel.ops.ports import busy_port_message

            raise PortBusy(busy_port_message(host, port)) from None
        if isinstance(exc, socket.gaierror):  # it exited 1, which supervisors retry
            from keel.ops.ports import unresolved_host_message

            where, key = source or ("the command line", "--host")
            raise ConfigError(
                where, [ConfigIssue(key, unresolved_host_message(host, exc))]
            ) from None
        shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):  # a mistake, not a crash
            where, key = source or ("the command line", "--host")
            scope = ""
            if host.lower().startswith("fe80:") and "%" not in host:
                scope = " (a link-local address needs its interface: fe80::1%eth0)"
            message = (
                f"{host} is no address of this machine keel can listen on{scope} (cannot "
                f"bind {shown}: {exc.strerror}): set one it has, 127.0.0.1 for this "
                "machine only or 0.0.0.0 for every interface"
            )
            raise ConfigError(where, [ConfigIssue(key, message)]) from None
        if exc.errno == errno.EACCES:  # a port below 1024: it exited 1, retried for ever
            where, key = port_source or ("the command line", "--port")
            message = (
                f"cannot bind {shown}: {exc.strerror}: a port below 1024 takes root or "
                "the CAP_NET_BIND_SERVICE capability (systemd: AmbientCapabilities="
                "CAP_NET_BIND_SERVICE); or serve on a port from 1024 up"
            )
            raise ConfigError(where, [ConfigIssue(key, message)]) from None
        raise KeelError(f"cannot bind {shown}: {exc}") from None
    sock.listen(2048)
    return sock  # not inheritable (Python's default): workers must not hold keel's port


SECONDS_ABOVE_0 = _number(
    float, "number of seconds", "a finite number of seconds above 0", 0.0, above=True
)
"""``--timeout``'s: nan ended `keel verify` in a traceback, and `keel wait` waited for ever."""


def _load(args: argparse.Namespace) -> tuple[Settings, Paths]:
    paths = Paths.from_env()
    config = Path(args.config) if getattr(args, "config", None) else None
    return load_settings(config, paths), paths


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between young collections (Python's default is 700)."""


def settle_heap() -> None:
    """Take what startup built out of the garbage collector's way, once, before serving.

    Measured on the proxy path (c=32, bench/gateway.py's load): collections
    took ~14% of keel's CPU. Full collections walked the ~90,000 objects of the
    imported modules, schemas and routes (up to 69 ms each, a pause every
    request in flight waits out: the p99); ``gc.freeze`` moves them to a
    generation no collection scans. Young collections ran every ~9 requests;
    at 10,000 allocations they run every ~50. Cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    gc.enable()


def cmd_serve(args: argparse.Namespace) -> int:
    from keel.ops.logging import configure as configure_logging

    configure_logging(args.log_format)
    if args.supervise:
        from keel.ops.supervise import supervise

        return supervise(args.serve_parser, args)
    # No collections while startup imports and builds what settle_heap freezes: they
    # cost ~0.05 s of the ~0.7 s of CPU a start takes, for little to free.
    gc.disable()
    # A reload asked for before the app can do one (its handler comes with the lifespan)
    # is kept and done once keel has started: ignored, the file read before it was served
    # whatever it said (and its default ended keel; a --supervise forwards SIGHUP).
    reload_asked = threading.Event()
    signal.signal(signal.SIGHUP, lambda signum, frame: reload_asked.set())

    from keel.providers.catalog import build_providers

    settings, paths = _load(args)
    for ignored in settings.ignored_sections():
        log.warning("%s", ignored)
    for threads in _thread_troubles(settings):
        log.warning("%s", threads)
    restarts = os.environ.get("KEEL_SUPERVISOR_RESTARTS")
    if restarts and restarts != "0":
        log.warning("started by keel serve --supervise after %s restart(s)", restarts)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    check_data_root(paths.root)  # a file, read-only, full: said here, not in a traceback
    from keel.auth import open_remote_issue

    if (issue := open_remote_issue(settings, paths.root, host)) is not None:
        if args.host:  # the address is the command line's, not the file's
            raise ConfigError("the command line", [ConfigIssue("--host", issue.message)])
        raise ConfigError(str(args.config or paths.config_file), [issue])
    from keel.events import events_file_issue

    if (issue := events_file_issue(settings.events, paths)) is not None:  # was exit 3
        raise ConfigError(str(args.config or paths.config_file), [issue])
    providers = build_providers(settings, paths)  # unusable model files fail here, before binding
    from keel.ops.doctor import check_fit

    check_fit(providers.unique())  # exit 69 before binding
    source = ("the command line", "--host")
    if not args.host:
        source = (str(args.config or paths.config_file), "server.host")
    port_source = ("the command line", "--port")
    if args.port is None:
        port_source = (str(args.config or paths.config_file), "server.port")
    sock = _bind(host, port, source, port_source)
    # The web stack is imported after binding: a busy port fails in well under a second.
    import uvicorn

    from keel.app import create_app

    config_path = Path(args.config) if args.config else None
    given = {"server.host": args.host, "server.port": args.port}
    options = frozenset(key for key, value in given.items() if value not in (None, ""))
    app = create_app(settings, paths, providers, config_path, host, options, reload_asked)
    from uvicorn.config import LOGGING_CONFIG

    from keel.api.errors import LoggedOnce

    config = uvicorn.Config(
        LoggedOnce(app),
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=int(settings.server.shutdown_grace_seconds + 0.999),
        lifespan="on",
        # In JSON mode uvicorn's loggers propagate to keel's one JSON handler.
        log_config=None if args.log_format == "json" else LOGGING_CONFIG,
    )
    from keel.ops.server import Server

    server = Server(config)
    settle_heap()
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
    log.info("keel %s serving on http://%s:%d", __version__, shown, port)
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it; keel runs without it too
        asyncio.run(server.serve(sockets=[sock]))
    else:
        uvloop.run(server.serve(sockets=[sock]))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    if args.path and args.config and Path(args.path).resolve() != Path(args.config).resolve():
        raise RequestError(  # b.toml was ignored in silence
            f"two config files given, PATH {args.path} and --config {args.config}: give one "
            "(as PATH or as --config)"
        )
    given = args.path or args.config
    path = Path(given) if given else paths.config_file
    settings = load_settings(Path(given) if given else None, paths)
    where = str(path) if path.exists() else f"{path} (absent: all defaults)"
    from keel.auth import open_remote_issue

    if (issue := open_remote_issue(settings, paths.root, settings.server.host)) is not None:
        raise ConfigError(where, [issue])  # what `keel serve` would refuse
    print(f"ok: {where}")
    if (trouble := data_root_trouble(paths.root)) is not None:  # this machine's, as models
        print(f"warning: {trouble} (keel serve here would exit 78)", file=sys.stderr)
    from keel.events import events_file_issue

    if (issue := events_file_issue(settings.events, paths)) is not None:
        print(f"warning: {issue.render()} (keel serve here would exit 78)", file=sys.stderr)
    for issue in _missing_models(settings, paths):  # the file is fine; this machine's models not
        print(f"warning: {issue.render()}", file=sys.stderr)
    for ignored in settings.ignored_sections():
        print(f"warning: {ignored}", file=sys.stderr)
    for threads in _thread_troubles(settings):  # this machine's
        print(f"warning: {threads}", file=sys.stderr)
    from keel.index.walk import checkout_trouble

    for index, repo in enumerate(settings.repositories):  # this machine's checkouts
        if repo.path is not None and (trouble := checkout_trouble(Path(repo.path).expanduser())):
            print(
                f"warning: repositories[{index}].path: {trouble}; "
                f"repository {repo.name!r} would not be indexed",
                file=sys.stderr,
            )
    for trouble in _serve_troubles(settings, paths):
        print(f"warning: {trouble}", file=sys.stderr)
    from keel.config import EMBEDDED_MODEL_ID
    from keel.providers.catalog import wants_embedded_last_resort

    for role in ROLES:
        role_config = settings.model.role(role)
        chain = role_config.chain()
        names = [p.kind if isinstance(p, HttpModelConfig) else f"local:{p.model_id}" for p in chain]
        if wants_embedded_last_resort(role, chain, role_config.embedded_last_resort):
            # as keel serves the role (the chain printed without it)
            names.append(f"local:{EMBEDDED_MODEL_ID} (embedded last resort)")
        print(f"  {role}: {' -> '.join(names)}")
        print(f"    admission: {_admission_text(role_config)}")
        for provider in chain:
            if isinstance(provider, HttpModelConfig):
                print(f"    {provider.kind}: rate limit: {_rate_limit_text(provider)}")
    return 0


def _serve_troubles(settings: Settings, paths: Paths) -> list[str]:
    """What `keel serve` would meet on this machine beyond the file: a keys file it cannot
    read (it would refuse every key), local models that do not fit in memory (exit 69)."""
    from keel.ops.doctor import fit_trouble, keys_file_trouble

    found = (keys_file_trouble(settings, paths), fit_trouble(settings, paths))
    return [trouble for trouble in found if trouble is not None]


def _admission_text(role: RoleConfig) -> str:
    """What the role admits at once, and at a local model when that is more than a local
    model takes (it falls back to one, or one is loaded in its place)."""
    at_once = role.concurrency()
    text = f"{at_once} at once"
    slots = [p.parallelism for p in role.chain() if isinstance(p, LocalModelConfig)]
    if at_once > (at_local := local_concurrency(max(slots, default=0))):
        text += f" ({at_local} at a local model)"
    return f"{text}, then {role.queue_size} waiting up to {role.queue_timeout:g} s, then 429"


def _thread_troubles(settings: Settings) -> list[str]:
    """``LLAMA_ARG_THREADS`` set to what the worker ignores, ``threads`` set above
    the cores keel may run on (64 on 2 cores: 7-11x slower, said nowhere), and
    ``num_gpu_layers`` set for an engine with no GPU (ignored in silence)."""
    from keel.providers.catalog import gpu_layers_trouble

    found = [threads_variable_trouble(os.environ), gpu_layers_trouble(settings)]
    found += [threads_over_cores(t.threads, f"{w}.threads") for w, t in local_tables(settings)]
    return [trouble for trouble in found if trouble is not None]


def _missing_models(settings: Settings, paths: Paths) -> list[ConfigIssue]:
    """The local models the config names that are not on this machine, or damaged."""
    from keel.errors import MissingDependency
    from keel.models.gguf import read_metadata
    from keel.models.registry import resolve_model, tabby_prompt_template

    issues = []
    for where, provider in local_tables(settings):
        for index, fallback in enumerate(provider.fallback_models):  # passed over unsaid
            try:
                read_metadata(resolve_model(fallback, paths))  # missing, or no GGUF file
            except (MissingDependency, OSError) as exc:
                why = exc.message if isinstance(exc, MissingDependency) else f"unreadable: {exc}"
                said = f"{why} (a load short of memory would pass over it)"
                issues.append(ConfigIssue(f"{where}.fallback_models[{index}]", said))
        key = f"{where}.model_id"
        try:
            path = resolve_model(provider.model_id, paths)
        except MissingDependency as exc:
            issues.append(ConfigIssue(key, f"{exc.message} (keel serve here would exit 69)"))
            continue
        try:
            read_metadata(path)
        except (MissingDependency, OSError) as exc:
            why = exc.message if isinstance(exc, MissingDependency) else f"unreadable: {exc}"
            issues.append(ConfigIssue(key, f"{why} (its worker would fail to load it)"))
        try:
            tabby_prompt_template(path)
        except ValueError as exc:
            issues.append(ConfigIssue(key, f"{exc} (keel serve here would exit 78)"))
    return issues


def _rate_limit_text(provider: HttpModelConfig) -> str:
    """The effective limit on what keel sends the backend (none unless configured)."""
    if provider.rate_limit is None:
        return "none (keel sends what its clients ask for)"
    limit = provider.rate_limit.request_per_minute
    endpoints = len(provider.api_endpoints or ())
    if endpoints > 1:  # each its own: "2 requests/minute" sent 4 to the two
        total = limit * endpoints
        return f"{limit} requests/minute per endpoint ({endpoints} endpoints: {total} in all)"
    return f"{limit} requests/minute"


def cmd_config_sample(_: argparse.Namespace) -> int:
    from keel.sample_config import render_sample

    sys.stdout.write(render_sample())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``keel models`` / ``keel models list``: what the config names and what is on disk."""
    from keel.models.registry import list_model_files, read_facts, resolve_model

    settings, paths = _load(args)
    print("in the config (GET /v1/model on a running keel: what serves after a load):")
    for role in ROLES:
        for index, provider in enumerate(settings.model.role(role).chain()):
            label = "primary" if index == 0 else f"fallback {index}"
            if isinstance(provider, HttpModelConfig):  # endpoints as every other place shows them
                endpoints = " ".join(masked_url(r.api_endpoint or "") for r in provider.replicas())
                where = f"{provider.kind} {endpoints} {provider.model_name or ''}"
            else:
                try:
                    where = f"local {provider.model_id} ({resolve_model(provider.model_id, paths)})"
                except MissingDependency as exc:
                    where = f"local {provider.model_id} (MISSING: {exc.message})"
            print(f"  {role:<10} {label:<11} {where.strip()}")
    print(f"on disk ({paths.models_dir}):")
    files = list_model_files(paths)
    if files:
        print(f"  {'NAME':<32} {'ARCH':<10} {'SIZE':>10} {'CONTEXT':>8}  FIM")
    for file in files:
        facts = read_facts(file.path)
        size = f"{file.size_bytes / 2**20:,.1f} MiB"
        tag = "  [embedded]" if file.embedded else ""
        if facts.error is not None:
            print(f"  {file.name:<32} {'?':<10} {size:>10} {'?':>8}  ?  ({facts.error}){tag}")
            continue
        fim = f"yes ({facts.fim_tokens})" if facts.fim else "no (prefix only)"
        context = str(facts.context_length or "?")
        arch = facts.architecture or "?"
        print(f"  {file.name:<32} {arch:<10} {size:>10} {context:>8}  {fim}{tag}")
    if not files:
        print("  (none: keel models pull SPEC brings one)")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from keel.models.pull import DEFAULT_MIN_FREE_BYTES, ModelPuller

    settings, paths = _load(args)
    min_free = (
        DEFAULT_MIN_FREE_BYTES if args.min_free_mib is None else int(args.min_free_mib * 2**20)
    )
    puller = ModelPuller(
        paths, local=settings.model.role("completion").local, min_free_bytes=min_free
    )
    pulled = puller.pull(args.spec, quant=args.quant, show_bar=sys.stderr.isatty())
    state = "already there" if pulled.already_present else "pulled"
    print(f"{state}: {pulled.name}")
    print(f"  file    {pulled.path} ({pulled.size_bytes / 2**20:,.1f} MiB)")
    print(f"  sha256  {pulled.sha256}")
    print(
        f'  load it: POST /v1/model/load {{"model_name": "{pulled.name}"}}, or in '
        f'config.toml: [model.completion.local] model_id = "{pulled.name}"'
    )
    return 0


def _with_key_admin(args: argparse.Namespace, work: Callable[[KeyAdmin], Awaitable[T]]) -> T:
    """Run ``work`` against the Redis of the config's ``[state] redis_url``; an
    unreachable Redis is an error saying that nothing changed."""
    from redis.asyncio import Redis
    from redis.exceptions import InvalidResponse, RedisError, ResponseError

    from keel.state.shared_keys import KeyAdmin
    from keel.state.shared_limits import is_refused

    settings, _ = _load(args)
    url = settings.state.redis_url
    if url is None:
        raise ConfigError(
            getattr(args, "config", None) or str(Paths.from_env().config_file),
            [
                ConfigIssue(
                    "state.redis_url",
                    "unset: keel keys manages the keys replicas share in Redis. On one "
                    "machine, keys go in the config instead ([auth] api_keys, or a keys_file, "
                    "re-read when it changes); for replicas, set [state] redis_url to the "
                    "Redis they use, or pass --config with the file that does",
                )
            ],
        )

    async def run() -> T:
        redis = Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            return await work(KeyAdmin(redis))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except InvalidResponse as exc:  # an HTTP server's 400 read as Redis "did not answer"
        raise Unavailable(
            f"what answers at {masked_url(url)} ([state] redis_url) is not Redis (it answered "
            f"{exc}): the URL points at another service; no key was read or changed; set "
            "redis_url to your Redis's host and port (redis://HOST:6379/0)"
        ) from None
    except ResponseError as exc:  # it answered, and refused: it was "did not answer"
        raise Unavailable(
            f"Redis ([state] redis_url) refused the command ({exc}): no key was read or "
            "changed; its memory may be full (maxmemory), or the URL's user may not run "
            "keel's commands (it needs to read and write keel:* keys, with WATCH and MULTI)"
        ) from None
    except (RedisError, OSError) as exc:
        said = f"({exc or type(exc).__name__}): no key was read or changed; check"
        raise Unavailable(
            f"Redis ([state] redis_url) refused keel's connection {said} the password, user "
            "and database in the URL"
            if is_refused(exc)
            else f"Redis ([state] redis_url) did not answer {said} that Redis runs and the "
            "URL is right"
        ) from None


def cmd_keys_add(args: argparse.Namespace) -> int:
    secret, record = _with_key_admin(args, lambda admin: admin.add(args.name, admin=args.admin))
    print(secret)
    print(
        f"added {record.describe()}: in force on every replica within a second. This is the "
        "only time the key is shown; Redis keeps its hash.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    record = _with_key_admin(args, lambda admin: admin.revoke(args.key))
    granted = _configured_key_ids(*_load(args))
    if record.id in granted:  # it was "refused on every replica" and served by all
        print(
            f"revoked {record.describe()} from Redis, but the config still grants it "
            f"({granted[record.id]}): every replica takes it until it is removed there too",
            file=sys.stderr,
        )
        return 1
    print(f"revoked {record.describe()}: refused on every replica within a second")
    return 0


def _configured_key_ids(settings: Settings, paths: Paths) -> dict[str, str]:
    """The ids of the keys the config itself grants, as keel serve reads them (its key
    store: the config's keys and its keys file's), and where each is: a key revoked in
    Redis is in force on every replica while one of these holds it."""
    from keel.auth import KeyStore, key_id

    auth, store = settings.auth, KeyStore(settings.auth, paths.root)
    where = {}
    for key in (*store.keys.users, *filter(None, [store.keys.admin])):
        if key in auth.api_keys:
            where[key_id(key)] = "[auth] api_keys"
        elif key == auth.admin_key:
            where[key_id(key)] = "[auth] admin_key"
        else:
            where[key_id(key)] = f"the keys_file {store.keys_path}"
    return where


def cmd_keys_list(args: argparse.Namespace) -> int:
    records, problems = _with_key_admin(args, lambda admin: admin.list())
    print(f"{'ID':<15} {'NAME':<24} {'ACCESS':<6} {'SOURCE':<6} CREATED")
    for record in records:
        access = "admin" if record.admin else "user"
        print(f"{record.id:<15} {record.name:<24} {access:<6} {record.source:<6} {record.created}")
    if not records:
        print("(none: keel keys add [--admin] [--name NAME] makes one)")
    for problem in problems:
        print(f"unreadable record, grants nothing: {problem}", file=sys.stderr)
    return 0


def cmd_keys_push(args: argparse.Namespace) -> int:
    import tomllib

    from keel.auth import parse_keys_file

    path = Path(args.file)
    try:
        keys = parse_keys_file(path)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), [ConfigIssue("(keys file)", str(exc))]) from None
    added, removed = _with_key_admin(args, lambda admin: admin.push(keys, path.name))
    count = len(keys.users) + (keys.admin is not None)
    print(
        f"pushed {path}: {count} keys ({added} added, {removed} removed), in force on every "
        "replica within a second; keys added with `keel keys add` are unchanged"
    )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from keel.index.progress import ProgressBar
    from keel.index.retrieve import RepositoryRetriever

    settings, paths = _load(args)
    configured = [repo.name for repo in settings.repositories]
    if args.name is not None and args.name not in configured:
        known = ", ".join(configured) or "none: add [[repositories]] with name and path"
        raise RequestError(f"no repository named {args.name!r} in the config; configured: {known}")
    retriever = RepositoryRetriever.from_settings(settings.repositories, settings.index, paths)
    remote = [  # said, as the server says it, where it was passed over in silence (exit 0)
        entry
        for entry in settings.repositories
        if entry.path is None and args.name in (None, entry.name)
    ]
    for entry in remote:
        print(
            f"keel: {entry.name}: nothing to index: keel does not clone {entry.git_url}; set "
            "path to its checkout on this machine",
            file=sys.stderr,
        )
    if not retriever.repositories:
        print("keel: no [[repositories]] with a path to index", file=sys.stderr)
        return 1 if remote else 0
    failed: list[KeelError] = []
    for repo in retriever.repositories:
        if args.name is not None and repo.name != args.name:
            continue
        bar = ProgressBar(f"index {repo.name}", sys.stderr)
        try:
            stats = retriever.update(repo.name, bar)[repo.name]
        except KeelError as exc:  # the others are indexed still: the first stopped them all
            print(f"keel: {exc.message}", file=sys.stderr)
            failed.append(exc)
            continue
        finally:
            bar.finish()
        print(
            f"{repo.name}: {stats.files} files, {stats.chunks} chunks; "
            f"{len(stats.reindexed)} re-indexed, {len(stats.removed)} removed, "
            f"{len(stats.skipped)} skipped in {stats.seconds:.1f}s -> {repo.index.directory}"
        )
        for relpath, reason in sorted(stats.skipped.items())[:20]:
            print(f"  skipped {relpath}: {reason}")
    return max((int(exc.exit_code) for exc in failed), default=1 if remote else 0)


def cmd_eval(args: argparse.Namespace) -> int:
    from keel.eval.harness import run_from_args

    return run_from_args(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from keel.ops.doctor import DoctorOptions
    from keel.ops.doctor import main as doctor

    options = DoctorOptions(
        config=Path(args.config) if args.config else None,
        host=args.host,
        port=args.port,
        online=args.online,
    )
    return doctor(options, as_json=args.json, out=sys.stdout)


def cmd_verify(args: argparse.Namespace) -> int:
    from keel.ops.verify import main as verify

    key = args.api_key or os.environ.get("KEEL_API_KEY") or None
    return verify(args.url, api_key=key, timeout=args.timeout, out=sys.stdout)


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a keel bound to ``host:port``: a wildcard bind over
    loopback."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


WAIT_PROBE_SECONDS = 2.0
"""The longest one ``keel wait`` probe waits for its answer (the time left, if less)."""


def _not_keel(response: httpx.Response, request_id: str) -> str | None:
    """Why a 200 from ``/health`` is not keel's, or None: keel answers ``{"status":
    "ok"}`` and echoes the ``X-Request-ID`` it is sent (any HTTP server answering 200
    passed as "keel answers")."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if body == {"status": "ok"} and response.headers.get("x-request-id") == request_id:
        return None
    said = response.text[:80].strip() or "an empty body"
    return (
        f"something that is not keel answers there (HTTP 200, {said!r}, without keel's "
        "echo of X-Request-ID): another service holds the port; give keel's port "
        "([server] port, or --port)"
    )


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait for the keel this config describes to answer ``/health``: a service
    manager's start check that follows the configured port (a fixed one failed every
    start of a keel moved off 8080). Each probe waits at most the time left: one to a
    listener that never answered ran 1.5 s past a 3 s ``--timeout``."""
    import secrets

    import httpx

    settings, _ = _load(args)
    url = local_url(args.host or settings.server.host, args.port or settings.server.port)
    deadline = time.monotonic() + args.timeout
    request_id = f"keel-wait-{secrets.token_hex(8)}"
    # One client for every try: each new one built a TLS context, ~15 ms of CPU every
    # 0.25 s (a 10 s wait took 0.92 s of CPU, 0.31 s now, most of it Python's start).
    # trust_env=False: a proxy set for pulls (HTTP_PROXY) must not carry loopback.
    other: str | None = None  # what another server said: it tells more than a last timeout
    with httpx.Client(trust_env=False, headers={"X-Request-ID": request_id}) as client:
        while True:
            left = deadline - time.monotonic()
            try:
                response = client.get(
                    f"{url}/health", timeout=min(WAIT_PROBE_SECONDS, max(left, 0.01))
                )
                last = f"HTTP {response.status_code}"
                if response.status_code == 200:
                    if (trouble := _not_keel(response, request_id)) is None:
                        print(f"keel answers at {url}")
                        return 0
                    last = other = trouble
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            left = deadline - time.monotonic()
            if left <= 0:
                said = other or last
                raise KeelError(f"no keel answered {url}/health within {args.timeout:g} s ({said})")
            time.sleep(min(0.25, left))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keel",
        description="keel: a self-hosted AI coding-assistant server "
        "(Tabby- and OpenAI-compatible).",
        epilog="Data root: $KEEL_ROOT or ~/.keel. Exit codes: 0 ok, 1 failure, 2 usage, "
        "78 config error, 69 missing dependency, 75 port busy.",
    )
    parser.add_argument("--version", action="version", version=f"keel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server", description="Run the server.")
    serve.add_argument(
        "--config", type=_config_file, help="config file (default: <data root>/config.toml)"
    )
    serve.add_argument("--host", type=_host, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to bind (default 8080); busy is an error")
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text (default) or json: one object per line (ts, level, logger, msg, request_id)",
    )
    serve.add_argument(
        "--supervise",
        action="store_true",
        help="run the server as a child and restart it when it crashes (without systemd)",
    )
    serve.add_argument(
        "--start-limit",
        type=_number(int, "whole number of starts", "1 or more starts", 1),
        default=5,
        help="with --supervise: give up after this many starts within --start-window (5)",
    )
    serve.add_argument(
        "--start-window",
        type=_number(
            float, "number of seconds", "a finite number of seconds, more than 0", 0.0, above=True
        ),
        default=300.0,
        help="with --supervise: the start limit's window in seconds (300)",
    )
    serve.add_argument(
        "--restart-backoff",
        type=_number(float, "number of seconds", "a finite number of seconds, 0 or more", 0.0),
        default=1.0,
        help="with --supervise: seconds before the first restart, doubling up to 30 (1)",
    )
    serve.set_defaults(func=cmd_serve, serve_parser=serve)

    config = commands.add_parser("config", help="check or generate configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_commands.add_parser(
        "check", help="validate a config file (exit 78 listing every error by key)"
    )
    check.add_argument(
        "path",
        nargs="?",
        type=_config_file,
        help="file to check (default: <data root>/config.toml)",
    )
    check.add_argument(
        "--config", type=_config_file, help="the same, as the other commands take it"
    )
    check.set_defaults(func=cmd_config_check)
    sample = config_commands.add_parser("sample", help="print a sample config with every key")
    sample.set_defaults(func=cmd_config_sample)

    models = commands.add_parser(
        "models",
        help="list models (configured and on disk) or pull one",
        description="Without an action: the same as `keel models list`.",
    )
    models.add_argument(
        "--config", type=_config_file, help="config file (default: <data root>/config.toml)"
    )
    models.set_defaults(func=cmd_models)
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION")
    listing = models_commands.add_parser(
        "list", help="configured models, and each file on disk: architecture, size, context, FIM"
    )
    # SUPPRESS: `keel models --config X list` keeps the X given before the action.
    listing.add_argument(
        "--config", type=_config_file, default=argparse.SUPPRESS, help="config file"
    )
    listing.set_defaults(func=cmd_models)
    pull = models_commands.add_parser(
        "pull",
        help="download a GGUF model into <data root>/models (Hugging Face, Tabby registry)",
        description="Download a model through huggingface_hub (HF_ENDPOINT, HF_TOKEN honoured). "
        "SPEC is org/repo:file.gguf, org/repo with --quant, or a Tabby registry name such as "
        "TabbyML/Qwen2.5-Coder-1.5B. The file lands only once complete and its sha256 checked.",
    )
    pull.add_argument("spec", metavar="SPEC", help="org/repo:file.gguf, org/repo, or TabbyML/Name")
    pull.add_argument("--quant", help="with org/repo: the GGUF file whose name holds this (Q8_0)")
    pull.add_argument(
        "--min-free-mib",
        type=_number(float, "number of MiB", "0 or more MiB", 0.0),
        help="disk space to leave free beyond the file, in MiB (default 512)",
    )
    pull.add_argument("--config", type=_config_file, default=argparse.SUPPRESS, help="config file")
    pull.set_defaults(func=cmd_models_pull)

    _add_keys_parser(commands)

    doctor = commands.add_parser(
        "doctor",
        help="pre-flight checks: library, config, env, models, memory, data root, port",
        description="Check that keel can start here. Exit code as `keel serve` would exit: "
        "78 config, 69 library/model/memory/provider, 75 port busy, 1 other.",
    )
    doctor.add_argument(
        "--config", type=_config_file, help="config file (default: <data root>/config.toml)"
    )
    doctor.add_argument("--host", type=_host, help="address keel will bind (default from config)")
    doctor.add_argument("--port", type=_port, help="port keel will bind (default from config)")
    doctor.add_argument(
        "--online", action="store_true", help="also send each HTTP provider a one-token request"
    )
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.set_defaults(func=cmd_doctor)

    verify = commands.add_parser(
        "verify",
        help="smoke-test a running keel: health, ready, completion, chat, embedding, metrics",
        description="Post-deploy smoke test: one line per check; exit 0 only if all pass.",
    )
    verify.add_argument("url", type=_base_url, help="keel's base URL, e.g. http://127.0.0.1:8080")
    verify.add_argument(
        "--api-key",
        help="user key, sent as Authorization: Bearer (default: $KEEL_API_KEY, which "
        "keeps it out of the process list and the shell's history)",
    )
    verify.add_argument(
        "--timeout", type=SECONDS_ABOVE_0, default=120.0, help="seconds per request (default 120)"
    )
    verify.set_defaults(func=cmd_verify)

    wait = commands.add_parser(
        "wait",
        help="wait until the keel this config describes answers /health",
        description="Wait until the keel this config describes (its [server] host and "
        "port) answers /health: exit 0 once it does, 1 after --timeout. For a service "
        "manager's start check (systemd's ExecStartPost).",
    )
    wait.add_argument(
        "--config", type=_config_file, help="config file (default: <data root>/config.toml)"
    )
    wait.add_argument("--host", type=_host, help="address keel binds (default from config)")
    wait.add_argument("--port", type=_port, help="port keel binds (default from config)")
    wait.add_argument(
        "--timeout", type=SECONDS_ABOVE_0, default=120.0, help="seconds to wait (default 120)"
    )
    wait.set_defaults(func=cmd_wait)

    index = commands.add_parser(
        "index",
        help="build or update the repository index (changed files only)",
        description="Index the [[repositories]] of the config for completion context.",
    )
    index.add_argument("name", nargs="?", help="only this repository (default: all)")
    index.add_argument(
        "--config", type=_config_file, help="config file (default: <data root>/config.toml)"
    )
    index.set_defaults(func=cmd_index)

    from keel.eval.arguments import add_arguments as add_eval_arguments

    evaluate = commands.add_parser(
        "eval",
        help="measure completion quality on real repositories",
        description="Sample cursor positions in real code, hide what follows, complete it "
        "under several configurations, and score exact match and edit similarity. "
        "Results go to --output: bench/results under the current directory unless given.",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    return parser


def _add_keys_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser(
        "keys",
        help="add, revoke, list or push the keys kept in Redis ([state] redis_url)",
        description="Keys in Redis are in force on every replica within a second, beside "
        "[auth] api_keys and the keys file. Redis keeps only their sha256.",
    )
    keys.add_argument(
        "--config", type=_config_file, help="config file (default: <data root>/config.toml)"
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add", help="make a strong key and print it once (stdout); Redis keeps its hash"
    )
    add.add_argument("--admin", action="store_true", help="an admin key (default: a user key)")
    add.add_argument("--name", default="", help="a name to find it by (revoke, list)")
    add.set_defaults(func=cmd_keys_add)
    revoke = actions.add_parser("revoke", help="refuse a key on every replica within a second")
    revoke.add_argument("key", metavar="ID_OR_NAME", help="its id (key-...) or its name")
    revoke.set_defaults(func=cmd_keys_revoke)
    listing = actions.add_parser("list", help="ids, names, access and creation; never a key")
    listing.set_defaults(func=cmd_keys_list)
    push = actions.add_parser(
        "push",
        help="make the pushed keys those of a keys file (api_keys, admin_key)",
        description="The keys of FILE replace those of the previous push; keys added with "
        "`keel keys add` stay.",
    )
    push.add_argument("file", metavar="FILE", help="a keys file: api_keys = [...], admin_key")
    push.set_defaults(func=cmd_keys_push)
    for action in (add, revoke, listing, push):
        # SUPPRESS: `keel keys --config X add` keeps the X given before the action.
        action.add_argument(
            "--config", type=_config_file, default=argparse.SUPPRESS, help="config file"
        )


TERMINATED = "SIGTERM"
HUNG_UP = "SIGHUP"


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM, and SIGHUP (a terminal closed, an ssh session dropped), end a command as
    Ctrl-C does: its cleanups run (a pull ended this way left its partial download
    behind for good)."""
    raise KeyboardInterrupt(HUNG_UP if signum == signal.SIGHUP else TERMINATED)


def _mend_standard_streams() -> None:
    """Standard streams a launcher closed are /dev/null, as a daemon's are: uvicorn's
    log formatter asked a closed stdout whether it was a terminal (a traceback, exit 1),
    and the next file keel opened would have been fd 1, where a print writes."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: fd itself, or lower
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115


def main(argv: list[str] | None = None) -> int:
    _mend_standard_streams()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # A line per HTTP request (huggingface_hub's client logs each at INFO, a probe's 404
    # among them) is noise in a pull's output: keel says what matters itself.
    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is not cmd_serve:  # the server stops its own way (a drain; SIGHUP reloads)
        signal.signal(signal.SIGTERM, _terminated)
        signal.signal(signal.SIGHUP, _terminated)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, where a reader gone early is caught (below)
    except KeelError as exc:
        if getattr(args, "log_format", "text") == "json":
            log.error("%s", exc.message)  # keep stderr one JSON object per line
        else:
            print(f"keel: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # what a command was doing is undone (a pull's file)
        print("keel: interrupted", file=sys.stderr)
        return {(TERMINATED,): 143, (HUNG_UP,): 129}.get(exc.args, 130)
    except BrokenPipeError:  # `keel models list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
