"""Python clients of the splitserve.v1 API: `Client` (blocking) and `AsyncClient` (asyncio). grpc + protobuf only.

    with Client("127.0.0.1:50051") as c:
        out = c.generate("Hello", max_tokens=32, temperature=0)
        for msg in c.stream("Hello", max_tokens=32):
            print(msg.text, end="")

Sampling options are the fields of `splitserve.v1.SamplingParams` given as keyword arguments; an unknown name raises
ValueError here, before anything is sent."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.proto.v1 import inference_pb2 as pb
from splitserve.proto.v1 import inference_pb2_grpc as pb_grpc

SERVICE_NAME = "splitserve.v1.InferenceService"
DEFAULT_TARGET = "127.0.0.1:50051"
FINISH_REASONS = {pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_STOP: "stop",
                  pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
_TIMING_FIELDS = ("queue_s", "ttft_s", "mean_itl_s", "prefill_s", "kv_transfer_s", "decode_s", "e2e_s")


@dataclass
class GenerateResult:
    """One finished request as the client saw it. `ttft_s` / `itl_s` are measured here, at the client."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)
    server_timing: dict = field(default_factory=dict)  # the server's own measurements (seconds)
    prefill_instance: str = ""
    decode_instance: str = ""
    attempts: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive token-bearing messages
    e2e_s: float | None = None


def build_request(prompt: str | Sequence[int] | Sequence[dict], *, stream: bool, request_id: str | None = None,
                  **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from text, token ids or a chat (a list of {"role", "content"}, rendered by the server with
    the model's chat template) and SamplingParams fields given by name."""
    try:
        params = pb.SamplingParams(**sampling)
    except (ValueError, TypeError) as e:
        raise ValueError(f"sampling: {e}") from None
    req = pb.GenerateRequest(request_id=request_id or "", sampling=params, stream=stream)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and all(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: needs string role and content")
            req.messages.messages.add(role=m["role"], content=m["content"])
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    return req


def scale_request(prefill=None, decode=None, colocated=None, drain_timeout_s=None) -> pb.ScaleRequest:
    fields = {"prefill": prefill, "decode": decode, "colocated": colocated, "drain_timeout_s": drain_timeout_s}
    return pb.ScaleRequest(**{k: v for k, v in fields.items() if v is not None})


def timing_dict(timing: pb.Timing) -> dict:
    return {name: (getattr(timing, name) if name in ("mean_itl_s", "decode_s") or timing.HasField(name) else None)
            for name in _TIMING_FIELDS}


class ResultBuilder:
    """Folds a stream of GenerateResponse messages into a GenerateResult, timing them on arrival."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last: float | None = None
        self.result = GenerateResult("", [], "", None)
        self._text: list[str] = []

    def add(self, msg: pb.GenerateResponse) -> None:
        now = time.perf_counter()
        r = self.result
        r.request_id = msg.request_id
        if msg.token_ids:
            if r.ttft_s is None:
                r.ttft_s = now - self.start
            elif self.last is not None:
                r.itl_s.append(now - self.last)
            self.last = now
        r.token_ids.extend(msg.token_ids)
        self._text.append(msg.text)
        if msg.finished:
            r.finish_reason = FINISH_REASONS[msg.finish_reason]
            r.prompt_tokens, r.completion_tokens = msg.usage.prompt_tokens, msg.usage.completion_tokens
            r.cached_tokens = msg.usage.cached_tokens
            r.server_timing = timing_dict(msg.timing)
            r.prefill_instance, r.decode_instance, r.attempts = msg.prefill_instance, msg.decode_instance, msg.attempts
            r.e2e_s = now - self.start

    def done(self) -> GenerateResult:
        self.result.text = "".join(self._text)
        return self.result


def _credentials(tls_ca: str | bytes | None, tls: bool):
    if not tls and tls_ca is None:
        return None
    root = Path(tls_ca).read_bytes() if isinstance(tls_ca, (str, Path)) else tls_ca
    return grpc.ssl_channel_credentials(root_certificates=root)


class _Base:
    def __init__(self, target: str, token: str | None, timeout: float | None):
        self.target = target
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """Blocking client. `token` is sent as `authorization: Bearer <token>`; `tls_ca` (a PEM path or bytes) or
    `tls=True` (system roots) turns TLS on; `timeout` is the default per-call deadline in seconds."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls_ca: str | bytes | None = None,
                 tls: bool = False, timeout: float | None = None, options: Sequence[tuple] = ()):
        super().__init__(target, token, timeout)
        creds = _credentials(tls_ca, tls)
        self.channel = (grpc.secure_channel(target, creds, options=list(options)) if creds
                        else grpc.insecure_channel(target, options=list(options)))
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def stream(self, prompt: str | Sequence[int] | Sequence[dict], *, request_id: str | None = None, timeout: float | None = None,
               **sampling) -> Iterator[pb.GenerateResponse]:
        """Messages as they arrive; the last has finished=True. Closing the iterator early cancels the request."""
        call = self.stub.Generate(build_request(prompt, stream=True, request_id=request_id, **sampling),
                                  timeout=self._timeout(timeout), metadata=self.metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def generate(self, prompt: str | Sequence[int] | Sequence[dict], *, stream: bool = True, request_id: str | None = None,
                 timeout: float | None = None, **sampling) -> GenerateResult:
        """The whole result. With stream=True (default) tokens are timed as they arrive (ttft_s, itl_s)."""
        builder = ResultBuilder()
        req = build_request(prompt, stream=stream, request_id=request_id, **sampling)
        for msg in self.stub.Generate(req, timeout=self._timeout(timeout), metadata=self.metadata):
            builder.add(msg)
        return builder.done()

    def abort(self, request_id: str, timeout: float | None = None) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self._timeout(timeout),
                               metadata=self.metadata).found

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout), metadata=self.metadata)

    def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._timeout(timeout),
                                       metadata=self.metadata)

    def scale(self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None,
              drain_timeout_s: float | None = None, timeout: float | None = None) -> pb.ScaleResponse:
        """Sets the instance counts of the roles given (an admin call; slow: instances are launched or drained)."""
        return self.stub.Scale(scale_request(prefill, decode, colocated, drain_timeout_s),
                               timeout=self._timeout(timeout), metadata=self.metadata)

    def health(self, service: str = SERVICE_NAME, timeout: float | None = 5.0) -> str:
        """SERVING | NOT_SERVING | SERVICE_UNKNOWN ... (service "" = liveness, the API's name = readiness)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 600.0, interval: float = 0.2) -> None:
        """Blocks until readiness is SERVING; raises TimeoutError with the last status seen."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(SERVICE_NAME, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(interval)
        raise TimeoutError(f"server at {self.target} not ready after {timeout:.0f}s (last: {last})")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of `Client` (same arguments); create and use it inside one event loop."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls_ca: str | bytes | None = None,
                 tls: bool = False, timeout: float | None = None, options: Sequence[tuple] = ()):
        super().__init__(target, token, timeout)
        creds = _credentials(tls_ca, tls)
        self.channel = (grpc.aio.secure_channel(target, creds, options=list(options)) if creds
                        else grpc.aio.insecure_channel(target, options=list(options)))
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def stream(self, prompt: str | Sequence[int] | Sequence[dict], *, request_id: str | None = None,
                     timeout: float | None = None, **sampling) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.Generate(build_request(prompt, stream=True, request_id=request_id, **sampling),
                                  timeout=self._timeout(timeout), metadata=self.metadata)
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()

    async def generate(self, prompt: str | Sequence[int] | Sequence[dict], *, stream: bool = True, request_id: str | None = None,
                       timeout: float | None = None, **sampling) -> GenerateResult:
        builder = ResultBuilder()
        req = build_request(prompt, stream=stream, request_id=request_id, **sampling)
        async for msg in self.stub.Generate(req, timeout=self._timeout(timeout), metadata=self.metadata):
            builder.add(msg)
        return builder.done()

    async def abort(self, request_id: str, timeout: float | None = None) -> bool:
        resp = await self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self._timeout(timeout),
                                     metadata=self.metadata)
        return resp.found

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout),
                                            metadata=self.metadata)

    async def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._timeout(timeout),
                                             metadata=self.metadata)

    async def scale(self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None,
                    drain_timeout_s: float | None = None, timeout: float | None = None) -> pb.ScaleResponse:
        return await self.stub.Scale(scale_request(prefill, decode, colocated, drain_timeout_s),
                                     timeout=self._timeout(timeout), metadata=self.metadata)

    async def health(self, service: str = SERVICE_NAME, timeout: float | None = 5.0) -> str:
        resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
