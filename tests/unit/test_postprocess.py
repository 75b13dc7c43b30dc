from __future__ import annotations

import pytest

from keel.pipeline.languages import get_language
from keel.pipeline.postprocess import (
    cursor_line,
    drop_closer_the_next_line_has,
    drop_duplicated_closing_line,
    drop_line_ending_in_repetition,
    drop_suffix_overlap,
    first_line,
    indentation,
    is_mid_line,
    limit_scope,
    postprocess,
    remove_repetitive_lines,
    repeats_suffix,
    suffix_line,
    trim_space,
)

PYTHON = get_language("python")
TS = get_language("typescript")
GO = get_language("go")
RUST = get_language("rust")


# --- small helpers ----------------------------------------------------------


def test_cursor_and_suffix_lines() -> None:
    assert cursor_line("def f():\n    return ") == "    return "
    assert cursor_line("x = 1\n") == ""
    assert cursor_line("") == ""
    assert suffix_line(")\nprint(1)\n") == ")"
    assert suffix_line("\n}\n") == ""


def test_indentation_counts_spaces_and_tabs() -> None:
    assert indentation("    x") == 4
    assert indentation("\t\tx") == 2
    assert indentation("x") == 0
    assert indentation("   ") == 3


@pytest.mark.parametrize(
    ("prefix", "suffix", "expected"),
    [
        ("    print(", ")\n", True),
        ("    print(", "\n", False),
        ("    print(", "   \n", False),
        ("    ", "x\n", False),
        ("x = 1\n", "y = 2\n", False),
        ("const a = [", "];", True),
    ],
)
def test_is_mid_line(prefix: str, suffix: str, expected: bool) -> None:
    assert is_mid_line(prefix, suffix) is expected


def test_first_line() -> None:
    assert first_line("a, b)\nprint(c)") == "a, b)"
    assert first_line("\nfoo") == ""


# --- remove_repetitive_lines -------------------------------------------------


def test_repetitive_lines_are_cut_to_the_first() -> None:
    text = "    x = load()\n    log(x)\n    log(x)\n    log(x)\n    log(x)\n"
    assert remove_repetitive_lines(text) == "    x = load()\n    log(x)"


def test_repetition_ending_in_a_cut_off_line_counts() -> None:
    text = "total = 0\nprint(total)\nprint(total)\nprint(total)\nprint(to"
    assert remove_repetitive_lines(text) == "total = 0\nprint(total)"


def test_repetition_with_blank_lines_between() -> None:
    text = "fmt.Println(a)\n\nfmt.Println(a)\n\nfmt.Println(a)\n"
    assert remove_repetitive_lines(text) == "fmt.Println(a)"


def test_two_repeats_are_kept() -> None:
    text = "a += 1\na += 1\n"
    assert remove_repetitive_lines(text) == text


def test_equal_lines_followed_by_other_code_are_kept() -> None:
    text = "[0, 0, 0],\n    [0, 0, 0],\n    [0, 0, 0],\n    [0, 0, 0],\n]"
    assert remove_repetitive_lines(text) == text


def test_nested_closing_braces_are_not_repetition() -> None:
    text = "            }\n        }\n    }\n}\n"
    assert remove_repetitive_lines(text) == text


# --- limit_scope -------------------------------------------------------------


def test_python_body_stops_at_next_top_level_def() -> None:
    prefix = "def add(a, b):\n    "
    text = "return a + b\n\ndef sub(a, b):\n    return a - b\n"
    assert limit_scope(text, prefix=prefix, suffix="", language=PYTHON) == "return a + b"


def test_python_if_else_continues() -> None:
    prefix = "def sign(x):\n    if x > 0:\n        "
    text = "return 1\n    else:\n        return -1\nprint(sign(3))\n"
    result = limit_scope(text, prefix=prefix, suffix="", language=PYTHON)
    assert result == "return 1\n    else:\n        return -1"


def test_python_dedent_after_blank_line_is_dropped() -> None:
    prefix = "for item in items:\n    "
    text = "total += item\n\ncount = len(items)\n"
    assert limit_scope(text, prefix=prefix, suffix="", language=PYTHON) == "total += item"


def test_python_dedent_without_blank_line_is_dropped_too() -> None:
    prefix = "for item in items:\n    "
    text = "total += item\nprint(total)\nprint(count)\n"
    result = limit_scope(text, prefix=prefix, suffix="", language=PYTHON)
    assert result == "total += item"


def test_brace_language_keeps_one_closing_line_python_does_not() -> None:
    prefix = "while (queue.length) {\n  "
    text = "visit(queue.pop());\n}\nconsole.log(done);\n"
    assert limit_scope(text, prefix=prefix, suffix="", language=TS) == ("visit(queue.pop());\n}")


@pytest.mark.parametrize(
    ("prefix", "text", "suffix", "expected"),
    [
        (
            "import os\n\ndef main():\n    path = ",
            "os.path.join(\n        a, b\n    )\n    return path\n",
            "\n",
            "os.path.join(\n        a, b\n    )",
        ),
        ("x = ", "[\n    1,\n    2,\n]\nprint(x)\n", "\n", "[\n    1,\n    2,\n]"),
        ("CONFIG = {", "\n    'a': 1,\n}\n", "\n", "\n    'a': 1,\n}"),
        ("CONFIG = {", "\n    'a': 1,\n}\n", "\n}\n", "\n    'a': 1,"),  # the suffix has it
        (
            "def f():\n    r = g(",
            "\n        a,\n        b,\n    )\n    return r\n",
            "\n",
            "\n        a,\n        b,\n    )",
        ),
        # a dedent that closes nothing is new code in the outer block, as before
        ("def f(a):\n    ", "return a\nprint(f(1))\n", "", "return a"),
    ],
)
def test_python_keeps_the_line_closing_a_bracket_it_opened(
    prefix: str, text: str, suffix: str, expected: str
) -> None:
    """Every dedented line was dropped in Python: a multi-line call or literal came back
    without its closer (code that does not parse), and an answer that was only the
    closer came back empty (a reviewer's finding)."""
    assert limit_scope(text, prefix=prefix, suffix=suffix, language=PYTHON).rstrip() == expected


def test_typescript_closing_brace_kept_when_suffix_lacks_it() -> None:
    prefix = "function greet(name: string) {\n  "
    text = "return `Hello, ${name}`;\n}\n\nfunction bye() {\n  return 1;\n}\n"
    result = limit_scope(text, prefix=prefix, suffix="", language=TS)
    assert result == "return `Hello, ${name}`;\n}"


def test_typescript_closing_brace_dropped_when_suffix_has_it() -> None:
    prefix = "function greet(name: string) {\n  "
    text = "return `Hello, ${name}`;\n}\n"
    result = limit_scope(text, prefix=prefix, suffix="\n}\n", language=TS)
    assert result == "return `Hello, ${name}`;"


def test_go_new_block_after_cursor_line() -> None:
    prefix = "func (s *Server) Close() error {\n\tif s.ln != nil {"
    text = "\n\t\treturn s.ln.Close()\n\t}\n\treturn nil\n}\n"
    suffix = "\n}\n"
    result = limit_scope(text, prefix=prefix, suffix=suffix, language=GO)
    assert result == "\n\t\treturn s.ln.Close()\n\t}"


def test_go_else_branch_continues() -> None:
    prefix = "func abs(x int) int {\n\tif x < 0 {\n\t\t"
    text = "return -x\n\t} else {\n\t\treturn x\n\t}\n}\n\nfunc other() {}\n"
    result = limit_scope(text, prefix=prefix, suffix="", language=GO)
    assert result == "return -x\n\t} else {\n\t\treturn x\n\t}"


def test_rust_completing_line_that_opens_a_block_ends_with_the_statement() -> None:
    prefix = "fn main() {\n    let v: Vec<i32> = (0..10).map(|x|"
    text = ' {\n        x * 2\n    }).collect();\n    println!("{:?}", v);\n}\n'
    result = limit_scope(text, prefix=prefix, suffix="\n}\n", language=RUST)
    assert result == " {\n        x * 2\n    }).collect();"


def test_rust_completing_a_plain_line_stays_on_it() -> None:
    prefix = "fn main() {\n    let total = items.iter()"
    text = '.sum::<u32>();\n    println!("{}", total);\n}\n'
    result = limit_scope(text, prefix=prefix, suffix="\n}\n", language=RUST)
    assert result == ".sum::<u32>();"


def test_single_line_is_untouched() -> None:
    assert limit_scope("a + b", prefix="x = ", suffix="", language=PYTHON) == "a + b"


def test_blank_prefix_is_untouched() -> None:
    text = "import os\nimport sys\n"
    assert limit_scope(text, prefix="", suffix="", language=PYTHON) == text


def test_completion_within_scope_is_untouched() -> None:
    prefix = "def f():\n    "
    text = "x = 1\n    y = 2\n    return x + y"
    assert limit_scope(text, prefix=prefix, suffix="", language=PYTHON) == text


# --- drop_duplicated_closing_line ---------------------------------------------


def test_closing_line_duplicating_suffix_is_dropped() -> None:
    prefix = "if (ready) {\n  "
    text = "start();\n}"
    assert drop_duplicated_closing_line(text, prefix=prefix, suffix="\n}\n") == "start();"


def test_closing_line_at_other_indentation_is_kept() -> None:
    prefix = "fn run() {\n    "
    text = "if ok {\n        go();\n    }"
    assert drop_duplicated_closing_line(text, prefix=prefix, suffix="\n}\n") == text


def test_non_closing_last_line_is_kept() -> None:
    prefix = "def f():\n    "
    text = "x = 1\n    return x"
    assert drop_duplicated_closing_line(text, prefix=prefix, suffix="\n    return x\n") == text


def test_closing_line_with_different_suffix_is_kept() -> None:
    text = "call(a,\n  b)"
    assert drop_duplicated_closing_line(text, prefix="", suffix="\nnext()\n") == text


def test_ruby_end_duplicating_suffix() -> None:
    text = "puts x\nend"
    assert drop_duplicated_closing_line(text, prefix="def f\n  ", suffix="\nend\n") == "puts x"


# --- drop_suffix_overlap ---------------------------------------------------------


def test_overlap_closing_paren_is_dropped() -> None:
    assert drop_suffix_overlap("foo())", prefix="    print(", suffix=")\n") == "foo()"


def test_balanced_completion_keeps_its_paren() -> None:
    assert drop_suffix_overlap("foo()", prefix="    print(", suffix=")\n") == "foo()"


def test_nested_call_keeps_the_inner_close() -> None:
    assert drop_suffix_overlap("x))", prefix="foo(bar(", suffix=")\n") == "x)"
    assert drop_suffix_overlap("x)", prefix="foo(bar(", suffix=")\n") == "x)"


def test_overlap_of_several_characters() -> None:
    assert drop_suffix_overlap("a, b);", prefix="sum(", suffix=");\n") == "a, b"
    assert drop_suffix_overlap('hello"', prefix='msg = "', suffix='"\n') == "hello"


def test_overlap_with_suffix_opening_a_block() -> None:
    result = drop_suffix_overlap("x > 0)", prefix="if (", suffix=") {\n")
    assert result == "x > 0"


def test_multiline_completion_closing_its_own_call() -> None:
    text = "foo(\n  a,\n)"
    assert drop_suffix_overlap(text, prefix="print(", suffix=")\n") == text


def test_no_overlap_is_untouched() -> None:
    assert drop_suffix_overlap("a + b", prefix="x = (", suffix=")\n") == "a + b"
    assert drop_suffix_overlap("a + b", prefix="x = ", suffix="\n") == "a + b"


# --- trim_space ---------------------------------------------------------------


def test_trailing_spaces_on_lines_are_removed() -> None:
    text = "if x:   \n        y()  \n"
    assert trim_space(text, prefix="    ", suffix="\n") == "if x:\n        y()"


def test_leading_space_after_cursor_space_is_removed() -> None:
    assert trim_space("  42", prefix="answer = ", suffix="\n") == "42"


def test_leading_newline_is_kept_even_after_space() -> None:
    text = "\n    return 1"
    assert trim_space(text, prefix="def f(): ", suffix="\n") == text


def test_trailing_space_kept_before_code_on_the_line() -> None:
    assert trim_space("a ", prefix="x = ", suffix="+ b\n") == "a "
    assert trim_space("a ", prefix="x = ", suffix=" + b\n") == "a"


# --- repeats_suffix --------------------------------------------------------------


def test_completion_equal_to_suffix_is_detected() -> None:
    suffix = "\n    return result\n"
    assert repeats_suffix("    return result", suffix=suffix)
    assert repeats_suffix("    return results", suffix=suffix)


def test_different_completion_is_not_a_repeat() -> None:
    assert not repeats_suffix("    result = compute()", suffix="\n    return result\n")
    assert not repeats_suffix("x", suffix="")


def test_short_completions_must_match_exactly() -> None:
    assert not repeats_suffix("n", suffix=")\n")
    assert not repeats_suffix("i++", suffix="i--\n")
    assert repeats_suffix(")", suffix=")\n")


def test_postprocess_keeps_a_one_character_mid_line_completion() -> None:
    result = postprocess("n", prefix="for i in range(", suffix="):\n", language=PYTHON)
    assert result == "n"


def test_repeat_compares_up_to_three_lines() -> None:
    suffix = "a = 1\nb = 2\nc = 3\nd = 4\n"
    assert repeats_suffix("a = 1\nb = 2\nc = 3\nz = 9", suffix=suffix)
    assert not repeats_suffix("a = 1\nb = 5\nc = 7", suffix=suffix)


# --- postprocess ------------------------------------------------------------------


def test_postprocess_mid_line_keeps_one_line_and_drops_overlap() -> None:
    result = postprocess(
        "user.name)\nprint(user.email)\n",
        prefix="def show(user):\n    print(",
        suffix=")\n",
        language=PYTHON,
    )
    assert result == "user.name"


def test_postprocess_python_function_body() -> None:
    prefix = "def fib(n):\n    "
    text = "if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\ndef main():\n"
    result = postprocess(text, prefix=prefix, suffix="", language=PYTHON)
    assert result == "if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)"


def test_postprocess_typescript_block_with_suffix_brace() -> None:
    prefix = "export function sum(xs: number[]): number {\n  "
    text = "let total = 0;\n  for (const x of xs) {\n    total += x;\n  }\n  return total;\n}\n"
    result = postprocess(text, prefix=prefix, suffix="\n}\n", language=TS)
    assert result == (
        "let total = 0;\n  for (const x of xs) {\n    total += x;\n  }\n  return total;"
    )


def test_postprocess_go_loop_is_cut() -> None:
    prefix = "func main() {\n\t"
    text = 'fmt.Println("hi")\n\tfmt.Println("hi")\n\tfmt.Println("hi")\n\tfmt.Println("hi")\n'
    result = postprocess(text, prefix=prefix, suffix="\n}\n", language=GO)
    assert result == 'fmt.Println("hi")'


def test_postprocess_rust_struct_literal_with_braces() -> None:
    prefix = "fn origin() -> Point {\n    Point {"
    text = " x: 0, y: 0 }\n}\n"
    result = postprocess(text, prefix=prefix, suffix="\n}\n", language=RUST)
    assert result == " x: 0, y: 0 }"


def test_postprocess_returns_empty_for_whitespace() -> None:
    assert postprocess("   \n\n", prefix="x = ", suffix="\n", language=PYTHON) == ""
    assert postprocess("", prefix="", suffix="", language=PYTHON) == ""


def test_postprocess_returns_empty_when_only_the_suffix_is_repeated() -> None:
    prefix = "def f(x):\n"
    suffix = "    return x * 2\n"
    result = postprocess("    return x * 2\n", prefix=prefix, suffix=suffix, language=PYTHON)
    assert result == ""


def test_postprocess_mid_line_completion_that_starts_with_newline_is_empty() -> None:
    result = postprocess("\n    more()", prefix="call(", suffix=")\n", language=PYTHON)
    assert result == ""


def test_postprocess_keeps_a_plain_good_completion() -> None:
    result = postprocess(
        "os.path.join(root, name)", prefix="import os\npath = ", suffix="\n", language=PYTHON
    )
    assert result == "os.path.join(root, name)"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("```", ""),  # an instruct model's answer after a function's head
        ("    return 1\n```\n\nThis function", "    return 1"),
        ("x = 1\n  ```python", "x = 1"),
        ("s = '```'", "s = '```'"),  # not at a line's start: code
    ],
)
def test_a_markdown_fence_ends_a_code_completion(text: str, kept: str) -> None:
    python = get_language("python")
    assert postprocess(text, prefix="def f():\n", suffix="", language=python) == kept


def test_a_fence_stays_in_markdown() -> None:
    markdown = get_language("markdown")
    text = "```python\nprint(1)\n```"
    assert postprocess(text, prefix="Example:\n\n", suffix="", language=markdown) == text


@pytest.mark.parametrize(
    ("text", "suffix", "kept"),
    [
        ("1, 2, 3, 10]", "\n]\n", "1, 2, 3, 10"),  # Enter inside `[`: `]` is below already
        ('process.cwd(), "src/main.js");', "\n);\n", 'process.cwd(), "src/main.js"'),
        ("0];\n    vec![0] = vec![1];", "\n    ];\n", "0"),
        ("a(b), c", "\n)\n", "a(b), c"),  # its own brackets pair up
        ("x]", "\n)\n", "x]"),  # not what the next line closes
        ("x)", "y)\n)\n", "x)"),  # the cursor's line goes on: another step's business
    ],
)
def test_a_bracket_the_next_line_closes_ends_the_completion(
    text: str, suffix: str, kept: str
) -> None:
    assert drop_closer_the_next_line_has(text, prefix="NAMES = [\n    ", suffix=suffix) == kept


def test_a_bracket_the_cursors_line_opened_is_not_the_next_lines() -> None:
    text = " x: 0, y: 0 }\n}"
    kept = drop_closer_the_next_line_has(text, prefix="fn f() {\n    Point {", suffix="\n}\n")
    assert kept == " x: 0, y: 0 }"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("path.join(path.join(path.join(path.join(path.join(path.join(path.join(", ""),
        ("x = 1\nmsg = '1.1.1.1.1.1.1.1.1.1.1.1.1.1", "x = 1"),
        ("for i in range(10):\n    total += i", "for i in range(10):\n    total += i"),
        ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"),
    ],
)
def test_a_last_line_looping_on_itself_is_dropped(text: str, kept: str) -> None:
    assert drop_line_ending_in_repetition(text) == kept
