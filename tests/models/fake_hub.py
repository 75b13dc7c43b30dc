"""A fake Hugging Face hub on a real loopback socket: the API ``huggingface_hub`` uses to pull.

Routes (as huggingface.co answers them for a public LFS file)::

    GET  /api/models/{org}/{repo}                    model info; ?blobs=true: sizes, LFS sha256
    HEAD /{org}/{repo}/resolve/{rev}/{file}          X-Repo-Commit, ETag / X-Linked-Etag, sizes
    GET  /{org}/{repo}/resolve/{rev}/{file}          the bytes; honours ``Range: bytes=N-`` (206)

Repo ids are found in any case, and answered in the hub's spelling (as huggingface.co
does). Faults, switched by attributes: ``token`` (a private repo: 401 without
``Authorization: Bearer <token>``), ``cut_after`` (the next file GET sends that
many bytes, then closes the connection), ``corrupt`` (one byte flipped, same
size: the LFS sha256 no longer matches), ``statuses`` (the answers of the next
file GETs: a status and its headers, or None for the file), ``cdn`` (a file's
HEAD and GET answer 302 to a second host, as the hub sends an LFS file to its CDN),
``refuse_resumes`` (that many resumed GETs on the CDN answer 403: a signed link
that expired). Every request is written down.
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
        self.statuses: list[tuple[int, dict[str, str]] | None] = []
        self.cdn = False
        self.refuse_resumes = 0
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        # shutdown() waits for the serving loop's next poll: 0.5 s by default, per test
        serve = functools.partial(self._server.serve_forever, poll_interval=0.02)
        self._thread = threading.Thread(target=serve, daemon=True)
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._cdn.daemon_threads = True
        serve = functools.partial(self._cdn.serve_forever, poll_interval=0.02)
        self._cdn_thread = threading.Thread(target=serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._cdn_thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        for server in (self._server, self._cdn):
            server.shutdown()
            server.server_close()

    def repo(self, name: str) -> str | None:
        """The hub's spelling of the repo id ``name``, found in any case."""
        return next((repo for repo in self.repos if repo.lower() == name.lower()), None)

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
            on_cdn = self.server is hub._cdn
            if (
                not on_cdn
                and hub.token is not None
                and headers.get("authorization") != (f"Bearer {hub.token}")
            ):
                self._error(401, "RepoNotFound", "Invalid username or password.")
                return
            try:
                if parts[:2] == ["api", "models"]:
                    self._model_info(parts[2:4])
                elif len(parts) >= 5 and parts[2] == "resolve" and hub.cdn and not on_cdn:
                    files = hub.repos.get(hub.repo("/".join(parts[:2])) or "", {})
                    self.send_response(302)
                    self.send_header("Location", f"{hub.cdn_url}{self.path}")
                    self._file_headers(files.get("/".join(parts[4:]), b""))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
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
            repo = hub.repo("/".join(name))
            files = hub.repos.get(repo) if repo is not None else None
            if repo is None or files is None:
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

        def _file_headers(self, data: bytes) -> None:
            etag = sha256(data)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")

        def _file(self, repo: str, filename: str, *, head: bool) -> None:
            files = hub.repos.get(hub.repo(repo) or "")
            if files is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return
            if filename not in files:
                self._error(404, "EntryNotFound", f"{filename} does not exist")
                return
            data = files[filename]
            wanted = self.headers.get("Range", "")
            if not head and self._fault(resumed=wanted.startswith("bytes=")):
                return
            start = int(wanted[6:].split("-")[0]) if wanted.startswith("bytes=") and not head else 0
            self.send_response(206 if start else 200)
            self._file_headers(data)
            if hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
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

        def _fault(self, *, resumed: bool) -> bool:
            """Whether a fault answered this file GET in the file's place."""
            if resumed and self.server is hub._cdn and hub.refuse_resumes:
                hub.refuse_resumes -= 1
                self._error(403, None, "Request has expired")
                return True
            answer = hub.statuses.pop(0) if hub.statuses else None
            if answer is None:
                return False
            status, headers = answer
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

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
