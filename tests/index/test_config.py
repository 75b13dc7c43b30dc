"""The [[repositories]] and [index] sections of config.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.config import parse_settings
from keel.errors import ConfigError


def test_repositories_and_index_parse() -> None:
    settings = parse_settings(
        {
            "repositories": [{"name": "api", "path": "/src/api", "git_url": "git@h:o/api.git"}],
            "index": {"refresh_seconds": 0, "min_score": 1.5},
        },
        "config.toml",
        {},
    )
    assert settings.repositories[0].name == "api"
    assert settings.index.refresh_seconds == 0 and settings.index.min_score == 1.5


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"repositories": [{"name": "a"}, {"name": "a"}]}, "repositories"),
        ({"repositories": [{"name": " ", "path": "/src"}]}, "repositories[0].name"),
        ({"repositories": [{"name": "a\nb", "path": "/src"}]}, "repositories[0].name"),
        ({"index": {"refresh_seconds": -1}}, "index.refresh_seconds"),
        # was keel's working directory, indexed and put into prompts
        ({"repositories": [{"name": "x", "path": ""}]}, "repositories[0].path"),
        # one remote in two spellings: requests for it went to the first
        (
            {
                "repositories": [
                    {"name": "a", "path": "/src/a", "git_url": "https://github.com/o/b.git"},
                    {"name": "b", "path": "/src/b", "git_url": "git@github.com:o/b"},
                ]
            },
            "repositories",
        ),
    ],
)
def test_bad_values_name_their_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml", {})
    assert f"  - {key}:" in caught.value.message


def test_tabbys_repository_form_is_taken() -> None:
    """Tabby's [[repositories]] has git_url and refs, no name or path: keel refused both
    keys; with names derived, two of them read as a repeated name."""
    raw = {
        "repositories": [
            {"git_url": "file:///home/dev/billing-api", "refs": ["main"]},
            {"git_url": "file:///home/dev/team%20b/billing-api"},  # the same directory name
            {"git_url": "https://github.com/acme/web.git"},  # Tabby clones it; keel does not
        ]
    }
    settings = parse_settings(raw, "config.toml", {})
    shaped = [(repo.name, repo.path, repo.refs) for repo in settings.repositories]
    assert shaped == [
        ("billing-api", "/home/dev/billing-api", ["main"]),
        ("billing-api-2", "/home/dev/team b/billing-api", []),
        ("web", None, []),
    ]
    assert settings.ignored_sections() == [
        "repository 'web' is skipped: keel indexes a local checkout and does not clone "
        "git_url; set its path"
    ]


def test_a_named_tabby_repository_is_its_file_urls_checkout() -> None:
    """Tabby's docs name theirs (``name = "repository_a"``, ``git_url = "file:///..."``):
    with a name the URL was not read as the path, and the checkout was skipped as one
    keel would have to clone."""
    raw = {"repositories": [{"name": "repository_a", "git_url": "file:///home/dev/app"}]}
    settings = parse_settings(raw, "config.toml", {})
    assert [(r.name, r.path) for r in settings.repositories] == [("repository_a", "/home/dev/app")]
    assert settings.ignored_sections() == []


def test_any_tabby_name_is_taken_and_its_index_stays_in_the_index_root(tmp_path: Path) -> None:
    """Tabby accepts any name: ``name = "My Project"`` refused to start with a raw
    pattern message. Its index directory is made of its letters, never a way out."""
    raw = {
        "repositories": [
            {"name": "My Project", "path": "/src/a"},
            {"name": "../escape", "path": "/src/b"},
            {"name": "..", "path": "/src/c"},
            {"name": "api", "path": "/src/d"},
        ]
    }
    repos = parse_settings(raw, "config.toml", {}).repositories
    assert [r.name for r in repos] == ["My Project", "../escape", "..", "api"]
    names = [r.directory_name for r in repos]
    assert names[0].startswith("My-Project-") and names[1].startswith("escape-")
    assert names[3] == "api"  # an existing index keeps its directory
    assert len(set(names)) == 4
    root = tmp_path / "index"
    for name in names:
        assert (root / name).resolve().parent == root.resolve()


def test_one_checkout_listed_by_a_linked_path_is_listed_twice(tmp_path: Path) -> None:
    """README: a checkout listed twice by path is an error; through a symbolic link to
    it, it was indexed twice, its snippets shown twice."""
    (tmp_path / "app").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "app")
    raw = {
        "repositories": [
            {"name": "app", "path": str(tmp_path / "app")},
            {"name": "app-link", "path": str(tmp_path / "link")},
        ]
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml", {})
    assert "a repository is listed twice" in caught.value.message
    assert str(tmp_path / "app") in caught.value.message
