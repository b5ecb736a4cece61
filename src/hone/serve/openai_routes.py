"""OpenAI-compatible inference routes: POST /v1/chat/completions and POST /v1/completions, with SSE streaming.

    router = inference_router(resolve_model, auth_dependency=require_key)   # the service mounts this
    app.include_router(router)
    ...
    router.engine.close()                                                    # at shutdown

`resolve_model(model_id, request)` (sync or async) maps an OpenAI model id ("ft:smollm2-135m-instruct:
support:abc123", a base name) to what `hone.models.load.load_model` takes; it raises ModelNotFoundError (or
any OpenAIError) for ids it does not know or the caller may not use. `auth_dependency` runs before every route.

Request and response bodies follow OpenAI's schemas, and so do errors: a status code with
{"error": {"message", "type", "param", "code"}}. Bad requests get 400 naming the parameter; only n=1 is served.
The routes parse bodies themselves (rather than through FastAPI's 422 handler) so the error shape holds
whatever app mounts them.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
import uuid
from contextlib import aclosing
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from hone.models.load import ModelError
from hone.serve.engine import GenerationRequest, InferenceEngine, Pending, RequestError

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    """An error the client sees as OpenAI's error body with this HTTP status."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


class ModelNotFoundError(OpenAIError, LookupError):
    """resolve_model raises this for a model id it does not know, or one the caller may not use."""

    def __init__(self, model_id: str, message: str | None = None):
        super().__init__(message or f"The model '{model_id}' does not exist or you do not have access to it.",
                         status=404, param="model", code="model_not_found")


# --- request bodies ------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="Send a last chunk with token usage (choices empty).")


class _Sampling(BaseModel):
    # Unknown fields are refused, as OpenAI does ("Unrecognized request argument supplied").
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="A base model name or a fine-tuned model id.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling mass; default 1.")
    n: int | None = Field(None, description="Choices per prompt: only 1 is served.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the text (not included).")
    seed: int | None = Field(None, description="Sampling seed: the same seed gives the same text.")
    stream: bool | None = Field(False, description="Send server-sent events as tokens are generated.")
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, description="Only 0 is served.")
    presence_penalty: float | None = Field(None, description="Only 0 is served.")
    logit_bias: dict[str, float] | None = Field(None, description="Not served; leave empty.")
    # Accepted and ignored: bookkeeping fields that do not change the text.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (newer name).")
    logprobs: bool | None = Field(None, description="Not served.")
    top_logprobs: int | None = Field(None, description="Not served.")
    tools: list[dict] | None = Field(None, description="Not served: no tool calling.")
    tool_choice: Any = Field(None, description="Not served.")
    parallel_tool_calls: bool | None = None
    response_format: dict | None = Field(None, description="Only {'type': 'text'}.")


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="Text to continue; a list gives one choice per prompt.")
    echo: bool | None = Field(None, description="Not served.")
    logprobs: int | None = Field(None, description="Not served.")
    best_of: int | None = Field(None, description="Only 1.")
    suffix: str | None = Field(None, description="Not served.")


# --- turning bodies into engine requests ---------------------------------------------------------------------


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


async def parse_body(request: Request, model: type[BaseModel]):
    try:
        data = json.loads(await request.body() or b"null")
    except ValueError as e:
        raise OpenAIError(f"The request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise OpenAIError("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # Union types add the member's name to the location ("str", "list[str]"); it is no parameter.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int"))))
        param = _param(loc)
        if err["type"] == "extra_forbidden":
            raise OpenAIError(f"Unrecognized request argument supplied: {param}", param=param) from e
        if err["type"] == "missing":
            raise OpenAIError(f"Missing required parameter: '{param}'.", param=param) from e
        raise OpenAIError(f"Invalid value for '{param}': {err['msg']}.", param=param) from e


def refuse_unsupported(body) -> None:
    """400 for parameters hone does not serve, rather than silently ignoring what a client asked for."""
    if body.n not in (None, 1):
        raise OpenAIError("Only n=1 is supported: send one request per choice.", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0):
            raise OpenAIError(f"{name} is not supported; leave it at 0.", param=name)
    if body.logit_bias:
        raise OpenAIError("logit_bias is not supported.", param="logit_bias")
    if body.stream_options is not None and not body.stream:
        raise OpenAIError("stream_options is only allowed when stream is true.", param="stream_options")
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs or body.top_logprobs:
            raise OpenAIError("logprobs is not supported.", param="logprobs")
        if body.tools or body.tool_choice not in (None, "none"):
            raise OpenAIError("Tool calling is not supported by this server.", param="tools")
        if body.response_format and body.response_format.get("type") != "text":
            raise OpenAIError("Only response_format {'type': 'text'} is supported.", param="response_format")
    else:
        for name, ok in (("echo", (None, False)), ("logprobs", (None,)), ("best_of", (None, 1)),
                         ("suffix", (None, ""))):
            if getattr(body, name) not in ok:
                raise OpenAIError(f"{name} is not supported.", param=name)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if m.role in ("tool", "function") or getattr(m, "tool_calls", None):
            raise OpenAIError("Tool messages are not supported by this server.", param=f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise OpenAIError(f"Only text content parts are supported (got '{part.type}').",
                                      param=f"messages[{i}].content[{j}]")
            content = "\n".join(p.text for p in content)
        if content is None:
            raise OpenAIError("Each message needs content.", param=f"messages[{i}].content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def sampling(body) -> dict:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise OpenAIError("stop takes up to 4 non-empty strings.", param="stop")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    return {"max_tokens": max_tokens, "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "stop": stop, "seed": body.seed}


# --- the router --------------------------------------------------------------------------------------------


def inference_router(resolve_model: Callable[[str, Request], Any], auth_dependency: Callable | None = None, *,
                     engine: InferenceEngine | None = None, engine_options: dict | None = None) -> APIRouter:
    """The /v1/chat/completions and /v1/completions routes over one shared InferenceEngine.

    engine: an engine to use; by default one is made (with `engine_options`) at the first request. The
    router's `engine` attribute holds it, for the app to close at shutdown.
    """
    router = APIRouter(dependencies=[Depends(auth_dependency)] if auth_dependency else [], tags=["inference"])
    router.engine = engine
    lock = threading.Lock()

    def get_engine() -> InferenceEngine:
        with lock:
            if router.engine is None:
                router.engine = InferenceEngine(**(engine_options or {}))
            return router.engine

    async def start(body, request: Request, each: list[dict], pendings: list[Pending]) -> list[int]:
        """Resolve the model, queue one engine request per prompt, and wait until each has started (so a
        prompt that is too long, or a model that fails to load, is still a JSON error, not a broken stream)."""
        refuse_unsupported(body)
        if inspect.iscoroutinefunction(resolve_model):
            key = await resolve_model(body.model, request)
        else:  # a registry look-up may block (a database): keep it off the event loop
            key = await run_in_threadpool(resolve_model, body.model, request)
        engine = get_engine()
        for kw in each:  # appended one by one, so the caller can cancel those queued if a later one fails
            pendings.append(engine.submit(GenerationRequest(model=key, **kw, **sampling(body))))
        prompt_tokens = []
        for p in pendings:
            async with aclosing(p.aevents()) as events:
                async for kind, value in events:
                    if kind in ("start", "done"):  # done: cancelled before it started
                        prompt_tokens.append(value if kind == "start" else value.prompt_tokens)
                        break
        return prompt_tokens

    async def handle(request: Request, model_cls, make_inputs, render, render_stream):
        pendings: list[Pending] = []
        streaming = False
        try:
            body = await parse_body(request, model_cls)
            prompt_tokens = await start(body, request, make_inputs(body), pendings)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                streaming = True  # from here the stream owns the request (and cancels it if the client goes)
                return StreamingResponse(sse(render_stream(body, pendings[0], prompt_tokens[0], include_usage),
                                             pendings[0]), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            completions = []
            for p in pendings:
                async for kind, value in p.aevents():
                    if kind == "done":
                        completions.append(value)
            return JSONResponse(render(body, completions))
        except Exception as e:
            return error_for(e, request).response()
        finally:  # an error, or a client that went away: stop what is queued or running (no-op once done)
            if not streaming:
                for p in pendings:
                    p.cancel()

    @router.post("/v1/chat/completions", summary="Create a chat completion (OpenAI-compatible)",
                 openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest,
                            lambda body: [{"messages": chat_messages(body.messages)}], chat_response, chat_chunks)

    @router.post("/v1/completions", summary="Create a text completion (OpenAI-compatible)",
                 openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        def inputs(body):
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not prompts:
                raise OpenAIError("prompt is empty.", param="prompt")
            if body.stream and len(prompts) > 1:
                raise OpenAIError("Streaming serves one prompt per request.", param="prompt")
            return [{"prompt": p} for p in prompts]

        return await handle(request, CompletionRequest, inputs, completion_response, completion_chunks)

    return router


def _body_schema(model: type[BaseModel]) -> dict:
    """The body's JSON schema for the OpenAPI document, nested models inlined (bodies are parsed by hand,
    so FastAPI does not register them as components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.split("/")[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def error_for(e: Exception, request: Request) -> OpenAIError:
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, RequestError):
        return OpenAIError(str(e), param=e.param, code=e.code)
    if isinstance(e, ModelError):
        # The detail names server paths: log it, tell the client only which model failed.
        log.error("model failed to load for %s: %s", request.url.path, e)
        return OpenAIError("The model could not be loaded on this server.", status=500, type="server_error",
                           code="model_load_failed")
    if hasattr(e, "status_code"):  # an HTTPException from resolve_model: let FastAPI answer it
        raise e
    log.exception("inference failed")
    return OpenAIError("The server failed to generate a response.", status=500, type="server_error")


# --- response bodies ------------------------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def chat_response(body, completions) -> dict:
    c = completions[0]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text, "refusal": None},
                         "logprobs": None, "finish_reason": _finish(c.finish_reason)}],
            "usage": _usage(c.prompt_tokens, c.completion_tokens)}


def completion_response(body, completions) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": None,
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": _finish(c.finish_reason)}
                        for i, c in enumerate(completions)],
            "usage": _usage(sum(c.prompt_tokens for c in completions),
                            sum(c.completion_tokens for c in completions))}


async def chat_chunks(body, pending: Pending, prompt_tokens: int, include_usage: bool):
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.model, "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                **extra}

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    async for kind, value in pending.aevents():
        if kind == "delta":
            yield chunk({"content": value})
        elif kind == "done":
            yield chunk({}, _finish(value.finish_reason))
            if include_usage:
                yield {**head, "choices": [], "usage": _usage(value.prompt_tokens, value.completion_tokens)}


async def completion_chunks(body, pending: Pending, prompt_tokens: int, include_usage: bool):
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None = None) -> dict:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}

    async for kind, value in pending.aevents():
        if kind == "delta":
            yield chunk(value)
        elif kind == "done":
            yield chunk("", _finish(value.finish_reason))
            if include_usage:
                yield {**head, "choices": [], "usage": _usage(value.prompt_tokens, value.completion_tokens)}


async def sse(chunks, pending: Pending):
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. A failure mid-stream is sent as an
    error event (the status line has gone out already); a client that goes away cancels the generation."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - reported to the client in OpenAI's error shape
        log.exception("streaming failed")
        err = e if isinstance(e, OpenAIError) else OpenAIError("The server failed while streaming.", status=500,
                                                                  type="server_error")
        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'param': err.param, 'code': err.code}})}\n\n"
    finally:
        pending.cancel()
