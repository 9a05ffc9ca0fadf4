"""OpenAI-compatible HTTP API beside gRPC, on the same server process, Cluster, validation and metrics: GET /health,
GET /v1/models, POST /v1/completions (one prompt, text or token ids; streamed as server-sent events ending in
`data: [DONE]`, with `stream_options.include_usage`). FastAPI on uvicorn, in the server's own event loop.
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
    return head.split(".", 1)[1] if head.startswith("sampling.") else head.split(".", 1)[0]


def _generate_request(body: dict):
    """The gRPC request the body stands for, so that both front ends share one validation."""
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, allowed in (("n", 1), ("best_of", 1), ("logprobs", None), ("echo", False), ("suffix", None)):
        value = body.get(name)
        if value is not None and (value is not allowed if allowed in (None, False) else value != allowed):
            raise ApiError(400, f"{name}: only {allowed!r} is supported", name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ApiError(400, "prompt: one prompt per request (a string or a list of token ids)", "prompt")
    if not isinstance(prompt, (str, list)):
        raise ApiError(400, "prompt: required, a string or a list of token ids", "prompt")
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
            ids, params = await asyncio.to_thread(validate_generate, _generate_request(body), server.cluster)
        except InvalidArgument as e:
            raise ApiError(400, str(e), _param_of(e.field)) from None
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        chunks = server.cluster.stream(ids, params, completion_id)
        try:
            first = await chunks.__anext__()
        except QueueFull as e:
            await chunks.aclose()
            raise ApiError(429, f"admission queue: {e}", kind="rate_limit_error", code="queue_full") from None
        except ValueError as e:
            await chunks.aclose()
            raise ApiError(400, str(e), _param_of(str(e).split(":", 1)[0])) from None
        head = {"id": completion_id, "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_events(server, chunks, first, head, usage), media_type="text/event-stream")
        return await _complete(server, chunks, first, head)

    return app


async def _complete(server, chunks, chunk, head: dict) -> JSONResponse:
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
    return JSONResponse({**head, "choices": [{"index": 0, "text": "".join(text), "logprobs": None,
                                              "finish_reason": FINISH.get(chunk.finish_reason)}],
                         "usage": _usage(m)})


async def _events(server, chunks, chunk, head: dict, include_usage: bool):
    """Server-sent events; leaving early (the client disconnected) closes `chunks`, which aborts the request."""
    try:
        while True:
            reason = FINISH.get(chunk.finish_reason) if chunk.finished else None
            if chunk.error is not None:
                error = {"error": {"message": f"request failed: {chunk.error}", "type": "server_error",
                                   "param": None, "code": "unavailable"}}
                yield f"data: {json.dumps(error)}\n\n"
                break
            if chunk.text or chunk.finished:
                choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": reason}
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
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _observe(server, chunk) -> None:
    if server.metrics is not None:
        m = chunk.metrics or {}
        roles = server.roles
        server.metrics.observe_finished(m, chunk.finish_reason, roles.get(m.get("prefill_instance")),
                                        roles.get(m.get("decode_instance")))
