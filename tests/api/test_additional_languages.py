"""Tabby's ``[[additional_languages]]``: a language of the config's own, completed with
its stop words. The section was refused as a misspelt key (exit 78)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from tests.api.conftest import USER, Backends, build_app

from keel.pipeline.languages import find_language, stop_words, use_additional_languages

UNKNOWN_COUNT = "keel_completions_unknown_language_total"
LANGUAGES = """
[[additional_languages]]
languages = ["swiftish", "swift-ish"]
exts = ["swsh"]
line_comment = "//"
top_level_keywords = ["import", "func"]
chunk_size = 256

[completion]
code_search_params = { min_rrf_score = 0.05 }
"""


def test_an_additional_language_is_completed_with_its_stop_words(
    backends: Backends, tmp_path: Path
) -> None:
    app = build_app(tmp_path / "keel", backends.config() + LANGUAGES)
    body = {"language": "swift-ish", "segments": {"prefix": "func f() {\n    ", "suffix": "}"}}
    try:
        with TestClient(app, headers=USER) as client:
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            metrics = client.get("/metrics").text.splitlines()
            unknown = [line for line in metrics if line.startswith(UNKNOWN_COUNT)]
            assert unknown == [f"{UNKNOWN_COUNT} 0.0"], unknown
            language = find_language("swsh")
            assert language is not None and language.name == "swiftish"
            assert {"\nimport", "\nfunc", "\n//"} <= set(stop_words(language))
    finally:
        use_additional_languages([])  # the table is the process's
    assert find_language("swsh") is None
