"""A hub that answers, but not with the file, is not "unreachable".

Every failure of the file's lookup was "cannot reach <hub> ...: Server error '500
Internal Server Error'" (code upstream_unreachable), the same for a 404; a hub that
sent some bytes, then nothing, "did not answer"; a short file the advice of
huggingface_hub, "retry with force_download=True", which a keel user cannot follow.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keel.config import Paths
from keel.errors import KeelError, NotFound, RateLimited, UpstreamError
from keel.models.pull import STAGING_DIR, ModelPuller
from tests.forked import run_keel
from tests.models.fake_hub import FakeHub

REPO = "keel-test/faulty-GGUF"
FILE = "tiny.gguf"

# The faults fall at set sizes of the whole model (3 and 11 MiB, past huggingface_hub's
# 10 MiB pieces): served whole (tests/models/conftest.py).
pytestmark = pytest.mark.whole_model


class Faults:
    status: int | None = None
    """The file's HEAD and GET answer this status."""
    stall_after: int | None = None
    """The file's GET sends this many bytes, then nothing until the test ends."""
    short_by: int | None = None
    """The file's GET sends this many bytes fewer than its HEAD said, and ends."""
    cut_after: int | None = None
    """Every GET of the file sends this many bytes, then closes the connection."""


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def hub(model_bytes: bytes, faults: Faults) -> Iterator[FakeHub]:
    released = threading.Event()
    with FakeHub({REPO: {FILE: model_bytes}}) as fake:
        honest: type[BaseHTTPRequestHandler] = fake._server.RequestHandlerClass  # type: ignore[assignment]

        class Faulty(honest):  # type: ignore[valid-type,misc]
            def _file(self, repo: str, filename: str, *, head: bool) -> None:
                if faults.status is not None:
                    self._error(faults.status, None, "the hub failed")
                    return
                if head or (
                    faults.stall_after is None and faults.short_by is None and not faults.cut_after
                ):
                    super()._file(repo, filename, head=head)
                    return
                data = fake.repos[repo][filename]
                if faults.short_by is not None:
                    data = data[: -faults.short_by]
                wanted = self.headers.get("Range", "")
                start = int(wanted[6:].split("-")[0]) if wanted.startswith("bytes=") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                if start:  # a resume: the stall goes on from there
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    data = b""
                self.end_headers()
                if faults.cut_after is not None:
                    self.wfile.write(data[start : start + faults.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if faults.stall_after is not None:
                    self.wfile.write(data[: faults.stall_after])
                    self.wfile.flush()
                    released.wait(60)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        fake._server.RequestHandlerClass = Faulty
        try:
            yield fake
        finally:
            released.set()


def pull(hub: FakeHub, paths: Paths, **kwargs: float) -> KeelError:
    puller = ModelPuller(paths, endpoint=hub.url, environ={}, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(KeelError) as failed:
        puller.pull(f"{REPO}:{FILE}")
    staging = paths.models_dir / STAGING_DIR
    assert not [p for p in staging.rglob("*") if p.is_file()], "a partial file was kept"
    assert not (paths.models_dir / FILE).exists()
    return failed.value


def test_a_hub_error_on_the_file_says_the_hubs_status(
    hub: FakeHub, paths: Paths, faults: Faults
) -> None:
    faults.status = 501  # a 500 is the same, after huggingface_hub's retries (~20 s)
    failed = pull(hub, paths)
    assert isinstance(failed, UpstreamError) and failed.code == "upstream_status", failed
    assert failed.upstream_status == 501
    assert "answered 501" in failed.message and "cannot reach" not in failed.message


def test_a_file_the_hub_says_is_not_there_is_not_found(
    hub: FakeHub, paths: Paths, faults: Faults
) -> None:
    faults.status = 404  # no X-Error-Code: huggingface_hub filed it as "not in the cache"
    failed = pull(hub, paths)
    assert isinstance(failed, NotFound), failed
    assert "404" in failed.message and "cannot reach" not in failed.message


@pytest.mark.parametrize("mib", [3, 11])
def test_a_hub_that_stalls_mid_file_says_after_how_much(
    hub: FakeHub, tmp_path: Path, faults: Faults, mib: int
) -> None:
    """As a user runs it, with huggingface_hub's read timeout at 1 s (10 s by default,
    then again at each of its 5 resumes: the stall took 65 s to be an error). It said
    "after 10 MiB" of 11 (the download kept 10 MiB pieces, and counted them), and of a
    stall within the first 10 MiB that it could not tell how much had come."""
    faults.stall_after = mib * 2**20
    env = {**os.environ, "KEEL_ROOT": str(tmp_path), "HF_ENDPOINT": hub.url}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    pulled = run_keel(["models", "pull", f"{REPO}:{FILE}"], env, timeout=120)
    assert pulled.returncode == 1, pulled.stderr
    last = pulled.stderr.strip().splitlines()[-1]
    assert "stopped sending" in last and f"after {mib} MiB" in last, pulled.stderr
    assert "nothing came for 1s" in last, pulled.stderr
    assert "did not answer" not in last and "Traceback" not in pulled.stderr
    staging = tmp_path / "models" / STAGING_DIR
    assert not [p for p in staging.rglob("*") if p.is_file()], "a partial file was kept"


def test_a_file_shorter_than_the_hub_said_is_a_size_mismatch(
    hub: FakeHub, paths: Paths, faults: Faults
) -> None:
    faults.short_by = 1000
    failed = pull(hub, paths)
    assert isinstance(failed, UpstreamError) and failed.code == "size_mismatch", failed
    assert "force_download" not in failed.message
    assert "the file changed on the hub" in failed.message and "pull again" in failed.message
    # both were "94 MiB": "came to 94 MiB where the hub said 94 MiB"
    came, said = len(hub.repos[REPO][FILE]) - 1000, len(hub.repos[REPO][FILE])
    assert f"came to {came:,} bytes where the hub said {said:,} bytes" in failed.message


def test_a_hub_that_keeps_breaking_off_says_so_not_unreachable(
    hub: FakeHub, paths: Paths, faults: Faults
) -> None:
    """Every GET cut after 3 MiB: "cannot reach" the hub, which answered each time."""
    faults.cut_after = 3 * 2**20
    failed = pull(hub, paths)
    assert "broke off" in failed.message and "cannot reach" not in failed.message, failed


@pytest.mark.parametrize("body", [b"{not json", b'{"weird": 1}', b"<html>sign in</html>"])
def test_an_answer_that_is_not_the_hubs_api_is_said_so(tmp_path: Path, body: bytes) -> None:
    """A proxy or a captive portal answering 200 in the hub's place: the pull was a
    traceback (the server's route a 500)."""

    class NotTheHub(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotTheHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "KEEL_ROOT": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
        pulled = run_keel(["models", "pull", f"{REPO}:{FILE}"], env, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert pulled.returncode == 1, pulled.stderr
    assert "Traceback" not in pulled.stderr, pulled.stderr
    last = pulled.stderr.strip().splitlines()[-1]
    assert "is not the Hugging Face hub's API" in last and "HF_ENDPOINT" in last, pulled.stderr


def test_a_hub_limiting_requests_says_when_to_pull_again(tmp_path: Path) -> None:
    """A 429 on the repo's listing was "the hub failed, not keel" (a 502), hiding that the
    hub limits requests, when it asks to be asked again, and that a token raises it."""
    with FakeHub({REPO: {FILE: b"GGUF"}}) as fake:
        honest: type[BaseHTTPRequestHandler] = fake._server.RequestHandlerClass  # type: ignore[assignment]

        class Limiting(honest):  # type: ignore[valid-type,misc]
            def _model_info(self, name: list[str]) -> None:
                body = b'{"error": "rate limited"}'
                self.send_response(429)
                self.send_header("Retry-After", "7")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        fake._server.RequestHandlerClass = Limiting
        puller = ModelPuller(Paths(tmp_path / "keel"), endpoint=fake.url, environ={})
        with pytest.raises(RateLimited) as limited:
            puller.pull(f"{REPO}:{FILE}")
    assert limited.value.status_code == 429 and limited.value.retry_after == 7
    assert "pull again in 7 s" in limited.value.message and "HF_TOKEN" in limited.value.message
