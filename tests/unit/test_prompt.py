from __future__ import annotations

import re

import pytest

from keel.pipeline.languages import UNKNOWN, get_language
from keel.pipeline.prompt import (
    FIM_TEMPLATES,
    TEMPLATE_RESERVE,
    PromptBudget,
    Snippet,
    check_template,
    format_snippets,
    keep_head,
    keep_tail,
    model_family,
    normalize_newlines,
    render_marked,
    render_template,
    restore_newlines,
    select_snippets,
    split_budget,
    split_lines,
    template_for_model,
    user_text_pieces,
)

PYTHON = get_language("python")
GO = get_language("go")


# --- templates --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("TabbyML/StarCoder-1B", "starcoder"),
        ("starcoder2-3b-Q8_0.gguf", "starcoder"),
        ("TabbyML/CodeLlama-7B", "codellama"),
        ("codellama-13b-code.Q4_K_M.gguf", "codellama"),
        ("deepseek-coder-6.7b-base.Q4_K_M.gguf", "deepseek-coder"),
        ("TabbyML/DeepseekCoder-1.3B", "deepseek-coder"),
        ("DeepSeek-Coder-V2-Lite-Base", "deepseek-coder"),
        ("google/codegemma-2b", "codegemma"),
        ("Qwen/Qwen2.5-Coder-1.5B", "qwen2.5-coder"),
        ("qwen2.5-coder-7b-q4_k_m.gguf", "qwen2.5-coder"),
        ("qwen2_5_coder_0_5b.gguf", "qwen2.5-coder"),
        ("Codestral-22B-v0.1", "codestral"),
        ("mistralai/codestral-latest", "codestral"),
    ],
)
def test_model_family_from_names(model: str, family: str) -> None:
    assert model_family(model) == family
    assert template_for_model(model) == FIM_TEMPLATES[family]


@pytest.mark.parametrize(
    "model",
    ["SmolLM2-135M-Instruct-Q4_1.gguf", "llama-3.1-8b", "Qwen2.5-7B-Instruct", "gpt-4o", ""],
)
def test_models_without_fim_are_prefix_only(model: str) -> None:
    assert template_for_model(model) is None


def test_every_template_names_both_parts() -> None:
    for template in FIM_TEMPLATES.values():
        check_template(template)
        assert "{prefix}" in template
        assert "{suffix}" in template


def test_codestral_puts_the_suffix_first() -> None:
    prompt = render_template(FIM_TEMPLATES["codestral"], "def f():\n    ", "\nf()\n")
    assert prompt == "[SUFFIX]\nf()\n[PREFIX]def f():\n    "


def test_render_starcoder() -> None:
    prompt = render_template(FIM_TEMPLATES["starcoder"], "fn main() {\n    ", "\n}\n")
    assert prompt == "<fim_prefix>fn main() {\n    <fim_suffix>\n}\n<fim_middle>"


def test_render_codellama_spacing_as_tabby() -> None:
    template = FIM_TEMPLATES["codellama"]
    assert render_template(template, "this is some prefix", "this is some suffix") == (
        "<PRE> this is some prefix <SUF>this is some suffix <MID>"
    )
    assert render_template(template, "", "") == "<PRE>  <SUF>\n <MID>"


def test_render_deepseek() -> None:
    prompt = render_template(FIM_TEMPLATES["deepseek-coder"], "a = ", "\nprint(a)\n")
    assert prompt == "<｜fim▁begin｜>a = <｜fim▁hole｜>\nprint(a)\n<｜fim▁end｜>"


def test_render_does_not_interpret_braces_in_code() -> None:
    prefix = 'function f(o) {\n  const s = `${o.name} {prefix}`;\n  return {suffix: "{0}"'
    suffix = "};\n}\n{{not a placeholder}}\n"
    prompt = render_template(FIM_TEMPLATES["qwen2.5-coder"], prefix, suffix)
    assert prompt == f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"


def test_render_placeholder_text_inside_code_stays_literal() -> None:
    prefix = 'tpl = "{suffix}"\nother = "{prefix}"\n'
    suffix = 'print(tpl.format(prefix="{prefix}"))\n'
    prompt = render_template(FIM_TEMPLATES["starcoder"], prefix, suffix)
    assert prompt == f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    codestral = render_template(FIM_TEMPLATES["codestral"], prefix, suffix)
    assert codestral == f"[SUFFIX]{suffix}[PREFIX]{prefix}"


def test_render_go_struct_literal_with_braces() -> None:
    prefix = "func New() *Server {\n\treturn &Server{"
    suffix = "}\n}\n"
    prompt = render_template(FIM_TEMPLATES["starcoder"], prefix, suffix)
    assert prompt.count("{") == prefix.count("{") + suffix.count("{")
    assert prompt.endswith("}\n}\n<fim_middle>")


@pytest.mark.parametrize("family", sorted(FIM_TEMPLATES))
def test_the_marked_parts_of_a_prompt_are_its_templates_own(family: str) -> None:
    """Everything outside the marked spans is the user's text, in order."""
    prefix, suffix = "x = '<|endoftext|>'\n", "print(x)\n"
    prompt, markup = render_marked(FIM_TEMPLATES[family], prefix, suffix)
    assert prompt == render_template(FIM_TEMPLATES[family], prefix, suffix)
    own = "".join(prompt[start:end] for start, end in markup)
    assert own == FIM_TEMPLATES[family].replace("{prefix}", "").replace("{suffix}", "")
    pieces = user_text_pieces(prompt, markup, CONTROLS)
    assert pieces is not None, "the prefix spells a control token"
    user = "".join(text for text, mine in pieces if not mine)
    assert user == (suffix + prefix if family == "codestral" else prefix + suffix)


CONTROLS = re.compile(re.escape("<|endoftext|>"))


def test_the_user_text_is_in_pieces_only_where_it_spells_a_control_token() -> None:
    prompt, markup = render_marked("<|endoftext|>{prefix}<s>{{}}{suffix}", "a = 1\n", "")
    assert markup == ((0, 13), (19, 24)) and prompt[19:24] == "<s>{}"
    assert user_text_pieces(prompt, markup, CONTROLS) is None, "the template's own: as it was"
    assert render_marked(None, "<|endoftext|>", "x") == ("<|endoftext|>", ())
    assert user_text_pieces("a<|endoftext|>", (), CONTROLS) == [("a<|endoftext|>", False)]
    prompt, markup = render_marked("<P>{prefix}<S>{suffix}<M>", "<|endoftext|>", "b")
    assert user_text_pieces(prompt, markup, CONTROLS) == [
        ("<P>", True),
        ("<|endoftext|>", False),
        ("<S>", True),
        ("b", False),
        ("<M>", True),
    ]


def test_render_template_double_braces_are_literal() -> None:
    assert render_template("{{x}} {prefix}|{suffix}", "a", "b") == "{x} a|b"


def test_render_none_is_prefix_only() -> None:
    assert render_template(None, "import os\n", "print(os)\n") == "import os\n"


def test_render_empty_suffix_is_a_newline_as_tabby() -> None:
    prompt = render_template(FIM_TEMPLATES["starcoder"], "x = 1\n", "")
    assert prompt == "<fim_prefix>x = 1\n<fim_suffix>\n<fim_middle>"


def test_check_template_rejects_bad_templates() -> None:
    with pytest.raises(ValueError, match="must contain"):
        check_template("<fim_suffix>{suffix}<fim_middle>")
    with pytest.raises(ValueError, match="'{middle}'"):
        check_template("{prefix}{middle}")
    check_template("{{literal}} {prefix}")


# --- lines and truncation ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("", []),
        ("a", ["a"]),
        ("a\n", ["a\n"]),
        ("a\nb", ["a\n", "b"]),
        ("a\n\nb\n", ["a\n", "\n", "b\n"]),
        ("\n", ["\n"]),
        ("x = '\x0c'\ny", ["x = '\x0c'\n", "y"]),
    ],
)
def test_split_lines(text: str, lines: list[str]) -> None:
    assert split_lines(text) == lines
    assert "".join(split_lines(text)) == text


PY_PREFIX = [
    "import os\n",
    "\n",
    "def main():\n",
    "    path = os.getcwd()\n",
    "    print(",
]


def test_keep_tail_keeps_everything_within_budget() -> None:
    assert keep_tail(PY_PREFIX, [2, 1, 4, 6, 2], 15, step=1) == "".join(PY_PREFIX)


def test_keep_tail_drops_whole_lines_from_the_start() -> None:
    kept = keep_tail(PY_PREFIX, [2, 1, 4, 6, 2], 12, step=1)
    assert kept == "def main():\n    path = os.getcwd()\n    print("


def test_keep_tail_exact_fit_keeps_the_line() -> None:
    assert keep_tail(PY_PREFIX, [2, 1, 4, 6, 2], 13, step=1).startswith("\ndef main")


def test_keep_tail_aligns_start_to_step() -> None:
    lines = [f"line {i}\n" for i in range(200)]
    counts = [1] * 200
    # 100 tokens would allow a start at line 100; aligned to 16 it starts at 112.
    assert keep_tail(lines, counts, 100, step=16) == "".join(lines[112:])
    # Lines typed: the tight start moves, the aligned one stays until it passes 112.
    for i in range(200, 212):
        lines.append(f"line {i}\n")
        counts.append(1)
        assert keep_tail(lines, counts, 100, step=16) == "".join(lines[112:])
    lines.append("line 212\n")
    counts.append(1)
    assert keep_tail(lines, counts, 100, step=16) == "".join(lines[128:])


def test_keep_tail_alignment_wastes_at_most_a_quarter() -> None:
    lines = [f"x{i} = {i}\n" for i in range(20)]
    # 15 lines fit (start 5); a step of 16 would keep 4, a step of 15 // 4 = 3 keeps 14.
    assert keep_tail(lines, [1] * 20, 15, step=16) == "".join(lines[6:])


def test_keep_tail_alignment_never_drops_the_cursor_line() -> None:
    lines = ["a\n", "b\n", "c"]
    assert keep_tail(lines, [5, 5, 5], 10, step=16) == "b\nc"


def test_keep_tail_cuts_an_oversized_last_line_by_characters() -> None:
    minified = "x" * 100 + "y" * 100
    kept = keep_tail(["header\n", minified], [1, 50], 25)
    assert kept == "y" * 100


def test_keep_tail_zero_budget_or_no_lines() -> None:
    assert keep_tail(PY_PREFIX, [1] * 5, 0) == ""
    assert keep_tail([], [], 10) == ""


def test_keep_tail_rejects_mismatched_counts() -> None:
    with pytest.raises(ValueError, match="2 lines but 1 token counts"):
        keep_tail(["a\n", "b"], [1], 10)
    with pytest.raises(ValueError, match="step"):
        keep_tail(["a"], [1], 10, step=0)


GO_SUFFIX = ["\n", "\treturn nil\n", "}\n", "\n", "func other() {}\n"]


def test_keep_head_keeps_whole_lines_from_the_start() -> None:
    assert keep_head(GO_SUFFIX, [1, 3, 1, 1, 5], 5) == "\n\treturn nil\n}\n"
    assert keep_head(GO_SUFFIX, [1, 3, 1, 1, 5], 100) == "".join(GO_SUFFIX)


def test_keep_head_cuts_an_oversized_first_line() -> None:
    line = "a" * 60 + "b" * 60 + "\n"
    assert keep_head([line, "}\n"], [40, 1], 20) == "a" * 60


def test_keep_head_empty_cases() -> None:
    assert keep_head([], [], 5) == ""
    assert keep_head(["x\n"], [1], 0) == ""
    with pytest.raises(ValueError):
        keep_head(["x\n"], [], 5)


# --- budget -----------------------------------------------------------------


def test_split_budget_with_suffix() -> None:
    budget = split_budget(1024, has_suffix=True)
    available = 1024 - TEMPLATE_RESERVE
    assert budget == PromptBudget(prefix=available - 336 - 252, suffix=252, snippets=336)
    assert budget.prefix + budget.suffix + budget.snippets == available
    assert budget.prefix > budget.snippets > budget.suffix


def test_split_budget_without_suffix_gives_it_to_the_prefix() -> None:
    with_suffix = split_budget(2048, has_suffix=True)
    without = split_budget(2048, has_suffix=False)
    assert without.suffix == 0
    assert without.prefix == with_suffix.prefix + with_suffix.suffix
    assert without.snippets == with_suffix.snippets


def test_split_budget_rejects_tiny_inputs() -> None:
    with pytest.raises(ValueError, match="at least"):
        split_budget(10, has_suffix=True)


# --- snippets ---------------------------------------------------------------


def test_format_snippets_matches_tabby() -> None:
    snippets = [
        Snippet("a1.py", "res_1 = invoke_function_1(n)"),
        Snippet("a2.py", "res_2 = invoke_function_2(n)", 1.0),
        Snippet("a3.py", "res_3 = invoke_function_3(n)", 0.5),
    ]
    assert format_snippets(PYTHON, snippets) == (
        "# Path: a1.py\n"
        "# res_1 = invoke_function_1(n)\n"
        "#\n"
        "# Path: a2.py\n"
        "# res_2 = invoke_function_2(n)\n"
        "#\n"
        "# Path: a3.py\n"
        "# res_3 = invoke_function_3(n)\n"
    )


def test_format_snippets_comments_every_body_line_in_go() -> None:
    body = "type Server struct {\r\n\taddr string\r\n\r\n\tport int\r\n}\r\n"
    block = format_snippets(GO, [Snippet("server/server.go", body)])
    assert block == (
        "// Path: server/server.go\n"
        "// type Server struct {\n"
        "// \taddr string\n"
        "//\n"
        "// \tport int\n"
        "// }\n"
    )


def test_format_snippets_prepends_cleanly_to_the_prefix() -> None:
    block = format_snippets(PYTHON, [Snippet("util.py", "def helper():\n    return 1\n")])
    prompt = block + "def main():\n    "
    assert prompt.splitlines()[2] == "#     return 1"
    assert "\n\n" not in prompt


def test_format_snippets_empty_cases() -> None:
    assert format_snippets(PYTHON, []) == ""
    assert format_snippets(UNKNOWN, [Snippet("a.txt", "hello")]) == ""
    assert format_snippets(get_language("css"), [Snippet("a.css", "a {}")]) == ""


def test_select_snippets_in_order_within_budget() -> None:
    snippets = [Snippet("decl.ts", "interface A {}"), Snippet("b.ts", "b", 0.9)]
    assert select_snippets(snippets, [10, 5], 15) == snippets
    assert select_snippets(snippets, [10, 5], 14) == [snippets[0]]


def test_select_snippets_skips_one_that_does_not_fit() -> None:
    snippets = [
        Snippet("big.rs", "impl Big { /* ... */ }"),
        Snippet("small.rs", "fn small() {}", 0.8),
        Snippet("tiny.rs", "const T: u8 = 1;", 0.5),
    ]
    assert select_snippets(snippets, [500, 20, 10], 40) == snippets[1:]


def test_select_snippets_drops_duplicates_and_blank_bodies() -> None:
    snippets = [
        Snippet("a.go", "func A() {}"),
        Snippet("a.go", "func A() {}", 0.9),
        Snippet("b.go", "   \n"),
    ]
    assert select_snippets(snippets, [3, 3, 1], 100) == [snippets[0]]


def test_select_snippets_zero_budget_and_mismatch() -> None:
    assert select_snippets([Snippet("a.py", "x = 1")], [2], 0) == []
    with pytest.raises(ValueError):
        select_snippets([Snippet("a.py", "x = 1")], [], 10)


# --- newlines ---------------------------------------------------------------


def test_normalize_newlines() -> None:
    assert normalize_newlines("a\r\nb\r\n") == ("a\nb\n", True)
    assert normalize_newlines("a\nb\n") == ("a\nb\n", False)
    assert normalize_newlines("") == ("", False)


def test_restore_newlines_round_trip() -> None:
    original = "if x {\r\n\treturn\r\n}\r\n"
    text, crlf = normalize_newlines(original)
    assert restore_newlines(text, crlf) == original


def test_restore_newlines_does_not_double_model_crlf() -> None:
    assert restore_newlines("a\r\nb\nc", True) == "a\r\nb\r\nc"
    assert restore_newlines("a\nb", False) == "a\nb"
