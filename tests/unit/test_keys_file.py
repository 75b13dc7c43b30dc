"""The keys file's life: its keys in force while it exists, withdrawn when it is
deleted, and access never opened by taking keys away. (Served end to end in
tests/api/test_access.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keel.auth import Access, KeyStore, parse_keys_file
from keel.config import AuthConfig

FILE_KEY = "file-key-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 2.0  # each look is over a second after the last: the file is re-read
        return self.now


def access(store: KeyStore, key: str) -> Access | None:
    identity = store.identify([key])
    return None if identity is None else identity.access


def test_deleting_the_keys_file_revokes_its_keys_and_keeps_access_closed(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text(f'api_keys = ["{FILE_KEY}"]\n')
    store = KeyStore(AuthConfig(keys_file="keys.toml"), tmp_path, clock=Clock())
    assert store.enabled and access(store, FILE_KEY) is Access.USER
    (tmp_path / "keys.toml").unlink()
    assert access(store, FILE_KEY) is None
    assert store.enabled  # no key left: nobody gets in, rather than everybody
    assert store.file_error is not None and "does not exist" in store.file_error
    (tmp_path / "keys.toml").write_text(f'api_keys = ["{FILE_KEY}"]\n')
    assert access(store, FILE_KEY) is Access.USER  # back when the file is


def test_a_rotated_key_of_the_same_length_and_mtime_takes_effect(tmp_path: Path) -> None:
    """Keys of one length, written with one mtime (a Nix store's 1, SOURCE_DATE_EPOCH,
    ``cp -p``), in place or moved over the file: the file's size and mtime alone said
    nothing changed, and the revoked key stayed in force."""
    keys = tmp_path / "keys.toml"
    keys.write_text('api_keys = ["rotate-key-AAAA"]\n')
    os.utime(keys, ns=(1_000_000_000, 1_000_000_000))
    store = KeyStore(AuthConfig(keys_file="keys.toml"), tmp_path, clock=Clock())
    assert access(store, "rotate-key-AAAA") is Access.USER
    keys.write_text('api_keys = ["rotate-key-BBBB"]\n')
    os.utime(keys, ns=(1_000_000_000, 1_000_000_000))
    assert access(store, "rotate-key-AAAA") is None
    assert access(store, "rotate-key-BBBB") is Access.USER
    moved = tmp_path / "keys.new"
    moved.write_text('api_keys = ["rotate-key-CCCC"]\n')
    os.utime(moved, ns=(1_000_000_000, 1_000_000_000))
    moved.replace(keys)
    assert access(store, "rotate-key-BBBB") is None
    assert access(store, "rotate-key-CCCC") is Access.USER


def test_emptying_the_keys_file_keeps_access_closed(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text(f'api_keys = ["{FILE_KEY}"]\n')
    store = KeyStore(AuthConfig(keys_file="keys.toml"), tmp_path, clock=Clock())
    (tmp_path / "keys.toml").write_text("api_keys = []\n")
    assert access(store, FILE_KEY) is None
    assert store.enabled


def test_a_config_key_outlives_the_keys_file(tmp_path: Path) -> None:
    config = AuthConfig(api_keys=["config-key-0123456789"], keys_file="keys.toml")
    store = KeyStore(config, tmp_path, clock=Clock())  # the file never existed
    assert access(store, "config-key-0123456789") is Access.USER
    assert access(store, FILE_KEY) is None


def test_a_keys_outer_whitespace_is_dropped(tmp_path: Path) -> None:
    """A key read from a secret file (``${KEY}``) often ends in a newline, and a client
    cannot send a key's outer whitespace (HTTP trims header values): kept, it matched
    nothing, and the admin saw every request refused."""
    (tmp_path / "keys.toml").write_text(
        f'api_keys = ["{FILE_KEY} "]\nadmin_key = " admin-1234567"\n'
    )
    config = AuthConfig(
        api_keys=["config-key-0123456789\n"], admin_key="admin-key-0123\n", keys_file="keys.toml"
    )
    store = KeyStore(config, tmp_path, clock=Clock())
    assert access(store, "config-key-0123456789") is Access.USER
    assert access(store, FILE_KEY) is Access.USER
    assert access(store, "admin-1234567") is Access.ADMIN
    assert AuthConfig(admin_key=" admin-key-0123 ").admin_key == "admin-key-0123"


def test_a_keys_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'\ufeffapi_keys = ["{FILE_KEY}"]\n', encoding="utf-8")
    assert parse_keys_file(path).users == (FILE_KEY,)


def test_a_keys_file_that_cannot_be_read_says_which_keys_are_in_force(tmp_path: Path) -> None:
    """A directory in its place at start said "keeping the keys in force", with none in
    force: every client was refused as if its key were wrong."""
    (tmp_path / "keys.toml").mkdir()
    store = KeyStore(AuthConfig(keys_file="keys.toml"), tmp_path, clock=Clock())
    assert store.file_error is not None and "no key is in force" in store.file_error
    config = AuthConfig(api_keys=[FILE_KEY], keys_file="keys.toml")
    kept = KeyStore(config, tmp_path, clock=Clock())
    assert kept.file_error is not None and "keeping the 1 key(s) in force" in kept.file_error


def test_a_keys_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Read, a FIFO waited for a writer for ever: check, doctor and serve hung, and a
    reload froze every route of a running keel."""
    fifo = tmp_path / "keys.toml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        parse_keys_file(fifo)
    store = KeyStore(AuthConfig(keys_file=str(fifo)), tmp_path)  # serve's, a reload's
    assert store.file_error is not None and "not a regular file" in store.file_error


@pytest.mark.parametrize("torn", ["", "  \n# saving\n"])
def test_a_keys_file_left_empty_by_a_writer_keeps_its_keys(tmp_path: Path, torn: str) -> None:
    """An empty file, or one of whitespace and comments (a writer killed mid-save, an
    editor saving), revoked every key in it, the admin's too, and the audit log said
    "reloaded". It is refused, as a torn file is; ``api_keys = []`` revokes them."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'api_keys = ["{FILE_KEY}"]\nadmin_key = "admin-key-0123456789"\n')
    said: list[tuple[bool, str]] = []
    store = KeyStore(
        AuthConfig(keys_file="keys.toml"),
        tmp_path,
        clock=Clock(),
        on_reload=lambda ok, text: said.append((ok, text)),
    )
    keys.write_text(torn)
    assert access(store, FILE_KEY) is Access.USER
    assert access(store, "admin-key-0123456789") is Access.ADMIN
    assert said and said[-1][0] is False and "api_keys = []" in said[-1][1], said
    keys.write_text("api_keys = []\n")
    assert access(store, FILE_KEY) is None
    assert access(store, "admin-key-0123456789") is None
