"""Who may call what: every route declares it, and the declarations hold over HTTP."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from tests.conftest import KeelProcess, free_port, keel_cli, running_keel, start_keel

from keel.api.access import declared_access
from keel.app import create_app
from keel.auth import Access
from keel.config import Paths, Settings

USER_KEY = "user-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"
FILE_KEY = "file-key-0123456789"


def app_routes() -> list[tuple[str, str, Access]]:
    app = create_app(Settings(), Paths(Path("/nonexistent")))
    found = []
    for route in app.routes:
        access = declared_access(route)
        assert access is not None, f"route {getattr(route, 'path', route)} declares no access"
        if isinstance(route, APIRoute):
            for method in sorted(route.methods):
                found.append((route.path, method, access))
    return found


def test_every_route_declares_public_user_or_admin() -> None:
    routes = app_routes()
    assert ("/v1/completions", "POST", Access.USER) in routes
    assert ("/health", "GET", Access.PUBLIC) in routes
    assert len(routes) >= 14


def test_a_route_without_a_declaration_is_caught() -> None:
    app = create_app(Settings(), Paths(Path("/nonexistent")))

    @app.get("/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    undeclared = [r for r in app.routes if declared_access(r) is None]
    assert [getattr(r, "path", None) for r in undeclared] == ["/forgotten"]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    root = tmp_path_factory.mktemp("secured")
    (root / "keys.toml").write_text(f'api_keys = ["{FILE_KEY}"]\n')
    config = f"""
[auth]
api_keys = ["{USER_KEY}"]
admin_key = "{ADMIN_KEY}"
keys_file = "keys.toml"
"""
    with running_keel(root, config) as server:
        yield server


def test_each_route_rejects_missing_and_wrong_keys(secured: KeelProcess) -> None:
    # One client for the ~170 requests: each httpx.Client built costs ~24 ms of CPU.
    with secured.client(timeout=30) as client:

        def call(method: str, path: str, headers: dict[str, str]) -> httpx.Response:
            body = {} if method == "POST" else None
            return client.request(method, path, json=body, headers=headers)

        for path, method, access in app_routes():
            if access is Access.PUBLIC:
                response = call(method, path, {})
                assert response.status_code != 401, (path, method)
                continue
            missing = call(method, path, {})
            assert missing.status_code == 401, (path, method, missing.text)
            assert missing.json()["error"]["type"] == "authentication_error"
            assert missing.headers["WWW-Authenticate"] == 'Bearer realm="keel"'  # as HTTP asks
            wrong = call(method, path, {"Authorization": "Bearer not-a-key-at-all"})
            assert wrong.status_code == 401, (path, method)
            user = call(method, path, {"Authorization": f"Bearer {USER_KEY}"})
            if access is Access.ADMIN:
                assert user.status_code == 403, (path, method, user.text)
            else:
                assert user.status_code not in (401, 403), (path, method, user.text)


def test_keys_are_accepted_in_every_header(secured: KeelProcess) -> None:
    body = {"language": "python", "segments": {"prefix": "def f():\n    return "}}
    for headers in (
        {"Authorization": f"Bearer {USER_KEY}"},
        {"x-api-key": USER_KEY},
        {"api-key": USER_KEY},  # Azure OpenAI's, as clients set up "Azure style" send it
        {"x-admin-key": ADMIN_KEY},
        {"Authorization": f"Bearer {FILE_KEY}"},
    ):
        response = httpx.post(
            f"{secured.url}/v1/completions", json=body, headers=headers, timeout=60
        )
        assert response.status_code == 200, (headers, response.text)


def test_a_key_sent_in_another_form_is_told_how_to_send_it(secured: KeelProcess) -> None:
    """``Authorization: <key>`` and ``Authorization: Token <key>`` were told "missing API
    key", with the key right there."""
    said = {}
    for value in (USER_KEY, f"Token {USER_KEY}", f"Bearer\t{USER_KEY}"):
        answer = httpx.get(f"{secured.url}/v1/models", headers={"Authorization": value})
        assert answer.status_code == 401, answer.text
        said[value] = answer.json()["error"]["message"]
    assert said[USER_KEY].startswith("the Authorization header holds a key with no scheme")
    assert said[f"Token {USER_KEY}"].startswith("the Authorization header holds scheme 'Token'")
    # the scheme is there: it was called "a key with no scheme"
    assert "another character than a space (a tab?)" in said[f"Bearer\t{USER_KEY}"]
    assert all("'Bearer <key>'" in message and USER_KEY not in message for message in said.values())
    for empty in ("Bearer", "bearer"):  # an unset $KEEL_KEY: "Bearer" was taken for the key
        answer = httpx.get(f"{secured.url}/v1/models", headers={"Authorization": empty})
        assert answer.json()["error"]["message"].startswith("the Bearer key is empty"), answer.text


def test_keys_file_change_takes_effect_and_a_bad_file_keeps_the_old_keys(
    secured: KeelProcess,
) -> None:
    keys_file = secured.root / "keys.toml"
    new_key = "rotated-key-0123456789"
    url = f"{secured.url}/v1/models"

    def status(key: str) -> int:
        return httpx.get(url, headers={"x-api-key": key}, timeout=10).status_code

    keys_file.write_text(f'api_keys = ["{new_key}"]\n')
    deadline = time.monotonic() + 10
    while status(new_key) != 200:
        assert time.monotonic() < deadline, "the new key never took effect"
        time.sleep(0.3)
    assert status(FILE_KEY) == 401  # the rotated-out key stops working
    assert status(USER_KEY) == 200  # config keys stay

    keys_file.write_text("api_keys = [unterminated\n")
    time.sleep(1.5)
    assert status(new_key) == 200  # a broken file keeps the keys in force
    reload = httpx.post(
        f"{secured.url}/v1/admin/reload", headers={"x-admin-key": ADMIN_KEY}, timeout=60
    )
    assert reload.status_code == 200, reload.text
    assert status(new_key) == 200  # across a config reload too: it revoked them all
    audit = (secured.root / "audit.log").read_text()
    assert '"action":"keys_reload"' in audit and '"result":"error"' in audit
    assert new_key not in audit  # keys never reach the audit log
    keys_file.write_text(f'api_keys = ["{FILE_KEY}"]\n')


def test_rate_limit_per_key(tmp_path: Path) -> None:
    config = (
        f'[auth]\napi_keys = ["{USER_KEY}"]\nadmin_key = "{ADMIN_KEY}"\nrequests_per_minute = 3\n'
    )
    server = start_keel(tmp_path, config)
    try:
        server.wait_ready()
        headers = {"x-api-key": USER_KEY}
        body = {"language": "python", "segments": {"prefix": "x = "}}
        url = f"{server.url}/v1/completions"
        codes = [httpx.post(url, json=body, headers=headers, timeout=60) for _ in range(4)]
        assert [r.status_code for r in codes] == [200, 200, 200, 429]
        assert int(codes[-1].headers["Retry-After"]) >= 1
        assert codes[-1].json()["error"]["code"] == "rate_limited"
        # a config reload keeps what each key has spent: it handed out a new minute
        admin = {"x-admin-key": ADMIN_KEY}
        reload = httpx.post(f"{server.url}/v1/admin/reload", headers=admin, timeout=60)
        assert reload.status_code == 200, reload.text
        assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 429
        # Model work is limited, not the key's monitoring: a scrape, the status page.
        for path in ("/v1/models", "/metrics", "/v1/providers", "/v1/stats"):
            response = httpx.get(f"{server.url}{path}", headers=headers, timeout=10)
            assert response.status_code == 200, (path, response.text)
        # counted and logged as the key's, not as a full queue (they looked alike)
        metrics = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
        refused = 'keel_rejections_total{reason="key_rate_limited",role="completion"} 2.0'
        assert refused in metrics
        logged = [line for line in server.log.read_text().splitlines() if "-> 429" in line]
        assert logged and all(" key=" in line and USER_KEY not in line for line in logged)
        # the key's own throttle is no error of keel's on the status page (one client's
        # limit showed as half of keel's requests failing)
        stats = httpx.get(f"{server.url}/v1/stats", headers=headers, timeout=10).json()
        assert stats["summary"]["requests"] == 5 and stats["summary"]["errors"] == 0, stats
    finally:
        server.stop()


def test_binding_beyond_loopback_without_keys_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "KEEL_ROOT": str(tmp_path)}
    result = keel_cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), env=env)
    assert result.returncode == 78, result.stderr
    assert "allow_unauthenticated_remote" in result.stderr
