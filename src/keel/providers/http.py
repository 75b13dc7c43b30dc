"""Build the provider for a ``[model.<role>.http]`` table, one adapter per kind.

Where each kind sends its requests (``{endpoint}`` is ``api_endpoint``)::

    openai/completion                POST {endpoint}/completions        prompt + suffix
    openai/legacy_completion_no_fim  POST {endpoint}/completions        templated prompt
    vllm/completion                  POST {endpoint}/completions        templated prompt
    llama.cpp/completion             POST {endpoint}/completion         templated prompt
    ollama/completion                POST {endpoint}/api/generate       templated prompt, raw
    mistral/completion               POST {endpoint}/v1/fim/completions prompt + suffix
    openai/chat, mistral/chat        POST {endpoint}/chat/completions
    azure/chat                       POST {endpoint}/openai/deployments/{model}/chat/completions
    openai/embedding, voyage/embedding POST {endpoint}/embeddings      {input, model}
    azure/embedding                  POST {endpoint}/openai/deployments/{model}/embeddings
    mistral/embedding                POST {endpoint}/embeddings         {input, model}
    llama.cpp/embedding              POST {endpoint}/embeddings         {content}
    llama.cpp/before_b4356_embedding POST {endpoint}/embedding          {content}, a text each
    ollama/embedding                 POST {endpoint}/api/embed          {model, input}

OpenAI-style endpoints include the version (``.../v1``), as in Tabby's config. Azure
OpenAI's (``https://<resource>.openai.azure.com``) do not: its kinds name the deployment
(``model_name``) and Tabby's ``api-version`` (unless the endpoint's query names one), and
send the key as ``api-key``, as Tabby's Azure bindings do.
"""

from __future__ import annotations

import urllib.parse

import aiohttp

from keel.config import (
    DEFAULT_ENDPOINTS,
    DEFAULT_MODELS,
    TEMPLATED_KINDS,
    HttpModelConfig,
    Role,
    http_table_issues,
    masked_url,
)
from keel.errors import ConfigError
from keel.pipeline.prompt import template_for_model
from keel.providers.base import Provider, ProviderInfo
from keel.providers.http_base import HttpUpstream
from keel.providers.http_llamacpp import (
    LlamaCppCompletionProvider,
    LlamaCppEmbeddingProvider,
    LlamaCppLegacyEmbeddingProvider,
)
from keel.providers.http_mistral import MistralFimProvider
from keel.providers.http_ollama import OllamaCompletionProvider, OllamaEmbeddingProvider
from keel.providers.http_openai import (
    OPENAI_STOP_LIMIT,
    OpenAIChatProvider,
    OpenAICompletionProvider,
    OpenAIEmbeddingProvider,
)
from keel.rate_limit import RateLimiter


def build_http_provider(
    role: Role,
    config: HttpModelConfig,
    *,
    name: str,
    timeout: float,
    client: aiohttp.ClientSession | None = None,
) -> Provider:
    """The provider for ``config`` in ``role``.

    ``timeout`` bounds each read (so also the wait for the first token),
    write and pool wait; connecting has 5 s. A passed ``client`` is shared and
    not closed by the provider; otherwise the provider owns one and closes it
    in ``aclose()``. Raises :class:`ConfigError` for a kind that does not
    serve ``role`` or a missing ``api_endpoint`` / ``model_name``.
    """
    kind = config.kind
    issues = http_table_issues(role, kind, config.api_endpoint, config.model_name, config.api_key)
    if issues:
        raise ConfigError(f"provider {name!r}", issues)
    endpoint = config.api_endpoint or DEFAULT_ENDPOINTS[kind]
    model = config.model_name or DEFAULT_MODELS.get(kind)
    azure = kind.startswith("azure/")
    if azure:
        assert model is not None
        endpoint = azure_deployment(endpoint, model)

    upstream = HttpUpstream(
        provider=name,
        endpoint=endpoint,
        api_key=config.api_key,
        key_header="api-key" if azure else None,
        timeout=timeout,
        rate_limiter=(
            None if config.rate_limit is None else RateLimiter(config.rate_limit.request_per_minute)
        ),
        client=client,
    )
    # Shown to every user (/v1/model, /v1/providers, the status page): never a credential
    shown = masked_url(upstream.endpoint)
    info = ProviderInfo(name=name, kind=kind, model=model or kind, endpoint=shown)
    stop_words = tuple(config.additional_stop_words)
    # A kind sent a raw prompt (config's TEMPLATED_KINDS, which warns of a template set on
    # any other), with no template set: the one of the model's family, as for a local
    # model (vLLM serving Qwen2.5-Coder was sent the prefix alone, no suffix)
    template = config.prompt_template if kind in TEMPLATED_KINDS else None
    if template is None and kind in TEMPLATED_KINDS and model is not None:
        template = template_for_model(model)
    listed = tuple(config.supported_models or ())
    max_input_length = config.max_input_length

    match kind:
        case "openai/completion" | "openai/legacy_completion_no_fim" | "vllm/completion":
            return OpenAICompletionProvider(
                upstream,
                info,
                model=model,
                native_fim=kind == "openai/completion",
                prompt_template=template,
                stop_words=stop_words,
                max_input_length=max_input_length,
                stop_limit=OPENAI_STOP_LIMIT if kind.startswith("openai/") else None,
            )
        case "llama.cpp/completion":
            return LlamaCppCompletionProvider(
                upstream,
                info,
                prompt_template=template,
                stop_words=stop_words,
                max_input_length=max_input_length,
            )
        case "ollama/completion":
            assert model is not None
            return OllamaCompletionProvider(
                upstream,
                info,
                model=model,
                prompt_template=template,
                stop_words=stop_words,
                max_input_length=max_input_length,
            )
        case "mistral/completion":
            assert model is not None
            return MistralFimProvider(
                upstream,
                info,
                model=model,
                stop_words=stop_words,
                max_input_length=max_input_length,
            )
        case "openai/chat" | "azure/chat":
            return OpenAIChatProvider(
                upstream, info, model=model, stop_limit=OPENAI_STOP_LIMIT, supported_models=listed
            )
        case "mistral/chat":
            return OpenAIChatProvider(
                upstream,
                info,
                model=model,
                seed_field="random_seed",
                limit_name="max_tokens",
                supported_models=listed,
                openai_api=False,
            )
        case "openai/embedding" | "azure/embedding":
            return OpenAIEmbeddingProvider(upstream, info, model=model, size_field="dimensions")
        case "voyage/embedding" | "mistral/embedding":
            return OpenAIEmbeddingProvider(
                upstream, info, model=model, size_field="output_dimension"
            )
        case "llama.cpp/embedding":
            return LlamaCppEmbeddingProvider(upstream, info)
        case "llama.cpp/before_b4356_embedding":
            return LlamaCppLegacyEmbeddingProvider(upstream, info)
        case "ollama/embedding":
            assert model is not None
            return OllamaEmbeddingProvider(upstream, info, model=model)
    raise AssertionError(f"kind {kind!r} is listed in KINDS_BY_ROLE but has no adapter")


AZURE_API_VERSION = "2024-02-01"
"""The ``api-version`` Tabby's Azure bindings send."""


def azure_deployment(endpoint: str, deployment: str) -> str:
    """Azure OpenAI's base URL for ``deployment`` of the resource at ``endpoint``, with
    Tabby's ``api-version`` unless the endpoint's query names its own."""
    base, _, query = endpoint.partition("?")
    if "api-version=" not in query:
        query = "&".join(filter(None, [query, f"api-version={AZURE_API_VERSION}"]))
    path = f"{base.rstrip('/')}/openai/deployments/{urllib.parse.quote(deployment, safe='')}"
    return f"{path}?{query}"
