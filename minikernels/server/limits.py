"""Request limits and the checks every HTTP request passes before a route runs.

:class:`ServerLimits` holds the bounds (body size, body read time, header read time,
prompts per request, JSON depth). :class:`RequestGuard` is a pure ASGI middleware that
enforces, in this order:

1. ``Host`` in the allowed hosts (DNS-rebinding defence; default: loopback names), and an
   ``Origin`` header, when a browser sends one, naming an allowed host too (no
   cross-site use of a local server, no permissive CORS) -> 400 / 403.
2. ``Content-Type: application/json`` on requests with a body: a web page cannot send it
   without a CORS preflight, which this server never grants -> 415. (The sleep-mode
   routes, whose arguments are query parameters as in vLLM, take an empty body
   without one; a browser's cross-site POST still fails the ``Origin`` check.)
3. The body size (``Content-Length`` up front, then the bytes actually read) -> 413, and
   the time to receive the whole body (a client trickling its body is cut off) -> 408.

The header read timeout lives in :mod:`.http` (it runs before any ASGI code).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from .errors import APIError, error_response
from .settings import ServerLimits

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
#: routes called with no body (query parameters only: vLLM's sleep-mode routes)
EMPTY_BODY_PATHS = ("/sleep", "/wake_up", "/reset_prefix_cache")


def host_of(value: str) -> str:
    """Host header value ("[::1]:8000", "Example.com.:80") -> bare lower-case host."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` (bare) matches an entry: exact, ``*`` (any) or ``*.domain`` (subdomains)."""
    for entry in allowed:
        if entry == "*" or entry == host:
            return True
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
    return False


def default_allowed_hosts(bind_host: str) -> Optional[tuple[str, ...]]:
    """Hosts accepted when ``--allowed-hosts`` is not given: the bound address and the
    loopback names; ``None`` (no Host check) when bound to every interface."""
    if bind_host in ("0.0.0.0", "::", ""):
        return None
    return tuple(dict.fromkeys([host_of(bind_host), *LOOPBACK_HOSTS]))


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


class RequestGuard:
    """ASGI middleware: Host / Origin / content type / body size / body read time."""

    def __init__(self, app: Any, limits: ServerLimits,
                 allowed_hosts: Optional[tuple[str, ...]]) -> None:
        self.app = app
        self.limits = limits
        self.allowed_hosts = allowed_hosts

    async def _refuse(self, scope: dict, receive: Callable, send: Callable,
                      err: APIError) -> None:
        await error_response(err)(scope, receive, send)

    def _admission_error(self, scope: dict) -> Optional[APIError]:
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k, v)
        if self.allowed_hosts is not None:
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            if not host or not host_allowed(host, self.allowed_hosts):
                return APIError("the Host header names a host this server does not serve "
                                "(see --allowed-hosts)", status=400, code="invalid_host",
                                headers={"Connection": "close"})
            origin = headers.get(b"origin")
            if origin is not None:
                o_host = urlsplit(origin.decode("latin-1")).hostname or ""
                if not host_allowed(host_of(o_host), self.allowed_hosts):
                    return APIError("cross-origin requests are not allowed", status=403,
                                    type="permission_error", code="cross_origin")
        if scope.get("method") in _BODY_METHODS:
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            empty = headers.get(b"content-length", b"0") == b"0" and \
                b"transfer-encoding" not in headers
            if not _is_json(ctype) and not (empty and scope.get("path") in EMPTY_BODY_PATHS):
                return APIError(f"Content-Type must be application/json, got "
                                f"{ctype or 'none'!r}", status=415, code="invalid_content_type",
                                headers={"Connection": "close"})
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() \
                    and int(length) > self.limits.max_body_bytes:
                return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(f"the request body is larger than {self.limits.max_body_bytes} bytes",
                        status=413, code="request_too_large", headers={"Connection": "close"})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self._admission_error(scope)
        if err is not None:
            await self._refuse(scope, receive, send, err)
            return
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.limits.body_timeout_s
        state = {"read": 0, "done": False}

        async def guarded_receive() -> dict:
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(),
                                                 max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise APIError(f"the request body did not arrive within "
                               f"{self.limits.body_timeout_s:g} s", status=408,
                               code="request_timeout", headers={"Connection": "close"}) \
                    from None
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.limits.max_body_bytes:
                    raise self._too_large()
                if not message.get("more_body", False):
                    state["done"] = True
            else:
                state["done"] = True
            return message

        await self.app(scope, guarded_receive, send)
