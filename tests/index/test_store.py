"""Walking, chunking and the incremental BM25 index, on small temporary repositories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keel.errors import Unavailable
from keel.index.chunk import MAX_CHUNK_LINES, chunk_file
from keel.index.store import MANIFEST_VERSION, RepositoryIndex
from keel.index.tokens import document_terms, query_terms
from keel.index.walk import list_source_files, skip_reason
from tests.index.conftest import git

EXPECTED = ["tools/run.sh", "weather/client.py", "weather/units.py"]


def open_index(root: Path, data: Path) -> RepositoryIndex:
    return RepositoryIndex("weather", root, data / "index" / "weather", max_file_bytes=100_000)


def indexed_paths(index: RepositoryIndex) -> set[str]:
    return {hit.path for hit in index.search(["fetch", "forecast", "celsius", "echo"], limit=100)}


def test_walk_respects_gitignore_and_skips_vendored_generated_and_unknown(repo: Path) -> None:
    files = [f.relpath for f in list_source_files(repo, max_file_bytes=100_000)]
    # blob.py is listed by name; its content is rejected when read (see the next test).
    assert files == ["blob.py", *EXPECTED]


def test_walk_uses_git_in_a_checkout(repo: Path) -> None:
    git(repo, "init", "-q")
    (repo / "weather" / ".gitignore").write_text("units.py\n")
    files = [f.relpath for f in list_source_files(repo, max_file_bytes=100_000)]
    assert files == ["blob.py", "tools/run.sh", "weather/client.py"]


def test_a_path_inside_a_checkout_keeps_out_what_its_parents_ignore(tmp_path: Path) -> None:
    """A monorepo's service as the repository's ``path``: the files the checkout's own
    ignore rules keep out were indexed, and sent to the model as snippets."""
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("secret_*.py\n")
    (tmp_path / ".git" / "info" / "exclude").write_text("local_*.py\n")
    service = tmp_path / "service"
    service.mkdir()
    for name in ("app.py", "secret_keys.py", "local_settings.py"):
        (service / name).write_text("VALUE = 1\n")
    files = [f.relpath for f in list_source_files(service, max_file_bytes=100_000)]
    assert files == ["app.py"]


def test_a_directory_its_checkout_ignores_whole_is_walked_with_its_own_rules(
    tmp_path: Path,
) -> None:
    """An installed package in a venv inside a clone (``keel eval``'s default
    repositories): git lists nothing there, so the eval drew no samples and printed a
    table of zeros, exit 0. Named on purpose, such a directory is walked, its own
    ignore files holding."""
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    package = tmp_path / ".venv" / "lib" / "pkg"
    package.mkdir(parents=True)
    (package / ".gitignore").write_text("built_*.py\n")
    for name in ("api.py", "built_table.py"):
        (package / name).write_text("VALUE = 1\n")
    files = [f.relpath for f in list_source_files(package, max_file_bytes=100_000)]
    assert files == ["api.py"]


@pytest.mark.parametrize("checkout", [False, True], ids=["plain", "git"])
def test_a_symlink_is_never_followed_out_of_the_checkout(
    repo: Path, tmp_path: Path, checkout: bool
) -> None:
    """A deployment's ``local_settings.py`` linked to a file outside the checkout was
    read, and its secrets went into every user's prompts (git keeps a link's target
    name, never its text)."""
    secret = tmp_path / "elsewhere" / "settings_secret.py"
    secret.parent.mkdir()
    secret.write_text('DB_PASSWORD = "hunter2"\n')
    (repo / "weather" / "local_settings.py").symlink_to(secret)
    (repo / "weather" / "alias.py").symlink_to(repo / "weather" / "client.py")
    if checkout:
        git(repo, "init", "-q")
    skipped: dict[str, str] = {}
    files = [f.relpath for f in list_source_files(repo, max_file_bytes=100_000, skipped=skipped)]
    assert "weather/local_settings.py" not in files and "weather/alias.py" not in files
    assert "symbolic link" in skipped["weather/local_settings.py"]
    assert "weather/client.py" in files


@pytest.mark.parametrize("swapped", ["weather/units.py", "weather"])
def test_a_file_swapped_for_a_link_while_an_update_reads_is_not_read_through_it(
    repo: Path, tmp_path: Path, swapped: str
) -> None:
    """Files are read a while after they are listed: one (or its directory) replaced by
    a link meanwhile, as a pull landing during an update does, was read through it,
    and a file outside the checkout went into prompts until the next refresh."""
    outside = tmp_path / "outside"
    (outside / "weather").mkdir(parents=True)
    for name in ("units.py", "client.py"):
        (outside / "weather" / name).write_text('def fetch_forecast():\n    hunter2 = "x"\n')

    def swap(done: int, total: int, relpath: str) -> None:
        if done == 1:  # listed, not yet read
            moved = repo / swapped
            os.rename(moved, tmp_path / "old")
            moved.symlink_to(outside / swapped)

    index = open_index(repo, tmp_path / "data")
    index.update(swap)
    assert index.search(["hunter2"]) == []
    kept = {"tools/run.sh"} if swapped == "weather" else {"tools/run.sh", "weather/client.py"}
    assert indexed_paths(index) == kept
    index.update()  # the next update lists the link for what it is: left out
    assert index.search(["hunter2"]) == [] and indexed_paths(index) == kept


def test_huge_files_are_skipped(repo: Path) -> None:
    skipped: dict[str, str] = {}
    files = [f.relpath for f in list_source_files(repo, max_file_bytes=400, skipped=skipped)]
    assert "weather/client.py" in skipped and "max_file_bytes" in skipped["weather/client.py"]
    assert "weather/client.py" not in files and "weather/units.py" in files


def test_content_checks() -> None:
    assert skip_reason(b"abc\0def") == "binary"
    assert skip_reason(b"\xff\xfe\xfa") == "not UTF-8 text"
    assert skip_reason(b"# @generated by protoc\nx = 1\n") == "generated"
    go = b"// Code generated by protoc-gen-go. DO NOT EDIT.\npackage x\n"
    assert skip_reason(go) == skip_reason(b"# Generated by Django 4.2\n") == "generated"
    assert skip_reason(b"/* This file is auto-generated */\nint x;\n") == "generated"
    # hand-written: the words in a docstring, or a comment not about the file
    template = (
        b'"""Make the sample."""\nHEADER = """\\\n# Generated by keel from the fields.\n"""\n'
    )
    assert skip_reason(template) is None, "a string holding a header, in hand-written code"
    licensed = b"// Copyright 2026 the authors.\n\n// Code generated by stringer. DO NOT EDIT.\n"
    assert skip_reason(licensed + b"package x\n") == "generated"
    ticket = b'class Ticket:\n    """Its id is auto-generated by the database."""\n'
    assert skip_reason(ticket) is None
    assert skip_reason(b"VERSION = '1.0'  # DO NOT EDIT THIS LINE MANUALLY\n") is None
    assert skip_reason(b"var a=" + b"1," * 5000) == "minified"
    # one data line among short ones: it became a 100 KB chunk that crowded out snippets
    data = b"def f():\n    return 1\n" * 400 + b"TABLE = [" + b"1, " * 20_000 + b"]\n"
    assert skip_reason(data) == "a line of 60,010 characters (data, not code)"
    assert skip_reason(b"def f():\n    return 1\n") is None


def test_python_chunks_follow_definitions() -> None:
    source = "import os\n\n\n" + "".join(
        f"def function_{i}(value):\n"
        + "".join(f"    value = value * {j} + len(str(value)) - {i}\n" for j in range(8))
        + "    return result\n\n\n"
        for i in range(3)
    )
    chunks = chunk_file("m.py", source)
    assert any(c.text.startswith("def function_1(value):") for c in chunks)
    for chunk in chunks:  # no definition is cut in the middle
        assert chunk.text.count("def ") == chunk.text.count("return result")


def test_large_class_is_cut_along_its_methods() -> None:
    methods = "".join(
        f"    def method_{i}(self):\n" + "".join(f"        x{j} = {j}\n" for j in range(8)) + "\n"
        for i in range(10)
    )
    chunks = chunk_file("big.py", "class Big:\n" + methods)
    assert len(chunks) > 1
    assert all(c.end_line - c.start_line + 1 <= MAX_CHUNK_LINES for c in chunks)
    assert chunks[0].text.startswith("class Big:")
    assert sum(c.text.count("def method_") for c in chunks) == 10


def test_files_without_grammar_are_cut_into_line_windows() -> None:
    text = "".join(f"echo line number {i}\n" for i in range(100))
    chunks = chunk_file("run.sh", text)
    assert len(chunks) >= 3
    assert [c.start_line for c in chunks] == sorted(c.start_line for c in chunks)
    assert chunks[0].start_line == 0 and chunks[-1].text.endswith("echo line number 99")


def test_terms_split_identifiers() -> None:
    assert document_terms("getUserName(user_id)").split() == [
        "getusername",
        "get",
        "user",
        "name",
        "user_id",
        "user",
        "id",
    ]
    assert query_terms(["return self.fetch_forecast(city)"]) == [
        "city",
        "fetch_forecast",
        "fetch",
        "forecast",
    ]


def test_index_finds_chunks_and_skips_binaries(repo: Path, tmp_path: Path) -> None:
    index = open_index(repo, tmp_path)
    stats = index.update()
    assert stats.skipped == {"blob.py": "binary"}
    assert sorted(stats.reindexed) == sorted(["blob.py", *EXPECTED])
    assert indexed_paths(index) == set(EXPECTED)
    hits = index.search(["celsius_to_fahrenheit"])
    assert hits[0].path == "weather/units.py"
    assert hits[0].body.startswith("def celsius_to_fahrenheit(celsius_degrees):")
    assert hits[0].start_line == 0


def test_update_rereads_only_changed_files_and_removes_deleted(repo: Path, tmp_path: Path) -> None:
    index = open_index(repo, tmp_path)
    index.update()

    again = open_index(repo, tmp_path).update()  # a new process: state comes from disk
    assert again.read == [] and not again.changed
    # what was skipped for its content is said again, though not read again: `keel
    # index` reported 3 skipped, then 1
    assert again.skipped == {"blob.py": "binary"}, again.skipped

    units = repo / "weather" / "units.py"
    units.write_text(units.read_text() + "\n\ndef kelvin_to_celsius(kelvin_degrees):\n    pass\n")
    changed = index.update()
    assert changed.read == ["weather/units.py"]
    assert changed.reindexed == ["weather/units.py"]
    assert index.search(["kelvin_to_celsius"])[0].path == "weather/units.py"

    stat = units.stat()  # touched, same content: read to compare, not re-indexed
    os.utime(units, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = index.update()
    assert touched.read == ["weather/units.py"] and touched.reindexed == []

    (repo / "weather" / "client.py").unlink()
    removed = index.update()
    assert removed.removed == ["weather/client.py"] and removed.read == []
    assert "weather/client.py" not in indexed_paths(index)
    assert index.search(["fetch_forecast"]) == []


def test_search_excludes_a_path(repo: Path, tmp_path: Path) -> None:
    index = open_index(repo, tmp_path)
    index.update()
    assert {h.path for h in index.search(["fetch_forecast", "celsius"])} >= {
        "weather/client.py",
        "weather/units.py",
    }
    assert "weather/client.py" not in {
        h.path
        for h in index.search(["fetch_forecast", "celsius"], exclude_path="weather/client.py")
    }


def test_search_before_any_update_finds_nothing(repo: Path, tmp_path: Path) -> None:
    assert open_index(repo, tmp_path).search(["fetch_forecast"]) == []


def test_an_index_of_another_version_is_rebuilt_without_duplicates(
    repo: Path, tmp_path: Path
) -> None:
    index = open_index(repo, tmp_path)
    index.update()
    before = index.search(["fetch_forecast", "celsius"], limit=100)
    manifest = tmp_path / "index" / "weather" / "files.json"
    written = manifest.read_text()
    manifest.write_text(written.replace(f'"version": {MANIFEST_VERSION}', '"version": 1'))
    rebuilt = index.update()
    assert sorted(rebuilt.reindexed) == sorted(["blob.py", *EXPECTED])
    assert len(index.search(["fetch_forecast", "celsius"], limit=100)) == len(before)


def test_progress_bar_redraws_on_a_terminal_and_writes_lines_elsewhere() -> None:
    import io

    from keel.index.progress import ProgressBar

    terminal = io.StringIO()
    bar = ProgressBar("index x", terminal, tty=True)
    for done in range(1, 4):
        bar(done, 3, f"file{done}.py")
    bar.finish()
    assert terminal.getvalue().count("\r") >= 2 and "3/3 file3.py" in terminal.getvalue()

    log = io.StringIO()
    plain = ProgressBar("index x", log, tty=False)
    for done in range(1, 101):
        plain(done, 100, "f.py")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 11
    assert lines[-1] == "index x: 100/100 files (100%)"


def test_files_the_index_cannot_take_are_skipped_not_the_repository(
    repo: Path, tmp_path: Path
) -> None:
    """One expression 1,200 operators deep (the chunker's recursion limit), a name that
    is not UTF-8 (the index refused it) failed the whole repository's index on every
    refresh; a name with a line break put the rest of the name into prompts as code."""
    deep = ["def frobnicate_total(values):", "    return ("]
    deep += [f"        values[{n}] +" for n in range(1200)] + ["        0", "    )", ""]
    (repo / "sums.py").write_text("\n".join(deep))
    (repo / os.fsdecode(b"caf\xe9_module.py")).write_text("def zorblax_latin(v):\n    return v\n")
    (repo / "new\nline.py").write_text("def zorblax_newline(v):\n    return v\n")
    index = open_index(repo, tmp_path)
    stats = index.update()
    assert indexed_paths(index) == set(EXPECTED)
    assert index.search(["frobnicate_total"])[0].path == "sums.py"
    assert stats.skipped == {
        "blob.py": "binary",
        "caf\\xe9_module.py": "its name is not UTF-8 text",
        "new\nline.py": "its name holds a line break or another control character",
    }, stats.skipped
    assert not index.search(["zorblax_latin", "zorblax_newline"])


def test_a_full_index_disk_says_so(repo: Path, tmp_path: Path) -> None:
    """A full disk showed as tantivy's "An index writer was killed.. A worker thread
    encountered an error (io::Error most likely)", every round, naming no directory."""
    data = tmp_path / "data"
    (data / "index" / "weather").mkdir(parents=True)
    where = data / "index" / "weather"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(where)], capture_output=True
    )
    assert mounted.returncode == 0, f"no tmpfs here: {mounted.stderr.decode().strip()}"
    try:
        for n in range(20):
            (repo / "weather" / f"big_{n}.py").write_text(
                "".join(
                    f"def forecast_{n}_{i}(city_name):\n    return {i}\n\n" for i in range(2000)
                )
            )
        with pytest.raises(Unavailable) as failed:
            open_index(repo, data).update()
        assert str(where) in failed.value.message
        assert "MiB free: is it full?" in failed.value.message, failed.value.message
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_grammar_that_cannot_be_loaded_is_said_not_silently_skipped(tmp_path: Path) -> None:
    """A tree-sitter older than the grammar's ABI ("Incompatible Language version 15")
    turned Python's code-aware chunks into line windows with no word anywhere. Here the
    installed grammar is swapped, for the process, for one that has no language in it."""
    broken = tmp_path / "tree_sitter_python"
    broken.mkdir()
    (broken / "__init__.py").write_text("# a grammar package without its language\n")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging; logging.basicConfig(format='%(levelname)s %(message)s');"
            "from keel.index.chunk import chunk_file;"
            "print(len(chunk_file('m.py', 'def f():\\n    return 1\\n' * 3)))",
        ],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 1  # still chunked, by lines
    assert "WARNING files ending .py are chunked by lines, not by their syntax" in run.stderr
    assert "tree_sitter_python cannot be used (AttributeError" in run.stderr
    assert "pip install -U tree-sitter tree-sitter-python" in run.stderr
