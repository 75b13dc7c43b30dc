"""``POST /v1/chat/completions``: admission, cancellation when the client goes
away, the router's attempts, stop words, usage."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

from keel import jsoncodec
from keel.errors import RequestError
from keel.providers.base import ChatCall, ChatProvider, Parts, Provider, by_call
from keel.router.admission import Admission
from keel.router.router import RoleRouter
from keel.schemas.openai import ChatCompletionRequest
from keel.serving.lifecycle import (
    CancelOnDisconnect,
    Envelope,
    Generated,
    JsonResponse,
    OpenStream,
    count_usage,
    finish_reason,
    generate_text,
    note_provider,
    stream_text,
)
from keel.serving.streaming import stream_response


def chat_text(call: ChatCall) -> str:
    """What a backend reads of the chat, counted where it did not report its prompt's
    tokens: each message as a turn of a chat template (its role between markers, which
    are tokens too), its text and its tool calls' names and arguments, then the tools'
    and the response format's JSON. The messages' text alone was counted: a 5.9 KB chat
    of a tool's definition, a call's arguments and its result, then "hi", was 2 tokens."""
    turns = []
    for message in call.messages:
        functions = [made.get("function") or {} for made in message.tool_calls]
        said = [f"{made.get('name')}({made.get('arguments')})" for made in functions]
        turns.append("\n".join([f"<|im_start|>{message.role}", message.content, *said]))
    given = [call.tools, call.response_format]
    turns += [jsoncodec.dumps(fields).decode() for fields in given if fields]
    return "<|im_end|>\n".join(turns)


def delta(piece: str) -> dict[str, object]:
    """A streamed chunk's ``delta``: the piece's reasoning (vLLM's and llama.cpp's
    ``reasoning_content``), its text, and its tool-call parts as the backend sent them
    (each names its call by ``index``)."""
    if not isinstance(piece, Parts):
        return {"content": piece}
    said: dict[str, object] = {"reasoning_content": piece.reasoning} if piece.reasoning else {}
    if piece or not piece.deltas and not piece.reasoning:
        said["content"] = piece
    if piece.deltas:
        said["tool_calls"] = list(piece.deltas)
    return said


def assembled(deltas: list[dict[str, Any]]) -> list[dict[str, object]]:
    """Whole tool calls from their streamed parts (:func:`by_call`, a part without an
    ``index`` taken as the first call's), in order of their index."""
    calls = by_call([{**part, "index": part.get("index", 0)} for part in deltas])
    whole = []
    for call in sorted(calls, key=lambda call: call["index"]):
        function = call.get("function") or {}
        named = {"name": function.get("name"), "arguments": function.get("arguments") or ""}
        whole.append({"id": call.get("id"), "type": "function", "function": named})
    return whole


class ChatServing:
    """Chat answers, held to no limit as a whole: only the backend's first-token and stall
    limits (cut at 300 s, a slow model's long answer was lost while it still came)."""

    def __init__(self, router: RoleRouter, admission: Admission) -> None:
        self.router = router
        self.admission = admission

    async def serve(self, http: Request, body: ChatCompletionRequest) -> Response:
        envelope = Envelope(
            f"chatcmpl-{uuid.uuid4()}",
            "chat.completion",
            int(time.time()),
            self.router.primary.info.model,
        )
        if body.asks_no_answer():  # llama.vim's warm-up, whose answer it drops
            if body.stream:
                raise RequestError(
                    "'n_predict': 0 asks for no answer; send 'stream': false", param="stream"
                )
            empty = {"role": "assistant", "content": ""}
            choice = {"index": 0, "message": empty, "logprobs": None, "finish_reason": "length"}
            # no model read it: usage is all zero, but there (it is required)
            return JsonResponse(envelope([choice], usage=Generated().usage()))
        params = body.to_params()
        wanted = body.response_format.to_wire() if body.response_format else None
        call = ChatCall(
            body.to_messages(),
            params,
            wanted,
            body.tool_fields(),
            body.passed_on(),
            model=body.model,
        )

        def open_stream(provider: Provider) -> AsyncIterator[str]:
            assert isinstance(provider, ChatProvider)
            return provider.stream_chat(call)

        async with CancelOnDisconnect(http):
            if body.stream:
                return await self._stream(http, body, open_stream, call, envelope)
            generated = await generate_text(self.router, self.admission, open_stream, params)
        await count_usage(generated, lambda: chat_text(call), call.reported)
        note_provider(http, generated.provider)
        envelope.served(generated.provider, call.reported)
        message: dict[str, object] = {"role": "assistant", "content": generated.text}
        if generated.reasoning:
            message["reasoning_content"] = generated.reasoning
        if generated.tool_deltas:
            message["content"] = generated.text or None
            message["tool_calls"] = assembled(generated.tool_deltas)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(generated, params.max_tokens),
        }
        return JsonResponse(envelope([choice], usage=generated.usage()))

    async def _stream(
        self,
        http: Request,
        body: ChatCompletionRequest,
        open_stream: OpenStream,
        call: ChatCall,
        envelope: Envelope,
    ) -> Response:
        params = body.to_params()
        generated = Generated()
        pieces = stream_text(self.router, self.admission, open_stream, params, generated)

        def chunk(delta: dict[str, object], finish: str | None) -> dict[str, object]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**envelope([choice]), "object": "chat.completion.chunk"}

        def head() -> list[dict[str, object]]:  # the first piece is in: its provider known
            note_provider(http, generated.provider)
            envelope.served(generated.provider, call.reported)
            return [chunk({"role": "assistant", "content": ""}, None)]

        async def tail() -> list[dict[str, object]]:
            await count_usage(generated, lambda: chat_text(call), call.reported)
            last = [chunk({}, finish_reason(generated, params.max_tokens))]
            if body.stream_options is not None and body.stream_options.include_usage:
                last.append(
                    {**envelope([], usage=generated.usage()), "object": "chat.completion.chunk"}
                )
            return last

        return await stream_response(
            pieces,
            head=head,
            chunk=lambda piece: chunk(delta(piece), None),
            tail=tail,
        )
