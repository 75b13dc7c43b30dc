"""The one error tree of keel.

Every failure keel reports is one of these classes. Each carries the HTTP
status it renders as, the OpenAI error ``type`` and the CLI exit code, so the
API handler (``api/errors.py``) and the CLI never decide that for themselves::

    KeelError                       500  server_error            exit 1
    ├── RequestError                400  invalid_request_error   exit 2
    │   ├── AuthenticationError     401  authentication_error
    │   ├── Forbidden               403  permission_error        (a user key, an admin route)
    │   ├── NotFound                404  not_found_error
    │   ├── Conflict                409  (unloading the only provider of a role)
    │   ├── PayloadTooLarge         413
    │   ├── UnsupportedEncoding     415  (a compressed body)
    │   ├── ClientDisconnected      499  (the client left before its answer; nobody reads it)
    │   └── ContextLengthExceeded   400  (the prompt does not fit the model's context)
    ├── ConfigError                 422  invalid_config          exit 78  (lists ``issues``)
    ├── DataRootUnusable            500  server_error            exit 78  (unwritable, a file)
    ├── BadEnvironment              500  server_error            exit 78  (HF_TOKEN not a token)
    ├── MissingDependency           500  server_error            exit 69
    │   ├── InsufficientMemory      507  insufficient_memory     (the model would not fit)
    │   └── InsufficientStorage     507  insufficient_storage    (a pull would not fit on disk)
    ├── PortBusy                    500  server_error            exit 75
    ├── RateLimited                 429  rate_limit_error        exit 1   (a key over its rate)
    │   └── Overloaded              429  (a role's queue is full or timed out)
    ├── Unavailable                 503  service_unavailable     exit 1
    │   └── WorkerUnavailable       503  (a local worker is starting / gave up)
    └── UpstreamError               502  upstream_error          exit 1
        ├── UpstreamConnectError    502  connect refused / reset / DNS
        ├── UpstreamTimeout         504
        │   └── CompletionTimeout   408  completion_timeout ([server] completion_timeout, as Tabby)
        ├── UpstreamStatusError     502  the backend answered with an error status
        ├── UpstreamAuthError       502  the backend rejected our key (401/403)
        ├── UpstreamProtocolError   502  malformed JSON, broken SSE
        └── WorkerCrashed           502  the worker process died mid-request

Errors of the layers below (httpx, the worker pipe) are translated into this
tree in one place each (``providers/http_base.py``, ``workers/supervisor.py``).

Exit codes are the one table :class:`ExitCode`; :data:`NO_RESTART` lists the
ones no restart can fix, which every supervisor (``keel serve --supervise``,
the worker supervisor, the systemd unit's ``RestartPreventExitStatus``)
honours. This module imports nothing heavy: the worker process imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """How a keel process exits (sysexits.h numbers where one fits)."""

    OK = 0
    FAILURE = 1
    """A runtime failure; a restart may help."""
    USAGE = 2
    DEPENDENCY = 69
    """EX_UNAVAILABLE: a native library or a model file is missing or unusable."""
    PORT_BUSY = 75
    """EX_TEMPFAIL: the port is taken; keel never moves to another one."""
    CONFIG = 78
    """EX_CONFIG: the config is invalid."""


NO_RESTART: Mapping[int, str] = {
    ExitCode.CONFIG: "config error",
    ExitCode.DEPENDENCY: "missing dependency or unusable model",
    ExitCode.PORT_BUSY: "port busy",
}
"""The exits a restart cannot fix, and why: a person has to act."""


class KeelError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"
    exit_code: int = ExitCode.FAILURE
    provider: str | None = None
    """The provider that failed, where one did: it labels the request's metrics."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    def to_body(self) -> dict[str, object]:
        error: dict[str, object] = {
            "message": self.message,
            "type": self.error_type,
            "code": self.code,
            "param": self.param,  # null where no one field is at fault, as OpenAI sends it
        }
        return {"error": error}


def failed(status: int) -> bool:
    """A status keel answers when it failed a request: a 5xx, or the 408 of a completion
    past its time limit (:class:`CompletionTimeout`). What logs, the status page and the
    error-rate alert count as failures."""
    return status >= 500 or status == 408


def internal_error() -> KeelError:
    """What a client is told of keel's own bug: the log holds the traceback."""
    return KeelError("internal error; the server log has the details")


class RequestError(KeelError):
    """The client sent something keel cannot serve; the message says what to fix."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"
    exit_code = ExitCode.USAGE


class PayloadTooLarge(RequestError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedEncoding(RequestError):
    status_code = 415
    code = "unsupported_encoding"


class AuthenticationError(RequestError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(RequestError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class Conflict(RequestError):
    status_code = 409
    code = "conflict"


class NotFound(RequestError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class ClientDisconnected(RequestError):
    """The client closed its connection: its work was cancelled. Nobody reads this
    answer; its status (nginx's 499) keeps the metrics apart from served requests."""

    status_code = 499
    code = "client_disconnected"


class ContextLengthExceeded(RequestError):
    """The caller's prompt does not fit the model's context window: its 400, never
    a provider failure. The numbers are set when the backend gave them."""

    code = "context_length_exceeded"

    def __init__(
        self,
        message: str,
        *,
        prompt_tokens: int | None = None,
        context_size: int | None = None,
        param: str | None = "prompt",
    ) -> None:
        super().__init__(message, param=param)
        self.prompt_tokens = prompt_tokens
        self.context_size = context_size

    def to_body(self) -> dict[str, object]:
        body = super().to_body()
        error = body["error"]
        assert isinstance(error, dict)
        if self.prompt_tokens is not None:
            error["prompt_tokens"] = self.prompt_tokens
        if self.context_size is not None:
            error["context_size"] = self.context_size
        return body


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: where it is and what is wrong."""

    key: str
    message: str
    value: object = None

    def render(self) -> str:
        shown = "" if self.value is None else f" (got {self.value!r})"
        return f"{self.key}: {self.message}{shown}"


class ConfigError(KeelError):
    """A config file (at startup, or one a reload was asked to apply) is invalid.

    Over HTTP it is the admin's 422 listing every issue by key; a reload that
    fails this way has changed nothing.
    """

    status_code = 422
    error_type = "invalid_config"
    code = "config_error"
    exit_code = ExitCode.CONFIG

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue.render()}" for issue in self.issues)
        count = len(self.issues)
        noun = "error" if count == 1 else "errors"
        super().__init__(f"{source}: {count} config {noun}:\n{lines}")

    def to_body(self) -> dict[str, object]:
        body = super().to_body()
        error = body["error"]
        assert isinstance(error, dict)
        error["issues"] = [{"key": issue.key, "message": issue.message} for issue in self.issues]
        return body


class DataRootUnusable(KeelError):
    """keel cannot keep its data at the data root (``$KEEL_ROOT`` or ``~/.keel``): it is
    a file, cannot be entered or written, or its disk is full. A person has to act, as
    on a config error (it crashed ``keel serve`` with a traceback, exit 1 or 3)."""

    code = "data_root_unusable"
    exit_code = ExitCode.CONFIG


class BadEnvironment(KeelError):
    """An environment variable keel reads holds what it cannot be (``HF_TOKEN`` pasted
    with smart quotes): a person has to set it again, as a config error."""

    code = "bad_environment"
    exit_code = ExitCode.CONFIG


class MissingDependency(KeelError):
    """A native library or a model file keel needs is missing or unusable."""

    code = "missing_dependency"
    exit_code = ExitCode.DEPENDENCY


class InsufficientMemory(MissingDependency):
    """The model would not fit in the memory available: refused instead of an OOM kill."""

    status_code = 507
    error_type = "insufficient_memory"
    code = "insufficient_memory"


class InsufficientStorage(MissingDependency):
    """A model to download would not fit on disk: refused before the download starts."""

    status_code = 507
    error_type = "insufficient_storage"
    code = "insufficient_storage"


class PortBusy(KeelError):
    code = "port_busy"
    exit_code = ExitCode.PORT_BUSY


class RateLimited(KeelError):
    """Too many requests; ``retry_after`` says when to come back."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"


class Overloaded(RateLimited):
    """keel's own capacity for a role is used up (queue full, or no slot in time)."""

    code = "overloaded"


class Unavailable(KeelError):
    status_code = 503
    error_type = "service_unavailable"
    code = "unavailable"


class WorkerUnavailable(Unavailable):
    code = "worker_unavailable"


class UpstreamError(KeelError):
    """A model backend failed; ``provider`` names which one."""

    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        code: str | None = None,
        upstream_status: int | None = None,
        retry_after: float | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(f"{provider}: {message}", code=code, retry_after=retry_after)
        self.provider = provider
        self.upstream_status = upstream_status
        self.details: Mapping[str, object] = details or {}
        """The backend's own error object (``type``, ``n_prompt_tokens``, ...), if any."""


class UpstreamConnectError(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"


class CompletionTimeout(UpstreamTimeout):
    """A code completion past ``[server] completion_timeout``: 408, as Tabby's own
    timeout answers; tabby-agent counts only a 408 (or 499) as a timeout, and took a
    504 for a failing server (a health check each time, its timeout advice never
    shown)."""

    status_code = 408
    code = "completion_timeout"


class UpstreamStatusError(UpstreamError):
    code = "upstream_status"


class UpstreamAuthError(UpstreamError):
    code = "upstream_auth_failed"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class WorkerCrashed(UpstreamError):
    code = "worker_crashed"

    def __init__(self, message: str, *, provider: str, worker: int | None = None) -> None:
        super().__init__(message, provider=provider)
        self.worker = worker
        """The pid of the worker process that died. One death fails every request in
        flight on it; the router counts it against the provider once."""
