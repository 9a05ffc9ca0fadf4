"""The gRPC server (asyncio) of the splitserve.v1 API, on top of the `Cluster` API.

Status codes: INVALID_ARGUMENT (the message starts with the offending field's path), ALREADY_EXISTS (request id in
use), RESOURCE_EXHAUSTED (admission queue full), UNAVAILABLE (not ready, draining, or an instance failed),
DEADLINE_EXCEEDED / CANCELLED (the request is aborted and its KV blocks freed on both sides), UNAUTHENTICATED.

The server listens before the model is loaded: health reports liveness ("" SERVING) at once and readiness
(`splitserve.v1.InferenceService`) once every instance is up. SIGTERM drains: readiness goes NOT_SERVING, new
requests get UNAVAILABLE, in-flight requests finish (up to `drain_timeout_s`, then they are aborted).

This module is the server's life cycle (listen, load, drain, stop) and its entry points (`serve`,
`BackgroundServer`); the RPCs are in `server_handlers`, request checks in `server_validation`, bearer auth in
`server_auth`."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.cluster.cluster import Cluster
from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.metrics import ServerMetrics
from splitserve.cluster.server_auth import BearerAuthInterceptor
from splitserve.cluster.server_handlers import SERVICE_NAME, InferenceService

log = logging.getLogger(__name__)

CLUSTER_SHUTDOWN_TIMEOUT_S = 30.0
READINESS_INTERVAL_S = 0.25  # how often readiness is re-read from the fleet
MESSAGE_LIMIT_BYTES = 64 << 20  # gRPC's own cap on a request; prompts are held to max_prompt_bytes by validation


@dataclass(frozen=True)
class ServerOptions:
    """Where and how the server listens; checked once, at construction."""

    host: str = "127.0.0.1"
    port: int = 50051              # 0 picks a free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    metrics_host: str | None = None  # default: host
    auth_token: str | None = None    # clients send `authorization: Bearer <token>`; health stays open
    tls_cert: str | None = None      # PEM files; both or neither
    tls_key: str | None = None
    drain_timeout_s: float = 30.0
    http_port: int | None = None     # the OpenAI-compatible HTTP API (same host and token); 0 picks a free port

    def __post_init__(self):
        for name in ("port", "metrics_port", "http_port"):
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
        self.roles: dict[str, str] = {}  # instance name -> role, once loaded
        self.service = InferenceService(self)
        self._stopped = asyncio.Event()
        self._readiness: asyncio.Task | None = None
        self.http = None  # the uvicorn server of the OpenAI-compatible API
        self.http_port: int | None = None
        self.started = time.time()
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None

    # ------------------------------------------------------------------------------------ life cycle
    async def start(self) -> int:
        """Binds and starts answering (health, reflection; the API answers UNAVAILABLE until `load`)."""
        opts = self.options
        interceptors = [BearerAuthInterceptor(opts.auth_token)] if opts.auth_token else []
        # Messages up to several times the prompt limit reach validation, which refuses them naming the field.
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MESSAGE_LIMIT_BYTES)])
        self.server.add_generic_rpc_handlers((self.service.generic_handler(),))
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
        if opts.http_port is not None:
            await self._start_http(opts)
        return self.port

    async def _start_http(self, opts: ServerOptions) -> None:
        from splitserve.cluster.openai_api import create_app, embedded_uvicorn

        self.http = embedded_uvicorn(create_app(self), opts.host, opts.http_port)
        self._http_task = asyncio.ensure_future(self.http.serve())
        while not self.http.started:
            if self._http_task.done():  # it could not bind
                raise OSError(f"http_port: cannot listen on {opts.host}:{opts.http_port}")
            await asyncio.sleep(0.01)
        self.http_port = self.http.servers[0].sockets[0].getsockname()[1]
        log.info("OpenAI-compatible HTTP API on %s:%d", opts.host, self.http_port)

    async def load(self) -> None:
        """Starts the cluster (unless one was given), then reports ready."""
        if self.cluster is None:
            loop = asyncio.get_running_loop()
            self.cluster = await loop.run_in_executor(None, Cluster, self.config)
        cfg = self.cluster.config
        self.model_name = Path(cfg.model).name or cfg.model
        self.roles = self.cluster.roles()
        self.metrics = ServerMetrics(self.model_name, snapshot=self._metrics_snapshot)
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.options.metrics_host or self.options.host,
                                                   self.options.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.options.metrics_host or self.options.host,
                     self.metrics_port)
        self.ready = True
        self._readiness = asyncio.ensure_future(self._watch_readiness())

    async def _watch_readiness(self) -> None:
        """Readiness follows the fleet: NOT_SERVING while a role has no live instance (or while draining), SERVING
        again once it is healed, so a load balancer stops sending what would only wait or fail."""
        shown = None
        while True:
            serving = self.cluster.ready and not self.draining
            if serving != shown:
                status = health_pb2.HealthCheckResponse
                await self.health.set(SERVICE_NAME, status.SERVING if serving else status.NOT_SERVING)
                if shown is not None:
                    log.warning("readiness: %s", "SERVING" if serving else "NOT_SERVING")
                shown = serving
            await asyncio.sleep(READINESS_INTERVAL_S)

    async def drain(self, timeout: float | None = None) -> int:
        """Stops admitting, waits for in-flight requests (then aborts what is left); returns how many were aborted."""
        self.draining = True
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        timeout = self.options.drain_timeout_s if timeout is None else timeout
        try:
            await asyncio.wait_for(self.service.idle.wait(), timeout)
            return 0
        except asyncio.TimeoutError:
            left = list(self.service.active)
            log.warning("drain: %d requests still running after %.0fs; aborting them", len(left), timeout)
            for request_id in left:
                await self.cluster.abort_async(request_id)
            await asyncio.wait_for(self.service.idle.wait(), 10)
            return len(left)

    async def stop(self, drain: bool = True) -> None:
        if drain and self.ready:
            await self.drain()
        if self._readiness is not None:
            self._readiness.cancel()
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.should_exit = True
            await asyncio.wait([self._http_task], timeout=5)
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

    @property
    def active_requests(self) -> int:
        """Generate calls in flight."""
        return len(self.service.active)

    def _metrics_snapshot(self) -> dict | None:
        cluster = self.cluster
        if cluster is None or not cluster.running:
            return None
        return cluster.stats(timeout=5)


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
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    @property
    def http_port(self) -> int | None:
        return self.server.http_port

    @property
    def active_requests(self) -> int:
        return self.server.active_requests

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
