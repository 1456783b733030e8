"""OpenAI-compatible routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

`model` is whatever `app.state.registry.resolve` accepts (endpoints/NAME, NAME, a job id, a --model name). Chat
renders the messages with the run's own template (as `tunelab generate` does); completions feed the prompt as raw
text (`tunelab generate --template none`). Generation is `app.state.engine`'s (engine.py). Bad requests are 4xx
with one line in OpenAI's error shape; streaming is server-sent events ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.config import UserError
from tunelab.serve import batch as gen
from tunelab.serve.engine import target_of

router = APIRouter()
log = logging.getLogger("tunelab.serve")

DEFAULT_MAX_TOKENS = 128  # `tunelab generate --max-new-tokens`' default


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's range and default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send n requests (with different seeds) for n samples")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def engine_request(self, max_tokens: int | None, **prompt) -> gen.Request:
        return gen.Request(**prompt, max_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=self.temperature,
                           top_p=self.top_p, stop=self.stop or [], seed=self.seed, stream=self.stream)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(_Sampling):
    prompt: str


# ---------------------------------------------------------------- routes

@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_json(ref) for ref in request.app.state.registry.list()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request):
    return _model_json(_resolve(request, name))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await _parse(request, ChatRequest)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    job = _submit(request, body, body.engine_request(body.max_completion_tokens or body.max_tokens, messages=messages))
    head = _head("chatcmpl", body.model)
    if not body.stream:
        result = await _result(job)
        return {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason, "logprobs": None}], "usage": _usage(result)}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    return await _stream(job, body, head, "chat.completion.chunk", first=chunk({"role": "assistant", "content": ""}),
                         delta=lambda text: chunk({"content": text}), last=lambda r: chunk({}, r.finish_reason))


@router.post("/v1/completions")
async def completions(request: Request):
    body = await _parse(request, CompletionRequest)
    job = _submit(request, body, body.engine_request(body.max_tokens, prompt=body.prompt))
    head = _head("cmpl", body.model)

    def chunk(text: str, finish: str | None = None) -> dict:
        return {**head, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    if not body.stream:
        result = await _result(job)
        return {**chunk(result.text, result.finish_reason), "usage": _usage(result)}
    return await _stream(job, body, head, "text_completion", first=None, delta=chunk,
                         last=lambda r: chunk("", r.finish_reason))


# ---------------------------------------------------------------- helpers

async def _parse(request: Request, schema: type[_Sampling]) -> _Sampling:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise HTTPException(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise HTTPException(400, _one_line(e)) from None


def _one_line(error: ValidationError) -> str:
    """The first problem, naming its field: `messages.0.role: Input should be 'system', 'user' or 'assistant'`."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return f"{where}: not supported by this server"
    if first["type"] == "missing":
        return f"{where}: required"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def _resolve(request: Request, name: str):
    ref = request.app.state.registry.resolve(name)
    if ref is None:
        raise HTTPException(404, f"model {name!r} not found; GET /v1/models lists the served models")
    return ref


def _submit(request: Request, body: _Sampling, engine_request: gen.Request) -> gen.Job:
    ref = _resolve(request, body.model)
    try:
        target = target_of(ref.path)
    except UserError as e:
        raise HTTPException(400, f"model {body.model!r}: {e}") from None
    return request.app.state.engine.submit(target, engine_request)


async def _next(job: gen.Job):
    try:
        return await job.next()
    except UserError as e:
        raise HTTPException(400, str(e)) from None
    except HTTPException:
        raise
    except Exception as e:  # a fault of the server, not of the request: logged in full, answered in one line
        log.exception("generation failed")
        raise HTTPException(500, f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


async def _result(job: gen.Job) -> gen.Result:
    try:
        while not isinstance(item := await _next(job), gen.Result):
            pass
        return item
    finally:  # also when the client went away: its row stops generating
        job.cancelled = True


async def _stream(job, body: _Sampling, head: dict, kind: str, first, delta, last) -> StreamingResponse:
    """Wait for the first event (so an error still gets its status code), then stream chunks as SSE."""
    try:
        item = await _next(job)
    except BaseException:
        job.cancelled = True
        raise

    async def events():
        nonlocal item
        try:
            if first is not None:
                yield _sse(first)
            while not isinstance(item, gen.Result):
                yield _sse(delta(item))
                item = await job.next()
            yield _sse(last(item))
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "object": kind, "choices": [], "usage": _usage(item)})
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are sent: the error travels as an event
            log.exception("generation failed while streaming")
            yield _sse({"error": {"message": f"{type(e).__name__}: {e}".splitlines()[0], "type": "server_error",
                                  "code": 500}})
        finally:
            job.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _head(prefix: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def _usage(result: gen.Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _model_json(ref) -> dict:
    return {"id": ref.name, "object": "model", "created": ref.created, "owned_by": ref.owned_by}
