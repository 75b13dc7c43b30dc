"""A backend's credential in its URL (``user:password@``) is never shown: a user key read
it in /v1/model, /v1/providers and the status page's stats."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.api.conftest import USER, Backends, build_app, serving
from tests.fakes.upstreams import Behaviour


@pytest.mark.parametrize("credential", ["team:SECRETPW@", "SECRETPW@", "team:PART@SECRETPW@"])
async def test_an_endpoints_credentials_are_masked_wherever_it_is_shown(
    backends: Backends, tmp_path: Path, credential: str
) -> None:
    """A user name alone (``//TOKEN@``, sent as Basic auth) was shown everywhere:
    /metrics' labels, ``X-Keel-Provider``, /v1/providers, errors and the log."""
    url = backends.fallback.url
    config = backends.config().replace(
        f'kind = "openai/chat"\napi_endpoint = "{url}/v1"',
        f'kind = "openai/chat"\napi_endpoint = "{url.replace("//", "//" + credential)}/v1"',
    )
    assert "SECRETPW" in config
    async with serving(build_app(tmp_path / "keel", config)) as client:
        chat = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers=USER,
        )
        shown = [
            (await client.get(path, headers=USER)).text
            for path in ("/v1/model?role=chat", "/v1/providers", "/v1/stats", "/metrics")
        ]
    assert chat.status_code == 200, chat.text  # the backend still gets its token
    shown.append(chat.headers["x-keel-provider"])
    assert all("SECRETPW" not in text for text in shown), shown
    assert ("//team:***@" if ":" in credential else "//***@") in shown[0]
    sent = [r.headers.get("authorization", "") for r in backends.fallback.requests]
    assert any(value.startswith("Basic ") for value in sent), "the backend still gets it"


async def test_a_backend_echoing_keels_api_key_has_it_masked(
    backends: Backends, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend (or gateway) that quotes the key it refused ("Incorrect API key
    provided: Bearer ...") put keel's api_key in the client's error, /v1/providers'
    last_error and the log."""
    url = backends.fallback.url
    config = backends.config().replace(
        f'kind = "openai/chat"\napi_endpoint = "{url}/v1"',
        f'kind = "openai/chat"\napi_endpoint = "{url}/v1"\napi_key = "sk-UPSTREAM-s3cr3t"',
    )
    echo = {"error": {"message": "Incorrect API key provided: Bearer sk-UPSTREAM-s3cr3t"}}
    backends.fallback.behave(Behaviour.error(401, echo))
    try:
        async with serving(build_app(tmp_path / "keel", config)) as client:
            chat = await client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}]},
                headers=USER,
            )
            shown = [chat.text] + [
                (await client.get(path, headers=USER)).text
                for path in ("/v1/providers", "/v1/stats")
            ]
    finally:
        backends.fallback.reset_behaviour()
    assert chat.status_code >= 400 and "Incorrect API key provided: Bearer ***" in chat.text
    assert all("s3cr3t" not in text for text in [*shown, caplog.text]), shown
