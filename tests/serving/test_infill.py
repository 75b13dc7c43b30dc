"""``POST /infill`` as llama.vscode calls it, through keel to a fake llama.cpp server:
the request sequence of one editing session replayed, fallbacks, bad bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.api.infill import cut_at_suffix_closer, language_of
from keel.pipeline.completion import AnswerEnds, cut_at_indent
from keel.schemas.infill import InfillRequest
from tests.fakes.upstreams import Behaviour, FakeUpstream, llamacpp_timings
from tests.serving.conftest import build_app, llamacpp_config

CHUNKS = [
    {"text": "def compute(a, b):\n    return a + b\n", "time": 1700000000, "filename": "/w/m.py"},
    {"text": "import os\n", "time": 1700000001, "filename": "/w/app.py"},
]


def warm_up() -> dict[str, Any]:
    """llama.vscode's FIM_PREP: send the chunks ahead, predict nothing."""
    return {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": CHUNKS,
        "prompt": "",
        "n_predict": 0,
        "samplers": [],
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1,
    }


def fim(prefix_lines: list[str], line_prefix: str, line_suffix: str = "") -> dict[str, Any]:
    """llama.vscode's FIM request (createRequestPayload with its default settings)."""
    return {
        "id_slot": 0,
        "input_prefix": "\n".join(prefix_lines) + "\n",
        "input_suffix": line_suffix + "\n" + "\n".join(["", "print(x)"]) + "\n",
        "input_extra": CHUNKS,
        "prompt": line_prefix,
        "n_predict": 128,
        "n_cmpl": 1,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
        "n_indent": len(line_prefix) - len(line_prefix.lstrip()),
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1000,
    }


async def replay(keel: httpx.AsyncClient) -> list[httpx.Response]:
    """Warm up, ask at ``x = ``, type two characters of the suggestion, then ask as
    llama.vscode does after accepting its first line (cacheFutureSuggestion)."""
    lines = ["import os", "", "def main():"]
    answers = [await keel.post("/infill", json=warm_up())]
    first = await keel.post("/infill", json=fim(lines, "    x = "))
    answers.append(first)
    shown = first.json()["content"]
    answers.append(await keel.post("/infill", json=fim(lines, "    x = " + shown[:2])))
    answers.append(await keel.post("/infill", json=fim([*lines, "    x = " + shown], "    ")))
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        # what llama.vscode's status bar and completion code read
        assert isinstance(body["content"], str)
        assert body["generation_settings"]["n_ctx"] >= 0
        assert {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms"} <= set(body["timings"])
        assert isinstance(body["tokens_cached"], int)
    # the warm-up's n_predict as it was sent, as llama.cpp echoes it (it was -1)
    assert answers[0].json()["generation_settings"]["n_predict"] == 0
    return answers


async def test_a_llama_vscode_session_through_keel(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    warm, first, typed, after = await replay(keel)
    assert warm.json()["content"] == ""
    assert first.json()["content"] == "compute(a, b)"
    assert (typed.json()["content"], typed.headers["x-keel-source"]) == ("mpute(a, b)", "cache")
    assert after.headers["x-keel-source"] == "model"
    calls = [r.json for r in llamacpp.requests if r.path == "/completion"]
    assert len(calls) == 2  # the warm-up and the typed-through request cost nothing
    prompt = calls[0]["prompt"]
    # The prompt ends at the code: the model writes the space after "x =" itself.
    assert prompt.startswith("<PRE>") and "    x =<SUF>" in prompt
    assert "return a + b" in prompt, "the editor's chunks are keel's snippets"
    assert "id_slot" not in calls[0], "keel picks the slot, not the editor"


async def test_an_infill_answer_gives_the_engines_counts_and_timings(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """llama.vscode shows the prompt's tokens and time from ``timings``: they are what
    the llama.cpp server said of the generation (they were 0 whatever it read); an
    answer typed through keel's cache read no prompt."""
    warm, first, typed, after = await replay(keel)
    calls = [r.json for r in llamacpp.requests if r.path == "/completion"]
    said = llamacpp_timings(calls[0]["prompt"], len(llamacpp.tokens))
    figures = first.json()
    assert figures["tokens_evaluated"] == said["prompt_n"] + said["cache_n"]
    assert figures["timings"]["cache_n"] == said["cache_n"]
    # llama-server's: the cache after the answer, the prompt and the tokens made but the last
    made = figures["tokens_predicted"]
    assert figures["tokens_cached"] == figures["tokens_evaluated"] + made - 1
    assert figures["timings"]["prompt_n"] == said["prompt_n"] > 0
    assert figures["timings"]["prompt_ms"] == said["prompt_ms"]
    assert figures["timings"]["prompt_per_second"] == said["prompt_n"] / said["prompt_ms"] * 1000
    # llama.vim asks for these two by name in response_fields
    assert figures["timings"]["prompt_per_token_ms"] == said["prompt_ms"] / said["prompt_n"]
    timings = figures["timings"]
    assert timings["predicted_per_token_ms"] == timings["predicted_ms"] / timings["predicted_n"]
    assert figures["tokens_predicted"] == figures["timings"]["predicted_n"] == said["predicted_n"]
    assert typed.headers["x-keel-source"] == "cache"
    assert (typed.json()["timings"]["prompt_n"], typed.json()["timings"]["cache_n"]) == (0, 0)
    assert (warm.json()["timings"]["prompt_n"], warm.json()["tokens_predicted"]) == (0, 0)


async def test_a_blank_lines_indentation_left_out_by_llama_vscode_is_put_back(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """On a blank, indented line llama.vscode sends ``prompt: ""`` and ``n_indent``:
    the model is asked as if the editor had sent the indentation (llama.vim does), not
    at column 0."""
    lines = ["import os", "", "def main():", "    x = 1"]
    for line_prefix in ("    ", ""):  # llama.vim, llama.vscode
        body = {**fim(lines, line_prefix), "n_indent": 4}
        answer = await keel.post("/infill", json=body)
        assert answer.status_code == 200, answer.text
    first, second = (r.json["prompt"] for r in llamacpp.requests if r.path == "/completion")
    assert first == second and "    x = 1<SUF>" in first


@pytest.mark.parametrize(
    ("prefix", "n_indent", "line"),
    [
        ("def f():\n\tx = 1\n", 1, "\t"),
        ("def f():\n  x = 1\n\n", 2, "  "),
        ("x = 1\n", 4, "    "),  # nothing indented anywhere: spaces
        ("int main(void) {\n", 1, "\t"),  # ... but one character of it is a tab
        ("def f():\n    x = 1\n", None, ""),
        ("def f():\n    x", 4, ""),  # not at a line's start
    ],
)
def test_the_cursor_line_llama_vscode_leaves_out(
    prefix: str, n_indent: int | None, line: str
) -> None:
    body = InfillRequest(input_prefix=prefix, prompt="", n_indent=n_indent)
    assert body.cursor_line() == line
    assert InfillRequest(input_prefix=prefix, prompt="  ", n_indent=n_indent).cursor_line() == "  "


@pytest.mark.parametrize(
    ("prefix", "suffix", "n_indent", "line"),
    [
        ("function f(x) {\n  if (x) {\n    return 1;\n", "  }\n}\n", 2, ""),  # at column 0
        ("def f(x):\n    if x:\n", "    pass\n", 8, "    "),  # at column 4 of 8
        ("def f(x):\n    if x:\n", "\n    pass\n", 8, "        "),  # a blank line
    ],
)
def test_a_cursor_inside_a_lines_indentation_is_where_it_is(
    prefix: str, suffix: str, n_indent: int, line: str
) -> None:
    """llama.vscode sends the whole line's indentation as ``n_indent`` for a cursor inside
    the indentation of a line that is not blank, the rest of it in the suffix: keel put
    all of it before the cursor, and the model read "  }" as "    }", the cursor at
    column 2."""
    body = InfillRequest(input_prefix=prefix, prompt="", input_suffix=suffix, n_indent=n_indent)
    assert body.cursor_line() == line


@pytest.fixture
async def with_fallback(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeUpstream]]:
    with FakeUpstream() as primary, FakeUpstream(tokens=("fallback()",)) as fallback:
        primary.behave(Behaviour.error(503))
        config = llamacpp_config(primary.url, fallback=fallback.url)
        app = build_app(tmp_path / "keel", config)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
                yield http, primary


async def test_infill_goes_through_keels_routing(
    with_fallback: tuple[httpx.AsyncClient, FakeUpstream],
) -> None:
    keel, primary = with_fallback
    for n in range(3):
        answer = await keel.post("/infill", json=fim(["a = 1"], f"b{n} = "))
        assert answer.status_code == 200, answer.text
        assert answer.json()["content"] == "fallback()"
    providers = (await keel.get("/v1/providers")).json()["roles"]["completion"]["providers"]
    assert providers[0]["breaker"] == "open"  # two failures opened it: the third went around
    assert len([r for r in primary.requests if r.path == "/completion"]) == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**fim(["a"], "b"), "stream": True}, "stream"),
        ({**fim(["a"], "b"), "n_indent": -1}, "n_indent"),
        ({**fim(["a"], "b"), "input_extra": [{"filename": "x.py"}]}, "input_extra"),
        ({**fim(["a"], "b"), "input_prefix": ["a = 1"]}, "input_prefix"),
        # more chunks than a Tabby request may carry snippets: was a 500
        ({**fim(["a"], "b"), "input_extra": [{"text": "c\n"}] * 513}, "input_extra"),
        # held to a grammar, or with probabilities, by llama.cpp: ignored, as if served so
        ({**fim(["a"], "b"), "grammar": 'root ::= "1"'}, "grammar"),
        ({**fim(["a"], "b"), "json_schema": {"type": "integer"}}, "json_schema"),
        ({**fim(["a"], "b"), "n_probs": 5}, "n_probs"),
    ],
)
async def test_bad_bodies_are_a_400_naming_the_field(
    keel: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    answer = await keel.post("/infill", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error.get("param") or "")


async def test_llama_cpps_defaults_for_its_time_limits_are_served(
    keel: httpx.AsyncClient,
) -> None:
    """llama.cpp's default for both is -1 (no limit); -1 for t_max_predict_ms was a 400."""
    body = {**fim(["a"], "b"), "t_max_predict_ms": -1, "t_max_prompt_ms": -1}
    answer = await keel.post("/infill", json=body)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("seed", [-1, 0, 2**63, 2**64 - 1])
async def test_any_64_bit_seed_and_llama_cpps_random_one_are_served(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream, seed: int
) -> None:
    """A seed of 2^63 and above was a 500 (taken as a signed one, then refused as
    Tabby's unsigned); -1, llama.cpp's default (random), was a 400."""
    answer = await keel.post("/infill", json={**fim(["a = 1"], "b = "), "seed": seed})
    assert answer.status_code == 200, answer.text
    sent = [r for r in llamacpp.requests if r.path == "/completion"][-1].json
    assert ("seed" in sent) == (seed != -1), sent
    too_big = await keel.post("/infill", json={**fim(["a = 1"], "b = "), "seed": 2**64})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "seed"


def test_n_indent_stops_at_a_line_indented_less() -> None:
    """An empty line is indented 0, as llama.cpp's server judges it: keel went on past
    one to the lines after it ("a = 1\n\n    b = 2" whole, where llama.cpp ends at
    "a = 1")."""
    text = "x = 1\n        y = 2\n\n    return y\n        z"
    assert cut_at_indent(text, 8) == "x = 1\n        y = 2"
    assert cut_at_indent("a = 1\n\n    b = 2\n", 4) == "a = 1"
    assert cut_at_indent("a = 1\n    ", 8) == "a = 1\n    "  # not judged until more comes
    assert cut_at_indent(text, None) == text
    # a CRLF answer (an OpenAI prompt is sent as written) loses its line end whole: the
    # CR left behind met the editor's own CRLF as "\r\r\n"
    crlf = text.replace("\n", "\r\n")
    assert cut_at_indent(crlf, 8) == "x = 1\r\n        y = 2"
    assert cut_at_indent("a = 1\r\n\r\n    b = 2\r\n", 4) == "a = 1"


@pytest.mark.parametrize(
    ("text", "line_prefix", "line_suffix", "kept"),
    [
        ('x = {}", x);', '    println!("', '");', "x = {}"),  # the quote it closes
        ('name}!"', '    return f"Hallo, {', '}"', "name"),
        ('Hello")', '    print("', '")', "Hello"),  # what llama.vscode drops itself
        ("a(b), c)", "foo(", ")", "a(b), c"),  # its own brackets pair up
        ('"x", y)', "foo(", ")", '"x", y'),  # its own strings too
        ("a, b", "foo(", ")", "a, b"),  # closes nothing
        ("a)\n    b", "foo(", ")", "a)\n    b"),  # more than a line: not mid-line text
        ("x]", "foo(", ")", "x]"),  # closes something else: left to the editor
    ],
)
def test_a_mid_line_answer_ends_where_the_line_already_closes(
    text: str, line_prefix: str, line_suffix: str, kept: str
) -> None:
    assert cut_at_suffix_closer(text, line_prefix, line_suffix) == kept


async def test_n_predict_below_keels_budget_caps_the_answer(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """keel's own budget applied whatever ``n_predict`` asked: a client asking for 4
    tokens got 43, cut mid-expression."""
    asked = await keel.post("/infill", json={**fim(["a = 1"], "b = "), "n_predict": 4})
    assert asked.status_code == 200, asked.text
    default = await keel.post("/infill", json=fim(["c = 1"], "d = "))  # 128: above keel's
    assert default.status_code == 200, default.text
    capped, budget = [r.json["n_predict"] for r in llamacpp.requests if r.path == "/completion"]
    assert capped == 4 and budget == 64, (capped, budget)


async def test_a_superseded_infill_says_so(keel: httpx.AsyncClient, llamacpp: FakeUpstream) -> None:
    """Its empty answer came without the header Tabby's route sends."""
    llamacpp.behave(Behaviour.stall(delay=30.0), times=1)  # the older one, until cancelled
    lines = ["import os", "", "def main():"]
    older = asyncio.ensure_future(keel.post("/infill", json=fim(lines, "    value = ")))
    await llamacpp.wait_for(lambda: any(r.path == "/completion" for r in llamacpp.requests), 5)
    newer = await keel.post("/infill", json=fim(lines, "    value = c"))
    superseded = await older
    assert superseded.json()["content"] == "", superseded.text
    assert superseded.headers.get("x-keel-superseded") == "1"
    # nothing read, nothing made (it said the whole input's estimate was)
    said = superseded.json()
    figures = (said["tokens_evaluated"], said["tokens_cached"], said["tokens_predicted"])
    assert figures == (0, 0, 0), said
    assert "x-keel-superseded" not in newer.headers and newer.json()["content"]
    await llamacpp.wait_for(lambda: llamacpp.disconnects == 1)  # its stalled generation ended
    metrics = (await keel.get("/metrics")).text  # counted as such (in no metric before)
    assert 'keel_superseded_total{role="completion"} 1.0' in metrics
    assert (await keel.get("/v1/providers")).json()["superseded"] == 1, "the same count"


async def test_n_predict_holds_while_requests_queue(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """Under pressure keel halves its budget, to no fewer than 8 tokens: a client's
    4 became 8."""
    from tests.serving.conftest import state_of

    admission = state_of(keel).routing.admission["completion"]
    admission.waiting += 1  # as if a request queued
    try:
        asked = await keel.post("/infill", json={**fim(["a = 1"], "b = "), "n_predict": 4})
    finally:
        admission.waiting -= 1
    assert asked.status_code == 200, asked.text
    assert [r.json["n_predict"] for r in llamacpp.requests if r.path == "/completion"] == [4]


def test_the_language_is_the_one_most_chunks_are_in() -> None:
    """llama.vscode names neither the language nor the file being edited; its chunks come
    from the files last opened or edited. The last chunk's language was taken: a Python
    file was completed as Markdown after a look at the README."""

    def language(*filenames: str) -> str:
        chunks = [{"text": "x\n", "filename": name} for name in filenames]
        return language_of(InfillRequest.model_validate({"input_extra": chunks}))

    assert language("/p/a.py", "/p/b.py", "/p/README.md") == "python"
    assert language("/p/a.py", "/p/main.go") == "go"  # a tie: the later chunk
    assert language("/p/main.go", "/p/a.py", "/p/Makefile") == "python"
    assert language() == language("/p/Makefile") == "unknown"


async def test_the_clients_stop_strings_end_the_answer(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """llama.vim's ``stop_strings`` were dropped with the other unknown fields."""
    answer = await keel.post("/infill", json={**fim(["a = 1"], "b = "), "stop": [", "]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"] == "compute(a"


async def test_response_fields_pick_fields_by_their_paths(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """llama.vim asks for flat keys (``timings/predicted_n``) and reads exactly those: its
    statistics line never showed."""
    fields = ["content", "timings/predicted_n", "truncated", "no/such"]
    answer = await keel.post("/infill", json={**fim(["a = 1"], "b = "), "response_fields": fields})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"content", "timings/predicted_n", "truncated"}, body
    assert body["content"] == "compute(a, b)" and body["timings/predicted_n"] > 0


async def test_a_newline_stop_word_in_a_crlf_file_leaves_no_cr(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """The stop word was applied to the answer with its CRLFs restored: ``stop: ["\\n"]``
    cut between the CR and the LF, and the editor got a stray ``\\r``."""
    llamacpp.tokens = ("self.x = x", "\n", "        self.y = y")
    body = {
        "input_prefix": "class Point:\r\n    def __init__(self, x, y):\r\n",
        "prompt": "        ",
        "input_suffix": "\r\n",
        "n_indent": 8,
        "stop": ["\n"],
    }
    answer = await keel.post("/infill", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"] == "self.x = x"


LINES = ("a = 1", "\n", "b = 2", "\n", "c = 3", "\n", "d = 4", "\n", "e = 5")


async def left_early(llamacpp: FakeUpstream) -> bool:
    """Whether keel closed the fake's stream before its end (the fake notices at its
    next token)."""
    for _ in range(100):
        if llamacpp.disconnects:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_n_indent_ends_the_generation_not_just_the_answer(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """llama.cpp's server stops generating at a line indented less than ``n_indent``;
    keel generated its whole budget, then cut the answer there (llama.vim sends
    ``n_indent`` with every request: the wait for tokens it never shows)."""
    llamacpp.tokens = (
        *("self.x = x", "\n", "        self.y = y", "\n"),
        *("    def norm(self):", "\n", "        return 0", "\n", "        # more"),
    )
    body = {
        "input_prefix": "class Point:\n    def __init__(self, x, y):\n",
        "prompt": "        ",
        "input_suffix": "\n",
        "n_indent": 8,
    }
    answer = await keel.post("/infill", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"] == "self.x = x\n        self.y = y"
    assert await left_early(llamacpp), "the rest of the answer was generated"


async def test_t_max_predict_ms_ends_the_answer_at_a_new_line_once_past(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """As llama.cpp's server: once ``t_max_predict_ms`` has passed since the first
    token, the answer ends at the next new line (keel ignored the field, and llama.vim,
    which sends 1000 by default, waited for the whole decoding budget)."""
    llamacpp.tokens, llamacpp.token_delay = LINES, 0.1
    body = {"input_prefix": "x = 0\n", "prompt": "", "t_max_predict_ms": 150}
    answer = await keel.post("/infill", json=body)
    assert answer.status_code == 200, answer.text
    content = answer.json()["content"]
    # the new line after "b = 2" comes 300 ms after the first token (after "a = 1" at
    # 100 ms, on a slow machine)
    assert content.startswith("a = 1") and "c = 3" not in content, content
    assert await left_early(llamacpp)
    # and the server is asked to apply it too, token by token, as keel reads pieces
    sent = [r for r in llamacpp.requests if r.path == "/completion"][-1].json
    assert sent["t_max_predict_ms"] == 150, sent


async def test_the_clients_stop_words_end_the_generation(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """``stop`` was applied to the whole answer, after keel's budget was spent."""
    llamacpp.tokens = LINES
    body = {"input_prefix": "x = 0\n", "prompt": "", "stop": ["c ="]}
    answer = await keel.post("/infill", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"].rstrip() == "a = 1\nb = 2"
    sent = [r for r in llamacpp.requests if r.path == "/completion"][-1].json
    assert "c =" in sent["stop"], "the backend is asked to stop there too"
    assert await left_early(llamacpp)


@pytest.mark.parametrize(
    "stop",
    [[""], ["x" * 257], [f"s{n}" for n in range(17)]],
    ids=["empty", "too-long", "too-many"],
)
async def test_stop_words_are_held_to_keels_bounds(
    keel: httpx.AsyncClient, stop: list[str]
) -> None:
    """They go to the engine, which checks each at every token: the bounds of every
    other route's ``stop`` (at most 16, of 1 to 256 characters)."""
    answer = await keel.post("/infill", json={**fim(["a"], "b"), "stop": stop})
    assert answer.status_code == 400, answer.text
    assert "stop" in (answer.json()["error"].get("param") or "")


async def ended(pieces: list[str], ends: AnswerEnds) -> tuple[str, bool]:
    """What ``ends`` lets through of ``pieces`` (10 ms apart), and whether it closed
    their stream."""
    closed = False

    async def stream() -> AsyncIterator[str]:
        nonlocal closed
        try:
            for piece in pieces:
                yield piece
                await asyncio.sleep(0.01)
        finally:
            closed = True

    return "".join([piece async for piece in ends.applied(stream())]), closed


async def test_answer_ends_cut_inside_a_piece_and_close_the_stream() -> None:
    """keel joins tokens made close together into one piece: the end falls inside it."""
    late = AnswerEnds(max_predict_ms=1)
    assert await ended(["a = 1", "\n    b = 2", "\n"], late) == ("a = 1\n", True)
    indent = AnswerEnds(n_indent=8)
    pieces = ["x\n", "        y\n    z", "\n        w"]
    assert await ended(pieces, indent) == ("x\n        y", True)
    assert await ended(["x\n", "        y"], indent) == ("x\n        y", True)


async def test_an_answer_from_the_cache_is_cut_by_this_requests_n_indent_in_a_crlf_file(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """The cut answer kept the CR of its last CRLF: the editor got a stray ``\\r``."""
    llamacpp.tokens = ("self.x = x", "\n", "        self.y = y", "\n", "    def norm(self):")
    base = {
        "input_prefix": "class Point:\r\n    def __init__(self, x, y):\r\n",
        "input_suffix": "\r\n",
    }
    whole = await keel.post("/infill", json={**base, "prompt": "        "})
    assert "def norm" in whole.json()["content"]  # no n_indent: the whole answer, kept
    typed = await keel.post("/infill", json={**base, "prompt": "        se", "n_indent": 8})
    assert typed.headers["x-keel-source"] == "cache"
    assert typed.json()["content"] == "lf.x = x\r\n        self.y = y"


async def test_a_crlf_stop_word_ends_the_generation_in_a_crlf_file(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """The model writes new lines as "\\n": a stop word with "\\r\\n" never matched while
    it generated (the answer was cut at it afterwards, the budget spent)."""
    llamacpp.tokens = LINES
    body = {"input_prefix": "x = 0\r\n", "prompt": "", "input_suffix": "\r\n", "stop": ["2\r\n"]}
    answer = await keel.post("/infill", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"] == "a = 1\r\nb ="
    assert await left_early(llamacpp)


async def test_an_input_left_out_for_the_budget_is_said_truncated(
    keel: httpx.AsyncClient,
) -> None:
    """A prefix of ~2,300 tokens was cut to the prompt's budget and the answer said
    ``truncated: false``, as it always did; a short one is whole."""
    short = await keel.post("/infill", json=fim(["a = 1"], "b = "))
    assert short.status_code == 200 and short.json()["truncated"] is False, short.text
    lines = [f"value_{n} = compute({n}, {n + 1})  # a line of the long file" for n in range(600)]
    long = await keel.post("/infill", json=fim(lines, "b = "))
    assert long.status_code == 200 and long.json()["truncated"] is True, long.text


async def test_llama_cpps_bounds_are_taken_and_keels_own_said_in_its_words(
    keel: httpx.AsyncClient,
) -> None:
    """n_predict 10^9 (llama.cpp takes it) was a 400 "Input should be less than or equal
    to 131072", where keel's budget caps it anyway; 513 chunks were "List should have at
    most 512 items after validation", with no word of the editor's ring."""
    huge = await keel.post("/infill", json={**fim(["a = 1"], "b = "), "n_predict": 10**9})
    assert huge.status_code == 200, huge.text
    many = await keel.post(
        "/infill", json={**fim(["a"], "b"), "input_extra": [{"text": "c\n"}] * 513}
    )
    assert many.status_code == 400, many.text
    assert "ring_n_chunks" in many.json()["error"]["message"], many.text
