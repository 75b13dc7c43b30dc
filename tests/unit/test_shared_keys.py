"""The pure parts of the keys kept in Redis: hashing, the stored record, names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from keel.auth import key_hash, key_id, open_remote_issue
from keel.config import Paths, parse_settings
from keel.errors import RequestError
from keel.state.shared_keys import (
    SharedKey,
    SharedKeySet,
    check_name,
    new_key,
    parse_records,
    record_for,
)


def test_the_hash_is_the_sha256_and_the_id_its_prefix() -> None:
    digest = hashlib.sha256(b"some-key-123").hexdigest()
    assert key_hash("some-key-123") == digest
    assert key_id("some-key-123") == "key-" + digest[:10]


def test_a_new_key_is_strong_and_its_record_holds_only_the_hash() -> None:
    secret, record = new_key("alice", admin=True)
    assert secret.startswith("keel-") and len(secret) >= 40
    assert new_key("alice")[0] != secret
    assert record.id == key_id(secret) and record.sha256 == key_hash(secret)
    assert record.admin and record.name == "alice" and record.source == "cli"
    assert secret not in record.to_json()


def test_a_record_round_trips_through_json() -> None:
    record = record_for("a-key-for-bob-1", "bob", source="file")
    assert SharedKey.from_json(record.id, record.to_json()) == record
    assert SharedKey.from_json(record.id, record.to_json().encode()) == record


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"sha256": "abc", "name": "x"}', "64 lowercase hex"),
        (json.dumps({"sha256": "a" * 64, "name": 3}), "name must be a string"),
        (json.dumps({"sha256": "a" * 64, "name": "x", "admin": "yes"}), "admin true or false"),
        (json.dumps({"sha256": "a" * 64, "name": "x", "source": "web"}), "source must be"),
    ],
)
def test_a_bad_record_says_what_is_wrong(raw: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        SharedKey.from_json("key-0123456789", raw)
    assert "key-0123456789" in str(caught.value)


def test_bad_records_are_skipped_and_reported() -> None:
    good = record_for("a-good-key-123", "good")
    records, problems = parse_records({good.id.encode(): good.to_json().encode(), b"key-x": b"{"})
    assert records == {good.id: good}
    assert len(problems) == 1 and problems[0].startswith("key-x")


def test_a_key_set_finds_a_presented_key_by_its_hash() -> None:
    user, admin = record_for("user-key-0001", "u"), record_for("admin-key-001", "a", admin=True)
    keys = SharedKeySet.of("v7", {user.id: user, admin.id: admin})
    assert keys.find("user-key-0001") == user
    assert keys.find("admin-key-001") == admin
    assert keys.find("user-key-0002") is None
    assert keys.find(user.sha256) is None, "the hash itself is no key"
    assert keys.has_admin and keys.ids == {user.id, admin.id}
    assert not SharedKeySet().has_admin


@pytest.mark.parametrize("name", ["", "alice", "ci.bot-1", "ops@team:eu"])
def test_good_names(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", ["key-123", "has space", "x" * 65, "semi;colon"])
def test_bad_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(RequestError, match="up to 64 letters"):
        check_name(name)


def test_with_redis_keys_a_remote_bind_is_allowed_and_without_keys_refused(
    tmp_path: Path,
) -> None:
    paths = Paths(tmp_path)
    with_redis = parse_settings({"state": {"redis_url": "redis://r:6379/0"}}, "c.toml")
    assert open_remote_issue(with_redis, paths.root, "0.0.0.0") is None  # keys from Redis
    issue = open_remote_issue(parse_settings({}, "c.toml"), paths.root, "0.0.0.0")
    assert issue is not None and "keel keys add" in issue.message
