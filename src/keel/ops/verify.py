"""``keel verify URL``: a post-deploy smoke test against a running keel.

Each check is a real request a client would make: liveness, readiness, a
Tabby completion, a chat answer, an embedding and a metrics scrape. One line
per check (name, ok/FAIL, milliseconds, detail); exit 0 only if all pass, so
a deploy script can gate on it. Checks run in order and never stop early: the
operator sees everything that is wrong at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

TABBY_COMPLETION = {
    "language": "python",
    "segments": {"prefix": "def add(a, b):\n    return", "suffix": "\n"},
}
CHAT = {
    "messages": [{"role": "user", "content": "Say hello in one word."}],
    "max_tokens": 16,
    "temperature": 0,
}
EMBEDDING = {
    "input": "".join(f"def add_{n}(value):\n    return value + {n}\n\n\n" for n in range(12))
}
"""A chunk of code the size a code index embeds (~200 tokens), not a word: an engine that
takes only short inputs (one embedding batch of 64 tokens did) fails here."""


class CheckFailed(Exception):
    """The answer was wrong; the message says how."""


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    ok: bool
    millis: float
    detail: str

    def line(self) -> str:
        return (
            f"{self.name:<11} {'ok' if self.ok else 'FAIL':<4} {self.millis:7.0f} ms  {self.detail}"
        )


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"HTTP {response.status_code}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _json(response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise CheckFailed(_error_text(response))
    try:
        return response.json()
    except ValueError:
        raise CheckFailed(f"not JSON: {response.text[:200]!r}") from None


KEEL_VERSION_MARK = "-keel."
"""In ``/v1/health``'s ``version.git_describe`` (``v0.27.0-keel.0.1.0``): what tells keel
from Tabby, and from any server that answers 200 to every path."""


def check_health(client: httpx.Client) -> str:
    """Liveness, and that keel is what answers: any HTTP server answering 200 passed as
    "alive; model None, None", and every later check failed for no reason given."""
    body = _json(client.get("/health"))
    if body != {"status": "ok"}:
        said = repr(body)[:120]
        raise CheckFailed(
            f"something that is not keel answers: /health answered {said}, where keel "
            """answers {"status": "ok"}: check the URL's host and port"""
        )
    tabby = _json(client.get("/v1/health"))
    version = tabby.get("version") if isinstance(tabby, dict) else None
    describe = version.get("git_describe") if isinstance(version, dict) else None
    if not isinstance(describe, str) or KEEL_VERSION_MARK not in describe:
        raise CheckFailed(
            f"something that is not keel answers: /v1/health names no keel version "
            f"(version.git_describe: {describe!r}; keel's reads v...{KEEL_VERSION_MARK}...): "
            "check the URL's host and port"
        )
    return f"alive; model {tabby.get('model')}, {describe}"


def check_ready(client: httpx.Client) -> str:
    response = client.get("/ready")
    try:
        roles = response.json().get("roles", {})
    except ValueError:
        roles = {}
    states = ", ".join(
        f"{role}={info.get('state')}" for role, info in roles.items() if isinstance(info, dict)
    )
    if response.status_code != 200:
        raise CheckFailed(f"HTTP {response.status_code}: not ready ({states})")
    return states or "ready"


def _served_by(response: httpx.Response) -> str:
    """Which provider answered (a fallback's answer passed as the primary's)."""
    provider = response.headers.get("x-keel-provider")
    return f" (from {provider})" if provider else ""


def check_completion(client: httpx.Client) -> str:
    response = client.post("/v1/completions", json=TABBY_COMPLETION)
    body = _json(response)
    completion_id = body.get("id", "")
    choices = body.get("choices") or []
    if not str(completion_id).startswith("cmpl-") or not choices:
        raise CheckFailed(f"not a Tabby completion: {body!r}"[:300])
    text = choices[0].get("text")
    if not isinstance(text, str):
        raise CheckFailed(f"choice without text: {choices[0]!r}"[:300])
    return f"{completion_id}: {text[:40]!r}{_served_by(response)}"


def check_chat(client: httpx.Client) -> str:
    response = client.post("/v1/chat/completions", json=CHAT)
    body = _json(response)
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise CheckFailed(f"not a chat completion: {body!r}"[:300]) from None
    if not isinstance(content, str) or not content.strip():
        raise CheckFailed(f"empty answer: {body!r}"[:300])
    return repr(content.strip()[:40]) + _served_by(response)


def check_embedding(client: httpx.Client) -> str:
    response = client.post("/v1/embeddings", json=EMBEDDING)
    body = _json(response)
    try:
        vector = body["data"][0]["embedding"]
    except (KeyError, IndexError, TypeError):
        raise CheckFailed(f"not an embedding response: {body!r}"[:300]) from None
    if not isinstance(vector, list) or not vector:
        raise CheckFailed("empty embedding")
    if not all(isinstance(x, int | float) for x in vector):
        raise CheckFailed("embedding has non-numbers")
    return f"{len(vector)} dimensions{_served_by(response)}"


def check_metrics(client: httpx.Client) -> str:
    response = client.get("/metrics")
    if response.status_code != 200:
        raise CheckFailed(_error_text(response))
    families = {
        line.split()[2] for line in response.text.splitlines() if line.startswith("# TYPE ")
    }
    for needed in ("keel_build_info", "keel_requests_total", "keel_role_ready"):
        if needed not in families:
            raise CheckFailed(f"{needed} missing from the scrape")
    return f"{len(families)} metric families"


CHECKS: tuple[tuple[str, Callable[[httpx.Client], str]], ...] = (
    ("health", check_health),
    ("ready", check_ready),
    ("completion", check_completion),
    ("chat", check_chat),
    ("embedding", check_embedding),
    ("metrics", check_metrics),
)


def iter_checks(
    url: str, *, api_key: str | None = None, timeout: float = 120.0
) -> Iterator[Result]:
    """Each check's result as soon as it is known."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        for name, check in CHECKS:
            start = time.perf_counter()
            try:
                detail, ok = check(client), True
            except CheckFailed as exc:
                detail, ok = str(exc), False
            except httpx.HTTPError as exc:
                detail, ok = f"{type(exc).__name__}: {exc or 'no detail'}", False
            yield Result(name, ok, (time.perf_counter() - start) * 1000, detail)


def main(url: str, *, api_key: str | None, timeout: float, out: TextIO) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the lines below say it all
    out.write(f"verifying {url}\n")
    results = []
    for result in iter_checks(url, api_key=api_key, timeout=timeout):
        results.append(result)
        out.write(result.line() + "\n")
        out.flush()
    failed = [result.name for result in results if not result.ok]
    if failed:
        out.write(f"FAILED: {', '.join(failed)}\n")
        return 1
    out.write(f"all {len(results)} checks passed\n")
    return 0
