from __future__ import annotations

import pytest

from keel.errors import RequestError
from keel.pipeline.languages import (
    TABBY_DEFAULT_STOP_WORDS,
    UNKNOWN,
    find_language,
    get_language,
    known_language_ids,
    stop_words,
)

EDITOR_IDS = [
    "python",
    "javascript",
    "typescript",
    "javascriptreact",
    "typescriptreact",
    "go",
    "rust",
    "java",
    "kotlin",
    "c",
    "cpp",
    "csharp",
    "php",
    "ruby",
    "scala",
    "swift",
    "lua",
    "shellscript",
    "bash",
    "sql",
    "html",
    "css",
    "json",
    "yaml",
    "toml",
    "markdown",
    "dart",
    "elixir",
    "haskell",
    "r",
    "perl",
    "vue",
    "svelte",
    "solidity",
    "zig",
    "nix",
    "dockerfile",
    "makefile",
    "plaintext",
    "unknown",
]


@pytest.mark.parametrize("language_id", EDITOR_IDS)
def test_editor_language_ids_are_known(language_id: str) -> None:
    assert get_language(language_id).name


def test_vscode_ids_share_tabby_javascript_typescript() -> None:
    tabby = get_language("javascript-typescript")
    for language_id in ("javascript", "typescript", "javascriptreact", "typescriptreact", "tsx"):
        assert get_language(language_id) is tabby
    assert tabby.line_comment == "//"
    assert "function" in tabby.top_level_keywords


def test_lookup_ignores_case() -> None:
    assert get_language("Python") is get_language("python")
    assert get_language("TypeScriptReact").name == "javascript-typescript"


def test_plaintext_and_unknown_are_the_generic_default() -> None:
    assert get_language("plaintext") is UNKNOWN
    assert get_language("unknown") is UNKNOWN
    assert UNKNOWN.line_comment == ""
    assert UNKNOWN.top_level_keywords == ()


def test_shell_aliases_map_to_shellscript() -> None:
    assert get_language("bash").name == "shellscript"
    assert get_language("sh").line_comment == "#"


def test_tabby_facts_carry_over() -> None:
    python = get_language("python")
    assert python.line_comment == "#"
    assert python.top_level_keywords == ("def", "from", "class", "import")
    assert python.indentation_scoped
    go = get_language("go")
    assert go.top_level_keywords[0] == "func"
    assert not go.indentation_scoped
    assert get_language("lua").line_comment == "--"
    assert "fn" in get_language("rust").top_level_keywords


def test_rust_keywords_have_no_duplicates() -> None:
    keywords = get_language("rust").top_level_keywords
    assert len(keywords) == len(set(keywords))


@pytest.mark.parametrize("language_id", ["", " ", "py thon", "c/c++", "x" * 65, "rust\n", "ü"])
def test_malformed_ids_are_rejected_with_guidance(language_id: str) -> None:
    with pytest.raises(RequestError) as caught:
        get_language(language_id)
    error = caught.value
    assert error.param == "language"
    assert error.status_code == 400
    assert "1-64 characters" in error.message
    assert "'unknown'" in error.message
    assert "'python'" in error.message


def test_long_id_is_not_echoed_in_full() -> None:
    with pytest.raises(RequestError) as caught:
        get_language("a" * 5000)
    assert len(caught.value.message) < 400


@pytest.mark.parametrize("language_id", ["brainfudge", "x" * 64, "Klingon"])
def test_an_id_without_rules_is_completed_as_unknown(language_id: str) -> None:
    # Editors send the id of every language their extensions add; Tabby completes them
    # with its default language, and so does keel (counted where it is served).
    assert find_language(language_id) is None
    assert get_language(language_id) is UNKNOWN


@pytest.mark.parametrize(
    ("language_id", "name", "comment"),
    [
        ("bat", "bat", "REM"),
        ("ini", "ini", ";"),
        ("properties", "properties", "#"),
        ("git-commit", "git-commit", "#"),
        ("coffeescript", "coffeescript", "#"),
        ("dockercompose", "yaml", "#"),
        ("terraform-vars", "hcl", "#"),
        ("tsql", "sql", "--"),
        ("arduino", "cpp", "//"),
        ("racket", "scheme", ";"),
        ("fortran-modern", "fortran", "!"),
        ("django-html", "jinja", ""),
        ("jsonl", "json", ""),
        ("search-result", "unknown", ""),
    ],
)
def test_vs_code_builtin_and_common_extension_ids(
    language_id: str, name: str, comment: str
) -> None:
    language = get_language(language_id)
    assert (language.name, language.line_comment) == (name, comment)


def test_id_characters_allowed() -> None:
    assert get_language("c++").name == "cpp"
    assert get_language("c#").name == "csharp"
    assert get_language("cuda-cpp").name == "cpp"
    assert get_language("objective-c").name == "c"


def test_known_language_ids_are_sorted_lowercase_and_resolvable() -> None:
    ids = known_language_ids()
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))
    assert {"python", "typescriptreact", "unknown", "plaintext"} <= set(ids)
    for language_id in ids:
        assert language_id == language_id.lower()
        get_language(language_id)


def test_stop_words_follow_tabby_for_python() -> None:
    words = stop_words(get_language("python"))
    assert words[: len(TABBY_DEFAULT_STOP_WORDS)] == list(TABBY_DEFAULT_STOP_WORDS)
    assert "\n\n" in words
    assert "\n#" in words
    for keyword in ("def", "from", "class", "import"):
        assert "\n" + keyword in words
    assert "\nfunc" not in words


def test_stop_words_for_go_use_go_keywords() -> None:
    words = stop_words(get_language("go"))
    assert "\nfunc" in words
    assert "\n//" in words
    assert "\ndef" not in words


def test_stop_words_include_fim_markers() -> None:
    words = stop_words(get_language("rust"))
    assert "<fim_prefix>" in words
    assert "<|fim_middle|>" in words
    assert " <EOT>" in words


def test_unknown_language_does_not_stop_at_every_newline() -> None:
    words = stop_words(UNKNOWN)
    assert "\n" not in words
    assert "\n\n" in words


def test_additional_stop_words_are_appended_once() -> None:
    words = stop_words(get_language("python"), ["<|endoftext|>", "\nif", "", "\nif"])
    assert words.count("\nif") == 1
    assert words[-1] == "\nif"
    assert "" not in words
    assert words.count("<|endoftext|>") == 1


def test_stop_words_returns_a_fresh_list() -> None:
    language = get_language("python")
    first = stop_words(language)
    first.append("mutated")
    assert "mutated" not in stop_words(language)
