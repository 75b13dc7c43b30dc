"""``GET /docs``: the API documentation as one self-contained page.

FastAPI's pages load Swagger UI and ReDoc from a CDN, so keel's docs were blank
where keel is meant to run: offline, or behind a firewall. This page is rendered
here from the OpenAPI document (``/openapi.json``) and loads nothing else.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

STYLE = (
    "body{font:14px/1.5 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
    "code,pre{font:12px ui-monospace,monospace}pre{background:#f4f4f4;padding:.6em;"
    "overflow:auto}h3{margin-bottom:.2em}.m{display:inline-block;width:4.5em;font-weight:600}"
)


def _operation(path: str, method: str, operation: dict[str, Any]) -> str:
    title = operation.get("summary") or operation.get("operationId", "")
    parts = [
        f'<h3 id="{escape(method + path)}"><span class="m">{method.upper()}</span>'
        f"<code>{escape(path)}</code></h3><p>{escape(title)}</p>"
    ]
    if description := operation.get("description"):
        parts.append(f"<p>{escape(description)}</p>")
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if body:
        schema = json.dumps(body.get("schema", {}), indent=1)
        parts.append(
            f"<details><summary>request body</summary><pre>{escape(schema)}</pre></details>"
        )
    codes = ", ".join(escape(code) for code in operation.get("responses", {}))
    parts.append(f"<p>answers: {codes}</p>")
    return "".join(parts)


def render(document: dict[str, Any]) -> str:
    info = document.get("info", {})
    sections = [
        _operation(path, method, operation)
        for path, methods in document.get("paths", {}).items()
        for method, operation in methods.items()
    ]
    schemas = document.get("components", {}).get("schemas", {})
    shapes = "".join(
        f'<details id="{escape(name)}"><summary><code>{escape(name)}</code></summary>'
        f"<pre>{escape(json.dumps(schema, indent=1))}</pre></details>"
        for name, schema in schemas.items()
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{escape(info.get('title', ''))}"
        f" API</title><style>{STYLE}</style></head><body><h1>{escape(info.get('title', ''))} "
        f"{escape(info.get('version', ''))}</h1><p>{escape(info.get('summary', ''))} The "
        'machine-readable document: <a href="openapi.json">/openapi.json</a>.</p>'
        f"{''.join(sections)}<h2>Schemas</h2>{shapes}</body></html>"
    )


def install(app: FastAPI) -> None:
    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(render(app.openapi()))

    app.add_route("/docs", docs, methods=["GET"], include_in_schema=False)
