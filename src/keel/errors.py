"""The one error tree of keel.

Every failure keel reports is one of these classes. Each carries the HTTP
status it renders as, the OpenAI error ``type`` and the CLI exit code, so the
API handler and the CLI never decide that for themselves::

    KeelError                       500  server_error            exit 1
    ├── RequestError                400  invalid_request_error   exit 2
    │   ├── PayloadTooLarge         413
    │   ├── AuthenticationError     401  authentication_error
    │   └── NotFound                404  not_found_error
    ├── ConfigError                 500  server_error            exit 78
    ├── MissingDependency           500  server_error            exit 69
    ├── PortBusy                    500  server_error            exit 75
    ├── Unavailable                 503  service_unavailable     exit 1
    │   └── WorkerUnavailable       503  (a local worker is starting / gave up)
    └── UpstreamError               502  upstream_error          exit 1
        ├── UpstreamConnectError    502  connect refused / reset / DNS
        ├── UpstreamTimeout         504
        ├── UpstreamStatusError     502  the backend answered with an error status
        ├── UpstreamAuthError       502  the backend rejected our key (401/403)
        ├── UpstreamProtocolError   502  malformed JSON, broken SSE
        └── WorkerCrashed           502  the worker process died mid-request

Errors of the layers below (httpx, the worker pipe) are translated into this
tree in one place each (``providers/http_base.py``, ``workers/supervisor.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class KeelError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"
    exit_code: int = 1

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
        }
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


class RequestError(KeelError):
    """The client sent something keel cannot serve; the message says what to fix."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"
    exit_code = 2


class PayloadTooLarge(RequestError):
    status_code = 413
    code = "payload_too_large"


class AuthenticationError(RequestError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class NotFound(RequestError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


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
    code = "config_error"
    exit_code = 78

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue.render()}" for issue in self.issues)
        count = len(self.issues)
        noun = "error" if count == 1 else "errors"
        super().__init__(f"{source}: {count} config {noun}:\n{lines}")


class MissingDependency(KeelError):
    """A native library or a model file keel needs is missing or unusable."""

    code = "missing_dependency"
    exit_code = 69


class PortBusy(KeelError):
    code = "port_busy"
    exit_code = 75


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
    ) -> None:
        super().__init__(f"{provider}: {message}", code=code, retry_after=retry_after)
        self.provider = provider
        self.upstream_status = upstream_status


class UpstreamConnectError(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"


class UpstreamStatusError(UpstreamError):
    code = "upstream_status"


class UpstreamAuthError(UpstreamError):
    code = "upstream_auth_failed"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class WorkerCrashed(UpstreamError):
    code = "worker_crashed"
