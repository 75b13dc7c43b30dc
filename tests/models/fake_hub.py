"""A fake Hugging Face hub on a real loopback socket: the API ``huggingface_hub`` uses to pull.

Routes (as huggingface.co answers them for a public LFS file)::

    GET  /api/models/{org}/{repo}                    model info; ?blobs=true: sizes, LFS sha256
    HEAD /{org}/{repo}/resolve/{rev}/{file}          X-Repo-Commit, ETag / X-Linked-Etag, sizes
    GET  /{org}/{repo}/resolve/{rev}/{file}          the bytes; honours ``Range: bytes=N-`` (206)

Faults, switched by attributes: ``token`` (a private repo: 401 without
``Authorization: Bearer <token>``), ``cut_after`` (the next file GET sends that
many bytes, then closes the connection), ``corrupt`` (one byte flipped, same
size: the LFS sha256 no longer matches). Every request is written down.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.conftest import KeelProcess, start_keel

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.token: str | None = None
        self.cut_after: int | None = None
        self.pause = 0.0
        """Seconds between the MiB of a file sent (a slow link)."""
        self.corrupt = False
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        # shutdown() waits for the serving loop's next poll: 0.5 s by default, per test
        serve = functools.partial(self._server.serve_forever, poll_interval=0.02)
        self._thread = threading.Thread(target=serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self) -> list[Seen]:
        """The GETs of file bytes (not the API)."""
        return [s for s in self.seen if s.method == "GET" and "/resolve/" in s.path]

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)


@functools.cache  # the same file is served by many tests: hash it once
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _serve(self, *, head: bool) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            hub.record(Seen(self.command, self.path, headers))
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if hub.token is not None and headers.get("authorization") != f"Bearer {hub.token}":
                self._error(401, "RepoNotFound", "Invalid username or password.")
                return
            try:
                if parts[:2] == ["api", "models"]:
                    self._model_info(parts[2:4])
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._file("/".join(parts[:2]), "/".join(parts[4:]), head=head)
                else:
                    self._error(404, None, "Not found")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _error(self, status: int, code: str | None, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _model_info(self, name: list[str]) -> None:
            repo = "/".join(name)
            files = hub.repos.get(repo)
            if files is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return
            siblings = [
                {
                    "rfilename": filename,
                    "size": len(data),
                    "blobId": sha256(data)[:40],
                    "lfs": {"size": len(data), "sha256": sha256(data), "pointerSize": 134},
                }
                for filename, data in files.items()
            ]
            info = {"_id": "1", "id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}
            body = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, repo: str, filename: str, *, head: bool) -> None:
            files = hub.repos.get(repo)
            if files is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return
            if filename not in files:
                self._error(404, "EntryNotFound", f"{filename} does not exist")
                return
            data = files[filename]
            etag = sha256(data)
            if hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = 0
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes=") and not head:
                start = int(wanted[6:].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            cut, hub.cut_after = hub.cut_after, None
            if cut is not None:
                self.wfile.write(data[start : start + cut])
                self.wfile.flush()
                self.close_connection = True
                return
            view = memoryview(data)
            for offset in range(start, len(data), 1 << 20):
                self.wfile.write(view[offset : offset + (1 << 20)])
                time.sleep(hub.pause)

    return Handler


def keel_with_hub(root: Path, hub: FakeHub, config: str | None = None) -> KeelProcess:
    """A real `keel serve` at ``root`` (ready) whose pulls go to ``hub``, never to
    huggingface.co, with no token or offline switch of the environment's."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", hub.url)
        env.setenv("HF_HOME", str(root / "hf-home"))
        env.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        env.delenv("HF_TOKEN", raising=False)
        env.delenv("HF_HUB_OFFLINE", raising=False)
        keel = start_keel(root, config)
    keel.wait_ready()
    return keel
