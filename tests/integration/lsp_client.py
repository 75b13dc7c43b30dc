"""A small LSP client over a child process's stdin/stdout (JSON-RPC 2.0, Content-Length framing).

A reader thread parses the server's frames: responses are handed to the waiting
``request`` call, notifications are kept in ``notifications``, and requests from
the server (``workspace/configuration``, ``client/registerCapability``, ...) are
answered at once so the server never stalls waiting on the client.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

JsonObject = dict[str, Any]
ServerRequestHandler = Callable[[str, Any], Any]


class LspError(RuntimeError):
    pass


def default_server_request_handler(method: str, params: Any) -> Any:
    """Answers a server->client request the way a minimal editor would."""
    if method == "workspace/configuration":
        items = params.get("items", []) if isinstance(params, dict) else []
        return [None for _ in items]
    if method == "workspace/workspaceFolders":
        return []
    return None  # registerCapability, workDoneProgress/create, showMessageRequest, ...


class LspClient:
    def __init__(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str],
        cwd: Path,
        stderr_path: Path,
        on_server_request: ServerRequestHandler = default_server_request_handler,
    ) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=cwd,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout: IO[bytes] = self.process.stdout
        self._on_server_request = on_server_request
        self._write_lock = threading.Lock()
        self._next_id = 0
        self._pending: dict[int, queue.Queue[JsonObject]] = {}
        self._pending_lock = threading.Lock()
        self.notifications: list[JsonObject] = []
        self.server_requests: list[JsonObject] = []
        self.reader_error: BaseException | None = None
        self._reader = threading.Thread(target=self._read_loop, name="lsp-reader", daemon=True)
        self._reader.start()

    # -- wire -----------------------------------------------------------------

    def _send(self, message: JsonObject) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        frame = f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        with self._write_lock:
            self._stdin.write(frame)
            self._stdin.flush()

    def _read_frame(self) -> JsonObject | None:
        length: int | None = None
        while True:
            line = self._stdout.readline()
            if not line:
                return None  # EOF: the server exited
            line = line.strip()
            if not line:
                break
            name, _, value = line.decode("ascii").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length is None:
            raise LspError("frame without Content-Length")
        body = self._stdout.read(length)
        if len(body) < length:
            return None
        message: JsonObject = json.loads(body)
        return message

    def _read_loop(self) -> None:
        try:
            while (message := self._read_frame()) is not None:
                self._dispatch(message)
        except BaseException as error:  # surfaced by the next request()
            self.reader_error = error

    def _dispatch(self, message: JsonObject) -> None:
        if "method" in message and "id" in message:  # server -> client request
            self.server_requests.append(message)
            try:
                result = self._on_server_request(message["method"], message.get("params"))
                self._send({"id": message["id"], "result": result})
            except Exception as error:
                self._send({"id": message["id"], "error": {"code": -32603, "message": str(error)}})
        elif "method" in message:
            self.notifications.append(message)
        else:
            with self._pending_lock:
                waiter = self._pending.get(message.get("id"))  # type: ignore[arg-type]
            if waiter is not None:
                waiter.put(message)

    # -- API ------------------------------------------------------------------

    def notify(self, method: str, params: Any = None) -> None:
        message: JsonObject = {"method": method}
        if params is not None:
            message["params"] = params
        self._send(message)

    def request(self, method: str, params: Any = None, timeout: float = 30.0) -> Any:
        with self._pending_lock:
            self._next_id += 1
            request_id = self._next_id
            waiter: queue.Queue[JsonObject] = queue.Queue()
            self._pending[request_id] = waiter
        message: JsonObject = {"id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self._send(message)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    response = waiter.get(timeout=0.1)
                    break
                except queue.Empty:
                    self._check_alive(method)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no answer to {method} within {timeout}s") from None
        finally:
            with self._pending_lock:
                del self._pending[request_id]
        if "error" in response:
            raise LspError(f"{method} failed: {response['error']}")
        return response.get("result")

    def _check_alive(self, waiting_for: str) -> None:
        if self.reader_error is not None:
            raise LspError(f"reading the server failed: {self.reader_error!r}")
        if not self._reader.is_alive():
            code = self.process.poll()
            raise LspError(f"server closed its stdout (exit code {code}) before {waiting_for}")

    def close(self, timeout: float = 10.0) -> None:
        """Polite shutdown/exit, then terminate/kill whatever is left; closes every pipe."""
        try:
            if self.process.poll() is None and self._reader.is_alive():
                self.request("shutdown", timeout=timeout)
                self.notify("exit")
                self.process.wait(timeout)
        except (LspError, TimeoutError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            with contextlib.suppress(OSError):  # broken pipe: the server is gone already
                self._stdin.close()
            self._reader.join(5)  # the server has exited, so its stdout is at EOF
            self._stdout.close()
            self._stderr.close()

    def __enter__(self) -> LspClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
