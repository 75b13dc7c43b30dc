"""A hub that fails for a moment does not cost the bytes already downloaded.

One 500 on a resume, or one 503 asking to wait a second, failed the whole pull and
threw the bytes on disk away; a CDN's 403 on a resume (a signed link that expired)
was "private or gated, set HF_TOKEN"; a quant no file has whole pulled another
(Q6_K pulled Q6_K_L); the same repo spelled in another case was "another model".
"""

from __future__ import annotations

import hashlib

import pytest

from keel.config import Paths
from keel.errors import NotFound, RequestError, UpstreamAuthError, UpstreamError
from keel.models import pull
from keel.models.pull import PullProgress
from tests.models.conftest import FILE, REPO
from tests.models.fake_hub import FakeHub
from tests.models.test_pull import nothing_left, puller

CUT = 35 * 2**20


def ranges(hub: FakeHub) -> list[str | None]:
    return [seen.headers.get("range") for seen in hub.downloads()]


@pytest.mark.whole_model
def test_a_500_on_a_resume_is_tried_again_from_the_bytes_on_disk(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    hub.cut_after = CUT
    hub.statuses = [None, (500, {})]  # the first GET is cut; its resume answers 500
    steps: list[PullProgress] = []
    pulled = puller(hub, paths).pull(f"{REPO}:{FILE}", report=steps.append)
    assert pulled.path.read_bytes() == model_bytes
    assert ranges(hub) == [None, f"bytes={CUT}-", f"bytes={CUT}-"]
    warnings = [step.message for step in steps if step.status == "warning"]
    assert any("answered 500" in w and "resuming from 35 MiB" in w for w in warnings), warnings


def test_a_503_with_retry_after_is_waited_for(hub: FakeHub, paths: Paths) -> None:
    hub.statuses = [(503, {"Retry-After": "1"})]
    steps: list[PullProgress] = []
    puller(hub, paths).pull(f"{REPO}:{FILE}", report=steps.append)
    assert len(hub.downloads()) == 2
    warnings = [step.message for step in steps if step.status == "warning"]
    assert any("answered 503 and asked to wait 1 s" in w for w in warnings), warnings


def test_a_hub_failing_every_try_fails_the_pull_after_the_tries(hub: FakeHub, paths: Paths) -> None:
    hub.statuses = [(503, {"Retry-After": "0"})] * (pull.RETRIES + 5)
    with pytest.raises(UpstreamError) as failed:
        puller(hub, paths).pull(f"{REPO}:{FILE}")
    assert failed.value.upstream_status == 503, failed.value
    assert f"again after {pull.RETRIES} tries" in failed.value.message
    assert len(hub.downloads()) == pull.RETRIES + 1 and nothing_left(paths)


def test_an_expired_download_link_is_asked_again_not_a_token_matter(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    """The hub sends an LFS file's GET to its CDN with a signed link; a resume past the
    link's life is refused with 403: a new link from the hub's HEAD, not HF_TOKEN."""
    hub.cdn, hub.cut_after, hub.refuse_resumes = True, 2**20, 1
    pulled = puller(hub, paths).pull(f"{REPO}:{FILE}")
    assert pulled.path.read_bytes() == model_bytes
    assert ranges(hub) == [None, f"bytes={2**20}-", f"bytes={2**20}-"]
    heads = [seen for seen in hub.seen if seen.method == "HEAD"]
    assert len(heads) >= 2, "the link was not asked for again"

    (paths.models_dir / pulled.path.name).unlink()
    hub.seen.clear()
    hub.cut_after, hub.refuse_resumes = 2**20, 99
    with pytest.raises(UpstreamAuthError) as refused:
        puller(hub, paths).pull(f"{REPO}:{FILE}")
    message = refused.value.message
    assert "download link" in message and "refused mid-transfer" in message, message
    assert "set HF_TOKEN" not in message and "private or gated" not in message
    assert nothing_left(paths)


def test_a_quant_no_file_has_whole_is_not_found(hub: FakeHub, paths: Paths) -> None:
    hub.repos["keel-test/quants-GGUF"] = {
        "m-Q4_1.gguf": b"GGUF",
        "m-Q8_0.gguf": b"GGUF",
        "m-Q6_K_L.gguf": b"GGUF",
    }
    with pytest.raises(NotFound) as missing:
        puller(hub, paths).pull("keel-test/quants-GGUF", quant="q6_k")
    assert missing.value.param == "quant"
    assert "m-Q6_K_L.gguf" in missing.value.message and "only part of" in missing.value.message
    assert hub.downloads() == []


def test_the_same_repo_in_another_case_is_the_same_model(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    """The hub finds a repo id in any case: pulled as one spelling, then the file
    changed on the hub, a pull by another spelling was a 409 "another model"."""
    first = puller(hub, paths).pull(f"{REPO.upper()}:{FILE}")
    hub.repos[REPO][FILE] = newer = model_bytes + b"\0" * 64
    steps: list[PullProgress] = []
    again = puller(hub, paths).pull(f"{REPO.lower()}:{FILE}", report=steps.append)
    assert again.path == first.path and not again.already_present
    assert hashlib.sha256(again.path.read_bytes()).hexdigest() == (
        hashlib.sha256(newer).hexdigest()
    )
    assert any(step.status == "warning" for step in steps)


def test_spec_refusals_name_their_field(hub: FakeHub, paths: Paths) -> None:
    hub.repos["keel-test/quants-GGUF"] = {"m-Q4_1.gguf": b"GGUF", "m-Q8_0.gguf": b"GGUF"}
    cases = [
        ("keel-test/quants-GGUF", None, "quant"),
        (f"{REPO}:x.bin", None, "model"),
        (f"{REPO}:{FILE}", "Q8_0", "quant"),
        ("TabbyML/StarCoder-1B", "Q8_0", "quant"),
    ]
    for spec, quant, param in cases:
        with pytest.raises(RequestError) as refused:
            puller(hub, paths).pull(spec, quant=quant)
        assert refused.value.param == param, (spec, quant, refused.value.message)
