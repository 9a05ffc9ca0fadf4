"""The RPCs of `splitserve.v1.InferenceService` (Generate, Abort, GetModelInfo, GetServerInfo, Scale) over a
server's Cluster: admission by the server's readiness and drain state, streaming, final timing and usage, status
codes."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from importlib import metadata

import grpc

from splitserve.cluster.cluster import QueueFull
from splitserve.cluster.scaling import NotEnoughDevices, ScaleError, ScaleInProgress
from splitserve.cluster.server_validation import InvalidArgument, Malformed, parse_generate_request, validate_generate
from splitserve.proto.v1 import inference_pb2 as pb
from splitserve.workers.hf_config import resolve_backend

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


class InferenceService:
    """The API of one InferenceServer. It reads the server's state (ready, draining, cluster, metrics, roles) and
    owns the bookkeeping of the Generate calls in flight, which the server's drain waits on."""

    def __init__(self, server):
        self.server = server
        self.active: dict[str, asyncio.Task] = {}  # request id -> the task streaming it
        self.idle = asyncio.Event()  # set while no Generate call is in flight
        self.idle.set()

    @property
    def cluster(self):
        return self.server.cluster

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The service's methods, to add to a grpc.aio server."""
        unary = {"Abort": (pb.AbortRequest, pb.AbortResponse),
                 "GetModelInfo": (pb.GetModelInfoRequest, pb.ModelInfo),
                 "GetServerInfo": (pb.GetServerInfoRequest, pb.ServerInfo),
                 "Scale": (pb.ScaleRequest, pb.ScaleResponse)}
        methods = {name: grpc.unary_unary_rpc_method_handler(getattr(self, name), request_deserializer=req.FromString,
                                                             response_serializer=resp.SerializeToString)
                   for name, (req, resp) in unary.items()}
        methods["Generate"] = grpc.unary_stream_rpc_method_handler(
            self.Generate, request_deserializer=parse_generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    async def _require_ready(self, context) -> None:
        if self.server.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica")
        if not self.server.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is starting: the model is not loaded yet")

    async def Generate(self, request, context):
        if isinstance(request, Malformed):
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, request.error)
        await self._require_ready(context)
        try:  # tokenising a long prompt in a worker thread: health checks and other streams go on meanwhile
            ids, params = await asyncio.to_thread(validate_generate, request, self.cluster)
        except InvalidArgument as e:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.active:
            await self._fail(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already running")
        self.active[request_id] = asyncio.current_task()
        self.idle.clear()
        chunks = self.cluster.stream(ids, params, request_id)
        try:
            async for msg in self._responses(chunks, request_id, request.stream, context):
                yield msg
        except asyncio.CancelledError:
            expired = context.time_remaining() is not None and context.time_remaining() <= 0
            self.server.metrics.observe_failed("DEADLINE_EXCEEDED" if expired else "CANCELLED")
            raise
        finally:
            await chunks.aclose()  # aborts the request on every instance if it is still running
            self.active.pop(request_id, None)
            if not self.active:
                self.idle.set()

    async def _responses(self, chunks, request_id: str, stream: bool, context):
        try:
            first = await chunks.__anext__()
        except QueueFull as e:
            await self._fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"admission queue: {e}")
        except ValueError as e:  # checks the cluster makes itself (a backstop to validate_generate)
            code = (grpc.StatusCode.ALREADY_EXISTS if str(e).startswith("request_id:")
                    else grpc.StatusCode.INVALID_ARGUMENT)
            await self._fail(context, code, str(e))
        tokens: list[int] = []
        text: list[str] = []
        last_token_at = None
        chunk = first
        while True:
            if chunk.token_ids:
                now = time.perf_counter()
                if last_token_at is not None and chunk.finish_reason != "error":
                    self.server.metrics.observe_itl(now - last_token_at, self._decode_role())
                last_token_at = now
            if chunk.finished:
                break
            if stream:
                yield pb.GenerateResponse(request_id=request_id, token_ids=chunk.token_ids, text=chunk.text)
            else:
                tokens += chunk.token_ids
                text.append(chunk.text)
            chunk = await chunks.__anext__()
        if chunk.error is not None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, f"request failed: {chunk.error}")
        m = chunk.metrics or {}
        roles = self.server.roles
        self.server.metrics.observe_finished(m, chunk.finish_reason, roles.get(m.get("prefill_instance")),
                                             roles.get(m.get("decode_instance")))
        ids = (tokens + chunk.token_ids) if not stream else chunk.token_ids
        body = "".join(text) + chunk.text if not stream else chunk.text
        yield pb.GenerateResponse(
            request_id=request_id, token_ids=ids, text=body, finished=True, finish_reason=FINISH[chunk.finish_reason],
            usage=pb.Usage(prompt_tokens=m.get("prompt_tokens", 0), completion_tokens=m.get("completion_tokens", 0),
                           cached_tokens=m.get("cached_tokens", 0)),
            timing=_timing(m), prefill_instance=m.get("prefill_instance") or "",
            decode_instance=m.get("decode_instance") or "", attempts=m.get("attempts", 0))

    def _decode_role(self) -> str:
        return "colocated" if self.cluster.colocated else "decode"

    async def _fail(self, context, code: grpc.StatusCode, message: str):
        if self.server.metrics is not None:
            self.server.metrics.observe_failed(code.name)
        await context.abort(code, message)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        await self._require_ready(context)
        if not request.request_id:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        return pb.AbortResponse(found=await self.cluster.abort_async(request.request_id))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        await self._require_ready(context)
        c = self.cluster
        mc = c.model_config
        return pb.ModelInfo(model=c.config.model, architecture=mc.architecture, max_context=c.max_model_len,
                            vocab_size=mc.vocab_size, eos_token_ids=list(mc.eos_token_ids),
                            has_tokenizer=c.tokenizer is not None, dtype=c.config.dtype, num_layers=mc.num_layers,
                            hidden_size=mc.hidden_size, has_chat_template=c.chat_template is not None,
                            backend=resolve_backend(c.config.engine.backend, mc))

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        info = pb.ServerInfo(version=_version(), ready=self.server.ready, draining=self.server.draining)
        if self.cluster is None or not self.server.ready:
            return info
        stats = await self.cluster.stats_async()
        roles: dict[str, pb.RoleSummary] = {}
        used = total = 0
        for name, s in stats["instances"].items():
            info.instances.append(pb.InstanceInfo(
                name=name, role=s["role"], tp=s["tp"], sp=s["sp"], num_blocks=s.get("num_blocks", 0),
                free_blocks=s.get("free_blocks", 0), kv_usage=s.get("usage", 0.0), running=s.get("running", 0),
                waiting=s.get("waiting", 0), state=s.get("state", ""), restarts=s.get("restarts", 0),
                last_error=s.get("last_error") or "", prefix_cache_hit_tokens=s.get("prefix_hit_tokens", 0),
                prefix_cache_query_tokens=s.get("prefix_query_tokens", 0), busy_seconds=s.get("busy_s", 0.0),
                steps=s.get("steps", 0)))
            summary = roles.setdefault(s["role"], pb.RoleSummary(role=s["role"], tp=s["tp"], sp=s["sp"]))
            summary.instances += s.get("state", "serving") == "serving"
            if s["role"] in ("decode", "colocated"):
                used += s.get("num_blocks", 0) - s.get("free_blocks", 0)
                total += s.get("num_blocks", 0)
        info.roles.extend(roles.values())
        info.queue_depth = stats["requests"].get("queued", 0)
        info.max_queue_depth = self.cluster.config.max_queued_requests
        info.requests_in_flight = sum(stats["requests"].values())
        info.kv_usage = used / total if total else 0.0
        info.migrations = sum(stats.get("migrations", {}).values())
        return info


    async def Scale(self, request: pb.ScaleRequest, context) -> pb.ScaleResponse:
        await self._require_ready(context)
        counts = {role: getattr(request, role) if request.HasField(role) else None
                  for role in ("prefill", "decode", "colocated")}
        drain = request.drain_timeout_s if request.HasField("drain_timeout_s") else 30.0
        if not drain >= 0:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, "drain_timeout_s: must be >= 0")
        try:
            result = await self.cluster.scale_async(drain_timeout_s=drain, **counts)
        except NotEnoughDevices as e:
            await self._fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ScaleInProgress as e:
            await self._fail(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ScaleError as e:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # a launch that failed: the cluster keeps the instances it had
            log.error("scale failed: %r", e)
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, f"scale failed: {type(e).__name__}: {e}")
        self.server.roles = self.cluster.roles()
        return pb.ScaleResponse(added=result.added, removed=result.removed,
                                roles=[pb.RoleSummary(role=r, instances=n) for r, n in result.instances.items()])


def _timing(metrics: dict) -> pb.Timing:
    fields = ("queue_s", "ttft_s", "mean_itl_s", "prefill_s", "kv_transfer_s", "decode_s", "e2e_s")
    return pb.Timing(**{k: float(metrics[k]) for k in fields if metrics.get(k) is not None})


def _version() -> str:
    try:
        return metadata.version("splitserve")
    except metadata.PackageNotFoundError:
        return "unknown"
