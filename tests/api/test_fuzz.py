"""Fuzzing finds nothing: schemathesis over keel's own /openapi.json, and a body fuzzer.

The app runs in-process (schemathesis drives its ASGI lifespan) in front of
fake backends on loopback, so every generated request is served for real in
milliseconds. A server error (5xx) anywhere fails the test; so does a
response that does not match the documented schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance
from starlette.testclient import TestClient
from tests.api.conftest import ADMIN, USER, Backends, build_app

from keel.app import create_app
from keel.config import Paths, Settings

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
OPERATIONS = settings(FUZZ, max_examples=20)
"""Random cases per operation, beside the ~50 schemathesis derives from the document
(its coverage phase: each field missing, of the wrong type, at its bounds). This file
took 23 CPU-seconds with 40, 15 with 20, for inputs that are the same every run
(derandomized) either way."""

# The document does not depend on the config: read it from an app that never starts.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(), Paths(Path("/nonexistent"))).openapi()
)
# The cases schemathesis derives from the document (its coverage phase) are derived by
# the test that sends them, not by @schema.parametrize(): that derived every operation's
# as it collected, in every pytest worker (~1.4 CPU-seconds a worker, 4 workers under
# `make test`), to send them from one.
schema.config.phases.coverage.enabled = False
OPERATION_LABELS = [result.ok().label for result in schema.get_all_operations()]


@pytest.fixture
def fuzzed_app(backends: Backends, tmp_path: Path) -> FastAPI:
    return build_app(tmp_path / "keel", backends.config())


def answer_and_check(case: schemathesis.Case, app: FastAPI) -> None:
    # The admin key opens every route, so generated requests reach the handlers. The
    # health checks' 503 is their answer (a role failing, or a key's holder asking for a
    # deep check within 0.0001 s), documented with its body, not a server error.
    checks = [response_schema_conformance]
    if case.path not in ("/ready", "/health/deep"):
        checks.append(not_a_server_error)
    case.call_and_validate(app=app, headers=ADMIN, checks=checks)


@schema.parametrize()
@OPERATIONS
def test_no_operation_answers_a_server_error(case: schemathesis.Case, fuzzed_app: FastAPI) -> None:
    answer_and_check(case, fuzzed_app)


@pytest.mark.parametrize("label", OPERATION_LABELS)
def test_no_case_derived_from_the_document_answers_a_server_error(
    label: str, fuzzed_app: FastAPI
) -> None:
    """Each field missing, of the wrong type, at its bounds, and each other method on the
    path: schemathesis's coverage phase, valid and invalid cases alike."""
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    cases = schema.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=schema.config.generation_for(operation=operation),
    )
    sent = 0
    for case in cases:
        answer_and_check(case, fuzzed_app)
        sent += 1
    assert sent > 0, f"no case derived for {label}"


# --- the body fuzzer: Tabby's and OpenAI's completion shapes, with hostile values ---------

TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
"""Any code point, lone surrogates included (json.dumps sends them as \\udxxx escapes)."""
NUMBERS = st.integers(min_value=-(2**70), max_value=2**70) | st.floats(
    allow_nan=False, allow_infinity=False
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The expected type most of the time, any JSON value sometimes."""
    return strategy | JSON


SNIPPETS = st.lists(
    st.fixed_dictionaries(
        {"filepath": maybe(TEXT), "body": maybe(TEXT)}, optional={"score": maybe(NUMBERS)}
    ),
    max_size=3,
)
TABBY = st.fixed_dictionaries(
    {},
    optional={
        "language": maybe(st.sampled_from(["python", "rust", "go", "unknown"]) | TEXT),
        "segments": maybe(
            st.fixed_dictionaries(
                {"prefix": maybe(TEXT)},
                optional={
                    "suffix": maybe(TEXT),
                    "filepath": maybe(TEXT),
                    "git_url": maybe(TEXT),
                    "declarations": maybe(SNIPPETS),
                    "relevant_snippets_from_changed_files": maybe(SNIPPETS),
                    "relevant_snippets_from_recently_opened_files": maybe(SNIPPETS),
                    "clipboard": maybe(TEXT),
                },
            )
        ),
        "user": maybe(TEXT),
        "temperature": maybe(NUMBERS),
        "seed": maybe(NUMBERS),
        "mode": maybe(TEXT),
        "debug_options": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "raw_prompt": maybe(TEXT),
                    "return_snippets": maybe(st.booleans()),
                    "return_prompt": maybe(st.booleans()),
                    "disable_retrieval_augmented_code_completion": maybe(st.booleans()),
                },
            )
        ),
    },
)
OPENAI = st.fixed_dictionaries(
    {"prompt": maybe(TEXT | st.lists(TEXT, max_size=2))},
    optional={
        "model": maybe(TEXT),
        "suffix": maybe(TEXT),
        "max_tokens": maybe(st.integers(-2, 10_000)),
        "temperature": maybe(NUMBERS),
        "top_p": maybe(NUMBERS),
        "n": maybe(st.integers(-1, 3)),
        "stream": maybe(st.booleans()),
        "stop": maybe(TEXT | st.lists(TEXT, max_size=20)),
        "seed": maybe(NUMBERS),
        "user": maybe(TEXT),
    },
)


@pytest.fixture(scope="module")
def completions_client(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    app = build_app(tmp_path_factory.mktemp("fuzz") / "keel", backends.config())
    with TestClient(app, headers=USER, raise_server_exceptions=False) as client:
        yield client


def assert_served_or_refused(response: Any) -> None:
    """A 200, or a 4xx in the one error shape; never a 5xx."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert {"message", "type", "code", "param"} <= set(error), error


@FUZZ
@given(body=TABBY | OPENAI)
def test_completion_bodies_never_fail_the_server(
    completions_client: TestClient, body: dict[str, Any]
) -> None:
    raw = json.dumps(body).encode()
    assert_served_or_refused(completions_client.post("/v1/completions", content=raw))


@FUZZ
@given(body=TABBY | OPENAI, cut=st.integers(0, 200), junk=st.binary(min_size=1, max_size=4))
def test_broken_bytes_in_a_body_never_fail_the_server(
    completions_client: TestClient, body: dict[str, Any], cut: int, junk: bytes
) -> None:
    """Invalid UTF-8 or broken JSON spliced anywhere into a completion body."""
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    raw = raw[:cut] + junk + raw[cut:]
    assert_served_or_refused(completions_client.post("/v1/completions", content=raw))
