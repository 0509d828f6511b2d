"""Size limits on what edges send: gRPC messages, and the JSON documents inside them.

Both numbers come from shared/limits.py. gRPC core refuses a message above its own limit without telling the application, so the core
limit is set to HARD_FACTOR times the configured one and this interceptor checks the configured
one first: a message above it is never parsed; the handler gets an `Oversize` marker in its
place, logs it, counts it and ends the call with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from pydantic import BaseModel

from fieldline.shared.limits import MAX_TUNNEL_JSON_CHARS

log = structlog.get_logger(__name__)

HARD_FACTOR = 2  # gRPC core's own limit, a backstop that bounds memory per message
LOG_EVERY_S = 5.0

M = TypeVar("M", bound=BaseModel)


def parse_document(model: type[M], text: str, what: str) -> M:
    """A JSON document from a tunnel message, bounded in size and validated as `model`.

    Raises ValueError (too large) or pydantic's ValidationError (a subclass of it); the
    tunnel's reader counts and refuses the message either way.
    """
    if len(text) > MAX_TUNNEL_JSON_CHARS:
        raise ValueError(f"{what} of {len(text)} characters exceeds {MAX_TUNNEL_JSON_CHARS}")
    return model.model_validate_json(text)


@dataclass(frozen=True)
class Oversize:
    """Stands in for a request message that exceeded the limit (it was never parsed)."""

    size: int
    limit: int
    method: str

    def __str__(self) -> str:
        return f"message of {self.size} bytes exceeds the limit of {self.limit}"


class MessageLimitInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limit: int, on_oversize: Callable[[Oversize], None] | None = None):
        self.limit = limit
        self.on_oversize = on_oversize
        self.refused = 0
        self._last_log = 0.0

    def _checked(self, method: str, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        def deserialize(data: bytes) -> Any:
            if len(data) > self.limit:
                marker = Oversize(len(data), self.limit, method)
                self.refused += 1
                if self.on_oversize is not None:
                    self.on_oversize(marker)
                now = time.monotonic()
                if now - self._last_log >= LOG_EVERY_S:
                    log.warning(
                        "oversize gRPC message refused",
                        method=method,
                        size=marker.size,
                        limit=self.limit,
                        refused_total=self.refused,
                    )
                    self._last_log = now
                return marker
            return parse(data) if parse is not None else data

        return deserialize

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        parse = self._checked(method, handler.request_deserializer)
        out = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(handler.unary_unary, parse, out)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(handler.unary_stream, parse, out)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(handler.stream_unary, parse, out)
        return grpc.stream_stream_rpc_method_handler(handler.stream_stream, parse, out)
