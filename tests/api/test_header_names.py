"""A provider's name in a response header, whatever script it is written in."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from tests.api.conftest import Backends, build_app, model_file, serving


async def test_a_model_named_in_another_script_is_served_and_named(
    backends: Backends, tmp_path: Path
) -> None:
    """A model file ``模型.gguf``, loaded: every Tabby completion and /infill was a 500
    once the model had answered (its name could not be a Latin-1 header), and the other
    routes named it ``local/??``."""
    config = (
        f'[model.completion.http]\nkind = "openai/completion"\n'
        f'api_endpoint = "{backends.primary.url}/v1"\n'
    )
    model_file(tmp_path / "keel", "模型")
    async with serving(build_app(tmp_path / "keel", config)) as client:
        body = {"model_name": "模型", "role": "completion", "stream": False}
        loaded = await client.post("/v1/model/load", json=body, timeout=120)
        assert loaded.status_code == 200, loaded.text
        tabby = {"language": "python", "segments": {"prefix": "def f(", "suffix": "\n"}}
        for path, request in (
            ("/v1/completions", {**tabby, "max_tokens": 2}),
            ("/infill", {"input_prefix": "def f(", "input_suffix": "\n", "n_predict": 2}),
            ("/v1/completions", {"prompt": "def f(", "max_tokens": 2}),
        ):
            answer = await client.post(path, json=request, timeout=120)
            assert answer.status_code == 200, (path, answer.text)
            named = answer.headers["x-keel-provider"]
            assert named.isascii() and unquote(named) == "local/模型", (path, named)
