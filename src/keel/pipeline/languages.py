"""Languages keel completes: comment syntax, top-level keywords, stop words.

The table follows Tabby's ``crates/tabby-common/assets/languages.toml`` (same
names, line comments and top-level keywords, so stop words match what Tabby
users are used to) and adds the language ids editors actually send: VS Code /
LSP ids (``typescriptreact``, ``shellscript``, ``csharp``...), common file
extensions and a few languages Tabby does not list. Lookups are
case-insensitive; ``plaintext`` and ``unknown`` map to :data:`UNKNOWN`.

Deliberate differences from Tabby:

- An id that is not in the table is completed without language rules, as Tabby
  does with its default language (editors send the id of every language their
  extensions add: refusing them failed every keystroke in those files), and
  is counted (``keel_completions_unknown_language_total``) and logged once per
  id. Only a malformed id is an error.
- A language without a line comment gets no comment stop word. Tabby pushes
  ``"\\n" + ""`` for its unknown language, which turns every completion of
  an unknown file into a single line.
- Languages Tabby lists without a comment syntax (shell, SQL, Haskell, ...)
  get their real line comment, so repository snippets can be shown to the
  model as comments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from keel.errors import RequestError


@dataclass(frozen=True, slots=True)
class Language:
    """What the pipeline needs to know about a programming language.

    ``line_comment`` is empty when the language has no line comment (CSS,
    HTML, JSON); such languages get no snippet context. ``indentation_scoped``
    marks languages whose blocks end by dedenting alone (Python, YAML): there
    is no closing line that belongs to the block, which changes where
    :func:`keel.pipeline.postprocess.limit_scope` cuts.
    """

    name: str
    line_comment: str = ""
    top_level_keywords: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    indentation_scoped: bool = False


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


UNKNOWN = Language(
    "unknown",
    aliases=_words("plaintext text txt plain log csv tsv search-result code-text-binary jupyter"),
)

_LANGUAGES: tuple[Language, ...] = (
    UNKNOWN,
    Language("python", "#", _words("def from class import"), _words("py python3"), True),
    Language(
        "rust",
        "//",
        _words("fn trait impl enum pub extern static unsafe use"),
        _words("rs"),
    ),
    Language(
        "java",
        "//",
        _words(
            "abstract public private class const exports extends implements static import "
            "interface module package var enum return"
        ),
    ),
    Language(
        "kotlin",
        "//",
        _words(
            "abstract public private companion class data const actual expect sealed "
            "suspend fun import interface package var val enum"
        ),
        _words("kt kts"),
    ),
    Language(
        "javascript-typescript",
        "//",
        _words(
            "abstract async class const export function interface module package type var enum let"
        ),
        _words(
            "javascript typescript javascriptreact typescriptreact js ts jsx tsx mjs cjs mts cts"
        ),
    ),
    Language(
        "go",
        "//",
        _words("func interface struct package type import var const"),
        _words("golang"),
    ),
    Language(
        "ruby",
        "#",
        _words("begin class def end ensure include module require rescue self"),
        _words("rb"),
    ),
    Language(
        "c",
        "//",
        _words("const enum extern inline register static struct typedef union volatile"),
        _words("h objective-c objc"),
    ),
    Language(
        "cpp",
        "//",
        _words(
            "auto class const concept enum extern inline namespace register static struct "
            "template typedef union volatile"
        ),
        _words("c++ cc cxx hpp cuda-cpp cuda objective-cpp arduino ino"),
    ),
    Language(
        "csharp",
        "//",
        _words(
            "class struct enum interface abstract static extern namespace using var dynamic async"
        ),
        _words("c# cs"),
    ),
    Language(
        "php",
        "//",
        _words(
            "abstract class const declare extends final finally function global implements "
            "include_once include interface namespace private protected public require_once "
            "require static trait use"
        ),
    ),
    Language(
        "solidity",
        "//",
        _words("contract interface error library struct enum function type"),
        _words("sol"),
    ),
    Language(
        "dart",
        "//",
        _words(
            "abstract class late var final const export interface type enum int String double "
            "DateTime typedef"
        ),
    ),
    Language(
        "elixir",
        "#",
        _words(
            "def defp defmacro defmacrop module use import alias require if unless case cond "
            "with try catch throw receive after do end"
        ),
        _words("ex exs"),
    ),
    Language("r", "#", _words("function library install.packages")),
    Language(
        "lua",
        "--",
        _words(
            "and break do else elseif end false for function if in local nil not or repeat "
            "return then true until while"
        ),
    ),
    Language(
        "scala",
        "//",
        _words(
            "abstract case class def do else enum extends final for given if implicit import "
            "lazy match new object override package private protected return sealed then "
            "throw trait try type val var while with yield"
        ),
        _words("sbt"),
    ),
    Language(
        "perl",
        "#",
        _words(
            "package use require no sub my our local BEGIN END given when foreach for while "
            "if elsif else"
        ),
        _words("pl pm perl6 raku"),
    ),
    Language(
        "gdscript",
        "#",
        _words("var const enum func class class_name extends"),
        _words("gd"),
        True,
    ),
    Language("swift", "//", _words("class enum extension func import protocol struct typealias")),
    Language("zig", "//", _words("const fn pub test var")),
    Language("ocaml", "", (), _words("ml")),
    Language("haskell", "--", (), _words("hs")),
    Language("julia", "#", (), _words("jl")),
    Language("shellscript", "#", (), _words("bash sh zsh shell fish")),
    Language("powershell", "#", (), _words("ps1 pwsh")),
    Language("sql", "--", (), _words("mysql postgres pgsql plsql sqlite tsql")),
    Language("dockerfile", "#", (), _words("docker containerfile")),
    Language("makefile", "#", (), _words("make")),
    Language("cmake", "#"),
    Language("nix", "#"),
    Language("toml", "#"),
    Language(
        "yaml",
        "#",
        (),
        _words("yml docker-compose dockercompose github-actions-workflow ansible helm"),
        True,
    ),
    Language("hcl", "#", (), _words("terraform tf terraform-vars tfvars hcl2")),
    Language("graphql", "#", (), _words("gql")),
    Language("proto", "//", (), _words("proto3 protobuf")),
    Language("groovy", "//", (), _words("gradle jenkinsfile")),
    Language("fsharp", "//", (), _words("f# fs")),
    Language("clojure", ";", (), _words("clj")),
    Language("erlang", "%", (), _words("erl")),
    Language("tex", "%", (), _words("latex bibtex")),
    Language("vb", "'", (), _words("vba vbnet")),
    Language("verilog", "//", (), _words("systemverilog")),
    Language("jsonc", "//", (), _words("json5 snippets code-workspace")),
    Language("scss", "//", (), _words("less sass")),
    Language("json", aliases=_words("jsonl ndjson")),
    Language("css", aliases=_words("postcss tailwindcss")),
    Language("html", "", (), _words("htm xhtml")),
    Language("xml", "", (), _words("xsl svg")),
    Language("markdown", "", (), _words("md mdx")),
    Language("vue", aliases=_words("vue-html")),
    Language("svelte"),
    # More of the language ids VS Code and its common extensions send.
    Language("bat", "REM", (), _words("batch cmd")),
    Language("ini", ";", (), _words("cfg editorconfig")),
    Language("properties", "#", (), _words("dotenv gitignore ignore")),
    Language("git-commit", "#", (), _words("git-rebase")),
    Language("diff", aliases=_words("patch")),
    Language("coffeescript", "#", (), _words("coffee")),
    Language("pug", "//", (), _words("jade")),
    Language("stylus", "//", (), _words("styl")),
    Language("haml", "-#"),
    Language("slim", "/"),
    Language("d", "//"),
    Language("pascal", "//", (), _words("objectpascal delphi pas")),
    Language("ada", "--", (), _words("adb ads")),
    Language("fortran", "!", (), _words("fortran-modern fortranfreeform f90 f95")),
    Language("cobol", "*>", (), _words("cbl")),
    Language("vhdl", "--", (), _words("vhd")),
    Language("elm", "--"),
    Language("purescript", "--", (), _words("purs")),
    Language("scheme", ";", (), _words("racket commonlisp lisp emacs-lisp elisp scm rkt")),
    Language("tcl", "#"),
    Language("awk", "#"),
    Language("nginx", "#"),
    Language("matlab", "%", (), _words("octave")),
    Language("nim", "#"),
    Language("crystal", "#", (), _words("cr")),
    Language("mojo", "#", _words("def fn from struct trait import"), (), True),
    Language("starlark", "#", _words("def load"), _words("bazel bzl"), True),
    Language("glsl", "//", (), _words("hlsl wgsl shaderlab metal frag vert")),
    Language("typst", "//", (), _words("typ")),
    Language("prisma", "//"),
    Language("gleam", "//"),
    Language("bicep", "//"),
    Language("apex", "//"),
    Language("odin", "//"),
    Language("mermaid", "%%", (), _words("mmd")),
    Language("abap", '"'),
    Language("restructuredtext", aliases=_words("rst")),
    Language("razor", aliases=_words("cshtml aspnetcorerazor")),
    Language("astro"),
    Language("handlebars", aliases=_words("hbs mustache")),
    Language("jinja", aliases=_words("jinja-html django-html django-txt jinja2 twig nunjucks")),
)


def _by_id(languages: Sequence[Language]) -> dict[str, Language]:
    return {
        language_id.lower(): language
        for language in languages
        for language_id in (language.name, *language.aliases)
    }


_BY_ID = _by_id(_LANGUAGES)


def use_additional_languages(additional: Sequence[Language]) -> None:
    """The built-in languages and ``additional`` (a config's ``[[additional_languages]]``;
    one of them replaces a built-in it shares a name or extension with)."""
    global _BY_ID
    _BY_ID = _by_id([*_LANGUAGES, *additional])


LANGUAGE_ID_PATTERN = r"^[A-Za-z0-9\-_+.#]{1,64}$"
"""What a client's language id may be (VS Code's ids, ``c#``, ``objective-c++``, ...)."""
_ID_PATTERN = re.compile(LANGUAGE_ID_PATTERN)

_SUGGESTED_IDS = ("python", "typescript", "javascript", "go", "rust", "java", "cpp")

TABBY_DEFAULT_STOP_WORDS: tuple[str, ...] = (
    "\n\n",
    "\n\n  ",
    "\n\n    ",
    "\n\n      ",
    "\n\n        ",
    "\n\n          ",
    "\n\n            ",
    "\n\n              ",
    "\n\n\t",
    "\n\n\t\t",
    "\n\n\t\t\t",
    "\n\n\t\t\t\t",
    "\n\n\t\t\t\t\t",
    "\n\n\t\t\t\t\t\t",
    "\n\n\t\t\t\t\t\t\t",
)
"""Tabby's language-independent stop words: a blank line ends a completion."""

FIM_MARKER_STOP_WORDS: tuple[str, ...] = (
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<file_sep>",
    " <EOT>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|file_separator|>",
    "<|file_sep|>",
    "<|endoftext|>",
    "<｜fim▁begin｜>",
    "<｜fim▁hole｜>",
    "<｜fim▁end｜>",
    "[PREFIX]",
    "[SUFFIX]",
)
"""Template markers a model may print as text; Tabby stops on its families' markers too."""


def find_language(language_id: str) -> Language | None:
    """The language an editor's language id, a Tabby language name or a file
    extension names (any case); None when keel has no rules for it."""
    return _BY_ID.get(language_id.lower())


def get_language(language_id: str) -> Language:
    """The language of a request's ``language`` field: :data:`UNKNOWN` (no language
    rules) for an id keel has no rules for.

    Raises :class:`~keel.errors.RequestError` (``param="language"``) for a
    malformed id; the message says what to send instead.
    """
    language = find_language(language_id)
    if language is not None:
        return language
    if not _ID_PATTERN.fullmatch(language_id):
        shown = language_id[:64] + ("..." if len(language_id) > 64 else "")
        raise RequestError(
            f"language must be 1-64 characters of letters, digits and '-_+.#' "
            f"(got {shown!r}); send the editor's language id, e.g. "
            f"{_format_ids(_SUGGESTED_IDS)}, or 'unknown' for plain text",
            param="language",
        )
    return UNKNOWN


def known_language_ids() -> list[str]:
    """Every id :func:`get_language` accepts (lower case), sorted."""
    return sorted(_BY_ID)


def stop_words(language: Language, additional: Sequence[str] = ()) -> list[str]:
    """Stop words for a completion in ``language``, without duplicates.

    Tabby's definition: the default blank-line stop words, then
    ``"\\n" + line_comment`` and ``"\\n" + keyword`` for each top-level
    keyword (code at column 0 starts the next top-level item, which the user
    did not ask for), then ``additional`` (from the model's config). FIM
    markers of the families keel knows are included, as Tabby does, so a
    model that prints its own markers as text stops there.
    """
    words: list[str] = [*TABBY_DEFAULT_STOP_WORDS, *FIM_MARKER_STOP_WORDS]
    if language.line_comment:
        words.append("\n" + language.line_comment)
    words.extend("\n" + keyword for keyword in language.top_level_keywords)
    words.extend(word for word in additional if word)
    return list(dict.fromkeys(words))


def _format_ids(ids: Sequence[str]) -> str:
    return ", ".join(f"'{language_id}'" for language_id in ids)
