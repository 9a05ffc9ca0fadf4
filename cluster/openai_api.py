"""OpenAI-compatible HTTP API beside gRPC, on the same server process, Cluster, validation and metrics: GET /health,
GET /v1/models, POST /v1/completions (one prompt, text or token ids) and POST /v1/chat/completions (messages
rendered with the model's chat template), each streamed as server-sent events ending in `data: [DONE]` on request,
with `stream_options.include_usage`. FastAPI on uvicorn, in the server's own event loop.
Errors take OpenAI's shape {"error": {message, type, param, code}} with its statuses (400, 401, 404, 429, 503);
a client that disconnects aborts its request, which frees its KV on every instance."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from splitserve.cluster.cluster import QueueFull
from splitserve.cluster.server_validation import InvalidArgument, validate_generate
from splitserve.proto.client import build_request

FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}
# OpenAI's names for our sampling fields where they differ, and what we refuse rather than silently ignore.
ACCEPTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
            "frequency_penalty", "stream", "stream_options", "n", "user", "logprobs", "echo", "best_of", "suffix",
            # vLLM-style extensions
            "top_k", "min_p", "min_tokens", "repetition_penalty", "ignore_eos", "stop_token_ids",
            "include_stop_str_in_output"}
CHAT_ACCEPTED = (ACCEPTED - {"prompt", "echo", "best_of", "suffix"}) | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls"}
SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
            "min_tokens", "repetition_penalty", "ignore_eos", "stop_token_ids", "include_stop_str_in_output")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _param_of(field: str) -> str:
    """Our validation's field path in OpenAI's terms: sampling.max_tokens -> max_tokens, prompt.text -> prompt."""
    head = field.split("[", 1)[0]
    if head.startswith("prompt.messages"):
        return "messages"
    return head.split(".", 1)[1] if head.startswith("sampling.") else head.split(".", 1)[0]


def _refuse_unsupported(body: dict, accepted: set, allowed: tuple) -> None:
    unknown = sorted(set(body) - accepted)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, ok in allowed:
        value = body.get(name)
        if value is not None and (value is not ok if ok in (None, False) else value != ok):
            raise ApiError(400, f"{name}: only {ok!r} is supported", name)


def _completion_prompt(body: dict):
    _refuse_unsupported(body, ACCEPTED, (("n", 1), ("best_of", 1), ("logprobs", None), ("echo", False),
                                         ("suffix", None)))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ApiError(400, "prompt: one prompt per request (a string or a list of token ids)", "prompt")
    if not isinstance(prompt, (str, list)):
        raise ApiError(400, "prompt: required, a string or a list of token ids", "prompt")
    return prompt


def _content(content, i: int) -> str:
    """A message's text: a string, or a list of text parts (other part types are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, got {kind!r}",
                               "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content: must be a string or a list of text parts", "messages")


def _chat_messages(body: dict) -> list[dict]:
    _refuse_unsupported(body, CHAT_ACCEPTED, (("n", 1), ("logprobs", False), ("top_logprobs", None)))
    if body.get("tools"):
        raise ApiError(400, "tools: tool calling is not supported", "tools")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, "response_format: only {'type': 'text'} is supported", "response_format")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: required, a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ApiError(400, f"messages[{i}].role: required, a non-empty string", "messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is not None:
        raise ApiError(400, "max_tokens: set max_tokens or max_completion_tokens, not both", "max_tokens")
    return out


def _generate_request(body: dict, chat: bool = False):
    """The gRPC request the body stands for, so that both front ends share one validation."""
    prompt = _chat_messages(body) if chat else _completion_prompt(body)
    if chat and body.get("max_completion_tokens") is not None:
        body = body | {"max_tokens": body["max_completion_tokens"]}
    sampling = {k: body[k] for k in SAMPLING if body.get(k) is not None}
    stop = body.get("stop")
    if stop is not None:
        sampling["stop"] = [stop] if isinstance(stop, str) else stop
    try:
        return build_request(prompt, stream=False, **sampling)
    except (ValueError, TypeError) as e:  # a value of the wrong type for its field
        raise ApiError(400, str(e), next(iter(sampling), None)) from None


def embedded_uvicorn(app, host: str, port: int):
    """A uvicorn server for an event loop the caller runs; the caller's own signal handling (drain) stays."""
    import contextlib

    import uvicorn

    class Embedded(uvicorn.Server):
        def install_signal_handlers(self) -> None:
            pass

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Embedded(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                   timeout_graceful_shutdown=2))


def create_app(server) -> FastAPI:
    app = FastAPI(title="splitserve", docs_url=None, redoc_url=None, openapi_url=None)
    token = server.options.auth_token

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        if server.metrics is not None:
            server.metrics.observe_failed(f"HTTP_{exc.status}")
        return exc.response()

    def authorize(request: Request) -> None:
        if token and request.headers.get("authorization") != f"Bearer {token}":
            raise ApiError(401, "Incorrect API key provided.", kind="invalid_request_error", code="invalid_api_key")

    def ready() -> None:
        if server.draining or not server.ready or not server.cluster.ready:
            raise ApiError(503, "the server is not ready (starting, draining, or a role has no live instance)",
                           kind="server_error", code="unavailable")

    @app.get("/health")
    async def health():
        ok = server.ready and not server.draining and server.cluster is not None and server.cluster.ready
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        ready()
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": int(server.started),
                                            "owned_by": "splitserve"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, chat=True)

    async def _serve(request: Request, chat: bool):
        authorize(request)
        ready()
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        if body.get("model") not in (None, server.model_name):
            raise ApiError(404, f"The model `{body.get('model')}` does not exist (this server serves "
                                f"`{server.model_name}`).", "model", code="model_not_found")
        try:  # tokenising in a worker thread, as for gRPC
            ids, params = await asyncio.to_thread(validate_generate, _generate_request(body, chat), server.cluster)
        except InvalidArgument as e:
            raise ApiError(400, str(e), _param_of(e.field)) from None
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        chunks = server.cluster.stream(ids, params, completion_id)
        try:
            first = await chunks.__anext__()
        except QueueFull as e:
            await chunks.aclose()
            raise ApiError(429, f"admission queue: {e}", kind="rate_limit_error", code="queue_full") from None
        except ValueError as e:
            await chunks.aclose()
            raise ApiError(400, str(e), _param_of(str(e).split(":", 1)[0])) from None
        shape = CHAT if chat else COMPLETION
        head = {"id": completion_id, "created": int(time.time()), "model": server.model_name}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_events(server, chunks, first, head, usage, shape),
                                     media_type="text/event-stream")
        return await _complete(server, chunks, first, head, shape)

    return app


class _Shape:
    """How one endpoint words its answers: the object names and a choice around the text."""

    def __init__(self, whole: str, chunk: str, chat: bool):
        self.whole, self.chunk, self.chat = whole, chunk, chat

    def choice(self, text: str, reason: str | None) -> dict:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

    def delta(self, text: str, reason: str | None, first: bool) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}


COMPLETION = _Shape("text_completion", "text_completion", chat=False)
CHAT = _Shape("chat.completion", "chat.completion.chunk", chat=True)


async def _complete(server, chunks, chunk, head: dict, shape: _Shape) -> JSONResponse:
    text = []
    try:
        while True:
            text.append(chunk.text)
            if chunk.finished:
                break
            chunk = await chunks.__anext__()
    finally:
        await chunks.aclose()  # aborts the request if the client went away meanwhile
    if chunk.error is not None:
        raise ApiError(503, f"request failed: {chunk.error}", kind="server_error", code="unavailable")
    m = chunk.metrics or {}
    _observe(server, chunk)
    return JSONResponse({**head, "object": shape.whole,
                         "choices": [shape.choice("".join(text), FINISH.get(chunk.finish_reason))],
                         "usage": _usage(m)})


async def _events(server, chunks, chunk, head: dict, include_usage: bool, shape: _Shape):
    """Server-sent events; leaving early (the client disconnected) closes `chunks`, which aborts the request."""
    head = {**head, "object": shape.chunk}
    first = True
    try:
        while True:
            reason = FINISH.get(chunk.finish_reason) if chunk.finished else None
            if chunk.error is not None:
                error = {"error": {"message": f"request failed: {chunk.error}", "type": "server_error",
                                   "param": None, "code": "unavailable"}}
                yield f"data: {json.dumps(error)}\n\n"
                break
            if chunk.text or chunk.finished or (first and shape.chat):
                choice = shape.delta(chunk.text, reason, first)
                first = False
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
            if chunk.finished:
                _observe(server, chunk)
                if include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(chunk.metrics or {})})}\n\n"
                break
            chunk = await chunks.__anext__()
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()


def _usage(m: dict) -> dict:
    prompt, completion = m.get("prompt_tokens", 0), m.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": m.get("cached_tokens", 0)}}


def _observe(server, chunk) -> None:
    if server.metrics is not None:
        m = chunk.metrics or {}
        roles = server.roles
        server.metrics.observe_finished(m, chunk.finish_reason, roles.get(m.get("prefill_instance")),
                                        roles.get(m.get("decode_instance")))
