"""HTTP routes of ``offsite serve``: the OpenAI API shape, plus vLLM's adapter load/unload.

Thin transport: each route validates the request body, calls the engine, and maps
``EngineError`` to its HTTP status with an OpenAI-style error body. Malformed JSON and schema
violations answer 400, unknown models 404; the server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

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


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
    )


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


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="offsite serve", version="1")

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, err: EngineError) -> JSONResponse:
        return _error(err.status, str(err), err.kind)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(
            400,
            f"invalid request: {where or 'body'}: {first.get('msg', err)}",
            "invalid_request_error",
        )

    @app.get("/v1/models")
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt[:1])
        engine.check_model(body.model)
        ids = engine.encode_prompt(prompt)
        return await _respond(body, ids, "text_completion", chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        engine.check_model(body.model)
        ids = engine.encode_chat([m.model_dump() for m in body.messages])
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
        pieces = engine.generate(body.model, ids, body.sampling())
        collected = await run_in_threadpool(list, pieces)
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

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapter) -> PlainTextResponse:
        seconds = await run_in_threadpool(
            engine.load_adapter, body.lora_name, body.lora_path, body.load_inplace
        )
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' added successfully ({seconds:.3f} s)."
        )

    @app.post("/v1/unload_lora_adapter")
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
