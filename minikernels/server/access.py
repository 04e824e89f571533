"""Access log and HTTP metrics: one line and one counter per request.

A pure ASGI middleware (streaming-safe: it only watches ``http.response.start`` and the
end of the response). The log line, on logger ``minikernels.access`` at INFO::

    127.0.0.1:53122 "POST /v1/chat/completions" 200 1534.2ms

Paths are reduced to the server's routes (anything else is ``other``) and methods to the
standard ones before they become metric labels, so clients cannot grow the label set.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from .metrics import ServerMetrics

access_logger = logging.getLogger("minikernels.access")

KNOWN_PATHS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/health",
                         "/metrics", "/version"})


def route_label(path: str) -> str:
    """A bounded label for ``path``."""
    if path in KNOWN_PATHS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def _printable(text: str, limit: int = 200) -> str:
    """No control characters (log injection) and a bounded length."""
    text = text[:limit]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class AccessLogMiddleware:
    """Counts every response in ``metrics`` and logs one access line for it."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = {"code": 0}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            method = scope.get("method", "")
            path = scope.get("path", "")
            code = status["code"] or 499   # nothing sent: the client went away
            self.metrics.count_http(method, route_label(path), code)
            if access_logger.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                access_logger.info('%s:%s "%s %s" %d %.1fms', client[0], client[1],
                                   _printable(method, 16), _printable(path), code,
                                   (time.monotonic() - t0) * 1e3)
