"""config.toml mistakes that were misreported (or not reported): each message names
the setting, what is wrong with it and what to write instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keel.config import COMPLETION_KINDS, Paths, load_settings, masked_url, parse_settings
from keel.errors import ConfigError
from tests.conftest import keel_cli

HTTP = {"kind": "openai/completion", "api_endpoint": "http://127.0.0.1:18507/v1"}


def check(tmp_path: Path, text: str) -> tuple[int, str]:
    """``keel config check`` of ``text``: its exit code and what it said."""
    config = tmp_path / "config.toml"
    config.write_text(text)
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = keel_cli("config", "check", "--config", str(config), env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout + done.stderr


def test_a_fallback_without_kind_is_said_to_need_kind(tmp_path: Path) -> None:
    """Read as a local model, its api_endpoint was called an unknown key."""
    code, said = check(
        tmp_path, '[[model.completion.fallback]]\napi_endpoint = "http://127.0.0.1:18500"\n'
    )
    assert code == 78, said
    assert "model.completion.fallback[0].kind: missing" in said, said
    assert "set kind to one of " + ", ".join(COMPLETION_KINDS) in said
    assert "unknown key" not in said and "api_endpoint:" not in said
    # an http table without kind: pydantic's bare "Field required", now with the kinds
    code, said = check(tmp_path, '[model.chat.http]\napi_endpoint = "http://127.0.0.1:18500"\n')
    assert code == 78, said
    assert "model.chat.http.kind: missing" in said and "openai/chat, mistral/chat" in said
    # a local fallback is still one, and a misspelt key in it still an unknown key
    code, said = check(tmp_path, '[[model.completion.fallback]]\nmodel_idd = "x"\n')
    assert code == 78 and "model.completion.fallback[0].model_idd: unknown key" in said, said


@pytest.mark.parametrize(
    ("host", "fix"),
    [
        ("127.0.0.1:80", 'host = "127.0.0.1" and port = 80'),
        ("localhost:18502", 'host = "localhost" and port = 18502'),
        ("[::1]:18502", 'host = "::1" and port = 18502'),
        ("http://127.0.0.1:18502", 'host = "127.0.0.1" and port = 18502'),
        ("[::1]", 'host = "::1"'),
    ],
)
def test_a_port_in_host_is_said_to_go_in_port(tmp_path: Path, host: str, fix: str) -> None:
    """It was called an address that would serve anyone (no keys configured)."""
    code, said = check(tmp_path, f'[server]\nhost = "{host}"\n')
    assert code == 78, said
    assert "server.host: " in said and fix in said, said
    assert "serve anyone" not in said


def test_plain_addresses_are_still_hosts(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        code, said = check(tmp_path, f'[server]\nhost = "{host}"\n')
        assert code == 0, said


def test_a_port_in_host_on_the_command_line_is_a_usage_error(tmp_path: Path) -> None:
    """serve called it an open address; wait ended in a traceback."""
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for command in ("serve", "doctor", "wait"):
        done = keel_cli(command, "--host", "127.0.0.1:18503", "--port", "18503", env=env)
        assert done.returncode == 2, (command, done.stderr)
        assert "Traceback" not in done.stderr and "serve anyone" not in done.stderr
        assert "the port goes in --port: --host 127.0.0.1 --port 18503" in done.stderr


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows Notepad saves one: TOML refused the file at line 1, column 1."""
    config = tmp_path / "config.toml"
    config.write_bytes("[server]\nport = 18504\n".encode("utf-8-sig"))
    assert config.read_bytes().startswith(b"\xef\xbb\xbf")
    settings = load_settings(config, Paths(tmp_path), {})
    assert settings.server.port == 18504
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = keel_cli("config", "check", "--config", str(config), env=env)
    assert done.returncode == 0 and done.stdout.startswith("ok: "), done.stderr


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        ("[server]\nport = 8080\n# caf\u00e9\n".encode("latin-1"), "line 3: the file is not UTF-8"),
        ("[server]\nport = 8080\n".encode("utf-16"), "line 1: the file is UTF-16"),
    ],
)
def test_a_config_not_in_utf8_names_its_line_and_how_to_save_it(
    tmp_path: Path, raw: bytes, said: str
) -> None:
    """It said "'utf-8' codec can't decode byte 0xe9 in position 26": no line, no fix."""
    config = tmp_path / "config.toml"
    config.write_bytes(raw)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, Paths(tmp_path), {})
    message = caught.value.message
    assert said in message and "save it as UTF-8" in message, message


def test_an_empty_model_id_and_an_endpoint_listed_twice_are_config_errors() -> None:
    """``model_id = ""`` was looked up as the models directory itself (a warning, exit
    0); an endpoint listed twice made two providers of one name."""
    with pytest.raises(ConfigError) as caught:
        parse_settings({"model": {"completion": {"local": {"model_id": ""}}}}, "c.toml", {})
    assert "model.completion.local.model_id" in caught.value.message, caught.value.message
    url = "http://127.0.0.1:18931/v1"
    table = {"kind": "openai/completion", "api_endpoints": [url, url], "model_name": "m"}
    with pytest.raises(ConfigError) as caught:
        parse_settings({"model": {"completion": {"http": table}}}, "c.toml", {})
    assert f"'{url}' listed twice: list each replica once" in caught.value.message


def test_a_fallback_written_as_one_table_is_said_to_need_double_brackets(tmp_path: Path) -> None:
    """pydantic's "Input should be a valid list" was all it said."""
    text = (
        '[model.completion.fallback]\nkind = "openai/completion"\n'
        'api_endpoint = "http://127.0.0.1:18505/v1"\n'
    )
    code, said = check(tmp_path, text)
    assert code == 78, said
    assert "model.completion.fallback: written as one table, [model.completion.fallback]" in said
    assert "write each fallback as [[model.completion.fallback]]" in said
    assert "valid list" not in said
    code, said = check(tmp_path, '[repositories]\npath = "/tmp"\n')
    assert code == 78 and "write each repository as [[repositories]]" in said, said
    # the other way round: one table written as a list, its value (a secret) not shown
    code, said = check(tmp_path, '[[auth]]\nadmin_key = "admin-SECRET-18505"\n')
    assert code == 78, said
    assert "auth: written as a list of tables, [[auth]]; write it as one table: [auth]" in said
    assert "SECRET" not in said


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("${NOPE", "'${NOPE'"),  # unclosed
        ("v1-${A{B}", "'${A{B}'"),  # a stray { in the name
        ("${A:-{x}", "'${A:-{x}'"),  # an unpaired { in the default
        ("${}", "'${}'"),
        ("${1A}", "'${1A}'"),
    ],
)
def test_a_malformed_environment_reference_is_an_error_naming_the_setting(
    value: str, shown: str
) -> None:
    """It went through as literal text: a model name (or key, or address) that was not
    what the file meant, and no word of it."""
    http = {"kind": "openai/chat", "api_endpoint": "http://127.0.0.1:18506/v1", "model_name": value}
    with pytest.raises(ConfigError) as caught:
        parse_settings({"model": {"chat": {"http": http}}}, "config.toml", {"A": "a"})
    [issue] = caught.value.issues
    assert issue.key == "model.chat.http.model_name"
    assert f"malformed environment-variable reference {shown}" in issue.message
    assert "$$ for a literal $" in issue.message


def test_a_malformed_reference_in_a_secret_does_not_show_it(tmp_path: Path) -> None:
    text = '[auth]\nadmin_key = "ab${cd-SECRET-18506"\n[server]\nport = "${KEEL_PORT"\n'
    code, said = check(tmp_path, text)
    assert code == 78, said
    assert "auth.admin_key: malformed environment-variable reference '${...'" in said
    assert "SECRET" not in said
    assert "server.port: malformed environment-variable reference '${KEEL_PORT'" in said
    assert "2 config errors" in said, said  # not also "a valid integer" for the port


def test_well_formed_references_and_plain_braces_are_unchanged() -> None:
    """A default may hold paired braces (a prompt template's placeholders), and a brace
    outside ${...} is the value's own text, as in a shell: a prompt template's
    {prefix}, or a lone { that keel's templates render as written."""
    template = "${KEEL_T_TEMPLATE:-<PRE> {prefix} <SUF>{suffix} <MID>}"
    http = {
        "kind": "llama.cpp/completion",
        "api_endpoint": "http://127.0.0.1:18506",
        "prompt_template": template,
        "model_name": "${A}{",
    }
    settings = parse_settings({"model": {"completion": {"http": http}}}, "c", {"A": "a"})
    assert settings.model.completion.http is not None
    assert settings.model.completion.http.prompt_template == "<PRE> {prefix} <SUF>{suffix} <MID>"
    assert settings.model.completion.http.model_name == "a{"
    local = {"prompt_template": "{prefix}{{{suffix}"}
    settings = parse_settings({"model": {"completion": {"local": local}}}, "c", {})
    assert settings.model.completion.local is not None
    assert settings.model.completion.local.prompt_template == "{prefix}{{{suffix}"
    keys = {"api_keys": ["pa$${word}-long-enough"]}
    assert parse_settings({"auth": keys}, "c", {}).auth.api_keys == ["pa${word}-long-enough"]


def test_a_string_for_a_number_or_a_boolean_is_an_error(tmp_path: Path) -> None:
    """TOML has types: `port = "8080"` and `precompute = "yes"` were converted silently."""
    text = '[server]\nport = "18507"\n[completion]\nprecompute = "yes"\n'
    code, said = check(tmp_path, text)
    assert code == 78, said
    assert (
        "server.port: expected an integer, not a string: write port = 18507, without quotes "
        "(got '18507')" in said
    ), said
    assert (
        "completion.precompute: expected true or false, not a string: write precompute = "
        "true, without quotes (got 'yes')" in said
    ), said
    assert "2 config errors" in said  # one each, not pydantic's words as well


def test_wrong_scalar_types_are_named_in_every_section() -> None:
    raw = {
        "server": {"completion_timeout": "5", "port": True},
        "completion": {"precompute": 0},
        "index": {"max_snippets": 2.0},
        "model": {
            "completion": {
                "fallback": [
                    {**HTTP, "rate_limit": {"request_per_minute": "60"}},
                    {"model_id": "x", "enable_fast_attention": "true"},
                ]
            }
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml", {})
    said = {issue.key: issue.message for issue in caught.value.issues}
    assert said == {
        "server.completion_timeout": "expected a number, not a string: write "
        "completion_timeout = 5, without quotes",
        "server.port": "expected an integer, not a boolean",
        "completion.precompute": "expected true or false, not an integer: write precompute = false",
        "index.max_snippets": "expected an integer, not a decimal number: write max_snippets = 2",
        "model.completion.fallback[0].rate_limit.request_per_minute": "expected an integer, "
        "not a string: write request_per_minute = 60, without quotes",
        "model.completion.fallback[1].enable_fast_attention": "expected true or false, not a "
        "string: write enable_fast_attention = true, without quotes",
    }


def test_environment_references_still_give_numbers_and_booleans() -> None:
    """A ${VAR}'s value is text: it is converted to the setting's type, as before."""
    raw = {
        "server": {"port": "${KEEL_T_PORT}", "completion_timeout": "${KEEL_T_NONE:-2.5}"},
        "completion": {"precompute": "${KEEL_T_PRECOMPUTE}"},
    }
    environ = {"KEEL_T_PORT": "18508", "KEEL_T_PRECOMPUTE": "false"}
    settings = parse_settings(raw, "c.toml", environ)
    assert (settings.server.port, settings.server.completion_timeout) == (18508, 2.5)
    assert settings.completion.precompute is False
    with pytest.raises(ConfigError) as caught:  # a value that is no number still fails
        parse_settings(raw, "c.toml", {**environ, "KEEL_T_PORT": "eighty"})
    assert [issue.key for issue in caught.value.issues] == ["server.port"]


@pytest.mark.parametrize(
    ("section", "key", "url", "says"),
    [
        ("state", "redis_url", "redis://:Zx9/kQsecretR=@127.0.0.1:6379/0", "percent-encoded"),
        ("state", "redis_url", "redis://:Zx9?secret@127.0.0.1:6379/0", "percent-encoded"),
        ("events", "database_url", "postgresql://keel:Ab3/pgSECRET=@127.0.0.1/keel", "%2F"),
        ("events", "database_url", "postgresql://keel:Q7%zzpgSECRET@127.0.0.1/keel", "%25"),
        # libpq took the host from the first @: "failed to resolve host 'pgSECRET@...'"
        ("events", "database_url", "postgresql://keel:PG@pgSECRET@127.0.0.1/keel", "%40"),
    ],
)
def test_a_server_url_that_cannot_be_read_as_written_is_a_config_error(
    section: str, key: str, url: str, says: str
) -> None:
    """A password with an unencoded / passed config check, then keel serve died in a
    traceback (exit 3, which systemd restarts) and the events store quoted a password
    with a bad % in its error; neither error may show the password."""
    with pytest.raises(ConfigError) as caught:
        parse_settings({section: {key: url}}, "config.toml")
    text = str(caught.value)
    assert f"{section}.{key}" in text and says in text
    assert "SECRET" not in text and "secret" not in text


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pa%2Fss@127.0.0.1:6379/0",
        "rediss://user:pw@redis.example:6380",
        "unix:///run/redis.sock",
    ],
)
def test_well_formed_redis_urls_pass(url: str) -> None:
    assert parse_settings({"state": {"redis_url": url}}, "config.toml").state.redis_url == url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://keel:a%25b@db-a:5432,db-b:5432/keel",  # libpq's several hosts
        "postgresql://u:p@[::1]:5432/db",
        "postgres://localhost/db",
    ],
)
def test_well_formed_database_urls_pass(url: str) -> None:
    assert parse_settings({"events": {"database_url": url}}, "c").events.database_url == url


def test_a_password_with_a_slash_is_masked_in_any_text() -> None:
    line = "events database postgresql://keel:Ab3/pgSECRET=@127.0.0.1:5432/keel unreachable"
    assert masked_url(line) == (
        "events database postgresql://keel:***@127.0.0.1:5432/keel unreachable"
    )


def test_a_default_is_read_as_a_shell_reads_it() -> None:
    """``${A:-${B}}`` sent the text ``${B}`` (an api_key included) with no word said;
    ``${U:-$$}`` gave ``$$``."""
    http = {
        "kind": "openai/chat",
        "api_endpoint": "http://127.0.0.1:18506/v1",
        "model_name": "${KEEL_T_CHAT:-${KEEL_T_DEFAULT}}",
        "api_key": "${KEEL_T_KEY:-${KEEL_T_FALLBACK:-sk-x}$$}",
    }
    environ = {"KEEL_T_DEFAULT": "qwen"}
    settings = parse_settings({"model": {"chat": {"http": http}}}, "c", environ)
    chat = settings.model.chat.http
    assert chat is not None and (chat.model_name, chat.api_key) == ("qwen", "sk-x$")
    assert parse_settings({"model": {"chat": {"http": http}}}, "c", {"KEEL_T_CHAT": "m"})
    with pytest.raises(ConfigError, match="KEEL_T_DEFAULT is not set"):
        parse_settings({"model": {"chat": {"http": {**http, "api_key": None}}}}, "c", {})


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://", "names no host"),
        ("http://:8080/v1", "names no host"),
        ("http://exa mple.com/v1", "holds a space"),
        ("http://host:abc/v1", "Port could not be cast"),
        ("http://host:99999/v1", "Port out of range"),
        ("http://[::1/v1", "Invalid IPv6 URL"),
        ("http://user:SECRET@host:abc/v1", "is not a URL"),
        # Tabby's docs' placeholders, copied as written: a DNS error at the first request
        ("https://<resource-name>.openai.azure.com", "holds a placeholder"),
        ("http://Bedrock-Proxy-xxxxx.{Region}.elb.amazonaws.com/api/v1", "holds a placeholder"),
    ],
)
@pytest.mark.parametrize("key", ["api_endpoint", "api_endpoints"])
def test_a_backend_address_that_is_no_url_is_a_config_error(url: str, says: str, key: str) -> None:
    """Only the scheme was checked: these passed `keel config check`, then failed every
    request, and the first one's error at start ended the start's reachability check of
    every backend."""
    value: object = [url] if key == "api_endpoints" else url
    table = {"kind": "openai/chat", key: value, "model_name": "m"}
    with pytest.raises(ConfigError) as caught:
        parse_settings({"model": {"chat": {"http": table}}}, "config.toml")
    text = str(caught.value)
    assert f"model.chat.http.{key}" in text and says in text, text
    assert "SECRET" not in text, text


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/v1", "https://api.example.com", "http://[::1]:8000/v1"]
)
def test_well_formed_backend_addresses_pass(url: str) -> None:
    table = {"kind": "openai/chat", "api_endpoint": url, "model_name": "m"}
    parsed = parse_settings({"model": {"chat": {"http": table}}}, "config.toml")
    assert parsed.model.chat.http is not None and parsed.model.chat.http.api_endpoint == url


def test_a_config_error_is_said_once_in_the_files_terms() -> None:
    """An unset ``${VAR}`` in api_endpoint was also "required for kind"; a role written as
    a value was pydantic's "instance of RoleConfig"; a timeout of 0 hid its value, as
    ``first_token_timeout`` holds "token", which named a secret."""
    raw = {
        "model": {
            "completion": "local",
            "chat": {
                "http": {
                    "kind": "openai/chat",
                    "api_endpoint": "${KEEL_T_NOPE}",
                    "first_token_timeout": 0,
                    "api_key": "sk-secret\nvalue",  # a line break: an error, unshown
                    "model_name": 5,
                }
            },
        }
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "c.toml", {})
    said = {issue.key: issue.render() for issue in caught.value.issues}
    assert "required" not in said["model.chat.http.api_endpoint"], said
    assert said["model.completion"].startswith(
        "model.completion: expected a table: write [model.completion] with its keys"
    ), said
    assert said["model.chat.http.first_token_timeout"].endswith("(got 0)"), said
    assert "model.chat.http.api_key" in said and "sk-secret" not in str(said), said


def test_a_redis_database_that_is_not_a_number_is_a_config_error() -> None:
    """redis-py ignored "/staging" and used database 0: a staging and a production
    keel, told apart so, shared their keys and limits."""
    for good in ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "redis://h:6379/3"):
        parse_settings({"state": {"redis_url": good}}, "c.toml", {})
    with pytest.raises(ConfigError) as caught:
        parse_settings({"state": {"redis_url": "redis://:pw@127.0.0.1:6379/staging"}}, "c", {})
    assert "its database '/staging' is not a number" in caught.value.message


@pytest.mark.parametrize(
    ("role_table", "key", "says"),
    [
        ({"http": {"embedded_last_resort": False}}, "http.embedded_last_resort", "[model.chat],"),
        ({"http": {"queue_size": 4}}, "http.queue_size", "[model.chat],"),
        ({"kind": "openai/chat"}, "kind", "[model.chat.http]"),
        ({"model_id": "SmolLM2-135M-Instruct"}, "model_id", "[model.chat.local]"),
        # a key both tables take goes to the one the role has
        ({"additional_stop_words": ["x"]}, "additional_stop_words", "[model.chat.http]"),
    ],
)
def test_a_model_tables_key_in_the_table_beside_it_says_where_it_belongs(
    role_table: dict[str, Any], key: str, says: str
) -> None:
    """Spelt right, in the table beside its own: "unknown key (check the spelling)"."""
    http = {"kind": "openai/chat", "api_endpoint": "http://127.0.0.1:1/v1", "model_name": "m"}
    table = {**role_table, "http": {**http, **role_table.get("http", {})}}
    if "http" not in role_table and key != "kind":
        table.pop("http")
    with pytest.raises(ConfigError) as caught:
        parse_settings({"model": {"chat": table}}, "config.toml")
    text = str(caught.value)
    assert f"model.chat.{key}: not a key of" in text and f"belongs in {says}" in text, text


HUGE = 10**400
"""An integer tomllib reads, of 401 digits: TOML's are 64-bit."""


def http_role(role: str, **fields: object) -> dict[str, Any]:
    """A config with ``role`` served by an HTTP backend of its kind, ``fields`` added."""
    table = {"kind": f"openai/{role}", "api_endpoint": "http://127.0.0.1:1/v1", "model_name": "m"}
    return {"model": {role: {"http": {**table, **fields}}}}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (
            http_role("chat", rate_limit={"request_per_minute": HUGE}),
            "model.chat.http.rate_limit.request_per_minute",
        ),
        ({"auth": {"requests_per_minute": HUGE}}, "auth.requests_per_minute"),
        ({"events": {"retention_days": HUGE}}, "events.retention_days"),
        ({"server": {"shutdown_grace_seconds": -HUGE}}, "server.shutdown_grace_seconds"),
    ],
)
def test_an_integer_past_tomls_64_bits_is_a_config_error(raw: dict[str, Any], key: str) -> None:
    """A traceback (a float's overflow) from check, doctor and serve; a key's limit of
    that size made every model request a 500; retention's, a pruning that never ran."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml")
    text = str(caught.value)
    assert key in text and "past TOML's integers" in text, text


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"repositories": [{"name": ["a"], "path": "/tmp"}]}, "repositories[0].name"),
        ({"repositories": [{"name": {}, "path": "/tmp"}]}, "repositories[0].name"),
        ({"repositories": [{"name": "a", "path": "/tmp/x\0y"}]}, "repositories[0].path"),
        ({"server": {"host": "local\0host"}}, "server.host"),
        ({"server": {"host": "\u00fc\u202e"}}, "server.host"),
        (
            http_role("completion", api_endpoint="http://127.0.0.1:1/v1\x01"),
            "model.completion.http.api_endpoint",
        ),
    ],
)
def test_values_that_crashed_or_misled_keel_later_are_config_errors(
    raw: dict[str, Any], key: str
) -> None:
    """Each passed the check or crashed it: a repository's name that is a list (a
    TypeError), a path holding a NUL (a thread's traceback), a host no resolver takes (a
    traceback at start), a control character in a backend's URL (sent in every path)."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml")
    assert key in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (
            {"auth": {"api_keys": "my-secret-key-123"}},
            "auth.api_keys: expected a list: write api_keys = [...]",
        ),
        (
            {"server": {"cors_allowed_origins": "https://chat.example.com"}},
            'write cors_allowed_origins = ["https://chat.example.com"]',
        ),
    ],
)
def test_one_value_where_a_list_goes_says_how_to_write_the_list(
    raw: dict[str, Any], says: str
) -> None:
    """It said "Input should be a valid list", where a number written as a string is
    told how to write it; a key named like a secret is not shown."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml")
    assert says in str(caught.value) and "my-secret" not in str(caught.value), str(caught.value)


def test_a_key_both_provider_tables_take_is_sent_to_the_roles_own() -> None:
    local = {"model_id": "SmolLM2-135M-Instruct"}
    raw = {"model": {"completion": {"additional_stop_words": ["x"], "local": local}}}
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml")
    assert "it belongs in [model.completion.local]" in str(caught.value), str(caught.value)
    raw = {"model": {"completion": {"prompt_template": "{prefix}"}}}
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml")
    said = "belongs in [model.completion.http] or [model.completion.local]"
    assert said in str(caught.value), str(caught.value)
