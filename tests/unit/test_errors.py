"""The one error tree: every class drawn in the docstring, every exit code in the table,
and a module the worker process can import without pulling in the web stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

import keel.errors as errors
from keel.api.errors import error_response
from keel.errors import ConfigError, ConfigIssue, ExitCode, KeelError, RateLimited


def tree_classes() -> list[type[KeelError]]:
    return [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, KeelError)
    ]


def test_every_error_class_is_drawn_in_the_tree() -> None:
    doc = errors.__doc__ or ""
    missing = [cls.__name__ for cls in tree_classes() if f" {cls.__name__} " not in doc]
    assert missing == []


def test_every_error_exits_with_a_code_from_the_table() -> None:
    for cls in tree_classes():
        assert cls.exit_code in set(ExitCode), cls.__name__
        assert 400 <= cls.status_code < 600, cls.__name__


def test_a_config_error_renders_every_issue_by_key() -> None:
    error = ConfigError(
        "config.toml", [ConfigIssue("server.port", "must be a port", 0), ConfigIssue("x", "?")]
    )
    body = error.to_body()["error"]
    assert isinstance(body, dict)
    assert body["type"] == "invalid_config" and body["code"] == "config_error"
    assert body["issues"] == [
        {"key": "server.port", "message": "must be a port"},
        {"key": "x", "message": "?"},
    ]
    assert (error.status_code, error.exit_code) == (422, 78)


def test_importing_the_errors_loads_nothing_heavy() -> None:
    heavy = ["fastapi", "starlette", "pydantic", "httpx", "asyncio", "keel.config"]
    code = (
        "import sys, keel.errors, keel.restart; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""


@pytest.mark.parametrize(("wait", "header"), [(10.2, "11"), (10.0, "10"), (0.3, "1"), (0.0, "1")])
def test_retry_after_is_rounded_up(wait: float, header: str) -> None:
    """A client that waits what Retry-After says is not refused again: 10.4 s said "10",
    and the OpenAI SDK spent a retry on a certain 429."""
    response = error_response(RateLimited("over the key's rate", retry_after=wait))
    assert response.headers["Retry-After"] == header
