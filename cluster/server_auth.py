"""Bearer-token authentication of the gRPC API: every method but health needs `authorization: Bearer <token>`."""
from __future__ import annotations

import hmac

import grpc
from grpc_health.v1 import health

HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
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
