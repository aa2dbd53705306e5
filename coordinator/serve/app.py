"""HTTP routes of ``offsite serve``: the OpenAI API shape, plus vLLM's adapter load/unload.

Thin transport: each route validates the request body, calls the engine, and maps
``EngineError`` to its HTTP status with an OpenAI-style error body. Every error has that shape:
malformed JSON and schema violations 400, a missing or wrong key 401, unknown models and routes
404, a wrong method 405, an oversized body 413, anything unexpected 500; the server keeps
serving after any of them.

Guards: request bodies are capped while they are read (``max_body_bytes``) and prompts by
characters before they are tokenized; tokenizing and generation run off the event loop, so a
large request never stalls ``/health``. With ``admin_token`` the adapter load/unload routes need
``Authorization: Bearer <admin token>``; with ``api_key`` every model route needs that key (or
the admin token), as OpenAI clients send it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.serve.engine import Engine, EngineError, Piece, Sampling


class _Sampling(BaseModel):
    model: str
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)

    def sampling(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(self.max_tokens, self.temperature, self.top_p, tuple(stops), self.seed)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class LoadAdapter(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadAdapter(BaseModel):
    lora_name: str


log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1024 * 1024
CHARS_PER_TOKEN_CAP = 32  # a prompt longer than this many characters per allowed token is refused


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
    )


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413 — by its declared
    length, or while it arrives (chunked) — before the app sees any of it. Bodies under the
    limit are read here and replayed to the app (at most ``limit`` bytes are held)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _error(
            413, f"the request body exceeds {self.limit} bytes", "invalid_request_error"
        )
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app sees the disconnect below
            size += len(message.get("body", b""))
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _matches(given: str, *expected: str | None) -> bool:
    return any(e and hmac.compare_digest(given.encode(), e.encode()) for e in expected)


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


async def _produce(
    engine: Engine, model: str, ids: list[int], sampling: Sampling
) -> AsyncIterator[Piece]:
    """Run generation in one worker thread, hand pieces over through a queue.

    The whole generation (and so the engine lock) lives in that one thread; when the client
    hangs up, Starlette cancels this generator, ``finally`` sets ``cancel`` and the worker stops
    at the next token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            for piece in engine.generate(model, ids, sampling, cancel):
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except BaseException as err:  # handed to the response, re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, err)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    worker = loop.run_in_executor(None, work)
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        del worker


def build_app(
    engine: Engine,
    *,
    admin_token: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    app = FastAPI(title="offsite serve", version="1")
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    max_prompt_chars = engine.max_prompt_tokens * CHARS_PER_TOKEN_CAP

    async def caller(request: Request) -> None:
        if api_key and not _matches(_bearer(request), api_key, admin_token):
            raise EngineError(
                "a valid API key is required (Authorization: Bearer …)", 401, "authentication_error"
            )

    async def admin(request: Request) -> None:
        if admin_token and not _matches(_bearer(request), admin_token):
            raise EngineError(
                "the admin token is required to load or unload adapters",
                401,
                "authentication_error",
            )

    def check_prompt(text: str) -> None:
        if len(text) > max_prompt_chars:
            raise EngineError(
                f"the prompt has {len(text)} characters; the limit is {max_prompt_chars} "
                f"({engine.max_prompt_tokens} tokens)"
            )

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, err: EngineError) -> JSONResponse:
        return _error(err.status, str(err), err.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(err.status_code, str(err.detail), kind)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return _error(500, f"internal error: {type(err).__name__}", "server_error")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(
            400,
            f"invalid request: {where or 'body'}: {first.get('msg', err)}",
            "invalid_request_error",
        )

    @app.get("/v1/models", dependencies=[Depends(caller)])
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [
            {"id": engine.served_name, "object": "model", "created": now, "owned_by": "offsite"}
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "created": info["created"],
                "owned_by": "offsite",
                "parent": engine.served_name,
                "root": info["path"],
            }
            for name, info in engine.adapters.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[Depends(caller)])
    async def completions(body: CompletionRequest) -> Any:
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt[:1])
        engine.check_model(body.model)
        check_prompt(prompt)
        ids = await run_in_threadpool(engine.encode_prompt, prompt)
        return await _respond(body, ids, "text_completion", chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(caller)])
    async def chat(body: ChatRequest) -> Any:
        engine.check_model(body.model)
        check_prompt("".join(m.content for m in body.messages))
        messages = [m.model_dump() for m in body.messages]
        ids = await run_in_threadpool(engine.encode_chat, messages)
        return await _respond(body, ids, "chat.completion", chat=True)

    async def _respond(body: _Sampling, ids: list[int], kind: str, chat: bool) -> Any:
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            pieces = _produce(engine, body.model, ids, body.sampling())
            return StreamingResponse(
                _sse(_stream_chunks(pieces, request_id, created, body.model, chat)),
                media_type="text/event-stream",
            )
        generated = engine.generate(body.model, ids, body.sampling())
        collected: list[Piece] = await run_in_threadpool(list, generated)
        text = "".join(p.text for p in collected)
        last = collected[-1]
        usage = {
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
        }
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": last.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": last.finish_reason,
            }
        return {
            "id": request_id,
            "object": kind,
            "created": created,
            "model": body.model,
            "choices": [choice],
            "usage": usage,
        }

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)])
    async def load_adapter(body: LoadAdapter) -> PlainTextResponse:
        seconds = await run_in_threadpool(
            engine.load_adapter, body.lora_name, body.lora_path, body.load_inplace
        )
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' added successfully ({seconds:.3f} s)."
        )

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)])
    async def unload_adapter(body: UnloadAdapter) -> PlainTextResponse:
        await run_in_threadpool(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _stream_chunks(
    pieces: AsyncIterator[Piece], request_id: str, created: int, model: str, chat: bool
) -> AsyncIterator[dict[str, Any]]:
    if chat:
        yield _chunk(request_id, created, model, chat, {"role": "assistant", "content": ""}, None)
    async for piece in pieces:
        if piece.text:
            delta: Any = {"content": piece.text} if chat else piece.text
            yield _chunk(request_id, created, model, chat, delta, None)
        if piece.finish_reason:
            yield _chunk(request_id, created, model, chat, {} if chat else "", piece.finish_reason)


def _chunk(
    request_id: str, created: int, model: str, chat: bool, delta: Any, finish: str | None
) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
    }
