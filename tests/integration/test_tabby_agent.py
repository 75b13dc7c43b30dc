"""Tabby's own IDE agent (npm ``tabby-agent``, run as a language server) against a real keel.

The agent is what Tabby's editor plugins embed: it health-checks the server,
builds the completion request from the open document and post-processes the
answer. This drives it the way an editor does — LSP over stdio — with HOME
pointed at a temporary directory that holds only its config file (keel's
loopback URL as the endpoint, anonymous usage tracking off, debug logging on
so the assertions can read what the agent sent and received).

``tests/node/package.json`` pins the agent; ``make node-deps`` installs it.
tabby-agent 1.5.0 serves the standard ``textDocument/completion`` request
(its ``initialize`` answer advertises ``completionProvider`` only).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import deps
from tests.conftest import KeelProcess
from tests.integration.lsp_client import LspClient

pytestmark = [pytest.mark.integration, pytest.mark.node]

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
AGENT_BIN = NODE_DIR / "node_modules" / ".bin" / "tabby-agent"
AGENT_VERSION = "1.5.0"  # keep in step with tests/node/package.json

DOCUMENT = "import math\n\n\ndef area_of_circle(radius):\n    return \n"
CURSOR = {"line": 4, "character": len("    return ")}


@dataclass
class AgentRun:
    """Everything one editor session with the agent produced; the agent has exited."""

    initialize: dict[str, Any]
    completion: dict[str, Any]
    notifications: list[dict[str, Any]]
    server_requests: list[dict[str, Any]]
    log: list[dict[str, Any]]  # the agent's own debug log (pino JSON lines)
    stderr: str
    keel_health: dict[str, Any]

    def records(self, message: str) -> list[dict[str, Any]]:
        return [record for record in self.log if record.get("msg") == message]

    def diagnostics(self) -> str:
        tail = "\n".join(json.dumps(record)[:600] for record in self.log[-25:])
        return (
            f"agent stderr:\n{self.stderr[-3000:]}\n"
            f"LSP notifications from the agent: {self.notifications}\n"
            f"agent log (last records):\n{tail}"
        )


def agent_command() -> list[str]:
    deps.wait_for("node")
    if shutil.which("node") is None:
        pytest.fail("Node.js (`node`) is not on PATH; tabby-agent needs Node.js >= 18")
    if not AGENT_BIN.exists():
        pytest.fail(f"{AGENT_BIN} is missing: run `make node-deps` (npm install in tests/node)")
    return [str(AGENT_BIN), "--lsp", "--stdio"]


def write_agent_config(home: Path, endpoint: str) -> None:
    config_dir = home / ".tabby-client" / "agent"
    config_dir.mkdir(parents=True)
    (config_dir / "config.toml").write_text(
        f'[server]\nendpoint = "{endpoint}"\n\n'
        '[logs]\nlevel = "debug"\n\n'
        "[anonymousUsageTracking]\ndisable = true\n"
    )


def read_agent_log(home: Path) -> list[dict[str, Any]]:
    logs = home / ".tabby-client" / "agent" / "logs"
    files = sorted({path.resolve() for path in logs.glob("*.log")})
    records = []
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append({"msg": line})
    return records


def converse_with_agent(keel: KeelProcess, workdir: Path) -> AgentRun:
    """One editor session: initialize, open a Python file, ask for a completion, shut down."""
    command = agent_command()
    home, workspace = workdir / "home", workdir / "workspace"
    write_agent_config(home, keel.url)
    workspace.mkdir()
    source = workspace / "geometry.py"
    source.write_text(DOCUMENT)
    uri = source.as_uri()
    env = {
        **os.environ,
        "HOME": str(home),
        "USERPROFILE": str(home),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    with keel.client(timeout=10) as http:
        keel_health = http.get("/v1/health").json()

    with LspClient(command, env=env, cwd=workspace, stderr_path=workdir / "stderr.txt") as lsp:
        initialize = lsp.request(
            "initialize",
            {
                "processId": os.getpid(),
                "clientInfo": {"name": "keel-tests", "version": "1"},
                "rootUri": workspace.as_uri(),
                "workspaceFolders": [{"uri": workspace.as_uri(), "name": "workspace"}],
                "capabilities": {
                    "textDocument": {
                        "synchronization": {"dynamicRegistration": False},
                        "completion": {"completionItem": {"snippetSupport": False}},
                        "inlineCompletion": {"dynamicRegistration": False},
                    },
                    "workspace": {"configuration": True, "workspaceFolders": True},
                    "window": {"workDoneProgress": True},
                },
            },
            timeout=60,
        )
        lsp.notify("initialized", {})
        lsp.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": DOCUMENT}},
        )
        completion = lsp.request(
            "textDocument/completion",
            {
                "textDocument": {"uri": uri},
                "position": CURSOR,
                "context": {"triggerKind": 1},  # Invoked
            },
            timeout=90,
        )
        notifications, server_requests = list(lsp.notifications), list(lsp.server_requests)
    # The agent has exited here (shutdown/exit, else terminate/kill): its log is complete.
    return AgentRun(
        initialize=initialize,
        completion=completion,
        notifications=notifications,
        server_requests=server_requests,
        log=read_agent_log(home),
        stderr=(workdir / "stderr.txt").read_text(errors="replace"),
        keel_health=keel_health,
    )


@pytest.fixture(scope="module")
def agent_run(
    keel_server: KeelProcess, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[], AgentRun]:
    """The session runs once, lazily, inside the first test that asks: a missing Node.js
    or agent then FAILS that test (instead of erroring the fixture)."""
    runs: list[AgentRun] = []

    def run() -> AgentRun:
        if not runs:
            runs.append(converse_with_agent(keel_server, tmp_path_factory.mktemp("tabby-agent")))
        return runs[0]

    return run


def test_agent_gets_completion_from_keel(
    agent_run: Callable[[], AgentRun], keel_server: KeelProcess
) -> None:
    run = agent_run()
    server_info = run.initialize["serverInfo"]
    assert server_info == {"name": "tabby-agent", "version": AGENT_VERSION}, run.initialize
    assert "completionProvider" in run.initialize["capabilities"], run.initialize

    items = run.completion["items"]
    assert items, f"the agent returned no completion items\n{run.diagnostics()}"
    item = items[0]
    inserted = item["textEdit"]["newText"]
    assert inserted.strip(), f"empty completion item {item}\n{run.diagnostics()}"
    assert item["textEdit"]["range"]["start"] == CURSOR
    completion_id = item["data"]["completionId"]
    assert completion_id.startswith("cmpl-"), item  # keel's id; the agent's own are "agent-..."

    # The agent's request to keel: the document split at the cursor.
    [request] = run.records("Completion request")
    assert request["url"] == f"{keel_server.url}/v1/completions"
    body = request["requestOptions"]["body"]
    assert body["language"] == "python"
    assert body["segments"]["prefix"] == DOCUMENT[: DOCUMENT.index("return ") + len("return ")]
    assert body["segments"]["suffix"] == "\n"

    # keel's answer, as the agent received it, is what the editor was offered.
    [response] = run.records("Completion response")
    keel_answer = response["response"]["data"]
    assert keel_answer["id"] == completion_id
    keel_text = keel_answer["choices"][0]["text"]
    assert inserted.strip() in keel_text, (inserted, keel_text)

    # And keel itself recorded serving that completion.
    with closing(sqlite3.connect(keel_server.root / "events.sqlite3")) as db:
        rows = db.execute(
            "SELECT language, data FROM events WHERE kind = 'completion' AND completion_id = ?",
            (completion_id,),
        ).fetchall()
    assert len(rows) == 1, f"keel has no record of completion {completion_id}"
    language, data = rows[0]
    assert language == "python"
    assert json.loads(data)["chars"] == len(keel_text)


def test_agent_health_check_reaches_keel(
    agent_run: Callable[[], AgentRun], keel_server: KeelProcess
) -> None:
    run = agent_run()
    requests = run.records("Health check request")
    assert requests and requests[0]["url"] == f"{keel_server.url}/v1/health", run.diagnostics()
    responses = run.records("Health check response")
    assert responses, f"the agent's health check got no answer\n{run.diagnostics()}"
    # Byte for byte the body keel serves (keel has no access log; this is keel's answer).
    assert responses[0]["response"]["data"] == run.keel_health
    assert not run.records("Health check error: unknown error"), run.diagnostics()
    statuses = [r["event"]["status"] for r in run.records("Status changed") if "event" in r]
    assert statuses[:1] == ["ready"], statuses  # then "finalized" at shutdown
    warnings = [n for n in run.notifications if n["method"] == "window/showMessage"]
    assert not warnings, warnings  # the agent warns the user when it is disconnected


def test_agent_fetches_server_setting(agent_run: Callable[[], AgentRun]) -> None:
    run = agent_run()
    skipped = run.records("Skip fetching server config due to server version")
    assert not skipped, f"agent skipped /v1beta/server_setting for version {run.keel_health}"
    assert run.records("Fetch server config response"), run.diagnostics()
