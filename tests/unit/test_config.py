from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

import keel.config as config_module
from keel.config import HttpModelConfig, LocalModelConfig, Paths, load_settings, parse_settings
from keel.errors import ConfigError
from keel.sample_config import render_sample
from keel.workers.worker import usable_cores
from tests.conftest import keel_cli

ROOT = Path(__file__).resolve().parents[2]
LLAMA = {"kind": "llama.cpp/completion", "api_endpoint": "http://127.0.0.1:8888"}
CHAT = {"kind": "openai/chat", "api_endpoint": "http://127.0.0.1:8000/v1"}

TABBY_CONFIG = """
[model.completion.http]
kind = "llama.cpp/completion"
api_endpoint = "http://localhost:8888"
prompt_template = "<PRE> {prefix} <SUF>{suffix} <MID>"
additional_stop_words = ["\\n\\n\\n"]
rate_limit = { request_per_minute = 60 }

[model.chat.http]
kind = "openai/chat"
model_name = "gpt-4o"
api_endpoint = "https://api.openai.com/v1"
api_key = "${OPENAI_KEY}"

[model.embedding.local]
model_id = "Nomic-Embed-Text"

[[model.completion.fallback]]
kind = "ollama/completion"
api_endpoint = "http://127.0.0.1:11434"
model_name = "qwen2.5-coder:1.5b"

[[model.completion.fallback]]
model_id = "SmolLM2-135M-Instruct"

[server]
completion_timeout = 10

[completion]
max_input_length = 1024
max_decoding_tokens = 32
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_tabby_sections_parse_with_env_and_fallbacks(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, TABBY_CONFIG), Paths(tmp_path), {"OPENAI_KEY": "sk-1"})
    completion = settings.model.completion
    assert isinstance(completion.primary(), HttpModelConfig)
    assert completion.primary().rate_limit.request_per_minute == 60  # type: ignore[union-attr]
    chain = completion.chain()
    assert [type(p) for p in chain] == [HttpModelConfig, HttpModelConfig, LocalModelConfig]
    assert settings.model.chat.http is not None and settings.model.chat.http.api_key == "sk-1"
    assert settings.model.embedding.primary() == LocalModelConfig(model_id="Nomic-Embed-Text")
    assert settings.server.completion_timeout == 10
    assert settings.completion.max_decoding_tokens == 32


def test_no_file_means_embedded_everywhere(tmp_path: Path) -> None:
    settings = load_settings(None, Paths(tmp_path))
    for role in ("completion", "chat", "embedding"):
        assert settings.model.role(role).primary() == LocalModelConfig()  # type: ignore[arg-type]


def test_every_error_is_listed_by_key(tmp_path: Path) -> None:
    text = """
[model.completion.http]
kind = "llama.cpp/completoin"
api_endpoint = "localhost:8888"
api_key = "${MISSING_KEY}"

[server]
port = 99999
hostt = "0.0.0.0"

[[model.chat.fallback]]
kind = "openai/chat"
api_endpoint = "ftp://x"
"""
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), Paths(tmp_path), {})
    rendered = str(caught.value)
    keys = {issue.key for issue in caught.value.issues}
    assert "model.completion.http.api_key" in keys  # the missing variable, named
    assert "MISSING_KEY" in rendered
    assert "server.port" in keys
    assert "server.hostt" in keys
    assert any(key.startswith("model.chat.fallback[0]") for key in keys)
    assert "model.completion.http" in " ".join(keys)
    assert str(tmp_path / "config.toml") in rendered


def test_unknown_kind_for_role_is_named(tmp_path: Path) -> None:
    text = '[model.completion.http]\nkind = "openai/chat"\napi_endpoint = "http://x"\n'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), Paths(tmp_path), {})
    assert caught.value.issues[0].key == "model.completion.http.kind"
    assert "llama.cpp/completion" in caught.value.issues[0].message


def test_a_table_serve_would_refuse_fails_the_check_naming_its_fields(tmp_path: Path) -> None:
    """`keel config check` and doctor passed these; `keel serve` exited 78 on them."""
    text = (
        '[model.completion.http]\nkind = "llama.cpp/completion"\n'
        '[[model.completion.fallback]]\nkind = "ollama/completion"\n'
        '[model.embedding.http]\nkind = "ollama/embedding"\nmodel_name = "nomic-embed-text"\n'
    )
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    failed = keel_cli("config", "check", str(write(tmp_path, text)), env=env)
    assert failed.returncode == 78, failed.stderr
    assert "model.completion.http.api_endpoint: required for kind llama.cpp/completion" in (
        failed.stderr
    )
    assert "model.completion.fallback[0].model_name: required for kind ollama/completion" in (
        failed.stderr
    )
    assert "model.embedding" not in failed.stderr  # Ollama's address is well known


def test_tabbys_other_names_for_a_kind_are_taken(tmp_path: Path) -> None:
    for alias in ("openai/legacy_completion", "deepseek/completion"):
        text = f'[model.completion.http]\nkind = "{alias}"\napi_endpoint = "http://x/v1"\n'
        settings = load_settings(write(tmp_path, text), Paths(tmp_path), {})
        http = settings.model.completion.http
        assert http is not None and http.kind == "openai/completion"


def test_both_local_and_http_is_an_error() -> None:
    raw = {
        "model": {
            "chat": {"local": {}, "http": {"kind": "openai/chat", "api_endpoint": "http://x"}}
        }
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "inline", {})
    assert caught.value.issues[0].key == "model.chat"


def test_toml_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "[server\nport=1"), Paths(tmp_path), {})
    assert caught.value.exit_code == 78


def test_keel_root_env() -> None:
    assert Paths.from_env({"KEEL_ROOT": "/srv/keel"}).config_file == Path("/srv/keel/config.toml")


def test_sample_config_in_repo_is_current_and_valid(tmp_path: Path) -> None:
    sample = render_sample()
    assert (ROOT / "config.sample.toml").read_text() == sample, "run `make sample-config`"
    load_settings(write(tmp_path, sample), Paths(tmp_path), {})


def test_config_check_exit_codes(tmp_path: Path) -> None:
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    good = write(tmp_path, TABBY_CONFIG.replace("${OPENAI_KEY}", "sk"))
    ok = keel_cli("config", "check", str(good), env=env)
    assert ok.returncode == 0, ok.stderr
    assert "completion: llama.cpp/completion -> ollama/completion -> local:SmolLM2" in ok.stdout
    # The chain as keel serves it: the embedded last resort after a configured one
    # that lacks it (it was printed without)
    remote = write(
        tmp_path,
        '[model.completion.http]\nkind = "vllm/completion"\n'
        'api_endpoint = "http://127.0.0.1:8000/v1"\nmodel_name = "m"\n',
    )
    last = "local:SmolLM2-135M-Instruct (embedded last resort)"
    shown = keel_cli("config", "check", str(remote), env=env).stdout
    assert f"completion: vllm/completion -> {last}" in shown, shown
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "eighty"\n[completion]\nmax_decoding_tokens = 0\n')
    failed = keel_cli("config", "check", str(bad), env=env)
    assert failed.returncode == 78
    assert "server.port" in failed.stderr and "completion.max_decoding_tokens" in failed.stderr
    assert "2 config errors" in failed.stderr


def test_an_open_host_from_the_command_line_is_named_as_such(tmp_path: Path) -> None:
    """It blamed ``server.host`` in a config file that did not exist."""
    refused = keel_cli("serve", "--host", "0.0.0.0", env={"KEEL_ROOT": str(tmp_path)})
    assert refused.returncode == 78, refused.stderr
    assert "the command line" in refused.stderr and "- --host: binding 0.0.0.0" in refused.stderr
    assert "config.toml" not in refused.stderr


@pytest.mark.parametrize("port", ["70000", "-5", "0"])
def test_a_port_out_of_range_on_the_command_line_is_a_usage_error(
    tmp_path: Path, port: str
) -> None:
    """As in config.toml (exit 78 there); it ended in a traceback and exit 1, the code a
    supervisor restarts on, and port 0 served on a port keel did not name."""
    for command in (["serve"], ["doctor"], ["wait"]):
        refused = keel_cli(*command, f"--port={port}", env={"KEEL_ROOT": str(tmp_path)})
        assert refused.returncode == 2, (command, refused.stderr)
        assert "a port is 1-65535" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (
            {
                "model": {
                    "chat": {
                        "http": {
                            "kind": "openai/chat",
                            "api_endpoint": "http://a:1/v1",
                            "api_endpoints": ["http://b:2/v1", "http://c:3/v1"],
                        }
                    }
                }
            },
            "model.chat.http",
        ),
        ({"auth": {"admin_key": "short2"}}, "auth.admin_key"),
        ({"server": {"host": ""}}, "server.host"),
        (  # Tabby refuses it: /v1beta/models listed b, and every request got a
            {"model": {"chat": {"http": {**CHAT, "model_name": "a", "supported_models": ["b"]}}}},
            "model.chat.http",
        ),
        (  # the same checkout twice: indexed twice under two names (Tabby refuses it)
            {"repositories": [{"git_url": "file:///srv/app"}, {"git_url": "file:///srv/app/"}]},
            "repositories",
        ),
        (  # the same checkout by another spelling of its path
            {"repositories": [{"path": "/srv/app"}, {"path": "/srv/x/../app"}]},
            "repositories",
        ),
        (  # a misspelt {prefix}: every prompt was made without the code before the cursor
            {"model": {"completion": {"http": {**LLAMA, "prompt_template": "<a>{prefx}<b>"}}}},
            "model.completion.http.prompt_template",
        ),
        (
            {"model": {"completion": {"local": {"prompt_template": "{prefix}<b>{sufix}"}}}},
            "model.completion.local.prompt_template",
        ),
    ],
)
def test_config_mistakes_that_were_taken_silently_are_errors(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml")
    assert key in caught.value.message


def test_repeated_repository_names_are_listed_with_the_other_errors() -> None:
    raw = {
        "repositories": [
            {"name": " ", "path": "/tmp"},  # a name needs a visible character
            {"name": "dup", "path": "/tmp"},
            {"name": "dup", "path": "/tmp"},
        ],
        "server": {"port": "x"},
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "c.toml")
    keys = [issue.key for issue in caught.value.issues]
    assert sorted(keys) == ["repositories", "repositories[0].name", "server.port"], keys


def test_env_references_take_a_default_as_a_shell_does() -> None:
    raw = {"server": {"host": "${KEEL_T_HOST:-127.0.0.2}", "port": "${KEEL_T_PORT:-9000}"}}
    settings = parse_settings(raw, "c.toml", environ={})
    assert (settings.server.host, settings.server.port) == ("127.0.0.2", 9000)
    environ = {"KEEL_T_HOST": "127.0.0.3", "KEEL_T_PORT": ""}  # set, or set but empty
    settings = parse_settings(raw, "c.toml", environ=environ)
    assert (settings.server.host, settings.server.port) == ("127.0.0.3", 9000)
    with pytest.raises(ConfigError) as caught:
        parse_settings({"server": {"host": "${KEEL_T_HOST}"}}, "c.toml", environ={})
    assert "environment variable KEEL_T_HOST is not set" in caught.value.message


def test_an_unset_key_variable_is_one_error_not_two() -> None:
    """The README's own [auth] example with its variables unset gave a third error, "every
    key must have at least 8 characters", for the "" the unset variable left."""
    raw = {"auth": {"api_keys": ["${KEEL_T_USER_KEY}"], "admin_key": "${KEEL_T_ADMIN_KEY}"}}
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "c.toml", environ={})
    assert [issue.key for issue in caught.value.issues] == ["auth.api_keys[0]", "auth.admin_key"]
    raw["auth"]["api_keys"] = ["${KEEL_T_USER_KEY}", "short"]
    with pytest.raises(ConfigError) as caught:  # the variable set: the list's own check
        parse_settings(
            raw,
            "c.toml",
            environ={"KEEL_T_USER_KEY": "long-enough-key"} | {"KEEL_T_ADMIN_KEY": "admin-key-long"},
        )
    assert "at least 8 characters" in caught.value.message


def test_a_double_dollar_is_a_literal_dollar_as_in_docker_compose() -> None:
    """A secret holding ``${`` could not be written: ``$${word}`` asked for the variable
    ``word``, and ``pa$$word`` stayed doubled."""
    keys = ["pa$${word}-long-enough", "pa$$word-long-enough", "${KEEL_T_K}$$"]
    raw = {"auth": {"api_keys": keys}}
    settings = parse_settings(raw, "c.toml", environ={"KEEL_T_K": "from-env-long-enough"})
    assert settings.auth.api_keys == [
        "pa${word}-long-enough",
        "pa$word-long-enough",
        "from-env-long-enough$",
    ]


def test_a_bare_dollar_name_is_the_variable_as_in_a_shell() -> None:
    """``api_keys = ["$KEEL_USER_KEY"]`` was literal text: the variable's name, which
    anyone reading the file knows, was the working key, and no word of it."""
    raw = {"auth": {"api_keys": ["$KEEL_T_K", "pre-$KEEL_T_K.x"]}}
    settings = parse_settings(raw, "c.toml", environ={"KEEL_T_K": "from-env-long-enough"})
    assert settings.auth.api_keys == ["from-env-long-enough", "pre-from-env-long-enough.x"]
    with pytest.raises(ConfigError) as caught:
        parse_settings({"auth": {"api_keys": ["$KEEL_T_UNSET_K"]}}, "c.toml", environ={})
    said = caught.value.message
    assert "KEEL_T_UNSET_K is not set" in said and "write $$" in said, said


def test_a_secret_is_not_echoed_in_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"auth": {"api_keys": ["short"], "admin_key": 12}}, "config.toml")
    assert "auth.api_keys" in caught.value.message and "short" not in caught.value.message
    with pytest.raises(ConfigError) as caught:
        parse_settings({"state": {"redis_url": "http://:pw-123@redis:6379"}}, "config.toml")
    assert "http://:***@redis:6379" in caught.value.message  # a URL, without its password
    with pytest.raises(ConfigError) as caught:
        parse_settings({"server": {"port": "eighty"}}, "config.toml")
    assert "'eighty'" in caught.value.message  # other values are shown
    # A misspelled secret's key is unknown: its value is never shown (nor is it wrong).
    http = {"kind": "openai/chat", "api_endpoint": "http://x/v1", "apikey": "sk-SECRET999"}
    with pytest.raises(ConfigError) as caught:
        parse_settings({"model": {"chat": {"http": http}}}, "config.toml")
    assert "model.chat.http.apikey: unknown key" in caught.value.message
    assert "SECRET999" not in caught.value.message
    http = {
        "kind": "openai/chat",
        "api_endpoint": "http://x/v1",
        "max_input_length": "http://u:pw-1@y",
    }
    with pytest.raises(ConfigError) as caught:  # a URL's password, whatever the key
        parse_settings({"model": {"chat": {"http": http}}}, "c")
    assert "'http://u:***@y'" in caught.value.message and "pw-1" not in caught.value.message
    http = {"kind": "openai/chat", "api_endpoints": ["http://u:pw-2@y", ""]}
    with pytest.raises(ConfigError) as caught:  # in a list too
        parse_settings({"model": {"chat": {"http": http}}}, "c")
    assert "pw-2" not in caught.value.message


def test_a_variables_value_is_shown_as_its_reference_in_a_config_error() -> None:
    """A swapped variable put an API key into an ``api_endpoint`` and a number: the
    errors printed the key (``keel config check``, a reload's answer, the audit log)."""
    environ = {"UPSTREAM_KEY": "sk-upstream-TOPSECRET-777"}
    http = {"kind": "openai/chat", "api_endpoints": ["http://x/v1", "${UPSTREAM_KEY}"]}
    raw = {"model": {"chat": {"http": http}}, "server": {"port": "$UPSTREAM_KEY"}}
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "c", environ=environ)
    said = caught.value.message
    assert "TOPSECRET" not in said, said
    assert "'${UPSTREAM_KEY}' must start with http" in said, said  # the message's too
    assert "(got '$UPSTREAM_KEY')" in said, said  # as written
    # another setting's value is shown as it is (a typo was shown as "${CHAT_KIND}t")
    http = {"kind": "${CHAT_KIND}", "api_endpoint": "http://x/v1"}
    raw = {"model": {"chat": {"http": http}, "completion": {"http": {"kind": "openai/chatt"}}}}
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "c", environ={"CHAT_KIND": "openai/chat"})
    assert "(got 'openai/chatt')" in caught.value.message, caught.value.message


def test_config_check_warns_of_a_keys_file_keel_cannot_use(tmp_path: Path) -> None:
    """keel serve would run, refusing every key the file should hold: said first."""
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    config = write(tmp_path, '[auth]\nkeys_file = "keys.toml"\n')
    missing = keel_cli("config", "check", str(config), env=env)
    assert missing.returncode == 0, missing.stderr
    assert f"keys_file {tmp_path / 'keys.toml'} does not exist" in missing.stderr
    (tmp_path / "keys.toml").write_text("api_keys = 3\n")
    broken = keel_cli("config", "check", str(config), env=env)
    assert "keys.toml cannot be used: api_keys must be a list" in broken.stderr
    (tmp_path / "keys.toml").write_text('api_keys = ["file-key-0123456789"]\n')
    assert "warning" not in keel_cli("config", "check", str(config), env=env).stderr


def test_config_check_warns_of_a_model_file_this_machine_lacks(tmp_path: Path) -> None:
    """keel serve would exit 69 here (a reload: a 422); the file itself is valid (it may
    be checked away from the server), so a warning: it said "ok" alone. The first
    fallback is ``fallback[0]``, as in every other message (this one said ``[1]``)."""
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    config = write(tmp_path, '[[model.chat.fallback]]\nmodel_id = "no-such-model"\n')
    result = keel_cli("config", "check", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert "model.chat.fallback[0].model_id: model 'no-such-model' not found" in result.stderr


def test_config_check_takes_config_as_the_other_commands_do(tmp_path: Path) -> None:
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    missing = keel_cli("config", "check", "--config", str(tmp_path / "nope.toml"), env=env)
    assert missing.returncode == 78 and "nope.toml" in missing.stderr


def test_a_listing_read_in_part_ends_quietly(tmp_path: Path) -> None:
    """``keel models list | head -1``: the reader leaving early is no error, no traceback."""
    done = subprocess.run(
        f"{sys.executable} -m keel models list | true",  # the reader gone before keel writes
        shell=True,
        env={"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest.mark.parametrize(("days", "kept"), [(None, None), (0, 0), (30, 30)])
def test_events_retention_days(days: int | None, kept: int | None) -> None:
    assert parse_settings({}, "c.toml").events.retention_days == 90
    settings = parse_settings({"events": {"retention_days": days}} if days is not None else {}, "c")
    assert settings.events.retention_days == (90 if days is None else kept)


@pytest.mark.parametrize("days", [-1, "a week", 1.5])
def test_a_bad_retention_is_an_error_naming_the_field(days: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"events": {"retention_days": days}}, "config.toml")
    assert "events.retention_days" in caught.value.message


def test_a_local_models_additional_stop_words_are_its_providers(tmp_path: Path) -> None:
    """Tabby's [model.<role>.local] takes them; keel refused the key as unknown."""
    from keel.providers.catalog import build_providers

    text = '[model.completion.local]\nadditional_stop_words = ["<|endoftext|>"]\n'
    settings = load_settings(write(tmp_path, text), Paths(tmp_path), {})
    provider = build_providers(settings, Paths(tmp_path)).chains["completion"][0][0].provider
    assert provider.stop_words == ("<|endoftext|>",)  # type: ignore[attr-defined]


def test_a_tabby_model_directorys_prompt_template_is_used(tmp_path: Path) -> None:
    """Tabby reads a model directory's ``tabby.json``: a custom model laid out as its
    MODEL_SPEC.md says lost fill-in-the-middle (prompted with its prefix alone)."""
    from keel.models.registry import embedded_model_path
    from keel.providers.catalog import build_providers

    model = tmp_path / "mymodel"
    (model / "ggml").mkdir(parents=True)
    (model / "ggml" / "model-00001-of-00001.gguf").symlink_to(embedded_model_path())
    info = model / "tabby.json"
    info.write_text('{"prompt_template": "<PRE>{prefix}<SUF>{suffix}<MID>", "chat_template": "x"}')

    def template(extra: str = "") -> object:
        text = f'[model.completion.local]\nmodel_id = "{model}"\n{extra}'
        settings = load_settings(write(tmp_path, text), Paths(tmp_path), {})
        chain = build_providers(settings, Paths(tmp_path)).chains["completion"]
        return chain[0][0].provider.prompt_template  # type: ignore[attr-defined]

    assert template() == "<PRE>{prefix}<SUF>{suffix}<MID>"
    assert template('prompt_template = "{prefix}<FILL>{suffix}"') == "{prefix}<FILL>{suffix}"
    info.write_text('{"prompt_template": "<PRE>{prefx}<MID>"}')
    with pytest.raises(ConfigError) as misspelt:  # Tabby refuses a file it cannot read
        template()
    assert "model.completion.local.model_id" in misspelt.value.message
    assert "tabby.json: a prompt template must contain '{prefix}'" in misspelt.value.message
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    config = write(tmp_path, f'[model.completion.local]\nmodel_id = "{model}"\n')
    checked = keel_cli("config", "check", str(config), env=env)  # said before serve: 78
    assert checked.returncode == 0 and "tabby.json: a prompt template" in checked.stderr
    doctor = keel_cli("doctor", "--config", str(config), env=env)
    assert doctor.returncode == 78 and "tabby.json: a prompt template" in doctor.stdout
    info.write_text("{")
    with pytest.raises(ConfigError, match="tabby.json cannot be read as JSON"):
        template()


def test_config_check_warns_of_a_damaged_model_file(tmp_path: Path) -> None:
    """A file cut short said "ok"; its worker then failed with the engine's "check the
    input params"."""
    from keel.models.registry import embedded_model_path

    damaged = tmp_path / "cut.gguf"
    damaged.write_bytes(embedded_model_path().read_bytes()[: 2 * 2**20])
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    config = write(tmp_path, f'[model.completion.local]\nmodel_id = "{damaged}"\n')
    result = keel_cli("config", "check", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert "model.completion.local.model_id:" in result.stderr
    assert "truncated (2.0 MiB" in result.stderr and "would fail to load it" in result.stderr


def test_config_check_says_which_tabby_sections_keel_ignores(tmp_path: Path) -> None:
    """Taken silently: an operator's [answer] system_prompt had no effect, unsaid. Tabby's
    [embedding] was refused as a misspelling (a Tabby config that set it did not start)."""
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    text = (
        '[answer]\nsystem_prompt = "You are our team\'s assistant."\n\n'
        "[embedding]\nmax_input_length = 4096\n"
    )
    result = keel_cli("config", "check", str(write(tmp_path, text)), env=env)
    assert result.returncode == 0, result.stderr
    assert "warning: [answer] is ignored" in result.stderr
    assert "warning: embedding.max_input_length is ignored" in result.stderr
    typo = keel_cli(
        "config", "check", str(write(tmp_path, "[embedding]\nmax_input = 1\n")), env=env
    )
    assert typo.returncode == 78 and "embedding.max_input" in typo.stderr


def _gguf_with_vocabulary(tokens: list[str]) -> bytes:
    """A GGUF v3 header whose only value is the tokenizer's vocabulary (no tensors)."""
    import struct

    key = b"tokenizer.ggml.tokens"
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    out += struct.pack("<IIQ", 9, 8, len(tokens))  # an array of strings
    return out + b"".join(struct.pack("<Q", len(t.encode())) + t.encode() for t in tokens)


def test_a_local_model_named_by_no_family_is_prompted_by_its_vocabularys_markers(
    tmp_path: Path,
) -> None:
    """A renamed file (a fine-tune, say) holding Qwen2.5-Coder's FIM tokens was prompted
    with its prefix alone, while `keel models list` showed its FIM tokens."""
    from keel.pipeline.prompt import FIM_TEMPLATES
    from keel.providers.catalog import build_providers

    models = tmp_path / "models"
    models.mkdir()
    markers = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    (models / "team-finetune.gguf").write_bytes(_gguf_with_vocabulary(["a", *markers]))
    (models / "plain.gguf").write_bytes(_gguf_with_vocabulary(["a", "b"]))
    text = (
        '[model.completion.local]\nmodel_id = "team-finetune"\n'
        '[model.chat.local]\nmodel_id = "plain"\n'
    )
    settings = load_settings(write(tmp_path, text), Paths(tmp_path), {})
    chains = build_providers(settings, Paths(tmp_path)).chains
    finetune = chains["completion"][0][0].provider
    assert finetune.prompt_template == FIM_TEMPLATES["qwen2.5-coder"]  # type: ignore[attr-defined]
    assert chains["chat"][0][0].provider.prompt_template is None  # type: ignore[attr-defined]


def test_a_reload_applies_completions_own_settings_to_a_kept_worker(tmp_path: Path) -> None:
    """The worker is kept (same model and engine settings), but its stop words and FIM
    template are completion's settings: a reload kept the old ones until a restart."""
    from keel.providers.catalog import build_providers

    def completion_with(text: str, previous: Any = None) -> Any:
        settings = load_settings(write(tmp_path, text), Paths(tmp_path), {})
        return build_providers(settings, Paths(tmp_path), previous)

    first = completion_with('[model.completion.local]\nadditional_stop_words = ["A"]\n')
    text = '[model.completion.local]\nadditional_stop_words = ["B"]\nprompt_template = "{prefix}"\n'
    second = completion_with(text, first)
    kept = second.chains["completion"][0][0].provider
    assert kept is first.chains["completion"][0][0].provider, "the worker is kept"
    assert (kept.stop_words, kept.prompt_template) == (("A",), None), "until the reload is"
    second.commit()
    assert (kept.stop_words, kept.prompt_template) == (("B",), "{prefix}")
    assert second.chains["chat"][0][0].provider is kept, "chat shares it, as before"


def test_two_workers_of_one_model_have_two_names_in_names_and_metrics(tmp_path: Path) -> None:
    """Chat with its own context size runs a second worker of the embedded model; both
    were "local/SmolLM2-135M-Instruct", every worker metric a duplicate series of which
    Prometheus kept one (a crash-looping chat worker's restarts were lost)."""
    from keel.ops.metrics import Metrics
    from keel.providers.catalog import build_providers

    text = '[model.chat.local]\nmodel_id = "SmolLM2-135M-Instruct"\ncontext_size = 1024\n'
    settings = load_settings(write(tmp_path, text), Paths(tmp_path), {})
    providers = build_providers(settings, Paths(tmp_path))
    completion = providers.chains["completion"][0][0].provider
    chat = providers.chains["chat"][0][0].provider
    assert completion is not chat
    assert (completion.name, chat.name) == (
        "local/SmolLM2-135M-Instruct",
        "local/SmolLM2-135M-Instruct#1",
    )
    metrics = Metrics(environ={})
    metrics.track_providers(providers)
    series = [
        line.rsplit(" ", 1)[0]
        for line in metrics.render().decode().splitlines()
        if line.startswith("keel_worker")
    ]
    assert series and len(series) == len(set(series)), sorted(series)


def test_keel_models_list_shows_endpoints_without_their_secrets(tmp_path: Path) -> None:
    """It printed a backend's password and ``?api-key=`` as written, where every other
    command and route masks them; a table with ``api_endpoints`` showed none."""
    text = (
        '[model.completion.http]\nkind = "openai/completion"\n'
        'api_endpoint = "http://alice:s3cretpw@127.0.0.1:9/v1?api-key=topsecret"\n'
        '[model.chat.http]\nkind = "openai/chat"\n'
        'api_endpoints = ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"]\n'
    )
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    write(tmp_path, text)  # the data root's config.toml
    result = keel_cli("models", "list", env=env)
    assert result.returncode == 0, result.stderr
    assert "s3cretpw" not in result.stdout and "topsecret" not in result.stdout, result.stdout
    assert "http://alice:***@127.0.0.1:9/v1?api-key=***" in result.stdout, result.stdout
    assert "http://127.0.0.1:9/v1 http://127.0.0.1:10/v1" in result.stdout, result.stdout


def test_credentials_in_the_endpoint_and_an_api_key_are_refused_together(tmp_path: Path) -> None:
    """The HTTP client refuses a request with both: every call to the provider failed,
    and an unauthenticated /health/deep answered 500."""
    text = (
        '[model.chat.http]\nkind = "openai/chat"\n'
        'api_endpoint = "http://team:pw@127.0.0.1:9/v1"\napi_key = "sk-0123456789"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), Paths(tmp_path), {})
    assert caught.value.issues[0].key == "model.chat.http.api_key"
    assert "pw" not in caught.value.message and "sk-0123456789" not in caught.value.message


def _float_fields() -> list[tuple[type[BaseModel], str]]:
    sections = [
        cls
        for cls in vars(config_module).values()
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == "keel.config"
    ]
    return [
        (cls, name)
        for cls in sections
        for name, field in cls.model_fields.items()
        if "float" in str(field.annotation)
    ]


MINIMAL: dict[str, dict[str, Any]] = {
    "HttpModelConfig": {"kind": "openai/chat"},
    "RateLimit": {"request_per_minute": 60},
    "LanguageConfig": {"languages": ["x"]},
    "RepositoryConfig": {"name": "x"},
}


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_no_float_setting_takes_inf_or_nan(value: float) -> None:
    """TOML has inf and nan: `shutdown_grace_seconds = inf` passed `keel config check`,
    then `keel serve` crashed (OverflowError) and --supervise restarted it in a loop."""
    fields = _float_fields()
    assert len(fields) >= 15, fields  # every float setting of every section
    for cls, name in fields:
        with pytest.raises(ValidationError) as caught:
            cls.model_validate({**MINIMAL.get(cls.__name__, {}), name: value})
        assert [error["loc"] for error in caught.value.errors()] == [(name,)], (cls, name)


def test_serve_and_check_refuse_an_infinite_grace_naming_it(tmp_path: Path) -> None:
    write(tmp_path, "[server]\nshutdown_grace_seconds = inf\n")
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for command in (["config", "check"], ["serve", "--port", "1"]):
        refused = keel_cli(*command, env=env)
        assert refused.returncode == 78, (command, refused.stderr)
        assert "server.shutdown_grace_seconds: must be a finite number" in refused.stderr


def test_a_threads_variable_the_worker_ignores_is_a_warning(tmp_path: Path) -> None:
    """`LLAMA_ARG_THREADS=two` was ignored in the worker, a child whose log says nothing
    of it: keel serve and config check warn, naming the variable, its value and what is
    used instead."""
    said = "LLAMA_ARG_THREADS='two' is not a whole number of threads above 0"
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "LLAMA_ARG_THREADS": "two"}
    checked = keel_cli("config", "check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert f"warning: {said}" in checked.stderr and "physical cores" in checked.stderr
    with socket.socket() as holder:  # serve stops at the bind: the warning comes before it
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        served = keel_cli("serve", "--port", str(holder.getsockname()[1]), env=env)
    assert served.returncode == 75, served.stderr
    assert "WARNING" in served.stderr and said in served.stderr
    for usable in ("4", " 2\n", ""):
        quiet = keel_cli("config", "check", env={**env, "LLAMA_ARG_THREADS": usable})
        assert "LLAMA_ARG_THREADS" not in quiet.stderr, quiet.stderr


def test_threads_above_the_cores_is_a_warning(tmp_path: Path) -> None:
    """`threads = 64` on 2 cores answered 7-11x slower than unset, and neither `keel
    config check` nor `keel serve` said a word. Both say it now, naming the key (a
    fallback's by its index from 0), the cores and what to set."""
    cores = usable_cores()
    (tmp_path / "config.toml").write_text(
        f'[model.chat.local]\nmodel_id = "SmolLM2-135M-Instruct"\nthreads = {cores + 1}\n'
        f'[[model.chat.fallback]]\nmodel_id = "SmolLM2-135M-Instruct"\nthreads = {cores}\n'
        f'[[model.chat.fallback]]\nmodel_id = "SmolLM2-135M-Instruct"\nthreads = 64\n'
    )
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    checked = keel_cli("config", "check", env=env)
    assert checked.returncode == 0, checked.stderr
    said = f"model.chat.local.threads = {cores + 1} is more than the {cores} physical core(s)"
    assert f"warning: {said}" in checked.stderr, checked.stderr
    assert "model.chat.fallback[1].threads = 64 is more than" in checked.stderr
    assert "fallback[0].threads" not in checked.stderr
    with socket.socket() as holder:  # serve stops at the bind: the warning comes before it
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        served = keel_cli("serve", "--port", str(holder.getsockname()[1]), env=env)
    assert served.returncode == 75 and said in served.stderr, served.stderr


def test_a_config_file_linked_to_nothing_is_no_config_of_defaults(tmp_path: Path) -> None:
    """The data root's config.toml a link to a ConfigMap or volume not mounted yet: keel
    served on all defaults (no keys, the embedded model) and said nothing."""
    (tmp_path / "config.toml").symlink_to(tmp_path / "mounted" / "config.toml")
    with pytest.raises(ConfigError, match="symbolic link to .*mounted/config.toml"):
        load_settings(None, Paths(tmp_path), {})
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    checked = keel_cli("config", "check", env=env)
    assert checked.returncode == 78 and "not mounted yet" in checked.stderr, checked.stderr


def test_config_check_warns_of_a_fallback_model_this_machine_lacks(tmp_path: Path) -> None:
    """A misspelt fallback_models entry: "ok", and a load short of memory passed over it
    without a word."""
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    text = '[model.completion.local]\nfallback_models = ["SmolLM2-135M-Instruct", "nope"]\n'
    result = keel_cli("config", "check", str(write(tmp_path, text)), env=env)
    assert result.returncode == 0, result.stderr
    assert "model.completion.local.fallback_models[1]: model 'nope' not found" in result.stderr
    assert "fallback_models[0]" not in result.stderr


def test_every_fault_of_the_keys_is_said_at_once_by_position() -> None:
    """A short key was named by no position, and stood alone: a key of non-ASCII
    characters after it was said only once the first was mended."""
    raw = {"auth": {"api_keys": ["short", "ok-key-\u00e9-12345", "tiny", "fine-key-123"]}}
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "c.toml", environ={})
    message = caught.value.message
    assert "api_keys[0], api_keys[2]: every key must have at least 8 characters" in message
    assert "the key at api_keys[1] holds a character outside printable ASCII" in message
    assert "short" not in message.replace("api_keys", "") and "tiny" not in message


def test_a_llamacpp_endpoint_under_v1_is_warned_of() -> None:
    """llama-server serves /completion and /embedding at its root: the sample's own
    fallback example (``.../v1``) sent every request to a 404."""
    raw = {
        "model": {
            "completion": {
                "http": {"kind": "llama.cpp/completion", "api_endpoint": "http://gpu:8081/v1/"},
                "fallback": [{"kind": "llama.cpp/completion", "api_endpoint": "http://gpu:8082"}],
            },
            "chat": {"http": {"kind": "openai/chat", "api_endpoint": "http://gpu:8000/v1"}},
        }
    }
    warned = [w for w in parse_settings(raw, "inline", {}).ignored_sections() if "/v1" in w]
    assert len(warned) == 1 and "model.completion: llama.cpp/completion" in warned[0], warned
    assert "http://gpu:8081/v1/" in warned[0] and "without /v1" in warned[0]


def test_tabbys_keys_a_table_does_nothing_with_are_warned_of() -> None:
    """``enable_fast_attention``, a ``chat_template`` for a model server, a
    ``prompt_template`` for a kind that fills in the middle itself: each was taken in
    silence, while Tabby's unused sections are named."""
    template = "<PRE> {prefix} <SUF>{suffix} <MID>"
    raw = {
        "model": {
            "completion": {
                "http": {
                    "kind": "mistral/completion",
                    "api_endpoint": "http://gpu:8081",
                    "model_name": "codestral",
                    "prompt_template": template,
                },
                "fallback": [
                    {
                        "kind": "llama.cpp/completion",
                        "api_endpoint": "http://gpu:8082",
                        "prompt_template": template,
                    }
                ],
            },
            "chat": {
                "http": {
                    "kind": "openai/chat",
                    "api_endpoint": "http://gpu:8000/v1",
                    "chat_template": "{{ messages }}",
                }
            },
            "embedding": {"local": {"enable_fast_attention": True}},
        }
    }
    warned = parse_settings(raw, "inline", {}).ignored_sections()
    assert warned == [
        "model.completion (mistral/completion): prompt_template is ignored: the backend "
        "fills in the middle itself, sent the prefix and the suffix (the kinds it shapes a "
        "prompt for: llama.cpp/completion, ollama/completion, vllm/completion, "
        "openai/legacy_completion_no_fim)",
        "model.chat (openai/chat): chat_template is ignored: a model server applies its own "
        "chat template (set it there)",
        "model.embedding: enable_fast_attention is ignored: keel's engine chooses its "
        "attention kernels for the machine itself",
    ], warned


@pytest.mark.parametrize(
    ("role", "kind", "endpoint", "route"),
    [
        ("chat", "openai/chat", "http://gpu:8000/v1/chat/completions", "/chat/completions"),
        ("completion", "vllm/completion", "http://gpu:8000/v1/completions", "/completions"),
        ("embedding", "openai/embedding", "http://gpu:8000/v1/embeddings", "/embeddings"),
        ("completion", "ollama/completion", "http://gpu:11434/api/generate", "/api/generate"),
        (
            "completion",
            "mistral/completion",
            "https://m.example/v1/fim/completions",
            "/v1/fim/completions",
        ),
    ],
)
def test_an_api_endpoint_ending_in_the_route_keel_adds_is_warned_of(
    role: str, kind: str, endpoint: str, route: str
) -> None:
    """Tabby's docs say not to append /chat/completions: keel called
    .../chat/completions/chat/completions, and its 404 said nothing of why."""
    raw = {"model": {role: {"http": {"kind": kind, "api_endpoint": endpoint, "model_name": "m"}}}}
    warned = parse_settings(raw, "inline", {}).ignored_sections()
    assert len(warned) == 1 and f"ends with {route}, which keel adds itself" in warned[0]
    assert endpoint.removesuffix(route) in warned[0], warned
    raw["model"][role]["http"]["api_endpoint"] = endpoint.removesuffix(route)
    assert parse_settings(raw, "inline", {}).ignored_sections() == []
    # another kind's route is no mistake of this kind's (an Ollama chat's /api/chat, for
    # openai/chat, is a base URL keel appends /chat/completions to)
    other = {"kind": "openai/chat", "api_endpoint": "http://gpu:11434/api/chat"}
    assert (
        parse_settings({"model": {"chat": {"http": other}}}, "inline", {}).ignored_sections() == []
    )
