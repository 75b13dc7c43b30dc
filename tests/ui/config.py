"""The keel world the status-page tests run against: fake backends, no embedded chat."""

from __future__ import annotations

UI_KEY = "ui-test-key-0123456789"

PRIMARY_TOKENS = (  # as a model asked at the playground's blank, indented line writes it
    "\n    if n < 2:\n",
    "        return n\n",
    "    return fibonacci(n - 1) + fibonacci(n - 2)",
)
FALLBACK_TOKENS = ("return n",)


def ui_config(
    primary: str,
    fallback: str,
    *,
    probe_interval: float = 0.5,
    keys: bool = True,
    embedded_last_resort: bool = False,
    fallback_replicas: tuple[str, ...] = (),
) -> str:
    """Completion: ``primary`` then ``fallback`` (then the embedded model if asked);
    chat and embedding: ``fallback`` only, so stopping ``primary`` turns one card red.
    ``fallback_replicas``: the completion fallback is ``fallback`` and these, as one
    link's ``api_endpoints``."""
    auth = f'[auth]\napi_keys = ["{UI_KEY}"]\n' if keys else ""
    replicas = ", ".join(f'"{url}/v1"' for url in (fallback, *fallback_replicas))
    fallback_link = (
        f"api_endpoints = [{replicas}]" if fallback_replicas else f'api_endpoint = "{fallback}/v1"'
    )
    return f"""
[server]
completion_timeout = 10

[routing]
probe_interval_seconds = {probe_interval}
probe_timeout_seconds = 1.0

{auth}
[model.completion]
embedded_last_resort = {str(embedded_last_resort).lower()}

[model.completion.http]
kind = "openai/completion"
api_endpoint = "{primary}/v1"
model_name = "primary-coder"

[[model.completion.fallback]]
kind = "openai/completion"
{fallback_link}
model_name = "fallback-coder"

[model.chat.http]
kind = "openai/chat"
api_endpoint = "{fallback}/v1"
model_name = "fallback-chat"

[model.embedding.http]
kind = "openai/embedding"
api_endpoint = "{fallback}/v1"
model_name = "fallback-embed"
"""
