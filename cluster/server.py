"""The gRPC server (asyncio) of the splitserve.v1 API, on top of the `Cluster` API.

Status codes: INVALID_ARGUMENT (the message starts with the offending field's path), ALREADY_EXISTS (request id in
use), RESOURCE_EXHAUSTED (admission queue full), UNAVAILABLE (not ready, draining, or an instance failed),
DEADLINE_EXCEEDED / CANCELLED (the request is aborted and its KV blocks freed on both sides), UNAUTHENTICATED.

The server listens before the model is loaded: health reports liveness ("" SERVING) at once and readiness
(`splitserve.v1.InferenceService`) once every instance is up. SIGTERM drains: readiness goes NOT_SERVING, new
requests get UNAVAILABLE, in-flight requests finish (up to `drain_timeout_s`, then they are aborted)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.cluster.cluster import Cluster, QueueFull
from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.metrics import ServerMetrics
from splitserve.proto.v1 import inference_pb2 as pb
from splitserve.workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
MAX_REQUEST_ID_LEN = 256
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens
CLUSTER_SHUTDOWN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051              # 0 picks a free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    metrics_host: str | None = None  # default: host
    auth_token: str | None = None    # clients send `authorization: Bearer <token>`; health stays open
    tls_cert: str | None = None      # PEM files; both or neither
    tls_key: str | None = None
    drain_timeout_s: float = 30.0

    def __post_init__(self):
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536):
                raise ValueError(f"{name}: must be a port number in [0, 65535], got {value!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert/tls_key: give both files or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path}")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token: must not be empty")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s: must be >= 0, got {self.drain_timeout_s}")


class InvalidArgument(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# ------------------------------------------------------------------------------------------- request checks
def _wire_twin():
    """GenerateRequest with every string field as bytes: parses anything the real type would reject for invalid
    UTF-8, so the offending field can be named."""
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "splitserve/proto/v1/inference_wire.proto"
    fdp.package = "splitserve.v1.wire"
    fdp.ClearField("service")
    for msg in fdp.message_type:
        for f in msg.field:
            if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            if f.type_name.startswith(".splitserve.v1."):
                f.type_name = ".splitserve.v1.wire." + f.type_name.rsplit(".", 1)[1]
    for enum in fdp.enum_type:  # keep enum value names unique in the twin's package
        for value in enum.value:
            value.name = "WIRE_" + value.name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("splitserve.v1.wire.GenerateRequest"))


_WireGenerateRequest = _wire_twin()


def _find_bad_utf8(msg, prefix: str = "") -> str | None:
    for field, value in msg.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == field.TYPE_BYTES:
            values = value if field.is_repeated else [value]
            for i, v in enumerate(values):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{path}[{i}]" if field.is_repeated else path
        elif field.type == field.TYPE_MESSAGE and not field.is_repeated:
            found = _find_bad_utf8(value, f"{path}.")
            if found:
                return found
    return None


@dataclass
class _Malformed:
    """Stands in for a request the protobuf parser rejected; the handler answers INVALID_ARGUMENT."""

    error: str


def parse_generate_request(data: bytes):
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        pass
    try:
        field = _find_bad_utf8(_WireGenerateRequest.FromString(data))
    except Exception:  # a deserializer that raises makes gRPC answer INTERNAL; never let it
        field = None
    if field is not None:
        field = {"text": "prompt.text"}.get(field, field)
        return _Malformed(f"{field}: is not valid UTF-8")
    return _Malformed("request: is not a valid GenerateRequest message")


def sampling_from_proto(p: pb.SamplingParams, *, vocab_size: int, default_max_tokens: int) -> SamplingParams:
    """SamplingParams from the wire (unset optional fields take their defaults); errors name `sampling.<field>`."""
    for i, t in enumerate(p.stop_token_ids):
        if t >= vocab_size:
            raise InvalidArgument(f"sampling.stop_token_ids[{i}]", f"{t} is outside the vocabulary (size {vocab_size})")
    for i, s in enumerate(p.stop):
        if not s:
            raise InvalidArgument(f"sampling.stop[{i}]", "must not be empty")
    if p.HasField("max_tokens") and p.max_tokens == 0:
        raise InvalidArgument("sampling.max_tokens", "must be >= 1, got 0")
    kwargs = dict(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else default_max_tokens,
        min_tokens=p.min_tokens,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos,
        seed=p.seed if p.HasField("seed") else None, include_stop_str_in_output=p.include_stop_str_in_output)
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as e:
        text = str(e)
        name = text.split(" ", 1)[0].rstrip(":")
        if name in kwargs:  # the dataclass's messages start with the field name
            raise InvalidArgument(f"sampling.{name}", text[len(name):].lstrip(": ")) from None
        raise InvalidArgument("sampling", text) from None


# ------------------------------------------------------------------------------------------------ auth
class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every method but health needs `authorization: Bearer <token>` (probes cannot send headers)."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self.expected):
            return handler
        return _denied(handler, "authorization: missing or wrong bearer token" if given
                       else "authorization: a bearer token is required")


def _denied(handler, message: str):
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny_unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)


# ---------------------------------------------------------------------------------------------- server
def _timing(metrics: dict) -> pb.Timing:
    fields = ("queue_s", "ttft_s", "mean_itl_s", "prefill_s", "kv_transfer_s", "decode_s", "e2e_s")
    return pb.Timing(**{k: float(metrics[k]) for k in fields if metrics.get(k) is not None})


class InferenceServer:
    """Serves one deployment. Give `config` to have the server build (and own) its Cluster, or `cluster` to serve
    an existing one (left running on stop)."""

    def __init__(self, config: ClusterConfig | dict | str | None = None, options: ServerOptions | None = None,
                 cluster: Cluster | None = None):
        self.config = config
        self.options = options or ServerOptions()
        self.cluster = cluster
        self.owns_cluster = cluster is None
        self.ready = False
        self.draining = False
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics: ServerMetrics | None = None
        self.active: dict[str, asyncio.Task] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None

    # ------------------------------------------------------------------------------------ life cycle
    async def start(self) -> int:
        """Binds and starts answering (health, reflection; the API answers UNAVAILABLE until `load`)."""
        opts = self.options
        interceptors = [_AuthInterceptor(opts.auth_token)] if opts.auth_token else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{opts.host}:{opts.port}"
        try:
            if opts.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(opts.tls_key).read_bytes(),
                                                      Path(opts.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"port: cannot listen on {address}: {e}") from None
        if not self.port:
            raise OSError(f"port: cannot listen on {address} (in use?)")
        await self.server.start()
        log.info("listening on %s:%d (%s)", opts.host, self.port, "TLS" if opts.tls_cert else "plaintext")
        return self.port

    async def load(self) -> None:
        """Starts the cluster (unless one was given), then reports ready."""
        if self.cluster is None:
            loop = asyncio.get_running_loop()
            self.cluster = await loop.run_in_executor(None, Cluster, self.config)
        cfg = self.cluster.config
        self.model_name = Path(cfg.model).name or cfg.model
        self.roles = {name: inst.spec.role for name, inst in self.cluster.instances.items()}
        self.metrics = ServerMetrics(self.model_name, snapshot=self._metrics_snapshot)
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.options.metrics_host or self.options.host,
                                                   self.options.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.options.metrics_host or self.options.host,
                     self.metrics_port)
        self.ready = True
        if not self.draining:
            await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, timeout: float | None = None) -> int:
        """Stops admitting, waits for in-flight requests (then aborts what is left); returns how many were aborted."""
        self.draining = True
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        timeout = self.options.drain_timeout_s if timeout is None else timeout
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return 0
        except asyncio.TimeoutError:
            left = list(self.active)
            log.warning("drain: %d requests still running after %.0fs; aborting them", len(left), timeout)
            for request_id in left:
                await self.cluster.abort_async(request_id)
            await asyncio.wait_for(self._idle.wait(), 10)
            return len(left)

    async def stop(self, drain: bool = True) -> None:
        if drain and self.ready:
            await self.drain()
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace=2)
        if self.metrics is not None:
            self.metrics.close()
        if self.owns_cluster and self.cluster is not None:
            await self._shutdown_cluster()
        self._stopped.set()

    async def _shutdown_cluster(self, timeout: float = CLUSTER_SHUTDOWN_TIMEOUT_S) -> None:
        """Shuts the cluster down from a daemon thread, waiting a bounded time: when Ray's own processes are
        already gone (a signal sent to the whole process group, as Ctrl-C or `timeout` do), Ray calls never return
        and must not keep this process alive."""
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def run():
            try:
                self.cluster.shutdown()
            except Exception as e:
                log.error("cluster shutdown failed: %s", e)
            finally:
                loop.call_soon_threadsafe(done.set)

        threading.Thread(target=run, name="cluster-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except asyncio.TimeoutError:
            log.error("cluster shutdown did not finish in %.0fs (are Ray's processes already stopped?); exiting "
                      "without it", timeout)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ----------------------------------------------------------------------------------------- handlers
    def _handlers(self):
        methods = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, request_deserializer=parse_generate_request,
                response_serializer=pb.GenerateResponse.SerializeToString),
            "Abort": grpc.unary_unary_rpc_method_handler(
                self.Abort, request_deserializer=pb.AbortRequest.FromString,
                response_serializer=pb.AbortResponse.SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
                response_serializer=pb.ModelInfo.SerializeToString),
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                self.GetServerInfo, request_deserializer=pb.GetServerInfoRequest.FromString,
                response_serializer=pb.ServerInfo.SerializeToString),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    async def _require_ready(self, context) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica")
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is starting: the model is not loaded yet")

    def _validate(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        cluster = self.cluster
        vocab = cluster.model_config.vocab_size
        which = request.WhichOneof("prompt")
        if which is None:
            raise InvalidArgument("prompt", "set text or token_ids")
        if which == "text":
            if not request.text:
                raise InvalidArgument("prompt.text", "must not be empty")
            if cluster.tokenizer is None:
                raise InvalidArgument("prompt.text", "this model has no tokenizer; send prompt.token_ids")
            ids = cluster.encode(request.text)
            if not ids:
                raise InvalidArgument("prompt.text", "encodes to no tokens")
        else:
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidArgument("prompt.token_ids", "must not be empty")
            for i, t in enumerate(ids):
                if t >= vocab:
                    raise InvalidArgument(f"prompt.token_ids[{i}]", f"{t} is outside the vocabulary (size {vocab})")
        context_len = cluster.max_model_len
        if len(ids) >= context_len:
            raise InvalidArgument("prompt", f"{len(ids)} tokens leave no room for output in the context "
                                            f"({context_len} tokens)")
        params = sampling_from_proto(request.sampling, vocab_size=vocab,
                                     default_max_tokens=min(DEFAULT_MAX_TOKENS, context_len - len(ids)))
        if len(ids) + params.max_tokens > context_len:
            raise InvalidArgument("sampling.max_tokens", f"prompt ({len(ids)} tokens) + max_tokens "
                                                         f"({params.max_tokens}) exceeds the context ({context_len})")
        if len(request.request_id) > MAX_REQUEST_ID_LEN:
            raise InvalidArgument("request_id", f"longer than {MAX_REQUEST_ID_LEN} characters")
        return ids, params

    async def Generate(self, request, context):
        if isinstance(request, _Malformed):
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, request.error)
        await self._require_ready(context)
        try:
            ids, params = self._validate(request)
        except InvalidArgument as e:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.active:
            await self._fail(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already running")
        self.active[request_id] = asyncio.current_task()
        self._idle.clear()
        chunks = self.cluster.stream(ids, params, request_id)
        try:
            async for msg in self._responses(chunks, request_id, request.stream, context):
                yield msg
        except asyncio.CancelledError:
            expired = context.time_remaining() is not None and context.time_remaining() <= 0
            self.metrics.observe_failed("DEADLINE_EXCEEDED" if expired else "CANCELLED")
            raise
        finally:
            await chunks.aclose()  # aborts the request on every instance if it is still running
            self.active.pop(request_id, None)
            if not self.active:
                self._idle.set()

    async def _responses(self, chunks, request_id: str, stream: bool, context):
        try:
            first = await chunks.__anext__()
        except QueueFull as e:
            await self._fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"admission queue: {e}")
        except ValueError as e:  # checks the cluster makes itself (a backstop to _validate)
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
                    self.metrics.observe_itl(now - last_token_at, self._decode_role())
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
        self.metrics.observe_finished(m, chunk.finish_reason, self.roles.get(m.get("prefill_instance")),
                                      self.roles.get(m.get("decode_instance")))
        ids = (tokens + chunk.token_ids) if not stream else chunk.token_ids
        body = "".join(text) + chunk.text if not stream else chunk.text
        yield pb.GenerateResponse(
            request_id=request_id, token_ids=ids, text=body, finished=True, finish_reason=FINISH[chunk.finish_reason],
            usage=pb.Usage(prompt_tokens=m.get("prompt_tokens", 0), completion_tokens=m.get("completion_tokens", 0)),
            timing=_timing(m), prefill_instance=m.get("prefill_instance") or "",
            decode_instance=m.get("decode_instance") or "", attempts=m.get("attempts", 0))

    def _decode_role(self) -> str:
        return "colocated" if self.cluster.router.colocated else "decode"

    async def _fail(self, context, code: grpc.StatusCode, message: str):
        if self.metrics is not None:
            self.metrics.observe_failed(code.name)
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
                            hidden_size=mc.hidden_size)

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        info = pb.ServerInfo(version=_version(), ready=self.ready, draining=self.draining)
        if self.cluster is None or not self.ready:
            return info
        stats = await self.cluster.stats_async()
        roles: dict[str, pb.RoleSummary] = {}
        used = total = 0
        for name, s in stats["instances"].items():
            info.instances.append(pb.InstanceInfo(
                name=name, role=s["role"], tp=s["tp"], sp=s["sp"], num_blocks=s.get("num_blocks", 0),
                free_blocks=s.get("free_blocks", 0), kv_usage=s.get("usage", 0.0), running=s.get("running", 0),
                waiting=s.get("waiting", 0)))
            summary = roles.setdefault(s["role"], pb.RoleSummary(role=s["role"], tp=s["tp"], sp=s["sp"]))
            summary.instances += 1
            if s["role"] in ("decode", "colocated"):
                used += s.get("num_blocks", 0) - s.get("free_blocks", 0)
                total += s.get("num_blocks", 0)
        info.roles.extend(roles.values())
        info.queue_depth = stats["requests"].get("queued", 0)
        info.max_queue_depth = self.cluster.config.max_queued_requests
        info.requests_in_flight = sum(stats["requests"].values())
        info.kv_usage = used / total if total else 0.0
        return info

    def _metrics_snapshot(self) -> dict | None:
        cluster = self.cluster
        if cluster is None or not cluster._running:
            return None
        return cluster.stats(timeout=5)


def _version() -> str:
    try:
        return metadata.version("splitserve")
    except metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------ entry points
async def serve(config: ClusterConfig | dict | str | None = None, options: ServerOptions | None = None,
                on_ready=None) -> None:
    """Runs until SIGTERM or SIGINT, then drains and stops (the `splitserve serve` command)."""
    server = InferenceServer(config, options)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def install_signal_handlers():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)

    install_signal_handlers()
    await server.start()
    try:
        load = asyncio.ensure_future(server.load())
        done, _ = await asyncio.wait({load, asyncio.ensure_future(stopping.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            load.result()  # start-up errors surface here
            # Starting Ray installs a native SIGTERM handler that aborts the process 3 s later; ours again, so a
            # drain may take as long as it needs.
            install_signal_handlers()
            if on_ready is not None:
                on_ready(server)
            await stopping.wait()
            log.info("signal received: draining")
        else:
            log.info("signal received while loading: stopping")
            await load  # the cluster cannot be interrupted half-started; let it finish so it can be shut down
    finally:
        await server.stop(drain=True)


class BackgroundServer:
    """A server on its own event loop in a daemon thread (tests, notebooks). `start()` returns when it is ready."""

    def __init__(self, config=None, options: ServerOptions | None = None, cluster: Cluster | None = None):
        self.server = InferenceServer(config, options, cluster)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-server", daemon=True)

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, load: bool = True) -> "BackgroundServer":
        self.thread.start()
        self._run(self.server.start())
        if load:
            self.load()
        return self

    def load(self) -> None:
        self._run(self.server.load())

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"{self.server.options.host}:{self.server.port}"

    def drain(self, timeout: float | None = None) -> int:
        return self._run(self.server.drain(timeout))

    def call(self, coro, timeout: float | None = None):
        """Runs a coroutine on the server's loop (tests)."""
        return self._run(coro, timeout)

    def stop(self, drain: bool = False) -> None:
        if not self.thread.is_alive():
            return
        try:
            self._run(self.server.stop(drain=drain), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
